"""TORCH_BUILD=auto: the CPU build where there is no NVIDIA driver and pip would take the CUDA
build, pip's choice everywhere else. pip is played by a script that answers `pip install
--dry-run --report -` as pip does."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from harness.tools import torch_build

CUDA_TORCH = [
    'nvidia-cublas-cu12==12.8.4.1; platform_system == "Linux" and platform_machine == "x86_64"',
    'nvidia-cudnn-cu12==9.10.2.21; platform_system == "Linux" and platform_machine == "x86_64"',
    "filelock",
]
NOT_HERE = ['nvidia-cublas-cu12==12.8.4.1; platform_system == "Plan9"', "filelock"]


def fake_python(tmp_path: Path, requires: list[str] | None, rc: int = 0) -> str:
    """A `python` whose `-m pip install --dry-run --report -` prints a report for a torch that
    requires ``requires`` (None: prints nothing JSON), and records its arguments."""
    report = {"install": [{"metadata": {"name": "torch", "version": "2.13.0", "requires_dist": requires}}]}
    out = json.dumps(report) if requires is not None else "not json"
    script = tmp_path / "python"
    script.write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path}/args\necho '{out}'\nexit {rc}\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


@pytest.fixture
def no_driver(monkeypatch):
    monkeypatch.setattr(torch_build, "has_nvidia_driver", lambda: False)


def test_without_a_driver_a_cuda_build_is_swapped_for_the_cpu_build(tmp_path, no_driver, capsys):
    python = fake_python(tmp_path, CUDA_TORCH)
    assert torch_build.main(["torch==2.13.0", "--python", python]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == f"--index-url {torch_build.CPU_INDEX}"
    assert "nvidia-cublas-cu12==12.8.4.1 and 1 more" in err and "TORCH_BUILD=default" in err
    args = (tmp_path / "args").read_text().split()
    assert args[:3] == ["-m", "pip", "install"] and "--dry-run" in args and args[-1] == "torch==2.13.0"


def test_url_alone_for_the_wheelhouse(tmp_path, no_driver, capsys):
    torch_build.main(["torch==2.13.0", "--python", fake_python(tmp_path, CUDA_TORCH), "--url"])
    assert capsys.readouterr().out.strip() == torch_build.CPU_INDEX


@pytest.mark.parametrize(
    ("requires", "rc"),
    [([], 0), (["filelock"], 0), (NOT_HERE, 0), (None, 0), (CUDA_TORCH, 1)],
    ids=["cpu-wheel", "no-cuda", "cuda-elsewhere", "pip-says-nothing", "pip-fails"],
)
def test_pip_choice_stands_where_it_is_no_cuda_build_or_unknown(tmp_path, no_driver, capsys, requires, rc):
    torch_build.main(["torch==2.13.0", "--python", fake_python(tmp_path, requires, rc)])
    assert capsys.readouterr().out == ""


def test_with_a_driver_pip_is_not_even_asked(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch_build, "has_nvidia_driver", lambda: True)
    torch_build.main(["torch==2.13.0", "--python", fake_python(tmp_path, CUDA_TORCH)])
    out, err = capsys.readouterr()
    assert out == "" and "NVIDIA driver is present" in err and not (tmp_path / "args").exists()
