"""Reuse under faults, as a user meets them: ``python -m harness.reuse`` in a subprocess. It takes
the run's lock, replaces a finished copy only when asked, checks every file it links or copies
against the source, and a full disk, a read-only folder or a source that vanishes under it gives
one line, exit code 2, and leaves the copy's folder as it was. Snakemake replaces a finished copy
of a run retrained in its source study only with ``--config retrain=stale``, and says which
study's run changed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT
from pico_study import RUN, STUDY
from verb_subprocess import assert_one_line, assert_unchanged, run_verb, snapshot

pytestmark = pytest.mark.slow  # each case runs reuse, training or snakemake as a subprocess

COPY = "copy.yaml"
SOURCE = f"results/pico/runs/{RUN}"
OURS = f"results/pico2/runs/{RUN}"
REUSE = ["harness.reuse", COPY, "--run", RUN, "--from", SOURCE]
PREFIX = "harness reuse: error: "


def _rewrite_paths(root: Path, old: Path) -> None:
    for name in (STUDY, COPY):
        if (root / name).is_file():
            (root / name).write_text((root / name).read_text().replace(str(old), str(root)))


@pytest.fixture(scope="module")
def prepared(pristine, tmp_path_factory) -> Path:
    """The pico study and its copy pico2 (the same study under another name), pico2's data prepared."""
    root = tmp_path_factory.mktemp("reuse")
    shutil.copytree(pristine, root, dirs_exist_ok=True)
    _rewrite_paths(root, pristine)
    (root / COPY).write_text(yaml.safe_dump(yaml.safe_load((root / STUDY).read_text()) | {"name": "pico2"}))
    done = run_verb(["harness", "data", COPY, "--results", "results"], root)
    assert done.returncode == 0, done.stderr
    return root


@pytest.fixture
def root(prepared, tmp_path) -> Path:
    shutil.copytree(prepared, tmp_path, dirs_exist_ok=True)
    _rewrite_paths(tmp_path, prepared)
    return tmp_path


def _reused(root: Path) -> dict:
    done = run_verb(REUSE, root)
    assert done.returncode == 0, done.stderr
    return json.loads((root / OURS / "record.json").read_text())


def _retrain_source(root: Path, loss: float = 9.25) -> None:
    """The source run as `harness train --restart` leaves it: another checkpoint (none before it),
    another record."""
    import torch

    from harness.core.io import write_json
    from harness.train import checkpoint

    source = root / SOURCE
    record = json.loads((source / "record.json").read_text()) | {"final_val_loss": loss}
    checkpoint.save_checkpoint({"model": {"w": torch.tensor([loss])}}, source / checkpoint.NAME)
    (source / checkpoint.PREVIOUS).unlink()
    checkpoint.checksum_path(source / checkpoint.PREVIOUS).unlink()
    write_json(source / "record.json", record)


# Failures injected in the subprocess where a test cannot cause them (the tests run as root, so a
# chmod would not refuse): os.link fails as across file systems, so every file is copied, and the
# copy meets the fault.
PATCHED = """
import errno, os, shutil, sys
from pathlib import Path
fault = sys.argv[1]
real_copy = shutil.copyfile
def copyfile(src, dst, **kw):
    if fault == "vanish":
        shutil.rmtree(Path(src).parent)
        return real_copy(src, dst, **kw)
    if fault == "truncate" and Path(src).name == "checkpoint.pt":
        Path(dst).write_bytes(Path(src).read_bytes()[:100])
        return dst
    if fault in ("full", "read-only") and Path(src).name == "checkpoint.pt":
        Path(dst).write_bytes(b"partial")
        code = errno.ENOSPC if fault == "full" else errno.EROFS
        raise OSError(code, os.strerror(code), str(dst))
    return real_copy(src, dst, **kw)
def link(src, dst, *a, **kw):
    raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), str(src), None, str(dst))
shutil.copyfile, os.link = copyfile, link
from harness.workflow.reuse import main
sys.exit(main(sys.argv[2:]))
"""

FAULTS = [
    ("full", ["the disk is full", "free some space", "nothing of the copy was kept"]),
    ("read-only", ["read-only", "nothing of the copy was kept"]),
    ("truncate", [f"{OURS}/checkpoint.pt", "does not match its recorded checksum", "run it again"]),
    ("vanish", ["run dense-pico_6e9_s0 of study pico", "vanished while it was copied", "harness train"]),
]


@pytest.mark.parametrize("again", [False, True], ids=["first-copy", "replacing-a-copy"])
@pytest.mark.parametrize(("fault", "names"), FAULTS, ids=[f for f, _ in FAULTS])
def test_a_fault_while_copying_is_one_line_and_leaves_the_folder_as_it_was(root, fault, names, again):
    if again:  # a finished copy whose source was trained again: --force replaces it, or nothing does
        _reused(root)
        _retrain_source(root)
    before = snapshot(root / "results" / "pico2")
    argv = [*REUSE[1:], *(["--force"] if again else [])]
    done = subprocess.run(
        [sys.executable, "-c", PATCHED, fault, *argv],
        cwd=root,
        env=os.environ | {"PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert_one_line(done, PREFIX, names)
    assert_unchanged(before, snapshot(root / "results" / "pico2"))


def test_reuse_waits_for_no_one_while_the_run_trains(root):
    from harness.train import run_lock

    hold = "import sys; from pathlib import Path; from harness.train import run_lock\n"
    hold += "with run_lock.training(Path(sys.argv[1]), sys.argv[2]):\n    print('held', flush=True); sys.stdin.read()"
    holder = subprocess.Popen(
        [sys.executable, "-c", hold, str(root / OURS), RUN],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        before = snapshot(root / "results")
        done = run_verb(REUSE, root)
        assert_one_line(done, PREFIX, [f"{OURS}/{run_lock.NAME}", "being trained by", f"pid {holder.pid}"])
        assert_unchanged(before, snapshot(root / "results"))
    finally:
        holder.kill()
        holder.wait()
    assert _reused(root)["study"] == "pico2", "once the training has gone, the reuse runs"


def test_training_is_refused_while_reuse_writes_the_run(root):
    """The lock is the same one: a reuse in progress is named as such to a training."""
    from harness.train import run_lock

    hold = "import sys; from pathlib import Path; from harness.train import run_lock\n"
    hold += "with run_lock.training(Path(sys.argv[1]), sys.argv[2], verb='reuse'):\n"
    hold += "    print('held', flush=True); sys.stdin.read()"
    holder = subprocess.Popen(
        [sys.executable, "-c", hold, str(root / OURS), RUN], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert holder.stdout.readline().strip() == b"held"
        done = run_verb(["harness", "train", COPY, "--run", RUN, "--results", "results", "--quiet"], root)
        assert_one_line(done, "harness train: error: ", [run_lock.NAME, "being reused by", "harness train"])
    finally:
        holder.kill()
        holder.wait()


def test_a_changed_source_replaces_a_finished_copy_only_when_asked(root):
    first = _reused(root)
    again = run_verb(REUSE, root)  # unchanged there: nothing to do
    assert again.returncode == 0 and "nothing to do" in again.stdout, again.stderr
    _retrain_source(root, loss=9.25)
    before = snapshot(root / "results" / "pico2")
    done = run_verb(REUSE, root)
    names = [f"{OURS}/record.json", f"run {RUN} of study pico ({SOURCE})", "trained again there", "9.2500", "--force"]
    line = assert_one_line(done, PREFIX, names)
    assert_unchanged(before, snapshot(root / "results" / "pico2"))
    # The remedy it offers, as typed, replaces the copy.
    remedy = line.split("`python -m ")[1].split("`")[0].split()
    assert remedy == [*REUSE[:4], "--force"], remedy
    replaced = run_verb(remedy, root)
    assert replaced.returncode == 0, replaced.stderr
    now = json.loads((root / OURS / "record.json").read_text())
    assert now["final_val_loss"] == 9.25 != first["final_val_loss"]
    from harness.train import checkpoint

    assert checkpoint.problem(root / OURS / checkpoint.NAME) is None
    assert not (root / OURS / checkpoint.PREVIOUS).exists(), "the older copy's previous checkpoint went with it"


def test_a_copy_whose_source_is_gone_names_the_source_study(root):
    _reused(root)
    shutil.rmtree(root / SOURCE)
    before = snapshot(root / "results")
    done = run_verb(REUSE[:4], root)  # found by identity: there is none now
    line = assert_one_line(done, PREFIX, [f"{OURS}/record.json", f"run {RUN} of study pico", "kept", "--restart"])
    done = run_verb(REUSE, root)
    assert_one_line(done, PREFIX, [SOURCE, f"run {RUN} of study pico", "no longer exists", "harness train"])
    assert_unchanged(before, snapshot(root / "results"))
    remedy = line.split("`harness ")[1].split("`")[0].split()  # as typed: trains the run here
    trained = run_verb(["harness", *remedy, "--quiet", "--threads", "1"], root)
    assert trained.returncode == 0, trained.stderr
    assert "reused_from" not in json.loads((root / OURS / "record.json").read_text())


def _snakemake(root: Path, *config: str, dry: bool = False) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", *(["-n"] if dry else []), f"{OURS}/record.json", "--cores", "1"]
    cmd += ["-s", str(ROOT / "Snakefile"), "--directory", str(root), "--config", f"study={root / COPY}", *config]
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=root, env=env)


@pytest.mark.slow
def test_snakemake_keeps_a_copy_whose_source_was_trained_again_unless_told(root):
    assert _snakemake(root).returncode == 0
    assert json.loads((root / OURS / "record.json").read_text())["study"] == "pico2"
    _retrain_source(root, loss=9.5)
    before = snapshot(root / "results" / "pico2")
    refused = _snakemake(root)
    said = refused.stdout + refused.stderr
    assert refused.returncode == 2, said
    assert f"its copy of run {RUN} of study pico ({SOURCE}) would be replaced" in said, said
    assert "--config retrain=stale" in said and "Traceback" not in said
    assert_unchanged(before, snapshot(root / "results" / "pico2"), {".snakemake/"})
    agreed = _snakemake(root, "retrain=stale")
    assert agreed.returncode == 0, agreed.stderr
    assert json.loads((root / OURS / "record.json").read_text())["final_val_loss"] == 9.5


def _pico_snakemake(root: Path, dry: bool) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", *(["-n"] if dry else []), f"{SOURCE}/record.json", "--cores", "1"]
    cmd += ["-s", str(ROOT / "Snakefile"), "--directory", str(root), "--config", f"study={root / STUDY}"]
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=root, env=env)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("damage", "said"),
    [(lambda p: p.unlink(), "is missing"), (lambda p: p.write_text("{garbled"), "is damaged (not JSON)")],
    ids=["deleted", "garbled"],
)
def test_the_dry_run_lists_what_the_real_run_runs_when_an_identity_file_is_damaged(root, damage, said):
    """Snakemake keeps a record of each job's inputs once it has run it: the run is trained by the
    workflow first, so that a dry run would see a changed set of inputs if it left the identity out."""
    (root / SOURCE / "record.json").unlink()
    assert _pico_snakemake(root, dry=False).returncode == 0
    identity = root / SOURCE / "identity.json"
    damage(identity)
    before = snapshot(root / "results")
    dry = _pico_snakemake(root, dry=True)
    assert dry.returncode == 0, dry.stderr
    assert "Nothing to be done" in dry.stdout + dry.stderr and "rule train" not in dry.stdout, dry.stdout
    assert f"{SOURCE}/identity.json {said}; a real run writes it again from the study" in dry.stderr, dry.stderr
    assert_unchanged(before, snapshot(root / "results"))  # the dry run wrote nothing under results/
    real = _pico_snakemake(root, dry=False)
    assert real.returncode == 0, real.stderr
    assert "rule train" not in real.stdout + real.stderr, real.stderr
    assert f"{SOURCE}/identity.json {said}; written again from the study" in real.stderr, real.stderr
    assert identity.stat().st_mtime < (root / SOURCE / "record.json").stat().st_mtime
    assert "Nothing to be done" in _pico_snakemake(root, dry=True).stdout


@pytest.mark.parametrize("dry", [True, False], ids=["dry-run", "real-run"])
def test_a_folder_where_an_identity_file_belongs_is_refused_by_both_runs(root, dry):
    (root / SOURCE / "identity.json").mkdir()
    before = snapshot(root / "results")
    done = _pico_snakemake(root, dry=dry)
    said = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert said[-1].startswith("moe-harness: error: ") and f"{SOURCE}/identity.json: a folder" in said[-1], said
    assert "move it aside" in said[-1]
    assert_unchanged(before, snapshot(root / "results"))
    if not dry:  # the remedy, as told: the workflow then writes the file and trains nothing
        (root / SOURCE / "identity.json").rename(root / "aside")
        again = _pico_snakemake(root, dry=False)
        assert again.returncode == 0 and "rule train" not in again.stdout, again.stderr
        assert (root / SOURCE / "identity.json").is_file()


@pytest.mark.parametrize("dry", [True, False], ids=["dry-run", "real-run"])
def test_a_damaged_record_stops_the_workflow_in_one_line(root, dry):
    (root / SOURCE / "record.json").write_text("[]\n")
    before = snapshot(root / "results")
    done = _pico_snakemake(root, dry=dry)
    said = done.stderr.strip().splitlines()
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert said[-1].startswith(f"moe-harness: error: {SOURCE}/record.json: damaged: it holds"), said
    assert f"harness train {STUDY} --run {RUN}" in said[-1], said
    assert_unchanged(before, snapshot(root / "results"))


def test_a_damaged_copy_is_named_not_replaced(root):
    _reused(root)
    (root / OURS / "record.json").write_text('{"run_id": 3}\n')
    before = snapshot(root / "results")
    done = run_verb(REUSE, root)
    assert_one_line(done, PREFIX, [f"{OURS}/record.json: damaged", "harness train"])
    assert_unchanged(before, snapshot(root / "results"))


def test_a_copy_that_lost_its_checkpoint_names_the_reuse_that_links_it_again(root):
    from harness.train import checkpoint

    _reused(root)
    (root / OURS / checkpoint.NAME).unlink()
    sample = ["harness", "sample", COPY, "--run", RUN, "--results", "results", "--tokens", "2"]
    done = run_verb(sample, root)
    line = assert_one_line(done, "harness sample: error: ", [f"{OURS}/checkpoint.pt is gone", SOURCE, "--restart"])
    remedy = line.split("`python -m ")[1].split("`")[0].split()
    assert remedy == REUSE[:4], remedy
    relinked = run_verb(remedy, root)
    assert relinked.returncode == 0, relinked.stderr
    assert checkpoint.problem(root / OURS / checkpoint.NAME) is None
    assert run_verb(sample, root).returncode == 0
