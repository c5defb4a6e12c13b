"""The speed (R10) and memory claims on records built to have known answers: replicates are
seeds or separately measured runs, never the timing windows of one process."""

from __future__ import annotations

import math

import pytest

from harness.analysis.claims import NO_DATA, NOT_SUPPORTED, SUPPORTED
from harness.analysis.cost_claims import (
    INCONCLUSIVE,
    memory_families,
    memory_follows_total,
    training_rate_ratios,
    wall_clock_below_flop_gain,
)

BUDGET = 7e12
DENSE_TOTAL = 400_000
PER_EXPERT = 50_000  # total parameters each routed expert adds (all layers)


def _rec(model, seed, seconds, experts=None, top_k=2, threads=2, cores=2):
    arm = "dense" if experts is None else "moe"
    total = DENSE_TOTAL if experts is None else DENSE_TOTAL - top_k * PER_EXPERT + experts * PER_EXPERT + 100
    return {
        "run_id": f"{model}_7e12_s{seed}",
        "model": model,
        "arm": arm,
        "experts": experts,
        "top_k": None if experts is None else top_k,
        "seed": seed,
        "budget_flops": BUDGET,
        "flops_spent": BUDGET,
        "train_seconds": seconds,
        "params": {"active": 300_000, "active_non_embedding": 200_000, "total": total},
        "flops_per_token": {"detailed": 6.0 * 300_000},
        "flop_convention": "detailed",
        "provenance": {"host": {"gpu": None, "cpu": "AMD EPYC", "torch_threads": threads, "cpu_count": cores}},
    }


def _pairs(dense_s: list[float], moe_s: list[float], **kw) -> list[dict]:
    records = [_rec("dense-d64", s, t, **kw) for s, t in enumerate(dense_s)]
    return records + [_rec("moe-e8k2", s, t, experts=8, **kw) for s, t in enumerate(moe_s)]


def test_wall_clock_verdict_from_seeds_paired_in_training():
    dense = [100.0, 130.0, 90.0]  # seeds differ a lot (host, data order); within a seed the MoE is ~1.4x slower
    slower = _pairs(dense, [141.0, 180.0, 128.0])
    claim = wall_clock_below_flop_gain(slower, {})
    assert claim.verdict == SUPPORTED
    assert "over 3 paired seeds" in claim.evidence and "x0.71" in claim.evidence
    (row,) = training_rate_ratios(slower).values()
    logs = [math.log(d / m) for d, m in zip(dense, [141, 180, 128], strict=True)]
    assert row["ratio"] == pytest.approx(math.exp(sum(logs) / 3))
    faster = _pairs(dense, [80.0, 104.0, 71.0])
    assert wall_clock_below_flop_gain(faster, {}).verdict == NOT_SUPPORTED
    mixed = _pairs(dense, [120.0, 110.0, 95.0])
    assert wall_clock_below_flop_gain(mixed, {}).verdict == INCONCLUSIVE
    one = _pairs(dense[:1], [141.0])
    claim = wall_clock_below_flop_gain(one, {})
    assert claim.verdict == NO_DATA and "one seed: no interval" in claim.evidence


def test_wall_clock_never_takes_timing_windows_of_one_process_as_replicates():
    records = _pairs([100.0], [141.0])
    steady = {
        r["run_id"]: {
            "device_name": "cpu",
            "train": {
                "tokens_per_s_median": 100.0 if r["arm"] == "dense" else 70.0,
                "tokens_per_s_windows": [70.0] * 9,
            },
        }
        for r in records
    }
    assert wall_clock_below_flop_gain(records, steady).verdict == NO_DATA  # one seed, one process each


def test_separately_measured_pairs_are_a_second_source():
    records = _pairs([100.0, 100.0, 100.0], [100.0, 100.0, 100.0])  # identical training times: no interval
    rate = {"dense": 1000.0, "moe": 700.0}
    measures = {
        r["run_id"]: {"device_name": "cpu", "train": {"tokens_per_s_median": rate[r["arm"]] + r["seed"]}}
        for r in records
    }
    claim = wall_clock_below_flop_gain(records, measures)
    assert claim.verdict == SUPPORTED and "3 separately measured pairs" in claim.evidence


def test_wall_clock_caveat_says_what_the_records_show_of_host_load():
    shared = wall_clock_below_flop_gain(_pairs([100.0, 130.0], [141.0, 180.0], threads=1, cores=2), {})
    assert "1 thread(s) on 2 cores" in shared.caveat and "side by side" in shared.caveat
    alone = wall_clock_below_flop_gain(_pairs([100.0, 130.0], [141.0, 180.0]), {})
    assert "do not say which runs trained at once" in alone.caveat and "flagged under Runs" in alone.caveat


BYTES_PER_PARAM = 16  # fp32 parameter + gradient + two Adam moments


def _memory_study(peak_of, experts=(2, 4, 8, 16), seeds=(0, 1)):
    """dense-d64 and its k = 2 twins; measured peak = peak_of(total, seed) (dense: no dispatch)."""
    records, measures = [], {}
    for seed in seeds:
        runs = [_rec("dense-d64", seed, 100.0)] + [_rec(f"moe-e{e}k2", seed, 140.0, experts=e) for e in experts]
        for r in runs:
            total = r["params"]["total"]
            state = BYTES_PER_PARAM * total
            measures[r["run_id"]] = {
                "device_name": "cpu",
                "memory": {
                    "param_bytes": state // 4,
                    "gradient_bytes": state // 4,
                    "optimizer_state_bytes": state // 2,
                    "peak_training_bytes": peak_of(total, seed, r["arm"]),
                },
            }
        records += runs
    return records, measures


def test_memory_slope_is_fitted_over_the_routed_runs_and_a_fixed_overhead_does_not_matter():
    # 8 MiB of dispatch buffers on every routed run: each MoE's increase over dense is far above what
    # its extra parameters predict, yet the slope is exactly the state's 16 bytes per parameter
    def peak(total, seed, arm):
        return 50 * 2**20 + BYTES_PER_PARAM * total + (8 * 2**20 if arm == "moe" else 0) + 4096 * seed

    records, measures = _memory_study(peak)
    claim = memory_follows_total(records, measures)
    assert claim.verdict == SUPPORTED
    assert "slope 16.0 bytes per parameter" in claim.evidence and "16.0 predicted" in claim.evidence
    assert "8 measured routed runs of 4 models (4 replicate a model" in claim.evidence
    assert "+8.0 MiB from dense-d64's measured peak" in claim.evidence
    assert "midway between active-only accounting" in claim.caveat
    ((key, family),) = memory_families(records, measures).items()
    assert key == ("dense-d64", 2, "cpu") and len(family["routed"]) == 8 and len(family["dense"]) == 2


def test_memory_verdicts_flat_noisy_and_too_few_sizes():
    flat, measures = _memory_study(lambda total, seed, arm: 60 * 2**20 + 2**20 * seed)
    assert memory_follows_total(flat, measures).verdict == NOT_SUPPORTED

    def noisy(total, seed, arm):  # half the prediction, with noise as large as the signal
        return 60 * 2**20 + 8 * total + (3 * 2**20 if (total // PER_EXPERT + seed) % 2 else -3 * 2**20)

    records, measures = _memory_study(noisy)
    assert memory_follows_total(records, measures).verdict == INCONCLUSIVE
    records, measures = _memory_study(lambda total, seed, arm: 16 * total, experts=(4, 8))
    claim = memory_follows_total(records, measures)
    assert claim.verdict == NO_DATA and "2 distinct total sizes" in claim.evidence
    assert memory_follows_total(records, {}).verdict == NO_DATA


def test_glance_table_compares_within_seed_and_says_over_what():
    from types import SimpleNamespace

    from harness.report.glance import glance_table, main_table_intro

    records = _pairs([100.0, 130.0, 90.0], [141.0, 180.0, 128.0])
    for r, loss in zip(records, [3.00, 3.10, 2.95, 2.96, 3.07, 2.90], strict=True):
        r["final_val_loss"] = loss
    evals = {
        r["run_id"]: {"tasks": {"heldout_ppl": {"bits_per_byte": 2.0 - 0.1 * (r["arm"] == "moe")}}}
        for r in records
        if r["seed"] == 0
    }
    measures = {
        r["run_id"]: {
            "device_name": "cpu",
            "train": {"tokens_per_s_median": 1000.0 if r["arm"] == "dense" else 600.0},
            "memory": {"peak_training_bytes": 100 if r["arm"] == "dense" else 150},
        }
        for r in records
        if r["seed"] == 0
    }
    row = {"model": "moe-e8k2", "budget_flops": BUDGET, "multiplier": 1.5, "multiplier_ci": None, "extrapolated": True}
    analysis = SimpleNamespace(
        multiplier_flops=[row], multiplier_seconds=[row | {"multiplier": 1.1, "extrapolated": False}]
    )
    headers, (cells,) = glance_table(records, evals, measures, analysis)
    g = dict(zip(headers, cells, strict=True))
    assert g["seeds (both arms)"] == 3
    assert g["val loss MoE - dense (mean over seeds)"] == "-0.0400"  # (-0.04 - 0.03 - 0.05) / 3
    assert g["bits/byte MoE - dense (mean over seeds with lm-eval)"] == "-0.1000 (1 of 3 seeds)"
    assert g["train tokens/s x (harness measure, measured seeds)"] == "0.60 (1 of 3 seeds)"
    assert g["training memory x (harness measure, measured seeds)"] == "1.50 (1 of 3 seeds)"
    assert g["training FLOP/s x (training runs, over the whole run, 95% t over seeds)"].startswith("0.71 [0.69, 0.7")
    assert (
        g["compute multiplier (vs dense frontier)"] == "1.50*"
        and g["wall-clock multiplier (vs compute-optimal dense at its own FLOP/s)"] == "1.10"
    )
    assert "within a seed" in main_table_intro() and main_table_intro().startswith("Each MoE")
