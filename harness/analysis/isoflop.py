"""IsoFLOP profiles, the model-free check on the joint law (Chinchilla approach 2, Hoffmann et al. 2022).

    iso = isoflop(records, sd_resid=0.016, dof=20)    # per (budget, arm): seed-adjusted parabola, N_opt

Per budget and arm (dense, or one MoE family E, k) each model's loss is seed-adjusted by a two-way
fit loss = mu_model + u_seed (least squares, seed effects summing to zero) over the runs of that
budget and arm: a model run on seed 0 only is corrected by seed 0's shift, never averaged with
models that have three seeds. A parabola in ln N through the adjusted losses (4 or more sizes;
fewer get a reason) gives N_opt = exp(-b / 2a), ``bracketed`` when it lies within the sampled sizes.
Its interval: a parametric bootstrap that redraws every run's residual (sd ``sd_resid`` drawn from
its sampling distribution; seed shifts cancel in the two-way fit), redoes the adjustment and the
parabola, and takes percentiles; a draw without a minimum counts as unbounded on the side its
slope points to. Across budgets N_opt ∝ C^a (Chinchilla found a ≈ 0.5 for dense models).
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np

from harness.analysis.fits import Noise, fit_parabola, interval, sigma_draws
from harness.analysis.stats import arm_label, finite_runs

MIN_SIZES = 4  # a parabola has 3 parameters: 4 sizes leave one degree of freedom to see its misfit
BOOTSTRAP = 2000  # draws: 95% ends stable to their printed digit (95% ends want 1000 or more)


@dataclass(frozen=True)
class IsoflopAnalysis:
    """``curves``: one row per (budget, arm); ``scaling``: one row per arm, N_opt ∝ C^exponent;
    ``noise``: the residual sd used for the intervals and where it comes from."""

    curves: list[dict[str, Any]]
    scaling: list[dict[str, Any]]
    noise: Noise


def _design(runs: list[dict[str, Any]]) -> tuple[np.ndarray, list[str]]:
    """(runs, models + seeds - 1) design of loss = mu_model + u_seed, u coded to sum to zero."""
    models = sorted({r["model"] for r in runs})
    seeds = sorted({r["seed"] for r in runs})
    x = np.zeros((len(runs), len(models) + len(seeds) - 1))
    for i, r in enumerate(runs):
        x[i, models.index(r["model"])] = 1.0
        j = seeds.index(r["seed"])
        if j < len(seeds) - 1:
            x[i, len(models) + j] = 1.0
        else:
            x[i, len(models) :] = -1.0
    return x, models


def seed_adjusted(runs: list[dict[str, Any]], y: np.ndarray | None = None) -> tuple[dict[str, Any], np.ndarray]:
    """Per model: mu of the two-way fit loss = mu_model + u_seed (least squares); and the fitted
    values. ``y`` (runs,) or (runs, draws) replaces the runs' losses (mu is then an array per model)."""
    x, models = _design(runs)
    y = np.array([r["final_val_loss"] for r in runs], float) if y is None else y
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    return dict(zip(models, coef[: len(models)], strict=True)), x @ coef


def _dof(runs: list[dict[str, Any]]) -> int:
    return len(runs) - len({r["model"] for r in runs}) - len({r["seed"] for r in runs}) + 1


def _sizes(runs: list[dict[str, Any]]) -> dict[str, float]:
    return {r["model"]: float(r["params"]["active_non_embedding"]) for r in runs}


def _draw_opt(n: np.ndarray, loss: np.ndarray) -> float:
    par, _ = fit_parabola(n, loss)
    if par is not None:
        return par.n_opt
    slope = np.polyfit(np.log(n), loss, 1)[0]
    return math.inf if slope < 0 else 0.0


def _curve(runs: list[dict[str, Any]], noise: Noise, draws: int, seed: int) -> dict[str, Any]:
    adjusted, fitted = seed_adjusted(runs)
    size = _sizes(runs)
    models = sorted(adjusted, key=lambda m: (size[m], m))
    n = np.array([size[m] for m in models])
    loss = np.array([adjusted[m] for m in models], float)
    row: dict[str, Any] = {
        "sizes": len(set(n)),
        "models": models,
        "n": n.tolist(),
        "loss": loss.tolist(),
        "seeds": [sum(r["model"] == m for r in runs) for m in models],
        "studies": dict(sorted(Counter(str(s) for _, s in {(r["model"], r.get("study")) for r in runs}).items())),
        "n_opt": None,
        "n_opt_ci": None,
        "loss_opt": None,
        "bracketed": None,
        "coefficients": None,
        "reason": "",
        "interval_note": "",
    }
    if row["sizes"] < MIN_SIZES:
        row["reason"] = f"an optimum needs {MIN_SIZES} or more sizes at one budget (here {row['sizes']})"
        return row
    par, reason = fit_parabola(n, loss)
    if par is None:
        row["reason"] = reason
        return row
    row.update(n_opt=par.n_opt, loss_opt=par.loss_opt, bracketed=par.bracketed, coefficients=[par.a, par.b, par.c])
    if not noise.usable:
        row["interval_note"] = f"no interval: {noise.source}"
        return row
    rng = np.random.default_rng(seed)
    sigma = sigma_draws(noise, draws, rng)
    sim, _ = seed_adjusted(runs, fitted[:, None] + sigma[None, :] * rng.standard_normal((len(runs), draws)))
    mu = np.array([sim[m] for m in models])  # (models, draws)
    optima = np.array([_draw_opt(n, mu[:, b]) for b in range(draws)])
    row["n_opt_ci"] = interval(optima)
    row["no_minimum"] = (float(np.mean(optima == 0.0)), float(np.mean(optima == math.inf)))
    row["interval_note"] = f"95% bootstrap interval over {draws} draws of the residual noise ({noise.source})"
    return row


def residual_noise(slices: list[list[dict[str, Any]]]) -> Noise:
    """The residual sd of the two-way fits pooled over slices (runs beyond models + seeds - 1)."""
    ss, dof = 0.0, 0
    for runs in slices:
        k = _dof(runs)
        if k > 0:
            _, fitted = seed_adjusted(runs)
            y = np.array([r["final_val_loss"] for r in runs])
            ss, dof = ss + float(((y - fitted) ** 2).sum()), dof + k
    if dof == 0:
        return Noise(math.nan, 0, "no replicate seeds to estimate the residual noise")
    return Noise(math.sqrt(ss / dof), dof, f"residuals of the per-budget seed adjustment ({dof} degrees of freedom)")


def isoflop(records: list[dict[str, Any]], noise: Noise | None = None, draws: int = BOOTSTRAP, seed: int = 0):
    """Seed-adjusted IsoFLOP parabolas per (budget, arm) and N_opt ∝ C^a per arm (see the module).
    ``noise``: the residual sd of one run (the joint law's when it was fitted); by default pooled
    from the per-budget two-way fits."""
    slices: dict[tuple[str, float], list[dict[str, Any]]] = defaultdict(list)
    order: dict[str, tuple] = {}
    for r in finite_runs(records):
        slices[(arm_label(r), r["budget_flops"])].append(r)
        order[arm_label(r)] = (0, 0, 0) if r["arm"] == "dense" else (1, r["experts"], r["top_k"])
    noise = noise if noise is not None and noise.usable else residual_noise(list(slices.values()))
    curves = []
    for arm, budget in sorted(slices, key=lambda k: (order[k[0]], k[1])):
        curves.append({"arm": arm, "budget_flops": budget} | _curve(slices[(arm, budget)], noise, draws, seed))
    return IsoflopAnalysis(curves=curves, scaling=_scaling(curves, order), noise=noise)


def _scaling(curves: list[dict[str, Any]], order: dict[str, tuple]) -> list[dict[str, Any]]:
    rows = []
    for arm in sorted(order, key=order.__getitem__):
        optima = [(c["budget_flops"], c["n_opt"]) for c in curves if c["arm"] == arm and c["bracketed"]]
        row: dict[str, Any] = {"arm": arm, "budgets": len(optima), "exponent": None, "reason": ""}
        if len(optima) < 2:
            row["reason"] = f"needs bracketed optima at 2 or more budgets (got {len(optima)})"
        else:
            c, n_opt = np.array(optima).T
            row["exponent"] = float(np.polyfit(np.log(c), np.log(n_opt), 1)[0])
        rows.append(row)
    return rows
