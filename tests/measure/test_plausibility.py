"""Plausibility rules: a measured figure that cannot be right is flagged in measure.json and marked
in the report, not shown as a fact; a clean one is left alone."""

from __future__ import annotations

import copy

import pytest
from synthetic_records import CLEAN, DISTURBED, _measure, tiny_records

from harness.analysis import scaling
from harness.analysis.claims import evaluate_claims
from harness.analysis.stats import seed_comparison
from harness.measure.plausibility import (
    MARK,
    SPREAD_LIMIT,
    annotate,
    check_measure,
    flags_for,
    overhead_flags,
)
from harness.report.glance import glance_table
from harness.report.sections import _flag_section, overhead_lines
from harness.report.tables import claim_flags, claims_table, cost_table, flag_notes


def test_windows_spread_from_3_3_to_27_7_is_flagged_as_disturbed():
    m = _measure(tiny_records()[0], decode=DISTURBED)
    (flag,) = check_measure(m)["decode_batch1"]
    assert flag["rule"] == "window_spread" and flag["figure"] == "decode_batch1"
    assert flag["values"]["min"] == 3.3 and flag["values"]["max"] == 27.7
    assert flag["values"]["ratio"] == pytest.approx(27.7 / 3.3) and flag["values"]["limit"] == SPREAD_LIMIT
    assert "3.3 to 27.7 tokens/s" in flag["reason"] and "x8.4" in flag["reason"]


def test_a_clean_measurement_has_no_flags():
    m = annotate(_measure(tiny_records()[0]))
    assert check_measure(m) == {} and m["flags"] == []
    for section in ("train", "prefill", "decode_batch1", "matmul", "memory", "energy_train"):
        assert m[section]["flags"] == []  # present and empty: checked and clean
    # 6N_total counts every expert: above the matmul by design, so it is not held to the ceiling
    assert m["mfu"]["conventions"]["6N_total"]["flags"] == []


@pytest.mark.parametrize("fraction", [1.047, 1.30])
def test_model_flops_above_the_measured_matmul_are_flagged(fraction):
    m = _measure(tiny_records()[0], fraction=fraction)
    (flag,) = check_measure(m)["mfu.detailed"]
    assert flag["rule"] == "above_measured_matmul" and flag["values"]["value"] == fraction
    assert f"{fraction:.1%}" in flag["reason"] and "under load" in flag["reason"]
    assert check_measure(_measure(tiny_records()[0], fraction=0.99)) == {}


def test_derived_figures_carry_the_flags_of_their_inputs():
    m = _measure(tiny_records()[0], train=[10_000.0, 45_000.0, 44_000.0, 43_000.0, 42_000.0])
    flags = check_measure(m)
    assert "mfu.detailed" not in flags and [f["rule"] for f in flags_for(flags, "mfu.detailed")] == ["window_spread"]


def test_impossible_memory_and_energy_are_flagged():
    m = _measure(tiny_records()[0])
    m["memory"]["peak_training_bytes"] = -3 * 2**20
    m["energy_train"]["energy_j"] = 0.0
    flags = check_measure(m)
    assert flags["memory"][0]["rule"] == "nonpositive_memory"
    assert flags["energy_train"][0]["rule"] == "nonpositive_energy"


def test_annotate_writes_flags_into_each_section_and_the_top_level():
    m = annotate(_measure(tiny_records()[0], decode=DISTURBED, fraction=1.047))
    assert [f["rule"] for f in m["decode_batch1"]["flags"]] == ["window_spread"]
    assert [f["rule"] for f in m["mfu"]["conventions"]["detailed"]["flags"]] == ["above_measured_matmul"]
    assert {f["figure"] for f in m["flags"]} == {"decode_batch1", "mfu.detailed"} and m["train"]["flags"] == []


def test_meter_overhead_below_zero_beyond_its_noise_is_flagged():
    (flag,) = overhead_flags(-0.005)
    assert flag["rule"] == "negative_overhead" and flag["values"]["value"] == -0.005
    assert overhead_flags(0.0008) == [] and overhead_flags(-0.0004) == [] and overhead_flags(None) == []
    line = overhead_lines(-0.005)[0]
    assert f"-0.50% {MARK}" in line and "cannot make the step faster" in line
    assert MARK not in overhead_lines(0.0008)[0] and overhead_lines(None) == []


def _study(decode=CLEAN, fraction=0.3, train=None):
    records = tiny_records()
    dense, moe = records
    measures = {
        dense["run_id"]: _measure(dense, decode=decode, fraction=fraction, train=train),
        moe["run_id"]: _measure(moe),
    }
    return records, measures


def test_the_cost_table_marks_flagged_figures_and_the_notes_say_why():
    records, measures = _study(decode=DISTURBED, fraction=1.047)
    headers, rows = cost_table(records, measures)
    dense = dict(zip(headers, next(r for r in rows if r[1].startswith("dense")), strict=True))
    moe = dict(zip(headers, next(r for r in rows if r[1].startswith("moe")), strict=True))
    assert dense["decode b1 tokens/s"].endswith(MARK) and dense["detailed FLOPs / measured matmul"] == f"104.7% {MARK}"
    assert not dense["train tokens/s (harness measure, median window)"].endswith(MARK) and not any(
        MARK in str(v) for v in moe.values()
    )
    notes = flag_notes(records, measures)
    assert len(notes) == 2 and all(n.startswith(f"- {MARK} `dense-d64_7e12_s0`") for n in notes)
    assert any("decode b1 tokens/s: disturbed" in n and "3.3 to 27.7" in n for n in notes)
    assert any("detailed FLOPs / measured matmul: impossible" in n and "104.7%" in n for n in notes)
    section = _flag_section(notes)
    assert "not to be read as facts" in section[0] and section[2:4] == notes
    clean_records, clean = _study()
    assert flag_notes(clean_records, clean) == [] and _flag_section([]) == []
    assert not any(MARK in str(v) for row in cost_table(clean_records, clean)[1] for v in row)


def test_verdicts_and_ratios_resting_on_a_flagged_figure_say_so():
    records, measures = _study(train=[10_000.0, 45_000.0, 44_000.0, 43_000.0, 42_000.0] * 2)
    claims = evaluate_claims(records, measures, seed_comparison(records), {}, {})
    flagged = claim_flags(records, measures)
    assert list(flagged) == ["R10"] and flagged["R10"] == [
        "dense-d64_7e12_s0 train tokens/s (harness measure) (window_spread)"
    ]
    headers, rows = claims_table(claims, flagged)
    by_key = {c.key: dict(zip(headers, row, strict=True)) for c, row in zip(claims, rows, strict=True)}
    r10 = by_key["R10"]
    assert r10["caveat"].startswith(f"{MARK} rests on measurements flagged as disturbed or impossible (dense-d64")
    assert r10["verdict"] == "not enough data"  # a disturbed figure carries no verdict
    face_value = next(c.verdict for c in claims if c.key == "R10")
    assert f"would give '{face_value}'" in r10["caveat"]
    assert not any(MARK in v for k, row in by_key.items() if k != "R10" for v in row.values())
    headers, (row,) = glance_table(records, {}, measures, scaling.analyse(records, bootstrap=10))
    glance = dict(zip(headers, row, strict=True))
    tokens_per_s, memory = (
        glance[f"{x} x (harness measure, measured seeds)"] for x in ("train tokens/s", "training memory")
    )
    assert tokens_per_s == f"disturbed: see {MARK}1 below" and MARK not in memory  # no headline number
    clean_records, clean = _study()
    assert claim_flags(clean_records, clean) == {}


def test_flags_leave_the_measure_result_otherwise_unchanged():
    m = _measure(tiny_records()[0], decode=DISTURBED)
    before = copy.deepcopy(m)
    annotate(m)
    m.pop("flags")
    for section in ("train", "prefill", "decode_batch1", "matmul", "memory", "energy_train", "energy_prefill"):
        m[section].pop("flags")
    for row in m["mfu"]["conventions"].values():
        row.pop("flags")
    assert m == before
