"""``harness measure`` times the training step as the run takes it: on a quiet host its training
tokens/s agrees with the training run's own over the whole run (record.json) within
``AGREEMENT_LIMIT``. The tiny study's two runs (dense-d64 and its E16 k2 twin, bf16 under
torch.compile, one thread, batch 16 x 128), shortened: a fifth of the budget, a quarter of the
corpus. Each verb runs as the pipeline runs it, in a process of its own."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from verb_subprocess import REPO, run_verb

from harness.measure.plausibility import AGREEMENT_LIMIT, check_measures, check_training

BUDGET = 1.4e12
"""About 260 steps of dense-d64 (a fifth of the tiny study's 7e12): about 15 s per run on a core."""

RUNS = ("dense-d64_1.4e12_s0", "moe-d64-e16k2_1.4e12_s0")


def _short_tiny(root: Path) -> Path:
    study = yaml.safe_load((REPO / "workflows" / "studies" / "tiny.yaml").read_text())
    study |= {"name": "tiny-short", "budgets": [BUDGET]}
    study["data"] |= {"max_bytes": 3_000_000}
    path = root / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def _busy(record: dict, rows: list[dict], measured: dict) -> list[str]:
    """The host-load flags of the run's training and of its measurement: the two are compared on a
    quiet host only."""
    flags = check_training(record, rows) + measured["train"]["flags"]
    return [f["reason"] for f in flags if f["rule"] in ("host_busy", "cpu_steal")]


@pytest.mark.slow
def test_measured_training_speed_agrees_with_the_training_runs_own(tmp_path):
    study = _short_tiny(tmp_path)
    results = tmp_path / "results"
    done = run_verb(["harness", "data", str(study), "--results", str(results)], tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr
    for run in RUNS:  # one at a time, each on the recipe's one thread, as the pipeline trains them
        argv = ["harness", "train", str(study), "--results", str(results), "--run", run, "--threads", "1", "--quiet"]
        done = run_verb(argv, tmp_path, timeout=900)
        assert done.returncode == 0, done.stderr
    for run in RUNS:  # the threads are the run's own: the measure rule gives none on a CPU
        done = run_verb(["harness", "measure", str(study), "--results", str(results), "--run", run], tmp_path, 900)
        assert done.returncode == 0, done.stderr

    folder = results / "tiny-short" / "runs"
    records = [json.loads((folder / run / "record.json").read_text()) for run in RUNS]
    measures = {run: json.loads((folder / run / "measure.json").read_text()) for run in RUNS}
    busy = []
    for record in records:
        rows = [json.loads(line) for line in (folder / record["run_id"] / "metrics.jsonl").read_text().splitlines()]
        busy += _busy(record, rows, measures[record["run_id"]])
    if busy:
        pytest.skip(f"the host was not quiet: {'; '.join(busy)}")
    ratios = {}
    for record in records:
        m = measures[record["run_id"]]
        assert m["precision"] == record["precision"]  # dtype, compile and threads: measured as it trained
        assert m["settings"]["batch_size"] == 16 and m["settings"]["seq_len"] == 128
        assert m["training_run"]["tokens_per_s"] == record["tokens_per_s"]
        assert m["train"]["compilations_in_windows"] == 0
        assert m["batches"].startswith("the run's training batches")
        ratios[record["run_id"]] = m["train"]["tokens_per_s_median"] / record["tokens_per_s"]
    assert all(abs(r - 1) <= AGREEMENT_LIMIT for r in ratios.values()), ratios
    flags = check_measures(measures, records)
    assert not any(f["rule"] == "training_disagrees" for fs in flags.values() for f in fs.get("train", []))
    # the MoE over dense ratio of the two sources agrees as well (the cpu reference: 0.37 measured, 0.73 trained)
    dense, moe = (measures[run]["train"]["tokens_per_s_median"] for run in RUNS)
    trained = records[1]["tokens_per_s"] / records[0]["tokens_per_s"]
    assert abs((moe / dense) / trained - 1) <= 2 * AGREEMENT_LIMIT, (moe / dense, trained)
