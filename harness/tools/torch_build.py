"""Which PyTorch build ``make install`` takes when ``TORCH_BUILD=auto`` (the default).

PyPI's torch for Linux x86_64 is the CUDA build: several GB of CUDA libraries that a machine
without an NVIDIA driver can never use. So, on a machine with no NVIDIA driver, ask pip (a dry
run: metadata only, nothing downloaded or installed) which torch its configured index would
give; where that build requires CUDA libraries (``nvidia-*`` packages), take the CPU build from
PyTorch's own index instead. Everywhere else pip's choice stands: a machine with a driver, a
CPU wheel on disk or on the configured index, macOS, or an index that cannot be asked.

Prints the pip arguments to add to ``pip install SPEC`` (``--index-url URL``, or nothing), or
with ``--url`` the index URL alone (``make wheelhouse``'s ``--torch-index``), and says on
stderr why. Standard library only: it runs before anything is installed.

    python -m harness.tools.torch_build 'torch==2.13.0'
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

CPU_INDEX = "https://download.pytorch.org/whl/cpu"
DRIVER_FILE = Path("/proc/driver/nvidia/version")
DRY_RUN_SECONDS = 300
"""A dry run reads one wheel's metadata; past this, pip's choice stands."""


def has_nvidia_driver() -> bool:
    """An NVIDIA kernel driver is loaded (Linux) or its command-line tool is installed."""
    return DRIVER_FILE.exists() or shutil.which("nvidia-smi") is not None


def applies_here(requirement: str) -> bool:
    """Whether a requirement's environment marker holds on this machine (PyPI's torch names its
    CUDA libraries for Linux x86_64 only); True where the marker cannot be read."""
    try:
        from pip._vendor.packaging.requirements import InvalidRequirement, Requirement
    except ImportError:
        return True
    try:
        marker = Requirement(requirement).marker
    except InvalidRequirement:
        return True
    return marker is None or marker.evaluate({"extra": ""})


def cuda_requirements(report: dict) -> list[str]:
    """The ``nvidia-*`` requirements, on this machine, of the torch a ``pip install --report``
    would install."""
    for item in report.get("install", []):
        meta = item.get("metadata", {})
        if meta.get("name", "").lower() == "torch":
            needs = meta.get("requires_dist") or []
            return [r for r in needs if r.lower().startswith("nvidia-") and applies_here(r)]
    return []


def pip_choice(spec: str, python: str) -> dict | None:
    """pip's install report for ``spec`` without installing anything, or None where pip cannot
    say (no index reachable, an old pip)."""
    cmd = [python, "-m", "pip", "install", "--dry-run", "--quiet", "--no-deps", "--ignore-installed"]
    cmd += ["--report", "-", spec]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=DRY_RUN_SECONDS, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    try:
        return json.loads(done.stdout)
    except json.JSONDecodeError:
        return None


def choose(spec: str, python: str) -> tuple[str | None, str]:
    """The index to take torch from (None: pip's own choice) and why."""
    if has_nvidia_driver():
        return None, "an NVIDIA driver is present: pip's choice of torch stands"
    report = pip_choice(spec, python)
    if report is None:
        return None, "no NVIDIA driver, but pip could not say which torch it would take: its choice stands"
    cuda = cuda_requirements(report)
    if not cuda:
        return None, "no NVIDIA driver, and pip's index gives a torch without CUDA libraries: taking it"
    return CPU_INDEX, (
        f"no NVIDIA driver, and pip's index gives torch's CUDA build (it requires {cuda[0].split(';')[0].strip()}"
        f" and {len(cuda) - 1} more): taking the CPU build from {CPU_INDEX}; TORCH_BUILD=default keeps pip's choice"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.tools.torch_build", description=__doc__.split("\n\n")[0])
    parser.add_argument("spec", help="torch's requirement, e.g. torch==2.13.0")
    parser.add_argument("--python", default=sys.executable, help="the Python whose pip is asked")
    parser.add_argument("--url", action="store_true", help="print the index URL alone (nothing: pip's choice)")
    args = parser.parse_args(argv)
    index, why = choose(args.spec, args.python)
    print(f"TORCH_BUILD=auto: {why}", file=sys.stderr)
    if index:
        print(index if args.url else f"--index-url {index}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
