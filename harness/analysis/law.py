"""One joint law over every run of a study, dense and MoE, every budget, with shared seed effects.

    fit, reason = fit_law(records)               # LawFit, or (None, why the study cannot fit it)
    fit.estimates["theta"], fit.intervals["theta"]
    fit.elasticities["n_total"]                 # -dL/d ln N_total at the design centre

The law (Hoffmann et al. 2022's L = E + A/N^alpha + B/D^beta with Clark et al. 2022's effective
parameter multiplier (N_t / N_a)^theta and a routing penalty):

    L = E0 + A * (N_a^(1-theta) * N_t^theta)^(-alpha) + B * D^(-beta) + rho * [routed] + u_seed

N_a, N_t: active and total non-embedding parameters; D: training tokens; [routed] = 1 for every
MoE run, E = k included (E = k is the dense FFN split in two with a router: it identifies rho);
u_seed: the shift every run of one seed shares (same data order, SCIENCE.md), fixed effects that
sum to zero. theta = 0: only active parameters count; theta = 1: total parameters count fully.

**Fit.** ``scipy.optimize.least_squares`` on log L (Hoffmann et al. 2022, approach 3, fit log L
with a Huber loss) with ``loss="soft_l1"`` and ``F_SCALE_LOG`` (residuals beyond about 1% of
the loss count linearly), an analytic Jacobian, bounds (alpha, beta in [0.01, 2], theta in
[-0.5, 1.5] so that an interval can show where it falls, E0 in [0, min L]) and several starting
points; N and D are scaled by their geometric means while fitting.

**Variance components.** The residual sd (nats) from the linear-scale residuals with n - p
degrees of freedom; the seed sd from the fitted seed effects by the method of moments
(var(u_hat) = sd_seed^2 + sd_resid^2 * mean(1 / runs per seed)), with seeds - 1 degrees of freedom.

**Intervals.** Parametric bootstrap with seed effects: each draw takes sd_seed* and sd_resid* from
the sampling distributions of their estimates (``fits.sigma_draws``), draws one u_seed* ~ N(0,
sd_seed*^2) shared by every run of a seed and residual noise per run, refits, and keeps
percentiles (2.5 %, 97.5 %). Besiroglu et al. 2024 found Hoffmann et al.'s original intervals far
too narrow; this bootstrap carries the noise of the variance estimates themselves.

**Identifiability** (``identify``): from the design, which parameters the runs can separate, and
for each one they cannot, the runs that would; then the rank of the Jacobian at the solution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.optimize import least_squares

from harness.analysis.fits import Noise, interval, sigma_draws
from harness.analysis.stats import finite_runs, main_variant_runs

NAMES = ("E0", "lnA", "alpha", "lnB", "beta", "theta", "rho")
F_SCALE_LOG = 0.01  # on log L: about 0.03 nats at L = 3, twice a run's residual sd on the cpu study
LOWER = np.array([0.0, -30.0, 0.01, -30.0, 0.01, -0.5, -1.0])
UPPER = np.array([np.inf, 30.0, 2.0, 30.0, 2.0, 1.5, 1.0])
MAX_CONDITION = 1e8  # scaled Jacobian condition number above which the fit is numerically unidentified
BOOTSTRAP = 200
ELASTIC = ("n_active", "n_total", "tokens")


@dataclass(frozen=True)
class LawData:
    """The runs as arrays: loss, ln of scaled N_a, N_t, D, routed flag, seed index."""

    runs: list[dict[str, Any]]
    y: np.ndarray
    ln_na: np.ndarray  # ln(N_a / n_ref)
    ln_ratio: np.ndarray  # ln(N_t / N_a)
    ln_d: np.ndarray  # ln(D / d_ref)
    routed: np.ndarray
    seed_index: np.ndarray
    seeds: list[int]
    n_ref: float
    d_ref: float
    left_out: list[str] = field(default_factory=list)
    """MoE models of another routing variant than the one most MoE runs share (ablations): one
    law with one rho describes one way of routing."""


@dataclass(frozen=True)
class LawFit:
    """A fitted joint law. ``estimates``/``intervals`` are keyed by E0, A, alpha, B, beta, theta,
    rho (A and B in unscaled N and D); ``identified`` maps each to '' or why the study cannot
    estimate it; ``elasticities`` (n_active, n_total, tokens) at ``centre``."""

    data: LawData
    p: np.ndarray  # (7,) E0, ln A', alpha, ln B', beta, theta, rho with N, D scaled
    u: np.ndarray  # (seeds,) seed effects, summing to zero
    free: np.ndarray  # (7,) bool: fitted (True) or held at its value
    estimates: dict[str, float]
    intervals: dict[str, tuple[float, float] | None]
    identified: dict[str, str]
    elasticities: dict[str, float]
    elasticity_intervals: dict[str, tuple[float, float] | None]
    centre: dict[str, float]
    sd_resid: float
    resid_dof: int
    sd_seed: float
    seed_dof: int
    condition: float
    draws: np.ndarray = field(repr=False)  # (draws, 7) refitted p
    draw_u: np.ndarray = field(repr=False)  # (draws, seeds) refitted seed effects
    draw_y: np.ndarray = field(repr=False)  # (draws, runs) the simulated losses

    def dense_loss(self, n: np.ndarray, d: np.ndarray, p: np.ndarray | None = None) -> np.ndarray:
        """The law of a dense run (N_t = N_a, not routed, average seed) at N, D in natural units."""
        p = self.p if p is None else p
        ln_n = np.log(np.asarray(n, float) / self.data.n_ref)
        ln_d = np.log(np.asarray(d, float) / self.data.d_ref)
        return p[0] + np.exp(p[1] - p[2] * ln_n) + np.exp(p[3] - p[4] * ln_d)

    def adjusted(self, index: list[int], draw: int | None = None) -> float:
        """Mean loss of runs ``index`` less their seed effects (observed, or of one bootstrap draw)."""
        y = self.data.y if draw is None else self.draw_y[draw]
        u = self.u if draw is None else self.draw_u[draw]
        return float(np.mean(y[index] - u[self.data.seed_index[index]]))


# ---------------------------------------------------------------------------------------------
# Data and the law


def law_data(records: list[dict[str, Any]]) -> LawData:
    runs, left_out = main_variant_runs(finite_runs(records))
    na = np.array([r["params"]["active_non_embedding"] for r in runs], float)
    nt = np.array([r["params"]["total_non_embedding"] for r in runs], float)
    d = np.array([r["tokens"] for r in runs], float)
    seeds = sorted({r["seed"] for r in runs})
    n_ref = float(np.exp(np.log(na).mean())) if runs else 1.0
    d_ref = float(np.exp(np.log(d).mean())) if runs else 1.0
    return LawData(
        runs=runs,
        y=np.array([r["final_val_loss"] for r in runs], float),
        ln_na=np.log(na / n_ref),
        ln_ratio=np.log(nt / na),
        ln_d=np.log(d / d_ref),
        routed=np.array([r["arm"] == "moe" for r in runs], float),
        seed_index=np.array([seeds.index(r["seed"]) for r in runs], int),
        seeds=seeds,
        n_ref=n_ref,
        d_ref=d_ref,
        left_out=left_out,
    )


def _terms(p: np.ndarray, x: LawData) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ln_m = x.ln_na + p[5] * x.ln_ratio  # ln of N_a^(1-theta) N_t^theta, scaled
    return ln_m, np.exp(p[1] - p[2] * ln_m), np.exp(p[3] - p[4] * x.ln_d)


def predict(p: np.ndarray, u: np.ndarray, x: LawData) -> np.ndarray:
    _, t1, t2 = _terms(p, x)
    return p[0] + t1 + t2 + p[6] * x.routed + u[x.seed_index]


def _seed_basis(x: LawData) -> np.ndarray:
    """(runs, seeds - 1): sum-to-zero coding of the seed effects (the last seed is minus the rest)."""
    s = len(x.seeds)
    basis = np.zeros((len(x.y), max(s - 1, 0)))
    for j in range(s - 1):
        basis[:, j] = (x.seed_index == j).astype(float) - (x.seed_index == s - 1)
    return basis


def _unpack(q: np.ndarray, fixed: np.ndarray, free: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(p, u) from the solver's vector: the free parameters, then seeds - 1 seed effects."""
    p = fixed.copy()
    p[free] = q[: free.sum()]
    v = q[free.sum() :]
    return p, np.append(v, -v.sum())


def _solve(
    x: LawData, y: np.ndarray, starts: list[np.ndarray], fixed: np.ndarray, free: np.ndarray
) -> tuple[np.ndarray, np.ndarray, Any] | None:
    """Best robust least-squares fit of log L over ``starts``: (p, u, result) or None."""
    basis = _seed_basis(x)
    log_y = np.log(y)

    def residuals(q):
        p, u = _unpack(q, fixed, free)
        return np.log(np.maximum(predict(p, u, x), 1e-9)) - log_y

    def jacobian(q):
        p, u = _unpack(q, fixed, free)
        ln_m, t1, t2 = _terms(p, x)
        f = np.maximum(predict(p, u, x), 1e-9)
        cols = [np.ones_like(t1), t1, -t1 * ln_m, t2, -t2 * x.ln_d, -t1 * p[2] * x.ln_ratio, x.routed]
        j = np.column_stack([c for c, keep in zip(cols, free, strict=True) if keep] + [basis])
        return j / f[:, None]

    lo = np.concatenate([LOWER[free], np.full(basis.shape[1], -1.0)])
    hi = np.concatenate([UPPER[free], np.full(basis.shape[1], 1.0)])
    hi[0] = float(y.min()) if free[0] else hi[0]
    best = None
    for start in starts:
        q0 = np.clip(np.concatenate([start[free], np.zeros(basis.shape[1])]), lo + 1e-9, hi - 1e-9)
        try:
            res = least_squares(residuals, q0, jac=jacobian, bounds=(lo, hi), loss="soft_l1", f_scale=F_SCALE_LOG)
        except (ValueError, FloatingPointError):
            continue
        if np.all(np.isfinite(res.x)) and (best is None or res.cost < best.cost):
            best = res
    if best is None:
        return None
    p, u = _unpack(best.x, fixed, free)
    return p, u, best


def _starts(x: LawData, fixed: np.ndarray) -> list[np.ndarray]:
    """A small grid of starting points (Hoffmann et al. 2022 used a grid too)."""
    y_min = float(x.y.min())
    out = []
    for e_frac, alpha, beta, theta in [
        (0.5, 0.3, 0.3, 0.5),
        (0.8, 0.3, 0.3, 0.2),
        (0.3, 0.6, 0.2, 0.8),
        (0.8, 0.15, 0.5, 0.5),
        (0.6, 0.5, 0.5, 0.0),
    ]:
        gap = max(y_min * (1 - e_frac), 1e-3)
        s = fixed.copy()
        s[:5] = [e_frac * y_min, math.log(gap / 2), alpha, math.log(gap / 2), beta]
        s[5] = theta
        out.append(s)
    return out


# ---------------------------------------------------------------------------------------------
# What the design identifies


def _describe(points: set[tuple[float, float]]) -> str:
    sizes, tokens = len({n for n, _ in points}), len({d for _, d in points})
    return f"here {len(points)} dense (size, tokens) point(s): {sizes} size(s), {tokens} token count(s)"


def identify(x: LawData) -> tuple[dict[str, str], str]:
    """Per parameter, '' when the design identifies it or the runs that would; and a reason the
    law cannot be fitted at all ('' when it can)."""
    why = dict.fromkeys(("E0", "A", "alpha", "B", "beta", "theta", "rho"), "")
    dense = x.routed == 0
    points = {(round(a, 9), round(d, 9)) for a, d in zip(x.ln_na[dense], x.ln_d[dense], strict=True)}
    need_ab = (
        "alpha and beta separately need dense runs of 2 or more sizes at 2 or more budgets, off one IsoFLOP "
        "slice (3 or more dense (size, tokens) points not on one line in log N, log D)"
    )
    design = np.array([[1.0, a, d] for a, d in points]) if points else np.zeros((0, 3))
    if not dense.any():
        return why, "no dense run: the law's dense part (E0, A, alpha, B, beta) needs dense runs of several sizes"
    if len(points) < 3 or np.linalg.matrix_rank(design, tol=1e-6) < 3:
        for k in ("E0", "A", "alpha", "B", "beta"):
            why[k] = f"{need_ab}; {_describe(points)}"
        return why, why["alpha"]
    routed = x.routed == 1
    experts_eq_k = [r["arm"] == "moe" and r["experts"] == r["top_k"] for r in x.runs]
    sparse = {round(v, 6) for v, m in zip(x.ln_ratio, routed, strict=True) if m and v > 1e-6}
    if not routed.any():
        why["theta"] = "theta needs MoEs with E > k (no MoE run here)"
        why["rho"] = "rho needs an MoE with E = k (no MoE run here)"
    elif not sparse:
        why["theta"] = "theta needs MoEs with E > k (every MoE here has E = k)"
    elif not any(experts_eq_k) and len(sparse) < 2:
        both = "theta and rho separately need an E = k run or MoEs of 2 or more sparse E values (here one)"
        why["theta"] = why["rho"] = both
    return why, ""


def _free(why: dict[str, str]) -> tuple[np.ndarray, np.ndarray]:
    """Which of the 7 parameters are fitted, and the values the others are held at (0)."""
    free = np.ones(7, bool)
    if why["theta"]:
        free[5] = False
    if why["rho"] and "E = k" in why["rho"] and "no MoE" in why["rho"]:
        free[6] = False
    return free, np.zeros(7)


def _condition(x: LawData, p: np.ndarray, u: np.ndarray, free: np.ndarray) -> tuple[float, list[str]]:
    """Condition number of the column-scaled Jacobian of log L at the solution, and the parameters
    that load on its weakest direction when it is too large."""
    ln_m, t1, t2 = _terms(p, x)
    f = predict(p, u, x)
    cols = [np.ones_like(t1), t1, -t1 * ln_m, t2, -t2 * x.ln_d, -t1 * p[2] * x.ln_ratio, x.routed]
    j = np.column_stack([c for c, keep in zip(cols, free, strict=True) if keep] + [_seed_basis(x)]) / f[:, None]
    norms = np.linalg.norm(j, axis=0)
    j = j / np.where(norms > 0, norms, 1.0)
    _, s, vt = np.linalg.svd(j, full_matrices=False)
    cond = float(s[0] / s[-1]) if s[-1] > 0 else math.inf
    names = [n for n, keep in zip(("E0", "A", "alpha", "B", "beta", "theta", "rho"), free, strict=True) if keep]
    weak = [names[i] for i in np.flatnonzero(np.abs(vt[-1][: len(names)]) > 0.3)]
    return cond, weak


# ---------------------------------------------------------------------------------------------
# Fit, variance components, bootstrap


def _variance_components(x: LawData, p: np.ndarray, u: np.ndarray, n_free: int) -> tuple[float, int, float, int]:
    """(sd_resid, its dof, sd_seed, its dof) in nats, from the fit's residuals and seed effects."""
    resid = x.y - predict(p, u, x)
    dof = len(x.y) - n_free - (len(x.seeds) - 1)
    sd_resid = math.sqrt(float(resid @ resid) / dof) if dof > 0 else math.nan
    s = len(x.seeds)
    if s < 2 or dof <= 0:
        return sd_resid, max(dof, 0), 0.0, 0
    per_seed = np.bincount(x.seed_index, minlength=s)
    var_u = float(u @ u) / (s - 1) - sd_resid**2 * float(np.mean(1.0 / per_seed))
    return sd_resid, dof, math.sqrt(max(var_u, 0.0)), s - 1


def _public(p: np.ndarray, x: LawData) -> dict[str, float]:
    """E0, A, alpha, B, beta, theta, rho with A and B in unscaled N and D."""
    return {
        "E0": float(p[0]),
        "A": float(math.exp(p[1] + p[2] * math.log(x.n_ref))),
        "alpha": float(p[2]),
        "B": float(math.exp(p[3] + p[4] * math.log(x.d_ref))),
        "beta": float(p[4]),
        "theta": float(p[5]),
        "rho": float(p[6]),
    }


def centre_of(x: LawData) -> dict[str, float]:
    """The design centre: geometric means of N_a, N_t and D over the runs."""
    return {
        "n_active": float(x.n_ref),
        "n_total": float(x.n_ref * np.exp(x.ln_ratio.mean())),
        "tokens": float(x.d_ref),
    }


def elasticities(p: np.ndarray, x: LawData) -> dict[str, float]:
    """-dL/d ln N_a = alpha (1 - theta) A M^-alpha, -dL/d ln N_t = alpha theta A M^-alpha,
    -dL/d ln D = beta B D^-beta at the design centre (M = N_a^(1-theta) N_t^theta)."""
    ln_m = p[5] * float(x.ln_ratio.mean())  # ln N_a, ln D are 0 at the centre (scaled by their means)
    t1, t2 = math.exp(p[1] - p[2] * ln_m), math.exp(p[3])
    return {"n_active": float(p[2] * (1 - p[5]) * t1), "n_total": float(p[2] * p[5] * t1), "tokens": float(p[4] * t2)}


def _bootstrap(
    x: LawData, p: np.ndarray, components: tuple[float, int, float, int], free: np.ndarray, draws: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Refits on losses drawn from the fitted law with new seed effects and residuals."""
    sd_resid, dof, sd_seed, seed_dof = components
    rng = np.random.default_rng(seed)
    sig_e = sigma_draws(Noise(sd_resid, dof, "fit"), draws, rng)
    sig_s = sigma_draws(Noise(sd_seed, seed_dof, "fit"), draws, rng) if seed_dof else np.zeros(draws)
    mean = predict(p, np.zeros(len(x.seeds)), x)
    ps, us, ys = [], [], []
    for se, ss in zip(sig_e, sig_s, strict=True):
        y = mean + ss * rng.standard_normal(len(x.seeds))[x.seed_index] + se * rng.standard_normal(len(x.y))
        solved = _solve(x, y, [p], p, free) if np.all(y > 0) else None
        if solved is None:
            continue
        ps.append(solved[0])
        us.append(solved[1])
        ys.append(y)
    return np.array(ps).reshape(-1, 7), np.array(us).reshape(-1, len(x.seeds)), np.array(ys).reshape(-1, len(x.y))


def fit_law(records: list[dict[str, Any]], bootstrap: int = BOOTSTRAP, seed: int = 0) -> tuple[LawFit | None, str]:
    """Fit the joint law to every run with a finite loss; ``(None, reason)`` when the design
    cannot identify it (see ``identify``) or the fit is numerically unidentified."""
    x = law_data(records)
    if not x.runs:
        return None, "no run with a finite loss"
    why, reason = identify(x)
    if reason:
        return None, reason
    free, fixed = _free(why)
    n_free = int(free.sum()) + len(x.seeds) - 1
    if len(x.y) - n_free < 1:
        return None, (
            f"{len(x.y)} runs for {n_free} parameters (law and seed effects): no residual degree of freedom; "
            "more runs (seeds, sizes or budgets) are needed"
        )
    solved = _solve(x, x.y, _starts(x, fixed), fixed, free)
    if solved is None:
        return None, "the least-squares solver did not converge"
    p, u, _ = solved
    cond, weak = _condition(x, p, u, free)
    if cond > MAX_CONDITION:
        return None, (
            f"the runs do not separate {', '.join(weak) or 'the parameters'} (Jacobian condition number "
            f"{cond:.2g}): more dense sizes and budgets are needed"
        )
    components = _variance_components(x, p, u, int(free.sum()))
    draws, draw_u, draw_y = (
        _bootstrap(x, p, components, free, bootstrap, seed) if components[1] >= 2 else (np.zeros((0, 7)),) * 3
    )
    publics = [_public(d, x) for d in draws]
    elastic = [elasticities(d, x) for d in draws]
    intervals = {k: interval(np.array([d[k] for d in publics])) if publics else None for k in _public(p, x)}
    return LawFit(
        data=x,
        p=p,
        u=u,
        free=free,
        estimates=_public(p, x),
        intervals=intervals,
        identified=why,
        elasticities=elasticities(p, x),
        elasticity_intervals={k: interval(np.array([e[k] for e in elastic])) if elastic else None for k in ELASTIC},
        centre=centre_of(x),
        sd_resid=components[0],
        resid_dof=components[1],
        sd_seed=components[2],
        seed_dof=components[3],
        condition=cond,
        draws=draws,
        draw_u=draw_u if len(draws) else np.zeros((0, len(x.seeds))),
        draw_y=draw_y if len(draws) else np.zeros((0, len(x.y))),
    ), ""
