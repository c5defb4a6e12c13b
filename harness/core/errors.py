"""The failures a user can cause or repair, each one line naming the file and what to do.

``harness`` turns every one of these into ``harness VERB: error: ...`` and an exit code; anything
else is a defect in the harness and is printed with its traceback and a request to report it.

    ConfigError      a bad value in a model config, study or flag (models.config)
    MissingStep      an input an earlier step makes is absent: names the command that makes it
    DamagedFile      a file exists but is truncated, corrupt or inconsistent with its record
    DiskFull         a write ran out of disk: how much it needed and how much is free
    TooLarge         a run needs more memory than the machine has, said before allocating
    CannotWrite      the operating system refused a read or write: read-only, no permission,
                     a file where a folder belongs; :func:`os_failure` turns such errors into it
"""

from __future__ import annotations

import errno
import re
from pathlib import Path


class HarnessError(Exception):
    """A failure with a one-line explanation for the user (no traceback)."""


class MissingStep(HarnessError):
    def __init__(self, path: str | Path, command: str, what: str = ""):
        self.path, self.command = Path(path), command
        super().__init__(f"{path} does not exist{f' ({what})' if what else ''}; run `{command}` first")


class DamagedFile(HarnessError):
    def __init__(self, path: str | Path, problem: str, remedy: str = ""):
        self.path, self.problem = Path(path), problem
        super().__init__(f"{path}: damaged: {problem}{f'; {remedy}' if remedy else ''}")


class DiskFull(HarnessError):
    def __init__(self, path: str | Path, need_bytes: int | None, free_bytes: int):
        need = "" if need_bytes is None else f"it needs about {_mib(need_bytes)}, "
        super().__init__(f"{path}: the disk is full: {need}{_mib(free_bytes)} free on its filesystem")


class TooLarge(HarnessError):
    pass


class CannotWrite(HarnessError):
    pass


_WHAT_TO_DO = {
    errno.EACCES: ("permission denied", "give this user access to it (chmod, chown), or another --results/--out"),
    errno.EPERM: ("operation not permitted", "give this user access to it (chmod, chown), or another --results/--out"),
    errno.EROFS: ("the file system is read-only", "give a writable --results/--out, or remount it read-write"),
    errno.EISDIR: ("a folder is where a file belongs", "move the folder aside or give another path"),
    errno.ENOTDIR: ("a file is where a folder belongs", "move the file aside or give another path"),
    errno.EEXIST: ("something is already there where a folder belongs", "move it aside or give another path"),
    errno.ENOENT: ("no such file or folder", "check the path, or run the step that makes it"),
    errno.ENAMETOOLONG: ("the name is too long", "give a shorter path"),
}
# Libraries that wrap an OS error in their own (torch.save's RuntimeError, safetensors'
# SafetensorError, tokenizers' Exception) keep only its text: "No space left on device (os error 28)".
_WRAPPED = (
    (re.compile(r"no space left on device|os error 28|storagefull|\bENOSPC\b", re.I), errno.ENOSPC),
    (re.compile(r"disk quota exceeded|os error 122|\bEDQUOT\b", re.I), errno.EDQUOT),
    (re.compile(r"read-only file system|os error 30|\bEROFS\b", re.I), errno.EROFS),
    (re.compile(r"permission denied|os error 13|\bEACCES\b", re.I), errno.EACCES),
)


def os_failure(e: BaseException, path: str | Path | None = None) -> HarnessError | None:
    """The one-line error for an operating-system failure: an OSError, or a library's error that
    carries one's text. ``path``: where it happened (default: the file the OSError names).
    None when ``e`` is not such a failure (then it is a defect, shown with its traceback)."""
    code = e.errno if isinstance(e, OSError) else None
    if code is None:
        text = str(e)
        code = next((c for pattern, c in _WRAPPED if pattern.search(text)), None)
    elif path is None and getattr(e, "filename", None):
        path = e.filename
    if code is None:
        return None
    where = "" if path is None else f"{path}: "
    if code in (errno.ENOSPC, errno.EDQUOT):
        from harness.core.io import free_bytes

        full = "the disk quota is used up" if code == errno.EDQUOT else "the disk is full"
        room = "" if path is None else f" ({_mib(free_bytes(Path(path)))} free on its filesystem)"
        return CannotWrite(
            f"{where}{full}{room}: free some space (old checkpoints, runs/*/checkpoint.prev.pt) and run it again"
        )
    if code not in _WHAT_TO_DO:
        strerror = getattr(e, "strerror", None) or str(e)
        return CannotWrite(f"{where}{strerror}: check the path and its disk, then run it again")
    what, todo = _WHAT_TO_DO[code]
    return CannotWrite(f"{where}{what}: {todo}")


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"
