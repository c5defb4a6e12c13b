"""``harness plan`` is safe and right: it never probes what may not fit, its total is the sum of
the rows it shows (recorded times for what ran), and it shows the disk a study needs, which the
workflow checks before any job.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import ROOT
from pico_study import RUN, STUDY, cli_output

from harness.study.runs import plan
from harness.study.spec import load_study
from harness.workflow import disk, probe
from harness.workflow.estimate import checkpoint_bytes, makespan, step_flops
from models.accounting import count_params
from models.transformer import Transformer

R = ("--results", "results")


def _edit(root: Path, change) -> None:
    path = root / STUDY
    data = yaml.safe_load(path.read_text())
    change(data)
    path.write_text(yaml.safe_dump(data))


def _no_probe(monkeypatch) -> None:
    def refuse(*args):
        raise AssertionError("the plan probed a model it should not have")

    monkeypatch.setattr(probe, "probe_step_seconds", refuse)


def _pico_run(study: Path):
    return plan(load_study(study / STUDY))[0]


# --- the probe's bounds ------------------------------------------------------------------------


def test_the_memory_bound_refuses_a_byte_over_its_share(study):
    run = _pico_run(study)
    need = probe.probe_bytes(run)
    assert need > 16 * count_params(run.model).total  # activations come on top of the states
    assert probe.PROBE_MEMORY_FRACTION == 0.5
    assert probe.memory_refusal(run, 2 * need) is None  # exactly its share
    why = probe.memory_refusal(run, 2 * need - 1)
    assert why is not None and run.model.name in why and "GiB" in why
    assert probe.memory_refusal(run, None) is None  # unknown memory: the time bound decides


def test_the_time_bound_refuses_a_probe_over_its_seconds(study):
    run = _pico_run(study)
    steps = probe.PROBE_WARMUP + probe.PROBE_STEPS
    at_limit = steps * step_flops(run) / probe.PROBE_MAX_SECONDS  # FLOP/s that take exactly the limit
    assert probe.time_refusal(run, step_flops(run), at_limit, 0.0) is None
    why = probe.time_refusal(run, step_flops(run), at_limit * 0.99, 0.0)
    assert why is not None and f"more than {probe.PROBE_MAX_SECONDS:.0f} s" in why
    spent = probe.PROBE_BUDGET_SECONDS - probe.PROBE_MAX_SECONDS
    assert probe.time_refusal(run, step_flops(run), at_limit, spent) is None
    assert "probed for" in probe.time_refusal(run, step_flops(run), at_limit, spent + 0.5)


def test_probe_bytes_follow_the_batch_and_vocabulary(study):
    run = _pico_run(study)
    r, cfg = run.recipe, run.model
    logits = probe.LOGIT_COPIES * r.batch_size * r.seq_len * cfg.vocab_size * probe.FLOAT_BYTES
    assert probe.activation_bytes(run) > logits
    bigger = dataclasses.replace(run, recipe=dataclasses.replace(r, batch_size=2 * r.batch_size))
    assert probe.activation_bytes(bigger) == pytest.approx(2 * probe.activation_bytes(run), rel=0.01)


@pytest.mark.slow
def test_probe_bytes_cover_a_measured_training_step():
    """Against the peak resident memory training adds to a fresh process (harness.measure.throughput), for a
    dense model and an MoE whose activations and logits are most of it: at least that, and not
    far above."""
    import torch

    from harness.measure.throughput import cpu_training_peak
    from harness.study.spec import Recipe, Run
    from harness.train.precision import Precision
    from models.config import ModelConfig, MoEConfig

    dense = ModelConfig(name="d", vocab_size=8192, d_model=256, n_layers=4, n_heads=4, d_ff=1024, max_seq_len=256)
    moe = dataclasses.replace(dense, name="e", moe=MoEConfig(experts=8, top_k=2, d_expert=512))
    for cfg in (dense, moe):
        run = Run("x", cfg, 1e9, 0, 1.0, 16 * 256, 1, Recipe(batch_size=16, seq_len=256))
        x = torch.randint(0, cfg.vocab_size, (16, 256))
        peak = cpu_training_peak(cfg, Transformer(cfg), x, x, 3, Precision(torch.float32, compile=False))
        measured = peak["peak_training_bytes"]
        assert measured <= probe.probe_bytes(run) <= 1.5 * measured, (cfg.name, measured, probe.probe_bytes(run))


# --- a study too large to probe ---------------------------------------------------------------


def _large_study(study: Path) -> None:
    """The pico study with a model no CPU here may probe: 64 layers of width 4096, a 128K vocabulary,
    a 64 x 2048 batch (some hundred GiB for one step)."""
    big = yaml.safe_load((study / "model.yaml").read_text())
    big |= {"name": "dense-huge", "vocab_size": 131072, "d_model": 4096, "n_layers": 64, "n_heads": 32}
    big |= {"d_ff": 16384, "max_seq_len": 2048}
    (study / "huge.yaml").write_text(yaml.safe_dump(big))

    def change(d):
        d.update(device="auto")
        d["models"] = [{"config": str(study / "huge.yaml")}]
        d["data"].update(vocab_size=131072, allow_repetition=True)
        d["budgets"] = [1e21]
        d["recipe"].update(batch_size=64, seq_len=2048)

    _edit(study, change)


def test_a_study_too_large_to_probe_is_planned_at_once_without_training(study, monkeypatch):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the plan is the GPU's anyway")
    monkeypatch.chdir(study)
    _large_study(study)
    _no_probe(monkeypatch)
    start = time.perf_counter()
    code, out, err = cli_output("plan", STUDY, *R)
    assert code == 0, err
    assert time.perf_counter() - start < 5
    assert "CPU was not probed (a training step of dense-huge holds about" in out, out
    assert "the times assume 1 x H100 at 40% MFU" in out and "est." in out
    assert "on cuda" in out.splitlines()[0]


def test_a_cpu_study_too_large_to_probe_says_why_its_time_is_missing(study, monkeypatch):
    monkeypatch.chdir(study)
    _no_probe(monkeypatch)
    (study / "results" / "pico" / "runs" / RUN / "record.json").unlink()  # no finished rate to lean on
    monkeypatch.setattr(probe, "available_memory", lambda: 1024)  # the pico model does not fit in 1 KiB
    code, out, err = cli_output("plan", STUDY, *R)
    assert code == 0, err
    assert "time not estimated" in out
    assert "warning: the training time is not estimated: not probed: a training step of dense-pico holds" in out


def test_probes_are_remembered_between_plans(study, monkeypatch, probe_cache):
    monkeypatch.setattr(probe.host_load, "sample", lambda: {"host_load_1m": 0.0})  # a quiet host
    monkeypatch.chdir(study)
    (study / "results" / "pico" / "runs" / RUN / "record.json").unlink()
    assert cli_output("plan", STUDY, *R)[0] == 0
    assert (probe_cache / "probes.json").is_file()
    _no_probe(monkeypatch)
    code, out, err = cli_output("plan", STUDY, *R)
    assert code == 0, err
    assert "probe, eager" in out


# --- totals ------------------------------------------------------------------------------------


def _minutes(text: str) -> float:
    value, unit = text.split()[:2]
    return float(value) * {"s": 1 / 60, "min": 1.0, "h": 60.0}[unit]


def _stage_rows(out: str) -> dict[str, list[str]]:
    lines = out.split("\nstage ")[1].split("\n\n")[0].splitlines()[2:]
    return {line.split()[0]: re.split(r"\s{2,}", line.strip()) for line in lines}


def test_the_total_is_the_sum_of_the_rows_with_one_run_left(study, monkeypatch):
    monkeypatch.chdir(study)
    _edit(study, lambda d: d.update(seeds=[0, 1]))
    bench = study / "results" / "pico" / "benchmarks" / "train"
    bench.mkdir(parents=True)
    (bench / f"{RUN}.tsv").write_text("s\th:m:s\tmax_rss\n123.4\t0:02:03\t100\n")
    code, out, err = cli_output("plan", STUDY, *R)
    assert code == 0, err
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith("dense-pico_")}
    assert rows[RUN].endswith("2.1 min rec.")  # the recorded 123.4 s, not an estimate
    left = rows["dense-pico_6e9_s1"].split()[-3:-1]
    assert rows["dense-pico_6e9_s1"].endswith("est.")
    stages = _stage_rows(out)
    assert stages["train"][1] == "1 of 2" and stages["train"][2] == " ".join(left)  # one run left: its own row
    assert stages["train"][3] == "2.1 min"
    shown = [_minutes(row[2]) for name, row in stages.items() if name != "total" and row[2] != "-"]
    total = _minutes(stages["total"][1])
    assert total == pytest.approx(sum(shown), abs=0.05 * len(shown))
    assert f"about {stages['total'][1]} in all" in out
    assert "1 of 2 runs done. To do: 1 run," in out
    code, out, err = cli_output("plan", STUDY, *R, "--json")
    done = next(r for r in json.loads(out) if r["run_id"] == RUN)
    assert done["recorded_seconds"] == 123.4 and done["est_seconds"] is None


def test_the_later_stages_count_only_what_is_left(study, monkeypatch):
    monkeypatch.chdir(study)
    code, out, err = cli_output("plan", STUDY, *R)
    assert code == 0, err
    stages = _stage_rows(out)
    assert set(stages) == {"data", "tasks", "train", "measure", "evaluate", "routing", "microbench", "report", "total"}
    assert stages["data"][1] == "0 of 1" and stages["train"][1] == "0 of 1"
    assert stages["measure"][1] == "1 of 1" and "estimate" in stages["measure"][-1]
    (study / "results" / "pico" / "runs" / RUN / "measure.json").write_text("{}")
    assert _stage_rows(cli_output("plan", STUDY, *R)[1])["measure"][1] == "0 of 1"


def test_makespan_is_a_list_schedule():
    assert makespan([330.0], 2) == 330.0  # one run left: its own time, not half of it
    assert makespan([3.0, 3.0, 2.0, 2.0, 2.0], 2) == 7.0
    assert makespan([], 4) == 0.0


# --- disk ----------------------------------------------------------------------------------------


def test_plan_shows_the_disk_against_the_free_disk(study, monkeypatch):
    monkeypatch.chdir(study)
    _edit(study, lambda d: d.update(seeds=[0, 1]))
    s = load_study(study / STUDY)
    runs = plan(s)
    need = disk.study_disk(s, runs, study / "results" / "pico", None).checkpoints
    monkeypatch.setenv("MOE_HARNESS_FREE_BYTES", str(10**12))
    out = cli_output("plan", STUDY, *R)[1]
    assert f"({disk._bytes(need)} of checkpoints" in out and "still to write" in out and "931.3 GiB free" in out
    monkeypatch.setenv("MOE_HARNESS_FREE_BYTES", "1000")
    assert (
        "not enough: the workflow refuses to start without `--config disk_check=off`"
        in cli_output("plan", STUDY, *R)[1]
    )


def test_the_disk_check_refuses_a_study_over_the_free_disk(study, monkeypatch):
    s = load_study(study / STUDY)
    s = dataclasses.replace(s, seeds=[0, 1])
    runs = plan(s)
    results = study / "results" / "pico"
    need = disk.study_disk(s, runs, results, None)
    assert need.written > 0 and need.more == need.total - need.written  # the data and one run are there
    assert need.more >= checkpoint_bytes(runs[1])  # the second run's checkpoints are still to write
    more = need.more
    monkeypatch.setenv("MOE_HARNESS_FREE_BYTES", str(more))
    disk.guard_disk(s, runs, results, None)  # exactly enough
    monkeypatch.setenv("MOE_HARNESS_FREE_BYTES", str(more - 1))
    with pytest.raises(disk.DiskRefused) as e:
        disk.guard_disk(s, runs, results, None)
    line = str(e.value)
    assert "\n" not in line and "study pico needs" in line and "is free there" in line
    assert "`--config disk_check=off`" in line
    disk.guard_disk(s, runs, results, "off")
    with pytest.raises(ValueError, match="disk_check=maybe"):
        disk.guard_disk(s, runs, results, "maybe")


@pytest.mark.slow
def test_the_workflow_refuses_before_any_job_when_the_disk_is_short_unless_told(study):
    _edit(study, lambda d: d.update(seeds=[0, 1]))
    cmd = [sys.executable, "-m", "snakemake", "results/pico/runs/dense-pico_6e9_s1/record.json"]
    cmd += ["-s", str(ROOT / "Snakefile"), "--directory", str(study), "--cores", "1"]
    cmd += ["--config", f"study={study / STUDY}"]
    env = os.environ | {"MOE_HARNESS_FREE_BYTES": "1000"}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode != 0
    assert "moe-harness: study pico needs" in out.stderr and "disk_check=off" in out.stderr, out.stderr
    assert not (study / "results" / "pico" / "logs" / "train" / "dense-pico_6e9_s1.log").exists()
    assert not (study / "results" / "pico" / "runs" / "dense-pico_6e9_s1" / "record.json").exists()
    out = subprocess.run([*cmd, "disk_check=off"], capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr  # the override starts it
    assert (study / "results" / "pico" / "runs" / "dense-pico_6e9_s1" / "record.json").is_file()


def test_the_readme_disk_column_is_the_plans():
    """Each shipped study's checkpoints, as the plan computes them, in the README's table."""
    table = (ROOT / "README.md").read_text().split("| study | where | disk | what |")[1].split("\n\n")[0]
    shown = {row.split("|")[1].strip(" `"): row.split("|")[3].strip() for row in table.splitlines()[2:]}
    for name, cell in shown.items():
        study = load_study(name)
        need = disk.study_disk(study, plan(study), Path("/nonexistent"), None).checkpoints
        assert cell.startswith(disk._bytes(need)), (name, cell)
        if study.data.max_bytes:
            shards = disk.data_bytes(study, Path("/nonexistent"), study.data.max_bytes)[0]
            assert f"data ≤ {disk._bytes(shards)}" in cell, (name, cell)


def test_an_auto_study_slow_on_this_cpu_is_said_to_be_made_for_a_gpu(study, monkeypatch):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    monkeypatch.chdir(study)
    _edit(study, lambda d: d.update(device="auto", seeds=[1]))  # a run not started, no finished rate
    monkeypatch.setattr(probe, "probe_step_seconds", lambda *a: 1000.0)  # stands in for a large model
    code, out, err = cli_output("plan", STUDY, *R)
    assert code == 0, err
    assert "looks made for a GPU" in out and "--device cuda" in out and "on cpu" in out.splitlines()[0]


def test_a_run_in_progress_counts_only_its_steps_left(study):
    from harness.workflow.estimate import STARTUP_SECONDS, estimate_run

    run = _pico_run(study)
    whole = estimate_run(run, "cuda", gpu_flops=1e9).seconds - STARTUP_SECONDS
    half = estimate_run(run, "cuda", gpu_flops=1e9, done_steps=run.steps // 2).seconds - STARTUP_SECONDS
    assert half == pytest.approx(whole * (1 - (run.steps // 2) / run.steps))


def test_changed_data_is_planned_again_with_what_follows_it(study, monkeypatch):
    monkeypatch.chdir(study)
    _edit(study, lambda d: d["data"].update(validation_fraction=0.2))
    code, out, err = cli_output("plan", STUDY, *R)
    assert code == 0, err
    stages = _stage_rows(out)
    assert stages["data"][1] == "1 of 1" and "estimate" in stages["data"][-1]
    assert stages["tasks"][1] == "1 of 1" and stages["train"][1] == "1 of 1"  # the run is stale
    assert "data: the prepared data is not current" in out


def _with_data(study, **changes):
    return dataclasses.replace(study, data=dataclasses.replace(study.data, **changes))


def test_plan_warns_before_the_data_when_a_run_may_need_a_second_epoch():
    """tiny's corpus (12 MB) holds about 4.1M training tokens: its own runs (2.6M) fit, a
    narrower dense model at the same budget (4.08M; it needed 1.07 epochs) may not."""
    from harness.workflow.plan import repetition_warnings

    tiny = load_study(ROOT / "workflows" / "studies" / "tiny.yaml")
    assert repetition_warnings(tiny, plan(tiny), 12_000_000) == []
    wide = dataclasses.replace(
        tiny, models=[*tiny.models, dataclasses.replace(tiny.models[0], config="dense-d48.yaml")]
    )
    (warning,) = repetition_warnings(wide, plan(wide), 12_000_000)
    assert warning.startswith("dense-d48_7e12_s0 needs 4.08M tokens") and "data.allow_repetition" in warning
    assert repetition_warnings(_with_data(wide, allow_repetition=True), plan(wide), 12_000_000) == []
    assert repetition_warnings(wide, plan(wide), None) == []  # prepared: the exact count decides
