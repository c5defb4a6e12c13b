"""The scaling section of the report: tables and text from a ``harness.analysis.scaling.ScalingAnalysis``.

    headers, rows = fit_table(analysis)
    lines = markdown(analysis, table)      # ``table(name)`` renders one of the report's tables

Numbers are printed only where the analysis produced them; an empty cell carries the reason in
the row's note. Large values switch to scientific notation, so no cell grows without bound.
"""

from __future__ import annotations

from typing import Any

from harness.analysis.fits import MAX_EXTRAPOLATION
from harness.analysis.scaling import ScalingAnalysis
from harness.study import budget_label


def _g(x: float | None, spec: str = ".3g") -> str:
    if x is None:
        return "-"
    if spec.endswith("f") and abs(x) >= 1e5:
        spec = ".3g"
    return format(x, spec)


def _ci(ci: tuple[float, float] | None, spec: str = ".3g") -> str:
    return "" if ci is None else f" [{_g(ci[0], spec)}, {_g(ci[1], spec)}]"


def _notes(*parts: str) -> str:
    return "; ".join(p for p in parts if p) or "-"


def fit_table(a: ScalingAnalysis) -> tuple[list[str], list[list[Any]]]:
    headers = ["budget FLOPs", "dense sizes", "E (nats)", "A", "alpha", "rmse", "note"]
    rows = []
    for budget, fit in a.dense_fits.items():
        if fit is None:
            rows.append([budget_label(budget), "-", "-", "-", "-", "-", a.dense_fit_reasons[budget]])
            continue
        noise = f"noise sd {fit.noise_sd:.3g} from {fit.noise_source}" if fit.noise_sd is not None else ""
        rows.append(
            [
                budget_label(budget),
                fit.points,
                _g(fit.E, ".3f") + _ci(fit.E_ci, ".3f"),
                _g(fit.A) + _ci(fit.A_ci),
                _g(fit.alpha, ".3f") + _ci(fit.alpha_ci, ".3f"),
                _g(fit.rmse, ".3g"),
                _notes(noise, fit.interval_reason),
            ]
        )
    return headers, rows


def _equivalent_rows(rows_in: list[dict[str, Any]]) -> list[list[Any]]:
    rows = []
    for r in rows_in:
        extrapolated = "extrapolated beyond the dense sizes" if r["extrapolated"] else ""
        falling = "dense loss does not fall with N at this budget" if r.get("dense_monotone") is False else ""
        rows.append(
            [
                budget_label(r["budget_flops"]),
                r["model"],
                _g(r["loss"], ".4f"),
                _g(r["dense_equivalent_n"]) + _ci(r["dense_equivalent_n_ci"]),
                _g(r["ratio_active"], ".2f") + _ci(r["ratio_active_ci"], ".2f"),
                _g(r["ratio_total"], ".2f") + _ci(r["ratio_total_ci"], ".2f"),
                _notes(r["reason"], extrapolated, falling, r["interval_note"] if r["ratio_active"] else ""),
            ]
        )
    return rows


def equivalent_table(a: ScalingAnalysis) -> tuple[list[str], list[list[Any]]]:
    headers = ["budget FLOPs", "MoE", "val loss", "dense N of equal loss", "/ active N", "/ total N", "note"]
    return headers, _equivalent_rows(a.equivalent)


def effective_table(a: ScalingAnalysis) -> tuple[list[str], list[list[Any]]]:
    headers = ["budget FLOPs", "MoE", "val loss", "effective N", "/ active N", "/ total N", "note"]
    return headers, _equivalent_rows(a.effective)


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
        unmatched = "closest dense differs by more than 5% in active parameters"
        rows.append(
            [
                budget_label(r["budget_flops"]),
                r["model"],
                r["dense_model"] or "-",
                r["method"] or "-",
                _g(r["multiplier"], ".2f") + _ci(r["multiplier_ci"], ".2f"),
                _g(t.get("multiplier"), ".2f") + _ci(t.get("multiplier_ci"), ".2f"),
                "absent (no NVML energy)" if j is None else _g(j.get("multiplier"), ".2f"),
                _notes(
                    r["reason"],
                    "extrapolated" if r["extrapolated"] else "",
                    unmatched if r["matched_within_5pct"] is False else "",
                    r["interval_note"] if r["multiplier"] is not None else "",
                ),
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


def krajewski_table(a: ScalingAnalysis) -> tuple[list[str], list[list[Any]]]:
    headers = ["run", "total non-embedding N", "tokens", "G", "predicted gap", "observed gap", "note"]
    rows = [
        [
            r["run_id"],
            _g(r["n_total_non_embedding"]),
            _g(r["tokens"]),
            _g(r["granularity"]),
            _g(r["predicted_gap"], "+.3f"),
            _g(r["observed_gap"], "+.4f"),
            r["reason"] or "-",
        ]
        for r in a.krajewski
        if r["arm"] != "dense"
    ]
    return headers, rows


def _multiplier_finding(a: ScalingAnalysis) -> str:
    """One sentence: what this study finds for the compute multiplier, against Switch's 7x."""
    top = max((r["budget_flops"] for r in a.multiplier_flops), default=None)
    rows = [r for r in a.multiplier_flops if r["budget_flops"] == top and r["multiplier"] is not None]
    if not rows:
        return "This study has no compute multiplier (a dense model needs two or more budgets)."
    secs = {r["model"]: r for r in a.multiplier_seconds if r["budget_flops"] == top}
    parts = []
    for r in sorted(rows, key=lambda r: r["model"]):
        t = secs.get(r["model"], {})
        text = f"{r['arm']} x{_g(r['multiplier'], '.2f')}{_ci(r['multiplier_ci'], '.2f')} in FLOPs"
        if t.get("multiplier") is not None:
            text += f", x{_g(t['multiplier'], '.2f')} in wall-clock time"
        parts.append(text)
    intervals = (
        " Intervals are 95% and carry the seed noise of the dense points and of the MoE's own loss."
        if any(r["multiplier_ci"] for r in rows)
        else ""
    )
    return (
        f"At the largest budget ({budget_label(top)} FLOPs) this study finds: {'; '.join(parts)} "
        f"(above 1: the MoE saves compute; Switch Transformers reported 7x at far larger scale).{intervals}"
    )


def markdown(a: ScalingAnalysis, table) -> list[str]:
    """The scaling section of report.md; ``table(name)`` renders one of the report's tables."""
    exps = [f"{r['arm']}: a = {r['exponent']:.2f}" for r in a.isoflop.scaling if r["exponent"] is not None]
    noise = (
        f"seed noise of one run's loss: sd {a.noise.sd:.4f} nats ({a.noise.source})"
        if a.noise.dof
        else "no replicate seeds: intervals come from fit residuals where there are 5 or more sizes, else none"
    )
    lines = [
        "## Scaling: active versus total parameters",
        "",
        "Dense fits L(N) = E + A·N^(−α) per budget (N: active non-embedding parameters; robust soft-L1 least "
        f"squares). Intervals are 95% parametric-bootstrap intervals under the seed noise ({noise}). A fit whose "
        "losses do not fall with size, or whose exponent runs to its bound, is reported without numbers.",
        "",
        table("dense_fits"),
        "",
        "Dense-equivalent size at equal FLOPs: where its budget's dense fit reaches the MoE's loss, over its active "
        "and total parameters. Along one budget larger dense models see fewer tokens, so this is an iso-FLOP "
        "quantity, not the effective parameter count of Clark et al. 2022 (below). Inversions more than "
        f"{MAX_EXTRAPOLATION:g}x outside the fitted sizes are not reported.",
        "",
        table("dense_equivalent"),
        "",
        "Effective parameter count (Clark et al. 2022): dense L(N) fitted over dense runs trained on the MoE's "
        "number of tokens, inverted at the MoE's loss.",
        "",
        table("effective_params"),
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
    lines += [
        "Cross-check with the fine-grained MoE law of Krajewski et al. 2024 (N: total non-embedding parameters; "
        "dense runs take the paper's dense row). The law is evaluated only inside the range it was fitted on "
        "(expansion rate 64, 16B tokens or more); absolute levels depend on data and tokenizer, so only MoE - dense "
        "gaps compare.",
        "",
        table("krajewski"),
        "",
    ]
    return lines
