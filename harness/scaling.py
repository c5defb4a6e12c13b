"""Scaling analysis of a study: power-law fits, dense-equivalent sizes, compute multipliers, IsoFLOP optima.

    fit, reason = fit_power_law(n, loss)              # L(N) = E + A * N**-alpha, robust, bootstrapped
    inv, reason = invert(fit, 3.1)                    # the N at which the fit reaches 3.1 nats
    rows = dense_equivalent(records)                  # per (MoE model, budget): dense N of equal loss
    rows = compute_multiplier(records)                # per (MoE model, budget): dense FLOPs / MoE FLOPs
    iso = isoflop(records)                            # per (budget, arm): parabola optimum N*; N* ∝ C^a
    rows = krajewski_check(records)                   # the published fine-grained MoE law next to each run

Everything here is a pure function of run records (the dicts of ``record.json``). A function
that can fail for want of data returns a ``(result, reason)`` pair: ``(result, "")`` on success,
``(None, reason)`` otherwise; the row functions put the same reason in each row's ``reason``
field (``""`` when the row is complete). Nothing raises for too few points.

Losses are the final validation losses in nats per token. Several seeds of one (model, budget)
are averaged before fitting, so each model size is one point of a fit and the bootstrap
resamples sizes. Parameter counts default to the **non-embedding active** parameters
(``params["active_non_embedding"]``), the N of Kaplan et al. 2020 ("Scaling Laws for Neural
Language Models"), who found that leaving the embeddings out gives the cleaner power law; every
function takes ``param_key`` to use another count.

The analyses:

- ``fit_power_law``: L(N) = E + A N^-alpha, Kaplan et al.'s power law with the irreducible term
  E of Hoffmann et al. 2022 ("Training Compute-Optimal Large Language Models", Chinchilla),
  fitted with a robust loss as they do (they use Huber; here soft-L1) so that one bad run does
  not set the exponent.
- ``dense_equivalent``: the dense size whose fitted loss equals an MoE's at the same budget,
  over the MoE's active and total parameters: the effective parameter count of Clark et al.
  2022 ("Unified Scaling Laws for Routed Language Models").
- ``compute_multiplier``: the dense compute that would reach an MoE's loss over the compute the
  MoE spent, the FLOP counterpart of the "7x pre-training speed-up" of Fedus et al. 2022
  ("Switch Transformers"), which was measured in wall-clock time to a given quality
  (``cost_key="train_seconds"`` gives that variant).
- ``isoflop``: Chinchilla's Approach 2: per budget a parabola in log N through the losses of
  several sizes, its vertex the compute-optimal N*, and N* ∝ C^a across budgets.
- ``krajewski_loss``: the fitted law of Krajewski et al. 2024 ("Scaling Laws for Fine-Grained
  Mixture of Experts"), as a cross-check of how far the granularity should move the loss.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

import numpy as np
from scipy.optimize import least_squares

from harness.stats import arm_label
from harness.study import budget_label

PARAM_KEY = "active_non_embedding"
TOTAL_KEY = {"active_non_embedding": "total_non_embedding", "active": "total"}
MATCH_TOLERANCE = 0.05  # a dense model is the MoE's match when their active counts differ by at most 5%
F_SCALE = 0.02  # nats: about the seed-to-seed spread of a final loss; larger residuals count linearly
LOW, HIGH = 2.5, 97.5  # percentiles of the bootstrap intervals
MIN_POINTS = 3  # distinct x values a three-parameter power law or a parabola needs
_ALPHA_BOUNDS = (math.log(1e-3), math.log(5.0))  # ln alpha: keeps x**-alpha finite over any span


@dataclass(frozen=True)
class PowerLawFit:
    """L(x) = E + A * x**-alpha over x in [x_min, x_max] (x is N, or compute C for a loss-versus-budget fit).

    The ``*_ci`` fields are bootstrap percentile intervals (2.5 %, 97.5 %) over ``draws``
    successful resamples; None when there were none (``bootstrap=0``).
    """

    E: float
    A: float
    alpha: float
    x_min: float
    x_max: float
    points: int  # points fitted (after averaging seeds)
    rmse: float  # root-mean-square residual, nats
    E_ci: tuple[float, float] | None = None
    A_ci: tuple[float, float] | None = None
    alpha_ci: tuple[float, float] | None = None
    draws: int = 0  # resamples fitted
    skipped: int = 0  # resamples left out: fewer than 3 distinct x, or the solver did not converge
    samples: np.ndarray | None = field(default=None, repr=False, compare=False)  # (draws, 3): E, A, alpha

    def predict(self, x: float | np.ndarray) -> float | np.ndarray:
        return self.E + self.A * np.power(x, -self.alpha)


@dataclass(frozen=True)
class Inversion:
    """The x at which a fit reaches a loss; ``extrapolated`` when x lies outside the fitted range.

    ``ci`` inverts each bootstrap draw of the fit (a draw whose asymptote is at or above the loss
    gives x = inf), so it carries the fit's uncertainty but not the noise of the loss inverted.
    """

    x: float
    extrapolated: bool
    ci: tuple[float, float] | None = None


@dataclass(frozen=True)
class Parabola:
    """loss = a * ln(N)**2 + b * ln(N) + c with a > 0; its vertex is the optimum."""

    a: float
    b: float
    c: float
    n_opt: float  # exp(-b / 2a)
    loss_opt: float  # c - b**2 / 4a
    n_min: float
    n_max: float
    points: int

    @property
    def bracketed(self) -> bool:
        """Whether the vertex lies inside the sampled sizes (otherwise it is an extrapolation)."""
        return self.n_min <= self.n_opt <= self.n_max


@dataclass(frozen=True)
class IsoflopAnalysis:
    """``curves``: one row per (budget, arm); ``scaling``: one row per arm, N_opt ∝ C^exponent."""

    curves: list[dict[str, Any]]
    scaling: list[dict[str, Any]]


# ---------------------------------------------------------------------------------------------
# Power law


def _interval(values: np.ndarray) -> tuple[float, float]:
    """Percentile interval taken on order statistics (no interpolation, so infinite draws are allowed)."""
    return (
        float(np.percentile(values, LOW, method="lower")),
        float(np.percentile(values, HIGH, method="higher")),
    )


def _solve(
    x: np.ndarray, y: np.ndarray, starts: list[np.ndarray], loss: str, f_scale: float
) -> tuple[float, float, float] | None:
    """Least squares for (E, ln A', ln alpha) with x already scaled to about 1; the best of ``starts``."""
    log_x = np.log(x)

    def residuals(theta: np.ndarray) -> np.ndarray:
        e, log_a, log_alpha = theta
        return e + np.exp(log_a - np.exp(log_alpha) * log_x) - y

    y_min = float(y.min())
    lower = [0.0, -np.inf, _ALPHA_BOUNDS[0]]
    upper = [y_min, np.inf, _ALPHA_BOUNDS[1]]
    best = None
    for theta0 in starts:
        theta0 = np.clip(theta0, np.array(lower) + 1e-12, np.array(upper) - 1e-12)
        try:
            res = least_squares(residuals, theta0, bounds=(lower, upper), loss=loss, f_scale=f_scale)
        except (ValueError, FloatingPointError):
            continue
        if res.success and np.all(np.isfinite(res.x)) and (best is None or res.cost < best.cost):
            best = res
    if best is None:
        return None
    e, log_a, log_alpha = best.x
    return float(e), float(log_a), float(np.exp(log_alpha))


def _starts(x: np.ndarray, y: np.ndarray) -> list[np.ndarray]:
    """Starting points: for a few trial asymptotes E0, the line through ln(L - E0) against ln x."""
    y_min = float(y.min())
    starts = []
    for frac in (0.0, 0.5, 0.9, 0.99):
        e0 = frac * y_min
        slope, intercept = np.polyfit(np.log(x), np.log(y - e0 + 1e-9), 1)
        alpha0 = -slope if -slope > 1e-3 else 0.1
        starts.append(np.array([e0, intercept, math.log(alpha0)]))
    return starts


def fit_power_law(
    x: np.ndarray | list[float],
    loss: np.ndarray | list[float],
    bootstrap: int = 1000,
    seed: int = 0,
    robust_loss: str = "soft_l1",
    f_scale: float = F_SCALE,
) -> tuple[PowerLawFit | None, str]:
    """Fit L(x) = E + A * x**-alpha (Kaplan et al. 2020; Hoffmann et al. 2022) with E >= 0, A > 0, alpha > 0.

    ``scipy.optimize.least_squares`` with a robust loss (``robust_loss="soft_l1"``, residuals
    beyond ``f_scale`` nats count linearly; ``"linear"`` is ordinary least squares) over
    (E, ln A, ln alpha), E bounded by [0, min(loss)]: the asymptote cannot lie above a loss that
    was reached. x is scaled by its geometric mean while fitting, which changes nothing but the
    conditioning. The best of a few starting points is kept.

    ``bootstrap`` resamples of the points (a ``numpy.random.default_rng(seed)``) are refitted from
    that solution; a resample with fewer than 3 distinct x is skipped. Needs 3 or more distinct
    x, otherwise ``(None, reason)``.
    """
    x = np.asarray(x, dtype=float)
    y = np.asarray(loss, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        return None, f"x and loss must be 1-D of one length (got {x.shape} and {y.shape})"
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    distinct = len(np.unique(x))
    if distinct < MIN_POINTS:
        return None, f"needs {MIN_POINTS} or more distinct sizes to fit E, A and alpha (got {distinct})"
    if np.any(x <= 0) or np.any(y <= 0):
        return None, "sizes and losses must be positive"
    x_ref = float(np.exp(np.log(x).mean()))
    solved = _solve(x / x_ref, y, _starts(x / x_ref, y), robust_loss, f_scale)
    if solved is None:
        return None, "the least-squares solver did not converge"
    e, log_a_scaled, alpha = solved

    def unscale(log_a_s: float, alpha_: float) -> float:
        return float(np.exp(log_a_s + alpha_ * math.log(x_ref)))

    a = unscale(log_a_scaled, alpha)
    rmse = float(np.sqrt(np.mean((e + a * x**-alpha - y) ** 2)))

    rng = np.random.default_rng(seed)
    samples, skipped = [], 0
    start = [np.array([e, log_a_scaled, math.log(alpha)])]
    for _ in range(bootstrap):
        idx = rng.integers(0, len(x), len(x))
        if len(np.unique(x[idx])) < MIN_POINTS:
            skipped += 1
            continue
        draw = _solve(x[idx] / x_ref, y[idx], start, robust_loss, f_scale)
        if draw is None:
            skipped += 1
            continue
        samples.append((draw[0], unscale(draw[1], draw[2]), draw[2]))
    draws = np.array(samples, dtype=float).reshape(-1, 3)
    cis = [_interval(draws[:, j]) if len(draws) else None for j in range(3)]
    fit = PowerLawFit(
        E=e,
        A=a,
        alpha=alpha,
        x_min=float(x.min()),
        x_max=float(x.max()),
        points=len(x),
        rmse=rmse,
        E_ci=cis[0],
        A_ci=cis[1],
        alpha_ci=cis[2],
        draws=len(draws),
        skipped=skipped,
        samples=draws if len(draws) else None,
    )
    return fit, ""


def invert(fit: PowerLawFit, loss: float) -> tuple[Inversion | None, str]:
    """The x at which ``fit`` reaches ``loss``: x = (A / (loss - E))**(1 / alpha).

    ``(None, reason)`` when ``loss <= E``: the law never gets there. ``extrapolated`` is set when x
    lies outside the fitted range [x_min, x_max].
    """
    if not math.isfinite(loss):
        return None, "the loss is not finite"
    if loss <= fit.E:
        return None, f"loss {loss:.4f} is at or below the fit's asymptote E = {fit.E:.4f}: no size reaches it"
    log_x = (math.log(fit.A) - math.log(loss - fit.E)) / fit.alpha  # in logs: a flat fit (alpha ~ 0) overflows
    if log_x > 700:
        return None, f"the fit reaches loss {loss:.4f} only beyond N = 1e304 (alpha = {fit.alpha:.3g}: the fit is flat)"
    x = math.exp(log_x)
    ci = None
    if fit.samples is not None:
        e, a, alpha = fit.samples.T
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            xs = np.where(loss > e, (a / np.maximum(loss - e, 1e-300)) ** (1.0 / alpha), np.inf)
        ci = _interval(xs)
    return Inversion(x=float(x), extrapolated=not (fit.x_min <= x <= fit.x_max), ci=ci), ""


# ---------------------------------------------------------------------------------------------
# Record helpers


def _usable(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Runs with a finite final validation loss."""
    return [r for r in records if r.get("final_val_loss") is not None and math.isfinite(r["final_val_loss"])]


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


# ---------------------------------------------------------------------------------------------
# Dense-equivalent size (Clark et al. 2022)


def _dense_points(runs: list[dict[str, Any]], budget: float, param_key: str) -> tuple[list[float], list[float]]:
    """(N, loss) of each dense model at ``budget``, seeds averaged."""
    dense = _by_model([r for r in runs if r["arm"] == "dense" and r["budget_flops"] == budget])
    return [_mean_params(g, param_key) for g in dense.values()], [_mean(g, "final_val_loss") for g in dense.values()]


def dense_equivalent(
    records: list[dict[str, Any]],
    param_key: str = PARAM_KEY,
    total_key: str | None = None,
    bootstrap: int = 1000,
    seed: int = 0,
    fits: dict[float, tuple[PowerLawFit | None, str]] | None = None,
) -> list[dict[str, Any]]:
    """Per (MoE model, budget): the dense size that would reach the MoE's loss at that budget.

    At each budget the dense runs' loss is fitted against N (``param_key``, default non-embedding
    active parameters; one point per dense model, seeds averaged) with ``fit_power_law``, and the
    MoE's seed-averaged loss is inverted. ``ratio_active`` = N_eq / the MoE's active N is the
    effective-parameter multiplier of Clark et al. 2022 (above 1: the MoE is worth a larger dense
    model); ``ratio_total`` = N_eq / its total N (``total_key``, default the total counterpart
    of ``param_key``) says how much of its stored capacity it uses (below 1 is the rule). The
    ``*_ci`` fields carry the dense fit's bootstrap uncertainty only. A row's ``reason`` says why
    it is incomplete: fewer than 3 dense sizes at the budget, or a loss below the dense asymptote.

    At a fixed budget a larger model sees fewer tokens, so loss against N is the IsoFLOP profile,
    which turns up past the compute-optimal size; a power law describes it only on the side where
    loss still falls with N. ``dense_monotone`` is False when the dense losses at the budget do
    not fall with N: the sizes straddle the optimum and the dense-equivalent N is unreliable.
    """
    total_key = total_key or TOTAL_KEY.get(param_key)
    runs = _usable(records)
    budgets = sorted({r["budget_flops"] for r in runs if r["arm"] == "moe"})
    rows = []
    for budget in budgets:
        at_budget = [r for r in runs if r["budget_flops"] == budget]
        n, loss = _dense_points(at_budget, budget, param_key)
        if fits is not None and budget in fits and n:
            fit, fit_reason = fits[budget]  # the same fit, already made (same points, bootstrap and seed)
        else:
            fit, fit_reason = fit_power_law(n, loss, bootstrap=bootstrap, seed=seed)
        by_size = [y for _, y in sorted(zip(n, loss, strict=True))]
        monotone = all(b < a for a, b in pairwise(by_size))
        moe = _by_model([r for r in at_budget if r["arm"] == "moe"])
        for model, group in sorted(moe.items(), key=lambda kv: (_family_key(kv[1][0]), kv[0])):
            first = group[0]
            n_active = float(first["params"][param_key])
            n_total = float(first["params"][total_key]) if total_key else None
            moe_loss = _mean(group, "final_val_loss")
            row: dict[str, Any] = {
                "model": model,
                "arm": arm_label(first),
                "budget_flops": budget,
                "seeds": len(group),
                "loss": moe_loss,
                "n_active": n_active,
                "n_total": n_total,
                "param_key": param_key,
                "dense_sizes": len(set(n)),
                "dense_monotone": monotone,
                "dense_fit": None if fit is None else {"E": fit.E, "A": fit.A, "alpha": fit.alpha, "rmse": fit.rmse},
                "dense_equivalent_n": None,
                "dense_equivalent_n_ci": None,
                "ratio_active": None,
                "ratio_active_ci": None,
                "ratio_total": None,
                "ratio_total_ci": None,
                "extrapolated": None,
                "reason": fit_reason,
            }
            if fit is not None:
                inv, reason = invert(fit, moe_loss)
                row["reason"] = reason
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


def _log_linear(c: np.ndarray, loss: np.ndarray, target: float) -> tuple[float | None, str]:
    """The C at ``target`` on the line through two (ln C, loss) points."""
    (c1, c2), (l1, l2) = c, loss
    slope = (l2 - l1) / (math.log(c2) - math.log(c1))
    if slope >= 0:
        return None, "the dense loss does not fall between its two budgets"
    return math.exp(math.log(c1) + (target - l1) / slope), ""


def compute_multiplier(
    records: list[dict[str, Any]],
    cost_key: str = "flops_spent",
    param_key: str = PARAM_KEY,
    bootstrap: int = 1000,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Per (MoE model, budget): the dense cost that reaches the MoE's loss over the MoE's cost.

    The matched dense model has the MoE's ``param_key`` count within 5% (``matched_within_5pct``),
    else the closest count is taken and the flag is False. Its loss against cost (``cost_key``,
    default ``flops_spent``; ``"train_seconds"`` gives the wall-clock speed-up that Fedus et al.
    2022 report) is, with 3 or more budgets, the power law L(C) = E + B * C**-beta of
    ``fit_power_law`` (``method`` "power law through k budgets"); with exactly 2, a line in (ln C,
    loss) ("log-linear through 2 budgets", no interval); with 1, no row value and a reason.
    Seeds of a (model, budget) are averaged on both sides. ``multiplier`` above 1: the dense model
    needs more compute for the MoE's loss. ``extrapolated`` when the dense cost found lies outside
    the dense model's budgets.
    """
    runs = _usable(records)
    dense_runs = [r for r in runs if r["arm"] == "dense"]
    moe = defaultdict(list)
    for r in runs:
        if r["arm"] == "moe":
            moe[(r["model"], r["budget_flops"])].append(r)
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    fits: dict[str, tuple[PowerLawFit | None, str]] = {}
    rows = []
    for (model, budget), group in sorted(moe.items(), key=lambda kv: (kv[0][1], _family_key(kv[1][0]), kv[0][0])):
        first = group[0]
        moe_loss, moe_cost = _mean(group, "final_val_loss"), _mean(group, cost_key)
        row: dict[str, Any] = {
            "model": model,
            "arm": arm_label(first),
            "budget_flops": budget,
            "seeds": len(group),
            "loss": moe_loss,
            "cost_key": cost_key,
            "moe_cost": moe_cost,
            "dense_model": None,
            "matched_within_5pct": None,
            "dense_budgets": 0,
            "method": None,
            "dense_cost": None,
            "multiplier": None,
            "multiplier_ci": None,
            "extrapolated": None,
            "reason": "",
        }
        rows.append(row)
        match = matched_dense_model(first, dense_runs, param_key)
        if match is None:
            row["reason"] = "no dense run to compare with"
            continue
        dense_model, _, within = match
        row.update(dense_model=dense_model, matched_within_5pct=within)
        if dense_model not in curves:
            per_budget = defaultdict(list)
            for r in dense_runs:
                if r["model"] == dense_model:
                    per_budget[r["budget_flops"]].append(r)
            points = sorted((_mean(g, cost_key), _mean(g, "final_val_loss")) for g in per_budget.values())
            curves[dense_model] = (np.array([p[0] for p in points]), np.array([p[1] for p in points]))
        cost, loss = curves[dense_model]
        row["dense_budgets"] = len(cost)
        if len(cost) == 1:
            row["reason"] = f"the dense model {dense_model} has one budget: no loss-versus-compute curve"
            continue
        if len(cost) == 2:
            row["method"] = "log-linear through 2 budgets"
            dense_cost, reason = _log_linear(cost, loss, moe_loss)
            ci = None
        else:
            row["method"] = f"power law through {len(cost)} budgets"
            if dense_model not in fits:
                fits[dense_model] = fit_power_law(cost, loss, bootstrap=bootstrap, seed=seed)
            fit, reason = fits[dense_model]
            dense_cost, ci = None, None
            if fit is not None:
                inv, reason = invert(fit, moe_loss)
                if inv is not None:
                    dense_cost, ci = inv.x, inv.ci
        row["reason"] = reason
        if dense_cost is not None:
            row.update(
                dense_cost=dense_cost,
                multiplier=_ratio(dense_cost, moe_cost),
                multiplier_ci=_ratio_ci(ci, moe_cost),
                extrapolated=not (cost.min() <= dense_cost <= cost.max()),
            )
    return rows


# ---------------------------------------------------------------------------------------------
# IsoFLOP profiles (Hoffmann et al. 2022, Approach 2)


def fit_parabola(n: np.ndarray | list[float], loss: np.ndarray | list[float]) -> tuple[Parabola | None, str]:
    """loss = a ln(N)^2 + b ln(N) + c by ``numpy.polyfit``; the vertex N* = exp(-b / 2a) when a > 0.

    ``(None, reason)`` with fewer than 3 distinct N, or "no minimum: curvature <= 0" for a flat or
    concave profile (a at most 1e-12 of the largest loss counts as flat).
    """
    n = np.asarray(n, dtype=float)
    y = np.asarray(loss, dtype=float)
    distinct = len(np.unique(n))
    if distinct < MIN_POINTS:
        return None, f"needs {MIN_POINTS} or more distinct sizes for a parabola (got {distinct})"
    if np.any(n <= 0):
        return None, "sizes must be positive"
    a, b, c = np.polyfit(np.log(n), y, 2)
    if a <= 1e-12 * float(np.max(np.abs(y))):
        return None, "no minimum: curvature <= 0"
    x_opt = -b / (2 * a)
    return Parabola(
        a=float(a),
        b=float(b),
        c=float(c),
        n_opt=float(np.exp(x_opt)),
        loss_opt=float(c - b * b / (4 * a)),
        n_min=float(n.min()),
        n_max=float(n.max()),
        points=len(n),
    ), ""


def isoflop(records: list[dict[str, Any]], param_key: str = PARAM_KEY, bracketed_only: bool = False) -> IsoflopAnalysis:
    """Chinchilla Approach 2 (Hoffmann et al. 2022) per arm: dense, and each MoE family (E, k).

    ``curves``: per (budget, arm) with its sizes (``param_key``, seeds averaged per model), the
    ``fit_parabola`` optimum ``n_opt`` and ``loss_opt``, ``bracketed`` (the vertex lies within the
    sampled sizes), or a ``reason``. ``scaling``: per arm, where 2 or more budgets have an optimum
    (only bracketed ones with ``bracketed_only``), the least-squares line ln N_opt = exponent *
    ln C + const (``numpy.polyfit``) over the budgets' ``budget_flops``; Chinchilla found about
    0.5 for dense models. With exactly 2 budgets the line passes through both.
    """
    runs = _usable(records)
    arms: dict[str, dict[float, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    order: dict[str, tuple[int, int, int]] = {}
    for r in runs:
        label = arm_label(r)
        arms[label][r["budget_flops"]].append(r)
        order[label] = _family_key(r)
    curves, scaling = [], []
    for label in sorted(arms, key=order.__getitem__):
        optima = []
        for budget in sorted(arms[label]):
            by_model = _by_model(arms[label][budget])
            n = [_mean_params(g, param_key) for g in by_model.values()]
            loss = [_mean(g, "final_val_loss") for g in by_model.values()]
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
            exponent, _ = np.polyfit(np.log(c), np.log(n_opt), 1)
            row["exponent"] = float(exponent)
        scaling.append(row)
    return IsoflopAnalysis(curves=curves, scaling=scaling)


# ---------------------------------------------------------------------------------------------
# Fine-grained MoE law (Krajewski et al. 2024)


@dataclass(frozen=True)
class KrajewskiConstants:
    """The fitted constants of Krajewski et al. 2024 (valid for their data and tokenizer only)."""

    a: float = 18.1
    alpha: float = 0.115
    b: float = 30.8
    beta: float = 0.147
    g: float = 2.1
    gamma: float = 0.58
    c: float = 0.47


KRAJEWSKI = KrajewskiConstants()


def krajewski_loss(
    n_active_non_embedding: float | np.ndarray,
    tokens: float | np.ndarray,
    granularity: float | np.ndarray,
    k: KrajewskiConstants = KRAJEWSKI,
) -> float | np.ndarray:
    """L(N, D, G) = c + (g / G**gamma + a) / N**alpha + b / D**beta (Krajewski et al. 2024).

    N: non-embedding active parameters; D: training tokens; G = d_ff / d_expert, the granularity
    (1: experts as wide as the dense feed-forward layer). The law was fitted to MoE models with a
    fixed number of experts, so it predicts the effect of granularity, not of sparsity itself;
    dense models are evaluated at G = 1 by convention (``granularity_of``), which makes the
    law's dense-versus-MoE difference at equal N and D the granularity term alone.
    """
    n = np.asarray(n_active_non_embedding, dtype=float)
    d = np.asarray(tokens, dtype=float)
    g = np.asarray(granularity, dtype=float)
    out = k.c + (k.g / g**k.gamma + k.a) / n**k.alpha + k.b / d**k.beta
    return float(out) if out.ndim == 0 else out


def granularity_of(rec: dict[str, Any]) -> float | None:
    """G = d_ff / d_expert from the run's config; 1 for a dense run; None when d_ff is not set."""
    cfg = rec.get("config") or {}
    if rec["arm"] == "dense" or not cfg.get("moe"):
        return 1.0
    d_ff, d_expert = cfg.get("d_ff"), cfg["moe"].get("d_expert")
    if not d_ff or not d_expert:
        return None
    return d_ff / d_expert


def krajewski_check(records: list[dict[str, Any]], param_key: str = PARAM_KEY) -> list[dict[str, Any]]:
    """Per run: the Krajewski et al. 2024 prediction next to the observed loss.

    The law's absolute level belongs to the paper's data and tokenizer, so
    ``observed - predicted`` is an offset shared by every run of a study and not a verdict; what
    compares is the difference between arms. ``predicted_gap`` and ``observed_gap`` are each MoE
    run's loss minus that of its dense peer (same budget and seed, closest ``param_key`` count),
    predicted and observed; None for dense runs or where there is no peer.
    """
    runs = _usable(records)
    pred: dict[str, float | None] = {}
    rows = []
    for r in runs:
        g = granularity_of(r)
        n = r["params"][param_key]
        p = None if g is None else krajewski_loss(n, r["tokens"], g)
        pred[r["run_id"]] = p
        rows.append(
            {
                "run_id": r["run_id"],
                "model": r["model"],
                "arm": arm_label(r),
                "budget_flops": r["budget_flops"],
                "seed": r["seed"],
                "n_active": n,
                "tokens": r["tokens"],
                "granularity": g,
                "predicted": p,
                "observed": r["final_val_loss"],
                "observed_minus_predicted": None if p is None else r["final_val_loss"] - p,
                "dense_peer": None,
                "predicted_gap": None,
                "observed_gap": None,
                "reason": "" if g is not None else "granularity unknown: the config has no d_ff",
            }
        )
    by_id = {r["run_id"]: r for r in runs}
    for row in rows:
        rec = by_id[row["run_id"]]
        if rec["arm"] != "moe":
            continue
        peers = [
            d
            for d in runs
            if d["arm"] == "dense" and d["budget_flops"] == rec["budget_flops"] and d["seed"] == rec["seed"]
        ]
        if not peers:
            row["reason"] = row["reason"] or "no dense run of the same budget and seed"
            continue
        peer = min(peers, key=lambda d: abs(d["params"][param_key] - rec["params"][param_key]))
        row["dense_peer"] = peer["model"]
        row["observed_gap"] = rec["final_val_loss"] - peer["final_val_loss"]
        if row["predicted"] is not None and pred[peer["run_id"]] is not None:
            row["predicted_gap"] = row["predicted"] - pred[peer["run_id"]]
    return rows


# ---------------------------------------------------------------------------------------------
# The whole analysis, as the report uses it


@dataclass(frozen=True)
class ScalingAnalysis:
    dense_fits: dict[float, PowerLawFit | None]  # per budget: loss against dense active N
    dense_fit_reasons: dict[float, str]
    equivalent: list[dict[str, Any]]
    multiplier_flops: list[dict[str, Any]]
    multiplier_seconds: list[dict[str, Any]]
    multiplier_energy: list[dict[str, Any]]  # empty unless every run has NVML energy
    isoflop: IsoflopAnalysis
    krajewski: list[dict[str, Any]]


def analyse(records: list[dict[str, Any]], bootstrap: int = 1000, seed: int = 0) -> ScalingAnalysis:
    """Every scaling analysis of a study's records (seeded: the same records give the same numbers)."""
    made: dict[float, tuple[PowerLawFit | None, str]] = {}
    runs = _usable(records)
    for budget in sorted({r["budget_flops"] for r in records}):
        n, loss = _dense_points(runs, budget, PARAM_KEY)
        made[budget] = (
            fit_power_law(n, loss, bootstrap=bootstrap, seed=seed) if n else (None, "no dense run at this budget")
        )
    return ScalingAnalysis(
        dense_fits={b: fit for b, (fit, _) in made.items()},
        dense_fit_reasons={b: reason for b, (_, reason) in made.items()},
        equivalent=dense_equivalent(records, bootstrap=bootstrap, seed=seed, fits=made),
        multiplier_flops=compute_multiplier(records, bootstrap=bootstrap, seed=seed),
        multiplier_seconds=compute_multiplier(records, cost_key="train_seconds", bootstrap=bootstrap, seed=seed),
        multiplier_energy=compute_multiplier(records, cost_key="gpu_energy_j", bootstrap=bootstrap, seed=seed)
        if records and all(r.get("gpu_energy_j") is not None for r in records)
        else [],
        isoflop=isoflop(records),
        krajewski=krajewski_check(records),
    )


def _g(x: float | None, spec: str = ".3g") -> str:
    return "-" if x is None else format(x, spec)


def _ci(ci: tuple[float, float] | None, spec: str = ".3g") -> str:
    return "" if ci is None else f" [{format(ci[0], spec)}, {format(ci[1], spec)}]"


def fit_table(a: ScalingAnalysis) -> tuple[list[str], list[list[Any]]]:
    headers = ["budget FLOPs", "dense sizes", "E (nats)", "A", "alpha", "rmse", "note"]
    rows = []
    for budget, fit in a.dense_fits.items():
        if fit is None:
            rows.append([budget_label(budget), "-", "-", "-", "-", "-", a.dense_fit_reasons[budget]])
            continue
        rows.append(
            [
                budget_label(budget),
                fit.points,
                _g(fit.E, ".3f") + _ci(fit.E_ci, ".3f"),
                _g(fit.A) + _ci(fit.A_ci),
                _g(fit.alpha, ".3f") + _ci(fit.alpha_ci, ".3f"),
                _g(fit.rmse, ".3g"),
                "",
            ]
        )
    return headers, rows


def equivalent_table(a: ScalingAnalysis) -> tuple[list[str], list[list[Any]]]:
    headers = ["budget FLOPs", "MoE", "val loss", "dense-equivalent N", "/ active N", "/ total N", "note"]
    rows = []
    for r in a.equivalent:
        note = r["reason"] or ("extrapolated beyond the dense sizes" if r["extrapolated"] else "")
        if r.get("dense_monotone") is False:
            note = "; ".join(x for x in (note, "dense loss does not fall with N at this budget") if x)
        rows.append(
            [
                budget_label(r["budget_flops"]),
                r["model"],
                _g(r["loss"], ".4f"),
                _g(r["dense_equivalent_n"]) + _ci(r["dense_equivalent_n_ci"]),
                _g(r["ratio_active"], ".2f") + _ci(r["ratio_active_ci"], ".2f"),
                _g(r["ratio_total"], ".2f") + _ci(r["ratio_total_ci"], ".2f"),
                note or "-",
            ]
        )
    return headers, rows


def multiplier_table(a: ScalingAnalysis) -> tuple[list[str], list[list[Any]]]:
    headers = [
        "budget FLOPs",
        "MoE",
        "matched dense",
        "method",
        "compute multiplier",
        "wall-clock multiplier",
        "energy multiplier",
        "note",
    ]
    seconds = {(r["model"], r["budget_flops"]): r for r in a.multiplier_seconds}
    joules = {(r["model"], r["budget_flops"]): r for r in a.multiplier_energy}
    rows = []
    for r in a.multiplier_flops:
        t = seconds.get((r["model"], r["budget_flops"]), {})
        j = joules.get((r["model"], r["budget_flops"]))
        notes = [x for x in (r["reason"], "extrapolated" if r["extrapolated"] else "") if x]
        if r["matched_within_5pct"] is False:
            notes.append("closest dense differs by more than 5% in active parameters")
        rows.append(
            [
                budget_label(r["budget_flops"]),
                r["model"],
                r["dense_model"] or "-",
                r["method"] or "-",
                _g(r["multiplier"], ".2f") + _ci(r["multiplier_ci"], ".2f"),
                _g(t.get("multiplier"), ".2f") + (" (extrapolated)" if t.get("extrapolated") else ""),
                "absent (no NVML energy)"
                if j is None
                else _g(j.get("multiplier"), ".2f") + (" (extrapolated)" if j.get("extrapolated") else ""),
                "; ".join(notes) or "-",
            ]
        )
    return headers, rows


def isoflop_table(a: ScalingAnalysis) -> tuple[list[str], list[list[Any]]]:
    headers = ["arm", "budget FLOPs", "sizes", "N_opt (active non-embedding)", "loss at N_opt", "note"]
    rows = [
        [
            c["arm"],
            budget_label(c["budget_flops"]),
            c["sizes"],
            _g(c["n_opt"]),
            _g(c["loss_opt"], ".4f"),
            c["reason"] or ("" if c["bracketed"] else "optimum outside the sampled sizes") or "-",
        ]
        for c in a.isoflop.curves
    ]
    return headers, rows


def isoflop_curves(a: ScalingAnalysis) -> list[dict[str, Any]]:
    """The curves worth drawing: three or more sizes at a budget."""
    return [c for c in a.isoflop.curves if c["sizes"] >= MIN_POINTS]


def _multiplier_finding(a: ScalingAnalysis) -> str:
    """One sentence: what this study finds for the compute multiplier, against Switch's 7x."""
    top = max((r["budget_flops"] for r in a.multiplier_flops), default=None)
    rows = [r for r in a.multiplier_flops if r["budget_flops"] == top and r["multiplier"] is not None]
    if not rows:
        return "This study has no compute multiplier (a dense model needs two or more budgets)."
    secs = {r["model"]: r["multiplier"] for r in a.multiplier_seconds if r["budget_flops"] == top}
    parts = []
    for r in sorted(rows, key=lambda r: r["model"]):
        t = secs.get(r["model"])
        parts.append(
            f"{r['arm']} x{r['multiplier']:.2f} in FLOPs" + ("" if t is None else f", x{t:.2f} in wall-clock time")
        )
    return (
        f"At the largest budget ({budget_label(top)} FLOPs) this study finds: {'; '.join(parts)} "
        "(above 1: the MoE saves compute; Switch Transformers reported 7x at far larger scale)."
    )


def markdown(a: ScalingAnalysis, table) -> list[str]:
    """The scaling section of report.md; ``table(name)`` renders one of the report's tables."""
    exps = [f"{r['arm']}: a = {r['exponent']:.2f}" for r in a.isoflop.scaling if r["exponent"] is not None]
    gaps = [r for r in a.krajewski if r["predicted_gap"] is not None]
    lines = [
        "## Scaling: active versus total parameters",
        "",
        "Dense fits L(N) = E + A·N^(−α) per budget (N: active non-embedding parameters; robust soft-L1 least "
        "squares, bootstrap 95% intervals in brackets):",
        "",
        table("dense_fits"),
        "",
        "Dense-equivalent size of each MoE (Clark et al. 2022): where its budget's dense fit reaches the MoE's loss, "
        "over its active and total parameters.",
        "",
        table("dense_equivalent"),
        "",
        "Compute multiplier: the training FLOPs (and wall-clock seconds) its matched dense model would need to reach "
        "the MoE's loss, over the MoE's own. Switch Transformers reported about 7x at scale.",
        "",
        table("compute_multiplier"),
        "",
        "IsoFLOP optima (Chinchilla approach 2, a parabola in log N per budget with three or more sizes):",
        "",
        table("isoflop"),
        "",
    ]
    if exps:
        lines += [f"N_opt ∝ C^a: {'; '.join(exps)}.", ""]
    lines += [_multiplier_finding(a), ""]
    if gaps:
        text = "; ".join(
            f"{r['arm']} at {budget_label(r['budget_flops'])}: predicted {r['predicted_gap']:+.3f}, "
            f"observed {r['observed_gap']:+.3f}"
            for r in gaps
            if r["arm"] != "dense"
        )
        lines += [
            "Cross-check with the fine-grained MoE law of Krajewski et al. 2024 (absolute levels depend on data and "
            f"tokenizer; only MoE - dense gaps compare): {text}.",
            "",
        ]
    return lines
