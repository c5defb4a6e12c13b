"""The lm-eval model, the local held-out tasks, `harness evaluate`, and agreement with the
Hugging Face export through lm-eval's own CLI."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from lm_eval.api.instance import Instance

from harness.core.io import read_json, write_json
from harness.data.prepare import iter_documents, prepare, split_of
from harness.data.tasks import write_tasks
from harness.evaluate.lm_eval_model import HarnessLM
from harness.evaluate.lm_eval_run import evaluate_run
from harness.report.build import write_report
from harness.study.runs import plan
from harness.study.spec import load_study
from harness.train.run import train

BIN = Path(sys.executable).parent
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _code_corpus(root: Path) -> Path:
    """Python-like files: short lines, indentation, names that recur within a file."""
    rng = np.random.default_rng(1)
    src = root / "corpus"
    src.mkdir()
    words = ["value", "count", "items", "result", "total", "name", "index", "data", "key", "node"]
    calls = ["len", "sum", "max", "sorted", "print", "str", "int", "list"]
    for f in range(80):
        local = rng.choice(words, size=4, replace=False)
        lines = [f"def func_{f}({local[0]}, {local[1]}):"]
        for _ in range(rng.integers(8, 20)):
            a, b = rng.choice(local, size=2)
            kind = rng.integers(4)
            if kind == 0:
                lines.append(f"    {a} = {rng.choice(calls)}({b})")
            elif kind == 1:
                lines.append(f"    if {a} > {rng.integers(100)}:")
                lines.append(f"        {b} = {b} + {a}")
            elif kind == 2:
                lines.append(f"    for {a} in {b}:")
                lines.append(f"        {rng.choice(calls)}({a})")
            else:
                lines.append(f"    {a} = {b} * {rng.integers(2, 9)}")
        lines.append(f"    return {local[2]}")
        (src / f"mod_{f:03d}.py").write_text("\n".join(lines) + "\n")
    return src


MODEL = {
    "name": "dense-eval",
    "vocab_size": 384,
    "d_model": 32,
    "n_layers": 2,
    "n_heads": 2,
    "d_ff": 64,
    "max_seq_len": 64,
    "tie_embeddings": True,
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small study with a dense run and its matched MoE (Mixtral-exportable), trained, and
    the local tasks written."""
    root = tmp_path_factory.mktemp("eval")
    _code_corpus(root)
    (root / "dense-eval.yaml").write_text(yaml.safe_dump(MODEL))
    study_file = root / "evalstudy.yaml"
    study_file.write_text(
        yaml.safe_dump(
            {
                "name": "evalstudy",
                "device": "cpu",
                "data": {
                    "source": "files",
                    "paths": ["corpus"],  # relative: document keys, hence splits, do not depend on tmp
                    "validation_fraction": 0.1,
                    "test_fraction": 0.15,
                    "vocab_size": 384,
                    "allow_repetition": True,
                },
                "models": [
                    {"config": str(root / "dense-eval.yaml")},
                    {"base": str(root / "dense-eval.yaml"), "experts": 4, "top_k": 2},
                ],
                "budgets": [2e9],
                "seeds": [0],
                "recipe": {"batch_size": 4, "seq_len": 64, "lr": 3e-3, "eval_every": 50, "min_steps": 20},
                "eval": {
                    "tasks": ["heldout_ppl", "heldout_code_mc", "hellaswag", "no_such_task"],
                    "batch_size": 8,
                    "mc_questions": 40,
                },
            }
        )
    )
    study = load_study(study_file)
    results = root / "results" / "evalstudy"
    cwd = Path.cwd()
    os.chdir(root)
    try:
        prepare(study, results / "data")
    finally:
        os.chdir(cwd)
    runs = {}
    for run in plan(study):
        train(run, study, results / "data", results / "runs" / run.run_id, progress=False)
        runs["moe" if run.model.moe else "dense"] = results / "runs" / run.run_id
    meta = write_tasks(results / "data", study.eval, study.recipe.seq_len)
    return root, study, results, runs, meta


def _ll(lm, pairs):
    return lm.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)], True)


def _manual_logprob(model, tokens: list[int], start: int) -> float:
    """Sum of log p(tokens[t] | tokens[:t]) for t >= start, one unbatched forward."""
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([tokens[:-1]])).logits[0].float(), -1)
    return float(sum(logp[t - 1, tokens[t]] for t in range(start, len(tokens))))


def test_loglikelihood_equals_a_direct_forward_and_batching_changes_nothing(trained):
    _, _, _, runs, _ = trained
    lm = HarnessLM(checkpoint=str(runs["moe"]), batch_size=1)
    pairs = [
        ("def func_1(value, count):\n", "    value = len(count)\n"),
        ("    for key in", " items:\n"),
        ("x", " = 3"),
        ("", "return total\n"),
    ]
    single = _ll(lm, pairs)
    lm.batch_size = 3
    batched = _ll(lm, pairs)
    for (a, ga), (b, gb) in zip(single, batched, strict=True):
        assert a == pytest.approx(b, abs=1e-5) and ga == gb
    for (context, continuation), (score, _) in zip(pairs, single, strict=True):
        # lm-eval moves the context's trailing whitespace to the continuation
        ctx = lm.tok_encode(context.rstrip()) if context else [lm.eot_token_id]
        whole = lm.tok_encode(context + continuation) if context else ctx + lm.tok_encode(continuation)
        assert score == pytest.approx(_manual_logprob(lm.model, whole, len(ctx)), abs=1e-4)
    assert all(score < 0 for score, _ in single)


def test_rolling_loglikelihood_scores_every_token_once_in_training_length_windows(trained):
    _, _, results, runs, _ = trained
    lm = HarnessLM(checkpoint=str(runs["dense"]), batch_size=4)
    assert lm.max_length == 64  # the run's training context, from its record
    text = (results.parent.parent / "corpus" / "mod_003.py").read_text() * 3
    L = lm.max_length
    if len(lm.tok_encode(text)) % L == 0:  # make the last window a short one
        text += "    x = 1\n"
    tokens = lm.tok_encode(text)
    assert len(tokens) > 2 * L and len(tokens) % L
    expected, seq = 0.0, [lm.eot_token_id, *tokens]
    for p in range(0, len(tokens), L):  # tokens[p:e] predicted from the L tokens before e
        e = min(p + L, len(tokens))
        first = max(0, e - L)  # the last, shorter window keeps a full context
        expected += _manual_logprob(lm.model, seq[first : e + 1], p + 1 - first)
    (got,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], True)
    assert got == pytest.approx(expected, rel=1e-5)
    short = "    return total\n"
    (got_short,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (short,), 0)], True)
    assert got_short == pytest.approx(_manual_logprob(lm.model, [lm.eot_token_id, *lm.tok_encode(short)], 1), rel=1e-5)


def _uncached_greedy(lm, prompt: list[int], n: int) -> list[int]:
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(lm.model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(prompt) :]


def test_generate_until_is_batched_greedy_with_a_kv_cache_and_stops(trained):
    _, _, _, runs, _ = trained
    lm = HarnessLM(checkpoint=str(runs["moe"]), batch_size=3, max_gen_toks=12)
    prompts = ["def func_7(key, data):\n", "    for", "        total = total + index\n    if value > 4"]
    reference = [lm.tok_decode(_uncached_greedy(lm, lm.tok_encode(p), 12)) for p in prompts]
    no_stop = {"until": ["NEVER-IN-OUTPUT"], "max_gen_toks": 12, "do_sample": False}
    reqs = [Instance("generate_until", {}, (p, no_stop), i) for i, p in enumerate(prompts)]
    out = lm.generate_until(reqs, True)
    for got, ref in zip(out, reference, strict=True):  # left-padded batch == one prompt at a time
        assert got == ref.split("<|endoftext|>")[0]
    stop = reference[0][3:6]
    assert stop and stop in reference[0]
    (cut,) = lm.generate_until([Instance("generate_until", {}, (prompts[0], no_stop | {"until": [stop]}), 0)], True)
    assert cut == reference[0][: reference[0].find(stop)]
    sampling = {"until": ["\n"], "do_sample": True, "temperature": 1.0}
    with pytest.raises(ValueError, match="greedily"):
        lm.generate_until([Instance("generate_until", {}, (prompts[0], sampling), 0)], True)


def test_local_tasks_come_from_the_held_out_split(trained):
    root, study, results, _, meta = trained
    tasks = results / "data" / "tasks"
    cwd = Path.cwd()
    os.chdir(root)
    try:  # the split the tasks must use, read from the corpus itself
        held_out = [d.text for d in iter_documents(study.data) if split_of(d.key, 0.1, 0.15) == "test"]
    finally:
        os.chdir(cwd)
    ppl = [json.loads(line)["text"] for line in (tasks / "heldout_ppl.jsonl").read_text().splitlines()]
    assert ppl == held_out and meta["split"] == "test"
    questions = [json.loads(line) for line in (tasks / "heldout_code_mc.jsonl").read_text().splitlines()]
    assert len(questions) == meta["tasks"]["heldout_code_mc"]["questions"] > 10
    for q in questions:
        gold = q["choices"][q["label"]]
        assert any(q["context"] + gold in doc for doc in held_out)  # the real next line
        assert len({c.strip() for c in q["choices"]}) == 4  # distinct choices
        indent = {c[: len(c) - len(c.lstrip())] for c in q["choices"]}
        assert len(indent) == 1  # indentation gives nothing away
    assert len({q["label"] for q in questions}) == 4
    spec = yaml.safe_load((tasks / "heldout_ppl.yaml").read_text())
    assert (
        spec["output_type"] == "loglikelihood_rolling" and Path(spec["dataset_kwargs"]["data_files"]["test"]).is_file()
    )
    again = write_tasks(results / "data", study.eval, study.recipe.seq_len, out_dir=root / "again")
    assert again["fingerprint"] == meta["fingerprint"]  # a function of the data and the study


def test_lm_eval_loads_the_local_tasks_without_a_warning(trained, caplog, monkeypatch, tmp_path):
    import datasets
    from lm_eval.tasks import TaskManager

    _, _, results, _, _ = trained
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path)  # offline: local JSON files
    manager = TaskManager(include_path=str(results / "data" / "tasks"), include_defaults=False)
    with caplog.at_level(logging.WARNING, logger="lm_eval"):
        tasks = manager.load(["heldout_ppl", "heldout_code_mc"])["tasks"]
    assert sorted(tasks) == ["heldout_code_mc", "heldout_ppl"]
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warned == [], warned
    ppl = tasks["heldout_ppl"]
    assert ppl.higher_is_better() == dict.fromkeys(("bits_per_byte", "byte_perplexity", "word_perplexity"), False)
    assert ppl.aggregation()["bits_per_byte"]([(-2.0 * math.log(2), 1), (-4.0 * math.log(2), 2)]) == 2.0


def _lm_eval_cli(args: list[str], out: Path, cwd: Path) -> subprocess.Popen:
    env = os.environ | OFFLINE | {"HF_HOME": str(cwd / "hf-home")}
    cmd = [str(BIN / "lm_eval"), "run", *args, "--output_path", str(out), "--batch_size", "8"]
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _bpb(out: Path) -> float:
    (result,) = list(out.rglob("results_*.json"))
    return json.loads(result.read_text())["results"]["heldout_ppl"]["bits_per_byte,none"]


@pytest.mark.slow
def test_lm_eval_cli_runs_our_model_and_the_hf_export_gives_the_same_bits_per_byte(trained, tmp_path):
    _, _, results, runs, _ = trained
    hf_dir = tmp_path / "hf"
    export = subprocess.run(
        [
            sys.executable,
            "-m",
            "harness",
            "export",
            str(trained[1].path),
            "--results",
            str(results.parent),
            "--run",
            runs["moe"].name,
            "--out",
            str(hf_dir),
        ],
        capture_output=True,
        text=True,
    )
    assert export.returncode == 0, export.stderr
    assert "MixtralForCausalLM" in export.stdout
    tasks = ["--include_path", str(results / "data" / "tasks"), "--tasks", "heldout_ppl"]
    ours = _lm_eval_cli(
        ["--model", "moe-harness", "--model_args", f"checkpoint={runs['moe']}", *tasks], tmp_path / "a", tmp_path
    )
    theirs = _lm_eval_cli(
        ["--model", "hf", "--model_args", f"pretrained={hf_dir},dtype=float32", *tasks], tmp_path / "b", tmp_path
    )
    for proc in (ours, theirs):
        log = proc.communicate(timeout=300)[0]
        assert proc.returncode == 0, log[-3000:]
    a, b = _bpb(tmp_path / "a"), _bpb(tmp_path / "b")
    assert 0.5 < a < 8 and abs(a - b) < 1e-4, (a, b)


@pytest.mark.slow
def test_harness_evaluate_writes_eval_json_and_names_the_tasks_it_could_not_run(trained):
    root, study, results, runs, _ = trained
    env = os.environ | {"HF_HOME": str(root / "hf-home")}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "harness",
            "evaluate",
            str(study.path),
            "--results",
            str(results.parent),
            "--run",
            runs["dense"].name,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ev = read_json(runs["dense"] / "eval.json")
    assert ev["run_id"] == runs["dense"].name and ev["settings"]["download"] is False
    assert set(ev["tasks"]) == {"heldout_ppl", "heldout_code_mc"}
    assert 0.5 < ev["tasks"]["heldout_ppl"]["bits_per_byte"] < 8
    assert 0.0 <= ev["tasks"]["heldout_code_mc"]["acc"] <= 1.0
    assert ev["tasks"]["heldout_code_mc"]["n_samples"] == 40
    assert set(ev["not_run"]) == {"hellaswag", "no_such_task"}
    assert "no task" in ev["not_run"]["no_such_task"]
    assert "Offline" in ev["not_run"]["hellaswag"]  # downloads are off by default
    assert "hellaswag: not run" in proc.stderr and ev["provenance"]["git"]

    # the report gains lm-eval columns, a table of every task, the not-run list and the figure
    local_only = dataclasses.replace(study.eval, tasks=["heldout_ppl", "heldout_code_mc"])
    moe_eval = evaluate_run(runs["moe"], results / "data" / "tasks", local_only)
    write_json(runs["moe"] / "eval.json", {"run_id": runs["moe"].name} | moe_eval)
    md = write_report(study, results).read_text()
    assert "## Downstream evaluation (lm-eval)" in md and "- not run: `hellaswag`" in md
    bpb = f"{moe_eval['tasks']['heldout_ppl']['bits_per_byte']:.4f}"
    moe_row = next(line for line in md.splitlines() if line.startswith(f"| {runs['moe'].name}"))
    assert bpb in moe_row
    figure = results / "figures" / "downstream_vs_loss.png"
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "figures/downstream_vs_loss.png" in md
    compare = (results / "tables" / "dense_vs_moe.csv").read_text().splitlines()
    diff = moe_eval["tasks"]["heldout_ppl"]["bits_per_byte"] - ev["tasks"]["heldout_ppl"]["bits_per_byte"]
    assert f"{diff:+.4f}" in compare[1]


@pytest.mark.gpu
def test_cuda_scores_and_generation_agree_with_cpu(trained):
    """On CUDA: fp32 matches the CPU to float tolerance; bf16 autocast (the default there) stays
    within bf16 rounding of it, and greedy generation runs through the bf16 KV cache."""
    _, _, _, runs, _ = trained
    pairs = [("def func_1(value, count):\n", "    value = len(count)\n"), ("    for key in", " items:\n")]
    cpu = _ll(HarnessLM(checkpoint=str(runs["moe"]), device="cpu"), pairs)
    fp32 = _ll(HarnessLM(checkpoint=str(runs["moe"]), device="cuda", dtype="float32"), pairs)
    gpu = HarnessLM(checkpoint=str(runs["moe"]), device="cuda")
    assert gpu.autocast
    bf16 = _ll(gpu, pairs)
    for (c, _), (f, _), (b, _) in zip(cpu, fp32, bf16, strict=True):
        assert f == pytest.approx(c, abs=1e-3)
        assert b == pytest.approx(c, rel=0.05)
    kwargs = {"until": ["\n\n"], "max_gen_toks": 8, "do_sample": False}
    out = gpu.generate_until([Instance("generate_until", {}, (p, kwargs), i) for i, (p, _) in enumerate(pairs)], True)
    assert len(out) == 2 and all(isinstance(t, str) for t in out)
