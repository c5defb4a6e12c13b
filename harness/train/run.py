"""Train one run to its FLOP budget, once: the entry point of ``harness train``.

    harness train tiny --run moe-xs-e8k2_3e12_s0

A run finished as asked is not trained again (:class:`AlreadyTrained`); the run's folder is
locked while it trains (harness.train.run_lock); harness.train.loop holds the loop itself. Once
record.json is written, the previous checkpoint goes: a finished run keeps its final checkpoint
alone (harness.train.checkpoint).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from harness.core.cpu_heap import keep_freed_memory
from harness.core.errors import HarnessError
from harness.core.io import read_json, write_json
from harness.core.remedy import run_file
from harness.study.records import read_data_meta, read_record
from harness.study.runs import identity_changes, recorded_identity, run_identity
from harness.study.spec import Run, Study
from harness.train import checkpoint, parallel, run_lock
from harness.train.loop import Trainer, pick_device
from harness.train.parallel import ALONE, Layout


class AlreadyTrained(Exception):
    """The run finished with this configuration and data: nothing to do."""

    def __init__(self, record: dict[str, Any]):
        super().__init__(record["run_id"])
        self.record = record


def finished_changes(
    out_dir: Path, run: Run, data_meta: dict[str, Any] | None, study: str = "STUDY", study_name: str | None = None
) -> list[str] | None:
    """None when the run has no record; else how its record differs from ``run`` on this data
    (empty: finished as asked). ``study``: as the user names it, for a damaged record's remedy;
    ``study_name``: the study whose results hold it (None: not checked; harness.study.records)."""
    path = out_dir / "record.json"
    if not path.exists():
        return None
    record = read_record(path, study_name, run_file(path, study))
    changes = identity_changes(recorded_identity(record), run_identity(run))
    if data_meta is not None and record.get("data_fingerprint") != data_meta["fingerprint"]:
        changes.append(f"data fingerprint {record.get('data_fingerprint')} -> {data_meta['fingerprint']}")
    return changes


def train(
    run: Run,
    study: Study,
    data_dir: Path,
    out_dir: Path,
    threads: int | None = None,
    stop_after: int | None = None,
    progress: bool = True,
    resume: str = "auto",
    layout: Layout | None = None,
) -> dict[str, Any]:
    """Train ``run`` (resuming from its checkpoint: ``resume`` auto, previous, restart or changed)
    and write its record.json last. A run already finished as asked raises :class:`AlreadyTrained`;
    one finished with another configuration is refused unless ``resume`` says to start over.
    ``layout``: this process's place among torchrun's (harness.train.parallel; default alone).
    The run's folder is locked for the whole of it: a second training of the run is refused
    (harness.train.run_lock)."""
    layout = layout or ALONE
    _check_finished(run, study, data_dir, out_dir, resume)  # a finished run: its folder untouched
    with run_lock.training(out_dir, run.run_id, layout.main):
        _check_finished(run, study, data_dir, out_dir, resume)  # again, now that no one else writes
        return _train(run, study, data_dir, out_dir, threads, stop_after, progress, resume, layout)


def _check_finished(run: Run, study: Study, data_dir: Path, out_dir: Path, resume: str) -> None:
    """AlreadyTrained when the run finished as asked; refused when it finished otherwise and
    ``resume`` does not say to start over."""
    if resume not in ("auto", "changed"):
        return
    meta = read_data_meta(data_dir / "data.json", f"harness data {study.path}", study.name)
    changes = finished_changes(out_dir, run, meta, study.path, study.name)
    if changes == []:
        raise AlreadyTrained(read_json(out_dir / "record.json"))
    if changes and resume != "changed":
        raise HarnessError(
            f"{out_dir / 'record.json'}: {run.run_id} finished with another configuration "
            f"({'; '.join(changes)}); `harness train {study.path} --run {run.run_id} --restart` trains it again"
        )


def _train(run, study, data_dir, out_dir, threads, stop_after, progress, resume, layout) -> dict[str, Any]:
    if threads:
        torch.set_num_threads(threads)
    device = pick_device(study)
    if device.type == "cpu":  # a step's freed activations serve the next step (harness.core.cpu_heap)
        keep_freed_memory()
    with parallel.process_group(layout, device) as device:
        trainer = Trainer(run, study, data_dir, out_dir, progress, resume, layout, device)
        trainer.fit(stop_after)
        record = trainer.record()
        if trainer.layout.writes:
            write_json(out_dir / "record.json", record)
            # Finished: nothing resumes from the previous checkpoint now (harness.train.checkpoint).
            checkpoint.discard_previous(out_dir)
        trainer.layout.barrier()
    return record
