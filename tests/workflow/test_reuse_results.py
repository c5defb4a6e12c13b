"""Extending a study costs only its new runs: a reused run's evaluation and routing analysis come
from the study it came from when they were made of the same checkpoint (its recorded SHA-256), data,
settings and device, checked again by the job and written under this study's name; anything else
(a damaged or foreign file, another setting) makes them run again, as the plain rules do. Speed
is measured again."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import ROOT
from pico_study import RUN, STUDY, cli_output, extended_copy

from harness.study.runs import find_run
from harness.study.spec import load_study
from harness.train import checkpoint
from harness.workflow.reuse import REUSED, result_inputs, reused_result

pytestmark = pytest.mark.slow  # trains, evaluates and reuses a study through the verbs

COPY, NEW, MOE = "copy.yaml", "dense-pico-b_6e9_s0", "moe-pico-e4k2_6e9_s0"
R = ("--results", "results")


def _add_moe(root: Path) -> None:
    """The pico study with an MoE twin of its model, so that routing has experts to analyse."""
    data = yaml.safe_load((root / STUDY).read_text())
    data["models"].append({"base": str(root / "model.yaml"), "experts": 4, "top_k": 2, "name": "moe-pico-e4k2"})
    (root / STUDY).write_text(yaml.safe_dump(data))


def _targets(study: str, runs) -> list[str]:
    return [f"results/{study}/runs/{r}/{name}" for r in runs for name in ("eval.json", "routing.json", "measure.json")]


def _snakemake(root: Path, study_file: str, targets: list[str], dry: bool) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", *targets, "-s", str(ROOT / "Snakefile"), "--directory", str(root)]
    cmd += ["--cores", "2", "--config", f"study={root / study_file}", *(["-n"] if dry else [])]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def _jobs(stdout: str) -> dict[str, list[str]]:
    """Each rule of a dry run with the run of each of its jobs."""
    jobs: dict[str, list[str]] = {}
    for block in re.split(r"\n(?=rule \w+:)", stdout):
        if m := re.match(r"rule (\w+):", block):
            runs = re.findall(r"output: \S*/runs/([^/\s]+)/", block)
            jobs.setdefault(m.group(1), []).extend(runs)
    return {rule: sorted(runs) for rule, runs in jobs.items()}


def _without(result: dict, *keys: str) -> dict:
    return {k: v for k, v in result.items() if k not in keys}


def _seconds(tsv: Path) -> float:
    return float(tsv.read_text().splitlines()[1].split("\t")[0])


@pytest.mark.slow
def test_an_extension_evaluates_and_analyses_only_its_new_run(study):
    _add_moe(study)
    first = [RUN, MOE]
    _snakemake(study, STUDY, _targets("pico", first), dry=False)
    extended_copy(study)
    runs = [RUN, MOE, NEW]

    jobs = _jobs(_snakemake(study, COPY, _targets("pico2", runs), dry=True).stdout)
    assert jobs["train"] == [NEW] and jobs["reuse"] == sorted(first), jobs
    assert jobs["evaluate"] == [NEW] and jobs["routing"] == [NEW], jobs
    assert jobs["reuse_eval"] == sorted(first) and jobs["reuse_routing"] == sorted(first), jobs
    assert jobs["measure"] == sorted(runs), "speed is measured again, in this session"

    start = time.perf_counter()
    _snakemake(study, COPY, _targets("pico2", runs), dry=False)
    total = time.perf_counter() - start
    training = _seconds(study / "results/pico2/benchmarks/train" / f"{NEW}.tsv")
    print(f"\nextension: {total:.1f} s in all, of which {training:.1f} s the new run's training job")

    for run in first:
        for name in ("eval.json", "routing.json"):
            source = json.loads((study / "results/pico/runs" / run / name).read_text())
            ours = json.loads((study / "results/pico2/runs" / run / name).read_text())
            assert ours["study"] == "pico2" and ours[REUSED] == {
                "study": "pico",
                "file": f"results/pico/runs/{run}/{name}",
            }
            assert _without(ours, "study", REUSED) == _without(source, "study"), (run, name)
        log = (study / "results/pico2/logs/evaluate" / f"{run}.log").read_text()
        assert "evaluation reused from" in log, log
    routing = json.loads((study / "results/pico2/runs" / MOE / "routing.json").read_text())
    assert routing["moe"] is True and routing["layers"], "the MoE's analysis came along"
    new = json.loads((study / "results/pico2/runs" / NEW / "eval.json").read_text())
    assert REUSED not in new and new["inputs"]["checkpoint_sha256"] == checkpoint.recorded_digest(
        study / "results/pico2/runs" / NEW / checkpoint.NAME
    )
    assert "Nothing to be done" in _snakemake(study, COPY, _targets("pico2", runs), dry=True).stdout

    # Another eval setting in the extended study: its evaluations run again, reused runs' included.
    extended_copy(study, lambda d: d["eval"].update(batch_size=4))
    jobs = _jobs(_snakemake(study, COPY, _targets("pico2", runs), dry=True).stdout)
    assert jobs.get("evaluate") == sorted(runs) and "reuse_eval" not in jobs, jobs
    assert "routing" not in jobs and "reuse_routing" not in jobs and "train" not in jobs, jobs
    _snakemake(study, COPY, [f"results/pico2/runs/{RUN}/eval.json"], dry=False)
    again = json.loads((study / "results/pico2/runs" / RUN / "eval.json").read_text())
    assert REUSED not in again and again["inputs"]["eval"]["batch_size"] == 4


# --- the check of a result file -------------------------------------------------------------------


@pytest.fixture(scope="module")
def prepared(pristine, tmp_path_factory) -> Path:
    """The pico study evaluated, and its copy pico2 with the run brought in."""
    from harness.workflow.reuse import reuse

    root = tmp_path_factory.mktemp("results-reuse")
    _copy(pristine, root)
    study, copy = str(root / STUDY), str(root / COPY)
    argv = [("evaluate", study, "--run", RUN), ("routing", study, "--run", RUN), ("data", copy), ("tasks", copy)]
    extended_copy(root)
    for args in argv:
        code, _, err = cli_output(*args, "--results", str(root / "results"))
        assert code == 0, err
    s = load_study(root / COPY)
    reuse(s, find_run(s, RUN), root / "results/pico2", root / "results/pico/runs" / RUN)
    return root


def _copy(source: Path, dest: Path) -> Path:
    """A copy of a study folder (timestamps kept), its study files' paths rewritten to the copy."""
    shutil.copytree(source, dest, dirs_exist_ok=True)
    for name in (STUDY, COPY):
        if (dest / name).is_file():
            (dest / name).write_text((dest / name).read_text().replace(str(source), str(dest)))
    return dest


@pytest.fixture
def evaluated(prepared, tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return _copy(prepared, tmp_path)


def _inputs(study: Path) -> dict:
    s = load_study(study / COPY)
    tasks = json.loads((study / "results/pico2/data/tasks/tasks.json").read_text())
    digest = checkpoint.recorded_digest(study / "results/pico2/runs" / RUN / checkpoint.NAME)
    fingerprint = json.loads((study / "results/pico2/runs" / RUN / "record.json").read_text())["data_fingerprint"]
    return result_inputs(s, "eval.json", digest, fingerprint, "cpu", tasks=tasks)


def test_the_same_checkpoint_data_and_settings_are_taken(evaluated):
    source = evaluated / "results/pico/runs" / RUN / "eval.json"
    taken, why = reused_result(source, RUN, _inputs(evaluated))
    assert taken is not None, why
    assert taken["inputs"]["checkpoint_sha256"] == checkpoint.recorded_digest(source.with_name(checkpoint.NAME))


@pytest.mark.parametrize(
    ("damage", "why"),
    [
        (lambda d: d.pop("inputs"), "records no inputs"),
        (lambda d: d.update(run_id="other_6e9_s0"), "is not dense-pico_6e9_s0's result"),
        (lambda d: d.update(study="elsewhere"), "is not dense-pico_6e9_s0's result"),
        (lambda d: d["inputs"].update(checkpoint_sha256="0" * 64), "other checkpoint_sha256"),
        (lambda d: d["inputs"].update(data_fingerprint="x"), "other data_fingerprint"),
        (lambda d: d["inputs"]["eval"].update(limit=3), "other eval"),
        (lambda d: d["inputs"].update(tasks_fingerprint="x"), "other tasks_fingerprint"),
        (lambda d: d["inputs"].update(device="cuda", dtype="bfloat16"), "other device, dtype"),
        (lambda d: d["inputs"].update(lm_eval_version="0.0.1"), "other lm_eval_version"),
    ],
    ids=["no-inputs", "other-run", "other-study", "checkpoint", "data", "settings", "tasks", "device", "lm-eval"],
)
def test_a_foreign_or_different_result_is_not_taken(evaluated, damage, why):
    source = evaluated / "results/pico/runs" / RUN / "eval.json"
    data = json.loads(source.read_text())
    damage(data)
    source.write_text(json.dumps(data))
    taken, said = reused_result(source, RUN, _inputs(evaluated))
    assert taken is None and why in said, said


def test_a_damaged_result_is_not_taken_and_the_run_is_evaluated(evaluated):
    source = evaluated / "results/pico/runs" / RUN / "eval.json"
    source.write_bytes(source.read_bytes()[:200])  # cut short
    assert reused_result(source, RUN, _inputs(evaluated))[0] is None
    code, _, err = cli_output("evaluate", COPY, "--run", RUN, *R, "--reuse", str(source))
    assert code == 0 and "not reused" in err and "no whole harness eval result" in err, err
    ours = json.loads((evaluated / "results/pico2/runs" / RUN / "eval.json").read_text())
    assert REUSED not in ours and ours["study"] == "pico2" and ours["tasks"]


def test_evaluate_and_routing_take_an_equal_result_by_hand(evaluated):
    source = evaluated / "results/pico/runs" / RUN
    code, out, err = cli_output("evaluate", COPY, "--run", RUN, *R, "--reuse", str(source / "eval.json"))
    assert code == 0 and "evaluation reused from" in out, err
    ours = json.loads((evaluated / "results/pico2/runs" / RUN / "eval.json").read_text())
    assert _without(ours, "study", REUSED) == _without(json.loads((source / "eval.json").read_text()), "study")
    code, out, err = cli_output("routing", COPY, "--run", RUN, *R, "--reuse", str(source / "routing.json"))
    assert code == 0 and "routing reused from" in out, err


def test_a_result_moved_to_another_folder_is_foreign(evaluated, tmp_path):
    source = evaluated / "results/pico/runs" / RUN / "eval.json"
    elsewhere = evaluated / "results/other/runs" / RUN
    elsewhere.mkdir(parents=True)
    shutil.copy(source, elsewhere / "eval.json")
    taken, why = reused_result(elsewhere / "eval.json", RUN, _inputs(evaluated))
    assert taken is None and "not dense-pico_6e9_s0's result in that folder" in why
