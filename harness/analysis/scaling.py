"""Scaling analysis of a study: dense fits, dense-equivalent sizes, compute multipliers, IsoFLOP optima.

    a = analyse(records)                         # everything below, as the report uses it
    rows = dense_equivalents(records)            # per (MoE model, budget): dense N of equal loss at equal FLOPs
    rows = dense_equivalents(records, "tokens")  # ... at equal tokens: Clark et al.'s effective parameters
    rows = compute_multiplier(records)           # per (MoE model, budget): dense FLOPs / MoE FLOPs
    iso = isoflop(records)                       # per (budget, arm): parabola optimum N*; N* ∝ C^a
    rows = krajewski_check(records)              # the published fine-grained MoE law, inside its range only

Everything here is a pure function of run records (the dicts of ``record.json``); the curve fits
and their noise model are in ``harness.analysis.fits``. Rows carry a ``reason`` ('' when complete) instead
of raising for too few points.

Losses are final validation losses in nats per token. Seeds of one (model, budget) are averaged
before fitting, so each model size is one point, weighted by its seed count in the noise model.
The seed noise is pooled over the study's replicated runs (``harness.analysis.stats.seed_noise``) and
enters every interval, on the dense side and on the MoE's own loss. Parameter counts default to
the **non-embedding active** parameters (``params["active_non_embedding"]``), the N of Kaplan et
al. 2020 ("Scaling Laws for Neural Language Models"); the functions take ``param_key``.

The analyses:

- ``dense_equivalents(at="flops")``: at one FLOP budget, the dense size whose fitted loss equals
  the MoE's. This is *not* the effective parameter count of Clark et al. 2022: along a fixed
  budget a larger dense model sees fewer tokens, so the curve is an IsoFLOP profile, not L(N)
  at fixed data.
- ``dense_equivalents(at="tokens")``: Clark et al. 2022 ("Unified Scaling Laws for Routed
  Language Models"): dense L(N) fitted at the MoE's number of training *tokens*, inverted at the
  MoE's loss.
- ``compute_multiplier``: the dense compute that would reach an MoE's loss over the compute the
  MoE spent, the FLOP counterpart of the "7x pre-training speed-up" of Fedus et al. 2022
  ("Switch Transformers"), which was measured in wall-clock time (``cost_key="train_seconds"``).
- ``isoflop``: Chinchilla's Approach 2 (Hoffmann et al. 2022): per budget a parabola in log N
  through the losses of several sizes, its vertex N*, and N* ∝ C^a across budgets.
- ``krajewski_check``: the fitted laws of Krajewski et al. 2024 ("Scaling Laws for Fine-Grained
  Mixture of Experts"), the MoE row and the dense row, only where a run lies inside the range
  they were fitted on.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import numpy as np

from harness.analysis.fits import (
    MIN_POINTS,
    Noise,
    PowerLawFit,
    fit_parabola,
    fit_power_law,
    interval,
    invert,
    sigma_draws,
)
from harness.analysis.krajewski import krajewski_check
from harness.analysis.stats import arm_label, finite_runs, seed_noise

PARAM_KEY = "active_non_embedding"
TOTAL_KEY = {"active_non_embedding": "total_non_embedding", "active": "total"}
MATCH_TOLERANCE = 0.05  # a dense model is the MoE's match when their active counts differ by at most 5%
TOKEN_TOLERANCE = 0.05  # runs within 5% of a token count count as trained on that many tokens (Clark)


@dataclass(frozen=True)
class IsoflopAnalysis:
    """``curves``: one row per (budget, arm); ``scaling``: one row per arm, N_opt ∝ C^exponent."""

    curves: list[dict[str, Any]]
    scaling: list[dict[str, Any]]


# ---------------------------------------------------------------------------------------------
# Record helpers


def _by_model(runs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in runs:
        out[r["model"]].append(r)
    return out


def _mean(runs: list[dict[str, Any]], key: str) -> float:
    return float(np.mean([r[key] for r in runs]))


def _mean_params(runs: list[dict[str, Any]], key: str) -> float:
    return float(np.mean([r["params"][key] for r in runs]))


def _family_key(rec: dict[str, Any]) -> tuple[int, int, int]:
    """Sort order of arms: dense first, then MoE families by (experts, top_k)."""
    return (0, 0, 0) if rec["arm"] == "dense" else (1, rec["experts"], rec["top_k"])


def _ratio(num: float | None, den: float | None) -> float | None:
    return None if num is None or not den else num / den


def _ratio_ci(ci: tuple[float, float] | None, den: float | None) -> tuple[float, float] | None:
    return None if ci is None or not den else (ci[0] / den, ci[1] / den)


def _dense_points(dense: list[dict[str, Any]], param_key: str) -> tuple[list[float], list[float], list[int]]:
    """(N, loss, seeds) of each dense model among ``dense``, seeds averaged."""
    groups = _by_model(dense).values()
    return (
        [_mean_params(g, param_key) for g in groups],
        [_mean(g, "final_val_loss") for g in groups],
        [len(g) for g in groups],
    )


def _fit_dense(
    dense: list[dict[str, Any]], param_key: str, noise: Noise | None, bootstrap: int, seed: int
) -> tuple[PowerLawFit | None, str, list[float], list[float]]:
    n, loss, seeds = _dense_points(dense, param_key)
    if not n:
        return None, "no dense run to fit", n, loss
    fit, reason = fit_power_law(n, loss, seeds=seeds, noise=noise, bootstrap=bootstrap, seed=seed)
    return fit, reason, n, loss


def _moe_groups(runs: list[dict[str, Any]]) -> list[tuple[tuple[str, float], list[dict[str, Any]]]]:
    """(MoE model, budget) -> its runs, ordered by budget, family and name."""
    groups: dict[tuple[str, float], list[dict[str, Any]]] = defaultdict(list)
    for r in runs:
        if r["arm"] == "moe":
            groups[(r["model"], r["budget_flops"])].append(r)
    return sorted(groups.items(), key=lambda kv: (kv[0][1], _family_key(kv[1][0]), kv[0][0]))


def _equivalent_row(
    group: list[dict[str, Any]], fit: PowerLawFit | None, fit_reason: str, param_key: str, total_key: str | None
) -> dict[str, Any]:
    """One MoE (model, budget) inverted on a dense fit: N_eq, its ratios to active and total N."""
    first = group[0]
    n_active = float(first["params"][param_key])
    n_total = float(first["params"][total_key]) if total_key else None
    moe_loss = _mean(group, "final_val_loss")
    row: dict[str, Any] = {
        "model": first["model"],
        "arm": arm_label(first),
        "budget_flops": first["budget_flops"],
        "seeds": len(group),
        "loss": moe_loss,
        "tokens": _mean(group, "tokens"),
        "n_active": n_active,
        "n_total": n_total,
        "param_key": param_key,
        "dense_fit": None if fit is None else {"E": fit.E, "A": fit.A, "alpha": fit.alpha, "rmse": fit.rmse},
        "dense_equivalent_n": None,
        "dense_equivalent_n_ci": None,
        "ratio_active": None,
        "ratio_active_ci": None,
        "ratio_total": None,
        "ratio_total_ci": None,
        "extrapolated": None,
        "reason": fit_reason,
        "interval_note": "" if fit is None else fit.interval_reason,
    }
    if fit is None:
        return row
    inv, row["reason"] = invert(fit, moe_loss, loss_seeds=len(group))
    if inv is not None:
        row.update(
            dense_equivalent_n=inv.x,
            dense_equivalent_n_ci=inv.ci,
            ratio_active=_ratio(inv.x, n_active),
            ratio_active_ci=_ratio_ci(inv.ci, n_active),
            ratio_total=_ratio(inv.x, n_total),
            ratio_total_ci=_ratio_ci(inv.ci, n_total),
            extrapolated=inv.extrapolated,
        )
    return row


# ---------------------------------------------------------------------------------------------
# Dense-equivalent size at equal FLOPs, and Clark et al.'s effective parameter count


def _same_budget(group: list[dict[str, Any]], dense: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in dense if r["budget_flops"] == group[0]["budget_flops"]]


def _same_tokens(group: list[dict[str, Any]], dense: list[dict[str, Any]]) -> list[dict[str, Any]]:
    tokens = _mean(group, "tokens")
    return [r for r in dense if abs(r["tokens"] - tokens) <= TOKEN_TOLERANCE * tokens]


def dense_equivalents(
    records: list[dict[str, Any]],
    at: str = "flops",
    param_key: str = PARAM_KEY,
    total_key: str | None = None,
    bootstrap: int = 1000,
    seed: int = 0,
    noise: Noise | None = None,
    fits: dict[float, tuple[PowerLawFit | None, str]] | None = None,
) -> list[dict[str, Any]]:
    """Per (MoE model, budget): the dense size whose fitted loss equals the MoE's (seed means;
    ``noise`` defaults to ``seed_noise``), with ``ratio_active`` = N_eq / the MoE's active N and
    ``ratio_total`` = N_eq / its total N. The dense runs fitted are:

    - ``at="flops"``: those of the MoE's FLOP budget (``fits`` per budget may be given). Along a
      budget a larger model sees fewer tokens: loss against N is the IsoFLOP profile, which turns
      up past the compute-optimal size. ``dense_monotone`` is False when the dense losses at the
      budget do not fall with N. This is an iso-FLOP quantity, not Clark et al.'s.
    - ``at="tokens"``: those trained on the MoE's number of tokens (within ``TOKEN_TOLERANCE``,
      any budget): the effective parameter count of Clark et al. 2022. A FLOP-budgeted study has
      such runs only where dense sizes were given budgets in proportion to their size; elsewhere
      the row's ``reason`` says what is missing.
    """
    select = {"flops": _same_budget, "tokens": _same_tokens}[at]
    total_key = total_key or TOTAL_KEY.get(param_key)
    runs = finite_runs(records)
    noise = noise if noise is not None else seed_noise(runs)
    dense_runs = [r for r in runs if r["arm"] == "dense"]
    rows = []
    for (_, budget), group in _moe_groups(runs):
        dense = select(group, dense_runs)
        if at == "flops" and fits is not None and budget in fits:
            (fit, reason), (n, loss, _) = fits[budget], _dense_points(dense, param_key)
        else:
            fit, reason, n, loss = _fit_dense(dense, param_key, noise, bootstrap, seed)
        if at == "tokens" and fit is None and len(set(n)) < MIN_POINTS:
            reason = (
                f"needs dense runs of {MIN_POINTS} or more sizes trained on the MoE's {_mean(group, 'tokens'):,.0f} "
                f"tokens (within {TOKEN_TOLERANCE:.0%}; here {len(set(n))})"
            )
        row = _equivalent_row(group, fit, reason, param_key, total_key)
        by_size = [y for _, y in sorted(zip(n, loss, strict=True))]
        row.update(dense_sizes=len(set(n)), dense_monotone=all(b < a for a, b in pairwise(by_size)))
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# Compute multiplier (Fedus et al. 2022)


def matched_dense_model(
    moe: dict[str, Any], records: list[dict[str, Any]], param_key: str = PARAM_KEY
) -> tuple[str, int, bool] | None:
    """The dense model whose ``param_key`` count is closest to the MoE's, and whether within 5%.

    Returns ``(model name, its count, within_tolerance)`` or None when there is no dense run.
    """
    sizes = {r["model"]: r["params"][param_key] for r in records if r["arm"] == "dense"}
    if not sizes:
        return None
    target = moe["params"][param_key]
    model = min(sorted(sizes), key=lambda m: abs(sizes[m] - target))
    return model, sizes[model], abs(sizes[model] - target) <= MATCH_TOLERANCE * target


def _log_linear(cost: np.ndarray, loss: np.ndarray, target: float | np.ndarray) -> float | np.ndarray:
    """The cost at ``target`` on the line through two (ln C, loss) points (nan where it does not fall)."""
    (c1, c2), (l1, l2) = cost, np.moveaxis(np.asarray(loss), -1, 0)
    slope = (l2 - l1) / (math.log(c2) - math.log(c1))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        out = np.where(slope < 0, np.exp(math.log(c1) + (target - l1) / np.where(slope < 0, slope, -1.0)), np.nan)
    return float(out) if np.ndim(out) == 0 else out


def _log_linear_ci(
    cost: np.ndarray, loss: np.ndarray, seeds: np.ndarray, target: float, target_seeds: int, noise: Noise, draws: int
) -> tuple[float, float] | None:
    """Interval of ``_log_linear`` with seed noise on both dense points and on the MoE loss (a draw
    whose dense loss does not fall counts as an unbounded cost)."""
    if not noise.usable:
        return None
    rng = np.random.default_rng(0)
    sigma = sigma_draws(noise, draws, rng)[:, None]
    dense = loss + sigma / np.sqrt(seeds) * rng.standard_normal((draws, 2))
    moe = target + sigma[:, 0] / math.sqrt(target_seeds) * rng.standard_normal(draws)
    found = _log_linear(cost, dense, moe)
    return interval(np.where(np.isnan(found), np.inf, found))


def _dense_curve(dense_runs: list[dict[str, Any]], model: str, cost_key: str) -> tuple[np.ndarray, ...]:
    """(cost, loss, seeds) of one dense model per budget, seeds averaged, by cost."""
    per_budget: dict[float, list[dict[str, Any]]] = defaultdict(list)
    for r in dense_runs:
        if r["model"] == model:
            per_budget[r["budget_flops"]].append(r)
    points = sorted((_mean(g, cost_key), _mean(g, "final_val_loss"), len(g)) for g in per_budget.values())
    return tuple(np.array([p[i] for p in points], dtype=float) for i in range(3))


def compute_multiplier(
    records: list[dict[str, Any]],
    cost_key: str = "flops_spent",
    param_key: str = PARAM_KEY,
    bootstrap: int = 1000,
    seed: int = 0,
    noise: Noise | None = None,
) -> list[dict[str, Any]]:
    """Per (MoE model, budget): the dense cost that reaches the MoE's loss over the MoE's cost.

    The matched dense model has the MoE's ``param_key`` count within 5% (``matched_within_5pct``),
    else the closest count is taken and the flag is False. Its loss against cost (``cost_key``,
    default ``flops_spent``; ``"train_seconds"`` gives the wall-clock speed-up that Fedus et al.
    2022 report) is, with 3 or more budgets, the power law L(C) = E + B * C**-beta of
    ``fit_power_law`` (``method`` "power law through k budgets"); with exactly 2, a line in (ln C,
    loss) ("log-linear through 2 budgets"); with 1, no value and a reason. Seeds are averaged on
    both sides; the interval carries the seed noise of the dense points and of the MoE's loss.
    ``multiplier`` above 1: the dense model needs more compute for the MoE's loss.
    """
    runs = finite_runs(records)
    noise = noise if noise is not None else seed_noise(runs)
    dense_runs = [r for r in runs if r["arm"] == "dense"]
    fits: dict[str, tuple[PowerLawFit | None, str]] = {}
    rows = []
    for (model, budget), group in _moe_groups(runs):
        row: dict[str, Any] = {
            "model": model,
            "arm": arm_label(group[0]),
            "budget_flops": budget,
            "seeds": len(group),
            "loss": _mean(group, "final_val_loss"),
            "cost_key": cost_key,
            "moe_cost": _mean(group, cost_key),
            "dense_model": None,
            "matched_within_5pct": None,
            "dense_budgets": 0,
            "method": None,
            "dense_cost": None,
            "multiplier": None,
            "multiplier_ci": None,
            "extrapolated": None,
            "reason": "",
            "interval_note": "",
        }
        rows.append(row)
        match = matched_dense_model(group[0], dense_runs, param_key)
        if match is None:
            row["reason"] = "no dense run to compare with"
            continue
        row.update(dense_model=match[0], matched_within_5pct=match[2])
        _fill_multiplier(row, _dense_curve(dense_runs, match[0], cost_key), fits, noise, bootstrap, seed)
    return rows


def _fill_multiplier(
    row: dict[str, Any],
    curve: tuple[np.ndarray, ...],
    fits: dict[str, tuple[PowerLawFit | None, str]],
    noise: Noise,
    bootstrap: int,
    seed: int,
) -> None:
    cost, loss, seeds = curve
    row["dense_budgets"] = len(cost)
    if len(cost) == 1:
        row["reason"] = f"the dense model {row['dense_model']} has one budget: no loss-versus-compute curve"
        return
    dense_cost, ci, reason = None, None, ""
    if len(cost) == 2:
        row["method"] = "log-linear through 2 budgets"
        dense_cost = _log_linear(cost, loss, row["loss"])
        if math.isnan(dense_cost):
            dense_cost, reason = None, "the dense loss does not fall between its two budgets"
        else:
            ci = _log_linear_ci(cost, loss, seeds, row["loss"], row["seeds"], noise, bootstrap)
            if ci is None:
                row["interval_note"] = "no interval: needs replicate seeds to estimate the seed noise"
    else:
        row["method"] = f"power law through {len(cost)} budgets"
        if row["dense_model"] not in fits:
            fits[row["dense_model"]] = fit_power_law(
                cost, loss, seeds=seeds, noise=noise, bootstrap=bootstrap, seed=seed
            )
        fit, reason = fits[row["dense_model"]]
        if fit is not None:
            row["interval_note"] = fit.interval_reason
            inv, reason = invert(fit, row["loss"], loss_seeds=row["seeds"])
            if inv is not None:
                dense_cost, ci = inv.x, inv.ci
    row["reason"] = reason
    if dense_cost is not None:
        row.update(
            dense_cost=dense_cost,
            multiplier=_ratio(dense_cost, row["moe_cost"]),
            multiplier_ci=_ratio_ci(ci, row["moe_cost"]),
            extrapolated=not (cost.min() <= dense_cost <= cost.max()),
        )


# ---------------------------------------------------------------------------------------------
# IsoFLOP profiles (Hoffmann et al. 2022, Approach 2)


def isoflop(records: list[dict[str, Any]], param_key: str = PARAM_KEY, bracketed_only: bool = False) -> IsoflopAnalysis:
    """Chinchilla Approach 2 (Hoffmann et al. 2022) per arm: dense, and each MoE family (E, k).

    ``curves``: per (budget, arm) with its sizes (``param_key``, seeds averaged per model), the
    ``fit_parabola`` optimum ``n_opt`` and ``loss_opt``, ``bracketed`` (the vertex lies within the
    sampled sizes), or a ``reason``. ``scaling``: per arm, where 2 or more budgets have an optimum
    (only bracketed ones with ``bracketed_only``), the least-squares line ln N_opt = exponent *
    ln C + const (``numpy.polyfit``) over the budgets' ``budget_flops``; Chinchilla found about
    0.5 for dense models. With exactly 2 budgets the line passes through both.
    """
    arms: dict[str, dict[float, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    order: dict[str, tuple[int, int, int]] = {}
    for r in finite_runs(records):
        label = arm_label(r)
        arms[label][r["budget_flops"]].append(r)
        order[label] = _family_key(r)
    curves, scaling = [], []
    for label in sorted(arms, key=order.__getitem__):
        optima = []
        for budget in sorted(arms[label]):
            n, loss, _ = _dense_points(arms[label][budget], param_key)  # any arm: one point per model
            par, reason = fit_parabola(n, loss)
            curves.append(
                {
                    "arm": label,
                    "budget_flops": budget,
                    "sizes": len(set(n)),
                    "param_key": param_key,
                    "n_opt": None if par is None else par.n_opt,
                    "loss_opt": None if par is None else par.loss_opt,
                    "curvature": None if par is None else par.a,
                    "bracketed": None if par is None else par.bracketed,
                    "n": n,
                    "loss": loss,
                    "coefficients": None if par is None else [par.a, par.b, par.c],
                    "reason": reason,
                }
            )
            if par is not None and (par.bracketed or not bracketed_only):
                optima.append((budget, par.n_opt))
        row: dict[str, Any] = {"arm": label, "budgets": len(optima), "exponent": None, "reason": ""}
        if len({c for c, _ in optima}) < 2:
            row["reason"] = f"needs optima at 2 or more budgets (got {len(optima)})"
        else:
            c, n_opt = np.array(optima).T
            row["exponent"] = float(np.polyfit(np.log(c), np.log(n_opt), 1)[0])
        scaling.append(row)
    return IsoflopAnalysis(curves=curves, scaling=scaling)


# ---------------------------------------------------------------------------------------------
# The whole analysis, as the report uses it


@dataclass(frozen=True)
class ScalingAnalysis:
    noise: Noise  # seed noise of one run's loss, pooled over the study
    dense_fits: dict[float, PowerLawFit | None]  # per budget: loss against dense active N
    dense_fit_reasons: dict[float, str]
    equivalent: list[dict[str, Any]]  # iso-FLOP dense-equivalent size
    effective: list[dict[str, Any]]  # Clark et al. 2022, at equal tokens
    multiplier_flops: list[dict[str, Any]]
    multiplier_seconds: list[dict[str, Any]]
    multiplier_energy: list[dict[str, Any]]  # empty unless every run has NVML energy
    isoflop: IsoflopAnalysis
    krajewski: list[dict[str, Any]]


def analyse(records: list[dict[str, Any]], bootstrap: int = 1000, seed: int = 0) -> ScalingAnalysis:
    """Every scaling analysis of a study's records (seeded: the same records give the same numbers)."""
    runs = finite_runs(records)
    noise = seed_noise(runs)
    made: dict[float, tuple[PowerLawFit | None, str]] = {}
    for budget in sorted({r["budget_flops"] for r in records}):
        dense = [r for r in runs if r["arm"] == "dense" and r["budget_flops"] == budget]
        fit, reason, _, _ = _fit_dense(dense, PARAM_KEY, noise, bootstrap, seed)
        made[budget] = (fit, reason)
    kw = {"bootstrap": bootstrap, "seed": seed, "noise": noise}
    return ScalingAnalysis(
        noise=noise,
        dense_fits={b: fit for b, (fit, _) in made.items()},
        dense_fit_reasons={b: reason for b, (_, reason) in made.items()},
        equivalent=dense_equivalents(records, at="flops", fits=made, **kw),
        effective=dense_equivalents(records, at="tokens", **kw),
        multiplier_flops=compute_multiplier(records, **kw),
        multiplier_seconds=compute_multiplier(records, cost_key="train_seconds", **kw),
        multiplier_energy=compute_multiplier(records, cost_key="gpu_energy_j", **kw)
        if records and all(r.get("gpu_energy_j") is not None for r in records)
        else [],
        isoflop=isoflop(records),
        krajewski=krajewski_check(records),
    )


def isoflop_curves(a: ScalingAnalysis) -> list[dict[str, Any]]:
    """The curves worth drawing: three or more sizes at a budget."""
    return [c for c in a.isoflop.curves if c["sizes"] >= MIN_POINTS]
