"""The expectations of the literature that a study can test, with its verdicts.

    for c in evaluate_claims(records, measures, seed_rows, health, routing, study.registration):
        print(c.claim, c.verdict, c.evidence)

Each verdict is ``supported``, ``not supported``, ``inconclusive`` or ``not enough data``, computed
from the study's numbers by a rule stated in its evidence. Comparisons are within seed (the same
seed is the same data order for every model; ``harness.analysis.stats``).

- R1 (iso-FLOP gain): ONE contrast, registered in the study file (``PrimaryContrast``) or, without
  a registration, the stated default (``default_contrast``). Gain = dense - MoE validation loss,
  paired by seed over the seeds both arms share; one-sided paired t at alpha: supported when
  p < alpha, not supported when the one-sided (1 - alpha) upper bound of the gain is below the
  smallest gain of interest delta_min (futility), inconclusive otherwise. The exact Wilcoxon
  signed-rank p and the power of the rule at a true gain of delta_min are reported beside it;
  the other arms only with their two-sided paired intervals.
- R1-E (gain grows with E): sparse arms only (E > k); a one-sided permutation test of the slope
  of MoE - dense against log2 E, E permuted within each seed (``scipy.stats.permutation_test``).
  E = k arms are the routing penalty (``routing_penalty_text``), reported without a verdict.
- R3 as two claims: without balancing routing collapses; with balancing it does not. A run has
  collapsed when a layer's normalised imbalance (``harness.analysis.routing_health``) reaches
  COLLAPSE_IMBALANCE; E <= k runs are not judged.
- R10 (wall-clock gain below FLOP gain) and memory: measured throughput and peak memory.
- specialisation: per run, category association significant over layers (Holm) and larger
  than topic; E <= k runs are left out.

``caveat`` says what limits a verdict (short training, measurements within one process).
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import numpy as np
from scipy import stats as sps

from harness.analysis.cost_claims import memory_follows_total, wall_clock_below_flop_gain
from harness.analysis.routing_health import COLLAPSE_IMBALANCE, run_imbalance
from harness.analysis.stats import (
    ALPHA,
    DEFAULT_RULE,
    contrast_gains,
    default_contrast,
    holm,
    paired_gain,
    peer_pairs,
    routing_variant,
)
from harness.analysis.verdicts import INCONCLUSIVE, NO_DATA, NOT_SUPPORTED, SUPPORTED, Claim
from harness.study.spec import PrimaryContrast, Registration, budget_label

# Hoffmann et al. 2022 (Chinchilla): about 20 tokens per parameter is compute-optimal for a dense
# model; short of that, the dense model is not capacity-bound and the MoE gain is rarely reported.
TOKENS_PER_ACTIVE_PARAM = 20


def _balanced(rec: dict[str, Any]) -> bool:
    moe = rec["config"]["moe"] or {}
    coefs = ("load_balance_coef", "importance_coef", "load_coef", "seq_balance_coef")
    return any(moe.get(c, 0) for c in coefs) or moe.get("routing") == "sigmoid-bias" or moe.get("force_balanced", False)


def _sparse(rec: dict[str, Any]) -> bool:
    """E > k: some experts skip each token. E = k is the dense FFN split in k with a router."""
    return rec["experts"] > rec["top_k"]


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _seeds(seeds) -> str:
    seeds = sorted(seeds)
    return f"seed{'s' * (len(seeds) != 1)} {', '.join(map(str, seeds))}"


def _interval(ci: tuple[float, float] | None, spec: str = "+.4f") -> str:
    return "" if ci is None else f" [{format(ci[0], spec)}, {format(ci[1], spec)}]"


def _side(ci: tuple[float, float] | None, at: float) -> str:
    """'below' / 'above' when the interval excludes ``at``, else 'includes'."""
    if ci is None:
        return "no test"
    return "below" if ci[1] < at else "above" if ci[0] > at else "includes"


def _verdict(sides: list[str], want: str, against: str) -> str:
    """Supported when every outcome is ``want``, not supported when one is ``against``; inconclusive
    when a test ran and decided neither way, not enough data when none could run."""
    if sides and all(s == want for s in sides):
        return SUPPORTED
    if against in sides:
        return NOT_SUPPORTED
    return INCONCLUSIVE if INCONCLUSIVE in sides else NO_DATA


# ---------------------------------------------------------------------------------------------
# R1: one registered (or stated default) contrast, one-sided, with a futility bound


def primary_verdict(test: dict[str, Any] | None, c: PrimaryContrast) -> str:
    """Supported when the one-sided paired t rejects 'no gain' at alpha; not supported when the
    one-sided upper confidence bound of the gain is below delta_min; otherwise inconclusive."""
    if test is None:
        return NO_DATA
    if test["p"] < c.alpha:
        return SUPPORTED
    return NOT_SUPPORTED if test["upper"] < c.delta_min else INCONCLUSIVE


def _contrast_text(c: PrimaryContrast, chosen: str) -> str:
    """How ``c`` was chosen: registered, pinned (the study's ``contrast``) or the stated default."""
    what = f"{c.moe} vs {c.dense} at {budget_label(c.budget)} FLOPs"
    rule = f"alpha {c.alpha:g}, smallest gain of interest {c.delta_min:g} nats"
    if chosen == "registered":
        return f"registered primary contrast: {what} ({rule})"
    if chosen == "pinned":
        return f"no registered contrast; the study pins its contrast (`contrast:`): {what} ({rule})"
    return f"no registered contrast; stated default, {DEFAULT_RULE}: {what} ({rule})"


def _test_text(t: dict[str, Any], c: PrimaryContrast) -> str:
    conf = f"{1 - c.alpha:.0%}"
    return (
        f"gain (dense - MoE val loss) over {t['n']} paired seeds: mean {t['mean']:+.4f} nats, one-sided {conf} "
        f"lower bound {t['lower']:+.4f}, upper bound {t['upper']:+.4f}; one-sided paired t p = {t['p']:.3g}; "
        f"exact Wilcoxon signed-rank p = {t['wilcoxon_p']:.3g} (check); power of the rule at a true gain of "
        f"{c.delta_min:g} and the observed sd {t['sd']:.4f}: {t['power']:.0%}. Supported when p < {c.alpha:g}, "
        f"not supported when the upper bound is below {c.delta_min:g}, inconclusive otherwise"
    )


def _other_arms(seed_rows: list[dict[str, Any]], c: PrimaryContrast) -> str:
    rows = [r for r in seed_rows if math.isclose(r["budget_flops"], c.budget, rel_tol=1e-9) and r["model"] != c.moe]
    parts = [
        f"{r['model']}{'' if r['sparse'] else ' (E = k)'} {r['difference_mean']:+.4f}{_interval(r['difference_ci'])} "
        f"({_seeds(r['seed_ids'])})"
        for r in rows
    ]
    return (
        "; other arms, MoE - dense with two-sided 95% paired t intervals, no verdict: " + ", ".join(parts)
        if parts
        else ""
    )


def iso_flop_gain(
    records: list[dict[str, Any]],
    seed_rows: list[dict[str, Any]],
    primary: PrimaryContrast | None = None,
    pinned: PrimaryContrast | None = None,
) -> Claim:
    """R1 on the registered ``primary`` contrast, else the ``pinned`` one, else the stated default."""
    claim = "At equal training FLOPs and active parameters, MoE reaches lower loss than dense"
    source = "R1: Shazeer 2017, Fedus 2022 (Switch), Dai 2024 (DeepSeekMoE)"
    c = primary or pinned or default_contrast(seed_rows)
    if c is None:
        return Claim(
            "R1", claim, source, NO_DATA, "no sparse (E > k) MoE run has a dense peer at the same budget and seed"
        )
    evidence = _contrast_text(c, "registered" if primary else "pinned" if pinned else "default")
    g = contrast_gains(records, c)
    if not all(g["arms"]):
        missing = " and ".join(m for m, ran in zip((c.moe, c.dense), g["arms"], strict=True) if not ran)
        return Claim("R1", claim, source, NO_DATA, f"{evidence}; no run of {missing} at that budget")
    test = paired_gain(g["gain"], c.alpha, c.delta_min)
    if test is None:
        why = "fewer than two paired seeds" if len(g["seeds"]) < 2 else "every seed gave the same gain: no spread"
        evidence += f"; {_seeds(g['seeds'])}: {why}, so no test"
    else:
        evidence += f"; {_seeds(g['seeds'])}: {_test_text(test, c)}"
    if g["excluded"]:
        evidence += f"; excluded (a loss is not finite): {_seeds(g['excluded'])}"
    if g["unpaired"]:
        evidence += f"; run by one arm only, not paired: {_seeds(g['unpaired'])}"
    verdict = primary_verdict(test, c)
    notes = []
    tokens_per_param = max(r["tokens"] / r["params"]["active"] for r in records)
    if tokens_per_param < TOKENS_PER_ACTIVE_PARAM:
        notes.append(
            f"at most {tokens_per_param:.2g} training tokens per active parameter; the gain is reported from about "
            f"{TOKENS_PER_ACTIVE_PARAM} on (Hoffmann et al. 2022's compute-optimal ratio)"
        )
    if verdict == SUPPORTED and test["upper"] < c.delta_min:
        notes.append(f"the gain is positive but below the smallest gain of interest ({c.delta_min:g} nats)")
    if primary is None:
        notes.append("exploratory: the study registers no primary contrast")
    return Claim("R1", claim, source, verdict, evidence + _other_arms(seed_rows, c), "; ".join(notes))


def routing_penalty_text(seed_rows: list[dict[str, Any]]) -> str:
    """The E = k arms' MoE - dense differences (within seed, 95% paired t interval): the cost of the
    router and the split FFN alone, with no sparsity. Reported, never a verdict."""
    rows = [r for r in seed_rows if not r["sparse"]]
    if not rows:
        return "No E = k arm: the routing penalty is not measured."
    parts = [
        f"{r['model']} at {budget_label(r['budget_flops'])} FLOPs {r['difference_mean']:+.4f}"
        f"{_interval(r['difference_ci'])} ({_seeds(r['seed_ids'])})"
        for r in rows
    ]
    return (
        "Routing penalty (E = k: every expert gets every token, the dense FFN split with a router; MoE - dense val "
        "loss within seed, 95% paired t interval, no verdict): " + "; ".join(parts) + "."
    )


# ---------------------------------------------------------------------------------------------
# R1-E: gain against log E over the sparse arms


def _log_e_slope(*diffs: np.ndarray, log_e: np.ndarray) -> float:
    """Least-squares slope of MoE - dense against log2 E, within seeds (each seed's mean removed)."""
    d = np.stack(diffs)  # (E values, seeds)
    x = log_e - log_e.mean()
    return float((x[:, None] * (d - d.mean(0))).sum() / ((x**2).sum() * d.shape[1]))


def _trend_test(by_e: dict[int, dict[int, float]]) -> dict[str, Any] | None:
    """One-sided permutation tests of the slope over the seeds every E has; None without such a seed."""
    es = sorted(by_e)
    seeds = sorted(set.intersection(*(set(v) for v in by_e.values())))
    if not seeds:
        return None
    data = tuple(np.array([by_e[e][s] for s in seeds]) for e in es)
    log_e = np.log2(np.array(es, dtype=float))

    def statistic(*diffs: np.ndarray) -> float:
        return _log_e_slope(*diffs, log_e=log_e)

    out = {"E": es, "seeds": len(seeds), "slope": statistic(*data)}
    out["min_p"] = 1 / math.factorial(len(es)) ** len(seeds)  # one of the (E!)^seeds orderings
    if out["min_p"] > ALPHA:
        return out
    for side in ("less", "greater"):
        test = sps.permutation_test(
            data, statistic, permutation_type="samples", vectorized=False, alternative=side, random_state=0
        )
        out[f"p_{side}"] = float(test.pvalue)
    return out


def gain_grows_with_experts(seed_rows: list[dict[str, Any]], records: list[dict[str, Any]]) -> Claim:
    claim = "The iso-FLOP gain grows with the number of experts E (at fixed k and base)"
    source = "R1: Shazeer 2017 (4 -> 4096 experts), Clark 2022, Krajewski 2024"
    sparse_rows = [r for r in seed_rows if r["sparse"]]
    top = max((r["budget_flops"] for r in sparse_rows), default=None)
    groups: dict[tuple[str, int, str], dict[int, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    labels: dict[str, str] = {}
    for m, d in (pair for (_, budget), pairs in peer_pairs(records).items() if budget == top for pair in pairs):
        if not _sparse(m) or not (_finite(m["final_val_loss"]) and _finite(d["final_val_loss"])):
            continue
        variant, label = routing_variant(m)
        labels[variant] = label
        groups[(d["model"], m["top_k"], variant)][m["experts"]][m["seed"]] = m["final_val_loss"] - d["final_val_loss"]
    note = "; E = k arms are left out (not sparse: their gap is the routing penalty)"
    testable = {g: v for g, v in groups.items() if len(v) >= 3}
    if not testable:
        sizes = ", ".join(f"{base} k{k}{labels[v]}: E in {sorted(by_e)}" for (base, k, v), by_e in groups.items())
        why = f"needs >= 3 sparse expert counts (E > k) at one base, k and routing ({sizes or 'none'})"
        return Claim("R1-E", claim, source, NO_DATA, why + note)
    parts, outcomes = [], []
    for (base, k, variant), by_e in sorted(testable.items()):
        t = _trend_test(by_e)
        if t is None or t["min_p"] > ALPHA:
            why = "no seed has every E" if t is None else f"smallest attainable p = {t['min_p']:.2g} > {ALPHA}"
            parts.append(f"{base} k{k}{labels[variant]}, E = {sorted(by_e)}: {why}")
            outcomes.append(NO_DATA)
            continue
        parts.append(
            f"{base} k{k}{labels[variant]}, E = {t['E']}, {t['seeds']} seeds: "
            f"slope {t['slope']:+.4f} nats per doubling of E, "
            f"permutation p (gain grows) = {t['p_less']:.3g}, p (gain shrinks) = {t['p_greater']:.3g}"
        )
        outcomes.append(SUPPORTED if t["p_less"] < ALPHA else NOT_SUPPORTED if t["p_greater"] < ALPHA else INCONCLUSIVE)
    verdict = _verdict(outcomes, SUPPORTED, NOT_SUPPORTED)
    return Claim("R1-E", claim, source, verdict, "; ".join(parts) + note)


# ---------------------------------------------------------------------------------------------
# R3: collapse without balancing, none with it; one normalised rule at every E and k

R3_SOURCE = "R3: Shazeer 2017 (Table 6), Fedus 2022, Wang 2024 (aux-loss-free)"
COLLAPSE_RULE = (
    "a run has collapsed when a layer's normalised imbalance (max/mean load - 1) / (E/k - 1) over the last "
    f"tenth of training is >= {COLLAPSE_IMBALANCE:g} (0 balanced, 1 every token on the same k experts)"
)


def _collapse_runs(records, health, balanced: bool) -> tuple[list[tuple[str, float]], list[str]]:
    """((run, worst layer's normalised imbalance) of the judged runs, E <= k runs left out)."""
    runs = [r for r in records if r["arm"] == "moe" and health.get(r["run_id"]) and _balanced(r) == balanced]
    judged = [(r["run_id"], run_imbalance(health[r["run_id"]])) for r in runs if _sparse(r)]
    return [(run, x) for run, x in judged if x is not None], [r["run_id"] for r in runs if not _sparse(r)]


def _collapse_claim(key: str, claim: str, records, health, balanced: bool) -> Claim:
    judged, left_out = _collapse_runs(records, health, balanced)
    which = "with a balancing mechanism" if balanced else "without a balancing mechanism"
    if not judged:
        hint = "" if balanced else ": add a variant with load_balance_coef: 0"
        return Claim(key, claim, R3_SOURCE, NO_DATA, f"no MoE run (E > k) {which} has routing statistics{hint}")
    hit = [run for run, x in judged if x >= COLLAPSE_IMBALANCE]
    shown = ", ".join(f"{run} {x:.2f}{' collapsed' if x >= COLLAPSE_IMBALANCE else ''}" for run, x in judged)
    evidence = f"{len(hit)} of {len(judged)} runs {which} collapsed ({shown}); {COLLAPSE_RULE}"
    if left_out:
        evidence += f"; left out, E <= k (every expert gets every token): {', '.join(left_out)}"
    if balanced:
        return Claim(key, claim, R3_SOURCE, NOT_SUPPORTED if hit else SUPPORTED, evidence)
    verdict = SUPPORTED if len(hit) == len(judged) else NOT_SUPPORTED
    return Claim(key, claim, R3_SOURCE, verdict, evidence, "" if hit else "collapse may need longer training")


def collapses_without_balancing(records: list[dict[str, Any]], health: dict[str, list[dict[str, Any]]]) -> Claim:
    """Supported when every judged run without a balancing mechanism collapsed, not supported when one did not."""
    claim = "Without a balancing mechanism, routing collapses"
    return _collapse_claim("R3-unbalanced", claim, records, health, balanced=False)


def balanced_does_not_collapse(records: list[dict[str, Any]], health: dict[str, list[dict[str, Any]]]) -> Claim:
    """Supported when no judged run with a balancing mechanism collapsed, not supported when one did."""
    claim = "With a balancing mechanism, routing does not collapse"
    return _collapse_claim("R3-balanced", claim, records, health, balanced=True)


# ---------------------------------------------------------------------------------------------
# Specialisation: per-run permutation p-values over layers, Holm-corrected


def _category_p(r: dict[str, Any]) -> tuple[float | None, float]:
    """(smallest Holm-adjusted category p over the run's layers, smallest attainable one); None
    without per-layer p-values."""
    layers = r.get("layers") or []
    ps = [layer["category"]["p_value"] for layer in layers if layer.get("category")]
    if not ps:
        return None, 1.0
    floor = len(ps) / (1 + r["permutations"]) if r.get("permutations") else min(ps) * len(ps)
    return min(holm(ps)), floor


def specialisation(routing: dict[str, dict[str, Any]], alpha: float = ALPHA) -> Claim:
    """Per run with E > k: it specialises by category more than by topic when its expert x category
    association is significant at ``alpha`` after Holm's correction over its layers (permutation
    p-values, ``harness.analysis.specialisation``) and its excess NMI by category exceeds that by
    topic. Supported when every judged run does, not supported when none does, else inconclusive."""
    claim = "Experts specialise by token identity and syntax more than by topic"
    source = "Zoph 2022 (ST-MoE sec. 7), Muennighoff 2024 (OLMoE), Jiang 2024 (Mixtral)"
    analysed = {run: r for run, r in routing.items() if r.get("moe") and r.get("summary")}
    left_out = sorted(run for run, r in analysed.items() if r.get("experts", 2) <= r.get("top_k", 1))
    rule = (
        f"a run counts when its category association is significant (permutation p, Holm over layers, < {alpha:g}) "
        "and its excess NMI by category exceeds that by topic"
    )
    parts, outcomes = [], []
    for run, r in sorted(analysed.items()):
        if run in left_out:
            continue
        s = r["summary"]
        cat, top = s["category_nmi_excess"], s["topic_nmi_excess"]
        p, floor = _category_p(r)
        if top is None or p is None or floor >= alpha:
            why = "topic unknown" if top is None else "no per-layer p-values" if p is None else ""
            why = (
                why
                or f"smallest attainable Holm p {floor:.2g} >= {alpha:g}: rerun `harness routing`, more permutations"
            )
            parts.append(f"{run}: not judged ({why})")
            continue
        yes = p < alpha and cat > top
        outcomes.append(yes)
        parts.append(f"{run}: excess NMI category {cat:.3f} vs topic {top:.3f}, Holm p {p:.2g}{'' if yes else ' (no)'}")
    evidence = "; ".join(parts) + f"; rule: {rule}"
    if left_out:
        evidence += f"; left out, E <= k (every token goes to every expert): {', '.join(left_out)}"
    if not outcomes:
        return Claim(
            "specialisation", claim, source, NO_DATA, evidence if analysed else "no routing analysis of an MoE run"
        )
    verdict = SUPPORTED if all(outcomes) else NOT_SUPPORTED if not any(outcomes) else INCONCLUSIVE
    return Claim(
        "specialisation", claim, source, verdict, f"{sum(outcomes)} of {len(outcomes)} runs count; " + evidence
    )


def evaluate_claims(
    records: list[dict[str, Any]],
    measures: dict[str, dict[str, Any]],
    seed_rows: list[dict[str, Any]],
    health: dict[str, list[dict[str, Any]]],
    routing: dict[str, dict[str, Any]],
    registration: Registration | None = None,
    pinned: PrimaryContrast | None = None,
) -> list[Claim]:
    """Every claim's verdict; R1 on ``registration.primary`` when the study registers one, else on
    the study's ``contrast`` where it pins one, else on the stated default."""
    primary = registration.primary if registration is not None else None
    return [
        iso_flop_gain(records, seed_rows, primary, pinned),
        gain_grows_with_experts(seed_rows, records),
        collapses_without_balancing(records, health),
        balanced_does_not_collapse(records, health),
        wall_clock_below_flop_gain(records, measures),
        memory_follows_total(records, measures),
        specialisation(routing),
    ]
