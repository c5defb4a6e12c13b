"""The loss, routing and specialisation verdicts decided by the data: shared seed effects, R1 on
one registered contrast with a futility bound and its power, E = k kept out of sparsity claims,
one normalised collapse rule at every E and k, and specialisation from permutation p-values."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from harness.analysis.claims import (
    INCONCLUSIVE,
    NO_DATA,
    NOT_SUPPORTED,
    SUPPORTED,
    balanced_does_not_collapse,
    collapses_without_balancing,
    evaluate_claims,
    iso_flop_gain,
    routing_penalty_text,
    specialisation,
)
from harness.analysis.routing_health import health_dicts, routing_health
from harness.analysis.stats import holm, one_sided_power, seed_comparison, seed_components
from harness.study.spec import PrimaryContrast, Registration

BUDGET = 1e15


def _rec(model, seed, loss, experts=None, top_k=2, balanced=True):
    moe = None if experts is None else {"load_balance_coef": 0.01 if balanced else 0.0}
    return {
        "run_id": f"{model}_s{seed}",
        "model": model,
        "arm": "dense" if experts is None else "moe",
        "experts": experts,
        "top_k": top_k if experts else None,
        "seed": seed,
        "budget_flops": BUDGET,
        "final_val_loss": loss,
        "tokens": 10_000,
        "params": {"active": 1000, "active_non_embedding": 1000, "total": 1000},
        "config": {"moe": moe},
    }


def _study(gains: dict[int, float], seeds: int, rng, seed_sd=0.022, residual_sd=0.014, penalty=None) -> list[dict]:
    """A dense arm and one MoE arm per E (k = 2) whose true gain (dense - MoE) is ``gains[E]``; the
    seed effect is shared by every arm, so the paired sd is sqrt(2) * residual_sd (0.02)."""
    effect = rng.normal(0, seed_sd, seeds)
    records = [_rec("dense", s, 3.0 + effect[s] + rng.normal(0, residual_sd)) for s in range(seeds)]
    for e, gain in gains.items():
        records += [_rec(f"e{e}", s, 3.0 - gain + effect[s] + rng.normal(0, residual_sd), e) for s in range(seeds)]
    if penalty is not None:  # an E = k arm
        records += [_rec("e2", s, 3.0 + penalty + effect[s] + rng.normal(0, residual_sd), 2) for s in range(seeds)]
    return records


def _old_rule(seed_rows) -> bool:
    """The rule replaced: supported when every sparse arm's two-sided 95% interval lies below 0."""
    rows = [r for r in seed_rows if r["sparse"]]
    return all(r["difference_ci"] is not None and r["difference_ci"][1] < 0 for r in rows)


# ---------------------------------------------------------------------------------------------
# shared seed effects


def test_seed_components_match_the_balanced_two_way_anova_and_recover_the_truth():
    rng = np.random.default_rng(0)
    records = _study({4: 0.0, 8: 0.02, 16: 0.03}, 12, rng)
    c = seed_components(records)
    y = np.array([[r["final_val_loss"] for r in records if r["model"] == m] for m in ("dense", "e4", "e8", "e16")])
    g, s = y.shape
    resid = y - y.mean(1, keepdims=True) - y.mean(0, keepdims=True) + y.mean()
    ms_e = (resid**2).sum() / ((g - 1) * (s - 1))
    ms_s = g * ((y.mean(0) - y.mean()) ** 2).sum() / (s - 1)
    assert c.residual_sd == pytest.approx(math.sqrt(ms_e)) and c.seed_sd == pytest.approx(math.sqrt((ms_s - ms_e) / g))
    assert (c.seed_dof, c.residual_dof, c.runs, c.groups) == (s - 1, (g - 1) * (s - 1), g * s, g)
    assert c.icc == pytest.approx(c.seed_sd**2 / (c.seed_sd**2 + c.residual_sd**2))
    # unbalanced, many draws: the variance estimates average to the truth (0.022, 0.014)
    var_s, var_e = [], []
    for _ in range(100):
        runs = [r for r in _study({4: 0.0, 8: 0.02}, 10, rng) if (r["seed"] + len(r["model"])) % 5]
        c = seed_components(runs)
        var_s.append(c.seed_sd**2)
        var_e.append(c.residual_sd**2)
    assert math.sqrt(np.mean(var_s)) == pytest.approx(0.022, rel=0.15)
    assert math.sqrt(np.mean(var_e)) == pytest.approx(0.014, rel=0.1)
    assert "seed effect sd" in c.text() and "intraclass correlation" in c.text()


def test_seed_components_use_only_seeds_that_models_share():
    records = [_rec("dense", 0, 3.0), _rec("e8", 1, 2.9, 8)]  # no seed in common
    c = seed_components(records)
    assert c.seed_dof == 0 and c.runs == 0 and "no estimate" in c.text()


def test_seed_rows_name_their_seeds_and_exclusions():
    records = _study({8: 0.03}, 4, np.random.default_rng(1))
    next(r for r in records if r["model"] == "e8" and r["seed"] == 2)["final_val_loss"] = float("nan")
    (row,) = seed_comparison(records)
    assert row["seed_ids"] == [0, 1, 3] and row["excluded_seeds"] == [2] and row["seeds"] == 3
    assert math.isfinite(row["difference_mean"])
    claim = iso_flop_gain(records, seed_comparison(records))
    assert "excluded (a loss is not finite): seed 2" in claim.evidence and "seeds 0, 1, 3" in claim.evidence


# ---------------------------------------------------------------------------------------------
# R1: one contrast, one-sided, a futility bound


def test_r1_finds_a_real_gain_the_old_rule_missed():
    """True gains 0, 0.02 and 0.03 at E4, E8, E16, paired sd 0.02, 8 seeds: the default contrast
    (E16) is supported in most draws; 'every arm's interval below 0' almost never held."""
    rng = np.random.default_rng(2)
    new = old = 0
    draws = 60
    for _ in range(draws):
        records = _study({4: 0.0, 8: 0.02, 16: 0.03}, 8, rng)
        rows = seed_comparison(records)
        claim = iso_flop_gain(records, rows)
        new += claim.verdict == SUPPORTED
        old += _old_rule(rows)
    assert new >= 0.8 * draws and old <= 0.1 * draws
    assert "e16 vs dense" in claim.evidence and "stated default" in claim.evidence
    assert "exact Wilcoxon signed-rank p" in claim.evidence and "power of the rule" in claim.evidence
    assert "e4 " in claim.evidence and "no verdict" in claim.evidence and "exploratory" in claim.caveat


def test_r1_says_not_supported_only_past_the_futility_bound():
    rng = np.random.default_rng(3)
    none = _study({8: 0.0}, 60, rng)
    claim = iso_flop_gain(none, seed_comparison(none))
    assert claim.verdict == NOT_SUPPORTED and "upper bound" in claim.evidence
    two = [_rec("dense", 0, 3.0), _rec("dense", 1, 3.0), _rec("e8", 0, 2.95, 8), _rec("e8", 1, 3.01, 8)]
    assert iso_flop_gain(two, seed_comparison(two)).verdict == INCONCLUSIVE
    one = two[:1] + two[2:3]
    claim = iso_flop_gain(one, seed_comparison(one))
    assert claim.verdict == NO_DATA and "fewer than two paired seeds" in claim.evidence


def test_r1_uses_the_registered_contrast():
    rng = np.random.default_rng(4)
    records = _study({8: 0.03, 16: 0.0}, 8, rng)
    registered = Registration(primary=PrimaryContrast("e8", "dense", BUDGET, alpha=0.05, delta_min=0.01))
    rows = seed_comparison(records)
    (r1,) = [c for c in evaluate_claims(records, {}, rows, {}, {}, registered) if c.key == "R1"]
    assert "registered primary contrast: e8 vs dense" in r1.evidence and r1.verdict == SUPPORTED
    assert "exploratory" not in r1.caveat
    assert iso_flop_gain(records, rows).evidence.count("e16 vs dense") == 1  # the default: the largest E
    missing = iso_flop_gain(records, rows, PrimaryContrast("e32", "dense", BUDGET))
    assert missing.verdict == NO_DATA and "no run of e32" in missing.evidence


def test_the_power_of_the_rule_is_the_noncentral_t():
    """Against a simulation of the one-sided paired t at n = 8, alpha 0.05, gain 0.01, sd 0.02."""
    rng = np.random.default_rng(5)
    d = rng.normal(0.01, 0.02, (40_000, 8))
    t = d.mean(1) / (d.std(1, ddof=1) / math.sqrt(8))
    simulated = (t > sps.t.ppf(0.95, 7)).mean()
    assert one_sided_power(0.02, 8, 0.05, 0.01) == pytest.approx(simulated, abs=0.01)


# ---------------------------------------------------------------------------------------------
# E = k: the routing penalty, outside every sparsity claim


def test_e_equal_k_is_the_routing_penalty_and_never_the_default_contrast():
    rng = np.random.default_rng(6)
    records = _study({8: 0.03}, 5, rng, penalty=0.05)
    records += [_rec("e2", s, 3.05, 2) for s in (5, 6)] + [_rec("dense", s, 3.0) for s in (5, 6)]
    rows = seed_comparison(records)
    penalty = next(r for r in rows if r["model"] == "e2")
    assert not penalty["sparse"] and penalty["seeds"] == 7  # more seeds than e8, still not chosen
    claim = iso_flop_gain(records, rows)
    assert "e8 vs dense" in claim.evidence and "e2 (E = k)" in claim.evidence
    text = routing_penalty_text(rows)
    assert text.startswith("Routing penalty") and "e2 at" in text and "seeds 0, 1, 2, 3, 4, 5, 6" in text


# ---------------------------------------------------------------------------------------------
# R3: one normalised collapse rule, two claims


def _health(loads: list[int], experts: int, top_k: int) -> list[dict]:
    mean = sum(loads) / len(loads)
    step = {
        "step": 1,
        "routing": [
            {
                "tokens_per_expert": loads,
                "load_max_over_mean": max(loads) / mean,
                "load_cv": float(np.std(loads) / mean),
                "dropped_fraction": 0.0,
                "router_entropy": 1.0,
                "z_loss": 0.0,
            }
        ],
    }
    return health_dicts(routing_health([step], experts, top_k))


def _loads(experts: int, top_k: int, imbalance: float, tokens: int = 6000) -> list[int]:
    """Loads whose busiest expert is ``imbalance`` of the way from balanced to every token."""
    busiest = round(tokens * top_k / experts * (1 + imbalance * (experts / top_k - 1)))
    rest = (tokens * top_k - busiest) / (experts - 1)
    return [busiest] + [round(rest)] * (experts - 1)


@pytest.mark.parametrize(("experts", "top_k"), [(4, 1), (8, 2), (16, 2), (16, 1), (64, 8)])
def test_collapse_means_the_same_at_every_e_and_k(experts, top_k):
    """Normalised imbalance 0.4 is not collapse and 0.6 is, at every E/k (the old cap on max/mean
    of 3 called 0.4 collapse at E/k = 8 and 16)."""
    (low,) = _health(_loads(experts, top_k, 0.4), experts, top_k)
    (high,) = _health(_loads(experts, top_k, 0.6), experts, top_k)
    assert low["imbalance"] == pytest.approx(0.4, abs=0.01) and not low["collapsed"]
    assert high["imbalance"] == pytest.approx(0.6, abs=0.01) and high["collapsed"]
    (split,) = _health([6000, 6000], 2, 2)  # E = k: every expert gets every token
    assert split["imbalance"] is None and not split["collapsed"]


def test_collapse_with_and_without_balancing_are_two_claims():
    runs = [
        _rec("free", 0, 3.1, 16, 1, balanced=False),
        _rec("free", 1, 3.1, 16, 1, balanced=False),
        _rec("bal", 0, 3.0, 16, 1),
        _rec("split", 0, 3.0, 2, 2, balanced=False),
    ]
    health = {
        "free_s0": _health(_loads(16, 1, 0.9), 16, 1),
        "free_s1": _health(_loads(16, 1, 0.7), 16, 1),
        "bal_s0": _health(_loads(16, 1, 0.3), 16, 1),  # max/mean 5.5: 'collapsed' under the old cap of 3
        "split_s0": _health([6000, 6000], 2, 2),
    }
    without, with_ = collapses_without_balancing(runs, health), balanced_does_not_collapse(runs, health)
    assert (without.verdict, with_.verdict) == (SUPPORTED, SUPPORTED)
    assert "2 of 2 runs without" in without.evidence and "free_s1 0.70 collapsed" in without.evidence
    assert "left out, E <= k" in without.evidence and "split_s0" in without.evidence
    assert "0 of 1 runs with" in with_.evidence and "bal_s0 0.30" in with_.evidence
    health["free_s1"] = _health(_loads(16, 1, 0.2), 16, 1)
    health["bal_s0"] = _health(_loads(16, 1, 0.8), 16, 1)
    assert collapses_without_balancing(runs, health).verdict == NOT_SUPPORTED
    assert balanced_does_not_collapse(runs, health).verdict == NOT_SUPPORTED
    assert balanced_does_not_collapse(runs[:2], health).verdict == NO_DATA


# ---------------------------------------------------------------------------------------------
# specialisation


def _routing(cat: float, topic: float, p: list[float], experts=8, top_k=2, permutations=199) -> dict:
    return {
        "moe": True,
        "experts": experts,
        "top_k": top_k,
        "permutations": permutations,
        "layers": [{"category": {"p_value": x}, "topic": {"p_value": 0.5}} for x in p],
        "summary": {"category_nmi_excess": cat, "topic_nmi_excess": topic},
    }


def test_holm_matches_the_step_down_definition():
    assert holm([0.01, 0.04, 0.03, 0.2]) == pytest.approx([0.04, 0.09, 0.09, 0.2])


def test_specialisation_uses_holm_corrected_p_values_and_leaves_out_e_equal_k():
    significant = _routing(0.1, 0.0, [0.005, 0.3, 0.5, 0.2])
    split = _routing(0.0, 0.0, [1.0] * 4, experts=2, top_k=2)
    claim = specialisation({"a": significant, "split": split})
    assert claim.verdict == SUPPORTED and "left out, E <= k" in claim.evidence and "split" in claim.evidence
    chance = _routing(0.1, 0.0, [0.02, 0.3, 0.5, 0.2])  # 0.02 * 4 layers = 0.08 after Holm
    assert specialisation({"a": chance}).verdict == NOT_SUPPORTED
    assert specialisation({"a": significant, "b": chance}).verdict == INCONCLUSIVE
    few = _routing(0.1, 0.0, [1 / 21] * 4, permutations=20)  # smallest attainable Holm p 4/21
    claim = specialisation({"a": few})
    assert claim.verdict == NO_DATA and "more permutations" in claim.evidence
    assert specialisation({"split": split}).verdict == NO_DATA
