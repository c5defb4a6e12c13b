"""Let a new venv see another Python's packages (a GPU machine's own CUDA torch), after its own.

    python -m harness.tools.host_site VENV_PYTHON HOST_PYTHON     # make install SITE_FROM=HOST_PYTHON

``python -m venv --system-site-packages`` shares the *base* interpreter's site-packages, which
misses the packages when the machine's Python is itself a venv (as GPU images often are). This
writes a ``.pth`` file into the new venv naming the host's site-packages folders: Python appends
them to ``sys.path`` after the venv's own, so what the venv installs wins, and pip counts the
host's packages as installed (they satisfy requirements and are never reinstalled or removed).
It runs before the venv has anything installed, so it needs only the standard library.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

PTH = "moe_harness_host_site.pth"
PROBE = "import json, site, sys; print(json.dumps([list(sys.version_info[:2]), site.getsitepackages()]))"


def _probe(python: str) -> tuple[tuple[int, int], list[str]]:
    try:
        out = subprocess.run([python, "-c", PROBE], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise SystemExit(f"host_site: error: cannot run {python}: {e}") from None
    version, site_dirs = json.loads(out)
    return tuple(version), site_dirs


def _purelib(python: str) -> Path:
    code = "import sysconfig; print(sysconfig.get_path('purelib'))"
    return Path(subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout.strip())


def link(venv_python: str, host_python: str) -> Path:
    """Write the .pth; the two Pythons must be the same major.minor (compiled packages)."""
    venv_version, venv_dirs = _probe(venv_python)
    host_version, host_dirs = _probe(host_python)
    if venv_version != host_version:
        raise SystemExit(
            f"host_site: error: SITE_FROM={host_python} is Python {'.'.join(map(str, host_version))} but the venv's "
            f"is {'.'.join(map(str, venv_version))}: make the venv with that Python (PYTHON={host_python})"
        )
    shared = [d for d in host_dirs if d not in venv_dirs and Path(d).is_dir()]
    pth = _purelib(venv_python) / PTH
    pth.write_text("".join(f"{d}\n" for d in shared))
    return pth


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m harness.tools.host_site VENV_PYTHON HOST_PYTHON", file=sys.stderr)
        return 2
    pth = link(*args)
    print(f"{pth}: the venv also sees {', '.join(pth.read_text().split()) or 'nothing more'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
