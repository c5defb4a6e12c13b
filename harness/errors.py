"""The failures a user can cause or repair, each one line naming the file and what to do.

``harness`` turns every one of these into ``harness VERB: error: ...`` and an exit code; anything
else is a defect in the harness and is printed with its traceback and a request to report it.

    ConfigError      a bad value in a model config, study or flag (models.config)
    MissingStep      an input an earlier step makes is absent: names the command that makes it
    DamagedFile      a file exists but is truncated, corrupt or inconsistent with its record
    DiskFull         a write ran out of disk: how much it needed and how much is free
    TooLarge         a run needs more memory than the machine has, said before allocating
"""

from __future__ import annotations

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


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"
