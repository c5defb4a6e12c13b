"""Is there a CUDA device here? Answered in seconds, with the standard library alone, before
anything is installed: ``make gpu-check`` asks first, so that a machine without one is told so
before a venv is built and torch is installed.

    python3 -m harness.tools.cuda_probe    exit 0 and the devices found, or 2 and why there are none

What it looks at, cheapest first: ``CUDA_VISIBLE_DEVICES`` hiding every device; the driver's
``nvidia-smi -L`` (or, without it, the driver's device files ``/dev/nvidia0``...); and, where
this Python has torch (the one ``make gpu-check``'s venv builds on), whether that torch sees a
device. ``make gpu-check-rehearsal`` (the CPU rehearsal) does not ask.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import shutil
import subprocess
import sys

DEV = "/dev"
"""Where the driver's device files are."""


def find() -> tuple[list[str], str]:
    """The CUDA devices found, and when there are none, why."""
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES")
    if hidden is not None and hidden.strip() in ("", "-1"):
        return [], f"CUDA_VISIBLE_DEVICES={hidden!r} hides every device"
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as e:
            return [], f"nvidia-smi -L did not answer ({e})"
        if out.returncode != 0:
            said = (out.stderr or out.stdout).strip().splitlines()
            return [], f"nvidia-smi -L failed: {said[-1] if said else f'exit code {out.returncode}'}"
        found = [line.strip() for line in out.stdout.splitlines() if line.startswith("GPU ")]
        if not found:
            return [], "nvidia-smi -L lists no GPU"
    else:
        found = sorted(p for p in glob.glob(os.path.join(DEV, "nvidia[0-9]*")) if os.path.basename(p)[6:].isdigit())
        if not found:
            return [], f"no NVIDIA driver here: no nvidia-smi on PATH and no {DEV}/nvidia0"
    return found, _torch_problem()


def _torch_problem() -> str:
    """Why this Python's torch sees no device ('' when it sees one, or has no torch: the venv
    then installs a CUDA torch of its own)."""
    if importlib.util.find_spec("torch") is None:
        return ""
    import torch

    if torch.version.cuda is None:
        return f"this Python's torch {torch.__version__} ({torch.__file__}) is a CPU-only build"
    if not torch.cuda.is_available():
        return f"this Python's torch {torch.__version__} (CUDA {torch.version.cuda}) sees no device"
    return ""


def main() -> int:
    found, problem = find()
    if problem or not found:
        print(
            f"gpu-check: error: no CUDA device is visible: {problem}; "
            "`make gpu-check-rehearsal` runs the stages on the CPU",
            file=sys.stderr,
        )
        return 2
    print(f"gpu-check: {len(found)} CUDA device(s): {'; '.join(found)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
