"""One joint law over every run of a study, dense and MoE, every budget, with shared seed effects.

    fit, reason = fit_law(records)               # LawFit of the theta form, or (None, why not)
    fit, reason = fit_law(records, form="phi")   # total parameters acting on the data term instead
    fit.estimates["theta"], fit.intervals["theta"], fit.at_bound["theta"]
    fit.elasticities["n_total"]                 # -dL/d ln N_total at the design centre

The law (Hoffmann et al. 2022's L = E + A/N^alpha + B/D^beta with a routing penalty), in one of
three forms (``FORMS``) that differ in where an MoE's total parameters act, r = N_t / N_a:

    theta:  L = E0 + A * (N_a * r^theta)^(-alpha) + B * D^(-beta)           + rho [routed] + u_seed
    phi:    L = E0 + A * N_a^(-alpha)             + B * (D * r^phi)^(-beta) + rho [routed] + u_seed
    both:   L = E0 + A * (N_a * r^theta)^(-alpha) + B * (D * r^phi)^(-beta) + rho [routed] + u_seed

theta is Clark et al. 2022's effective parameter multiplier r^theta (0: only active parameters
count, 1: total parameters count fully); phi lets the expert pool act on the data term instead;
``both`` is Ludziejewski et al. 2025's joint MoE law (expert count scaling both terms) with its
exponent interactions gamma, zeta held at 0 and E entering through r. N_a, N_t: active and total
non-embedding parameters; D: training tokens; [routed] = 1 for every MoE run, E = k included (the
dense FFN split in two with a router: it identifies rho); u_seed: the shift every run of one seed
shares (same data order), fixed effects that sum to zero.

**Fit.** ``scipy.optimize.least_squares`` on log L (Hoffmann et al. 2022, approach 3, fit log L
with a Huber loss) with ``loss="soft_l1"`` and ``F_SCALE_LOG`` (residuals beyond about 1% of
the loss count linearly), an analytic Jacobian, bounds (``LOWER``, ``UPPER``; E0 at most the
smallest loss) and several starting points; N and D are scaled by their geometric means while
fitting. Runs are read in run-id order, so the numbers do not depend on the order of the records.

**Variance components.** The residual sd (nats) from the linear-scale residuals with n - p
degrees of freedom; the seed sd from the fitted seed effects by the method of moments
(var(u_hat) = sd_seed^2 + sd_resid^2 * mean(1 / runs per seed)), with seeds - 1 degrees of freedom.

**Intervals.** Parametric bootstrap with seed effects: each draw takes sd_seed* and sd_resid* from
the sampling distributions of their estimates (``fits.sigma_draws``), draws one u_seed* ~ N(0,
sd_seed*^2) shared by every run of a seed and residual noise per run, refits, and keeps
percentiles (2.5 %, 97.5 %) with their Monte-Carlo error (``fits.interval_mc_error``). Besiroglu
et al. 2024 found Hoffmann et al.'s original intervals far too narrow; this bootstrap carries the
noise of the variance estimates themselves. A parameter whose draws reach one of the fit's bounds
has no interval end on that side (``at_bound``): the report prints it one-sided.

**Identifiability**: ``harness.analysis.law_design`` judges the design (which parameters the runs
can separate, and the runs that would separate the others) and each fitted parameter (its
draws at a bound).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.optimize import least_squares

from harness.analysis.fits import Noise, interval, interval_mc_error, sigma_draws
from harness.analysis.law_design import BoundShare, bound_shares, condition, identify
from harness.analysis.stats import finite_runs, main_variant_runs

NAMES = ("E0", "lnA", "alpha", "lnB", "beta", "theta", "phi", "rho")
PUBLIC = ("E0", "A", "alpha", "B", "beta", "theta", "phi", "rho")
F_SCALE_LOG = 0.01  # on log L: about 0.03 nats at L = 3, twice a run's residual sd on the cpu study
LOWER = np.array([0.0, -30.0, 0.01, -30.0, 0.01, -0.5, -1.0, -1.0])
UPPER = np.array([np.inf, 30.0, 2.0, 30.0, 2.0, 1.5, 3.0, 1.0])  # E0's upper bound: the smallest loss
MAX_CONDITION = 1e8  # scaled Jacobian condition number above which the fit is numerically unidentified
BOOTSTRAP = 2000  # refits: 95% ends stable to their printed digit (95% ends want 1000 or more)
ELASTIC = ("n_active", "n_total", "tokens")


@dataclass(frozen=True)
class LawForm:
    """Where an MoE's total parameters act: ``moe`` names its free parameters among theta, phi."""

    key: str
    moe: tuple[str, ...]
    label: str
    formula: str


FORMS = {
    "theta": LawForm(
        "theta",
        ("theta",),
        "total parameters act on the parameter term (θ)",
        "L = E0 + A·(N_a^(1−θ)·N_t^θ)^(−α) + B·D^(−β) + ρ·[routed] + u_seed",
    ),
    "phi": LawForm(
        "phi",
        ("phi",),
        "total parameters act on the data term (φ)",
        "L = E0 + A·N_a^(−α) + B·(D·(N_t/N_a)^φ)^(−β) + ρ·[routed] + u_seed",
    ),
    "both": LawForm(
        "both",
        ("theta", "phi"),
        "on both terms (Ludziejewski et al. 2025, γ = ζ = 0)",
        "L = E0 + A·(N_a^(1−θ)·N_t^θ)^(−α) + B·(D·(N_t/N_a)^φ)^(−β) + ρ·[routed] + u_seed",
    ),
}


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
    """A fitted joint law. ``estimates``/``intervals`` are keyed by ``PUBLIC`` (A and B in unscaled
    N and D; theta or phi 0 where the form holds it there); ``identified`` maps each to '' or why
    the design cannot estimate it; ``at_bound`` to the share of draws at each of the fit's bounds;
    ``elasticities`` (n_active, n_total, tokens) at ``centre``."""

    form: LawForm
    data: LawData
    p: np.ndarray  # (8,) E0, ln A', alpha, ln B', beta, theta, phi, rho with N, D scaled
    u: np.ndarray  # (seeds,) seed effects, summing to zero
    free: np.ndarray  # (8,) bool: fitted (True) or held at its value
    estimates: dict[str, float]
    intervals: dict[str, tuple[float, float] | None]
    mc_error: dict[str, tuple[float, float] | None]
    at_bound: dict[str, BoundShare]
    identified: dict[str, str]
    elasticities: dict[str, float]
    elasticity_intervals: dict[str, tuple[float, float] | None]
    elasticity_mc: dict[str, tuple[float, float] | None]
    centre: dict[str, float]
    sd_resid: float
    resid_dof: int
    sd_seed: float
    seed_dof: int
    condition: float
    rss_log: float  # sum of squared residuals of log L at the fit
    draws: np.ndarray = field(repr=False)  # (draws, 8) refitted p
    draw_u: np.ndarray = field(repr=False)  # (draws, seeds) refitted seed effects
    draw_y: np.ndarray = field(repr=False)  # (draws, runs) the simulated losses

    @property
    def parameters(self) -> tuple[str, ...]:
        """The public parameters this form fits."""
        return ("E0", "A", "alpha", "B", "beta", *self.form.moe, "rho")

    def dense_loss(self, n: np.ndarray, d: np.ndarray, p: np.ndarray | None = None) -> np.ndarray:
        """The law of a dense run (N_t = N_a, not routed, average seed) at N, D in natural units."""
        p = self.p if p is None else p
        ln_n = np.log(np.asarray(n, float) / self.data.n_ref)
        ln_d = np.log(np.asarray(d, float) / self.data.d_ref)
        return p[0] + np.exp(p[1] - p[2] * ln_n) + np.exp(p[3] - p[4] * ln_d)

    def loss(self, n_active, n_total, tokens, routed, p: np.ndarray | None = None) -> np.ndarray:
        """The law at any (N_a, N_t, D, routed) in natural units, average seed."""
        p = self.p if p is None else p
        ln_na = np.log(np.asarray(n_active, float) / self.data.n_ref)
        ln_ratio = np.log(np.asarray(n_total, float) / np.asarray(n_active, float))
        ln_d = np.log(np.asarray(tokens, float) / self.data.d_ref)
        t1 = np.exp(p[1] - p[2] * (ln_na + p[5] * ln_ratio))
        t2 = np.exp(p[3] - p[4] * (ln_d + p[6] * ln_ratio))
        return p[0] + t1 + t2 + p[7] * np.asarray(routed, float)

    def adjusted(self, index: list[int], draw: int | None = None) -> float:
        """Mean loss of runs ``index`` less their seed effects (observed, or of one bootstrap draw)."""
        y = self.data.y if draw is None else self.draw_y[draw]
        u = self.u if draw is None else self.draw_u[draw]
        return float(np.mean(y[index] - u[self.data.seed_index[index]]))


# ---------------------------------------------------------------------------------------------
# Data and the law


def law_data(records: list[dict[str, Any]]) -> LawData:
    runs, left_out = main_variant_runs(finite_runs(records))
    runs = sorted(runs, key=lambda r: (str(r.get("study", "")), r["run_id"]))
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


def _terms(p: np.ndarray, x: LawData) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    ln_m = x.ln_na + p[5] * x.ln_ratio  # ln of N_a^(1-theta) N_t^theta, scaled
    ln_de = x.ln_d + p[6] * x.ln_ratio  # ln of D (N_t / N_a)^phi, scaled
    return ln_m, ln_de, np.exp(p[1] - p[2] * ln_m), np.exp(p[3] - p[4] * ln_de)


def predict(p: np.ndarray, u: np.ndarray, x: LawData) -> np.ndarray:
    _, _, t1, t2 = _terms(p, x)
    return p[0] + t1 + t2 + p[7] * x.routed + u[x.seed_index]


def jacobian_columns(p: np.ndarray, x: LawData) -> list[np.ndarray]:
    """d(prediction)/d p for each of the 8 parameters."""
    ln_m, ln_de, t1, t2 = _terms(p, x)
    return [
        np.ones_like(t1),
        t1,
        -t1 * ln_m,
        t2,
        -t2 * ln_de,
        -t1 * p[2] * x.ln_ratio,
        -t2 * p[4] * x.ln_ratio,
        x.routed,
    ]


def seed_basis(x: LawData) -> np.ndarray:
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


def bounds(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The fit's bounds on the 8 parameters for losses ``y`` (E0 at most the smallest loss)."""
    hi = UPPER.copy()
    hi[0] = float(y.min())
    return LOWER.copy(), hi


def _solve(
    x: LawData, y: np.ndarray, starts: list[np.ndarray], fixed: np.ndarray, free: np.ndarray
) -> tuple[np.ndarray, np.ndarray, Any] | None:
    """Best robust least-squares fit of log L over ``starts``: (p, u, result) or None."""
    basis = seed_basis(x)
    log_y = np.log(y)

    def residuals(q):
        p, u = _unpack(q, fixed, free)
        return np.log(np.maximum(predict(p, u, x), 1e-9)) - log_y

    def jacobian(q):
        p, u = _unpack(q, fixed, free)
        f = np.maximum(predict(p, u, x), 1e-9)
        cols = [c for c, keep in zip(jacobian_columns(p, x), free, strict=True) if keep]
        return np.column_stack([*cols, basis]) / f[:, None]

    low, high = bounds(y)
    lo = np.concatenate([low[free], np.full(basis.shape[1], -1.0)])
    hi = np.concatenate([high[free], np.full(basis.shape[1], 1.0)])
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


def _starts(x: LawData, fixed: np.ndarray, free: np.ndarray) -> list[np.ndarray]:
    """A small grid of starting points (Hoffmann et al. 2022 used a grid too)."""
    y_min = float(x.y.min())
    out = []
    for e_frac, alpha, beta, moe in [
        (0.5, 0.3, 0.3, 0.5),
        (0.8, 0.3, 0.3, 0.2),
        (0.3, 0.6, 0.2, 0.8),
        (0.8, 0.15, 0.5, 0.5),
        (0.6, 0.5, 0.5, 0.0),
    ]:
        gap = max(y_min * (1 - e_frac), 1e-3)
        s = fixed.copy()
        s[:5] = [e_frac * y_min, math.log(gap / 2), alpha, math.log(gap / 2), beta]
        s[5:7] = np.where(free[5:7], moe, 0.0)
        out.append(s)
    return out


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


def public(p: np.ndarray, x: LawData) -> dict[str, float]:
    """The ``PUBLIC`` parameters, A and B in unscaled N and D."""
    return {
        "E0": float(p[0]),
        "A": float(math.exp(p[1] + p[2] * math.log(x.n_ref))),
        "alpha": float(p[2]),
        "B": float(math.exp(p[3] + p[4] * math.log(x.d_ref))),
        "beta": float(p[4]),
        "theta": float(p[5]),
        "phi": float(p[6]),
        "rho": float(p[7]),
    }


def centre_of(x: LawData) -> dict[str, float]:
    """The design centre: geometric means of N_a, N_t and D over the runs."""
    return {
        "n_active": float(x.n_ref),
        "n_total": float(x.n_ref * np.exp(x.ln_ratio.mean())),
        "tokens": float(x.d_ref),
    }


def elasticities(p: np.ndarray, x: LawData) -> dict[str, float]:
    """-dL/d ln N_a, -dL/d ln N_t (N_a held) and -dL/d ln D at the design centre:
    with M = N_a r^theta, D_e = D r^phi, r = N_t / N_a, the parameter term T1 = A M^-alpha and the
    data term T2 = B D_e^-beta: alpha (1 - theta) T1 - beta phi T2, alpha theta T1 + beta phi T2,
    beta T2."""
    ratio = float(x.ln_ratio.mean())  # ln N_a, ln D are 0 at the centre (scaled by their means)
    t1 = math.exp(p[1] - p[2] * p[5] * ratio)
    t2 = math.exp(p[3] - p[4] * p[6] * ratio)
    return {
        "n_active": float(p[2] * (1 - p[5]) * t1 - p[4] * p[6] * t2),
        "n_total": float(p[2] * p[5] * t1 + p[4] * p[6] * t2),
        "tokens": float(p[4] * t2),
    }


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
    n = len(NAMES)
    return np.array(ps).reshape(-1, n), np.array(us).reshape(-1, len(x.seeds)), np.array(ys).reshape(-1, len(x.y))


def _free(form: LawForm, why: dict[str, str]) -> np.ndarray:
    """Which of the 8 parameters are fitted; the others are held at 0."""
    free = np.array([True] * 5 + [k in form.moe and not why[k] for k in ("theta", "phi")] + [True])
    if why["rho"] and "no MoE" in why["rho"]:
        free[7] = False
    return free


def fit_law(
    records: list[dict[str, Any]], bootstrap: int = BOOTSTRAP, seed: int = 0, form: str = "theta"
) -> tuple[LawFit | None, str]:
    """Fit the joint law of ``form`` (``FORMS``) to every run with a finite loss; ``(None,
    reason)`` when the design cannot identify it (``law_design.identify``) or the fit is
    numerically unidentified."""
    shape = FORMS[form]
    x = law_data(records)
    if not x.runs:
        return None, "no run with a finite loss"
    why, reason = identify(x, shape.moe)
    if reason:
        return None, reason
    free = _free(shape, why)
    n_free = int(free.sum()) + len(x.seeds) - 1
    if len(x.y) - n_free < 1:
        return None, (
            f"{len(x.y)} runs for {n_free} parameters (law and seed effects): no residual degree of freedom; "
            "more runs (seeds, sizes or budgets) are needed"
        )
    fixed = np.zeros(len(NAMES))
    solved = _solve(x, x.y, _starts(x, fixed, free), fixed, free)
    if solved is None:
        return None, "the least-squares solver did not converge"
    p, u, _ = solved
    cond, weak = condition(x, p, u, free, jacobian_columns(p, x), seed_basis(x), predict(p, u, x))
    if cond > MAX_CONDITION:
        return None, (
            f"the runs do not separate {', '.join(weak) or 'the parameters'} (Jacobian condition number "
            f"{cond:.2g}): more dense sizes and budgets are needed"
        )
    components = _variance_components(x, p, u, int(free.sum()))
    empty = (np.zeros((0, len(NAMES))), np.zeros((0, len(x.seeds))), np.zeros((0, len(x.y))))
    draws, draw_u, draw_y = _bootstrap(x, p, components, free, bootstrap, seed) if components[1] >= 2 else empty
    publics = [public(d, x) for d in draws]
    elastic = [elasticities(d, x) for d in draws]
    values = {k: np.array([d[k] for d in publics]) for k in PUBLIC}
    e_values = {k: np.array([e[k] for e in elastic]) for k in ELASTIC}
    resid_log = np.log(predict(p, u, x)) - np.log(x.y)
    return LawFit(
        form=shape,
        data=x,
        p=p,
        u=u,
        free=free,
        estimates=public(p, x),
        intervals={k: interval(v) if len(v) else None for k, v in values.items()},
        mc_error={k: interval_mc_error(v) if len(v) else None for k, v in values.items()},
        at_bound=bound_shares(p, draws, draw_y, free, bounds, x.y),
        identified=why,
        elasticities=elasticities(p, x),
        elasticity_intervals={k: interval(v) if len(v) else None for k, v in e_values.items()},
        elasticity_mc={k: interval_mc_error(v) if len(v) else None for k, v in e_values.items()},
        centre=centre_of(x),
        sd_resid=components[0],
        resid_dof=components[1],
        sd_seed=components[2],
        seed_dof=components[3],
        condition=cond,
        rss_log=float(resid_log @ resid_log),
        draws=draws,
        draw_u=draw_u,
        draw_y=draw_y,
    ), ""
