"""A joint law's forecast of a registered contrast before its runs, and its score after.

    rows = forecast_contrast(records, study)         # per law form: predicted gain, interval, power
    rows = score_forecast(study.registration, gains)  # per registered forecast: inside, error in SEs

A law earns trust by predicting runs it has not seen (GPT-4's report predicted final
loss from 1/1000 of the compute). The forecast of the primary gain, dense - MoE validation loss
averaged over the contrast's seeds, is the law's difference between the two arms at their
planned (N_active, N_total, tokens), the MoE paying rho. Its interval carries the law's
parameter uncertainty (one predicted gain per bootstrap refit) and the sampling noise of a mean
over n seeds (a normal draw with the planning sd of the paired gains over sqrt(n)): a
prediction interval for the number the study will report.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from harness.analysis.law import FORMS, LawFit, fit_law
from harness.analysis.stats import one_sided_power
from harness.study.spec import PrimaryContrast, Registration, Study
from models.accounting import count_params

TARGET_POWER = 0.8


@dataclass(frozen=True)
class ArmPoint:
    model: str
    n_active: float  # non-embedding
    n_total: float
    tokens: float
    routed: bool


def contrast_arms(study: Study, contrast: PrimaryContrast) -> tuple[ArmPoint, ArmPoint]:
    """(dense, MoE) of the contrast as the study plans them: parameters and tokens at its budget."""
    from harness.study.runs import plan

    points = {}
    for run in plan(study):
        if run.budget == contrast.budget and run.model.name in (contrast.dense, contrast.moe):
            c = count_params(run.model)
            points[run.model.name] = ArmPoint(
                run.model.name, c.active_non_embedding, c.total_non_embedding, run.tokens, run.model.moe is not None
            )
    return points[contrast.dense], points[contrast.moe]


def predicted_gain(law: LawFit, dense: ArmPoint, moe: ArmPoint, p: np.ndarray | None = None) -> float:
    """The law's dense - MoE loss at the two arms (average seed)."""
    a = law.loss(dense.n_active, dense.n_total, dense.tokens, dense.routed, p)
    b = law.loss(moe.n_active, moe.n_total, moe.tokens, moe.routed, p)
    return float(a - b)


def seeds_for_power(sd: float, alpha: float, gain: float, target: float = TARGET_POWER, most: int = 200) -> int | None:
    """The fewest seeds whose one-sided paired t reaches ``target`` power at ``gain`` (None: over ``most``)."""
    for n in range(2, most + 1):
        if one_sided_power(sd, n, alpha, gain) >= target:
            return n
    return None


def forecast_contrast(
    records: list[dict[str, Any]],
    study: Study,
    sd: float,
    confidence: float = 0.9,
    bootstrap: int | None = None,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Per law form: the forecast of ``study``'s registered primary gain over its shared seeds
    (``forecast_gains`` at the arms the study plans)."""
    contrast = study.registration.primary
    dense, moe = contrast_arms(study, contrast)
    return forecast_gains(records, dense, moe, contrast.seeds, contrast.alpha, sd, confidence, bootstrap, seed)


def forecast_gains(
    records: list[dict[str, Any]],
    dense: ArmPoint,
    moe: ArmPoint,
    seeds: int,
    alpha: float,
    sd: float,
    confidence: float = 0.9,
    bootstrap: int | None = None,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Per law form the records identify: the predicted mean gain dense - MoE over ``seeds`` seeds,
    its ``confidence`` prediction interval, and the power of the one-sided paired t at level
    ``alpha`` at that gain with planning sd ``sd``."""
    rows = []
    for form in FORMS:
        kwargs = {} if bootstrap is None else {"bootstrap": bootstrap}
        law, reason = fit_law(records, seed=seed, form=form, **kwargs)
        row = {"law": form, "label": FORMS[form].label, "reason": reason, "gain": None, "interval": None}
        rows.append(row)
        if law is None:
            continue
        rng = np.random.default_rng(seed)
        draws = np.array([predicted_gain(law, dense, moe, p) for p in law.draws])
        predictive = draws + sd / math.sqrt(seeds) * rng.standard_normal(len(draws))
        tail = (1 - confidence) / 2 * 100
        gain = predicted_gain(law, dense, moe)
        row.update(
            gain=gain,
            interval=(float(np.percentile(predictive, tail)), float(np.percentile(predictive, 100 - tail))),
            draws=len(draws),
            power=one_sided_power(sd, seeds, alpha, gain),
            seeds_needed=seeds_for_power(sd, alpha, gain) if gain > 0 else None,
        )
    return rows


def score_forecast(registration: Registration | None, gains: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Each registered forecast against the observed mean gain (``stats.paired_gain``'s dict):
    inside its interval or not, the error in nats and in standard errors of the observed mean."""
    if registration is None or registration.forecast is None:
        return []
    rows = []
    for f in registration.forecast.laws:
        row = {"law": f.law, "label": FORMS[f.law].label, "gain": f.gain, "interval": tuple(f.interval)}
        row.update(observed=None, inside=None, error=None, error_se=None, seeds=None)
        if gains is not None:
            se = gains["sd"] / math.sqrt(gains["n"])
            error = gains["mean"] - f.gain
            row.update(
                observed=gains["mean"],
                seeds=gains["n"],
                inside=f.interval[0] <= gains["mean"] <= f.interval[1],
                error=error,
                error_se=error / se if se > 0 else None,
            )
        rows.append(row)
    return rows


def forecast_table(study: Study, records: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """The registered forecasts scored against the primary contrast's result (no rows without any)."""
    from harness.analysis.stats import contrast_gains, paired_gain

    headers = ["law", "where total parameters act", "forecast gain (nats)", "interval", "observed mean gain"]
    headers += ["inside", "error (nats)", "error in SEs of the observed mean"]
    reg = study.registration
    if reg is None or reg.forecast is None or reg.primary is None:
        return headers, []
    g = contrast_gains(records, reg.primary)
    gains = paired_gain(g["gain"], reg.primary.alpha, reg.primary.delta_min) if len(g["gain"]) else None
    level = f"{reg.forecast.confidence:.0%}"
    rows = []
    for r in score_forecast(reg, gains):
        rows.append(
            [
                r["law"],
                r["label"],
                f"{r['gain']:+.4f}",
                f"{level} [{r['interval'][0]:+.4f}, {r['interval'][1]:+.4f}]",
                "-" if r["observed"] is None else f"{r['observed']:+.4f} ({r['seeds']} seeds)",
                "-" if r["inside"] is None else ("yes" if r["inside"] else "no"),
                "-" if r["error"] is None else f"{r['error']:+.4f}",
                "-" if r["error_se"] is None else f"{r['error_se']:+.2f}",
            ]
        )
    return headers, rows
