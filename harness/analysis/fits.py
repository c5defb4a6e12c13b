"""Curve fits of the scaling analysis, with intervals that carry seed noise.

    noise = Noise(sd=0.02, dof=4, source="4 replicate seeds")
    fit, reason = fit_power_law(n, loss, seeds=[2, 2, 2], noise=noise)   # L(N) = E + A * N**-alpha
    inv, reason = invert(fit, 3.1, loss_seeds=2)                         # the N that reaches 3.1 nats
    par, reason = fit_parabola(n, loss)                                  # IsoFLOP parabola in ln N

A function that can fail for want of data returns ``(result, reason)``: ``(result, "")`` on
success, ``(None, reason)`` otherwise. Nothing raises for too few points.

**Noise model.** A run's final loss is its expected value plus seed noise (initialisation and
data order), independent across runs with one standard deviation sigma; a point averaged over n
seeds has sigma / sqrt(n). sigma comes from replicate seeds pooled over the study
(``harness.analysis.stats.seed_noise``) or, without replicates, from a fit's residuals (points - 3
degrees of freedom). Intervals come from a parametric bootstrap: each draw takes
sigma* = sigma_hat * sqrt(dof / chi2_dof), the sampling distribution of a variance estimate
with dof degrees of freedom, new losses fitted + sigma* / sqrt(n) * z, and refits; an inversion
also redraws the loss it inverts. Below ``MIN_NOISE_DOF`` degrees of freedom no interval is
given. Resampling the points themselves cannot do this job with the few sizes a study has: three
sizes fit a three-parameter law exactly, so every resample returns the same curve and the
interval is a point, and with four sizes a nominal 95% interval covered about 83% of true values
(``tests/analysis/test_scaling.py`` checks the coverage of this one on synthetic data).

**Degenerate fits.** A fit whose losses do not fall with size, or whose exponent runs to its
bound, does not describe the data: it is returned as ``(None, reason)`` so that no number
(asymptote, dense-equivalent size, multiplier) is derived from it. An inversion more than
``MAX_EXTRAPOLATION`` times outside the fitted range is refused for the same reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
from scipy.optimize import least_squares

F_SCALE = 0.02  # nats: about the seed-to-seed spread of a final loss; larger residuals count linearly
LOW, HIGH = 2.5, 97.5  # percentiles of the bootstrap intervals
MIN_POINTS = 3  # distinct x values a three-parameter power law or a parabola needs
MIN_NOISE_DOF = 2  # degrees of freedom of the noise estimate below which no interval is given
MAX_EXTRAPOLATION = 10.0  # an inversion beyond x_max * 10 or below x_min / 10 is not reported
_ALPHA_BOUNDS = (math.log(1e-3), math.log(5.0))  # ln alpha: keeps x**-alpha finite over any span
_AT_BOUND = 0.01  # ln alpha within this of a bound: the exponent ran to its bound


@dataclass(frozen=True)
class Noise:
    """Seed noise of one final loss: standard deviation ``sd`` (nats) with ``dof`` degrees of freedom."""

    sd: float
    dof: int
    source: str

    @property
    def usable(self) -> bool:
        return self.dof >= MIN_NOISE_DOF and math.isfinite(self.sd) and self.sd >= 0


@dataclass(frozen=True)
class PowerLawFit:
    """L(x) = E + A * x**-alpha over x in [x_min, x_max] (x is N, or compute C for a loss-versus-budget fit).

    The ``*_ci`` fields are parametric-bootstrap percentile intervals (2.5 %, 97.5 %) over
    ``draws`` refits; None, with ``interval_reason``, when the noise could not be estimated.
    """

    E: float
    A: float
    alpha: float
    x_min: float
    x_max: float
    points: int  # points fitted (each a seed average)
    rmse: float  # root-mean-square residual, nats
    noise_sd: float | None = None  # sigma of one run's loss used for the intervals
    noise_dof: int = 0
    noise_source: str = ""
    interval_reason: str = ""  # why there is no interval ('' when there is one)
    E_ci: tuple[float, float] | None = None
    A_ci: tuple[float, float] | None = None
    alpha_ci: tuple[float, float] | None = None
    draws: int = 0  # bootstrap refits that converged
    skipped: int = 0  # bootstrap draws whose refit did not converge
    samples: np.ndarray | None = field(default=None, repr=False, compare=False)  # (draws, 4): E, A, alpha, sigma*

    def predict(self, x: float | np.ndarray) -> float | np.ndarray:
        return self.E + self.A * np.power(x, -self.alpha)


@dataclass(frozen=True)
class Inversion:
    """The x at which a fit reaches a loss; ``extrapolated`` when x lies outside the fitted range.

    ``ci`` inverts each bootstrap draw of the fit at a loss redrawn with its own seed noise (a
    draw whose asymptote is at or above that loss gives x = inf).
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


def interval(values: np.ndarray) -> tuple[float, float]:
    """Percentile interval taken on order statistics (no interpolation, so infinite draws are allowed)."""
    return (
        float(np.percentile(values, LOW, method="lower")),
        float(np.percentile(values, HIGH, method="higher")),
    )


def interval_mc_error(values: np.ndarray) -> tuple[float, float]:
    """Monte-Carlo standard error of each end of ``interval(values)``: half the spread between the
    order statistics one binomial sd (sqrt(B q (1 - q)) ranks) either side of the end's rank, the
    distribution-free error of a sample quantile. Zero where the draws there are equal (a bound)."""
    x = np.sort(np.asarray(values, float))
    b = len(x)
    out = []
    for q in (LOW / 100, HIGH / 100):
        rank, half = q * (b - 1), math.sqrt(b * q * (1 - q))
        lo, hi = int(max(0, math.floor(rank - half))), int(min(b - 1, math.ceil(rank + half)))
        spread = x[hi] - x[lo]
        out.append(float(spread / 2) if np.isfinite(spread) else math.inf)
    return out[0], out[1]


def sigma_draws(noise: Noise, draws: int, rng: np.random.Generator) -> np.ndarray:
    """``draws`` values of sigma from the sampling distribution of its estimate (scaled inverse chi-square)."""
    return noise.sd * np.sqrt(noise.dof / rng.chisquare(noise.dof, draws))


# ---------------------------------------------------------------------------------------------
# Power law


def _solve(
    x: np.ndarray, y: np.ndarray, starts: list[np.ndarray], loss: str, f_scale: float
) -> tuple[float, float, float] | None:
    """Least squares for (E, ln A', ln alpha) with x already scaled to about 1; the best of ``starts``."""
    log_x = np.log(x)

    def residuals(theta: np.ndarray) -> np.ndarray:
        e, log_a, log_alpha = theta
        return e + np.exp(log_a - np.exp(log_alpha) * log_x) - y

    def jacobian(theta: np.ndarray) -> np.ndarray:
        _, log_a, log_alpha = theta
        alpha = np.exp(log_alpha)
        power = np.exp(log_a - alpha * log_x)
        return np.stack([np.ones_like(log_x), power, -power * alpha * log_x], axis=1)

    lower = [0.0, -np.inf, _ALPHA_BOUNDS[0]]
    upper = [float(y.min()), np.inf, _ALPHA_BOUNDS[1]]
    best = None
    for theta0 in starts:
        theta0 = np.clip(theta0, np.array(lower) + 1e-12, np.array(upper) - 1e-12)
        try:
            res = least_squares(residuals, theta0, jac=jacobian, bounds=(lower, upper), loss=loss, f_scale=f_scale)
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


def _degenerate(x: np.ndarray, y: np.ndarray, alpha: float) -> str:
    """Why a fitted power law does not describe the points ('' when it does)."""
    slope = float(np.polyfit(np.log(x), y, 1)[0])
    if slope >= 0:
        return f"the loss does not fall with size (slope {slope:+.3g} nats per e-fold): no power law describes it"
    log_alpha = math.log(alpha)
    if log_alpha - _ALPHA_BOUNDS[0] < _AT_BOUND or _ALPHA_BOUNDS[1] - log_alpha < _AT_BOUND:
        return f"the fitted exponent ran to its bound (alpha = {alpha:.3g}): the points do not follow a power law"
    return ""


def _residual_noise(y: np.ndarray, fitted: np.ndarray, seeds: np.ndarray) -> Noise:
    """sigma of one run from a fit's residuals: each point's residual has variance sigma**2 / seeds."""
    dof = len(y) - 3
    if dof < 1:
        return Noise(sd=float("nan"), dof=0, source="no residual degrees of freedom")
    sd = math.sqrt(float(np.sum(seeds * (y - fitted) ** 2)) / dof)
    return Noise(sd=sd, dof=dof, source=f"fit residuals ({dof} degrees of freedom)")


def fit_power_law(
    x: np.ndarray | list[float],
    loss: np.ndarray | list[float],
    seeds: np.ndarray | list[int] | None = None,
    noise: Noise | None = None,
    bootstrap: int = 1000,
    seed: int = 0,
    robust_loss: str = "soft_l1",
    f_scale: float = F_SCALE,
) -> tuple[PowerLawFit | None, str]:
    """Fit L(x) = E + A * x**-alpha (Kaplan et al. 2020; Hoffmann et al. 2022) with E >= 0, A > 0, alpha > 0.

    ``scipy.optimize.least_squares`` with a robust loss (``robust_loss="soft_l1"``, residuals
    beyond ``f_scale`` nats count linearly, as Hoffmann et al. use Huber; ``"linear"`` is
    ordinary least squares) over (E, ln A, ln alpha), E bounded by [0, min(loss)]: the asymptote
    cannot lie above a loss that was reached. x is scaled by its geometric mean while fitting,
    which changes nothing but the conditioning. The best of a few starting points is kept.

    ``seeds`` (default 1 each) says how many runs each loss averages. The intervals use
    ``noise`` when it has ``MIN_NOISE_DOF`` or more degrees of freedom, else the residuals
    (with 5 or more points); otherwise the fit has no interval and ``interval_reason`` says why.
    Needs 3 or more distinct x; a degenerate fit (see the module docstring) is ``(None, reason)``.
    """
    x = np.asarray(x, dtype=float)
    y = np.asarray(loss, dtype=float)
    n_seeds = np.ones_like(x) if seeds is None else np.asarray(seeds, dtype=float)
    if x.shape != y.shape or x.ndim != 1 or n_seeds.shape != x.shape:
        return None, f"x, loss and seeds must be 1-D of one length (got {x.shape}, {y.shape}, {n_seeds.shape})"
    keep = np.isfinite(x) & np.isfinite(y)
    x, y, n_seeds = x[keep], y[keep], n_seeds[keep]
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
    if reason := _degenerate(x, y, alpha):
        return None, reason
    a = float(np.exp(log_a_scaled + alpha * math.log(x_ref)))
    fitted = e + a * x**-alpha
    base = PowerLawFit(
        E=e,
        A=a,
        alpha=alpha,
        x_min=float(x.min()),
        x_max=float(x.max()),
        points=len(x),
        rmse=float(np.sqrt(np.mean((fitted - y) ** 2))),
    )
    used = noise if noise is not None and noise.usable else _residual_noise(y, fitted, n_seeds)
    if not used.usable:
        why = (
            f"no interval: the seed noise needs {MIN_NOISE_DOF} or more degrees of freedom (replicate seeds, "
            f"or {MIN_POINTS + MIN_NOISE_DOF} or more sizes; here {len(x)} sizes"
            + (f", {noise.dof} from seeds" if noise is not None else "")
            + ")"
        )
        return replace(base, interval_reason=why), ""
    start = np.array([e, log_a_scaled, math.log(alpha)])
    samples, skipped = _bootstrap(x / x_ref, fitted, n_seeds, used, start, bootstrap, seed, robust_loss, f_scale)
    samples[:, 1] = np.exp(samples[:, 1] + samples[:, 2] * math.log(x_ref))  # ln A' -> A
    cis = [interval(samples[:, j]) if len(samples) else None for j in range(3)]
    return replace(
        base,
        noise_sd=used.sd,
        noise_dof=used.dof,
        noise_source=used.source,
        E_ci=cis[0],
        A_ci=cis[1],
        alpha_ci=cis[2],
        draws=len(samples),
        skipped=skipped,
        samples=samples if len(samples) else None,
    ), ""


def _bootstrap(
    x_scaled: np.ndarray,
    fitted: np.ndarray,
    n_seeds: np.ndarray,
    noise: Noise,
    start: np.ndarray,
    draws: int,
    seed: int,
    robust_loss: str,
    f_scale: float,
) -> tuple[np.ndarray, int]:
    """Parametric bootstrap: (draws, 4) of E, ln A' (scaled x), alpha, sigma*; and the draws that failed."""
    rng = np.random.default_rng(seed)
    sigmas = sigma_draws(noise, draws, rng)
    out, skipped = [], 0
    for sigma in sigmas:
        y = fitted + sigma / np.sqrt(n_seeds) * rng.standard_normal(len(fitted))
        solved = _solve(x_scaled, y, [start], robust_loss, f_scale) if np.all(y > 0) else None
        if solved is None:
            skipped += 1
            continue
        out.append((solved[0], solved[1], solved[2], float(sigma)))
    return np.array(out, dtype=float).reshape(-1, 4), skipped


def invert(fit: PowerLawFit, loss: float, loss_seeds: int | None = None, seed: int = 0) -> tuple[Inversion | None, str]:
    """The x at which ``fit`` reaches ``loss``: x = (A / (loss - E))**(1 / alpha).

    ``(None, reason)`` when ``loss <= E`` (the law never gets there) or when x lies more than
    ``MAX_EXTRAPOLATION`` times outside the fitted range. ``extrapolated`` is set when x lies
    outside [x_min, x_max]. With ``loss_seeds`` (the runs ``loss`` averages) the interval also
    carries the noise of ``loss`` itself, at each draw's sigma.
    """
    if not math.isfinite(loss):
        return None, "the loss is not finite"
    if loss <= fit.E:
        return None, f"loss {loss:.4f} is at or below the fit's asymptote E = {fit.E:.4f}: no size reaches it"
    log_x = (math.log(fit.A) - math.log(loss - fit.E)) / fit.alpha  # in logs: a flat fit (alpha ~ 0) overflows
    lo, hi = math.log(fit.x_min / MAX_EXTRAPOLATION), math.log(fit.x_max * MAX_EXTRAPOLATION)
    if not lo <= log_x <= hi:
        where = "above" if log_x > hi else "below"
        return None, (
            f"the fit reaches loss {loss:.4f} more than {MAX_EXTRAPOLATION:g}x {where} its fitted range "
            f"[{fit.x_min:.3g}, {fit.x_max:.3g}]: not extrapolated that far"
        )
    x = math.exp(log_x)
    ci = None
    if fit.samples is not None:
        e, a, alpha, sigma = fit.samples.T
        target = np.full_like(e, loss)
        if loss_seeds:
            rng = np.random.default_rng([seed, 1])
            target = loss + sigma / math.sqrt(loss_seeds) * rng.standard_normal(len(e))
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            xs = np.where(target > e, (a / np.maximum(target - e, 1e-300)) ** (1.0 / alpha), np.inf)
        ci = interval(xs)
    return Inversion(x=float(x), extrapolated=not (fit.x_min <= x <= fit.x_max), ci=ci), ""


# ---------------------------------------------------------------------------------------------
# IsoFLOP parabola (Hoffmann et al. 2022, Approach 2)


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
