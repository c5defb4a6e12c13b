"""A flagged figure is no headline: the at-a-glance cell says it is disturbed (or impossible) and
points to a note under the table that holds the value and the command that takes it again; the
figures of time and speed draw a disturbed point hollow, marked, with a legend entry. Labels name
every choice that changes a model's parameter count; loss against parameters tells budgets
apart; the IsoFLOP figure shows nothing where the report calls it not applicable."""

from __future__ import annotations

import re
from pathlib import Path

from matplotlib.colors import to_rgba
from synthetic_records import measure_of, study_records, tiny_records

from harness.analysis import scaling
from harness.analysis.stats import arm_label
from harness.measure.plausibility import MARK, check_training
from harness.report import cost_figures, figures
from harness.report.figure_style import NOT_APPLICABLE
from harness.report.glance import glance, withheld_lines

SPEED = "train tokens/s x (harness measure, measured seeds)"
MEMORY = "training memory x (harness measure, measured seeds)"
FLOP_RATE = "training FLOP/s x (training runs, over the whole run, 95% t over seeds)"
BUSY = [450_000.0, 460_000.0, 470_000.0, 150_000.0, 455_000.0]  # one window at a third of the others


def _glance(records, measures, trained=None):
    headers, (row,), withheld = glance(records, {}, measures, scaling.analyse(records, bootstrap=10), trained)
    return dict(zip(headers, row, strict=True)), withheld


def test_a_flagged_speed_carries_no_number_and_its_note_holds_the_value_and_the_command():
    records = tiny_records()
    dense, moe = records
    measures = {dense["run_id"]: measure_of(dense), moe["run_id"]: measure_of(moe, windows=BUSY)}
    cells, withheld = _glance(records, measures)
    assert cells[SPEED] == f"disturbed: see {MARK}1 below"
    assert not re.search(r"\d", cells[SPEED].replace(f"{MARK}1", ""))  # no figure in the headline
    assert re.fullmatch(r"\d\.\d\d", cells[MEMORY])  # the clean figure beside it stays
    (w,) = withheld
    ratio = (
        measures[moe["run_id"]]["train"]["tokens_per_s_median"]
        / measures[dense["run_id"]]["train"]["tokens_per_s_median"]
    )
    assert w.value == f"{ratio:.2f}" and ratio > 10 and w.measured == {moe["run_id"]} and not w.trained
    lines = withheld_lines(withheld, "tiny", Path("results/tiny"))
    (note,) = [line for line in lines if line.startswith(f"- {MARK}1 ")]
    assert w.value in note and SPEED in note and f"`{moe['run_id']}`" in note and "window_spread" in note
    assert "`moe-d64-e8k2` against `dense-d64` at 7e12 FLOPs" in note
    assert f"harness measure tiny --run {moe['run_id']} --force" in lines
    assert not any(dense["run_id"] in line for line in lines)  # only what the withheld figure rests on
    (reference, _) = withheld_lines(withheld, "tiny", Path("results/reference/cpu/tiny"), is_reference=True)[-2:]
    assert "a reference keeps none" in reference


def test_every_timed_or_measured_glance_cell_is_withheld_when_flagged():
    records = tiny_records()
    dense, moe = records
    measures = {r["run_id"]: measure_of(r) for r in records}
    measures[moe["run_id"]]["memory"]["peak_training_bytes"] = -(2**20)  # impossible: training freed memory
    elapsed, rows = 0.0, []
    for step in range(1, 101):  # a steady run but for steps 40-69, three times slower
        elapsed += 3.0 if 40 <= step < 70 else 1.0
        rows.append({"step": step, "elapsed_s": elapsed})
    trained = {dense["run_id"]: check_training(dense | {"steps": 100}, rows), moe["run_id"]: []}
    assert trained[dense["run_id"]]
    cells, withheld = _glance(records, measures, trained)
    assert cells[MEMORY] == f"impossible: see {MARK}1 below"
    assert cells[FLOP_RATE] == f"disturbed: see {MARK}2 below"
    assert [w.column for w in withheld] == [MEMORY, FLOP_RATE]
    assert withheld[1].trained == {dense["run_id"]} and not withheld[1].measured
    lines = withheld_lines(withheld, "tiny", Path("results/tiny"))
    assert any(line.startswith(f"- {MARK}1 {MEMORY}") and "no value" in line for line in lines)
    assert f"harness train tiny --run {dense['run_id']} --restart" in lines
    assert f"harness measure tiny --run {moe['run_id']} --force" in lines
    assert withheld_lines([], "tiny", Path("results/tiny")) == []


def _hollow(ax) -> list:
    return [line for line in ax.lines if to_rgba(line.get_markerfacecolor()) == to_rgba("white")]


def test_loss_vs_cost_draws_a_disturbed_training_time_hollow_and_marked():
    records = tiny_records()
    for r in records:
        r["gpu_energy_j"] = r["train_seconds"] * 50.0
    dense = records[0]
    fig = cost_figures.draw_loss_vs_cost(records, {dense["run_id"]})
    flops, seconds, joules = fig.axes
    for ax, x in ((seconds, dense["train_seconds"]), (joules, dense["gpu_energy_j"])):
        (point,) = _hollow(ax)
        assert list(point.get_xdata()) == [x] and list(point.get_ydata()) == [dense["final_val_loss"]]
        assert point.get_marker() == "s"  # the model's own marker, hollow
        assert [t.get_text() for t in ax.texts] == [MARK]
    assert not _hollow(flops) and not flops.texts  # FLOPs are counted, not timed
    assert any("training time flagged as disturbed" in t.get_text() for t in fig.legends[0].get_texts())
    clean = cost_figures.draw_loss_vs_cost(records)
    assert not any(_hollow(ax) or ax.texts for ax in clean.axes)
    assert not any(MARK in t.get_text() for t in clean.legends[0].get_texts())


def test_loss_vs_params_tells_budgets_apart_with_a_legend_entry_each():
    fig = figures.draw_loss_vs_params(study_records())  # dense-d64 at 2.5e12 and 7e12
    d64 = [c.lines[0] for c in fig.axes[0].containers if c.get_label() == "dense-d64"]
    assert len(d64) == 2 and d64[0].get_markersize() != d64[1].get_markersize()
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "7e12 FLOPs" in labels and "2.5e12 FLOPs" in labels
    big, small = (h for h, t in zip(fig.legends[0].legend_handles, labels, strict=True) if t.endswith(" FLOPs"))
    assert big.get_markersize() > small.get_markersize()
    one = figures.draw_loss_vs_params(tiny_records())
    assert not any(t.get_text().endswith(" FLOPs") for t in one.legends[0].get_texts())


def test_the_isoflop_figure_shows_nothing_but_why_where_it_does_not_apply():
    records = study_records()
    why = "IsoFLOP figure (needs 4 or more model sizes of one arm at one budget; here at most 3)"
    fig = figures.draw_isoflop(records, [], why)
    (ax,) = fig.axes
    assert not ax.axison and not ax.lines and not fig.legends
    assert [t.get_text().replace("\n", " ") for t in ax.texts] == [f"{NOT_APPLICABLE}: {why}"]


def _moe(experts=32, top_k=3, d_ff=256, **moe):
    width = moe.pop("d_expert", None) or d_ff // (top_k + moe.get("shared_experts", 0))
    config = {"d_ff": d_ff, "moe": {"experts": experts, "top_k": top_k, "d_expert": width, **moe}}
    return {"arm": "moe", "experts": experts, "top_k": top_k, "config": config}


def test_a_label_names_every_choice_that_changes_the_parameter_count():
    assert arm_label({"arm": "dense"}) == "dense"
    assert arm_label(_moe(16, 2)) == "MoE E16 k2"  # compute-matched width: nothing to add
    assert arm_label(_moe(shared_experts=1)) == "MoE E32 k3 +1 shared"
    assert arm_label(_moe(shared_experts=2, shared_gate=True, d_ff=320)) == "MoE E32 k3 +2 shared (gated)"
    assert arm_label(_moe(16, 2, d_expert=32)) == "MoE E16 k2, d_expert d_ff/8"  # fine-grained, not matched
    assert arm_label(_moe(8, 2, d_ff=None, d_expert=64)) == "MoE E8 k2, d_expert 64"
    assert arm_label(_moe(16, 2, routing="noisy-topk")) == "MoE E16 k2, noisy router"
    assert arm_label(_moe(16, 2, every=2, first_dense=1)) == "MoE E16 k2, MoE in every 2nd block, first 1 block dense"
    assert arm_label({"arm": "moe", "experts": 4, "top_k": 2, "config": {}}) == "MoE E4 k2"  # records without one
