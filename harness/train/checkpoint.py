"""Checkpoints that prove they are whole: ``checkpoint.pt`` with its SHA-256 beside it.

Every save writes ``checkpoint.pt`` atomically and then ``checkpoint.pt.sha256`` (the format of
``sha256sum``, so ``sha256sum -c checkpoint.pt.sha256`` checks it by hand). While a run trains,
the checkpoint a save replaces is kept, when it verifies, as ``checkpoint.prev.pt`` with its own
checksum. Every load checks the checksum first: a truncated, overwritten or unverifiable
checkpoint is refused as :class:`~harness.core.errors.DamagedFile`, and training offers the choice
of the previous checkpoint (``harness train --from-previous``) or a fresh start (``--restart``).

A finished run keeps what the later steps read: its final ``checkpoint.pt`` holds the weights
and the run's counters, and the AdamW state (:data:`OPTIMIZER`) only where the study sets
``keep_optimizer_state``; the previous checkpoint, which only a run in training resumes from, is
removed once ``record.json`` is written (:func:`discard_previous`). Every reader takes the weights
(``state["model"]``), so a finished run's checkpoint and a full one written before are read alike.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from harness.core.errors import DamagedFile, DiskFull, HarnessError, MissingStep
from harness.core.io import atomic_write, free_bytes, sha256_file, write_text

NAME = "checkpoint.pt"
PREVIOUS = "checkpoint.prev.pt"
OPTIMIZER = "optimizer"
"""The key of the AdamW state in a checkpoint: absent from a finished run's (harness.train.loop)."""


def checksum_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _pending_path(path: Path) -> Path:
    """The new checkpoint's checksum, written before the checkpoint replaces the old one: a save
    killed between the two renames leaves a checkpoint that this checksum (not the old) matches."""
    return path.with_name(path.name + ".sha256.new")


def state_bytes(obj: Any) -> int:
    """Bytes of the tensors in a (nested) state: about what torch.save writes."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(state_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(state_bytes(v) for v in obj)
    return 0


def recorded_digest(path: Path) -> str | None:
    """The SHA-256 recorded beside ``path`` in its checksum file (None where there is none)."""
    try:
        words = checksum_path(path).read_text(errors="replace").split()
    except OSError:
        return None
    return words[0] if words else None


def problem(path: Path) -> str | None:
    """Why ``path`` cannot be trusted, or None when its checksum matches."""
    if not path.is_file():
        return "it does not exist"
    sums, pending = checksum_path(path), _pending_path(path)
    actual = sha256_file(path)
    if pending.is_file():  # a save was interrupted between its two renames: finish or undo it
        if pending.read_text(errors="replace").split()[:1] == [actual]:
            os.replace(pending, sums)
        else:
            pending.unlink()
    if not sums.is_file():
        return f"{sums.name} is missing, so it cannot be verified (an interrupted save)"
    if recorded_digest(path) != actual:
        size = path.stat().st_size
        return f"its SHA-256 does not match {sums.name} ({size:,} bytes on disk: truncated or overwritten)"
    return None


def _keep_previous(path: Path) -> None:
    """The checkpoint about to be replaced, with its checksum, becomes checkpoint.prev.pt. It is
    not hashed here: loading checkpoint.prev.pt verifies it, as every load does."""
    if not (path.is_file() and checksum_path(path).is_file()):
        return
    prev = path.with_name(PREVIOUS)
    link = prev.with_name(f".{prev.name}.link.tmp")
    link.unlink(missing_ok=True)
    try:
        os.link(path, link)  # no copy: the old inode survives the replace below
    except OSError:
        shutil.copyfile(path, link)
    os.replace(link, prev)
    write_text(checksum_path(prev), f"{recorded_digest(path)}  {prev.name}\n")


def save_checkpoint(state: dict[str, Any], path: Path) -> str:
    """Write ``state`` to ``path`` with its checksum, keeping the one it replaces; the digest."""
    need = state_bytes(state)
    _keep_previous(path)
    digest: dict[str, str] = {}

    def write(tmp: Path) -> None:
        try:
            torch.save(state, tmp)
        except RuntimeError:  # torch reports a failed write as a RuntimeError, not OSError
            if free_bytes(tmp.parent) < need:
                raise DiskFull(path, need, free_bytes(tmp.parent)) from None
            raise
        digest["sha256"] = sha256_file(tmp)

    def write_then_record(tmp: Path) -> None:
        write(tmp)
        write_text(_pending_path(path), f"{digest['sha256']}  {path.name}\n")

    atomic_write(path, write_then_record, need_bytes=need)
    os.replace(_pending_path(path), checksum_path(path))
    return digest["sha256"]


def gone(path: Path, train: str) -> str | None:
    """When the final ``checkpoint.pt`` of a finished run is absent (deleted to save disk, say):
    what its record says and how to get it back (``train``: the run's train command). None when it
    is there, or the run has not finished (no record.json beside it)."""
    record = path.with_name("record.json")
    if path.name != NAME or path.is_file() or not record.is_file():
        return None
    try:
        r = json.loads(record.read_bytes())
        said = f" (step {r['steps']}, val loss {r['final_val_loss']:.4f})"
    except (ValueError, KeyError, TypeError):
        r, said = {}, ""
    came = (r.get("reused_from") or {}).get("run_dir") if isinstance(r, dict) else None
    if came:  # a run reused from another study (harness.workflow.reuse): its weights may be there still
        study = train.removeprefix("harness train ").rsplit(" --run ", 1)[0]
        return (
            f"{path} is gone, though {record.name} says the run finished{said}; it was reused from {came}: "
            f"`python -m harness.reuse {study} --run {path.parent.name}` links it again from there, or "
            f"`{train} --restart` trains the run here"
        )
    return (
        f"{path} is gone, though {record.name} says the run finished{said}; the weights exist nowhere else: "
        f"`{train} --restart` trains the run again to get them back"
    )


def load_checkpoint(path: Path, made_by: str, remedy: str = "", map_location: Any = "cpu") -> dict[str, Any]:
    """The verified state in ``path``; :class:`MissingStep` naming ``made_by`` when it is absent
    (said as gone when the run's record says it finished), :class:`DamagedFile` (with ``remedy``)
    when it is damaged."""
    if (why := gone(path, made_by)) is not None:
        raise HarnessError(why)
    if not path.is_file():
        raise MissingStep(path, made_by)
    why = problem(path)
    if why is not None:
        raise DamagedFile(path, why, remedy)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # a file that verifies but torch cannot read: written by something else
        raise DamagedFile(path, f"not a checkpoint torch can read ({type(e).__name__}: {e})", remedy) from None
    if not isinstance(state, dict) or "model" not in state:
        raise DamagedFile(path, "not a moe-harness checkpoint (no 'model' state)", remedy)
    return state


def discard_current(run_dir: Path) -> None:
    """Remove checkpoint.pt and its checksums, keeping checkpoint.prev.pt (``--from-previous``)."""
    for p in (run_dir / NAME, checksum_path(run_dir / NAME), _pending_path(run_dir / NAME)):
        p.unlink(missing_ok=True)


def discard_previous(run_dir: Path) -> None:
    """Remove checkpoint.prev.pt and its checksums: once a run has finished, nothing resumes from it."""
    for p in (run_dir / PREVIOUS, checksum_path(run_dir / PREVIOUS), _pending_path(run_dir / PREVIOUS)):
        p.unlink(missing_ok=True)


def discard(run_dir: Path) -> None:
    """Remove a run's checkpoints and their checksums (``harness train --restart``)."""
    discard_current(run_dir)
    discard_previous(run_dir)
