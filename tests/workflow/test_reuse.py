"""A copied or extended study reuses the finished runs another study of the project trained with
the same identity on the same tokens (harness.workflow.reuse): it trains only its new runs, and every
record, summary and report carries its own name."""

from __future__ import annotations

import filecmp
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT
from pico_study import RUN, cli_output, extended_copy

from harness.study.runs import plan
from harness.study.spec import load_study
from harness.train import checkpoint
from harness.workflow.reuse import REUSED, finished_elsewhere, our_data, reuse

COPY, NEW = "copy.yaml", "dense-pico-b_6e9_s0"


def _source(root: Path) -> Path | None:
    study = load_study(root / COPY)
    results = root / "results" / "pico2"
    return finished_elsewhere(plan(study)[0], results, our_data(study, results, _corpus(study, results)))


def _corpus(study, results):
    from harness.data.corpus import corpus_content

    return corpus_content(study, results)


def test_a_run_finished_the_same_in_another_study_is_found(study):
    extended_copy(study)
    assert _source(study) == study / "results" / "pico" / "runs" / RUN
    (run,) = [r for r in plan(load_study(study / COPY)) if r.run_id == NEW]
    assert finished_elsewhere(run, study / "results" / "pico2", ("any", None)) is None


@pytest.mark.parametrize(
    "change",
    [
        lambda d: d["recipe"].update(lr=1e-3),  # another identity
        lambda d: d["data"].update(validation_fraction=0.15),  # other tokens, the same corpus
        lambda d: d["data"].update(vocab_size=600),
    ],
    ids=["identity", "split", "vocabulary"],
)
def test_a_run_of_other_identity_or_tokens_is_not_reused(study, change):
    extended_copy(study, change)
    assert _source(study) is None


def test_plan_names_the_finished_run_and_the_command(study, monkeypatch):
    monkeypatch.chdir(study)
    extended_copy(study)
    code, out, err = cli_output("plan", COPY, "--results", "results")
    assert code == 0, err
    assert f"reuse: {RUN} is finished with the same identity and data in results/pico/runs/{RUN}" in out
    assert f"python -m harness.reuse {COPY} --run {RUN}" in out
    row = next(line for line in out.splitlines() if line.startswith(RUN))
    assert "reuse" in row.split() and row.endswith("none (reused)"), row
    train = next(line for line in out.splitlines() if line.startswith("train "))
    runs = int(re.search(r"\): (\d+) runs on ", out)[1])
    assert train.split()[1:4] == [str(runs - 1), "of", str(runs)], train  # only the new run trains
    assert ", 1 reused from another study (trained there, not here). To do: " in out
    (json_row,) = [
        r for r in json.loads(cli_output("plan", COPY, "--results", "results", "--json")[1]) if r["run_id"] == RUN
    ]
    assert json_row["reused_from"] == f"results/pico/runs/{RUN}" and json_row["recorded_seconds"] is None


def test_a_reused_run_counts_no_training_time_in_the_plan(study, monkeypatch):
    """Once brought in, the run is done here but trained elsewhere: the plan's recorded training
    time is this study's own, not the other study's."""
    monkeypatch.chdir(study)
    extended_copy(study)
    assert cli_output("data", COPY, "--results", "results")[0] == 0
    s = load_study(COPY)
    reuse(s, plan(s)[0], Path("results/pico2"), Path("results/pico/runs") / RUN)
    code, out, err = cli_output("plan", COPY, "--results", "results")
    assert code == 0, err
    row = next(line for line in out.splitlines() if line.startswith(RUN))
    assert "done" in row.split() and row.endswith("none (reused)"), row
    train = next(line for line in out.splitlines() if line.startswith("train "))
    cells = re.split(r"\s{2,}", train)
    assert cells[1] == "1 of 2" and cells[3] == "-", cells  # nothing recorded: the run trained elsewhere
    assert "0 of 2 runs done, 1 reused from another study (trained there, not here). To do: 1 run" in out


def test_a_run_trained_in_this_study_is_never_replaced(study, monkeypatch):
    from harness.core.errors import HarnessError

    monkeypatch.chdir(study)
    extended_copy(study, lambda d: d.update(name="pico"))  # the study itself, under another file
    s = load_study(COPY)
    with pytest.raises(HarnessError, match="was trained in this study; it is not replaced"):
        reuse(s, plan(s)[0], Path("results/pico"), Path("results/pico/runs") / RUN)


def _jobs(stdout: str) -> dict[str, list[str]]:
    """Each rule of a dry run with the outputs of its jobs."""
    jobs: dict[str, list[str]] = {}
    for block in re.split(r"\n(?=rule \w+:)", stdout):
        if m := re.match(r"rule (\w+):", block):
            jobs.setdefault(m.group(1), []).extend(re.findall(r"output: (\S+)", block))
    return jobs


@pytest.mark.slow
def test_an_extended_copy_trains_only_its_new_model(study):
    extended_copy(study)
    runs = f"results/pico2/runs/{RUN}", f"results/pico2/runs/{NEW}"
    cmd = [sys.executable, "-m", "snakemake", *(f"{r}/record.json" for r in runs), "-s", str(ROOT / "Snakefile")]
    cmd += ["--directory", str(study), "--cores", "1", "--config", f"study={study / COPY}"]

    dry = subprocess.run([*cmd, "-n"], capture_output=True, text=True, timeout=600)
    assert dry.returncode == 0, dry.stderr
    jobs = _jobs(dry.stdout)
    assert jobs["train"] == [f"{runs[1]}/record.json"] and jobs["reuse"] == [f"{runs[0]}/record.json"]

    real = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert real.returncode == 0, real.stderr
    old = json.loads((study / "results" / "pico" / "runs" / RUN / "record.json").read_text())
    new = json.loads((study / runs[0] / "record.json").read_text())
    assert new["study"] == "pico2" and new[REUSED] == {"study": "pico", "run_dir": f"results/pico/runs/{RUN}"}
    assert {k: v for k, v in new.items() if k not in ("study", REUSED)} == {
        k: v for k, v in old.items() if k != "study"
    }
    assert filecmp.cmp(study / "results/pico/runs" / RUN / "checkpoint.pt", study / runs[0] / "checkpoint.pt", False)
    assert checkpoint.problem(study / runs[0] / checkpoint.NAME) is None, "measure and evaluate would refuse it"
    assert "Nothing to be done" in subprocess.run([*cmd, "-n"], capture_output=True, text=True, timeout=600).stdout


def test_a_damaged_checkpoint_is_not_reused(study, monkeypatch):
    from harness.core.errors import HarnessError

    monkeypatch.chdir(study)
    extended_copy(study)
    code, _, err = cli_output("data", COPY, "--results", "results")
    assert code == 0, err
    source = Path("results/pico/runs") / RUN
    with (source / checkpoint.NAME).open("r+b") as f:
        f.write(b"damaged")
    s = load_study(COPY)
    with pytest.raises(HarnessError, match=r"checkpoint\.pt does not verify"):
        reuse(s, plan(s)[0], Path("results/pico2"), source)
    assert not (Path("results/pico2/runs") / RUN / "record.json").exists()
