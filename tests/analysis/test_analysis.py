"""Routing health, seed statistics, claims and reproduction: the report's analyses on records
built to have known answers."""

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
    gain_grows_with_experts,
    iso_flop_gain,
)
from harness.analysis.reproduce import compare, device_class, summary
from harness.analysis.routing_health import routing_health
from harness.analysis.stats import seed_comparison


def _routing_step(step: int, tokens: list[list[int]]) -> dict:
    rows = []
    for t in tokens:
        mean = sum(t) / len(t)
        cv = (sum((x - mean) ** 2 for x in t) / len(t)) ** 0.5 / mean
        rows.append(
            {
                "tokens_per_expert": t,
                "load_max_over_mean": max(t) / mean,
                "load_cv": cv,
                "dropped_fraction": 0.0,
                "router_entropy": math.log(len(t)) * 0.9,
                "load_balance_loss": 1.0,
                "z_loss": 2.0,
            }
        )
    return {"step": step, "loss": 3.0, "routing": rows}


def test_routing_health_judges_the_end_of_training_by_normalised_imbalance():
    early = [_routing_step(s, [[0, 0, 0, 64], [16] * 4, [16] * 4]) for s in range(1, 10)]  # collapsed early: ignored
    late = [_routing_step(s, [[10, 20, 30, 4], [0, 30, 20, 14], [0, 0, 4, 60]]) for s in range(10, 11)]
    rows = routing_health(early + late, experts=4, top_k=1)
    assert [r.collapsed for r in rows] == [False, False, True]
    assert rows[1].dead_experts == 1 and rows[1].reason == ""  # one idle expert is shown, not collapse
    assert rows[0].imbalance == pytest.approx((30 / 16 - 1) / 3)
    assert rows[2].imbalance == pytest.approx((60 / 16 - 1) / 3) and "normalised imbalance 0.92" in rows[2].reason
    assert rows[0].max_over_mean == pytest.approx(30 / 16)
    assert rows[0].entropy_over_log_e == pytest.approx(0.9)
    dominated = routing_health([_routing_step(1, [[5, 5, 5, 49]])], experts=4, top_k=1)
    assert dominated[0].collapsed and "takes 77% of tokens" in dominated[0].reason
    assert routing_health([{"step": 1, "loss": 3.0}], experts=4, top_k=1) == []  # dense


@pytest.mark.parametrize(("experts", "top_k"), [(8, 2), (8, 4), (16, 3), (64, 8)])
def test_collapse_is_judged_on_tokens_whatever_k(experts, top_k):
    """One expert taking 90% of the tokens is collapse at any k, although its share of the T*k
    assignments is at most 1/k (45% at k = 2: the old rule, half of all assignments, missed it)."""
    tokens = 1000
    busiest = int(0.9 * tokens)
    rest = (tokens * top_k - busiest) // (experts - 1)
    loads = [busiest] + [rest] * (experts - 1)
    (row,) = routing_health([_routing_step(1, [loads])], experts=experts, top_k=top_k)
    assert row.collapsed and row.busiest_token_share == pytest.approx(busiest * top_k / sum(loads))
    balanced = [tokens * top_k // experts] * experts
    (row,) = routing_health([_routing_step(1, [balanced])], experts=experts, top_k=top_k)
    assert not row.collapsed and row.busiest_token_share == pytest.approx(top_k / experts)


def _rec(model, arm, budget, seed, loss, experts=None, top_k=None, active=1000, total=None, balanced=True, **kw):
    moe = None
    if arm == "moe":
        moe = {"load_balance_coef": 0.01 if balanced else 0.0, "routing": "softmax-topk"}
    return {
        "run_id": f"{model}_{budget:g}_s{seed}",
        "model": model,
        "arm": arm,
        "experts": experts,
        "top_k": top_k,
        "seed": seed,
        "budget_flops": budget,
        "final_val_loss": loss,
        "tokens": 10 * active,
        "params": {"active": active, "active_non_embedding": active, "total": total or active},
        "config": {"moe": moe},
        "flops_per_token": {"detailed": 6.0 * active},
        "flop_convention": "detailed",
    } | kw


def test_seed_comparison_is_a_paired_t_test_over_seeds():
    dense = [3.00, 3.02, 2.99]
    moe = [2.90, 2.95, 2.91]
    records = [_rec("d", "dense", 1e15, s, x) for s, x in enumerate(dense)]
    records += [_rec("m", "moe", 1e15, s, x, experts=8, top_k=2) for s, x in enumerate(moe)]
    (row,) = seed_comparison(records)
    assert row["seed_ids"] == [0, 1, 2] and row["excluded_seeds"] == [] and row["sparse"]
    assert row["seeds"] == 3 and row["difference_mean"] == pytest.approx(sum(moe) / 3 - sum(dense) / 3)
    assert row["p_value"] == pytest.approx(sps.ttest_rel(moe, dense).pvalue)
    assert row["p_value"] < 0.05 and row["verdict"].startswith("MoE lower, significant")
    (single,) = seed_comparison(records[:1] + records[3:4])
    assert single["p_value"] is None and "no claim" in single["verdict"]


def _seeded(diffs: dict[str, list[float]], experts: dict[str, int] | None = None) -> list[dict]:
    """Dense runs and MoE runs with the given MoE - dense differences per seed."""
    dense = [3.0, 3.02, 2.99, 3.01, 3.0][: len(next(iter(diffs.values())))]
    records = [_rec("d", "dense", 1e15, s, x) for s, x in enumerate(dense)]
    for model, ds in diffs.items():
        e = (experts or {}).get(model, 8)
        records += [_rec(model, "moe", 1e15, s, dense[s] + d, e, 2) for s, d in enumerate(ds)]
    return records


def test_one_seed_gives_no_iso_flop_verdict():
    lower = _seeded({"m8": [-0.1], "m4": [-0.05]}, {"m8": 8, "m4": 4})
    claim = iso_flop_gain(lower, seed_comparison(lower))
    assert claim.verdict == NO_DATA and "fewer than two paired seeds" in claim.evidence
    assert "m8 vs d" in claim.evidence and "m4 -0.0500" in claim.evidence
    assert "tokens per active parameter" in claim.caveat
    assert "Hoffmann et al. 2022" in claim.caveat and "Krajewski" not in claim.caveat


def test_iso_flop_verdict_rests_on_one_contrast():
    """A worse arm beside it no longer refutes the claim; it is shown with its interval only."""
    lower = _seeded({"m8": [-0.10, -0.12, -0.09], "m4": [0.30, 0.21, 0.18]}, {"m8": 8, "m4": 4})
    claim = iso_flop_gain(lower, seed_comparison(lower))
    assert claim.verdict == SUPPORTED and "m8 vs d" in claim.evidence
    (row,) = [r for r in seed_comparison(lower) if r["model"] == "m4"]
    assert f"m4 +0.2300 [{row['difference_ci'][0]:+.4f}, {row['difference_ci'][1]:+.4f}]" in claim.evidence
    higher = _seeded({"m8": [0.10, 0.12, 0.09]})
    assert iso_flop_gain(higher, seed_comparison(higher)).verdict == NOT_SUPPORTED  # upper bound < 0.01
    level = _seeded({"m8": [0.013, -0.009, -0.006]})
    assert iso_flop_gain(level, seed_comparison(level)).verdict == "inconclusive"


def test_one_seed_ablation_arms_are_shown_but_do_not_decide():
    runs = _seeded({"m8": [-0.10, -0.12, -0.09]}) + [r for r in _seeded({"ablation": [0.4]}) if r["arm"] == "moe"]
    claim = iso_flop_gain(runs, seed_comparison(runs))
    assert claim.verdict == SUPPORTED
    assert "ablation +0.4000 (seed 0)" in claim.evidence and "no verdict" in claim.evidence


def test_an_arm_with_every_expert_active_is_shown_but_does_not_decide():
    runs = _seeded({"m8": [-0.10, -0.12, -0.09], "e2": [0.01, -0.003, 0.004]}, {"m8": 8, "e2": 2})
    claim = iso_flop_gain(runs, seed_comparison(runs))
    assert claim.verdict == SUPPORTED and "e2 (E = k)" in claim.evidence


def test_gain_grows_with_e_leaves_out_e_equal_k():
    """An E = k arm's routing penalty made the old trend over E2, E4, E8 'significant'."""
    runs = _seeded(
        {"e2": [0.05, 0.052, 0.049], "e4": [-0.01, -0.012, -0.008], "e8": [-0.011, -0.009, -0.01]},
        {"e2": 2, "e4": 4, "e8": 8},
    )
    claim = gain_grows_with_experts(seed_comparison(runs), runs)
    assert claim.verdict == NO_DATA and "E in [4, 8]" in claim.evidence and "E = k arms are left out" in claim.evidence


def test_gain_grows_with_e_needs_a_test_that_can_reach_significance():
    one_seed = _seeded({"e4": [-0.01], "e8": [-0.02], "e16": [-0.03]}, {"e4": 4, "e8": 8, "e16": 16})
    claim = gain_grows_with_experts(seed_comparison(one_seed), one_seed)
    assert claim.verdict == NO_DATA and "smallest attainable p" in claim.evidence  # 1/3! = 0.17
    grows = _seeded(
        {"e4": [-0.01, -0.012, -0.008], "e8": [-0.03, -0.028, -0.033], "e16": [-0.06, -0.055, -0.058]},
        {"e4": 4, "e8": 8, "e16": 16},
    )
    claim = gain_grows_with_experts(seed_comparison(grows), grows)
    assert claim.verdict == SUPPORTED and "permutation p" in claim.evidence


def test_gain_grows_with_e_compares_only_runs_routed_alike():
    """An E8 run of another routing (an ablation) neither fills nor overwrites the series' E8."""
    grows = _seeded(
        {"e4": [-0.01, -0.012, -0.008], "e8": [-0.03, -0.028, -0.033], "e16": [-0.06, -0.055, -0.058]},
        {"e4": 4, "e8": 8, "e16": 16},
    )
    ablation = [
        r
        | {
            "model": "e8-free",
            "run_id": f"e8-free_s{r['seed']}",
            "final_val_loss": 9.0,
            "config": {"moe": {"routing": "sigmoid-bias", "load_balance_coef": 0.0, "bias_update_rate": 1e-3}},
        }
        for r in grows
        if r["model"] == "e8"
    ]
    claim = gain_grows_with_experts(seed_comparison(grows + ablation), grows + ablation)
    assert claim.verdict == SUPPORTED
    assert "softmax-topk, load_balance_coef 0.01" in claim.evidence
    lone = [r for r in grows if r["model"] != "e8"] + ablation
    claim = gain_grows_with_experts(seed_comparison(lone), lone)
    assert claim.verdict == NO_DATA and "E in [4, 16]" in claim.evidence


def test_gain_grows_with_e_holds_its_level_under_no_effect():
    """Differences independent of E: Spearman rho < 0 half the time; the permutation test at 5%."""
    rng = np.random.default_rng(0)
    verdicts = []
    for _ in range(60):
        noise = rng.normal(0, 0.02, (3, 3))
        runs = _seeded({f"e{e}": list(noise[i]) for i, e in enumerate((4, 8, 16))}, {"e4": 4, "e8": 8, "e16": 16})
        verdicts.append(gain_grows_with_experts(seed_comparison(runs), runs).verdict)
    assert verdicts.count(SUPPORTED) <= 6  # at most 10% of 60 (expected 5%)
    # a test that ran and decided neither way is inconclusive, not a lack of data
    assert verdicts.count(INCONCLUSIVE) >= 48 and NO_DATA not in verdicts


def test_balancing_verdicts_follow_what_was_measured():
    base = [_rec("d", "dense", 1e15, 0, 3.0)]
    runs = [*base, _rec("u", "moe", 1e15, 0, 3.2, 8, 2, balanced=False), _rec("b", "moe", 1e15, 0, 2.9, 8, 2)]
    health = {"u_1e+15_s0": [{"imbalance": 0.8}], "b_1e+15_s0": [{"imbalance": 0.1}]}
    assert collapses_without_balancing(runs, health).verdict == SUPPORTED
    assert balanced_does_not_collapse(runs, health).verdict == SUPPORTED
    untested = collapses_without_balancing([*base, *runs[2:]], {"b_1e+15_s0": [{"imbalance": 0.1}]})
    assert untested.verdict == NO_DATA and "load_balance_coef: 0" in untested.evidence
    broke = balanced_does_not_collapse([*base, *runs[2:]], {"b_1e+15_s0": [{"imbalance": 0.6}]})
    assert (
        broke.verdict == NOT_SUPPORTED and "1 of 1 runs with" in broke.evidence and "b_1e+15_s0 0.60" in broke.evidence
    )


def _measure(windows: list[float], peak: int | None, param_bytes: int) -> dict:
    return {
        "device_name": "cpu",
        "train": {"tokens_per_s_median": float(np.median(windows)), "tokens_per_s_windows": windows},
        "memory": {
            "param_bytes": param_bytes,
            "gradient_bytes": param_bytes,
            "optimizer_state_bytes": 2 * param_bytes,
            "peak_training_bytes": peak,
        },
    }


PAIR = [_rec("d", "dense", 1e15, 0, 3.0, total=10**6), _rec("m", "moe", 1e15, 0, 2.9, 8, 2, total=4 * 10**6)]


def test_claims_are_computed_from_the_data():
    measures = {"d_1e+15_s0": _measure([100.0] * 3 + [99.0], 2**20, 4 * 10**6)}
    measures["m_1e+15_s0"] = _measure([80.0] * 3 + [81.0], 2**20 + 16 * 3 * 10**6, 16 * 10**6)
    routing = {
        "m_1e+15_s0": {
            "moe": True,
            "experts": 8,
            "top_k": 2,
            "permutations": 199,
            "layers": [{"category": {"p_value": 0.005}}, {"category": {"p_value": 0.005}}],
            "summary": {"category_nmi_excess": 0.1, "topic_nmi_excess": 0.01},
        }
    }
    verdicts = {c.key: c.verdict for c in evaluate_claims(PAIR, measures, seed_comparison(PAIR), {}, routing)}
    assert verdicts == {
        "R1": NO_DATA,  # one seed
        "R1-E": NO_DATA,  # one expert count
        "R3-unbalanced": NO_DATA,  # no routing statistics
        "R3-balanced": NO_DATA,
        "R10": NO_DATA,  # one seed: one training ratio, no interval (timing windows are not replicates)
        "memory": NO_DATA,  # one routed size: no slope
        "specialisation": SUPPORTED,
    }


def test_reproduction_compares_within_tolerance_and_notices_other_data():
    prov = {"host": {"gpu": None, "cpu": "x"}, "git": {"commit": "abc"}}
    records = [_rec("d", "dense", 1e15, 0, 3.0, study="s", provenance=prov, data_fingerprint="f")]
    ours = summary(records, {}, {})
    assert ours["device_class"] == "cpu" == device_class(records[0])
    ref = {**ours, "runs": {"d_1e+15_s0": {"final_val_loss": 3.02}}}
    (row,), note = compare(ours, ref)
    assert row["reproduced"] and note == ""  # 0.7% < 1%
    ref["runs"]["d_1e+15_s0"]["final_val_loss"] = 3.1
    (row,), _ = compare(ours, ref)
    assert not row["reproduced"]
    _, note = compare(ours, {**ref, "data_fingerprint": "other"})
    assert "other data" in note
    gpu = {**records[0], "provenance": {**prov, "host": {"gpu": "NVIDIA H100 80GB HBM3"}}}
    assert device_class(gpu) == "nvidia-h100-80gb-hbm3"


def test_scaling_figures_and_tables_with_four_sizes_per_budget(tmp_path):
    """A study shaped like `full`: four dense sizes and a matched MoE family per size at two
    budgets, losses on parabolas in log N; the analysis finds the optima and the figures draw."""
    from harness.analysis import scaling, scaling_report
    from harness.report import cost_figures, figures

    records = []
    for budget, n_star in ((1e16, 2e6), (1e17, 6e6)):
        for n in (1e6, 2e6, 4e6, 9e6):
            dense = 3.0 - 0.6 * math.log10(budget / 1e16) + 0.2 * math.log(n / n_star) ** 2
            common = {"flops_spent": budget, "train_seconds": budget / 1e12, "gpu_energy_j": None}
            common |= {"tokens": int(budget / (6 * n))}
            records.append(
                _rec(f"d{n:g}", "dense", budget, 0, dense, active=int(n), total=int(n), **common)
                | {"config": {"moe": None, "d_ff": 256}}
            )
            moe = _rec(f"m{n:g}", "moe", budget, 0, dense - 0.05, 8, 2, active=int(n), total=int(4 * n), **common)
            moe["params"] |= {"total_non_embedding": int(4 * n)}
            moe["config"] = {"moe": {"d_expert": 128, "load_balance_coef": 0.01}, "d_ff": 256}
            records.append(moe)
    for r in records:
        r["params"].setdefault("total_non_embedding", r["params"]["total"])
    a = scaling.analyse(records, bootstrap=50)
    curves = scaling.isoflop_curves(a)
    assert len(curves) == 4 and all(c["n_opt"] is not None for c in curves)
    dense_opt = {c["budget_flops"]: c["n_opt"] for c in curves if c["arm"] == "dense"}
    assert dense_opt[1e16] == pytest.approx(2e6, rel=1e-6) and dense_opt[1e17] == pytest.approx(6e6, rel=1e-6)
    _, rows = scaling_report.multiplier_table(a)
    assert len(rows) == 8  # one row per MoE model and budget, a number or its reason
    for name, draw in {
        "isoflop": lambda p: figures.isoflop_figure(records, curves, p),
        "params": lambda p: figures.loss_vs_params(records, p),
        "cost": lambda p: cost_figures.loss_vs_cost(records, p),
    }.items():
        assert draw(tmp_path / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
