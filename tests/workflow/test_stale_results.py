"""A finished result is current only while what it was made from is unchanged in content.

The corpus enters the data step as data/corpus.json (harness.data.corpus): an edit to a corpus file
reruns the data step, a copy without timestamps or a move of data.paths does not. A run trained
on other data than data.json describes is not done (harness plan), and no report, evaluation or
measurement mixes it with the data now prepared. When only timestamps changed, the refusal says
so and names `snakemake --touch`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest import ROOT
from pico_study import RUN, RUNDIR, STUDY, cli, cli_output

from harness.data.corpus import CORPUS, corpus_changes, sync_corpus
from harness.study.runs import plan
from harness.study.spec import load_study
from harness.workflow.snakefile import TOUCH_HINT, data_changes, run_states

DATA = "results/pico/data"


def edit_corpus(root: Path) -> None:
    """One corpus file edited in place (as a user fixes a typo after the pipeline finished)."""
    path = root / "corpus" / "m03.py"
    path.write_text(path.read_text() + "fixed = True\n")


def reprepare(root: Path) -> None:
    """The corpus edited and `harness data` run again: data.json now describes other data."""
    edit_corpus(root)
    code, err = cli("data", str(root / STUDY), "--results", str(root / "results"))
    assert code == 0, err


def touch_corpus(root: Path) -> None:
    """Every corpus file with a new time, the same content (a copy without timestamps)."""
    for path in (root / "corpus").iterdir():
        os.utime(path, (path.stat().st_mtime + 100, path.stat().st_mtime + 100))


def move_corpus(root: Path) -> None:
    """data.paths moved to another folder holding the same files, with new timestamps."""
    (root / "moved").mkdir()
    shutil.copytree(root / "corpus", root / "moved" / "corpus")  # copies get new times
    shutil.rmtree(root / "corpus")
    data = yaml.safe_load((root / STUDY).read_text())
    data["data"]["paths"] = [str(root / "moved" / "corpus")]
    (root / STUDY).write_text(yaml.safe_dump(data))


def _states(root: Path) -> list:
    study = load_study(root / STUDY)
    return run_states(study, plan(study), root / "results" / "pico")


# --- harness plan: done only on the data now prepared, from the corpus as it is ----------------


@dataclass(frozen=True)
class PlanCase:
    id: str
    change: Callable[[Path], None] | None
    state: str
    says: str = ""


PLAN_CASES = [
    PlanCase("unchanged", None, "done"),
    PlanCase("corpus-timestamps-only", touch_corpus, "done"),
    PlanCase("corpus-moved-same-content", move_corpus, "done"),
    PlanCase("corpus-edited", edit_corpus, "stale", "the corpus (data.paths) changed in content"),
    PlanCase("data-prepared-again", reprepare, "stale", "data fingerprint"),
]


@pytest.mark.parametrize("case", PLAN_CASES, ids=lambda c: c.id)
def test_plan_counts_a_run_done_only_on_current_data(case: PlanCase, study: Path):
    if case.change:
        case.change(study)
    code, out, err = cli_output("plan", str(study / STUDY), "--results", str(study / "results"), "--json")
    assert code == 0, err
    (row,) = json.loads(out)
    assert row["state"] == case.state, row
    assert case.says in " ".join(row["changes"]), row["changes"]
    # The human table says it too, and the same state drives the workflow's checks.
    assert [s.state for s in _states(study)] == [case.state]


def test_a_moved_corpus_is_no_data_change(study: Path):
    move_corpus(study)
    assert data_changes(load_study(study / STUDY), study / "results" / "pico") == []
    edit_corpus(study / "moved")
    assert corpus_changes(load_study(study / STUDY), study / "results" / "pico")


# --- reports and the steps after training refuse to mix data ----------------------------------


@dataclass(frozen=True)
class Case:
    id: str
    argv: list[str]


MIXED = [
    Case("report", ["report", STUDY]),
    Case("report-reference", ["report", STUDY, "--reference"]),
    Case("evaluate", ["evaluate", STUDY, "--run", RUN]),
    Case("routing", ["routing", STUDY, "--run", RUN]),
    Case("measure", ["measure", STUDY, "--run", RUN]),
]


@pytest.mark.parametrize("case", MIXED, ids=lambda c: c.id)
def test_no_step_mixes_a_run_with_data_prepared_again(case: Case, study: Path, monkeypatch):
    reprepare(study)
    monkeypatch.chdir(study)
    before = {p for p in study.rglob("*")}
    code, err = cli(*case.argv, "--results", "results")
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert f"harness {case.argv[0]}: error:" in lines[0]
    for name in (RUN, "data.json", "trained on other data", "retrain=stale"):
        assert name in lines[0], (name, err)
    assert {p for p in study.rglob("*")} == before, "a refusal writes nothing"


# --- corpus.json: rewritten, and newer, only when the content changes ---------------------------


def test_corpus_json_changes_time_only_with_content(study: Path):
    results = study / "results" / "pico"
    path, data_json = results / "data" / CORPUS, results / "data" / "data.json"
    st = load_study(study / STUDY)
    first = sync_corpus(st, results)
    oldest = min(p.stat().st_mtime for p in (results / "data").iterdir() if p.name != CORPUS)
    assert path.stat().st_mtime < oldest, "made from this content: older than the data rule's outputs"
    assert first["fingerprint"] == json.loads(data_json.read_text())["fingerprint"]
    when = path.stat().st_mtime
    touch_corpus(study)
    assert sync_corpus(st, results)["fingerprint"] == first["fingerprint"]
    assert path.stat().st_mtime == when, "new timestamps, same content: corpus.json keeps its time"
    edit_corpus(study)
    assert sync_corpus(st, results)["fingerprint"] != first["fingerprint"]
    assert path.stat().st_mtime > data_json.stat().st_mtime, "new content: the data step reruns"


# --- the workflow -------------------------------------------------------------------------------


def _snakemake(root: Path, *config: str, dry: bool = True) -> subprocess.CompletedProcess:
    """Snakemake on the study folder, asked for the run's record (training and the data before it)."""
    cmd = [sys.executable, "-m", "snakemake", *(["-n"] if dry else []), RUNDIR + "/record.json"]
    cmd += ["-s", str(ROOT / "Snakefile"), "--directory", str(root), "--cores", "1"]
    cmd += ["--config", f"study={root / STUDY}", *config]
    env = os.environ | {"PYTHONPATH": str(ROOT)}  # the jobs run this checkout's harness
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=root, env=env)


@pytest.mark.slow
def test_snakemake_sees_a_corpus_edit_after_the_pipeline_finished(study: Path):
    edit_corpus(study)
    refused = _snakemake(study)
    said = refused.stdout + refused.stderr
    assert refused.returncode != 0
    assert f"{RUN}: the corpus (data.paths) changed in content" in said and "--config retrain=stale" in said
    agreed = _snakemake(study, "retrain=stale")  # dry: what it would do
    assert agreed.returncode == 0, agreed.stdout + agreed.stderr
    assert "rule data:" in agreed.stdout and "rule train:" in agreed.stdout
    # The dry run wrote nothing under results/: corpus.json as a real run writes it stands in elsewhere.
    assert re.search(rf"Updated input files: \S*{DATA}/{CORPUS}", agreed.stdout), agreed.stdout


@pytest.mark.slow
def test_snakemake_leaves_a_moved_corpus_with_new_timestamps_alone(study: Path):
    move_corpus(study)
    out = _snakemake(study)
    assert out.returncode == 0, out.stderr
    assert "rule data:" not in out.stdout and "rule train:" not in out.stdout, out.stdout


@pytest.mark.slow
def test_lost_timestamps_are_named_with_snakemake_touch(study: Path):
    """data.json newer than the record, nothing changed in content: the refusal says so."""
    os.utime(study / DATA / "data.json")
    refused = _snakemake(study, dry=False)
    said = " ".join((refused.stdout + refused.stderr).split())
    assert refused.returncode != 0
    assert f"{RUN}: Snakemake: Updated input files" in said
    assert " ".join(TOUCH_HINT.split()) in said and "snakemake --touch" in said
    assert "Revert the change" not in said, "there is no change to revert"
    # A real change of content is not called a timestamp: no --touch advice then.
    edit_corpus(study)
    os.utime(study / DATA / "data.json")
    said = _snakemake(study, dry=False)
    assert "unchanged in content" not in said.stdout + said.stderr
