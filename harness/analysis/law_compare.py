"""Where an MoE's total parameters act: the joint law's forms (``law.FORMS``) fitted side by side.

    c = compare_forms(records)      # c.fits["theta"], c.rows, c.preferred ("theta", "phi", ... or None)

A law's form is a hypothesis. Where the MoE runs sit at one (N_active, D), "total
parameters act on the parameter term" (theta) and "they act on the data term" (phi) can fit
equally well, and theta's reading as "the share of total parameters that counts" belongs to its
form. Each form the design identifies is fitted to the same runs; they are compared by AICc on
the log-loss residuals (Gaussian likelihood, n ln(RSS/n) + 2k + 2k(k+1)/(n-k-1), k counting the
law's free parameters, the seed effects and the residual variance; Hurvich and Tsai 1989's small-
sample correction, as a study has few runs per parameter), with Akaike weights, and nested forms
(theta or phi inside both) also by a likelihood-ratio test (chi-square, 1 degree of freedom).
The data prefer ``both`` when it is at least ``DECISIVE`` AICc below each one-term form; a one-term
form when it is that far below the other and ``both``, which nests it, gains less than that
(Burnham and Anderson 2002: within 2, both have substantial support; the simpler form is kept);
otherwise they cannot tell.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats

from harness.analysis.law import BOOTSTRAP, FORMS, LawFit, fit_law

DECISIVE = 2.0  # AICc difference below which two forms both have substantial support


@dataclass(frozen=True)
class FormComparison:
    fits: dict[str, LawFit | None]
    reasons: dict[str, str]  # form -> why it was not fitted ('' when it was)
    rows: list[dict[str, Any]]  # per fitted form: k, n, rss_log, aicc, delta, weight, lr_p
    preferred: str | None  # the form the data prefer, or None when they cannot tell (or one form only)

    @property
    def fitted(self) -> list[str]:
        return [f for f, fit in self.fits.items() if fit is not None]

    def verdict(self) -> str:
        """One sentence: which form the data prefer, or that they cannot tell."""
        if len(self.fitted) < 2:
            return "Only one form of the law is identified by these runs, so where total parameters act is not tested."
        if self.preferred is not None:
            aicc = {r["form"]: r["aicc"] for r in self.rows}
            gaps = ", ".join(f"{f} {aicc[f] - aicc[self.preferred]:+.1f}" for f in aicc if f != self.preferred)
            return (
                f"The data prefer the {self.preferred} form ({FORMS[self.preferred].label}): AICc of the others "
                f"against it {gaps} (a one-term form is preferred over both, which nests it, when both gains less "
                f"than {DECISIVE:g})."
            )
        tied = [r["form"] for r in self.rows if r["delta"] < DECISIVE]
        return (
            f"The data cannot tell the {' and '.join(tied)} forms apart (AICc within {DECISIVE:g} of the best): where "
            "an MoE's total parameters act is not identified by these runs, so θ is not read as the share of total "
            "parameters that counts."
        )


def _k(fit: LawFit) -> int:
    return int(fit.free.sum()) + len(fit.data.seeds) - 1 + 1  # law, seed effects, residual variance


def _aicc(n: int, k: int, rss: float) -> float:
    base = n * math.log(rss / n) + 2 * k
    return base + (2 * k * (k + 1) / (n - k - 1) if n - k - 1 > 0 else math.inf)


def compare_forms(records: list[dict[str, Any]], bootstrap: int = BOOTSTRAP, seed: int = 0) -> FormComparison:
    """Every form of the law fitted to ``records`` and compared (see the module)."""
    fits, reasons = {}, {}
    for form in FORMS:
        fits[form], reasons[form] = fit_law(records, bootstrap=bootstrap, seed=seed, form=form)
    rows = []
    for form, fit in fits.items():
        if fit is None:
            continue
        n, k = len(fit.data.y), _k(fit)
        rows.append(
            {"form": form, "n": n, "k": k, "dof": n - k + 1, "rss_log": fit.rss_log, "aicc": _aicc(n, k, fit.rss_log)}
        )
    best = min((r["aicc"] for r in rows), default=math.nan)
    weights = np.array([math.exp(-(r["aicc"] - best) / 2) if math.isfinite(r["aicc"]) else 0.0 for r in rows])
    total = float(weights.sum())
    for r, w in zip(rows, weights / total if total > 0 else weights, strict=True):
        r["delta"] = r["aicc"] - best if math.isfinite(r["aicc"]) and math.isfinite(best) else math.inf
        r["weight"] = float(w)
        r["lr_p"] = _lr_against_both(r, fits)
    return FormComparison(fits=fits, reasons=reasons, rows=rows, preferred=_preferred(rows))


def _preferred(rows: list[dict[str, Any]]) -> str | None:
    """``both`` when it is DECISIVE below each one-term form; else the one-term form DECISIVE below the
    other (``both``, which nests it, adding less than DECISIVE: parsimony); else None."""
    aicc = {r["form"]: r["aicc"] for r in rows}
    single = [f for f in ("theta", "phi") if f in aicc]
    if "both" in aicc and single and all(aicc[f] - aicc["both"] >= DECISIVE for f in single):
        return "both"
    if len(single) == 2:
        best, other = sorted(single, key=aicc.get)
        if aicc[other] - aicc[best] >= DECISIVE and aicc[best] - aicc.get("both", math.inf) < DECISIVE:
            return best
    return None


def _lr_against_both(row: dict[str, Any], fits: dict[str, LawFit | None]) -> float | None:
    """p of the likelihood-ratio test of a one-term form against ``both`` (which nests it); None
    for ``both`` itself or when ``both`` was not fitted."""
    both = fits.get("both")
    if row["form"] == "both" or both is None or both.rss_log <= 0:
        return None
    ratio = row["n"] * math.log(max(row["rss_log"], 1e-300) / both.rss_log)
    return float(stats.chi2.sf(max(ratio, 0.0), 1))
