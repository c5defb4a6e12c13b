"""Scaling analysis of a study: one joint law over all runs, frontier multipliers, IsoFLOP check.

    a = analyse(records)                         # everything below, as the report uses it
    rows = dense_equivalents(records)            # Clark et al.'s effective parameters (equal tokens)

Everything here is a pure function of run records (the dicts of ``record.json``). The pieces:

- ``harness.analysis.law``: L = E0 + A (N_a^(1-theta) N_t^theta)^-alpha + B D^-beta + rho [routed]
  + u_seed fitted to every run (dense and MoE, every budget), with a bootstrap that carries shared
  seed effects, the local elasticities at the design centre, and which runs would identify what
  the study cannot. Never a power law in N along one IsoFLOP slice: there a larger N sees fewer
  tokens and the curve is U-shaped.
- ``harness.analysis.frontier``: each MoE's compute multiplier against the dense frontier the law
  implies; wall-clock and energy multipliers from it and the measured FLOP rates.
- ``harness.analysis.isoflop``: seed-adjusted IsoFLOP parabolas (Chinchilla approach 2), the
  model-free check.
- ``dense_equivalents``: Clark et al. 2022 ("Unified Scaling Laws for Routed Language Models"):
  dense L(N) fitted over dense runs trained on the MoE's number of training *tokens* (a fixed D,
  so a legitimate L(N)), inverted at the MoE's loss: its effective parameter count.
- ``harness.analysis.clark``, ``harness.analysis.krajewski``: published laws, where they apply.

Losses are final validation losses in nats per token; parameter counts are non-embedding
(Kaplan et al. 2020).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

import numpy as np

from harness.analysis.clark import clark_theta
from harness.analysis.fits import MIN_POINTS, Noise, PowerLawFit, fit_power_law, invert
from harness.analysis.frontier import frontier_multipliers
from harness.analysis.frontier_cost import fastest_dense_costs, optimal_dense_costs
from harness.analysis.isoflop import MIN_SIZES, IsoflopAnalysis, isoflop
from harness.analysis.krajewski import krajewski_check
from harness.analysis.law import BOOTSTRAP, LawFit
from harness.analysis.law_compare import FormComparison, compare_forms
from harness.analysis.stats import arm_label, finite_runs, seed_noise

PARAM_KEY = "active_non_embedding"
TOTAL_KEY = {"active_non_embedding": "total_non_embedding", "active": "total"}
TOKEN_TOLERANCE = 0.05  # runs within 5% of a token count count as trained on that many tokens (Clark)


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
# Clark et al.'s effective parameter count


def _same_tokens(group: list[dict[str, Any]], dense: list[dict[str, Any]]) -> list[dict[str, Any]]:
    tokens = _mean(group, "tokens")
    return [r for r in dense if abs(r["tokens"] - tokens) <= TOKEN_TOLERANCE * tokens]


def dense_equivalents(
    records: list[dict[str, Any]],
    param_key: str = PARAM_KEY,
    total_key: str | None = None,
    bootstrap: int = 1000,
    seed: int = 0,
    noise: Noise | None = None,
) -> list[dict[str, Any]]:
    """Per (MoE model, budget): Clark et al. 2022's effective parameter count, the dense size whose
    fitted loss equals the MoE's (seed means; ``noise`` defaults to ``seed_noise``), from dense
    L(N) fitted over the dense runs trained on the MoE's number of tokens (within
    ``TOKEN_TOLERANCE``, any budget), with ``ratio_active`` = N_eff / active N and ``ratio_total``
    = N_eff / total N. A FLOP-budgeted study has such runs only where dense sizes were given
    budgets in proportion to their size; elsewhere the row's ``reason`` says what is missing."""
    total_key = total_key or TOTAL_KEY.get(param_key)
    runs = finite_runs(records)
    noise = noise if noise is not None else seed_noise(runs)
    dense_runs = [r for r in runs if r["arm"] == "dense"]
    rows = []
    for _, group in _moe_groups(runs):
        dense = _same_tokens(group, dense_runs)
        fit, reason, n, loss = _fit_dense(dense, param_key, noise, bootstrap, seed)
        if fit is None and len(set(n)) < MIN_POINTS:
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
# The whole analysis, as the report uses it


@dataclass(frozen=True)
class ScalingAnalysis:
    noise: Noise  # seed-to-seed sd of one run's loss, pooled over replicated runs (stats.seed_noise)
    law: LawFit | None  # the joint law (theta form) over every run, or None with ``law_reason``
    law_reason: str
    identified: dict[str, str]  # per law parameter: '' or the runs that would identify it
    forms: FormComparison  # every form of the law the runs identify, compared
    effective: list[dict[str, Any]]  # Clark et al. 2022, at equal tokens
    multiplier_flops: list[dict[str, Any]]  # against the dense frontier of the law
    multiplier_seconds: list[dict[str, Any]]  # (a) the frontier's dense size at its own FLOP/s
    fastest_seconds: list[dict[str, Any]]  # (b) the fastest dense run reaching the MoE's loss
    multiplier_energy: list[dict[str, Any]]  # (a) in joules; empty unless every run has NVML energy
    fastest_energy: list[dict[str, Any]]
    isoflop: IsoflopAnalysis
    clark: list[dict[str, Any]]  # theta implied by Clark et al. 2022's S-BASE law
    krajewski: list[dict[str, Any]]
    studies: dict[str, int] = field(default_factory=dict)  # study -> runs it gives the analysis
    model_studies: dict[str, str] = field(default_factory=dict)  # model -> the studies of its runs
    refusals: list[str] = field(default_factory=list)  # pooled sources refused, one line each

    @property
    def pooled(self) -> bool:
        return len(self.studies) > 1


def analyse(
    records: list[dict[str, Any]], bootstrap: int = BOOTSTRAP, seed: int = 0, refusals: list[str] | None = None
) -> ScalingAnalysis:
    """Every scaling analysis of ``records`` (a study's, with any pooled studies' runs; seeded: the
    same records give the same numbers, in any order)."""
    from harness.analysis.law import law_data
    from harness.analysis.law_design import identify

    runs = finite_runs(records)
    noise = seed_noise(runs)
    forms = compare_forms(runs, bootstrap=bootstrap, seed=seed) if runs else compare_forms([], 0)
    law, law_reason = (forms.fits["theta"], forms.reasons["theta"]) if runs else (None, "no run with a finite loss")
    identified = law.identified if law is not None else (identify(law_data(runs))[0] if runs else {})
    flops = frontier_multipliers(runs, law, law_reason)
    resid = (
        Noise(law.sd_resid, law.resid_dof, f"the joint law's residual sd ({law.resid_dof} degrees of freedom)")
        if law is not None
        else None
    )
    energy = bool(runs) and all(r.get("gpu_energy_j") is not None for r in runs)
    studies: dict[str, int] = defaultdict(int)
    of_model: dict[str, set[str]] = defaultdict(set)
    for r in runs:
        studies[str(r.get("study"))] += 1
        of_model[r["model"]].add(str(r.get("study")))
    return ScalingAnalysis(
        noise=noise,
        law=law,
        law_reason=law_reason,
        identified=identified,
        forms=forms,
        effective=dense_equivalents(runs, bootstrap=bootstrap, seed=seed, noise=noise),
        multiplier_flops=flops,
        multiplier_seconds=optimal_dense_costs(runs, flops, "train_seconds"),
        fastest_seconds=fastest_dense_costs(law, "train_seconds"),
        multiplier_energy=optimal_dense_costs(runs, flops, "gpu_energy_j") if energy else [],
        fastest_energy=fastest_dense_costs(law, "gpu_energy_j") if energy else [],
        isoflop=isoflop(runs, noise=resid, seed=seed),
        clark=clark_theta(runs),
        krajewski=krajewski_check(runs),
        studies=dict(sorted(studies.items())),
        model_studies={m: ", ".join(sorted(s)) for m, s in of_model.items()},
        refusals=list(refusals or []),
    )


def isoflop_curves(a: ScalingAnalysis) -> list[dict[str, Any]]:
    """The curves worth drawing: an optimum needs MIN_SIZES or more sizes at a budget."""
    return [c for c in a.isoflop.curves if c["sizes"] >= MIN_SIZES]
