"""Two writers, one run: a second training of a run that another live process trains is refused
at once, naming the run and the holder's pid; a lock left by a killed process blocks nothing.

The holder is another process (the lock is an OS lock: one process cannot refuse itself); it
takes the run's lock as `harness train` does and waits to be killed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT
from pico_study import RUN, RUNDIR, STUDY, cli

HOLD = """
import sys, time
from pathlib import Path
from harness.train import run_lock
with run_lock.training(Path(sys.argv[1]), sys.argv[2]):
    print("held", flush=True)
    time.sleep(600)
"""


@pytest.fixture
def holder(study):
    """A live process holding the pico run's training lock; killed (SIGKILL) at the end."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(study / RUNDIR), RUN], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "held"
    yield proc
    proc.kill()
    proc.wait()


def _kill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def test_a_second_training_is_refused_and_a_killed_holder_blocks_nothing(study: Path, holder, monkeypatch):
    monkeypatch.chdir(study)
    (study / RUNDIR / "record.json").unlink()  # a run still to finish
    before = (study / RUNDIR / "metrics.jsonl").read_bytes()
    code, err = cli("train", STUDY, "--run", RUN, "--results", "results", "--quiet", "--threads", "1")
    assert code == 2, err
    assert err.strip().splitlines() == [
        f"harness train: error: {RUNDIR}/.lock: run {RUN} is being trained by pid {holder.pid} "
        f"on {os.uname().nodename} (harness train); wait for it to finish, then run `harness train` again"
    ]
    assert (study / RUNDIR / "metrics.jsonl").read_bytes() == before, "the refused run wrote nothing"
    assert not (study / RUNDIR / "record.json").exists()
    _kill(holder)  # the lock file stays, its lock goes with the process
    assert (study / RUNDIR / ".lock").exists()
    code, err = cli("train", STUDY, "--run", RUN, "--results", "results", "--quiet", "--threads", "1")
    assert code == 0, err
    assert (study / RUNDIR / "record.json").is_file()


@pytest.mark.parametrize("verb", ["measure", "evaluate", "routing", "export"])
def test_a_step_that_reads_the_run_is_refused_while_it_trains(study: Path, holder, monkeypatch, verb):
    monkeypatch.chdir(study)
    code, err = cli(verb, STUDY, "--run", RUN, "--results", "results")
    assert code == 2, err
    assert "Traceback" not in err
    assert f"run {RUN} is being trained by pid {holder.pid}" in err
    assert f"then run `harness {verb}` again" in err
    assert not (study / RUNDIR / f"{verb}.json").exists()


READ = """
import sys, time
from pathlib import Path
from harness.train import run_lock
with run_lock.released():
    run_lock.reading(Path(sys.argv[1]), sys.argv[2], "measure")
    print("held", flush=True)
    time.sleep(600)
"""


def test_training_is_refused_while_a_step_reads_the_run(study: Path, monkeypatch):
    monkeypatch.chdir(study)
    reader = subprocess.Popen(
        [sys.executable, "-c", READ, str(study / RUNDIR), RUN], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert reader.stdout.readline().strip() == "held"
        code, err = cli("train", STUDY, "--run", RUN, "--results", "results", "--restart", "--quiet")
        assert code == 2, err
        assert f"run {RUN} is being read by pid {reader.pid}" in err and "(harness measure)" in err
        assert (study / RUNDIR / "record.json").is_file(), "the finished run is left as it was"
    finally:
        _kill(reader)
    # Several readers at once are fine, and one that has finished holds nothing.
    code, err = cli("export", STUDY, "--run", RUN, "--results", "results")
    assert code == 0, err


@pytest.mark.slow
def test_the_workflow_refuses_to_train_a_run_trained_by_hand(study: Path, holder):
    (study / RUNDIR / "record.json").unlink()
    cmd = [sys.executable, "-m", "snakemake", str(Path(RUNDIR) / "record.json"), "--cores", "1"]
    cmd += ["-s", str(ROOT / "Snakefile"), "--directory", str(study), "--config", f"study={study / STUDY}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # the jobs run this checkout's harness
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode != 0, out.stdout[-2000:]
    log = (study / "results" / "pico" / "logs" / "train" / f"{RUN}.log").read_text()
    assert f"harness train: error: {RUNDIR}/.lock: run {RUN} is being trained by pid {holder.pid}" in log, log
    assert not (study / RUNDIR / "record.json").exists()


def test_a_refused_training_leaves_no_folder_and_a_removed_lock_is_taken_again(tmp_path: Path):
    from harness.train import run_lock

    run_dir = tmp_path / "runs" / "r"
    with pytest.raises(RuntimeError), run_lock.training(run_dir, "r"):
        raise RuntimeError("refused before any work")
    assert not run_dir.exists(), "a folder that held only the lock is removed with it"
    with run_lock.training(run_dir, "r"):
        (run_dir / "metrics.jsonl").write_text("{}\n")
    assert (run_dir / run_lock.NAME).exists(), "a folder with the run's work keeps its lock file"

    # A process that opened the lock file before a refused training removed it holds a file
    # no name points to: taking the lock again gives the file the name points to now.
    stale = os.open(run_dir / run_lock.NAME, os.O_RDWR)
    (run_dir / run_lock.NAME).unlink()
    assert not run_lock._still_named(run_dir / run_lock.NAME, stale)
    fd = run_lock._take(run_dir, "r", exclusive=True, verb="train")
    assert run_lock._still_named(run_dir / run_lock.NAME, fd)
    os.close(fd)
    os.close(stale)
