"""The scaling section of the report: tables and text from a ``harness.analysis.scaling.ScalingAnalysis``.

    headers, rows = law_table(analysis)
    lines = markdown(analysis, table)      # ``table(name)`` renders one of the report's tables

Numbers are printed only where the analysis produced them; an empty cell carries the reason in
the row's note. Large values switch to scientific notation, so no cell grows without bound.
"""

from __future__ import annotations

from typing import Any

from harness.analysis.isoflop import MIN_SIZES
from harness.analysis.krajewski import EXPANSION_RATE, MIN_TOKENS
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


LAW_ROWS = [  # (key, label, format, what it is)
    ("theta", "theta", ".2f", "0: only active parameters count; 1: total parameters count fully"),
    ("rho", "rho (nats)", "+.4f", "routing penalty: an MoE's loss above dense at equal N_eff and D"),
    ("n_active", "-dL/d ln N_active (nats)", ".4f", "at the design centre"),
    ("n_total", "-dL/d ln N_total (nats)", ".4f", "at the design centre, N_active held"),
    ("tokens", "-dL/d ln D (nats)", ".4f", "at the design centre"),
    ("alpha", "alpha", ".3f", "weakly identified: read with A and E0"),
    ("beta", "beta", ".3f", "weakly identified: read with B and E0"),
    ("E0", "E0 (nats)", ".3f", "weakly identified"),
    ("A", "A", ".3g", "weakly identified"),
    ("B", "B", ".3g", "weakly identified"),
]
_NEEDS = {"n_active": "alpha", "n_total": "theta", "tokens": "beta"}


def law_table(a: ScalingAnalysis) -> tuple[list[str], list[list[Any]]]:
    headers = ["quantity", "estimate [95% bootstrap interval]", "note"]
    law, rows = a.law, []
    for key, label, spec, what in LAW_ROWS:
        why = a.identified.get(_NEEDS.get(key, key), "") if a.identified else ""
        if law is None:
            rows.append([label, "-", "not fitted: see above"])
            continue
        if why:
            rows.append([label, "-", why])
            continue
        value = law.elasticities[key] if key in _NEEDS else law.estimates[key]
        ci = law.elasticity_intervals[key] if key in _NEEDS else law.intervals[key]
        rows.append([label, _g(value, spec) + _ci(ci, spec), what])
    if law is not None:
        rows += [
            [
                "residual sd (nats)",
                _g(law.sd_resid, ".4f"),
                f"one run about the law, {law.resid_dof} degrees of freedom",
            ],
            [
                "seed sd (nats)",
                _g(law.sd_seed, ".4f"),
                f"shared by every run of a seed, {law.seed_dof} degrees of freedom",
            ],
        ]
    return headers, rows


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
    return headers, rows


def multiplier_table(a: ScalingAnalysis) -> tuple[list[str], list[list[Any]]]:
    headers = [
        "budget FLOPs",
        "MoE",
        "seeds",
        "seed-adjusted loss (mean over its seeds)",
        "compute multiplier vs dense frontier",
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
        rows.append(
            [
                budget_label(r["budget_flops"]),
                r["model"],
                r["seeds"],
                _g(r["loss_adjusted"], ".4f"),
                _g(r["multiplier"], ".2f") + _ci(r["multiplier_ci"], ".2f"),
                _g(t.get("multiplier"), ".2f") + _ci(t.get("multiplier_ci"), ".2f"),
                "absent (no NVML energy)" if j is None else _g(j.get("multiplier"), ".2f"),
                _notes(
                    r["reason"],
                    "extrapolated beyond the sampled budgets or dense sizes" if r["extrapolated"] else "",
                    t.get("method") or "",
                ),
            ]
        )
    return headers, rows


def isoflop_table(a: ScalingAnalysis) -> tuple[list[str], list[list[Any]]]:
    headers = ["arm", "budget FLOPs", "sizes", "N_opt (active non-embedding) [95%]", "loss at N_opt", "note"]
    rows = [
        [
            c["arm"],
            budget_label(c["budget_flops"]),
            c["sizes"],
            _g(c["n_opt"]) + _ci(c["n_opt_ci"]),
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
        theta = _g(a.law.estimates["theta"], ".2f") + _ci(a.law.intervals["theta"], ".2f")
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
    return headers, rows


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


def _law_text(a: ScalingAnalysis) -> list[str]:
    fitted = (
        "L = E0 + A·(N_a^(1−θ)·N_t^θ)^(−α) + B·D^(−β) + ρ·[routed] + u_seed, fitted to every run with a finite loss "
        "(dense and MoE, every budget; N_a, N_t: active and total non-embedding parameters, D: training tokens, "
        "[routed] = 1 for every MoE including E = k, u_seed: one shift shared by every run of a seed, fixed effects "
        "summing to zero). θ = 0 means only active parameters count and θ = 1 that total parameters count fully; "
        "(N_t/N_a)^θ is the effective-parameter multiplier of Clark et al. 2022. The fit is robust least squares on "
        "log L (soft-L1, as Hoffmann et al. 2022 fit log L with a Huber loss) from several starting points."
    )
    if a.law is None:
        return [fitted, "", f"**The study cannot fit this law**: {a.law_reason}.", ""]
    law = a.law
    c = law.centre
    ablations = (
        [
            f"Left out of the law: {', '.join(law.data.left_out)}, routed otherwise than the MoE runs it describes "
            "(one law with one ρ describes one way of routing and balancing; these ablations are compared run by "
            "run in the tables above).",
            "",
        ]
        if law.data.left_out
        else []
    )
    return [
        fitted,
        "",
        *ablations,
        f"Variance components from the fit: residual sd {law.sd_resid:.4f} nats ({law.resid_dof} degrees of freedom), "
        f"seed sd {law.sd_seed:.4f} nats ({law.seed_dof} degrees of freedom). Intervals are 95% percentile intervals "
        f"of a parametric bootstrap ({len(law.draws)} refits) that redraws one seed shift per seed, shared by all its "
        "runs, and a residual per run, with both sds drawn from the sampling distributions of their estimates "
        "(Besiroglu et al. 2024 found Hoffmann et al.'s original intervals far too narrow). E0, A, α and B trade off "
        "against each other; θ, ρ and the local elasticities at the design centre (N_active "
        f"{c['n_active']:.3g}, N_total {c['n_total']:.3g}, D {c['tokens']:.3g}: geometric means over the runs) are "
        "better identified, so the table leads with them.",
        "",
    ]


def _identification_text(a: ScalingAnalysis) -> list[str]:
    missing = {}
    for name, why in (a.identified or {}).items():
        if why:
            missing.setdefault(why, []).append(name)
    if not missing:
        return ["Every parameter of the law is identified by this design.", ""]
    lines = ["What this study cannot identify, and the runs that would:", ""]
    lines += [f"- {', '.join(names)}: {why}." for why, names in missing.items()]
    return [*lines, ""]


def _multiplier_text(a: ScalingAnalysis) -> list[str]:
    method = next((r["method"] for r in a.multiplier_flops if r["method"]), "")
    return [
        "Compute multiplier against the dense frontier of the law (SCIENCE.md: compare an MoE with the dense "
        "*frontier* at equal FLOPs, not one fixed dense size): the frontier loss at compute C is the dense law "
        "minimised over N at D = C / FLOPs-per-token(N); the multiplier is the dense compute C* whose frontier loss "
        "equals the MoE's seed-adjusted loss (its runs' mean less their fitted seed effects), over the MoE's FLOPs. "
        "Above 1: the dense frontier needs more FLOPs for the MoE's loss. "
        + (f"Method: {method}. " if method else "")
        + "The wall-clock (energy) multiplier is that FLOP multiplier times the MoE's training FLOP/s (FLOP/J) over "
        "its matched dense base's (same budget, closest active parameters), the ratio taken per seed both ran and "
        "averaged in logs over those seeds. Switch Transformers' 7x is a wall-clock speed-up at 128 or more "
        "experts and far larger scale, not a FLOP multiplier, so it is not set beside these.",
        "",
    ]


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
        *_law_text(a),
        *([table("joint_law"), ""] if a.law is not None else []),
        *_identification_text(a),
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
