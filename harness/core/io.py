"""Atomic outputs: write to a temporary name in the same folder, then rename.

A killed job leaves at most a ``.*.tmp`` file behind, never something that looks finished; the
step that owns the folder removes such leftovers (:func:`remove_leftovers`). Outputs get the
permissions of the user's umask, as a plain ``open`` would give them. A write that runs out of
disk says so (:class:`~harness.core.errors.DiskFull`); a JSON file that does not parse is named as
damaged (:class:`~harness.core.errors.DamagedFile`).
"""

from __future__ import annotations

import errno
import filecmp
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness.core.errors import DamagedFile, DiskFull, HarnessError, MissingStep, os_failure

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def follow_umask(path: Path) -> Path:
    """Give ``path`` and, for a folder, everything under it the permissions a plain ``open`` or
    ``mkdir`` would: ``tempfile`` makes its files 0600 and its folders 0700, and some libraries
    write their files that way too."""
    mask = _umask()
    for p in [path, *(path.rglob("*") if path.is_dir() else ())]:
        if not p.is_symlink():
            p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)
    return path


def free_bytes(path: Path) -> int:
    """Free space on the filesystem that holds ``path`` (or its nearest existing parent)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def atomic_write(
    path: str | Path, write: Callable[[Path], None], need_bytes: int | None = None, keep_same: bool = False
) -> Path:
    """Call ``write(tmp_path)`` and move the result onto ``path``. ``need_bytes``: the expected
    size, quoted if the disk fills up. ``keep_same``: when ``path`` already holds exactly these
    bytes, leave it (and its time, which Snakemake goes by) as it is."""
    path = Path(path)
    tmp_path = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        write(tmp_path)
        if keep_same and path.is_file() and filecmp.cmp(tmp_path, path, shallow=False):
            tmp_path.unlink()
            return path
        follow_umask(tmp_path)
        os.replace(tmp_path, path)
    except BaseException as e:
        if tmp_path is not None:
            tmp_path.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno in NO_SPACE:
            raise DiskFull(path, need_bytes, free_bytes(path.parent)) from None
        if isinstance(e, Exception) and not isinstance(e, HarnessError):
            # Read-only, no permission, a library's wrapped OS error: named by the file the step
            # writes, not by its temporary name.
            named = getattr(e, "filename", None)
            where = path if named is None or ".tmp" in str(named) else named
            if (failure := os_failure(e, where)) is not None:
                raise failure from None
        raise
    return path


def remove_leftovers(folder: Path, name: str) -> list[Path]:
    """Delete the temporary files that interrupted writes of ``folder/name`` left behind."""
    gone = sorted(folder.glob(f".{name}.*.tmp")) if folder.is_dir() else []
    for p in gone:
        p.unlink(missing_ok=True)
    return gone


def write_text(path: str | Path, text: str, keep_same: bool = False) -> Path:
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"), keep_same=keep_same)


def write_json(path: str | Path, data: Any, keep_same: bool = False) -> Path:
    return write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n", keep_same)


def read_json(path: str | Path, made_by: str | None = None, remedy: str | None = None) -> Any:
    """One JSON document. Absent: :class:`MissingStep` naming ``made_by`` (the command that
    writes it) when given; not JSON: :class:`DamagedFile` with ``remedy`` (default: delete it and
    run ``made_by`` again)."""
    path = Path(path)
    if made_by is not None and not path.exists():
        raise MissingStep(path, made_by)
    try:
        return json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DamagedFile(path, f"not valid JSON ({e})", remedy or _remedy(made_by)) from None


def read_json_object(path: str | Path) -> dict[str, Any] | None:
    """The JSON object in ``path``, or None where it is missing, unreadable or not an object
    (for files whose absence or damage only means "not known yet")."""
    try:
        content = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return content if isinstance(content, dict) else None


def read_jsonl(
    path: str | Path,
    made_by: str | None = None,
    partial_last: bool = False,
    remedy: str | None = None,
    check: Callable[[Any], str | None] | None = None,
) -> list[Any]:
    """Every line of a JSON-lines file; a line that does not parse, or that ``check`` finds a
    problem with (a phrase, None when the row is sound), is named by its number, with ``remedy``
    as in :func:`read_json`. ``partial_last``: a last line cut short (a writer killed mid-line) is
    dropped, not an error."""
    path = Path(path)
    if made_by is not None and not path.exists():
        raise MissingStep(path, made_by)
    lines = path.read_bytes().splitlines()
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            if partial_last and i == len(lines):
                break
            raise DamagedFile(path, f"line {i} is not valid JSON ({e})", remedy or _remedy(made_by)) from None
        if check is not None and (problem := check(row)):
            raise DamagedFile(path, f"line {i}: {problem}", remedy or _remedy(made_by))
        rows.append(row)
    return rows


def _remedy(made_by: str | None) -> str:
    return f"delete it and run `{made_by}` again" if made_by else ""
