"""Each stage ``harness plan`` estimates counts only what the study's data can give it: the held-out
text the evaluation and the routing analysis read is at most the held-out split (the split's share
of the corpus before the data step, the split itself after it, the tasks as built once they are),
and a training run's validation passes at most the validation split's windows."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import yaml
from pico_study import STUDY, cli_output, write_corpus

from harness.study.runs import plan
from harness.study.spec import load_study
from harness.workflow import probe, stages
from harness.workflow.estimate import evaluation_steps, validation_batches

R = ("--results", "results")


def small_study(root: Path) -> Path:
    """Two runs (a dense model and its E4 k2 twin) at 1e12 FLOPs on about 200 KB of code-like
    text, the evaluation's settings left at their defaults (2 MB held out, 500 questions): each run
    repeats its data, as a user's small study does."""
    write_corpus(root, names=400, files=120, lines=50, longest=9)
    model = {"name": "dense-mini", "vocab_size": 512, "d_model": 64, "n_layers": 2, "n_heads": 2, "d_ff": 128}
    model |= {"max_seq_len": 64, "tie_embeddings": True}
    (root / "model.yaml").write_text(yaml.safe_dump(model))
    study = {
        "name": "mini",
        "description": "two runs at 1e12 FLOPs on a small corpus",
        "device": "cpu",
        "data": {"source": "files", "paths": [str(root / "corpus")], "validation_fraction": 0.1}
        | {"test_fraction": 0.1, "vocab_size": 512, "allow_repetition": True},
        "models": [{"config": str(root / "model.yaml")}, {"base": str(root / "model.yaml"), "experts": 4, "top_k": 2}],
        "budgets": [1e12],
        "seeds": [0],
        "recipe": {"batch_size": 16, "seq_len": 64, "eval_every": 200, "eval_batches": 8, "train_threads": 1},
    }
    path = root / "mini.yaml"
    path.write_text(yaml.safe_dump(study))
    size = sum(p.stat().st_size for p in (root / "corpus").iterdir())
    assert 150_000 < size < 250_000, size
    return path


def _rows(out: str) -> dict[str, list[str]]:
    lines = out.split("\nstage ")[1].split("\n\n")[0].splitlines()[2:]
    return {line.split()[0]: re.split(r"\s{2,}", line.strip()) for line in lines}


def _seconds(text: str) -> float:
    value, unit = text.split()[:2]
    return float(value) * {"s": 1, "min": 60, "h": 3600}[unit]


def test_a_small_corpus_bounds_the_evaluation_before_its_data_is_prepared(tmp_path, monkeypatch):
    """The reported case: two runs at 1e12 FLOPs on a 200 KB corpus, planned at 1.8 h with 29.5
    min of evaluation for "2.0 MB held out"; its runs take about a minute."""
    path = small_study(tmp_path)
    monkeypatch.setattr(probe, "probe_step_seconds", lambda *a: 0.02)
    monkeypatch.setattr(probe.host_load, "sample", lambda: {"host_load_1m": 0.0})
    code, out, err = cli_output("plan", str(path), "--results", str(tmp_path / "results"))
    assert code == 0, err
    rows = _rows(out)
    evaluate, routing = rows["evaluate"][-1], rows["routing"][-1]
    assert "about 10% of a 0.2 MB corpus" in evaluate and "2.0 MB" not in evaluate, evaluate
    held = float(re.search(r"(\d+) KB held out", evaluate).group(1))
    assert 15 <= held <= 25  # 10% of about 200 KB
    assert _seconds(rows["evaluate"][2]) < 60  # two jobs of about 20 s of start-up each
    assert "K held-out tokens an MoE run" in routing and "66K" not in routing
    assert _seconds(rows["total"][1]) < 15 * 60, out


def test_the_held_out_text_before_the_data_is_the_splits_share_of_the_corpus():
    tiny = load_study("tiny")
    held = stages.heldout_before_data(tiny, 12_000_000)
    assert held.bytes == pytest.approx(12e6 * tiny.data.test_fraction)
    assert held.validation_tokens == pytest.approx(12e6 * tiny.data.validation_fraction / stages.BYTES_PER_TOKEN)
    assert stages.ppl_bytes(tiny, held) == 240_000 < tiny.eval.heldout_max_bytes  # the split is the bound
    big = stages.heldout_before_data(tiny, 10**9)
    assert stages.ppl_bytes(tiny, big) == tiny.eval.heldout_max_bytes  # the setting is
    assert stages.eval_tokens(tiny, held) < stages.eval_tokens(tiny, None)
    no_test = dataclasses.replace(tiny, data=dataclasses.replace(tiny.data, test_fraction=0.0))
    assert stages.heldout_before_data(no_test, 12_000_000).bytes == pytest.approx(12e6 * 0.03)  # validation


def test_prepared_data_and_built_tasks_give_the_exact_held_out_text(study, monkeypatch):
    monkeypatch.chdir(study)
    tasks_json = study / "results" / "pico" / "data" / "tasks" / "tasks.json"
    built = json.loads(tasks_json.read_text())["tasks"]
    code, out, err = cli_output("plan", STUDY, *R)
    assert code == 0, err
    evaluate = _rows(out)["evaluate"][-1]
    assert "(tasks.json)" in evaluate and f"{built['heldout_ppl']['bytes'] / 1e3:.0f} KB held out" in evaluate
    meta = json.loads((study / "results" / "pico" / "data" / "data.json").read_text())
    s = load_study(study / STUDY)
    assert stages.current_tasks(s, meta, tasks_json) is not None
    edited = dataclasses.replace(s, eval=dataclasses.replace(s.eval, mc_questions=7))
    assert stages.current_tasks(edited, meta, tasks_json) is None  # built with other settings: built again
    tasks_json.unlink()
    evaluate = _rows(cli_output("plan", STUDY, *R)[1])["evaluate"][-1]
    split = meta["splits"]["test"]["bytes"]
    assert "(data.json)" in evaluate and f"{min(split, s.eval.heldout_max_bytes) / 1e3:.0f} KB" in evaluate


def test_eval_limit_bounds_the_questions_and_documents():
    tiny = load_study("tiny")
    held = stages.Heldout(150_000, 50_000, 20, 80_000, "data.json")
    limited = dataclasses.replace(tiny, eval=dataclasses.replace(tiny.eval, limit=5))
    assert stages.mc_questions(limited, held) == 5 and stages.mc_questions(tiny, held) == tiny.eval.mc_questions
    assert stages.ppl_bytes(limited, held) == pytest.approx(5 * 150_000 / 20)
    built = dataclasses.replace(held, ppl_bytes=100_000, questions=120)
    assert stages.mc_questions(tiny, built) == 120 and stages.ppl_bytes(tiny, built) == 100_000


def test_routing_reads_at_most_the_split_and_nothing_for_a_dense_run():
    from harness.analysis.specialisation import DEFAULT_MAX_TOKENS

    dense, moe = plan(load_study("tiny"))
    assert dense.model.moe is None and moe.model.moe is not None
    small = stages.Heldout(30_000, 10_000, 5, 10_000, "data.json")
    assert stages.routing_tokens(dense, small) == 0
    assert stages.routing_tokens(moe, small) == 10_000
    assert stages.routing_tokens(moe, None) == DEFAULT_MAX_TOKENS


def test_validation_passes_are_bounded_by_the_validation_split():
    """tiny's validation split holds 82,677 tokens, 645 windows of 128: 41 batches of 16, not the
    48 eval_batches asks for (TokenShard.eval_indices takes each window once)."""
    run = plan(load_study("tiny"))[0]
    assert validation_batches(run, None) == 48
    assert validation_batches(run, 82_677) == 41
    assert validation_batches(run, 10**9) == 48
    assert evaluation_steps(run, 82_677) == pytest.approx(evaluation_steps(run) * 41 / 48)
