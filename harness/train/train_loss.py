"""The training loss a record carries: the mean of the logged batch losses over the final tenth
of training, not one batch (a batch of a few thousand tokens spreads by tenths of a nat). Written
by the trainer; the report's loss curves (harness.analysis.curves) smooth the same logged losses."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

FINAL_FRACTION = 0.1
"""The final part of training whose logged batch losses are averaged into the training loss."""
SMOOTHING = "mean of the logged batch losses over the final tenth of training steps"


def train_loss_smoothed(rows: list[dict[str, Any]]) -> float | None:
    """The mean logged training loss over the final FINAL_FRACTION of the steps (at least the last
    logged step); None without a logged loss."""
    logged = [r for r in rows if r.get("loss") is not None and math.isfinite(r["loss"])]
    if not logged:
        return None
    last = logged[-1]["step"]
    tail = [r["loss"] for r in logged if r["step"] > last * (1 - FINAL_FRACTION)] or [logged[-1]["loss"]]
    return float(np.mean(tail))


def smoothed_train_loss(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The record's fields: ``train_loss_smoothed`` and how it is smoothed."""
    return {"train_loss_smoothed": train_loss_smoothed(rows), "train_loss_smoothing": SMOOTHING}
