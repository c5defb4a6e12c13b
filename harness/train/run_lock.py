"""One writer per run folder: training, and reuse (a finished run of another study brought in),
hold an exclusive lock; the steps that read a trained run (measure, evaluate, routing, export) a
shared one.

Two ``harness train`` of the same run at once, by hand, from two workflows, or one of each,
would write one checkpoint and one metrics log in turn. So training takes an exclusive,
non-blocking ``flock`` on ``<run folder>/.lock`` for as long as it runs, and a second one
refuses at once, naming the process that holds it. A step that reads the trained run takes a
shared lock: several may read at once, none while the run trains, and a training that would
rewrite the checkpoint under them waits for nothing: it refuses.

The kernel drops a ``flock`` when the process that holds it ends, however it ends (SIGKILL
included), so a lock file left behind by a killed process never blocks: only a live holder
does. The file says who took it last (pid, host and verb), for the refusal. It stays, except
where a training created the run folder and was refused before writing anything else there:
then the folder and its lock go, so a refused run leaves nothing behind. A process that opened
the removed file before it went finds, once it holds the lock, that the name now points
elsewhere (or nowhere) and takes the lock again, so two processes never hold two files of one
name.

Under torchrun only rank 0 takes the lock, before the process group starts, so the ranks of
one run never refuse each other; another run's rank 0 refuses, and torchrun ends its other ranks.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from harness.core.errors import HarnessError

NAME = ".lock"


class RunBusy(HarnessError):
    """Another live process holds the run's lock."""


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 512, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return text or "another process"


def _still_named(path: Path, fd: int) -> bool:
    """Whether ``path`` is still the file open as ``fd``."""
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _take(run_dir: Path, run_id: str, exclusive: bool, verb: str) -> int:
    """An open descriptor holding the run's lock, or RunBusy naming the holder."""
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(run_dir / NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except PermissionError as e:
        raise HarnessError(
            f"{run_dir / NAME}: cannot open the run's lock file ({e.strerror}); "
            f"give this user write access to {run_dir}"
        ) from None
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        if not _still_named(run_dir / NAME, fd):  # removed by a refused training meanwhile
            os.close(fd)
            return _take(run_dir, run_id, exclusive, verb)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        doing = "trained" if "harness train" in holder else "reused" if "harness reuse" in holder else "read"
        what = f"is being {doing} by {holder}"
        todo = f"wait for it to finish, then run {_command(verb)} again"
        raise RunBusy(f"{run_dir / NAME}: run {run_id} {what}; {todo}") from None
    # Who holds it, for a refusal: one write at offset 0, so readers that share the lock at most
    # leave each other's line.
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} (harness {verb})\n".encode(), 0)
    return fd


def _command(verb: str) -> str:
    return "`python -m harness.reuse`" if verb == "reuse" else f"`harness {verb}`"


@contextlib.contextmanager
def training(run_dir: Path, run_id: str, main: bool = True, verb: str = "train") -> Iterator[None]:
    """Hold the run's exclusive lock for the block (``main``: this process is rank 0; the
    other ranks of a torchrun take nothing). ``verb``: who writes the run (train, or reuse,
    which brings a finished run of another study in)."""
    if not main:
        yield
        return
    made = [p for p in (run_dir, *run_dir.parents) if not p.exists()]
    fd = _take(run_dir, run_id, exclusive=True, verb=verb)
    try:
        yield
    finally:
        if made and [p.name for p in run_dir.iterdir()] == [NAME]:  # refused before any work
            (run_dir / NAME).unlink()
            for folder in made:  # and the folders made for it, where nothing else came meanwhile
                with contextlib.suppress(OSError):
                    folder.rmdir()
        os.close(fd)  # closing the descriptor drops the lock


_READING = contextlib.ExitStack()
"""Shared locks held by this process's verb, dropped by :func:`released` when it ends."""


def reading(run_dir: Path, run_id: str, verb: str) -> None:
    """Hold a shared lock on the run until the verb ends (:func:`released`): refused while the
    run trains. A run folder that does not exist is left alone (the verb says what is missing)."""
    if not os.access(run_dir, os.W_OK):  # absent, or a read-only copy: nothing trains there
        return
    if not (run_dir / NAME).exists() and not (run_dir / "checkpoint.pt").exists():
        return  # nothing a training made (a reference folder's records): nothing to guard
    fd = _take(run_dir, run_id, exclusive=False, verb=verb)
    _READING.callback(os.close, fd)


@contextlib.contextmanager
def released() -> Iterator[None]:
    """Drop every lock :func:`reading` took, at the end of the block."""
    try:
        yield
    finally:
        _READING.close()
