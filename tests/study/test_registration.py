"""A registered design is printed with the commit that registered it, checked against the runs' commits."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from harness.study.registration import registration_lines
from harness.study.spec import load_study

REGISTRATION = {
    "primary": {"moe": "moe-d64-e16k2", "dense": "dense-d64", "budget": 7.0e12, "delta_min": 0.01},
    "secondary": ["theta of the joint law with its 95% interval"],
    "exploratory": ["throughput"],
    "diverged_runs": "kept, and counted as no gain",
}


def _git(root: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, check=True, capture_output=True, text=True).stdout.strip()


def _commit(root: Path, message: str) -> str:
    _git(root, "add", "-A")
    _git(root, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", message)
    return _git(root, "rev-parse", "HEAD")


def _project(tmp_path: Path) -> tuple[Path, Path]:
    studies = tmp_path / "workflows" / "studies"
    studies.mkdir(parents=True)
    _git(tmp_path, "init", "-q")
    path = studies / "conf.yaml"
    study = {"name": "conf", "data": {"source": "python-stdlib"}, "models": [{"config": "dense-d64.yaml"}]}
    path.write_text(yaml.safe_dump(study | {"budgets": [7.0e12]}))
    return tmp_path, path


def _records(commit: str) -> list[dict]:
    return [{"provenance": {"git": {"commit": commit}}}]


def test_a_registration_committed_before_the_runs_says_so(tmp_path, monkeypatch):
    root, path = _project(tmp_path)
    before = _commit(root, "design")
    data = yaml.safe_load(path.read_text()) | {"registration": REGISTRATION}
    path.write_text(yaml.safe_dump(data))
    registered = _commit(root, "registration")
    (root / "later.txt").write_text("x")
    trained = _commit(root, "code the runs were trained from")
    monkeypatch.chdir(root)
    study = load_study(path)
    text = "\n".join(registration_lines(study, _records(trained)))
    assert "moe-d64-e16k2" in text and "smallest gain of interest 0.01 nats" in text
    assert f"committed: {registered[:10]}, an ancestor of every commit" in text
    assert "secondary: theta" in text and "a diverged run: kept" in text
    # runs trained before the registration was committed: it does not predate them
    late = "\n".join(registration_lines(study, _records(before)))
    assert "NOT an ancestor" in late and before[:10] in late


def test_an_uncommitted_registration_is_not_called_one(tmp_path, monkeypatch):
    root, path = _project(tmp_path)
    _commit(root, "design")
    path.write_text(yaml.safe_dump(yaml.safe_load(path.read_text()) | {"registration": REGISTRATION}))
    monkeypatch.chdir(root)
    text = "\n".join(registration_lines(load_study(path), _records("0" * 40)))
    assert "no commit of the study file holds this registration" in text


def test_a_study_without_registration_prints_nothing(tmp_path, monkeypatch):
    root, path = _project(tmp_path)
    monkeypatch.chdir(root)
    assert registration_lines(load_study(path), []) == []
