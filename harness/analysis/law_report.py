"""The joint law in the report: its table, the comparison of its forms, what the fit identifies.

    headers, rows = law_table(analysis)      # estimates, one-sided where the draws reach a bound
    headers, rows = forms_table(analysis)    # theta, phi and both side by side (AICc)
    lines = law_lines(analysis, table)       # the text around them

Every number says only what the fit holds: an interval end where 2.5% or more of the bootstrap
draws sit at one of the fit's bounds is not an estimate, so that side is printed open ("θ ≥
0.06; no upper end: 6.5% of draws at the fit's bound 1.5"); each end carries its Monte-Carlo
error; identification is said per parameter, from the design and from the fit.
"""

from __future__ import annotations

from typing import Any

from harness.analysis.fits import HIGH
from harness.analysis.law import FORMS, LawFit
from harness.analysis.law_compare import DECISIVE
from harness.analysis.law_design import BoundShare

OPEN = (100 - HIGH) / 100  # share of draws at a bound from which that interval end is the bound
SYMBOL = {"theta": "θ", "phi": "φ", "rho": "ρ", "alpha": "α", "beta": "β", "E0": "E0", "A": "A", "B": "B"}
LAW_ROWS = [  # (key, label, format, what it is)
    ("theta", "theta", ".2f", "effective parameters N_a·(N_t/N_a)^θ: 0, only active parameters count; 1, total count"),
    ("phi", "phi", ".3f", "effective tokens D·(N_t/N_a)^φ: total parameters acting on the data term"),
    ("rho", "rho (nats)", "+.4f", "routing penalty: an MoE's loss above dense at equal effective N and D"),
    ("n_active", "-dL/d ln N_active (nats)", ".4f", "at the design centre"),
    ("n_total", "-dL/d ln N_total (nats)", ".4f", "at the design centre, N_active held"),
    ("tokens", "-dL/d ln D (nats)", ".4f", "at the design centre"),
    ("alpha", "alpha", ".3f", "weakly identified: read with A and E0"),
    ("beta", "beta", ".3f", "weakly identified: read with B and E0"),
    ("E0", "E0 (nats)", ".3f", "weakly identified"),
    ("A", "A", ".3g", "weakly identified"),
    ("B", "B", ".3g", "weakly identified"),
]
ELASTIC = {"n_active": "alpha", "n_total": "theta", "tokens": "beta"}


def _g(x: float | None, spec: str) -> str:
    if x is None:
        return "-"
    if spec.endswith("f") and abs(x) >= 1e5:
        spec = ".3g"
    return format(x, spec)


def open_ends(share: BoundShare | None) -> tuple[bool, bool]:
    """(lower end open, upper end open): that end of the 95% interval is the fit's bound."""
    if share is None:
        return False, False
    return share.share_lower >= OPEN, share.share_upper >= OPEN


def _bound(key: str, value: float, spec: str) -> str:
    return "its bound on ln " + key if key in ("A", "B") else _g(value, spec.lstrip("+"))


def estimate_cell(law: LawFit, key: str, spec: str) -> tuple[str, str]:
    """(cell, what the bounds say) of one parameter: 'value [lo, hi]' or one-sided or unbounded."""
    value, ci, share = law.estimates[key], law.intervals.get(key), law.at_bound.get(key)
    if ci is None:
        return _g(value, spec), "no interval: the variance components need 2 or more degrees of freedom"
    lo_open, hi_open = open_ends(share)
    sym = SYMBOL.get(key, key)
    at = ""
    if share is not None and share.estimate_at:
        edge = share.lower if share.estimate_at == "lower" else share.upper
        at = f" (estimate at the fit's bound {_bound(key, edge, spec)})"
    if lo_open and hi_open:
        return f"{_g(value, spec)}{at}; not identified", (
            f"{share.share_lower:.1%} of draws at the fit's lower bound {_bound(key, share.lower, spec)}, "
            f"{share.share_upper:.1%} at its upper bound {_bound(key, share.upper, spec)}"
        )
    if hi_open:
        return f"{sym} ≥ {_g(ci[0], spec)}{at}", (
            f"no upper end: {share.share_upper:.1%} of draws at the fit's bound {_bound(key, share.upper, spec)}"
        )
    if lo_open:
        return f"{sym} ≤ {_g(ci[1], spec)}{at}", (
            f"no lower end: {share.share_lower:.1%} of draws at the fit's bound {_bound(key, share.lower, spec)}"
        )
    return f"{_g(value, spec)} [{_g(ci[0], spec)}, {_g(ci[1], spec)}]{at}", ""


def _mc(law: LawFit, key: str, spec: str) -> str:
    mc = law.mc_error.get(key)
    if not mc:
        return ""
    lo_open, hi_open = open_ends(law.at_bound.get(key))
    ends = [e for e, is_open in zip(mc, (lo_open, hi_open), strict=True) if not is_open]
    return mc_note(max(ends)) if ends else ""


def mc_note(error: float) -> str:
    """The Monte-Carlo error of an interval's ends, to two significant digits."""
    return f"ends ±{error:.2g} (Monte Carlo)"


def _notes(*parts: str) -> str:
    return "; ".join(p for p in parts if p) or "-"


def identified(law: LawFit, key: str) -> bool:
    """Whether the fit identifies a parameter: its design does, and no interval end is a bound."""
    return not law.identified.get(key) and not any(open_ends(law.at_bound.get(key)))


def law_table(a: Any) -> tuple[list[str], list[list[Any]]]:
    headers = ["quantity", "estimate [95% bootstrap interval]", "note"]
    law, rows = a.law, []
    preferred = a.forms.preferred
    for key, label, spec, what in LAW_ROWS:
        if law is None:
            rows.append([label, "-", "not fitted: see above"])
            continue
        if key in FORMS and key not in law.form.moe:
            continue
        why = law.identified.get(ELASTIC.get(key, key), "")
        if why:
            rows.append([label, "-", why])
            continue
        if key in ELASTIC:
            ci = law.elasticity_intervals[key]
            cell = _g(law.elasticities[key], spec) + ("" if ci is None else f" [{_g(ci[0], spec)}, {_g(ci[1], spec)}]")
            mc = law.elasticity_mc.get(key)
            rows.append([label, cell, _notes(what, mc_note(max(mc)) if mc else "")])
            continue
        cell, bound = estimate_cell(law, key, spec)
        if key == "theta" and preferred != "theta":
            what = "the θ form's parameter; not read as the share of total parameters that counts (see the forms below)"
        rows.append([label, cell, _notes(what, bound, _mc(law, key, spec))])
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


def forms_table(a: Any) -> tuple[list[str], list[list[Any]]]:
    """The forms of the law side by side: fit, AICc, weight, and their MoE parameters."""
    headers = ["form", "where total parameters act", "runs", "parameters", "RSS of ln L", "AICc", "ΔAICc", "weight"]
    headers += ["θ", "φ", "ρ (nats)", "note"]
    rows = []
    by_form = {r["form"]: r for r in a.forms.rows}
    for form, shape in FORMS.items():
        fit = a.forms.fits.get(form)
        if fit is None:
            rows.append(
                [form, shape.label, "-", "-", "-", "-", "-", "-", "-", "-", "-", a.forms.reasons.get(form) or "-"]
            )
            continue
        r = by_form[form]
        cells = [
            estimate_cell(fit, k, spec)[0] if k in fit.parameters else "-"
            for k, spec in (("theta", ".2f"), ("phi", ".3f"), ("rho", "+.4f"))
        ]
        lr = "" if r["lr_p"] is None else f"likelihood ratio against both: p = {r['lr_p']:.3f}"
        rows.append(
            [
                form,
                shape.label,
                r["n"],
                r["k"],
                f"{r['rss_log']:.3g}",
                f"{r['aicc']:.1f}",
                f"{r['delta']:.1f}",
                f"{r['weight']:.2f}",
                *cells,
                lr or "-",
            ]
        )
    return headers, rows


def _identification_lines(a: Any) -> list[str]:
    law = a.law
    missing: dict[str, list[str]] = {}
    for name, why in (a.identified or {}).items():
        if why and (law is None or name in law.parameters):
            missing.setdefault(why, []).append(name)
    lines = []
    if law is not None:
        ok = [SYMBOL[k] for k in law.parameters if identified(law, k)]
        bounded = [SYMBOL[k] for k in law.parameters if not law.identified.get(k) and not identified(law, k)]
        lines += [
            f"Identified by this fit (the design separates them and neither interval end is a bound of the fit): "
            f"{', '.join(ok) or 'none'}."
            + (
                f" Not identified on at least one side (bootstrap draws at a bound of the fit, printed one-sided "
                f"above): {', '.join(bounded)}."
                if bounded
                else ""
            ),
            "",
        ]
    if missing:
        lines += ["What this design cannot identify, and the runs that would:", ""]
        lines += [f"- {', '.join(names)}: {why}." for why, names in missing.items()]
        lines.append("")
    return lines


def law_lines(a: Any, table) -> list[str]:
    """The law's text, tables and identification, for the scaling section."""
    fitted = (
        f"{FORMS['theta'].formula}, fitted to every run with a finite loss (dense and MoE, every budget; N_a, N_t: "
        "active and total non-embedding parameters, D: training tokens, [routed] = 1 for every MoE including E = k, "
        "u_seed: one shift shared by every run of a seed, fixed effects summing to zero). θ = 0 means only active "
        "parameters count and θ = 1 that total parameters count fully; (N_t/N_a)^θ is the effective-parameter "
        "multiplier of Clark et al. 2022. The fit is robust least squares on log L (soft-L1, as Hoffmann et al. 2022 "
        "fit log L with a Huber loss) from several starting points, runs read in run order."
    )
    if a.law is None:
        return [fitted, "", f"**The study cannot fit this law**: {a.law_reason}.", "", *_identification_lines(a)]
    law, c = a.law, a.law.centre
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
        "(Besiroglu et al. 2024 found Hoffmann et al.'s original intervals far too narrow); each end's Monte-Carlo "
        "error is in the note. An end where 2.5% or more of the draws sit at one of the fit's bounds (θ in "
        "[-0.5, 1.5], φ in [-1, 3], α and β in [0.01, 2], E0 in [0, the smallest loss]) is not an estimate: that "
        "side is printed open. E0, A, α and B trade off against each other; θ, ρ and the local elasticities at the "
        f"design centre (N_active {c['n_active']:.3g}, N_total {c['n_total']:.3g}, D {c['tokens']:.3g}: geometric "
        "means over the runs) are better identified, so the table leads with them.",
        "",
        table("joint_law"),
        "",
        *_identification_lines(a),
        *forms_lines(a, table),
    ]


def forms_lines(a: Any, table) -> list[str]:
    """Where total parameters act: the forms compared, and the verdict."""
    return [
        "Where an MoE's total parameters act is a hypothesis, not a given: the same runs fitted with total "
        f"parameters acting on the data term instead ({FORMS['phi'].formula}) and on both terms "
        f"({FORMS['both'].formula}; Ludziejewski et al. 2025 let the expert count scale both terms, here through "
        "N_t/N_a, with their exponent interactions γ, ζ held at 0: those need MoEs at several sizes and token counts "
        "for each E). Compared by AICc on the residuals of ln L (k counts the law's parameters, the seed effects and "
        f"the residual variance); a form is preferred when it is {DECISIVE:g} or more AICc below the forms it "
        "does not nest, and a form that nests another only when it gains that much over it.",
        "",
        table("law_forms"),
        "",
        a.forms.verdict(),
        "",
    ]
