"""The report's figures (matplotlib, PNG): one function per figure, each returning its path.

Arms are told apart the same way everywhere: dense in black squares, each MoE family (E, k) in
its own colour (by E) with a marker by k. Parameter, FLOP, time and energy axes are
logarithmic where the values span more than a factor of three. A figure whose data the study
does not have says so on its canvas rather than being left out, so the report always has the
same figures.
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

from harness.analysis.stats import arm_label, state_bytes, task_metric, training_memory
from harness.io import atomic_write
from harness.study import budget_label

MARKER_BY_K = {1: "^", 2: "o", 4: "D"}


def _families(records: list[dict[str, Any]]) -> list[tuple[int, int]]:
    return sorted({(r["experts"], r["top_k"]) for r in records if r["arm"] == "moe"})


def arm_style(rec: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, Any]:
    if rec["arm"] == "dense":
        return {"color": "black", "marker": "s"}
    experts = sorted({e for e, _ in _families(records)})
    cmap = plt.get_cmap("viridis")
    i = experts.index(rec["experts"])
    return {
        "color": cmap(0.12 + 0.75 * i / max(1, len(experts) - 1)),
        "marker": MARKER_BY_K.get(rec["top_k"], "P"),
    }


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=120))
    plt.close(fig)
    return path


def _note(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True, transform=ax.transAxes, fontsize=9, color="dimgray")
    ax.tick_params(left=False, bottom=False, labelleft=False, labelbottom=False)  # per axes, unlike set_*ticks


def _scale(ax, axis: str, values) -> None:
    """Logarithmic where the values span more than a factor of 3, else linear (a log axis over a
    few percent only shows unreadable ticks)."""
    v = np.asarray([x for x in values if x and x > 0], float)
    log = v.size > 0 and v.max() / v.min() > 3
    (ax.set_xscale if axis == "x" else ax.set_yscale)("log" if log else "linear")


def _budget_styles(records: list[dict[str, Any]]) -> dict[float, str]:
    styles = ["-", "--", ":", "-."]
    return {b: styles[i % len(styles)] for i, b in enumerate(sorted({r["budget_flops"] for r in records}))}


def _mean_over_seeds(records: list[dict[str, Any]], key) -> list[dict[str, Any]]:
    """One record per (model, budget) with ``key``'s value averaged over seeds."""
    groups: dict[tuple[str, float], list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        groups[(r["model"], r["budget_flops"])].append(r)
    out = []
    for group in groups.values():
        values = [key(r) for r in group]
        if any(v is None for v in values):
            continue
        out.append(
            group[0] | {"_x": float(np.mean(values)), "_loss": float(np.mean([r["final_val_loss"] for r in group]))}
        )
    return out


def loss_vs_params(records: list[dict[str, Any]], dense_fits: dict[float, Any], path: Path) -> Path:
    """Validation loss against active and against total non-embedding parameters, one line per
    arm and budget, with the dense power-law fit of each budget where there is one."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    budgets = _budget_styles(records)
    for ax, key, title in [
        (axes[0], "active_non_embedding", "active"),
        (axes[1], "total_non_embedding", "total"),
    ]:
        seen = set()
        points = _mean_over_seeds(records, lambda r, key=key: r["params"][key])
        lines: dict[tuple[str, float], list[dict[str, Any]]] = defaultdict(list)
        for p in points:
            lines[(arm_label(p), p["budget_flops"])].append(p)
        for (arm, budget), pts in sorted(lines.items()):
            pts.sort(key=lambda p: p["_x"])
            style = arm_style(pts[0], records)
            label = arm if arm not in seen else None
            seen.add(arm)
            ax.plot([p["_x"] for p in pts], [p["_loss"] for p in pts], linestyle=budgets[budget], label=label, **style)
        if key == "active_non_embedding":
            for budget, fit in dense_fits.items():
                if fit is None:
                    continue
                lo, hi = fit.x_min, fit.x_max
                n = np.geomspace(lo / 1.25, hi * 1.25, 100)  # the fitted range, not an extrapolation
                ax.plot(n, fit.predict(n), color="grey", linewidth=0.8, linestyle=budgets[budget], alpha=0.7)
        _scale(ax, "x", [p["_x"] for p in points])
        ax.set_xlabel(f"{title} non-embedding parameters")
        ax.set_title(f"loss vs {title} parameters")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("validation loss (nats/token)")
    handles, labels = axes[0].get_legend_handles_labels()
    for budget, ls in budgets.items():
        handles.append(plt.Line2D([], [], color="grey", linestyle=ls))
        labels.append(f"budget {budget_label(budget)} FLOPs")
    axes[1].legend(handles, labels, fontsize=8, loc="best")
    return _save(fig, path)


def isoflop_figure(records: list[dict[str, Any]], curves: list[dict[str, Any]], path: Path) -> Path:
    """Chinchilla approach 2: loss against active parameters at each budget, a parabola in
    log N per (arm, budget) with three or more sizes, its minimum marked."""
    fig, ax = plt.subplots(figsize=(6.5, 4.4))
    if not curves:
        _note(ax, "IsoFLOP curves need three or more model sizes at one budget;\nthis study has fewer.")
        ax.set_title("IsoFLOP")
        return _save(fig, path)
    budgets = _budget_styles(records)
    for c in curves:
        rec = next(r for r in records if arm_label(r) == c["arm"])
        style = arm_style(rec, records)
        n, loss = np.asarray(c["n"], float), np.asarray(c["loss"], float)
        ax.scatter(n, loss, color=style["color"], marker=style["marker"], zorder=3)
        if c.get("coefficients") is not None:
            grid = np.geomspace(n.min() / 1.5, n.max() * 1.5, 100)
            ax.plot(
                grid,
                np.polyval(c["coefficients"], np.log(grid)),
                color=style["color"],
                linestyle=budgets[c["budget_flops"]],
                label=f"{c['arm']}, {budget_label(c['budget_flops'])} FLOPs",
            )
        if c.get("n_opt") is not None:
            ax.scatter([c["n_opt"]], [c["loss_opt"]], color=style["color"], marker="*", s=160, edgecolor="k", zorder=4)
    _scale(ax, "x", [n for c in curves for n in c["n"]])
    ax.set_xlabel("active non-embedding parameters")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("IsoFLOP curves (star: fitted optimum)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return _save(fig, path)


def loss_vs_cost(records: list[dict[str, Any]], path: Path) -> Path:
    """Validation loss against training FLOPs, wall-clock seconds and GPU joules, side by side:
    how much of a FLOP gain survives as a time and an energy gain."""
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2), sharey=True)
    panels = [
        (axes[0], lambda r: r["flops_spent"], "training FLOPs"),
        (axes[1], lambda r: r["train_seconds"], "training wall-clock (s)"),
        (axes[2], lambda r: r.get("gpu_energy_j"), "GPU energy (J, NVML)"),
    ]
    for ax, key, label in panels:
        points = _mean_over_seeds(records, key)
        if not points:
            _note(ax, f"{label}: not measured on this device\n(no NVML: energy is absent, not zero)")
            ax.set_xlabel(label)
            continue
        by_model: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for p in points:
            by_model[p["model"]].append(p)
        seen = set()
        for _model, pts in sorted(by_model.items()):
            pts.sort(key=lambda p: p["_x"])
            arm = arm_label(pts[0])
            ax.plot(
                [p["_x"] for p in pts],
                [p["_loss"] for p in pts],
                label=None if arm in seen else arm,
                **arm_style(pts[0], records),
            )
            seen.add(arm)
        _scale(ax, "x", [p["_x"] for p in points])
        ax.set_xlabel(label)
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("validation loss (nats/token)")
    axes[0].legend(fontsize=8)
    return _save(fig, path)


def cost_scaling(records: list[dict[str, Any]], measures: dict[str, dict[str, Any]], path: Path) -> Path:
    """Parameter + optimizer memory against total parameters, training throughput against
    active parameters (from ``harness measure``)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    measured = [r for r in records if r["run_id"] in measures]
    if not measured:
        for ax in axes:
            _note(ax, "no run was measured (harness measure)")
        return _save(fig, path)
    seen: set[str] = set()
    device = measures[measured[0]["run_id"]]["device_name"]
    peaks = all(training_memory(measures[r["run_id"]]) is not None for r in measured)
    for r in measured:
        m = measures[r["run_id"]]
        arm = arm_label(r)
        style = arm_style(r, records)
        label = None if arm in seen else arm
        seen.add(arm)
        mem = (training_memory(m) if peaks else state_bytes(m)) / 2**20
        axes[0].scatter(r["params"]["total"], mem, label=label, **style)
        axes[1].scatter(r["params"]["active"], m["train"]["tokens_per_s_median"], label=label, **style)
    axes[0].set_xlabel("total parameters")
    axes[0].set_ylabel(f"training peak memory, measured (MiB, {device})" if peaks else "parameters + optimizer (MiB)")
    axes[0].set_title("memory follows total parameters")
    axes[1].set_xlabel("active parameters")
    axes[1].set_ylabel(f"training tokens/s ({device})")
    axes[1].set_title("throughput follows active parameters")
    for ax in axes:
        for axis, collection in (("x", ax.collections), ("y", ax.collections)):
            values = [xy[0 if axis == "x" else 1] for c in collection for xy in c.get_offsets()]
            _scale(ax, axis, values)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    return _save(fig, path)


def routing_health_figure(series: dict[str, dict[str, np.ndarray]], experts: dict[str, int], path: Path) -> Path:
    """Per MoE run (columns), each layer over training: load coefficient of variation, busiest
    expert over the mean, router entropy / log E and z-loss; experts without tokens in a step
    and the dropped fraction when any step has them."""
    runs = [run for run, s in series.items() if s]
    if not runs:
        fig, ax = plt.subplots(figsize=(6, 3))
        _note(ax, "no MoE run: no routing to show")
        return _save(fig, path)
    panels = [
        ("load_cv", "load CV (std / mean tokens per expert)"),
        ("max_over_mean", "busiest expert / mean load"),
        ("entropy", "router entropy / log E"),
        ("z_loss", "router z-loss"),
    ]
    if any((series[r]["tokens_per_expert"] == 0).any() for r in runs):
        panels.append(("idle", "experts with no tokens in the step"))
    if any((series[r]["dropped_fraction"] > 0).any() for r in runs):
        panels.append(("dropped_fraction", "dropped fraction"))
    fig, axes = plt.subplots(
        len(panels), len(runs), figsize=(3.6 * len(runs), 2.4 * len(panels)), squeeze=False, sharex="col"
    )
    for j, run in enumerate(runs):
        s = series[run]
        derived = {
            "entropy": s["router_entropy"] / math.log(max(experts[run], 2)),
            "idle": (s["tokens_per_expert"] == 0).sum(-1),
        }
        layers = s["load_cv"].shape[1]
        colours = plt.get_cmap("plasma")(np.linspace(0.1, 0.85, layers))
        for i, (key, label) in enumerate(panels):
            values = derived.get(key, s.get(key))
            for layer in range(layers):
                axes[i, j].plot(s["step"], values[:, layer], color=colours[layer], label=f"layer {layer}")
            axes[i, j].grid(alpha=0.3)
            if j == 0:
                axes[i, j].set_ylabel(label, fontsize=8)
            if key == "entropy":
                axes[i, j].set_ylim(0, 1.05)
        axes[0, j].set_title(run, fontsize=8)
        axes[-1, j].set_xlabel("training step")
    axes[0, 0].legend(fontsize=7)
    return _save(fig, path)


def specialisation_figure(run: str | None, layer: dict[str, Any] | None, path: Path) -> Path:
    """Lift (expert's share of a token category over the category's overall share) per expert
    and category, for one layer of one MoE run: 1 means no preference."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    if layer is None:
        _note(ax, "no routing analysis of an MoE run")
        return _save(fig, path)
    lift = np.asarray(layer["lift"], float)
    categories = layer["categories"]
    im = ax.imshow(np.log2(np.clip(lift, 1e-3, None)), cmap="RdBu_r", vmin=-2, vmax=2, aspect="auto")
    ax.set_xticks(range(len(categories)), categories, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(lift.shape[0]), [f"expert {e}" for e in range(lift.shape[0])], fontsize=8)
    ax.set_title(f"{run}, layer {layer['layer']}: token-category lift (log2)", fontsize=9)
    fig.colorbar(im, ax=ax, label="log2(expert share / overall share)")
    return _save(fig, path)


def downstream_figure(
    records: list[dict[str, Any]], evals: dict[str, dict[str, Any]], tasks: dict[str, str], path: Path
) -> Path:
    """Each task's primary metric against validation loss, one point per run, coloured by arm
    (the view of Abnar et al. 2025)."""
    fig, axes = plt.subplots(1, max(1, len(tasks)), figsize=(4.4 * max(1, len(tasks)), 3.8), squeeze=False)
    if not tasks:
        _note(axes[0, 0], "no lm-eval results")
        return _save(fig, path)
    for ax, (task, metric) in zip(axes[0], tasks.items(), strict=True):
        seen = set()
        for r in records:
            value = task_metric(evals.get(r["run_id"]), task, metric)
            if value is None:
                continue
            arm = arm_label(r)
            ax.errorbar(
                r["final_val_loss"],
                value,
                yerr=task_metric(evals.get(r["run_id"]), task, f"{metric}_stderr"),
                linestyle="none",
                capsize=2,
                label=None if arm in seen else arm,
                zorder=3,
                **arm_style(r, records),
            )
            seen.add(arm)
        chance = next(iter(evals.values())).get("local_tasks", {}).get("tasks", {}).get(task, {}).get("chance_accuracy")
        if chance is not None and metric.startswith("acc"):
            ax.axhline(chance, color="grey", linestyle="--", linewidth=1, label="chance")
        ax.set_xlabel("validation loss (nats/token)")
        ax.set_ylabel(metric)
        ax.set_title(task)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)
