"""The disk a study needs, against what its results folder has free: shown by ``harness plan``
and checked by the workflow before any job starts.

The need is computed from the study: each run's two checkpoints (``checkpoint.pt`` and
``checkpoint.prev.pt``, weights and AdamW's two moments in float32: 24 bytes per parameter,
``harness.workflow.estimate.checkpoint_bytes``) and the token shards (their size once prepared; before,
at most one token per corpus byte at the shards' 2 or 4 bytes a token). Records, logs and
metrics add little. What is already on disk counts as written: a finished study needs nothing
more.

``MOE_HARNESS_FREE_BYTES`` stands in for the free space measured (to rehearse the check).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from harness.core.io import free_bytes
from harness.study.spec import Run, Study
from harness.workflow.estimate import checkpoint_bytes

CHECK_KEY = "disk_check"
"""``snakemake --config disk_check=off`` starts a study whose need exceeds the free disk."""
SHORT = f"not enough: the workflow refuses to start without `--config {CHECK_KEY}=off`"
SHARDS = ("train.bin", "validation.bin", "test.bin")


@dataclass(frozen=True)
class DiskNeed:
    checkpoints: int
    data: int
    data_bound: bool
    """True when ``data`` is an upper bound (the data is not prepared yet)."""
    written: int
    """Bytes of these files already on disk (each up to its expected size)."""
    free: int

    @property
    def total(self) -> int:
        return self.checkpoints + self.data

    @property
    def more(self) -> int:
        """What the study still has to write."""
        return max(0, self.total - self.written)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def free_disk(results: Path) -> int:
    """Free bytes where ``results`` lies (``MOE_HARNESS_FREE_BYTES`` when set)."""
    faked = os.environ.get("MOE_HARNESS_FREE_BYTES")
    return int(faked) if faked else free_bytes(results)


def data_bytes(study: Study, results: Path, corpus: int | None) -> tuple[int, bool]:
    """(the token shards' bytes, whether that is an upper bound)."""
    try:
        meta = json.loads((results / "data" / "data.json").read_text())
        return sum(int(s["file_bytes"]) for s in meta["splits"].values()), False
    except (OSError, ValueError, KeyError, TypeError):
        pass
    per_token = 2 if study.data.vocab_size <= 2**16 else 4
    return per_token * (corpus or 0), True


def study_disk(study: Study, runs: list[Run], results: Path, corpus: int | None) -> DiskNeed:
    ckpt = sum(checkpoint_bytes(run) for run in runs)
    data, bound = data_bytes(study, results, corpus)
    # each file counts up to its expected size: what a run still has to write is never offset by
    # another's
    written = min(data, sum(_size(results / "data" / name) for name in SHARDS))
    for run in runs:
        run_dir = results / "runs" / run.run_id
        on_disk = _size(run_dir / "checkpoint.pt") + _size(run_dir / "checkpoint.prev.pt")
        written += min(checkpoint_bytes(run), on_disk)
    return DiskNeed(ckpt, data, bound, written, free_disk(results))


def _bytes(n: float) -> str:
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n / 2**10:.1f} KiB"


def describe(need: DiskNeed, results: Path) -> str:
    """The plan's disk line."""
    data = f"{'at most ' if need.data_bound else ''}{_bytes(need.data)} of token shards"
    text = f"disk: {_bytes(need.total)} ({_bytes(need.checkpoints)} of checkpoints, {data})"
    if need.written:
        text += f", {_bytes(need.more)} of it still to write" if need.more else ", all of it written"
    return text + f"; {_bytes(need.free)} free under {results}"


def refusal(study: Study, need: DiskNeed, results: Path) -> str | None:
    """The one line that stops the workflow when the study needs more disk than is free."""
    if need.more <= need.free:
        return None
    return (
        f"moe-harness: study {study.name} needs {_bytes(need.more)} more disk under {results} "
        f"({_bytes(need.checkpoints)} of checkpoints, {_bytes(need.data)} of token shards) and "
        f"{_bytes(need.free)} is free there: free some space, or start it anyway with "
        f"`--config {CHECK_KEY}=off`"
    )


class DiskRefused(Exception):
    """Raised before any job: the study needs more disk than its results folder has free."""


def guard_disk(study: Study, runs: list[Run], results: Path, setting: object) -> None:
    """The workflow's check before any job (``setting``: ``--config disk_check``; ``off`` skips
    it)."""
    if str(setting).lower() in ("off", "false", "0", "no"):
        return
    if setting is not None and str(setting).lower() not in ("on", "true", "1", "yes"):
        raise ValueError(f"--config {CHECK_KEY}={setting}: the values are 'on' (the default) and 'off'")
    from harness.workflow.stages import corpus_bytes

    prepared = (results / "data" / "data.json").is_file()
    need = study_disk(study, runs, results, None if prepared else corpus_bytes(study))
    message = refusal(study, need, results)
    if message:
        raise DiskRefused(message)
