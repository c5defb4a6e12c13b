"""lm-eval tasks built from a study's held-out split, so every run is evaluated offline.

    harness tasks tiny        # writes results/tiny/data/tasks/

Two tasks, each a YAML file lm-eval reads through ``--include_path`` plus a JSONL file of
documents it loads with the ``json`` builder of ``datasets`` (local, no hub):

  heldout_ppl      loglikelihood_rolling over held-out documents: bits per byte, byte and
                   word perplexity. Tokenizer-independent, so runs with different
                   vocabularies compare (the lm-eval wikitext task, on our own data).
  heldout_code_mc  multiple choice: given the lines of a held-out file before some line, pick
                   that line among it and lines drawn from other held-out files, re-indented
                   like it so indentation gives nothing away. acc and acc_norm; chance is
                   1 / mc_choices.

The documents come from the test split (the validation split when the study has none), which
training never reads; they are decoded from ``test.bin`` so the task sees exactly the text the
shards hold. Everything is a function of the data and the study's ``eval`` section.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from harness.core.io import read_json, write_json, write_text
from harness.study.spec import LOCAL_TASKS, EvalConfig

MC_SEED = 20240617
PPL_AGGREGATION = {
    "bits_per_byte": "bits_per_byte",
    "byte_perplexity": "weighted_perplexity",
    "word_perplexity": "weighted_perplexity",
}
"""heldout_ppl's metrics and the aggregations lm-eval registers for them (its wikitext task uses
them): each pools log-likelihoods and units (bytes, words) over all documents before dividing.
Written out, with higher_is_better, so that lm-eval assumes nothing and warns of nothing."""
MIN_LINE_CHARS = 12  # a line worth guessing: not blank, not a lone bracket or `else:`
MAX_LINE_CHARS = 160


def heldout_documents(data_dir: Path, tok) -> tuple[str, list[str]]:
    """The held-out split's documents, decoded from its shard, in their fixed order."""
    meta = read_json(data_dir / "data.json")
    split = "test" if meta["splits"]["test"]["documents"] else "validation"
    ids = np.fromfile(data_dir / f"{split}.bin", dtype=meta["dtype"]).astype(np.int64)
    ends = np.flatnonzero(ids == meta["tokenizer"]["eos_id"])
    docs, start = [], 0
    for end in ends:
        docs.append(tok.decode(ids[start:end].tolist(), skip_special_tokens=False))
        start = end + 1
    return split, docs


def _indent(line: str) -> str:
    return line[: len(line) - len(line.lstrip(" \t"))]


def code_mc_questions(docs: list[str], cfg: EvalConfig, fits: Callable[[str], bool]) -> list[dict[str, Any]]:
    """Questions of the multiple-choice task: context lines, choices, index of the real line.
    A line is a candidate (answer or distractor) when ``fits(line)``: short enough in tokens to
    leave most of the model's context to the lines before it."""
    lines = [doc.splitlines(keepends=True) for doc in docs]
    candidates = [
        (d, i)
        for d, doc_lines in enumerate(lines)
        for i, line in enumerate(doc_lines)
        if i > 0
        and MIN_LINE_CHARS <= len(line.strip()) <= MAX_LINE_CHARS
        and line.endswith("\n")
        and fits(line.lstrip(" \t"))
        and fits(line)
    ]
    if len(lines) < cfg.mc_choices or not candidates:
        return []
    rng = np.random.default_rng(MC_SEED)
    picked = rng.choice(len(candidates), size=min(cfg.mc_questions, len(candidates)), replace=False)
    questions = []
    for c in sorted(picked.tolist()):
        d, i = candidates[c]
        gold = lines[d][i]
        indent = _indent(gold)
        choices = [gold]
        while len(choices) < cfg.mc_choices:
            od, oi = candidates[int(rng.integers(len(candidates)))]
            other = indent + lines[od][oi].lstrip(" \t")
            if od != d and other.strip() not in {ch.strip() for ch in choices}:
                choices.append(other)
        order = rng.permutation(cfg.mc_choices)
        shuffled = [choices[j] for j in order]
        context = "".join(lines[d][max(0, i - cfg.mc_context_lines) : i])
        questions.append({"context": context, "choices": shuffled, "label": int(np.flatnonzero(order == 0)[0])})
    return questions


def _task_yaml(name: str, data_file: Path, body: dict[str, Any]) -> str:
    spec = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file.resolve())}},
        "test_split": "test",
        **body,
        "metadata": {"version": 1.0},
    }
    return "# Written by `harness tasks`; lm-eval reads it with --include_path.\n" + yaml.safe_dump(
        spec, sort_keys=False
    )


def _jsonl(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def write_tasks(
    data_dir: Path, cfg: EvalConfig, seq_len: int, out_dir: Path | None = None, made_by: str = "harness data STUDY"
) -> dict[str, Any]:
    """Write the local tasks' YAML and JSONL files and ``tasks.json`` (written last).
    ``seq_len`` is the study's training context: an answer line takes at most a quarter of it.
    ``made_by``: the command that prepares the data, named when its tokenizer is missing."""
    from harness.data.prepare import load_tokenizer

    out_dir = out_dir or data_dir / "tasks"  # made by the first write, once the tasks are known to exist
    tok = load_tokenizer(data_dir, made_by)
    split, docs = heldout_documents(data_dir, tok)
    kept, total = [], 0
    for doc in docs:
        if total >= cfg.heldout_max_bytes:
            break
        kept.append({"text": doc})
        total += len(doc.encode("utf-8"))
    # Answer lines and the stripped distractors take at most a quarter of the context each, so a
    # re-indented distractor (indentation + line) and the newline before it still fit the window.
    max_tokens = max(1, seq_len // 4)
    questions = code_mc_questions(docs, cfg, lambda line: len(tok.encode(line).ids) <= max_tokens)
    if not kept or not questions:
        raise ValueError(
            f"{data_dir}: the {split} split holds {len(docs)} documents, too few for the local tasks "
            f"(need at least {cfg.mc_choices} with lines of {MIN_LINE_CHARS}+ characters); raise test_fraction"
        )
    files = {
        "heldout_ppl": (
            _jsonl(kept),
            {
                "output_type": "loglikelihood_rolling",
                "doc_to_text": "",
                "doc_to_target": "{{text}}",
                "metric_list": [
                    {"metric": m, "aggregation": agg, "higher_is_better": False} for m, agg in PPL_AGGREGATION.items()
                ],
            },
        ),
        "heldout_code_mc": (
            _jsonl(questions),
            {
                "output_type": "multiple_choice",
                "doc_to_text": "{{context}}",
                "doc_to_choice": "choices",
                "doc_to_target": "label",
                "target_delimiter": "",
                "metric_list": [
                    {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                    {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
                ],
            },
        ),
    }
    assert tuple(files) == LOCAL_TASKS
    digest = hashlib.sha256()
    for name, (rows, body) in files.items():
        data_file = out_dir / f"{name}.jsonl"
        write_text(data_file, rows)
        write_text(out_dir / f"{name}.yaml", _task_yaml(name, data_file, body))
        digest.update(rows.encode())
    meta = {
        "split": split,
        "seq_len": seq_len,
        "data_fingerprint": read_json(data_dir / "data.json")["fingerprint"],
        "tasks": {
            "heldout_ppl": {"documents": len(kept), "bytes": total},
            "heldout_code_mc": {
                "questions": len(questions),
                "choices": cfg.mc_choices,
                "chance_accuracy": 1 / cfg.mc_choices,
            },
        },
        "fingerprint": digest.hexdigest(),
        "config": cfg.__dict__,
    }
    write_json(out_dir / "tasks.json", meta)
    return meta


__all__ = ["code_mc_questions", "heldout_documents", "write_tasks"]
