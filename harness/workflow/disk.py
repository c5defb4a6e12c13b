"""The disk a study needs, against what its results folder has free: shown by ``harness plan``
and checked by the workflow before any job starts.

The need is computed from the study (harness.train.checkpoint says what each file holds):

- every run, once finished, keeps one checkpoint: its float32 weights, 4 bytes a parameter
  (:data:`WEIGHT_BYTES`), and AdamW's two float32 moments too, 8 more, where the study sets
  ``keep_optimizer_state``;
- a run in training holds two whole checkpoints, weights and AdamW state, 24 bytes a parameter
  (``checkpoint.pt`` and ``checkpoint.prev.pt``; while a save writes the new one, the one it
  replaces is the previous): the largest runs still to train, as many as train at once
  (``at_once``: one for ``harness plan``, what the cores or GPUs allow for the workflow), count
  that much for as long as they train;
- the token shards: their size once prepared; before, at most one token per corpus byte at the
  shards' 2 or 4 bytes a token.

Records, logs and metrics add little. What is already on disk counts as written (each file up to
what its run needs): a finished study needs nothing more.

``MOE_HARNESS_FREE_BYTES`` stands in for the free space measured (to rehearse the check).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from harness.core.io import free_bytes
from harness.study.spec import Run, Study
from models.accounting import count_params

CHECK_KEY = "disk_check"
"""``snakemake --config disk_check=off`` starts a study whose need exceeds the free disk."""
SHORT = f"not enough: the workflow refuses to start without `--config {CHECK_KEY}=off`"
SHARDS = ("train.bin", "validation.bin", "test.bin")
CHECKPOINTS = ("checkpoint.pt", "checkpoint.prev.pt")
WEIGHT_BYTES = 4
"""A parameter in float32: what a finished run keeps of it."""
OPTIMIZER_BYTES = 8
"""AdamW's two moments of a parameter, float32: kept by a run in training, and by a finished one
only where the study sets ``keep_optimizer_state``."""
TRAINING_COPIES = 2
"""Whole checkpoints a run in training holds: checkpoint.pt and checkpoint.prev.pt."""


def finished_bytes(study: Study, run: Run) -> int:
    """The checkpoint a finished run keeps."""
    per_param = WEIGHT_BYTES + (OPTIMIZER_BYTES if study.keep_optimizer_state else 0)
    return per_param * count_params(run.model).total


def training_bytes(run: Run) -> int:
    """The checkpoints a run holds while it trains."""
    return TRAINING_COPIES * (WEIGHT_BYTES + OPTIMIZER_BYTES) * count_params(run.model).total


@dataclass(frozen=True)
class DiskNeed:
    checkpoints: int
    """Every run's finished checkpoint, and the extra of the runs in training (``training``)."""
    data: int
    data_bound: bool
    """True when ``data`` is an upper bound (the data is not prepared yet)."""
    written: int
    """Bytes of these files already on disk (each up to its expected size)."""
    free: int
    training: int = 0
    """Of ``checkpoints``: what the largest runs still to train hold beyond their finished
    checkpoint while they train."""

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


def run_needs(study: Study, runs: list[Run], results: Path, at_once: int = 1) -> dict[str, int]:
    """Each run's checkpoint bytes at the study's fullest: the finished checkpoint, and for the
    ``at_once`` runs still to train that hold most while training, their training checkpoints."""
    needs = {run.run_id: finished_bytes(study, run) for run in runs}
    todo = [run for run in runs if not (results / "runs" / run.run_id / "record.json").is_file()]
    todo.sort(key=lambda run: training_bytes(run) - needs[run.run_id], reverse=True)
    for run in todo[: max(1, at_once)]:
        needs[run.run_id] = max(needs[run.run_id], training_bytes(run))
    return needs


def study_disk(study: Study, runs: list[Run], results: Path, corpus: int | None, at_once: int = 1) -> DiskNeed:
    """What the study needs on disk at its fullest (``at_once``: runs that train at the same
    time), and what of it is written."""
    needs = run_needs(study, runs, results, at_once)
    data, bound = data_bytes(study, results, corpus)
    # each file counts up to its expected size: what a run still has to write is never offset by
    # another's
    written = min(data, sum(_size(results / "data" / name) for name in SHARDS))
    for run in runs:
        run_dir = results / "runs" / run.run_id
        written += min(needs[run.run_id], sum(_size(run_dir / name) for name in CHECKPOINTS))
    training = sum(needs.values()) - sum(finished_bytes(study, run) for run in runs)
    return DiskNeed(sum(needs.values()), data, bound, written, free_disk(results), training)


def _bytes(n: float) -> str:
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n / 2**10:.1f} KiB"


def describe(need: DiskNeed, results: Path) -> str:
    """The plan's disk line."""
    data = f"{'at most ' if need.data_bound else ''}{_bytes(need.data)} of token shards"
    training = f", {_bytes(need.training)} of them only while runs train" if need.training else ""
    text = f"disk: {_bytes(need.total)} ({_bytes(need.checkpoints)} of checkpoints{training}, {data})"
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


def guard_disk(study: Study, runs: list[Run], results: Path, setting: object, at_once: int = 1) -> None:
    """The workflow's check before any job (``setting``: ``--config disk_check``; ``off`` skips
    it; ``at_once``: the runs the workflow trains at the same time)."""
    if str(setting).lower() in ("off", "false", "0", "no"):
        return
    if setting is not None and str(setting).lower() not in ("on", "true", "1", "yes"):
        raise ValueError(f"--config {CHECK_KEY}={setting}: the values are 'on' (the default) and 'off'")
    from harness.workflow.stages import corpus_bytes

    prepared = (results / "data" / "data.json").is_file()
    need = study_disk(study, runs, results, None if prepared else corpus_bytes(study), at_once)
    message = refusal(study, need, results)
    if message:
        raise DiskRefused(message)
