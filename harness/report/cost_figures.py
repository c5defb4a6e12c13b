"""The report's figures of measured cost: validation loss against training FLOPs, seconds and
joules, and training memory and throughput against parameters. Time, speed and energy are what a
disturbed host gets wrong, so a point resting on a figure that ``harness.measure.plausibility``
flags is drawn hollow with the mark beside it, and the legend says what that means.

    loss_vs_cost(records, path, disturbed)   # disturbed: runs whose training time is flagged
    cost_scaling(records, measures, path)    # flags read from each measure.json

Styles, axes and legends as in ``harness.report.figures`` (``harness.report.figure_style``).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from harness.analysis.stats import state_bytes, training_memory
from harness.measure.plausibility import MARK, check_measures
from harness.report.figure_style import legend, model_styles, not_enough, save, set_axis, subplots

FLAGGED_STYLE = {"markerfacecolor": "white"}
"""What a point resting on a flagged figure looks like: its model's colour and marker, hollow."""


def flagged_handle(what: str) -> tuple[Any, str]:
    """The legend entry of flagged points: a hollow marker, the mark and ``what`` was flagged."""
    handle = Line2D([], [], marker="o", linestyle="none", color="0.3", **FLAGGED_STYLE)
    return handle, f"hollow, {MARK}: {what} (see the report)"


def _mark(ax, x: float, y: float, style: dict[str, Any]) -> None:
    """A point drawn over in the flagged style, with the mark beside it."""
    ax.plot([x], [y], linestyle="none", zorder=4, **(style | FLAGGED_STYLE))
    ax.annotate(MARK, (x, y), textcoords="offset points", xytext=(6, 4), fontsize=10)


def _mean_over_seeds(records: list[dict[str, Any]], key) -> list[dict[str, Any]]:
    """One record per (model, budget) with ``key``'s value averaged over seeds, and the runs
    averaged (``_runs``)."""
    groups: dict[tuple[str, float], list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        groups[(r["model"], r["budget_flops"])].append(r)
    out = []
    for group in groups.values():
        values = [key(r) for r in group]
        if any(v is None for v in values):
            continue
        out.append(
            group[0]
            | {
                "_x": float(np.mean(values)),
                "_loss": float(np.mean([r["final_val_loss"] for r in group])),
                "_runs": [r["run_id"] for r in group],
            }
        )
    return out


def _device(records: list[dict[str, Any]]) -> str:
    devices = {((r.get("provenance") or {}).get("host") or {}).get("device") for r in records} - {None}
    return ", ".join(sorted(devices)) or "this device"


def draw_loss_vs_cost(records: list[dict[str, Any]], disturbed: set[str] | None = None) -> Figure:
    """Validation loss against training FLOPs, wall-clock seconds and GPU joules, side by side: how
    much of a FLOP gain survives as a time and an energy gain. A line per model across budgets, a
    point per budget (the mean over seeds). ``disturbed``: runs whose training time is flagged
    (``harness.measure.plausibility.check_training``); a point averaging any of them is drawn
    hollow and marked on the seconds and joules panels (the energy was taken over that time)."""
    disturbed = disturbed or set()
    fig, axes = subplots(3, 4.4, 4.4, sharey=True)
    styles = model_styles(records)
    panels = [
        (axes[0], lambda r: r["flops_spent"], "training FLOPs", "no run has its FLOPs spent", False),
        (axes[1], lambda r: r["train_seconds"], "training wall-clock (s)", "no run has its training time", True),
        (
            axes[2],
            lambda r: r.get("gpu_energy_j"),
            "GPU energy (J, NVML)",
            f"no GPU energy was measured on {_device(records)} (no NVML): absent, not zero",
            True,
        ),
    ]
    any_marked = False
    for ax, key, label, why, timed in panels:
        ax.set_title(f"validation loss vs {label}", fontsize=10)
        points = _mean_over_seeds(records, key)
        if not points:
            not_enough(ax, why)
            continue
        by_model: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for p in points:
            by_model[p["model"]].append(p)
        for model, pts in sorted(by_model.items()):
            pts.sort(key=lambda p: p["_x"])
            ax.plot([p["_x"] for p in pts], [p["_loss"] for p in pts], label=model, **styles[model])
            for p in pts:
                if timed and disturbed.intersection(p["_runs"]):
                    _mark(ax, p["_x"], p["_loss"], styles[model])
                    any_marked = True
        set_axis(ax, "x", [p["_x"] for p in points])
        ax.set_xlabel(label)
        ax.grid(alpha=0.3, which="major")
    axes[0].set_ylabel("validation loss (nats/token)")
    axes[0].yaxis.set_tick_params(labelleft=True)
    extra = [flagged_handle("training time flagged as disturbed")] if any_marked else []
    legend(fig, extra, order=list(styles))
    return fig


def loss_vs_cost(records: list[dict[str, Any]], path: Path, disturbed: set[str] | None = None) -> Path:
    return save(draw_loss_vs_cost(records, disturbed), path)


def draw_cost_scaling(records: list[dict[str, Any]], measures: dict[str, dict[str, Any]]) -> Figure:
    """Training memory against total parameters and training throughput against active parameters
    (from ``harness measure``), a point per measured run; throughput with the range of its timing
    windows. A measurement flagged by ``harness.measure.plausibility`` is drawn hollow and marked."""
    fig, axes = subplots(2, 5.2, 4.4)
    titles = ["training memory vs total parameters", "training tokens/s vs active parameters"]
    measured = [r for r in records if r["run_id"] in measures]
    if not measured:
        for ax, title in zip(axes, titles, strict=True):
            ax.set_title(title, fontsize=10)
            not_enough(ax, "no run was measured (`harness measure`)")
        return fig
    styles = model_styles(records)
    device = measures[measured[0]["run_id"]]["device_name"]
    peaks = all(training_memory(measures[r["run_id"]]) is not None for r in measured)
    xs: list[list[float]] = [[], []]
    ys: list[list[float]] = [[], []]
    any_flagged = False
    judged = check_measures(measures, records)
    for r in measured:
        m = measures[r["run_id"]]
        flags = judged[r["run_id"]]
        style = dict(styles[r["model"]])
        mem = (training_memory(m) if peaks else state_bytes(m)) / 2**20
        train = m["train"]
        rate = train["tokens_per_s_median"]
        bars = [[rate - train.get("tokens_per_s_min", rate)], [train.get("tokens_per_s_max", rate) - rate]]
        for i, (ax, x, y, figure) in enumerate(
            [(axes[0], r["params"]["total"], mem, "memory"), (axes[1], r["params"]["active"], rate, "train")]
        ):
            flagged = bool(flags.get(figure))
            any_flagged |= flagged
            s = style | (FLAGGED_STYLE if flagged else {})
            if figure == "train":
                ax.errorbar([x], [y], yerr=bars, linestyle="none", capsize=3, label=r["model"], zorder=3, **s)
            else:
                ax.plot([x], [y], linestyle="none", label=r["model"], zorder=3, **s)
            if flagged:
                ax.annotate(MARK, (x, y), textcoords="offset points", xytext=(6, 4), fontsize=10)
            xs[i].append(x)
            ys[i] += [y] if figure == "memory" else [y - bars[0][0], y + bars[1][0]]
    for i, ax in enumerate(axes):
        set_axis(ax, "x", xs[i])
        set_axis(ax, "y", ys[i])
        ax.set_title(titles[i], fontsize=10)
        ax.grid(alpha=0.3, which="major")
    axes[0].set_xlabel("total parameters")
    axes[0].set_ylabel(f"training peak memory, measured (MiB, {device})" if peaks else "parameters + optimizer (MiB)")
    axes[1].set_xlabel("active parameters")
    axes[1].set_ylabel(f"training tokens/s ({device}; bars: slowest to fastest window)")
    legend(fig, [flagged_handle("flagged measurement")] if any_flagged else [], order=list(styles))
    return fig


def cost_scaling(records: list[dict[str, Any]], measures: dict[str, dict[str, Any]], path: Path) -> Path:
    return save(draw_cost_scaling(records, measures), path)
