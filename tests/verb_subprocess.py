"""A verb run as a user runs it, in a subprocess, and the checks every refusal must pass: the
documented exit code, one line on stderr naming the file or field and the remedy, no traceback,
nothing left half-written and nothing changed that the verb may not write."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOCK = ".lock"
"""A run's lock file (harness.train.run_lock.NAME): it names who took it last, so every verb
that reads a run rewrites it."""


def run_verb(argv: list[str], cwd: Path, timeout: float = 240, env: dict[str, str] | None = None):
    """``python -m argv[0] argv[1:]`` when argv[0] is a module (``harness``, ``harness.reuse``,
    ``snakemake``), in ``cwd``, with the repository importable: the CompletedProcess (text)."""
    environment = os.environ | {"PYTHONPATH": str(REPO), "PYTHONHASHSEED": "0"} | (env or {})
    return subprocess.run(
        [sys.executable, "-m", *argv],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        errors="replace",
        timeout=timeout,
    )


def snapshot(root: Path) -> dict[str, bytes | str | None]:
    """Every path under ``root`` with its content (a link: where it points; a folder: None),
    less the runs' lock files."""
    out: dict[str, bytes | str | None] = {}
    for p in root.rglob("*"):
        if p.name == LOCK:
            continue
        key = p.relative_to(root).as_posix()
        if p.is_symlink():
            out[key] = "-> " + os.readlink(p)
        elif p.is_file():
            out[key] = p.read_bytes()
        else:
            out[key] = None
    return out


def assert_one_line(done: subprocess.CompletedProcess, prefix: str, names: list[str], code: int = 2) -> str:
    """The refusal is exit ``code`` and one error line, the last on stderr, starting with
    ``prefix`` and naming each of ``names``; no traceback. Returns the line."""
    err = done.stderr
    assert done.returncode == code, (done.returncode, err)
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines, err
    errors = [line for line in lines if ": error: " in line]
    assert errors == lines[-1:], err
    assert lines[-1].startswith(prefix), err
    for name in names:
        assert name in lines[-1], (name, err)
    return lines[-1]


def assert_unchanged(before: dict, after: dict, may_write: set[str] = frozenset()) -> None:
    """Nothing half-written (no temporary files), nothing deleted or changed but ``may_write``
    (paths relative to the snapshot's root, or their prefixes ending in /)."""

    def allowed(path: str) -> bool:
        return any(path == w or (w.endswith("/") and path.startswith(w)) for w in may_write)

    left = [p for p in after if (p.endswith(".tmp") or ".tmp." in p.rsplit("/", 1)[-1]) and not allowed(p)]
    assert not left, left
    new = [p for p in after.keys() - before.keys() if not allowed(p)]
    assert not new, sorted(new)
    gone = [p for p in before if p not in after and not allowed(p)]
    changed = [p for p in before if p in after and after[p] != before[p] and not allowed(p)]
    assert not gone and not changed, (gone, changed)
