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


def _records(commit: str, block: str | None = None, dirty: bool = False) -> list[dict]:
    """A run trained at ``commit`` under the registration block of hash ``block`` (None: a run
    trained before runs recorded it)."""
    rec = {"run_id": "dense-d64_7e12_s0", "provenance": {"git": {"commit": commit, "dirty": dirty}}}
    return [rec | ({"registration_sha256": block} if block else {})]


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
    text = "\n".join(registration_lines(study, _records(trained, study.registration_sha256)))
    assert "moe-d64-e16k2" in text and "smallest gain of interest 0.01 nats" in text
    assert f"committed: {registered[:10]}, an ancestor of every commit" in text
    assert "each run recorded it): registered before the runs" in text
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


def _registered(tmp_path: Path, monkeypatch) -> tuple[Path, Path, str]:
    root, path = _project(tmp_path)
    _commit(root, "design")
    path.write_text(yaml.safe_dump(yaml.safe_load(path.read_text()) | {"registration": REGISTRATION}))
    commit = _commit(root, "registration")
    monkeypatch.chdir(root)
    return root, path, commit


def test_a_block_edited_after_the_runs_is_not_called_registered_before_them(tmp_path, monkeypatch):
    root, path, commit = _registered(tmp_path, monkeypatch)
    runs = _records(commit, load_study(path).registration_sha256)
    edited = yaml.safe_load(path.read_text())
    edited["registration"]["primary"]["delta_min"] = 0.03  # after the runs, uncommitted
    path.write_text(yaml.safe_dump(edited))
    text = "\n".join(registration_lines(load_study(path), runs))
    assert "registered before the runs" not in text
    assert "the block was edited after runs dense-d64_7e12_s0 were trained" in text
    _commit(root, "a later, committed edit")  # committed or not, the runs were trained under another block
    assert "edited after runs dense-d64_7e12_s0" in "\n".join(registration_lines(load_study(path), runs))


def test_runs_that_record_no_block_are_checked_against_their_clean_commit(tmp_path, monkeypatch):
    _, path, commit = _registered(tmp_path, monkeypatch)
    study = load_study(path)
    text = "\n".join(registration_lines(study, _records(commit)))
    assert "1 run(s) trained before runs recorded it match the block at their clean commit" in text
    assert "registered before the runs" in text
    # from a tree with uncommitted changes, the block it was trained under cannot be told
    text = "\n".join(registration_lines(study, _records(commit, dirty=True)))
    assert "record no block and their tree cannot tell which" in text and "registered before the runs" not in text


def test_a_primary_contrast_whose_arms_share_too_few_seeds_is_refused_at_plan_time(tmp_path, monkeypatch):
    from harness.study.runs import plan
    from models.config import ConfigError

    root, path = _project(tmp_path)
    (root / "models" / "configs").mkdir(parents=True)
    monkeypatch.chdir(root)
    study = yaml.safe_load(path.read_text())
    study["models"] = [
        {"config": str(Path(__file__).parents[2] / "models/configs/dense-d64.yaml"), "seeds": [200, 201]},
        {
            "base": str(Path(__file__).parents[2] / "models/configs/dense-d64.yaml"),
            "experts": 4,
            "top_k": 2,
            "name": "moe-d64-e4k2",
            "seeds": [202, 203],
        },
    ]
    study["registration"] = {"primary": {"moe": "moe-d64-e4k2", "dense": "dense-d64", "budget": 7.0e12}}
    path.write_text(yaml.safe_dump(study))
    try:
        plan(load_study(path))
    except ConfigError as e:
        assert e.field == "registration.primary.seeds" and "share 0 seed(s)" in str(e) and "202, 203" in str(e)
    else:
        raise AssertionError("a contrast with no shared seed was accepted")
    study["models"][1]["seeds"] = [200, 201]
    study["registration"]["primary"]["seeds"] = 3
    path.write_text(yaml.safe_dump(study))
    try:
        plan(load_study(path))
    except ConfigError as e:
        assert "fewer than the 3 the registration asks for" in str(e)
    else:
        raise AssertionError("a contrast with 2 shared seeds of 3 asked was accepted")
