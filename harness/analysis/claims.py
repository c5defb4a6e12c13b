"""The expectations of the literature (../SCIENCE.md) that a study can test, with its verdicts.

    for c in evaluate_claims(records, measures, seed_rows, health, routing):
        print(c.claim, c.verdict, c.evidence)

Each verdict is one of ``supported``, ``not supported`` or ``not enough data`` and is computed
from the study's numbers only, by a stated test at ALPHA = 0.05:

- R1 (iso-FLOP gain): per MoE arm at the largest budget, the paired t interval of MoE - dense
  over seeds. Supported when every arm's interval lies below 0, not supported when one lies
  above 0, otherwise not enough data. One seed gives no interval, hence no verdict.
- R1-E (gain grows with E): a one-sided permutation test of the slope of MoE - dense against
  log2 E, with E permuted within each seed (``scipy.stats.permutation_test``). Not enough data
  when the smallest attainable p-value is above ALPHA (one seed and three expert counts: 1/6).
- R3 (balancing needed): collapse (``harness.analysis.routing_health``, judged on token shares) counted
  in runs with and without a balancing mechanism; a collapsed balanced run refutes the claim.
- R10 (wall-clock gain below FLOP gain): the 95% interval of the MoE's training FLOP/s over
  its dense peer's, from replicate measurements (runs of the same model, else the timing
  windows of one measurement), must lie below 1.
- memory: the MoE's *measured* training peak over its dense peer's, against the increase its
  extra total parameters predict (parameters, gradients and optimizer state per parameter).
- specialisation: excess NMI of expert choice with token category against topic.

``caveat`` says what limits a verdict (short training, measurements within one process).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats as sps

from harness.analysis.stats import ALPHA, measured_pairs, peer_pairs

SUPPORTED, NOT_SUPPORTED, NO_DATA = "supported", "not supported", "not enough data"
# Hoffmann et al. 2022 (Chinchilla): about 20 tokens per parameter is compute-optimal for a dense
# model; short of that, the dense model is not capacity-bound and the MoE gain is rarely reported.
TOKENS_PER_ACTIVE_PARAM = 20
MEMORY_FRACTION = 0.5  # measured extra memory >= half the total-parameter prediction: follows total
MEMORY_EXCESS = 2.0  # ... and at most twice it: beyond, something other than parameters sets the increase


@dataclass(frozen=True)
class Claim:
    key: str
    claim: str
    source: str
    verdict: str
    evidence: str
    caveat: str = ""


def _balanced(rec: dict[str, Any]) -> bool:
    moe = rec["config"]["moe"] or {}
    coefs = ("load_balance_coef", "importance_coef", "load_coef", "seq_balance_coef")
    return any(moe.get(c, 0) for c in coefs) or moe.get("routing") == "sigmoid-bias" or moe.get("force_balanced", False)


def _top_budget_rows(seed_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    if not seed_rows:
        return []
    top = max(r["budget_flops"] for r in seed_rows)
    return [r for r in seed_rows if r["budget_flops"] == top]


def _interval(ci: tuple[float, float] | None, spec: str = "+.4f") -> str:
    return "" if ci is None else f" [{format(ci[0], spec)}, {format(ci[1], spec)}]"


def _side(ci: tuple[float, float] | None, at: float) -> str:
    """'below' / 'above' when the interval excludes ``at``, else 'includes'."""
    if ci is None:
        return "no test"
    return "below" if ci[1] < at else "above" if ci[0] > at else "includes"


def _verdict(sides: list[str], want: str, against: str) -> str:
    """Supported when every interval is on ``want``'s side, not supported when one is on ``against``'s."""
    if sides and all(s == want for s in sides):
        return SUPPORTED
    return NOT_SUPPORTED if against in sides else NO_DATA


def iso_flop_gain(records: list[dict[str, Any]], seed_rows: list[dict[str, Any]]) -> Claim:
    claim = "At equal training FLOPs and active parameters, MoE reaches lower loss than dense"
    source = "R1: Shazeer 2017, Fedus 2022 (Switch), Dai 2024 (DeepSeekMoE)"
    rows = _top_budget_rows(seed_rows)
    if not rows:
        return Claim("R1", claim, source, NO_DATA, "no MoE run has a dense peer at the same budget and seed")
    parts = []
    for r in rows:
        p = "" if r["p_value"] is None else f", p = {r['p_value']:.2g}"
        seeds = f"{r['seeds']} seed{'s' * (r['seeds'] != 1)}"
        parts.append(f"{r['model']} {r['difference_mean']:+.4f}{_interval(r['difference_ci'])} ({seeds}{p})")
    evidence = "val loss MoE - dense at the largest budget, paired mean [95% t interval]: " + ", ".join(parts)
    tokens_per_param = max(r["tokens"] / r["params"]["active"] for r in records)
    caveat = (
        f"at most {tokens_per_param:.2g} training tokens per active parameter; the gain is reported from about "
        f"{TOKENS_PER_ACTIVE_PARAM} on (Hoffmann et al. 2022's compute-optimal ratio)"
        if tokens_per_param < TOKENS_PER_ACTIVE_PARAM
        else ""
    )
    sparse = {r["model"]: r["experts"] > r["top_k"] for r in records if r["arm"] == "moe"}
    dense_like = [r["model"] for r in rows if not sparse.get(r["model"], True)]
    replicated = [r for r in rows if r["seeds"] >= 2 and sparse.get(r["model"], True)]
    if not replicated:
        return Claim("R1", claim, source, NO_DATA, evidence + "; one seed: no interval, so no verdict", caveat)
    single = [r["model"] for r in rows if r["seeds"] < 2]
    if single or dense_like:
        shown = [f"{', '.join(single)}: one seed"] if single else []
        shown += [f"{', '.join(dense_like)}: E = k, every expert active, not sparse"] if dense_like else []
        evidence += f"; judged on the sparse arms with two or more seeds ({'; '.join(shown)}: shown only)"
    sides = [_side(r["difference_ci"], 0.0) for r in replicated]
    verdict = _verdict(sides, "below", "above")
    if verdict == NO_DATA:
        evidence += "; an interval includes 0 (or the seeds gave identical differences): not significant"
    return Claim("R1", claim, source, verdict, evidence, caveat)


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


_SCALE_FIELDS = ("experts", "top_k", "d_expert", "name")
_BALANCE_FIELDS = ("load_balance_coef", "seq_balance_coef", "importance_coef", "load_coef")


def routing_variant(rec: dict[str, Any]) -> tuple[str, str]:
    """(key, label) of the MoE settings other than E, k and expert width: runs compared along E
    share all of them (key); the label names the routing and the balancing in use."""
    moe = rec["config"].get("moe") or {}
    key = repr(sorted((k, repr(v)) for k, v in moe.items() if k not in _SCALE_FIELDS))
    balance = [f"{c} {moe[c]:g}" for c in _BALANCE_FIELDS if moe.get(c)]
    if moe.get("routing") == "sigmoid-bias":
        balance.append(f"bias rate {moe.get('bias_update_rate', 0):g}")
    label = f" ({moe.get('routing', 'softmax-topk')}, {', '.join(balance) or 'no balancing'})"
    return key, label


def gain_grows_with_experts(seed_rows: list[dict[str, Any]], records: list[dict[str, Any]]) -> Claim:
    claim = "The iso-FLOP gain grows with the number of experts E (at fixed k and base)"
    source = "R1: Shazeer 2017 (4 -> 4096 experts), Clark 2022, Krajewski 2024"
    rows = _top_budget_rows(seed_rows)
    top = rows[0]["budget_flops"] if rows else None
    groups: dict[tuple[str, int, str], dict[int, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    labels: dict[str, str] = {}
    for m, d in (pair for (_, budget), pairs in peer_pairs(records).items() if budget == top for pair in pairs):
        variant, label = routing_variant(m)
        labels[variant] = label
        groups[(d["model"], m["top_k"], variant)][m["experts"]][m["seed"]] = m["final_val_loss"] - d["final_val_loss"]
    testable = {g: v for g, v in groups.items() if len(v) >= 3}
    if not testable:
        sizes = ", ".join(f"{base} k{k}{labels[v]}: E in {sorted(by_e)}" for (base, k, v), by_e in groups.items())
        return Claim(
            "R1-E", claim, source, NO_DATA, f"needs >= 3 expert counts at one base, k and routing ({sizes or 'none'})"
        )
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
        outcomes.append(SUPPORTED if t["p_less"] < ALPHA else NOT_SUPPORTED if t["p_greater"] < ALPHA else NO_DATA)
    verdict = _verdict(outcomes, SUPPORTED, NOT_SUPPORTED)
    return Claim("R1-E", claim, source, verdict, "; ".join(parts))


def balancing_needed(records: list[dict[str, Any]], health: dict[str, list[dict[str, Any]]]) -> Claim:
    claim = "Without a balancing mechanism routing collapses; with one it does not"
    source = "R3: Shazeer 2017, Fedus 2022, Wang 2024 (aux-loss-free)"
    moe = [r for r in records if r["arm"] == "moe" and r["run_id"] in health]
    if not moe:
        return Claim("R3", claim, source, NO_DATA, "no MoE run with routing statistics")

    def collapsed(runs: list[dict[str, Any]]) -> list[str]:
        return [r["run_id"] for r in runs if any(layer["collapsed"] for layer in health[r["run_id"]])]

    balanced = [r for r in moe if _balanced(r)]
    unbalanced = [r for r in moe if not _balanced(r)]
    hit_b, hit_u = collapsed(balanced), collapsed(unbalanced)
    evidence = (
        f"collapsed: {len(hit_u)} of {len(unbalanced)} runs without a balancing mechanism, "
        f"{len(hit_b)} of {len(balanced)} with one" + (f" ({', '.join(hit_b)})" if hit_b else "")
    )
    if hit_b:
        return Claim("R3", claim, source, NOT_SUPPORTED, evidence + ": balancing did not prevent collapse")
    if not unbalanced:
        return Claim(
            "R3",
            claim,
            source,
            NO_DATA,
            evidence + "; collapse without balancing is untested: add a variant with load_balance_coef: 0",
        )
    if hit_u:
        return Claim("R3", claim, source, SUPPORTED, evidence)
    return Claim("R3", claim, source, NOT_SUPPORTED, evidence, "collapse may need longer training")


def _log_flops_per_s(rec: dict[str, Any], measure: dict[str, Any], windows: bool) -> list[float]:
    """ln of training FLOP/s: the measurement's median, or each of its timing windows."""
    train = measure["train"]
    rates = train.get("tokens_per_s_windows", []) if windows else [train["tokens_per_s_median"]]
    fpt = rec["flops_per_token"][rec["flop_convention"]]
    return [math.log(r * fpt) for r in rates]


def _rate_ratio(pairs: list[tuple[dict, dict, dict, dict]]) -> dict[str, Any] | None:
    """MoE over dense training FLOP/s with a 95% Welch interval on log rates; replicates are the
    measured runs of each model when both have two or more, else one measurement's windows."""
    moe_runs = {m["run_id"]: (m, mm) for m, _, mm, _ in pairs}
    dense_runs = {d["run_id"]: (d, dm) for _, d, _, dm in pairs}
    between = len(moe_runs) > 1 and len(dense_runs) > 1
    moe = [x for rec, mea in moe_runs.values() for x in _log_flops_per_s(rec, mea, not between)]
    dense = [x for rec, mea in dense_runs.values() for x in _log_flops_per_s(rec, mea, not between)]
    if len(moe) < 2 or len(dense) < 2:
        return None
    test = sps.ttest_ind(moe, dense, equal_var=False)
    ci = test.confidence_interval(1 - ALPHA)
    return {
        "ratio": math.exp(np.mean(moe) - np.mean(dense)),
        "ci": (math.exp(ci.low), math.exp(ci.high)),
        "unit": f"{len(moe_runs)} + {len(dense_runs)} measured runs" if between else "timing windows of one run each",
    }


def wall_clock_below_flop_gain(records: list[dict[str, Any]], measures: dict[str, dict[str, Any]]) -> Claim:
    claim = "The wall-clock gain of MoE is smaller than its FLOP gain (it runs fewer FLOP/s than dense)"
    source = "R10: Muennighoff 2024 (OLMoE: ~3x fewer tokens, ~2x less time)"
    by_models: dict[tuple[str, str], list] = defaultdict(list)
    for m, d, mm, dm in measured_pairs(records, measures):
        by_models[(m["model"], d["model"])].append((m, d, mm, dm))
    if not by_models:
        return Claim("R10", claim, source, NO_DATA, "no MoE run measured next to its dense peer on one device")
    parts, sides, within = [], [], False
    for (_, dense), pairs in sorted(by_models.items()):
        r = _rate_ratio(pairs)
        if r is None:
            parts.append(f"{pairs[0][0]['model']} vs {dense}: no replicate measurements (measure again)")
            sides.append("no test")
            continue
        within |= r["unit"].startswith("timing")
        parts.append(f"{pairs[0][0]['model']} vs {dense}: x{r['ratio']:.2f}{_interval(r['ci'], '.2f')} ({r['unit']})")
        sides.append(_side(r["ci"], 1.0))
    evidence = "training FLOP/s of MoE over dense [95% interval] (wall-clock gain = FLOP gain x this): " + "; ".join(
        parts
    )
    device = next(iter(measures.values()))["device_name"]
    caveat = f"measured on {device}" + (
        "; windows of one process do not show the drift between processes" if within else ""
    )
    return Claim("R10", claim, source, _verdict(sides, "below", "above"), evidence, caveat)


MIN_EXTRA_TOTAL = 1.1
"""The memory claim is tested on MoEs with at least 10% more total parameters than their dense peer."""


def _memory_fraction(m: dict, d: dict, mm: dict, dm: dict) -> tuple[float, float, float] | None:
    """(measured extra bytes, extra predicted by the extra total parameters, their ratio)."""
    peak_m, peak_d = mm["memory"].get("peak_training_bytes"), dm["memory"].get("peak_training_bytes")
    if peak_m is None or peak_d is None:
        return None
    mem = mm["memory"]
    per_param = (mem["param_bytes"] + mem.get("gradient_bytes", mem["param_bytes"]) + mem["optimizer_state_bytes"]) / m[
        "params"
    ]["total"]
    predicted = (m["params"]["total"] - d["params"]["total"]) * per_param
    if m["params"]["total"] < MIN_EXTRA_TOTAL * d["params"]["total"]:
        return None  # E = k: the router's few parameters predict nothing measurable
    if predicted <= 0:
        return None
    measured = peak_m - peak_d
    return measured, predicted, measured / predicted


def memory_follows_total(records: list[dict[str, Any]], measures: dict[str, dict[str, Any]]) -> Claim:
    claim = "Training memory follows total parameters, not active ones"
    source = "Fedus 2022; Artetxe 2022"
    by_models: dict[tuple[str, str], list[tuple[float, float, float]]] = defaultdict(list)
    for m, d, mm, dm in measured_pairs(records, measures):
        if (f := _memory_fraction(m, d, mm, dm)) is not None:
            by_models[(m["model"], d["model"])].append(f)
    if not by_models:
        return Claim(
            "memory",
            claim,
            source,
            NO_DATA,
            "no MoE-dense pair with measured training peak memory and more total parameters (measure again)",
        )
    parts, sides = [], []
    for (arm, dense), fs in sorted(by_models.items()):
        measured, predicted, frac = (np.array(x) for x in zip(*fs, strict=True))
        spread = "" if len(fs) == 1 else f" (x{frac.min():.2f} to x{frac.max():.2f} over {len(fs)} measured pairs)"
        mib = measured.mean() / 2**20, predicted.mean() / 2**20
        parts.append(
            f"{arm} vs {dense}: measured +{mib[0]:.1f} MiB against +{mib[1]:.1f} MiB "
            f"predicted by its extra total parameters (x{frac.mean():.2f}{spread}; equal active parameters predict +0)"
        )
        # every measured pair on one side of the midpoint between the two predictions; an increase
        # far above the total-parameter prediction is set by activations or buffers and tests neither
        follows = MEMORY_FRACTION <= frac.min() and frac.max() <= MEMORY_EXCESS
        sides.append("total" if follows else "active" if frac.max() < MEMORY_FRACTION else "")
    verdict = _verdict(sides, "total", "active")
    if any(f[2] > MEMORY_EXCESS for fs in by_models.values() for f in fs):
        parts.append(
            f"an increase above {MEMORY_EXCESS:g}x what the extra parameters predict is set by activations and "
            "dispatch buffers, not parameters: at this scale the peak cannot show what total parameters cost"
        )
    device = next(iter(measures.values()))["device_name"]
    peak = "CUDA peak allocated" if device != "cpu" else "resident memory added by training steps (RSS)"
    return Claim(
        "memory",
        claim,
        source,
        verdict,
        "; ".join(parts),
        f"{peak}; supported when every measured increase is at least {MEMORY_FRACTION:.0%} of the "
        "total-parameter prediction, not supported when every one is below",
    )


def specialisation(routing: dict[str, dict[str, Any]]) -> Claim:
    claim = "Experts specialise by token identity and syntax more than by topic"
    source = "Zoph 2022 (ST-MoE sec. 7), Muennighoff 2024 (OLMoE), Jiang 2024 (Mixtral)"
    analysed = {run: r for run, r in routing.items() if r.get("moe") and r.get("summary")}
    if not analysed:
        return Claim("specialisation", claim, source, NO_DATA, "no routing analysis of an MoE run")
    more = compared = 0
    parts = []
    for run, r in sorted(analysed.items()):
        s = r["summary"]
        cat, top = s["category_nmi_excess"], s["topic_nmi_excess"]
        if top is None:
            parts.append(f"{run}: excess NMI category {cat:.3f}, topic unknown (no held-out keys)")
            continue
        compared += 1
        more += cat > top
        parts.append(f"{run}: excess NMI category {cat:.3f} vs topic {top:.3f}")
    if not compared:
        return Claim("specialisation", claim, source, NO_DATA, "; ".join(parts))
    verdict = SUPPORTED if more == compared else NOT_SUPPORTED if more == 0 else NO_DATA
    return Claim("specialisation", claim, source, verdict, "; ".join(parts))


def evaluate_claims(
    records: list[dict[str, Any]],
    measures: dict[str, dict[str, Any]],
    seed_rows: list[dict[str, Any]],
    health: dict[str, list[dict[str, Any]]],
    routing: dict[str, dict[str, Any]],
) -> list[Claim]:
    return [
        iso_flop_gain(records, seed_rows),
        gain_grows_with_experts(seed_rows, records),
        balancing_needed(records, health),
        wall_clock_below_flop_gain(records, measures),
        memory_follows_total(records, measures),
        specialisation(routing),
    ]
