"""Routing health, seed statistics, claims and reproduction: the report's analyses on records
built to have known answers."""

from __future__ import annotations

import math

import pytest
from scipy import stats as sps

from harness.claims import NO_DATA, NOT_SUPPORTED, SUPPORTED, balancing_needed, evaluate_claims, iso_flop_gain
from harness.reproduce import compare, device_class, summary
from harness.routing_health import routing_health
from harness.stats import seed_comparison


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


def test_routing_health_flags_dead_and_dominant_experts_at_the_end_only():
    early = [_routing_step(s, [[0, 0, 0, 64], [16, 16, 16, 16]]) for s in range(1, 10)]  # collapsed early: ignored
    late = [_routing_step(s, [[10, 20, 30, 4], [0, 30, 20, 14]]) for s in range(10, 11)]
    rows = routing_health(early + late, experts=4)
    assert [r.collapsed for r in rows] == [False, True]
    assert rows[1].dead_experts == 1 and "1 dead expert" in rows[1].reason
    assert rows[0].max_over_mean == pytest.approx(30 / 16)
    assert rows[0].entropy_over_log_e == pytest.approx(0.9)
    dominated = routing_health([_routing_step(1, [[5, 5, 5, 49]])], experts=4)
    assert dominated[0].collapsed and "takes 77%" in dominated[0].reason
    assert routing_health([{"step": 1, "loss": 3.0}], experts=4) == []  # dense


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
    assert row["seeds"] == 3 and row["difference_mean"] == pytest.approx(sum(moe) / 3 - sum(dense) / 3)
    assert row["p_value"] == pytest.approx(sps.ttest_rel(moe, dense).pvalue)
    assert row["p_value"] < 0.05 and row["verdict"].startswith("MoE lower, significant")
    (single,) = seed_comparison(records[:1] + records[3:4])
    assert single["p_value"] is None and "no claim" in single["verdict"]


def test_claims_are_computed_from_the_data():
    base = [_rec("d", "dense", 1e15, 0, 3.0)]
    lower = [*base, _rec("m8", "moe", 1e15, 0, 2.9, 8, 2), _rec("m4", "moe", 1e15, 0, 2.95, 4, 2)]
    assert iso_flop_gain(lower, seed_comparison(lower)).verdict == SUPPORTED
    higher = [*base, _rec("m8", "moe", 1e15, 0, 3.1, 8, 2)]
    assert iso_flop_gain(higher, seed_comparison(higher)).verdict == NOT_SUPPORTED
    mixed = [*base, _rec("m8", "moe", 1e15, 0, 2.9, 8, 2), _rec("m4", "moe", 1e15, 0, 3.1, 4, 2)]
    claim = iso_flop_gain(mixed, seed_comparison(mixed))
    assert claim.verdict == NO_DATA and "mixed" in claim.evidence and "tokens per active parameter" in claim.caveat

    runs = [*base, _rec("u", "moe", 1e15, 0, 3.2, 8, 2, balanced=False), _rec("b", "moe", 1e15, 0, 2.9, 8, 2)]
    health = {"u_1e+15_s0": [{"collapsed": True}], "b_1e+15_s0": [{"collapsed": False}]}
    assert balancing_needed(runs, health).verdict == SUPPORTED
    assert balancing_needed([*base, *runs[2:]], {"b_1e+15_s0": [{"collapsed": False}]}).verdict == NO_DATA

    def meas(tok_s, param_bytes):
        return {
            "device_name": "cpu",
            "train": {"tokens_per_s_median": tok_s},
            "memory": {"param_bytes": param_bytes, "optimizer_state_bytes": 2 * param_bytes},
        }

    pair = [_rec("d", "dense", 1e15, 0, 3.0, total=1000), _rec("m", "moe", 1e15, 0, 2.9, 8, 2, total=4000)]
    measures = {"d_1e+15_s0": meas(100.0, 4000), "m_1e+15_s0": meas(80.0, 16000)}
    routing = {"m_1e+15_s0": {"moe": True, "summary": {"category_nmi_excess": 0.1, "topic_nmi_excess": 0.01}}}
    verdicts = {c.key: c.verdict for c in evaluate_claims(pair, measures, seed_comparison(pair), {}, routing)}
    assert verdicts["R10"] == SUPPORTED  # MoE ran 0.8x the FLOP/s of dense
    assert verdicts["memory"] == SUPPORTED  # memory x4 = total params x4
    assert verdicts["specialisation"] == SUPPORTED
    assert verdicts["R1-E"] == NO_DATA  # one expert count
    measures["m_1e+15_s0"] = meas(120.0, 8000)
    verdicts = {c.key: c.verdict for c in evaluate_claims(pair, measures, seed_comparison(pair), {}, routing)}
    assert verdicts["R10"] == NOT_SUPPORTED and verdicts["memory"] == NOT_SUPPORTED


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


def test_scaling_figures_and_tables_with_three_sizes_per_budget(tmp_path):
    """A study shaped like `full`: three dense sizes and a matched MoE family per size at two
    budgets, losses on parabolas in log N; the analysis finds the optima and the figures draw."""
    from harness import figures, scaling

    records = []
    for budget, n_star in ((1e16, 2e6), (1e17, 6e6)):
        for n in (1e6, 3e6, 9e6):
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
    _, rows = scaling.multiplier_table(a)
    assert all(row[4] != "-" for row in rows)  # two dense budgets: a multiplier for every MoE row
    for name, draw in {
        "isoflop": lambda p: figures.isoflop_figure(records, curves, p),
        "params": lambda p: figures.loss_vs_params(records, a.dense_fits, p),
        "cost": lambda p: figures.loss_vs_cost(records, p),
    }.items():
        assert draw(tmp_path / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
