"""What a study's runs can tell about the joint law (``harness.analysis.law``): from the design
before fitting, and from the fit itself after.

    why, reason = identify(x, ("theta",))   # per parameter '' or the runs that would identify it
    shares = bound_shares(p, draws, draw_y, free, bounds)   # per parameter: draws at the fit's bounds

**The design.** The dense part (E0, A, alpha, B, beta) needs dense runs off one IsoFLOP slice.
Along a slice the training FLOPs per token are affine in N, so ln D departs from a line in ln N
by a few thousandths: an absolute rank test counts that as two dimensions. The check is relative:
the smaller singular value of the centred (ln N, ln D) points over the larger must reach
``MIN_RELATIVE_SPREAD``. theta or phi alone need sparse MoEs (E > k) and, to be told apart from
rho, an E = k run or two sparse E values; both together need sparse MoEs at two or more (active
size, tokens) points, where the parameter and data terms weigh differently.

**The fit.** An interval end that sits at an optimiser's bound is not an estimate:
``bound_shares`` counts, per parameter, the bootstrap draws (and the estimate) at each bound, and
the report prints a parameter with draws there one-sided.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

MIN_RELATIVE_SPREAD = 0.05  # smaller / larger singular value of the centred dense (ln N, ln D) points
SAME_POINT = 0.05  # MoE runs within 5% in active size and tokens sit at one (N_active, D) point
BOUND_TOLERANCE = 1e-5  # a value within this (relative to max(1, |bound|)) of a bound is at it
LAW_PARAMETERS = ("E0", "A", "alpha", "B", "beta", "theta", "phi", "rho")
_INDEX = {name: i for i, name in enumerate(LAW_PARAMETERS)}  # A and B: their logarithms' bounds


@dataclass(frozen=True)
class BoundShare:
    """How much of a parameter's bootstrap sits at the fit's bounds."""

    lower: float  # the bound (E0's upper bound is the smallest loss of each draw: its fitted value here)
    upper: float
    share_lower: float  # share of draws at the lower bound
    share_upper: float
    estimate_at: str  # "lower", "upper" or "": the fitted value itself at a bound

    @property
    def reached(self) -> bool:
        return bool(self.share_lower or self.share_upper or self.estimate_at)


def _at(values: np.ndarray, bound: np.ndarray | float) -> np.ndarray:
    bound = np.asarray(bound, float)
    finite = np.isfinite(bound)
    return finite & (np.abs(values - np.where(finite, bound, 0.0)) <= BOUND_TOLERANCE * np.maximum(1.0, np.abs(bound)))


def bound_shares(
    p: np.ndarray,
    draws: np.ndarray,
    draw_y: np.ndarray,
    free: np.ndarray,
    bounds: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
    y: np.ndarray,
) -> dict[str, BoundShare]:
    """Per fitted parameter (``LAW_PARAMETERS``, A and B by ln A', ln B'): the share of draws at
    each bound and whether the estimate sits at one. ``bounds(y)`` gives the fit's bounds for
    losses y (E0's upper bound depends on them); ``y`` the fitted losses."""
    out = {}
    fit_lo, fit_hi = bounds(y)
    for name, i in _INDEX.items():
        if not free[i]:
            continue
        lo = np.full(len(draws), fit_lo[i])
        hi = np.array([bounds(y)[1][i] for y in draw_y]) if i == 0 else np.full(len(draws), fit_hi[i])
        col = draws[:, i] if len(draws) else np.zeros(0)
        low_share = float(_at(col, lo).mean()) if len(col) else 0.0
        high_share = float(_at(col, hi).mean()) if len(col) else 0.0
        at = "lower" if _at(np.array([p[i]]), fit_lo[i])[0] else ""
        if _at(np.array([p[i]]), fit_hi[i])[0]:
            at = "upper"
        out[name] = BoundShare(float(fit_lo[i]), float(fit_hi[i]), low_share, high_share, at)
    return out


def _describe(points: set[tuple[float, float]]) -> str:
    sizes, tokens = len({n for n, _ in points}), len({d for _, d in points})
    return f"here {len(points)} dense (size, tokens) point(s): {sizes} size(s), {tokens} token count(s)"


def relative_spread(points: set[tuple[float, float]]) -> float:
    """Smaller over larger singular value of the centred (ln N, ln D) points (0: on one line)."""
    if len(points) < 3:
        return 0.0
    design = np.array(sorted(points))
    s = np.linalg.svd(design - design.mean(axis=0), compute_uv=False)
    return float(s[-1] / s[0]) if s[0] > 0 else 0.0


def _dense_why(x: Any) -> str:
    dense = x.routed == 0
    points = {(round(a, 9), round(d, 9)) for a, d in zip(x.ln_na[dense], x.ln_d[dense], strict=True)}
    spread = relative_spread(points)
    if len(points) >= 3 and spread >= MIN_RELATIVE_SPREAD:
        return ""
    budgets = sorted({r["budget_flops"] for r in x.runs if r["arm"] == "dense"})
    smallest = min((r for r in x.runs if r["arm"] == "dense"), key=lambda r: r["params"]["active_non_embedding"])
    one = f"; the points lie on one line in (ln N, ln D) (relative spread {spread:.3f} < {MIN_RELATIVE_SPREAD})"
    return (
        "alpha and beta separately need dense runs of 2 or more sizes at 2 or more budgets, off one IsoFLOP "
        f"slice (3 or more dense (size, tokens) points not on one line in log N, log D), e.g. {smallest['model']} "
        f"and a larger dense size at a budget other than {', '.join(f'{b:g}' for b in budgets)}: "
        f"{_describe(points)}{one if len(points) >= 3 else ''}"
    )


def _distinct(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points further than ``SAME_POINT`` apart in ln N or ln D (the router's few parameters and
    the tokens they cost do not make another point)."""
    out: list[tuple[float, float]] = []
    for a, d in sorted(points):
        if not any(abs(a - b) < SAME_POINT and abs(d - e) < SAME_POINT for b, e in out):
            out.append((a, d))
    return out


def _moe_why(x: Any, moe: tuple[str, ...]) -> dict[str, str]:
    why = dict.fromkeys(("theta", "phi", "rho"), "")
    routed = x.routed == 1
    experts_eq_k = [r["arm"] == "moe" and r["experts"] == r["top_k"] for r in x.runs]
    sparse = [m and v > 1e-6 for v, m in zip(x.ln_ratio, routed, strict=True)]
    ratios = {round(v, 6) for v, s in zip(x.ln_ratio, sparse, strict=True) if s}
    at = _distinct([(a, d) for a, d, s in zip(x.ln_na, x.ln_d, sparse, strict=True) if s])
    names = " and ".join(moe) or "theta"
    if not routed.any():
        why.update(theta=f"{names} need(s) MoEs with E > k (no MoE run here)", rho="rho needs an MoE (none here)")
        why["phi"] = why["theta"]
    elif not ratios:
        why["theta"] = why["phi"] = f"{names} need(s) MoEs with E > k (every MoE here has E = k)"
    elif not any(experts_eq_k) and len(ratios) < 2:
        both = f"{names} and rho separately need an E = k run or MoEs of 2 or more sparse E values (here one)"
        why.update(theta=both, phi=both, rho=both)
    elif len(moe) == 2 and len(at) < 2:
        why["theta"] = why["phi"] = (
            "theta and phi together need sparse MoEs at 2 or more (active size, tokens) points, where the parameter "
            "and data terms weigh differently (here 1): an MoE twin of another dense size, or at another budget"
        )
    return why


def identify(x: Any, moe: tuple[str, ...] = ("theta",)) -> tuple[dict[str, str], str]:
    """Per parameter, '' when the design identifies it or the runs that would; and a reason the
    law cannot be fitted at all ('' when it can). ``moe``: the form's MoE parameters."""
    why = dict.fromkeys(LAW_PARAMETERS, "")
    if not (x.routed == 0).any():
        return why, "no dense run: the law's dense part (E0, A, alpha, B, beta) needs dense runs of several sizes"
    dense_why = _dense_why(x)
    if dense_why:
        for k in ("E0", "A", "alpha", "B", "beta"):
            why[k] = dense_why
        return why, dense_why
    why.update(_moe_why(x, moe))
    if len(moe) == 2 and why["theta"] and "2 or more (active size" in why["theta"]:
        return why, why["theta"]
    return why, ""


def condition(
    x: Any, p: np.ndarray, u: np.ndarray, free: np.ndarray, columns: list[np.ndarray], basis: np.ndarray, f: np.ndarray
) -> tuple[float, list[str]]:
    """Condition number of the column-scaled Jacobian of log L at the solution, and the parameters
    that load on its weakest direction."""
    j = np.column_stack([c for c, keep in zip(columns, free, strict=True) if keep] + [basis]) / f[:, None]
    norms = np.linalg.norm(j, axis=0)
    j = j / np.where(norms > 0, norms, 1.0)
    _, s, vt = np.linalg.svd(j, full_matrices=False)
    cond = float(s[0] / s[-1]) if s[-1] > 0 else math.inf
    names = [n for n, keep in zip(LAW_PARAMETERS, free, strict=True) if keep]
    weak = [names[i] for i in np.flatnonzero(np.abs(vt[-1][: len(names)]) > 0.3)]
    return cond, weak
