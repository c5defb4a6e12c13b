"""The scaling section of the report: tables and text from a ``harness.analysis.scaling.ScalingAnalysis``.

    headers, rows = multiplier_table(analysis)
    lines = markdown(analysis, table)      # ``table(name)`` renders one of the report's tables

Numbers are printed only where the analysis produced them; an empty cell carries the reason in
the row's note. Large values switch to scientific notation, so no cell grows without bound.
"""

from __future__ import annotations

from typing import Any

from harness.analysis.isoflop import MIN_SIZES
from harness.analysis.krajewski import EXPANSION_RATE, MIN_TOKENS
from harness.analysis.law_report import estimate_cell, law_lines, mc_note
from harness.analysis.scaling import ScalingAnalysis
from harness.study.spec import budget_label


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


def effective_table(a: ScalingAnalysis) -> tuple[list[str], list[list[Any]]]:
    headers = [
        "budget FLOPs",
        "MoE",
        "val loss (mean over its seeds)",
        "effective N",
        "/ active N",
        "/ total N",
        "note",
    ]
    rows = []
    for r in a.effective:
        extrapolated = "extrapolated beyond the dense sizes" if r["extrapolated"] else ""
        rows.append(
            [
                budget_label(r["budget_flops"]),
                r["model"],
                _g(r["loss"], ".4f"),
                _g(r["dense_equivalent_n"]) + _ci(r["dense_equivalent_n_ci"]),
                _g(r["ratio_active"], ".2f") + _ci(r["ratio_active_ci"], ".2f"),
                _g(r["ratio_total"], ".2f") + _ci(r["ratio_total_ci"], ".2f"),
                _notes(r["reason"], extrapolated, r["interval_note"] if r["ratio_active"] else ""),
            ]
        )
    return with_study(a, headers, rows, 1)


def with_study(a: ScalingAnalysis, headers: list[str], rows: list[list[Any]], at: int):
    """A pooled analysis's table with a 'study' column after column ``at`` (the model's), naming
    the studies of that model's runs; a one-study table unchanged."""
    if not a.pooled:
        return headers, rows
    headers = [*headers[: at + 1], "study", *headers[at + 1 :]]
    return headers, [[*row[: at + 1], a.model_studies.get(row[at], "-"), *row[at + 1 :]] for row in rows]


def _one_sided_ci(ci, spec: str) -> str:
    """' [lo, hi]' with an end beyond the grid shown open; '' without an interval."""
    if ci is None:
        return ""
    lo = "0" if ci[0] == 0 else _g(ci[0], spec)
    hi = "∞" if ci[1] == float("inf") else _g(ci[1], spec)
    return f" [{lo}, {hi}]"


def _mc_note(row: dict[str, Any]) -> str:
    mc = row.get("multiplier_mc")
    finite = [m for m in mc or () if m != float("inf")]
    return mc_note(max(finite)) if finite else ""


def _marked(cell: str, row: dict[str, Any], flagged: set[str]) -> str:
    """``cell`` with † when a training time it rests on is flagged (``flagged``: run ids)."""
    return cell + " †" if cell != "-" and flagged.intersection(row.get("runs") or []) else cell


def multiplier_table(a: ScalingAnalysis, flagged: set[str] | None = None) -> tuple[list[str], list[list[Any]]]:
    """The multipliers of each MoE; ``flagged``: runs whose training time is flagged (their wall-clock
    cells get †)."""
    flagged = flagged or set()
    headers = [
        "budget FLOPs",
        "MoE",
        "study",
        "seeds",
        "seed-adjusted loss (mean over its seeds)",
        "compute multiplier vs dense frontier",
        "frontier's dense N at that compute",
        "wall-clock x (a): compute-optimal dense at its own FLOP/s",
        "wall-clock x (b): fastest dense run reaching the MoE's loss",
        "energy x (a)",
        "note",
    ]
    seconds = {(r["model"], r["budget_flops"]): r for r in a.multiplier_seconds}
    fastest = {(r["model"], r["budget_flops"]): r for r in a.fastest_seconds}
    joules = {(r["model"], r["budget_flops"]): r for r in a.multiplier_energy}
    rows = []
    for r in a.multiplier_flops:
        key = (r["model"], r["budget_flops"])
        t, f, j = seconds.get(key, {}), fastest.get(key, {}), joules.get(key)
        rows.append(
            [
                budget_label(r["budget_flops"]),
                r["model"],
                r.get("study") or "-",
                r["seeds"],
                _g(r["loss_adjusted"], ".4f"),
                _multiplier_cell(r),
                _g(r["dense_n_opt"]),
                _marked(_multiplier_cell(t), t, flagged),
                _marked(_fastest_cell(f), f, flagged),
                "absent (no NVML energy)" if j is None else _g(j.get("multiplier"), ".2f"),
                _notes(
                    r["reason"],
                    "extrapolated beyond the sampled budgets or dense sizes" if r["extrapolated"] else "",
                    _mc_note(r),
                    t.get("reason", "") if t.get("reason") != r["reason"] else "",
                    "(a): N_opt outside the measured dense sizes, held at the nearest one's FLOP/s"
                    if t.get("outside")
                    else "",
                    f.get("reason", "") if f.get("reason") != r["reason"] else "",
                ),
            ]
        )
    return headers, rows


def _multiplier_cell(row: dict[str, Any]) -> str:
    """A multiplier with its interval (an end beyond the grid shown open); '-' without one."""
    return _g(row.get("multiplier"), ".2f") + _one_sided_ci(row.get("multiplier_ci"), ".2f")


def _fastest_cell(f: dict[str, Any]) -> str:
    if f.get("multiplier") is None:
        return "-"
    return f"{f['multiplier']:.2f} ({f['dense']}: {f['dense_cost']:,.0f} {f['unit']} against {f['moe_cost']:,.0f})"


def _sizes(curve: dict[str, Any]) -> str:
    """The number of sizes, and the models each study gave when several did."""
    studies = curve.get("studies") or {}
    if len(studies) < 2:
        return str(curve["sizes"])
    return f"{curve['sizes']} ({', '.join(f'{s}: {n} models' for s, n in studies.items())})"


def _optimum_ci(curve: dict[str, Any]) -> str:
    """The N_opt interval; an end where draws had no minimum (falling or rising throughout) is open."""
    ci = curve["n_opt_ci"]
    if ci is None:
        return ""
    below, above = curve.get("no_minimum", (0.0, 0.0))
    if ci[0] == 0 and ci[1] == float("inf"):
        return f"; no interval ({below:.0%} of draws without a minimum below the sizes, {above:.0%} above)"
    if ci[0] == 0:
        return f", ≤ {_g(ci[1])} ({below:.0%} of draws without a minimum: no lower end)"
    if ci[1] == float("inf"):
        return f", ≥ {_g(ci[0])} ({above:.0%} of draws without a minimum: no upper end)"
    return _ci(ci)


def isoflop_table(a: ScalingAnalysis) -> tuple[list[str], list[list[Any]]]:
    headers = ["arm", "budget FLOPs", "sizes", "N_opt (active non-embedding) [95%]", "loss at N_opt", "note"]
    rows = [
        [
            c["arm"],
            budget_label(c["budget_flops"]),
            _sizes(c),
            _g(c["n_opt"]) + _optimum_ci(c),
            _g(c["loss_opt"], ".4f"),
            _notes(
                c["reason"],
                "optimum outside the sampled sizes" if c["bracketed"] is False else "",
                c["interval_note"],
            ),
        ]
        for c in a.isoflop.curves
    ]
    return headers, rows


def published_table(a: ScalingAnalysis) -> tuple[list[str], list[list[Any]]]:
    headers = ["MoE", "E", "total / active N", "N_eff / N (Clark S-BASE)", "theta_Clark", "theta (this study)"]
    theta = "-"
    if a.law is not None and not a.identified.get("theta"):
        theta = estimate_cell(a.law, "theta", ".2f")[0]
    rows = [
        [
            r["model"],
            r["experts"],
            _g(r["n_total"] / r["n_active"], ".2f"),
            _g(r["multiplier"], ".2f"),
            _g(r["theta"], ".2f") if r["theta"] is not None else r["reason"],
            theta,
        ]
        for r in a.clark
    ]
    return with_study(a, headers, rows, 0)


def krajewski_table(a: ScalingAnalysis) -> tuple[list[str], list[list[Any]]]:
    """Runs inside the fitted range of Krajewski et al. 2024 only (none: no rows)."""
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
        if r["arm"] != "dense" and r["predicted"] is not None
    ]
    return headers, rows


# ---------------------------------------------------------------------------------------------
# Text


def _multiplier_text(a: ScalingAnalysis) -> list[str]:
    method = next((r["method"] for r in a.multiplier_flops if r["method"]), "")
    return [
        "Compute multiplier against the dense frontier of the law (compare an MoE with the dense "
        "*frontier* at equal FLOPs, not one fixed dense size): the frontier loss at compute C is the dense law "
        "minimised over N at D = C / FLOPs-per-token(N); the multiplier is the dense compute C* whose frontier loss "
        "equals the MoE's seed-adjusted loss (its runs' mean less their fitted seed effects), over the MoE's FLOPs. "
        "Above 1: the dense frontier needs more FLOPs for the MoE's loss. "
        + (f"Method: {method}. " if method else "")
        + "Wall-clock multipliers compare with real dense models, never one model's FLOPs at another's speed: "
        "(a) the frontier's compute-optimal dense size at C* trained at its own FLOP/s (interpolated in ln N over the "
        "measured training rates of the dense sizes of the MoE's own study, since pooled studies may have run on "
        "other hosts), over the MoE's measured seconds, with the law's bootstrap; (b) the fastest dense run of the "
        "MoE's study whose seed-adjusted loss reaches the MoE's, its mean training seconds over the MoE's (measured "
        "times, no interval). A cell marked † rests on a training time flagged as disturbed (this study's runs, "
        "under Runs; a pooled study's flags are in its own report). Energy (a) likewise with GPU energy where every "
        "run has it. Switch Transformers' 7x is "
        "a wall-clock speed-up at 128 or more experts and far larger scale, not a FLOP multiplier, so it is not set "
        "beside these.",
        "",
    ]


def _pool_lines(a: ScalingAnalysis) -> list[str]:
    """Which studies' runs the analysis rests on, and the pooled sources refused."""
    lines = []
    if a.pooled:
        shown = ", ".join(f"{study} ({n} runs)" for study, n in a.studies.items())
        lines += [
            f"**Pooled runs.** The law, the dense frontier, the multipliers and the IsoFLOP check below rest on the "
            f"runs of {shown}: studies on the same data, tokenizer, validation sample and recipe (the study file's "
            "`pool:`). The registered contrast, the at-a-glance table and the claims use this study's runs only. "
            "Tables name the study of each MoE; the IsoFLOP sizes say how many each study gave.",
            "",
        ]
    lines += [f"Not pooled: {refusal}." for refusal in a.refusals]
    return [*lines, ""] if a.refusals else lines


def _isoflop_text(a: ScalingAnalysis) -> list[str]:
    exps = [f"{r['arm']}: a = {r['exponent']:.2f}" for r in a.isoflop.scaling if r["exponent"] is not None]
    return [
        "IsoFLOP check, model-free (Chinchilla approach 2): per budget and arm, each model's loss seed-adjusted by "
        "a two-way fit (model + seed) over that budget's runs, so a one-seed model is corrected by its seed's shift "
        f"rather than averaged with three-seed means; a parabola in ln N through {MIN_SIZES} or more sizes; the N_opt "
        f"interval is a 95% bootstrap under the residual noise ({a.isoflop.noise.source}).",
        "",
        *([f"N_opt ∝ C^a over bracketed optima: {'; '.join(exps)}.", ""] if exps else []),
    ]


def _published_text(a: ScalingAnalysis, table) -> list[str]:
    lines = [
        "Published laws beside ours. Clark et al. 2022 (S-BASE, log L = a·log N + b·log Ê + c·log N·log Ê + d, "
        "a −0.082, b −0.108, c 0.009, d 1.104, at a fixed 130B tokens, base models of 15M to 1.3B parameters with "
        "top-1 routing) imply an effective-parameter multiplier at the study's N_active and E; expressed as "
        "(N_t/N_a)^θ it gives θ_Clark, a reference point only (far from their scale and tokens; Ê taken as E, "
        "which for E ≤ 16 against E_max ≈ 315 is within 5%).",
        "",
        table("published_laws") if a.clark else "(no MoE run)",
        "",
        "Ludziejewski et al. 2025 fit a joint law L = a·Ê^δ·N_act^(α+γ·ln Ê) + b·Ê^ω·D^(β+ζ·ln Ê) + c over dense "
        "and MoE runs in which the exponents of N and D change with the expert count, and find that the optimal "
        "learning rate falls as E grows (a study at one learning rate for every E can understate large-E MoEs); "
        "its constants are not used here. Abnar et al. 2025: below about 500M total parameters a total-matched "
        "MoE loses to dense, and the optimal sparsity rises with model size.",
        "",
    ]
    if any(r["predicted"] is not None and r["arm"] != "dense" for r in a.krajewski):
        lines += [
            "Krajewski et al. 2024 (fine-grained MoE law), on the runs inside its fitted range:",
            "",
            table("krajewski"),
            "",
        ]
    else:
        lines += [
            f"Krajewski et al. 2024's fine-grained MoE law is not shown: it was fitted at expansion rate "
            f"{EXPANSION_RATE:g} and on {MIN_TOKENS / 1e9:g}B tokens or more, and no run here is inside that range.",
            "",
        ]
    return lines


def markdown(a: ScalingAnalysis, table, skip=frozenset()) -> list[str]:
    """The scaling section of report.md; ``table(name)`` renders one of the report's tables.
    ``skip``: tables that do not apply to the study (``harness.report.notes.not_applicable``),
    left out with their text."""
    noise = (
        f"Seed-to-seed sd of one run's loss, pooled over replicated runs: {a.noise.sd:.4f} nats ({a.noise.source})."
        if a.noise.dof
        else "No replicate seeds: the seed sd cannot be estimated."
    )
    return [
        "## Scaling: active versus total parameters",
        "",
        "One joint law over all runs, not a power law in N along one IsoFLOP slice (along a slice a larger model "
        "sees fewer tokens and the curve is U-shaped).",
        "",
        *_pool_lines(a),
        *law_lines(a, table),
        noise,
        "",
        *(_multiplier_block(a, table) if "compute_multiplier" not in skip else []),
        *([*_isoflop_text(a), table("isoflop"), ""] if "isoflop" not in skip else []),
        *(
            [
                "Effective parameter count (Clark et al. 2022): dense L(N) fitted over dense runs trained on the "
                "MoE's number of tokens (a fixed D, so a legitimate L(N)), inverted at the MoE's loss.",
                "",
                table("effective_params"),
                "",
            ]
            if "effective_params" not in skip
            else []
        ),
        *_published_text(a, table),
    ]


def _multiplier_block(a: ScalingAnalysis, table) -> list[str]:
    return [
        *_multiplier_text(a),
        table("compute_multiplier"),
        "",
        "A multiplier from one seed carries the spread of the law's variance components only; a difference "
        "between two MoEs whose intervals overlap is not a finding.",
        "",
    ]
