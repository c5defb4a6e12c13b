"""The report's figures (matplotlib, PNG): for each, a ``draw_*`` function that returns the
matplotlib Figure and a function that saves it and returns its path. The figures of measured cost
(time, speed, energy, memory), which mark what a disturbed host measured, are in
``harness.report.cost_figures``.

Every model has its own style, the same in every figure, and one legend per figure names the
models (``harness.report.figure_style``: dense sizes in a sequential blue palette, each MoE model its own
colour). Parameter, FLOP, time and energy axes are logarithmic where the values span more than a
factor of three, with ticks that do not collide; a linear axis over values a few percent apart
is widened to at least ±5% of their centre, so a small spread does not fill the axis. A panel
with nothing meaningful to draw shows "not enough data: <reason>" and no axes, so the report
keeps the same figures; a figure the report lists as not applicable to the study shows only
"not applicable to this study: <reason>". Titles say what is plotted, never what it is supposed
to show.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter

from harness.analysis.curves import CURVE_WINDOW, Band
from harness.analysis.isoflop import MIN_SIZES, seed_adjusted
from harness.analysis.stats import arm_label, task_metric
from harness.report.figure_style import (
    NOT_APPLICABLE,
    compact,
    legend,
    model_styles,
    not_enough,
    save,
    set_axis,
    subplots,
    suptitle,
)
from harness.study.spec import budget_label


def _budgets_text(budgets) -> str:
    return ", ".join(budget_label(b) for b in sorted(set(budgets))) + " FLOPs"


def budget_sizes(budgets) -> dict[float, float]:
    """Marker size per budget, a model's own colour and marker kept: the largest budget's points
    7 points across, each smaller budget's 0.7 times the next larger (at least 3)."""
    return {b: max(7 * 0.7**i, 3.0) for i, b in enumerate(sorted(set(budgets), reverse=True))}


def _budget_handles(sizes: dict[float, float]) -> list[tuple[Any, str]]:
    """A legend entry per budget (largest first), drawn at its marker size."""
    return [
        (Line2D([], [], marker="o", linestyle="none", color="0.3", markersize=size), f"{budget_label(b)} FLOPs")
        for b, size in sorted(sizes.items(), reverse=True)
    ]


def _budget_styles(records: list[dict[str, Any]]) -> dict[float, str]:
    styles = ["-", "--", ":", "-."]
    return {b: styles[i % len(styles)] for i, b in enumerate(sorted({r["budget_flops"] for r in records}))}


# ---------------------------------------------------------------------------------------------
# Loss curves


def _curve_ylim(bands: list[Band]) -> tuple[float, float] | None:
    """From the lowest point to the highest after the first fifth of training (the first steps'
    loss, near ln V, would squash the rest)."""
    lows, highs = [], []
    for b in bands:
        for s in (b.train, b.val):
            if s is None:
                continue
            lows.append(float(s.low.min()))
            late = s.tokens >= 0.2 * s.tokens.max()
            highs.append(float(s.high[late].max() if late.any() else s.high.max()))
    if not lows:
        return None
    lo, hi = min(lows), max(highs)
    pad = max(0.05 * (hi - lo), 0.02)
    return lo - pad, hi + pad


def draw_loss_curves(records: list[dict[str, Any]], bands: list[Band]) -> Figure:
    """Training and validation loss over training, against tokens and against FLOPs (columns), one
    row per budget with every model on one axis: a line per model (mean over its seeds) and a band
    from the lowest to the highest seed; training solid (trailing mean of the logged batch losses),
    validation dashed with a dot per evaluation."""
    budgets = sorted({b.budget_flops for b in bands}) or [None]
    fig, axes = plt.subplots(len(budgets), 2, figsize=(11.8, 3.6 * len(budgets)), squeeze=False, layout="constrained")
    if not bands:
        for ax in axes[0]:
            ax.set_title("loss vs training tokens and FLOPs", fontsize=10)
            not_enough(ax, "no run has a metrics.jsonl")
        return fig
    styles = model_styles(records)
    ylim = _curve_ylim(bands)
    for row, budget in zip(axes, budgets, strict=True):
        here = [b for b in bands if b.budget_flops == budget]
        for ax, x, what in [(row[0], "tokens", "training tokens"), (row[1], "flops", "training FLOPs")]:
            for b in here:
                colour = styles[b.model]["color"]
                for s, dashes, label in [(b.train, "-", b.model), (b.val, "--", f"_validation {b.model}")]:
                    if s is None:
                        continue
                    xs = getattr(s, x)
                    marker = "o" if dashes == "--" else None
                    ax.plot(xs, s.mean, color=colour, linestyle=dashes, marker=marker, markersize=3, label=label)
                    ax.fill_between(xs, s.low, s.high, color=colour, alpha=0.18, linewidth=0)
            ax.set_title(f"loss vs {what} at {budget_label(budget)} FLOPs", fontsize=10)
            ax.set_xlabel(what)
            ax.xaxis.set_major_formatter(FuncFormatter(compact))
            ax.grid(alpha=0.3)
            if ylim:
                ax.set_ylim(*ylim)
        row[0].set_ylabel("loss (nats/token)")
    seeds = sorted({len(b.seeds) for b in bands})
    suptitle(
        fig,
        f"solid: training loss (trailing mean over {CURVE_WINDOW:.0%} of the logged steps); dashed: validation loss; "
        f"line: mean over seeds; band: min to max over seeds ({'/'.join(map(str, seeds))} per model)",
    )
    extra = [
        (Line2D([], [], color="0.3"), "training"),
        (Line2D([], [], color="0.3", linestyle="--", marker="o", markersize=3), "validation"),
        (Patch(color="0.3", alpha=0.18), "min to max over seeds"),
    ]
    legend(fig, extra, order=list(styles))
    return fig


def loss_curves(records: list[dict[str, Any]], bands: list[Band], path: Path) -> Path:
    return save(draw_loss_curves(records, bands), path)


# ---------------------------------------------------------------------------------------------
# Loss against parameters, IsoFLOP, loss against cost


def _adjusted_points(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One point per (model, budget): its loss seed-adjusted by the two-way fit model + seed over the
    budget's runs (``harness.analysis.isoflop.seed_adjusted``), with the standard error over its
    seeds (None with one seed)."""
    by_budget: dict[float, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        if r.get("final_val_loss") is not None and math.isfinite(r["final_val_loss"]):
            by_budget[r["budget_flops"]].append(r)
    out = []
    for runs in by_budget.values():
        adjusted, fitted = seed_adjusted(runs)
        for model, mu in adjusted.items():
            idx = [i for i, r in enumerate(runs) if r["model"] == model]
            shifted = [runs[i]["final_val_loss"] - fitted[i] + float(mu) for i in idx]  # residuals about mu
            se = float(np.std(shifted, ddof=1) / math.sqrt(len(idx))) if len(idx) > 1 else None
            out.append(runs[idx[0]] | {"_loss": float(mu), "_se": se, "_seeds": len(idx)})
    return out


def draw_loss_vs_params(records: list[dict[str, Any]]) -> Figure:
    """Validation loss against active and against total non-embedding parameters: a point per model
    and budget, seed-adjusted, with a standard-error bar over its seeds; a one-seed point hollow.
    No line joins sizes: along one budget a larger model sees fewer tokens (an IsoFLOP slice)."""
    fig, axes = subplots(2, 5.2, 4.4, sharey=True)
    styles, budgets = model_styles(records), sorted({r["budget_flops"] for r in records})
    sizes = budget_sizes(budgets)
    points = sorted(_adjusted_points(records), key=lambda p: (p["model"], p["budget_flops"]))
    one_seed = False
    for ax, key, what in [(axes[0], "active_non_embedding", "active"), (axes[1], "total_non_embedding", "total")]:
        for p in points:
            style = dict(styles[p["model"]]) | {"markersize": sizes[p["budget_flops"]]}
            if p["_se"] is None:
                style["markerfacecolor"], one_seed = "white", True
            x = p["params"][key]
            ax.errorbar(
                [x],
                [p["_loss"]],
                yerr=None if p["_se"] is None else [[p["_se"]], [p["_se"]]],
                linestyle="none",
                label=p["model"],
                zorder=3,
                capsize=2,
                **style,
            )
        set_axis(ax, "x", [p["params"][key] for p in points])
        ax.set_xlabel(f"{what} non-embedding parameters")
        ax.set_title(f"seed-adjusted validation loss vs {what} non-embedding parameters", fontsize=10)
        ax.grid(alpha=0.3, which="major")
    axes[0].set_ylabel("validation loss (nats/token)")
    smaller = "; smaller markers: smaller budgets" if len(budgets) > 1 else ""
    fig.suptitle(
        f"one point per model and budget ({_budgets_text(budgets)}){smaller}; bars: standard error over seeds",
        fontsize=9,
    )
    extra = _budget_handles(sizes) if len(budgets) > 1 else []
    if one_seed:
        extra.append((Line2D([], [], marker="o", markerfacecolor="white", color="0.3", linestyle="none"), "one seed"))
    legend(fig, extra, order=list(styles))
    return fig


def loss_vs_params(records: list[dict[str, Any]], path: Path) -> Path:
    return save(draw_loss_vs_params(records), path)


def _most_sizes(records: list[dict[str, Any]]) -> tuple[int, str]:
    sizes: dict[tuple[str, float], set] = defaultdict(set)
    for r in records:
        sizes[(arm_label(r), r["budget_flops"])].add(r["params"]["active_non_embedding"])
    (arm, budget), n = max(sizes.items(), key=lambda kv: len(kv[1]))
    return len(n), f"{arm} at {budget_label(budget)} FLOPs"


def _isoflop_points(ax, records: list[dict[str, Any]], styles: dict[str, dict[str, Any]]) -> bool:
    """Every model's seed-adjusted loss at each budget, at its active non-embedding parameters, the
    smaller budgets' points smaller (``budget_sizes``); True when any point is drawn."""
    points = sorted(_adjusted_points(records), key=lambda p: (p["model"], p["budget_flops"]))
    sizes = budget_sizes(p["budget_flops"] for p in points)
    for p in points:
        size = sizes[p["budget_flops"]]
        ax.plot(
            [p["params"]["active_non_embedding"]],
            [p["_loss"]],
            linestyle="none",
            markersize=size,
            label=p["model"],
            zorder=3,
            **styles[p["model"]],
        )
    return bool(points)


def _parabola(ax, c: dict[str, Any], colour, linestyle: str) -> None:
    """One IsoFLOP parabola over its sampled sizes, its minimum (a star) and N_opt interval."""
    n = np.asarray(c["n"], float)
    if c.get("coefficients") is not None:
        grid = np.geomspace(n.min(), n.max(), 100)  # the sampled sizes only: no extrapolation
        ax.plot(
            grid,
            np.polyval(c["coefficients"], np.log(grid)),
            color=colour,
            linestyle=linestyle,
            label=f"parabola: {c['arm']}, {budget_label(c['budget_flops'])} FLOPs",
        )
    if c.get("n_opt") is None or not c.get("bracketed"):
        return
    ax.plot(
        [c["n_opt"]],
        [c["loss_opt"]],
        marker="*",
        markersize=14,
        color=colour,
        markeredgecolor="k",
        linestyle="none",
        zorder=4,
        label="parabola minimum",
    )
    if c.get("n_opt_ci") is not None:
        lo, hi = (min(max(v, n.min() / 2), n.max() * 2) for v in c["n_opt_ci"])
        ax.plot(
            [lo, hi],
            [c["loss_opt"]] * 2,
            color=colour,
            linewidth=2.5,
            alpha=0.5,
            zorder=2,
            label="N_opt 95% interval (clipped to 2x the sizes)",
        )


def draw_isoflop(
    records: list[dict[str, Any]], curves: list[dict[str, Any]], not_applicable: str | None = None
) -> Figure:
    """Chinchilla approach 2: seed-adjusted validation loss against active non-embedding parameters,
    every model at every budget (MoE models too, at their active parameters), with a parabola in
    log N per (arm, budget) that has MIN_SIZES or more sizes, drawn only over the sampled sizes, its
    minimum (a star, where it lies within them) and the N_opt interval. Where the report lists the
    IsoFLOP figure as not applicable (``not_applicable``: why), only that is shown."""
    fig, (ax,) = subplots(1, 6.8, 4.4)
    title = "IsoFLOP: validation loss vs active non-embedding parameters"
    if not_applicable:
        ax.set_title(title, fontsize=10)
        not_enough(ax, not_applicable, NOT_APPLICABLE)
        return fig
    styles, budgets = model_styles(records), _budget_styles(records)
    if not _isoflop_points(ax, records, styles):
        ax.set_title(title, fontsize=10)
        not_enough(ax, "no run has a finite validation loss")
        return fig
    for c in curves:
        n = np.asarray(c["n"], float)
        colour = styles[c["models"][int(np.argmax(n))]]["color"]  # the largest size's
        _parabola(ax, c, colour, budgets[c["budget_flops"]])
    set_axis(ax, "x", [r["params"]["active_non_embedding"] for r in records])
    ax.set_xlabel("active non-embedding parameters (MoE: active, not total)")
    ax.set_ylabel("seed-adjusted validation loss (nats/token)")
    ax.set_title(f"validation loss vs active non-embedding parameters at {_budgets_text(budgets)}", fontsize=10)
    ax.grid(alpha=0.3, which="major")
    notes = []
    if len(budgets) > 1:
        notes.append("smaller markers: smaller budgets")
        extra = _budget_handles(budget_sizes(budgets))
    else:
        extra = []
    if not curves:
        most, where = _most_sizes(records)
        notes.append(
            f"no parabola: an IsoFLOP curve needs {MIN_SIZES} or more model sizes at one budget; "
            f"the most this study has is {most} ({where})"
        )
    if notes:
        suptitle(fig, "; ".join(notes))
    legend(fig, extra, order=list(styles))
    return fig


def isoflop_figure(
    records: list[dict[str, Any]], curves: list[dict[str, Any]], path: Path, not_applicable: str | None = None
) -> Path:
    return save(draw_isoflop(records, curves, not_applicable), path)


# ---------------------------------------------------------------------------------------------
# Routing, specialisation, downstream


def draw_routing_health(
    series: dict[str, dict[str, np.ndarray]], experts: dict[str, int], top_k: dict[str, int] | None = None
) -> Figure:
    """Per MoE run (columns), each layer over training: the normalised load imbalance
    (max/mean - 1) / (E/k - 1) on one 0-1 scale for every run, with the collapse threshold
    (``harness.analysis.routing_health``), then load coefficient of variation, router entropy /
    log E and z-loss; experts without tokens in a step and the dropped fraction when any step has
    them. A run with E <= k (or unknown k) has no imbalance to draw and says so in its panel."""
    from harness.analysis.routing_health import COLLAPSE_IMBALANCE, normalised_imbalance

    top_k = top_k or {}
    runs = [run for run, s in series.items() if s]
    if not runs:
        fig, (ax,) = subplots(1, 6.0, 3.0)
        ax.set_title("router statistics per layer over training", fontsize=10)
        not_enough(ax, "no MoE run: no routing to show")
        return fig
    panels = [
        ("imbalance", "normalised imbalance\n(max/mean - 1) / (E/k - 1)"),
        ("load_cv", "load CV (std / mean tokens per expert)"),
        ("entropy", "router entropy / log E"),
        ("z_loss", "router z-loss"),
    ]
    if any((series[r]["tokens_per_expert"] == 0).any() for r in runs):
        panels.append(("idle", "experts with no tokens in the step"))
    if any((series[r]["dropped_fraction"] > 0).any() for r in runs):
        panels.append(("dropped_fraction", "dropped fraction"))
    fig, axes = plt.subplots(
        len(panels),
        len(runs),
        figsize=(3.6 * len(runs) + 1.6, 2.4 * len(panels)),
        squeeze=False,
        sharex="col",
        layout="constrained",
    )
    for j, run in enumerate(runs):
        s = series[run]
        k = top_k.get(run)
        derived = {
            "entropy": s["router_entropy"] / math.log(max(experts[run], 2)),
            "idle": (s["tokens_per_expert"] == 0).sum(-1),
            "imbalance": None if k is None else normalised_imbalance(s["max_over_mean"], experts[run], k),
        }
        layers = s["load_cv"].shape[1]
        colours = plt.get_cmap("plasma")(np.linspace(0.1, 0.85, layers))
        for i, (key, label) in enumerate(panels):
            ax = axes[i, j]
            values = derived[key] if key in derived else s.get(key)
            if values is not None:
                for layer in range(layers):
                    ax.plot(s["step"], values[:, layer], color=colours[layer], label=f"layer {layer}")
            ax.grid(alpha=0.3)
            if j == 0:
                ax.set_ylabel(label, fontsize=8)
            if key == "entropy":
                ax.set_ylim(0, 1.05)
            if key == "imbalance":
                ax.set_ylim(0, 1)
                ax.axhline(COLLAPSE_IMBALANCE, color="black", linestyle="--", linewidth=0.8)
                ax.text(
                    0.02,
                    COLLAPSE_IMBALANCE + 0.02,
                    f"collapse threshold {COLLAPSE_IMBALANCE:g}",
                    transform=ax.get_yaxis_transform(),
                    fontsize=7,
                )
                if values is None:
                    why = "k unknown" if k is None else "E <= k: every expert gets every token"
                    ax.text(0.5, 0.25, f"not drawn: {why}", ha="center", transform=ax.transAxes, fontsize=7)
        axes[0, j].set_title(run, fontsize=8)
        axes[-1, j].set_xlabel("training step")
    fig.suptitle("router statistics per layer over training", fontsize=10)
    legend(fig)
    return fig


def routing_health_figure(
    series: dict[str, dict[str, np.ndarray]], experts: dict[str, int], path: Path, top_k: dict[str, int] | None = None
) -> Path:
    return save(draw_routing_health(series, experts, top_k), path)


def draw_specialisation(run: str | None, layer: dict[str, Any] | None) -> Figure:
    """Lift (expert's share of a token category over the category's overall share) per expert
    and category, for one layer of one MoE run: 1 means no preference."""
    fig, (ax,) = subplots(1, 5.6, 4.2)
    if layer is None:
        ax.set_title("token-category lift per expert", fontsize=10)
        not_enough(ax, "no routing analysis of an MoE run (`harness routing`)")
        return fig
    lift = np.asarray(layer["lift"], float)
    categories = layer["categories"]
    im = ax.imshow(np.log2(np.clip(lift, 1e-3, None)), cmap="RdBu_r", vmin=-2, vmax=2, aspect="auto")
    ax.set_xticks(range(len(categories)), categories, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(lift.shape[0]), [f"expert {e}" for e in range(lift.shape[0])], fontsize=8)
    ax.set_title(f"{run}, layer {layer['layer']}: token-category lift per expert (log2)", fontsize=9)
    fig.colorbar(im, ax=ax, label="log2(expert share / overall share)")
    return fig


def specialisation_figure(run: str | None, layer: dict[str, Any] | None, path: Path) -> Path:
    return save(draw_specialisation(run, layer), path)


def draw_downstream(records: list[dict[str, Any]], evals: dict[str, dict[str, Any]], tasks: dict[str, str]) -> Figure:
    """Each task's primary metric against validation loss, one point per run, a style per model
    (the view of Abnar et al. 2025)."""
    fig, axes = subplots(max(1, len(tasks)), 4.2, 3.8)
    if not tasks:
        axes[0].set_title("downstream metric vs validation loss", fontsize=10)
        not_enough(axes[0], "no lm-eval results (`harness evaluate`)")
        return fig
    styles = model_styles(records)
    for ax, (task, metric) in zip(axes, tasks.items(), strict=True):
        ax.set_title(f"{task}: {metric} vs validation loss", fontsize=10)
        drawn = 0
        for r in records:
            value = task_metric(evals.get(r["run_id"]), task, metric)
            if value is None:
                continue
            ax.errorbar(
                r["final_val_loss"],
                value,
                yerr=task_metric(evals.get(r["run_id"]), task, f"{metric}_stderr"),
                linestyle="none",
                capsize=2,
                label=r["model"],
                zorder=3,
                **styles[r["model"]],
            )
            drawn += 1
        if not drawn:
            not_enough(ax, f"no run has {task} {metric}")
            continue
        chance = next(iter(evals.values())).get("local_tasks", {}).get("tasks", {}).get(task, {}).get("chance_accuracy")
        if chance is not None and metric.startswith("acc"):
            ax.axhline(chance, color="grey", linestyle="--", linewidth=1, label="chance")
        ax.set_xlabel("validation loss (nats/token)")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    legend(fig, order=list(styles))
    return fig


def downstream_figure(
    records: list[dict[str, Any]], evals: dict[str, dict[str, Any]], tasks: dict[str, str], path: Path
) -> Path:
    return save(draw_downstream(records, evals, tasks), path)
