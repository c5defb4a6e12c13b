"""Compute multipliers against the dense frontier the joint law implies (compare an MoE
with the dense *frontier* at equal FLOPs, not with one fixed dense size).

    rows = frontier_multipliers(records, law)                   # FLOPs
    (wall-clock and energy: ``harness.analysis.frontier_cost``, from these rows)

The dense frontier at compute C is min over N of the dense law at D = C / fpt(N) (Hoffmann et al.
2022's compute-optimal frontier), fpt(N) the training FLOPs per token of a dense model of N active
non-embedding parameters, fitted from the dense records (``dense_flops_per_token``). For an MoE
(model, budget) the dense compute C* whose frontier loss equals the MoE's seed-adjusted loss
(its runs' mean less their fitted seed effects) gives multiplier = C* / C, the MoE's FLOPs.
Each bootstrap draw of the law refits the frontier and redraws the MoE's adjusted loss, so the
interval carries both. ``extrapolated``: C* outside the study's budgets, or the frontier's
optimal N at C* outside the dense sizes.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import numpy as np

from harness.analysis.fits import interval, interval_mc_error
from harness.analysis.law import LawFit
from harness.analysis.stats import arm_label, finite_runs

FRONTIER = "dense frontier (joint law)"
GRID_N, GRID_C = 500, 240  # points of the size and compute grids
SPAN_N, SPAN_C = 100.0, 1000.0  # the grids reach this factor beyond the sampled sizes and budgets


def flops_per_token(rec: dict[str, Any]) -> float:
    """A run's training FLOPs per token under its convention, else FLOPs spent / tokens."""
    fpt = (rec.get("flops_per_token") or {}).get(rec.get("flop_convention"))
    return float(fpt) if fpt else float(rec["flops_spent"]) / float(rec["tokens"])


def dense_flops_per_token(records: list[dict[str, Any]]) -> tuple[float, float, str]:
    """fpt(N) = intercept + slope * N over the dense models (least squares); with one dense size,
    proportional to N through it (6N-like). Returns (intercept, slope, how)."""
    sizes: dict[float, list[float]] = defaultdict(list)
    for r in records:
        if r["arm"] == "dense":
            sizes[float(r["params"]["active_non_embedding"])].append(flops_per_token(r))
    n = np.array(sorted(sizes))
    fpt = np.array([np.mean(sizes[k]) for k in n])
    if len(n) >= 2:
        slope, intercept = np.polyfit(n, fpt, 1)
        if slope > 0:
            return float(intercept), float(slope), f"linear in N through {len(n)} dense sizes"
    return 0.0, float(fpt[0] / n[0]), "proportional to N through the one dense size (6N-like)"


def frontier(law: LawFit, ln_c: np.ndarray, fpt: tuple[float, float], p: np.ndarray | None = None):
    """(loss, ln N_opt) of the dense frontier at each ln C, minimised over a log grid of N."""
    n_all = law.data.n_ref * np.exp(law.data.ln_na[law.data.routed == 0])
    n = np.geomspace(n_all.min() / SPAN_N, n_all.max() * SPAN_N, GRID_N)
    tokens = np.exp(ln_c)[:, None] / (fpt[0] + fpt[1] * n)[None, :]
    loss = law.dense_loss(n[None, :], tokens, p)
    best = np.argmin(loss, axis=1)
    return loss[np.arange(len(ln_c)), best], np.log(n[best])


def _invert(loss_c: np.ndarray, ln_c: np.ndarray, target: float) -> float:
    """ln C at which the (falling) frontier reaches ``target``; +inf below its reach, -inf above."""
    if target <= loss_c[-1]:
        return math.inf
    if target >= loss_c[0]:
        return -math.inf
    return float(np.interp(-target, -loss_c, ln_c))


def _grid(law: LawFit, records: list[dict[str, Any]]) -> np.ndarray:
    budgets = [r["flops_spent"] for r in records]
    return np.linspace(math.log(min(budgets) / SPAN_C), math.log(max(budgets) * SPAN_C), GRID_C)


def frontier_multipliers(
    records: list[dict[str, Any]], law: LawFit | None, law_reason: str = ""
) -> list[dict[str, Any]]:
    """Per MoE (model, budget): multiplier = C* / C against the dense frontier (see the module)."""
    groups: dict[tuple[str, float], list[int]] = defaultdict(list)
    runs = law.data.runs if law is not None else finite_runs(records)
    for i, r in enumerate(runs):
        if r["arm"] == "moe":
            groups[(r["model"], r["budget_flops"])].append(i)
    rows = []
    fpt = dense_flops_per_token(records) if law is not None else None
    ln_c = _grid(law, records) if law is not None else None
    curves = None
    if law is not None:
        curves = [frontier(law, ln_c, fpt[:2])] + [frontier(law, ln_c, fpt[:2], p) for p in law.draws]
    for (model, budget), index in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        first = runs[index[0]]
        row = {
            "model": model,
            "arm": arm_label(first),
            "budget_flops": budget,
            "seeds": len(index),
            "dense_model": FRONTIER,
            "method": None,
            "multiplier": None,
            "multiplier_ci": None,
            "multiplier_mc": None,
            "extrapolated": None,
            "dense_compute": None,
            "dense_n_opt": None,
            "loss_adjusted": None,
            "reason": "no joint law (see above)" if law is None else "",
            "interval_note": "",
            "study": first.get("study"),
            "moe_runs": [runs[i] for i in index],
            "draws": None,
        }
        rows.append(row)
        if law is None:
            continue
        _fill(row, law, index, curves, ln_c, fpt, records)
    return rows


def _fill(row, law, index, curves, ln_c, fpt, records) -> None:
    cost = float(np.mean([law.data.runs[i]["flops_spent"] for i in index]))
    target = law.adjusted(index)
    loss_c, ln_n = curves[0]
    at = _invert(loss_c, ln_c, target)
    row.update(loss_adjusted=target, method=f"joint law; dense FLOPs/token {fpt[2]}")
    row["moe_runs"] = [law.data.runs[i] for i in index]
    if not math.isfinite(at):
        row["reason"] = (
            "the MoE's loss is below every dense frontier loss the law reaches"
            if at > 0
            else "the MoE's loss is above the dense frontier at every compute considered"
        )
        return
    n_opt = float(np.exp(np.interp(at, ln_c, ln_n)))
    dense = [r for r in records if r["arm"] == "dense"]
    sizes = [r["params"]["active_non_embedding"] for r in dense]
    budgets = [r["flops_spent"] for r in records]
    c_star = math.exp(at)
    row.update(
        dense_compute=c_star,
        dense_n_opt=n_opt,
        multiplier=c_star / cost,
        extrapolated=not (min(budgets) <= c_star <= max(budgets) and min(sizes) <= n_opt <= max(sizes)),
    )
    if not len(law.draws):
        row["interval_note"] = "no interval: the variance components need 2 or more degrees of freedom"
        return
    found = np.array(
        [_invert(curves[b + 1][0], ln_c, law.adjusted(index, draw=b)) for b in range(len(law.draws))]
    )  # a draw beyond the grid counts as unbounded
    row["multiplier_ci"] = interval(np.exp(found) / cost)
    row["multiplier_mc"] = interval_mc_error(np.exp(found) / cost)
    # Per draw: ln C* and the frontier's ln N_opt there (the wall-clock multipliers read them).
    ln_n_draws = [np.interp(a, ln_c, curves[b + 1][1]) if math.isfinite(a) else math.nan for b, a in enumerate(found)]
    row["draws"] = {"ln_c": found, "ln_n": np.array(ln_n_draws)}
    row["interval_note"] = f"95% bootstrap interval over {len(found)} refits of the law with seed effects"
