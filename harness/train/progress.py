"""Following a training run while it runs: a progress display and TensorBoard event files.

On a terminal the trainer shows a tqdm bar. Anywhere else (a Snakemake job's log, a redirected
stderr) a carriage-return bar is one endless line, so it writes plain lines instead, one every
``LINE_EVERY_S`` seconds and one at each evaluation, that ``tail -f`` follows:

    moe-xs-e8k2_3e12_s0 step 500/1288 (38%) loss 3.412 val 3.510 | 12,345 tok/s | elapsed 1m02s, eta 1m38s

With ``recipe.tensorboard: true`` each metrics.jsonl row is also written as TensorBoard scalars
in ``<run_dir>/tensorboard/`` (offline; ``pip install 'moe-harness[tensorboard]'``), flushed at
each log so a running ``tensorboard --logdir results/<study>/runs`` shows the curves as they grow.
A run that finished before ``recipe.tensorboard`` was switched on gets its events written from its
metrics.jsonl when the workflow starts (:func:`backfill_events`): the same scalars at the same steps.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TextIO

from harness.study.records import read_metrics
from models.config import ConfigError

LINE_EVERY_S = 30.0
"""Seconds between progress lines when stderr is not a terminal (evaluations add one each)."""

TENSORBOARD_DIR = "tensorboard"
"""The folder of TensorBoard event files in a run directory."""

ROUTING_SCALARS = ("load_max_over_mean", "router_entropy", "dropped_fraction")
"""Per MoE layer scalars of a metrics row written to TensorBoard (``routing/layerN/...``)."""


def duration(seconds: float) -> str:
    """``42s``, ``1m02s``, ``2h05m``: a wall-clock span at a glance."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Silent:
    """No progress display (``--quiet``)."""

    def update(self, step: int, row: dict[str, Any] | None = None) -> None:
        pass

    def close(self) -> None:
        pass


class Bar:
    """A tqdm bar on a terminal; the last logged loss is its postfix."""

    def __init__(self, run_id: str, total: int, initial: int, stream: TextIO):
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=initial, desc=run_id, file=stream, mininterval=5)

    def update(self, step: int, row: dict[str, Any] | None = None) -> None:
        self.bar.update(step - self.bar.n)
        if row is not None:
            self.bar.set_postfix(loss=f"{row['loss']:.3f}", refresh=False)

    def close(self) -> None:
        self.bar.close()


class Lines:
    """Plain progress lines, flushed: one every ``every_s`` seconds and one at each evaluation.
    Loss and tokens/s are those of the last logged step. The eta is this process's pace since its
    first step ended: that step holds compilation and warm-up (a minute, where a step takes
    milliseconds), so a pace that counted it would promise days right after it."""

    def __init__(
        self, run_id: str, total: int, initial: int, stream: TextIO, every_s: float = LINE_EVERY_S, clock=time.monotonic
    ):
        self.run_id, self.total, self.initial, self.stream = run_id, total, initial, stream
        self.every_s, self.clock = every_s, clock
        self.step, self.loss, self.val, self.tokens_per_s = initial, None, None, None
        self.start = self.last = clock()
        self.paced_from: tuple[int, float] | None = None  # (step, time) where the first step ended
        self.write("resumed" if initial > 0 else "started")

    def update(self, step: int, row: dict[str, Any] | None = None) -> None:
        self.step = step
        if self.paced_from is None:
            self.paced_from = (step, self.clock())
        if row is not None:
            self.loss, self.tokens_per_s = row["loss"], row.get("tokens_per_s")
            self.val = row.get("val_loss", self.val)
        if (row is not None and "val_loss" in row) or self.clock() - self.last >= self.every_s:
            self.write()

    def line(self, event: str = "") -> str:
        parts = [f"{self.run_id} step {self.step}/{self.total} ({100 * self.step // max(self.total, 1)}%)"]
        if event:
            parts.append(event)
        if self.loss is not None:
            parts.append(f"loss {self.loss:.3f}")
        if self.val is not None:
            parts.append(f"val {self.val:.3f}")
        text = " ".join(parts)
        if self.tokens_per_s is not None:
            text += f" | {self.tokens_per_s:,.0f} tok/s"
        elapsed = self.clock() - self.start
        timing = f"elapsed {duration(elapsed)}"
        if self.paced_from is not None and self.paced_from[0] < self.step < self.total:
            step0, time0 = self.paced_from
            per_step = (self.clock() - time0) / (self.step - step0)
            timing += f", eta {duration(per_step * (self.total - self.step))}"
        return f"{text} | {timing}"

    def write(self, event: str = "") -> None:
        self.stream.write(self.line(event) + "\n")
        self.stream.flush()
        self.last = self.clock()

    def close(self) -> None:
        pass


def open_progress(run_id: str, total: int, initial: int, enabled: bool = True, stream: TextIO | None = None):
    """Silent when not ``enabled``, a tqdm bar when ``stream`` (default stderr) is a terminal,
    plain lines otherwise."""
    stream = sys.stderr if stream is None else stream
    if not enabled:
        return Silent()
    if stream.isatty():
        return Bar(run_id, total, initial, stream)
    return Lines(run_id, total, initial, stream)


def require_tensorboard(source: str | Path | None) -> None:
    """Refuse ``recipe.tensorboard: true`` where the tensorboard package is missing, before any work."""
    try:
        import torch.utils.tensorboard  # noqa: F401  (needs the tensorboard package)
    except ImportError:
        raise ConfigError(
            "recipe.tensorboard",
            "is true but the tensorboard package is not installed here; install it with "
            "`pip install 'moe-harness[tensorboard]'` (or `pip install tensorboard`), or set it to false",
            None if source is None else str(source),
        ) from None


class TensorBoardLog:
    """The scalars of each metrics row as TensorBoard events at the row's step.

    A resumed run passes the step it resumed from: TensorBoard then hides the events an earlier
    process wrote after it (``purge_step``), as metrics.jsonl is cut back to that step, so no step
    shows twice."""

    def __init__(self, folder: Path, resumed_step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(folder), purge_step=resumed_step + 1)

    def write(self, row: dict[str, Any]) -> None:
        step, add = row["step"], self.writer.add_scalar
        for key in ("loss", "aux_loss", "lr", "grad_norm", "tokens_per_s"):
            add(f"train/{key}", row[key], step)
        if "val_loss" in row:
            add("val/loss", row["val_loss"], step)
        # layerN: the Nth MoE layer, as in metrics.jsonl's routing list and the report.
        for n, layer in enumerate(row.get("routing", ())):
            for key in ROUTING_SCALARS:
                add(f"routing/layer{n}/{key}", layer[key], step)
        self.writer.flush()  # a running TensorBoard sees each log as it is written

    def close(self) -> None:
        self.writer.close()


def write_events(run_dir: Path, study: str) -> Path:
    """The TensorBoard events of a finished run, written from its metrics.jsonl into a temporary
    folder that then takes the place of ``<run_dir>/tensorboard``: never half a folder."""
    rows = read_metrics(run_dir / "metrics.jsonl", study)
    folder, tmp = run_dir / TENSORBOARD_DIR, run_dir / f".{TENSORBOARD_DIR}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    log = TensorBoardLog(tmp, 0)
    try:
        for row in rows:
            log.write(row)
    finally:
        log.close()
    tmp.rename(folder)
    return folder


def backfill_events(runs: Iterable, results: Path, study: str, write: bool, stream: TextIO | None = None) -> list[str]:
    """Runs with ``recipe.tensorboard`` that finished without TensorBoard events (it was switched on
    afterwards: a bookkeeping field, so nothing trains again) get them from their metrics logs;
    ``write`` False (a dry run) says which would. Returns the runs."""
    stream = sys.stderr if stream is None else stream
    missing = [
        run.run_id
        for run in runs
        if run.recipe.tensorboard
        and (results / "runs" / run.run_id / "record.json").is_file()
        and not (results / "runs" / run.run_id / TENSORBOARD_DIR).exists()
    ]
    if missing and write:
        require_tensorboard(None)
    for run_id in missing:
        said = f"moe-harness: {run_id} finished before recipe.tensorboard was on: "
        if write:
            folder = write_events(results / "runs" / run_id, study)
            stream.write(said + f"its events written to {folder} from its metrics.jsonl\n")
        else:
            stream.write(said + "a real run writes its events from its metrics.jsonl\n")
    return missing
