"""`snakemake -n` lists the jobs `snakemake` then runs, whatever bookkeeping file the workflow
writes when it starts is damaged, missing or moved: a damaged one stops both in the same line, a
stale one the real run writes again, in the dry run a stand-in with the time the real run gives it."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT
from pico_study import RUNDIR, STUDY
from verb_subprocess import assert_unchanged, snapshot

DATA = "results/pico/data"


def _snakemake(root: Path, dry: bool) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", *(["-n"] if dry else []), f"{RUNDIR}/record.json", "--cores", "1"]
    cmd += ["-s", str(ROOT / "Snakefile"), "--directory", str(root), "--config", f"study={root / STUDY}"]
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=root, env=env)


def _jobs(done: subprocess.CompletedProcess) -> list[str]:
    return sorted(set(re.findall(r"^rule (\w+):", done.stdout, re.M)))


def _fingerprint_edited(root: Path) -> None:
    path = root / DATA / "corpus.json"
    content = json.loads(path.read_text())
    path.write_text(json.dumps(content | {"fingerprint": "0" * 64}))


def _corpus_moved(root: Path) -> None:
    """The corpus moved (its files' identity and the signature change) and corpus.json edited."""
    (root / "elsewhere").mkdir()
    shutil.move(root / "corpus", root / "elsewhere" / "corpus")
    text = (root / STUDY).read_text().replace(str(root / "corpus"), str(root / "elsewhere" / "corpus"))
    (root / STUDY).write_text(text)
    _fingerprint_edited(root)


def _corpus_json_a_link(root: Path) -> None:
    path = root / DATA / "corpus.json"
    path.rename(root / "mine.json")
    path.symlink_to(root / "mine.json")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("damage", "refusal"),
    [
        (_corpus_moved, None),
        (lambda root: (root / DATA / "data.json").write_text("{"), f"{DATA}/data.json: damaged: not valid JSON"),
        (lambda root: (root / DATA / "corpus.json").write_text("[]"), f"{DATA}/corpus.json: damaged: it holds a list"),
        (_corpus_json_a_link, f"{DATA}/corpus.json: damaged: a symbolic link is where corpus.json belongs"),
    ],
    ids=["corpus-moved-and-its-json-edited", "data-json-garbled", "corpus-json-a-list", "corpus-json-a-link"],
)
def test_the_dry_run_lists_what_the_real_run_runs(study: Path, damage, refusal):
    assert _snakemake(study, dry=False).returncode == 0  # the workflow's own files written once
    damage(study)
    before = snapshot(study / "results")
    dry = _snakemake(study, dry=True)
    assert_unchanged(before, snapshot(study / "results"))
    real = _snakemake(study, dry=False)
    assert (dry.returncode, _jobs(dry)) == (real.returncode, _jobs(real)), (dry.stdout, real.stdout, real.stderr)
    if refusal is None:
        assert real.returncode == 0 and _jobs(real) == [], real.stdout
        return
    for done in (dry, real):
        last = done.stderr.strip().splitlines()[-1]
        assert done.returncode == 2 and last.startswith(f"moe-harness: error: {refusal}"), done.stderr
        assert "Traceback" not in done.stderr
    # The remedy the line gives, as typed, lets the workflow go on without training anything.
    if "`harness data" in last:
        command = last.split("`harness ")[1].split("`")[0].split()
        env = os.environ | {"PYTHONPATH": str(ROOT)}
        prepared = subprocess.run([sys.executable, "-m", "harness", *command], cwd=study, env=env, capture_output=True)
        assert prepared.returncode == 0, prepared.stderr
    else:
        assert "move it aside" in last or "delete it" in last, last
        (study / DATA / "corpus.json").rename(study / "aside.json")
    again = _snakemake(study, dry=False)
    assert again.returncode == 0 and _jobs(again) == [], again.stdout + again.stderr
