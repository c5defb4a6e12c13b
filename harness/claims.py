"""The expectations of the literature (../SCIENCE.md) that a study can test, with its verdicts.

    for c in evaluate_claims(records, measures, seed_rows, health, routing):
        print(c.claim, c.verdict, c.evidence)

Each verdict is one of ``supported``, ``not supported`` or ``not enough data`` and is computed
from the study's numbers only; ``caveat`` says what limits it (one seed, short training).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from scipy import stats as sps

from harness.stats import measured_pairs, state_bytes

SUPPORTED, NOT_SUPPORTED, NO_DATA = "supported", "not supported", "not enough data"
TOKENS_PER_ACTIVE_PARAM = 20  # below this the MoE gain is rarely reported (Krajewski et al. 2024)


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


def _seed_caveat(rows: list[dict[str, Any]]) -> str:
    return "one seed per run: indicative, no significance" if all(r["seeds"] == 1 for r in rows) else ""


def iso_flop_gain(records: list[dict[str, Any]], seed_rows: list[dict[str, Any]]) -> Claim:
    claim = "At equal training FLOPs and active parameters, MoE reaches lower loss than dense"
    source = "R1: Shazeer 2017, Fedus 2022 (Switch), Dai 2024 (DeepSeekMoE)"
    rows = _top_budget_rows(seed_rows)
    if not rows:
        return Claim("R1", claim, source, NO_DATA, "no MoE run has a dense peer at the same budget and seed")
    lower = [r for r in rows if r["difference_mean"] < 0]
    significant = [r for r in rows if r["p_value"] is not None]
    evidence = ", ".join(f"{r['arm']} {r['difference_mean']:+.4f}" for r in rows)
    evidence = f"val loss MoE - dense at the largest budget: {evidence}"
    tokens_per_param = max(r["tokens"] / r["params"]["active"] for r in records)
    caveat = _seed_caveat(rows)
    if tokens_per_param < TOKENS_PER_ACTIVE_PARAM:
        caveat = "; ".join(
            c
            for c in (caveat, f"at most {tokens_per_param:.2g} tokens per active parameter (gain expected at >= 20)")
            if c
        )
    if significant and any(r["p_value"] >= 0.05 for r in significant):
        return Claim("R1", claim, source, NO_DATA, evidence + "; some differences are not significant", caveat)
    if len(lower) == len(rows):
        return Claim("R1", claim, source, SUPPORTED, evidence, caveat)
    if not lower:
        return Claim("R1", claim, source, NOT_SUPPORTED, evidence, caveat)
    return Claim("R1", claim, source, NO_DATA, evidence + "; mixed: some MoE arms lower, some higher", caveat)


def gain_grows_with_experts(seed_rows: list[dict[str, Any]], records: list[dict[str, Any]]) -> Claim:
    claim = "The iso-FLOP gain grows with the number of experts E (at fixed k and base)"
    source = "R1: Shazeer 2017 (4 -> 4096 experts), Clark 2022, Krajewski 2024"
    by_model = {r["model"]: r for r in records}
    groups: dict[tuple[str, int], list[tuple[int, float]]] = defaultdict(list)
    for r in _top_budget_rows(seed_rows):
        rec = by_model[r["model"]]
        groups[(r["dense_model"], rec["top_k"])].append((rec["experts"], r["difference_mean"]))
    testable = {g: v for g, v in groups.items() if len({e for e, _ in v}) >= 3}
    if not testable:
        sizes = ", ".join(f"{base} k{k}: E in {sorted({e for e, _ in v})}" for (base, k), v in groups.items())
        return Claim("R1-E", claim, source, NO_DATA, f"needs >= 3 expert counts at one base and k ({sizes or 'none'})")
    parts, falling = [], 0
    for (base, k), v in sorted(testable.items()):
        rho = sps.spearmanr([e for e, _ in v], [d for _, d in v]).statistic
        parts.append(f"{base} k{k}: Spearman rho(E, MoE - dense) = {rho:+.2f} over E = {sorted(e for e, _ in v)}")
        falling += rho < 0
    verdict = SUPPORTED if falling == len(testable) else NOT_SUPPORTED if falling == 0 else NO_DATA
    return Claim("R1-E", claim, source, verdict, "; ".join(parts), _seed_caveat(_top_budget_rows(seed_rows)))


def balancing_needed(records: list[dict[str, Any]], health: dict[str, list[dict[str, Any]]]) -> Claim:
    claim = "Without a balancing mechanism routing collapses; with one it does not"
    source = "R3: Shazeer 2017, Fedus 2022, Wang 2024 (aux-loss-free)"
    moe = [r for r in records if r["arm"] == "moe" and r["run_id"] in health]
    unbalanced = [r for r in moe if not _balanced(r)]
    balanced = [r for r in moe if _balanced(r)]

    def collapsed(r: dict[str, Any]) -> bool:
        return any(layer["collapsed"] for layer in health[r["run_id"]])

    n_b = sum(collapsed(r) for r in balanced)
    if not unbalanced:
        return Claim(
            "R3",
            claim,
            source,
            NO_DATA,
            f"every MoE run here is balanced ({n_b} of {len(balanced)} collapsed); add a variant with "
            "load_balance_coef: 0 to test it",
        )
    n_u = sum(collapsed(r) for r in unbalanced)
    evidence = f"collapsed: {n_u} of {len(unbalanced)} unbalanced runs, {n_b} of {len(balanced)} balanced runs"
    if n_u > 0 and n_b == 0:
        return Claim("R3", claim, source, SUPPORTED, evidence)
    if n_u == 0:
        return Claim("R3", claim, source, NOT_SUPPORTED, evidence, "collapse may need longer training")
    return Claim("R3", claim, source, NO_DATA, evidence)


def wall_clock_below_flop_gain(records: list[dict[str, Any]], measures: dict[str, dict[str, Any]]) -> Claim:
    claim = "The wall-clock gain of MoE is smaller than its FLOP gain (it runs fewer FLOP/s than dense)"
    source = "R10: Muennighoff 2024 (OLMoE: ~3x fewer tokens, ~2x less time)"

    def rate(meas: dict[str, Any], rec: dict[str, Any]) -> float:  # training FLOP/s
        return meas["train"]["tokens_per_s_median"] * rec["flops_per_token"][rec["flop_convention"]]

    ratios = [(m["run_id"], rate(mm, m) / rate(dm, d)) for m, d, mm, dm in measured_pairs(records, measures)]
    if not ratios:
        return Claim("R10", claim, source, NO_DATA, "no MoE run measured next to its dense peer on one device")
    below = sum(r < 1 for _, r in ratios)
    evidence = "training FLOP/s of MoE over dense (wall-clock gain = FLOP gain x this): " + ", ".join(
        f"{run} x{r:.2f}" for run, r in ratios
    )
    device = next(iter(measures.values()))["device_name"]
    verdict = SUPPORTED if below == len(ratios) else NOT_SUPPORTED if below == 0 else NO_DATA
    return Claim("R10", claim, source, verdict, evidence, f"measured on {device}")


def memory_follows_total(records: list[dict[str, Any]], measures: dict[str, dict[str, Any]]) -> Claim:
    claim = "Parameter and optimizer memory follows total parameters, not active ones"
    source = "Fedus 2022; Artetxe 2022"
    rows = [
        (m["params"]["total"] / d["params"]["total"], state_bytes(mm) / state_bytes(dm))
        for m, d, mm, dm in measured_pairs(records, measures)
    ]
    if not rows:
        return Claim("memory", claim, source, NO_DATA, "no measured MoE-dense pair")
    close = sum(abs(mem / params - 1) <= 0.1 for params, mem in rows)
    evidence = "total-params ratio vs memory ratio: " + ", ".join(f"x{p:.2f} / x{m:.2f}" for p, m in rows)
    return Claim("memory", claim, source, SUPPORTED if close == len(rows) else NOT_SUPPORTED, evidence)


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
