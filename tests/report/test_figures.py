"""The report's figures, read through matplotlib's object API on the returned Figure (no pixels):
every model has its own style, tick labels do not overlap, a small spread does not fill an axis,
a panel without data says so instead of drawing empty axes, and titles describe, not claim."""

from __future__ import annotations

import colorsys
import itertools

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.colors import to_rgba
from synthetic_records import MOES, SIZES, _rec, measure_of, study_records, tiny_records

from harness.analysis import curves, scaling
from harness.report import cost_figures, figure_style, figures
from harness.study.spec import budget_label
from harness.train import train_loss

CLAIM_WORDS = ("follows", "grows", "better", "worse", "beats", "wins", "shows", "proves", "because", "saves")


def _data_lines(ax) -> list:
    return [line for line in ax.get_lines() if len(line.get_xdata()) and line.get_marker() not in ("None", None, "")]


def _texts(fig) -> list[str]:
    """Every text drawn on the panels, line breaks of wrapping undone."""
    return [" ".join(t.get_text().split()) for ax in fig.axes for t in ax.texts]


@pytest.fixture(autouse=True)
def _close():
    yield
    plt.close("all")


def test_every_model_has_its_own_style_and_legend_entry():
    records = study_records()
    styles = figures.model_styles(records)
    keys = {(to_rgba(s["color"]), s["marker"], str(s["markerfacecolor"])) for s in styles.values()}
    assert len(keys) == len(styles) == len(SIZES) + len(MOES)
    dense = {to_rgba(styles[m]["color"]) for m in SIZES}
    assert len(dense) == len(SIZES)  # the dense sizes are told apart by colour alone
    moe_families = {to_rgba(styles[m]["color"]) for m in ("moe-d64-e2k2", "moe-d64-e4k2", "moe-d64-e8k2")}
    assert len(moe_families) == 3  # and so are MoEs of different E

    fig = cost_figures.draw_loss_vs_cost(records)
    ax = fig.axes[1]  # training wall-clock
    by_label = {line.get_label(): to_rgba(line.get_color()) for line in _data_lines(ax)}
    assert set(by_label) == set(SIZES) | set(MOES)
    legend = {t.get_text() for t in fig.legends[0].get_texts()}
    assert set(SIZES) | set(MOES) <= legend


def test_dense_and_moe_are_told_apart_by_colour_family_and_marker():
    styles = figures.model_styles(study_records())
    for model, style in styles.items():
        hue = colorsys.rgb_to_hsv(*to_rgba(style["color"])[:3])[0]
        if model.startswith("dense"):
            assert style["marker"] == "s" and 0.48 < hue < 0.62 and style["color"] in figure_style.DENSE_COLOURS
        else:
            assert style["marker"] != "s" and not 0.45 < hue < 0.68  # no MoE is cyan or blue


def test_a_models_style_does_not_change_when_another_model_joins_or_leaves():
    records = study_records()
    alone = figures.model_styles(records)
    more = [
        *records,
        _rec("dense-d40", "dense", 7e12, 1.0e5, 1.0e5, 3.5),
        _rec("dense-d80", "dense", 7e12, 3.8e5, 3.8e5, 3.4),
        _rec("moe-d64-e32k2", "moe", 7e12, 2.5e5, 3.2e6, 3.3, experts=32, top_k=2),
        _rec("moe-d64-e8k1", "moe", 7e12, 2.3e5, 8.0e5, 3.3, experts=8, top_k=1),
    ]
    fewer = [r for r in records if r["model"] in ("dense-d64", "moe-d64-e8k2-auxfree")]
    assert figures.model_styles(more) | alone == figures.model_styles(more)  # the same entries, unchanged
    assert figures.model_styles(fewer) == {m: alone[m] for m in ("dense-d64", "moe-d64-e8k2-auxfree")}
    keys = [(to_rgba(s["color"]), s["marker"]) for s in figures.model_styles(more).values()]
    assert len(set(keys)) == len(keys)


def _shipped_models() -> dict[str, list[dict]]:
    """Per shipped study, a record per model as model_styles reads it."""
    from conftest import ROOT

    from harness.study.runs import plan
    from harness.study.spec import load_study

    out = {}
    for path in sorted((ROOT / "workflows" / "studies").glob("*.yaml")):
        models = {run.model.name: run.model for run in plan(load_study(path))}
        out[path.stem] = [
            _rec(
                name,
                "dense" if m.moe is None else "moe",
                1e12,
                1e5,
                1e5,
                3.0,
                experts=m.moe and m.moe.experts,
                top_k=m.moe and m.moe.top_k,
            )
            | {"config": {"d_model": m.d_model}}
            for name, m in models.items()
        ]
    return out


def test_every_shipped_study_draws_each_model_in_a_style_of_its_own():
    for study, records in _shipped_models().items():
        styles = figures.model_styles(records)
        keys = [(to_rgba(s["color"]), s["marker"]) for s in styles.values()]
        assert len(set(keys)) == len(keys), study


def test_every_legend_names_each_model_once():
    records = [*study_records(), _rec("dense-d64", "dense", 7e12, SIZES["dense-d64"], SIZES["dense-d64"], 3.4, seed=1)]
    measures = {r["run_id"]: measure_of(r) for r in records}
    drawn = [
        figures.draw_loss_curves(records, curves.loss_bands(records, _logs(records))),
        figures.draw_loss_vs_params(records),
        figures.draw_isoflop(records, scaling.isoflop_curves(scaling.analyse(records, bootstrap=10))),
        cost_figures.draw_loss_vs_cost(records),
        cost_figures.draw_cost_scaling(records, measures),
    ]
    for fig in drawn:
        labels = [t.get_text() for t in fig.legends[0].get_texts()]
        assert len(labels) == len(set(labels))
        assert set(SIZES) | set(MOES) <= set(labels)  # the ablations (-auxfree, -nobalance) by their own names


def _overlaps(fig, axis: str) -> list[tuple[str, str]]:
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    out = []
    for ax in fig.axes:
        if not ax.axison:
            continue
        target = ax.xaxis if axis == "x" else ax.yaxis
        lo, hi = sorted(ax.get_xlim() if axis == "x" else ax.get_ylim())
        ticks = [
            t
            for t in target.get_ticklabels(which="both")
            if t.get_text() and t.get_visible() and lo <= (t.get_position()[0 if axis == "x" else 1]) <= hi
        ]
        boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in ticks]
        out += [(a, b) for (a, ba), (b, bb) in itertools.combinations(boxes, 2) if ba.overlaps(bb)]
    return out


@pytest.mark.parametrize("records", [study_records(), tiny_records()], ids=["cpu-like", "tiny-like"])
def test_tick_labels_do_not_collide(records):
    measures = {r["run_id"]: measure_of(r) for r in records}
    for fig in (
        figures.draw_loss_vs_params(records),
        cost_figures.draw_loss_vs_cost(records),
        cost_figures.draw_cost_scaling(records, measures),
    ):
        assert _overlaps(fig, "x") == [] and _overlaps(fig, "y") == []


def test_a_small_spread_does_not_fill_the_axis():
    records = tiny_records()  # active parameters 0.8% apart, FLOPs spent identical
    fig = cost_figures.draw_cost_scaling(records, {r["run_id"]: measure_of(r) for r in records})
    lo, hi = fig.axes[1].get_xlim()
    xs = [r["params"]["active"] for r in records]
    assert (max(xs) - min(xs)) / (hi - lo) < 0.2 and hi - lo >= 0.1 * np.mean(xs)
    fig = cost_figures.draw_loss_vs_cost(records)
    lo, hi = fig.axes[0].get_xlim()
    assert hi - lo >= 0.1 * 7e12 and fig.axes[0].get_xscale() == "linear"


def test_a_wide_spread_gets_a_log_axis():
    fig = figures.draw_loss_vs_params(study_records())
    assert fig.axes[1].get_xscale() == "log"  # total parameters: 1.4e5 to 1.6e6


def test_isoflop_with_one_size_draws_every_model_and_says_why_there_is_no_parabola():
    records = tiny_records()
    fig = figures.draw_isoflop(records, scaling.isoflop_curves(scaling.analyse(records, bootstrap=10)))
    (ax,) = fig.axes
    assert ax.axison
    points = {line.get_label(): line.get_xdata()[0] for line in _data_lines(ax)}
    assert points == {r["model"]: r["params"]["active_non_embedding"] for r in records}  # the MoE at active N
    note = " ".join(fig.get_suptitle().split())
    assert note.startswith("no parabola:") and "4 or more model sizes" in note
    assert "the most this study has is 1" in note
    assert "active, not total" in ax.get_xlabel()


def test_isoflop_draws_each_moe_beside_the_dense_parabola():
    records = _four_sizes() + [
        _rec("moe-d64-e8k2", "moe", 7e12, 2.48e5, 8.4e5, 3.28 + 0.01 * s, seed=s, experts=8, top_k=2) for s in range(3)
    ]
    fig = figures.draw_isoflop(records, scaling.isoflop_curves(scaling.analyse(records, bootstrap=10)))
    (ax,) = fig.axes
    (moe,) = [line for line in ax.get_lines() if line.get_label() == "moe-d64-e8k2"]
    assert moe.get_xdata()[0] == 2.48e5 and moe.get_ydata()[0] == pytest.approx(3.29)
    assert moe.get_marker() == "o" and any(line.get_label().startswith("parabola: dense") for line in ax.get_lines())


def _four_sizes() -> list[dict]:
    """Four dense sizes at 7e12 FLOPs on a parabola in ln N with its minimum at 3e5, three seeds each."""
    sizes = {"dense-d40": 1e5, "dense-d48": 2e5, "dense-d64": 4e5, "dense-d96": 8e5}  # not their real sizes
    return [
        _rec(m, "dense", 7e12, n, n, 3.3 + 0.05 * np.log(n / 3e5) ** 2 + 0.01 * s, seed=s)
        for m, n in sizes.items()
        for s in range(3)
    ]


def test_isoflop_with_four_dense_sizes_draws_the_parabola_only_over_the_sampled_sizes():
    records = _four_sizes()
    curves = scaling.isoflop_curves(scaling.analyse(records, bootstrap=10))
    fig = figures.draw_isoflop(records, curves)
    (ax,) = fig.axes
    assert ax.axison and "7e12 FLOPs" in ax.get_title()
    labels = {line.get_label() for line in ax.get_lines()}
    assert "dense-d40" in labels and "parabola minimum" in labels
    (parabola,) = [line for line in ax.get_lines() if line.get_label().startswith("parabola:")]
    assert min(parabola.get_xdata()) >= 1e5 * (1 - 1e-9) and max(parabola.get_xdata()) <= 8e5 * (1 + 1e-9)


def test_loss_vs_params_joins_no_sizes_and_marks_one_seed_points():
    extra = _rec("dense-d64", "dense", 7e12, SIZES["dense-d64"], SIZES["dense-d64"], 3.4, seed=1)
    records = [*study_records(), extra]
    fig = figures.draw_loss_vs_params(records)
    for ax in fig.axes[:2]:
        assert all(len(line.get_xdata()) <= 1 for line in ax.get_lines())  # no line through an IsoFLOP slice
        faces = {c.get_label(): to_rgba(c.lines[0].get_markerfacecolor()) for c in ax.containers}
        assert faces["dense-d48"] == to_rgba("white") and faces["dense-d64"] != to_rgba("white")
    assert any(t.get_text() == "one seed" for t in fig.legends[0].get_texts())


def test_energy_on_a_cpu_is_not_an_empty_panel():
    fig = cost_figures.draw_loss_vs_cost(study_records())  # no gpu_energy_j: no NVML
    energy = fig.axes[2]
    assert not energy.axison and energy.get_lines() == []
    (text,) = [" ".join(t.get_text().split()) for t in energy.texts]
    assert text.startswith("not enough data:") and "no NVML" in text and "absent, not zero" in text
    assert all(ax.axison for ax in fig.axes[:2])


def test_unmeasured_study_and_missing_routing_say_not_enough_data():
    for fig in (
        cost_figures.draw_cost_scaling(tiny_records(), {}),
        figures.draw_routing_health({}, {}),
        figures.draw_specialisation(None, None),
        figures.draw_downstream(tiny_records(), {}, {}),
    ):
        assert all(not ax.axison for ax in fig.axes)
        assert _texts(fig) and all(t.startswith("not enough data:") for t in _texts(fig))


def test_titles_describe_what_is_plotted_not_a_claim():
    records = study_records()
    measures = {r["run_id"]: measure_of(r) for r in records}
    drawn = [
        figures.draw_loss_vs_params(records),
        figures.draw_isoflop(records, scaling.isoflop_curves(scaling.analyse(records, bootstrap=10))),
        cost_figures.draw_loss_vs_cost(records),
        cost_figures.draw_cost_scaling(records, measures),
    ]
    titles = [ax.get_title() for fig in drawn for ax in fig.axes] + [fig.get_suptitle() for fig in drawn]
    assert all(" vs " in t for fig in drawn for ax in fig.axes if (t := ax.get_title()))
    assert not [t for t in titles for w in CLAIM_WORDS if w in t.lower()]
    assert "training memory vs total parameters" in titles and "training tokens/s vs active parameters" in titles


def test_a_flagged_throughput_is_drawn_hollow_and_marked():
    records = tiny_records()
    measures = {r["run_id"]: measure_of(r) for r in records}
    dense = records[0]["run_id"]
    measures[dense] = measure_of(records[0], windows=[3.3, 27.7, 20.0, 21.0, 22.0])
    fig = cost_figures.draw_cost_scaling(records, measures)
    ax = fig.axes[1]
    marked = {c.get_label(): c.lines[0].get_markerfacecolor() for c in ax.containers}  # errorbars: window range
    assert to_rgba(marked["dense-d64"]) == to_rgba("white") and to_rgba(marked["moe-d64-e8k2"]) != to_rgba("white")
    assert [t.get_text() for t in ax.texts] == [cost_figures.MARK]
    assert any("flagged" in t.get_text() for t in fig.legends[0].get_texts())


def test_figures_are_written_under_their_names(tmp_path):
    records = tiny_records()
    path = cost_figures.loss_vs_cost(records, tmp_path / "figures" / "loss_vs_cost.png")
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_downstream_points_are_styled_per_model_and_titled_by_metric():
    records = tiny_records()
    evals = {
        r["run_id"]: {"tasks": {"heldout_ppl": {"bits_per_byte": 1.85 - 0.01 * i}}, "local_tasks": {"tasks": {}}}
        for i, r in enumerate(records)
    }
    fig = figures.draw_downstream(records, evals, {"heldout_ppl": "bits_per_byte", "absent_task": "acc"})
    drawn, absent = fig.axes
    assert drawn.get_title() == "heldout_ppl: bits_per_byte vs validation loss"
    colours = {c.get_label(): to_rgba(c.lines[0].get_color()) for c in drawn.containers}
    assert set(colours) == {"dense-d64", "moe-d64-e8k2"} and len(set(colours.values())) == 2
    assert not absent.axison and _texts(fig) == ["not enough data: no run has absent_task acc"]


def _series(loads_per_step: list[list[int]]) -> dict[str, np.ndarray]:
    """routing_series of one layer with the given tokens per expert at each step."""
    tokens = np.array(loads_per_step, dtype=float)[:, None, :]  # (S, L=1, E)
    mean = tokens.mean(-1)
    return {
        "step": np.arange(1, len(loads_per_step) + 1),
        "tokens_per_expert": tokens,
        "load_cv": tokens.std(-1) / mean,
        "max_over_mean": tokens.max(-1) / mean,
        "dropped_fraction": np.zeros_like(mean),
        "router_entropy": np.ones_like(mean),
        "z_loss": np.zeros_like(mean),
    }


def test_routing_health_draws_the_normalised_imbalance_on_one_scale_with_the_threshold():
    series = {
        "e4k1": _series([[40, 8, 8, 8], [64, 0, 0, 0]]),  # max/mean 2.5, 4: normalised 0.5, 1
        "e16k2": _series([[100] + [20] * 15, [50] * 16]),  # max/mean 100/25 = 4: normalised 3/7
        "e2k2": _series([[64, 64], [64, 64]]),  # E = k: no imbalance
    }
    fig = figures.draw_routing_health(series, {"e4k1": 4, "e16k2": 16, "e2k2": 2}, {"e4k1": 1, "e16k2": 2, "e2k2": 2})
    top = fig.axes[:3]  # the first row: one panel per run
    assert all(ax.get_ylim() == (0, 1) for ax in top)
    for ax in top:  # the collapse threshold, the same line in every panel
        assert any(np.allclose(line.get_ydata(), 0.5) for line in ax.get_lines())
    drawn = {ax.get_title(): [line.get_ydata() for line in _layer_lines(ax)] for ax in top}
    assert np.allclose(drawn["e4k1"][0], [0.5, 1.0]) and np.allclose(drawn["e16k2"][0], [3 / 7, 0.0])
    assert drawn["e2k2"] == [] and any("E <= k" in t.get_text() for t in top[2].texts)
    assert "imbalance" in top[0].get_ylabel()
    titles = [ax.get_title() for ax in fig.axes] + [fig.get_suptitle()]
    assert not [t for t in titles for w in CLAIM_WORDS if w in t.lower()]


def _layer_lines(ax) -> list:
    return [line for line in ax.get_lines() if line.get_label().startswith("layer")]


# ---------------------------------------------------------------------------------------------
# Loss curves


def _log(r: dict, steps: int = 200, every: int = 25) -> list[dict]:
    """A metrics.jsonl of ``steps`` logged steps: the batch loss decays to the record's final loss
    plus a seed's offset and an alternating +-0.2 of one batch; validation every ``every`` steps."""
    out = []
    for step in range(1, steps + 1):
        smooth = r["final_val_loss"] + 3.0 * np.exp(-step / 30) + 0.05 * r["seed"]
        row = {"step": step, "tokens": step * 1000, "flops": step * 1000 * 6 * 2e5, "loss": smooth + 0.2 * (-1) ** step}
        if step % every == 0:
            row["val_loss"] = smooth - 0.1
        out.append(row)
    return out


def _logs(records: list[dict]) -> dict[str, list[dict]]:
    return {r["run_id"]: _log(r) for r in records}


def test_loss_curves_draw_a_training_and_a_validation_line_per_model_and_budget_with_a_band():
    n, loss = SIZES["dense-d64"], 3.3 + SIZES["dense-d64"] / 2e6  # as study_records' seed 0
    seeds = [_rec("dense-d64", "dense", 7e12, n, n, loss, seed=s) for s in (1, 2)]
    records = [*study_records(), *seeds]
    fig = figures.draw_loss_curves(records, curves.loss_bands(records, _logs(records)))
    budgets = sorted({r["budget_flops"] for r in records})
    assert len(fig.axes) == 2 * len(budgets)  # a row per budget: against tokens, against FLOPs
    for row, budget in enumerate(budgets):
        models = {r["model"] for r in records if r["budget_flops"] == budget}
        for ax, what in zip(fig.axes[2 * row : 2 * row + 2], ("tokens", "FLOPs"), strict=True):
            assert budget_label(budget) in ax.get_title() and what in ax.get_xlabel()
            train = [line.get_label() for line in ax.get_lines() if line.get_linestyle() == "-"]
            val = [line.get_label() for line in ax.get_lines() if line.get_linestyle() == "--"]
            assert sorted(train) == sorted(models) and sorted(val) == sorted(f"_validation {m}" for m in models)
            assert len(ax.collections) == 2 * len(models)  # a band for each line
    bands = curves.loss_bands(records, _logs(records))
    (d64,) = [b for b in bands if b.model == "dense-d64" and b.budget_flops == 7e12]
    assert d64.seeds == [0, 1, 2] and np.allclose(d64.val.high - d64.val.low, 0.1)  # seeds 0.05 apart: min to max
    assert np.allclose(d64.val.mean, (d64.val.low + d64.val.high) / 2)
    assert "min to max over seeds" in fig.get_suptitle() and "trailing mean" in fig.get_suptitle()
    tokens_axis, flops_axis = fig.axes[-2:]
    assert max(tokens_axis.get_lines()[0].get_xdata()) == 200 * 1000
    assert max(flops_axis.get_lines()[0].get_xdata()) == 200 * 1000 * 6 * 2e5


def test_loss_curves_without_logs_say_not_enough_data():
    fig = figures.draw_loss_curves(tiny_records(), [])
    assert all(not ax.axison for ax in fig.axes) and all(t.startswith("not enough data") for t in _texts(fig))


def test_the_training_loss_is_the_mean_of_the_final_tenth_not_one_batch():
    rows = _log(tiny_records()[0])
    final_batch = rows[-1]["loss"]
    smoothed = train_loss.train_loss_smoothed(rows)
    tail = [r["loss"] for r in rows if r["step"] > 180]  # the final tenth of 200 steps
    assert smoothed == pytest.approx(np.mean(tail)) and len(tail) == 20
    assert abs(final_batch - smoothed) == pytest.approx(0.2, abs=0.01)  # one batch is 0.2 off: the mean is not
    assert train_loss.train_loss_smoothed([]) is None
    assert np.allclose(curves.trailing_mean(np.array([1.0, 3.0, 5.0, 7.0]), 2), [1.0, 2.0, 4.0, 6.0])
