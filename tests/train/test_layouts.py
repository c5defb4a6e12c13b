"""Impossible layouts and resources are refused before anything starts, in one line.

More ranks than the host has devices (GPUs, or CPU cores on a CPU), a batch that does not split
over torchrun's processes, a ``--gpus`` that does not fit the runs' world size: refused by
``harness plan``, the workflow's setup and every rank of ``harness train``. A stopped or refused
multi-process run exits with its ranks' own code through ``harness.launch``, and ``make
gpu-check`` says there is no CUDA device before it installs anything.

The host's cores are fixed per test: in this process by patching ``harness.train.parallel.host_slots``,
in a subprocess by its CPU affinity.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT
from pico_study import RUN, RUNDIR, STUDY, cli, cli_output

from harness.study.spec import Recipe
from harness.tools import cuda_probe
from harness.train import parallel
from harness.workflow.estimate import concurrent_runs


def layout(data: int, batch: int | None = None) -> Callable[[Path], None]:
    def change(root: Path) -> None:
        study = yaml.safe_load((root / STUDY).read_text())
        study["parallel"] = {"data": data}
        if batch is not None:  # a budget of a single step, so that the layout is what is wrong
            study["recipe"].update(batch_size=batch, min_steps=1)
            study["data"]["allow_repetition"] = True
        (root / STUDY).write_text(yaml.safe_dump(study))

    return change


def cores(n: int) -> Callable[[pytest.MonkeyPatch], None]:
    def fake(monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(parallel, "host_slots", lambda kind: n if kind == "cpu" else 0)

    return fake


def gpus(n: int) -> Callable[[pytest.MonkeyPatch], None]:
    def fake(monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(parallel, "host_slots", lambda kind: n if kind == "cuda" else 2)

    return fake


def torchrun(world: int, rank: int = 0, local: int | None = None) -> Callable[[pytest.MonkeyPatch], None]:
    """The environment torchrun gives a rank (the refusals come before the process group)."""

    def env(monkeypatch: pytest.MonkeyPatch) -> None:
        for key, value in {
            "WORLD_SIZE": world,
            "RANK": rank,
            "LOCAL_RANK": rank,
            "LOCAL_WORLD_SIZE": world if local is None else local,
        }.items():
            monkeypatch.setenv(key, str(value))

    return env


@dataclass
class Case:
    id: str
    change: Callable[[Path], None] | None
    argv: list[str]
    names: list[str]
    code: int = 2
    host: list[Callable[[pytest.MonkeyPatch], None]] = field(default_factory=list)


TRAIN = ["train", STUDY, "--run", RUN, "--quiet", "--threads", "1"]
PLAN_CUDA = ["plan", STUDY, "--device", "cuda"]

CASES = [
    Case(
        "plan-more-ranks-than-cores",
        layout(8, batch=8),
        ["plan", STUDY],
        [STUDY, "parallel.data", "8 ranks need a CPU core each", "2 CPU core(s)", "use at most 2"],
        host=[cores(2)],
    ),
    Case(
        "plan-1024-ranks",
        layout(1024, batch=1024),
        ["plan", STUDY],
        ["parallel.data", "1024 ranks need a CPU core each"],
        host=[cores(2)],
    ),
    Case("plan-ranks-fit-the-cores", layout(2), ["plan", STUDY], [], code=0, host=[cores(2)]),
    Case(
        "plan-gpus-fewer-than-a-run-needs",
        layout(4),
        [*PLAN_CUDA, "--gpus", "2"],
        ["--gpus", "trains on 4 GPUs (parallel.data: 4)", "at least 4"],
        host=[cores(2)],
    ),
    Case(
        "plan-gpus-beyond-what-the-runs-use",
        None,
        [*PLAN_CUDA, "--gpus", "100000"],
        ["--gpus", "100000 is more than study pico can use", "1 run(s) of 1 GPU(s) each", "at most 1"],
        host=[cores(2)],
    ),
    Case(
        "plan-gpus-beyond-the-hosts",
        None,
        [*PLAN_CUDA, "--gpus", "3"],
        ["--gpus", "3 is more than study pico can use: this host has 2 GPU(s)", "at most 2"],
        host=[gpus(2)],
    ),
    Case(
        "train-more-ranks-than-cores",
        layout(4),
        TRAIN,
        ["torchrun", "--nproc-per-node", "4 ranks need a CPU core each", "2 CPU core(s)", "start fewer"],
        host=[cores(2), torchrun(4)],
    ),
    Case(
        "train-ranks-do-not-split-the-batch",
        None,
        TRAIN,
        ["--nproc-per-node", "3 processes cannot split", "batch of 4", "(1, 2, 4)"],
        host=[cores(8), torchrun(3, rank=1)],
    ),
    Case(
        "train-on-another-host-counts-its-own-ranks",
        layout(4),
        TRAIN,
        ["--nproc-per-node", "3 ranks need a CPU core each"],
        host=[cores(2), torchrun(4, local=3)],
    ),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_a_layout_the_host_cannot_hold_is_one_clear_error(case: Case, study: Path, monkeypatch):
    monkeypatch.chdir(study)
    (study / RUNDIR / "record.json").unlink()  # a run still to train
    if case.change is not None:
        case.change(study)
    for fake in case.host:
        fake(monkeypatch)
    before = (study / RUNDIR / "metrics.jsonl").read_bytes()
    code, err = cli(*case.argv, "--results", "results")
    assert code == case.code, err
    assert "Traceback" not in err, err
    if code:
        lines = [line for line in err.splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith(f"harness {case.argv[0]}: error: ")]
        assert errors == lines[-1:], err  # one error line, last (after argparse's usage, if any)
    for name in case.names:
        assert name in err, (name, err)
    assert (study / RUNDIR / "metrics.jsonl").read_bytes() == before, "nothing trained"
    assert not (study / RUNDIR / "record.json").exists()


def test_runs_at_once_divide_the_devices_by_each_runs_world_size(monkeypatch):
    assert concurrent_runs(Recipe(), "cuda", 8, world=1) == 8
    assert concurrent_runs(Recipe(), "cuda", 8, world=4) == 2
    assert concurrent_runs(Recipe(), "cuda", 3, world=2) == 1
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert concurrent_runs(Recipe(train_threads=2), "cpu", 0, world=1) == 4
    assert concurrent_runs(Recipe(train_threads=2), "cpu", 0, world=2) == 2
    assert concurrent_runs(Recipe(), "cpu", 0, world=2) == 1


def test_plan_says_how_many_runs_train_at_once_on_the_gpus(study: Path, monkeypatch):
    monkeypatch.chdir(study)
    cores(2)(monkeypatch)  # no GPU here: --gpus says how many
    data = yaml.safe_load((study / STUDY).read_text())
    data["seeds"] = [0, 1, 2, 3]
    data["parallel"] = {"data": 2}
    (study / STUDY).write_text(yaml.safe_dump(data))
    code, out, err = cli_output(*PLAN_CUDA, "--gpus", "5", "--results", "results")
    assert code == 0, err
    assert "2 at once, 2 GPU(s) per run of 5;" in out, out
    code, out, err = cli_output(*PLAN_CUDA, "--results", "results")  # default: one run's GPUs
    assert code == 0, err
    assert "1 at once, 2 GPU(s) per run of 2;" in out, out


def _one_core() -> None:
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs CPU affinity (Linux)")
def test_the_workflow_refuses_more_ranks_than_cores_before_any_job(study: Path):
    layout(2)(study)
    (study / RUNDIR / "record.json").unlink()
    cmd = [sys.executable, "-m", "snakemake", "-n", str(Path(RUNDIR) / "record.json")]
    cmd += ["-s", str(ROOT / "Snakefile"), "--directory", str(study), "--cores", "1"]
    cmd += ["--config", f"study={study / STUDY}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, preexec_fn=_one_core)
    assert out.returncode != 0
    said = out.stdout + out.stderr  # Snakemake prints a Snakefile's error on stdout
    assert "field 'parallel.data': 2 ranks need a CPU core each and this host has 1 CPU core(s)" in said, said


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is visible here: the GPU count is checked first")
def test_the_workflow_refuses_a_gpu_resource_smaller_than_a_run(study: Path):
    """A GPU study (as on a cluster's submitting host: --config device=cuda) whose runs take 2
    GPUs each, under a workflow allowed 1: its train jobs could never start."""
    layout(2)(study)
    data = yaml.safe_load((study / STUDY).read_text())
    data["device"] = "auto"
    (study / STUDY).write_text(yaml.safe_dump(data))
    (study / RUNDIR / "record.json").unlink()
    cmd = [sys.executable, "-m", "snakemake", "-n", str(Path(RUNDIR) / "record.json"), "--resources", "gpu=1"]
    cmd += ["-s", str(ROOT / "Snakefile"), "--directory", str(study), "--cores", "2"]
    cmd += ["--config", f"study={study / STUDY}", "device=cuda"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    said = out.stdout + out.stderr
    assert out.returncode != 0, said[-2000:]
    assert "each run trains on 2 GPUs and the workflow may hold 1 at once" in said, said[-2000:]
    assert "snakemake --resources gpu=2" in said


def _launch(root: Path, ranks: int, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "harness.launch", "--standalone", f"--nproc-per-node={ranks}", "-m", "harness"]
    cmd += ["--", *TRAIN, "--results", "results", *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.slow
def test_each_rank_refuses_a_batch_that_does_not_split_and_the_launch_exits_2(study: Path):
    (study / RUNDIR / "record.json").unlink()
    done = _launch(study, 3)
    assert done.returncode == 2, done.stderr[-3000:]
    refusals = [line for line in done.stderr.splitlines() if line.startswith("harness train: error:")]
    assert refusals and all("3 processes cannot split dense-pico_6e9_s0's batch of 4" in r for r in refusals)
    assert "Traceback" not in done.stderr and "ChildFailedError" not in done.stderr, done.stderr[-3000:]
    assert "harness.launch: rank" in done.stderr and "exit code 2" in done.stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    ("extra", "code"), [([], 2), (["--restart", "--stop-after", "2"], 3)], ids=["refused", "stopped"]
)
def test_under_plain_torchrun_the_rank_names_the_launcher_that_keeps_its_code(study: Path, extra, code):
    """torchrun exits 1 with its own traceback whatever the rank's code: the rank's line says so
    and gives the launcher, and the launcher, run as typed, exits with the rank's code."""
    if code == 2:
        (study / RUNDIR / "record.json").unlink()
    ranks = 3 if code == 2 else 1
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", "-m", "harness"]
    cmd += ["--", *TRAIN, "--results", "results", *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, cwd=study, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 1, done.stderr[-3000:]
    said = done.stderr  # the ranks' lines may interleave
    assert f"where this rank exits {code}: `python -m harness.launch`, with the same arguments" in said, said[-3000:]
    launched = _launch(study, ranks, *extra)
    assert launched.returncode == code, launched.stderr[-3000:]
    assert "torchrun prints its own traceback" not in launched.stderr


@pytest.mark.slow
def test_a_stopped_multi_rank_run_exits_3(study: Path):
    done = _launch(study, 2, "--restart", "--stop-after", "2")
    assert done.returncode == 3, done.stderr[-3000:]
    assert "stopped after step 2" in done.stderr and "Traceback" not in done.stderr, done.stderr[-3000:]


# --- make gpu-check: no CUDA device, said in seconds, before any install ---------------------


def test_the_probe_finds_no_device_without_a_driver(monkeypatch, tmp_path):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi
    monkeypatch.setattr(cuda_probe, "DEV", str(tmp_path))
    found, why = cuda_probe.find()
    assert found == [] and "no nvidia-smi on PATH" in why
    (tmp_path / "nvidiactl").touch()  # the control node is not a device
    assert cuda_probe.find()[0] == []
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert "hides every device" in cuda_probe.find()[1]


@pytest.mark.parametrize(
    ("script", "fragment"),
    [
        (
            'echo "NVIDIA-SMI has failed because it could not communicate with the NVIDIA driver" >&2; exit 9',
            "nvidia-smi -L failed: NVIDIA-SMI has failed",
        ),
        ("exit 0", "nvidia-smi -L lists no GPU"),
    ],
)
def test_the_probe_believes_a_failing_nvidia_smi(monkeypatch, tmp_path, script, fragment):
    (tmp_path / "nvidia-smi").write_text(f"#!/bin/sh\n{script}\n")
    (tmp_path / "nvidia-smi").chmod(0o755)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    found, why = cuda_probe.find()
    assert found == [] and fragment in why


@pytest.mark.skipif(
    os.path.exists("/dev/nvidia0") or subprocess.run(["which", "nvidia-smi"], capture_output=True).returncode == 0,
    reason="this host has an NVIDIA driver",
)
def test_make_gpu_check_without_cuda_stops_before_the_install(tmp_path):
    venv = tmp_path / "venv"
    start = time.monotonic()
    out = subprocess.run(
        ["make", "--no-print-directory", "gpu-check", f"VENV={venv}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode != 0
    assert time.monotonic() - start < 30
    assert "gpu-check: error: no CUDA device is visible: no NVIDIA driver here" in out.stderr, out.stderr
    assert not venv.exists(), "nothing installed"


def test_the_rehearsal_does_not_ask_for_cuda(tmp_path):
    for argv in (["gpu-check-rehearsal"], ["gpu-check", "GPU_CHECK_ARGS=--rehearse"]):
        make = ["make", "-n", "--no-print-directory", *argv, f"VENV={tmp_path}/venv"]
        out = subprocess.run(make, cwd=ROOT, capture_output=True, text=True, check=True).stdout
        assert "cuda_probe" not in out and "-m harness.tools.gpu_check --rehearse" in out
    make = ["make", "-n", "--no-print-directory", "gpu-check", f"VENV={tmp_path}/venv"]
    out = subprocess.run(make, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[0].endswith("-m harness.tools.cuda_probe"), out
