"""Loss curves from the runs' metrics.jsonl: a smoothed training loss, and per (model, budget) the
training and validation loss over training with their spread over seeds.

    train_loss_smoothed(rows)                # mean logged batch loss over the final tenth of training
    bands = loss_bands(records, metrics)     # one Band per (model, budget), seeds aligned by step

A logged ``loss`` is the cross-entropy of one training batch (auxiliary and z-losses excluded), at
the weights before that step's update: one batch of a few thousand tokens spreads by tenths of a
nat, so the report never shows it alone. The smoothed value is the mean over the logged steps of
the final tenth of training, where the learning rate has decayed and the weights change little.
The curves smooth the same logged losses with a trailing mean over CURVE_WINDOW of the run's
logged steps. Seeds of one model and budget log the same steps (the log interval follows from the
step count); a band spans the minimum to the maximum over them, the line is their mean.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np

CURVE_WINDOW = 0.05
"""The trailing mean of a training-loss curve covers this fraction of the run's logged steps."""


def trailing_mean(values: np.ndarray, window: int) -> np.ndarray:
    """Mean of each value and the ``window - 1`` before it (fewer at the start)."""
    sums = np.cumsum(np.insert(np.asarray(values, float), 0, 0.0))
    idx = np.arange(1, len(values) + 1)
    start = np.maximum(idx - window, 0)
    return (sums[idx] - sums[start]) / (idx - start)


@dataclass(frozen=True)
class Series:
    """One quantity over training for one (model, budget): x values and the mean, minimum and
    maximum over ``seeds`` at each."""

    tokens: np.ndarray
    flops: np.ndarray
    mean: np.ndarray
    low: np.ndarray
    high: np.ndarray


@dataclass(frozen=True)
class Band:
    model: str
    budget_flops: float
    seeds: list[int]
    train: Series | None
    val: Series | None


def _series(per_seed: list[dict[int, dict[str, Any]]], value) -> Series | None:
    """Steps every seed logged, with ``value(row)`` per seed at each (None rows dropped)."""
    steps = sorted(set.intersection(*(set(s) for s in per_seed)))
    rows = [[seed[step] for seed in per_seed] for step in steps]
    keep = [i for i, r in enumerate(rows) if all(value(x) is not None for x in r)]
    if not keep:
        return None
    v = np.array([[value(x) for x in rows[i]] for i in keep], float)  # (steps, seeds)
    first = [rows[i][0] for i in keep]
    return Series(
        tokens=np.array([x["tokens"] for x in first], float),
        flops=np.array([x["flops"] for x in first], float),
        mean=v.mean(1),
        low=v.min(1),
        high=v.max(1),
    )


def loss_bands(records: list[dict[str, Any]], metrics: dict[str, list[dict[str, Any]]]) -> list[Band]:
    """One Band per (model, budget) over the runs whose metrics are given: the training loss smoothed
    per seed (trailing mean over CURVE_WINDOW of its logged steps) and the validation loss."""
    groups: dict[tuple[str, float], list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        if metrics.get(r["run_id"]):
            groups[(r["model"], r["budget_flops"])].append(r)
    bands = []
    for (model, budget), runs in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        per_seed = []
        for r in sorted(runs, key=lambda r: r["seed"]):
            rows = [m for m in metrics[r["run_id"]] if m.get("loss") is not None]
            window = max(1, round(CURVE_WINDOW * len(rows)))
            smooth = trailing_mean(np.array([m["loss"] for m in rows], float), window)
            per_seed.append({m["step"]: m | {"_train": float(s)} for m, s in zip(rows, smooth, strict=True)})
        bands.append(
            Band(
                model=model,
                budget_flops=budget,
                seeds=sorted(r["seed"] for r in runs),
                train=_series(per_seed, lambda m: m["_train"]),
                val=_series(per_seed, lambda m: m.get("val_loss")),
            )
        )
    return bands
