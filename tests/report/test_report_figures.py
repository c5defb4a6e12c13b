"""The report's figures as the report places them: the loss curves first among the loss figures
(report.md, report.html and the Snakemake report), what the training loss is and how much of a
gap to validation lies in the splits' text, and a rebuilt reference that writes every figure anew
in the current style and no figure the report no longer draws."""

from __future__ import annotations

import os
import re
import shutil
import struct

import pytest
from conftest import ROOT

from harness.cli import main
from harness.core.errors import HarnessError
from harness.core.io import read_json
from harness.report.browser_check import check, find_browser
from harness.report.build import FIGURES, _remove_stale_figures
from harness.report.sections import loss_curve_lines

LOSS_FIGURES = ("loss_curves", "loss_vs_params", "isoflop", "loss_vs_cost")


def _run(**kw) -> dict:
    return {"run_id": "r", "final_val_loss": 2.76, "train_loss_smoothed": 3.27} | kw


def test_the_training_loss_is_said_to_be_smoothed_and_the_gap_split_by_its_cause():
    (image, _, text, _) = loss_curve_lines(
        [
            _run(final_train_split_loss=3.23),
            _run(final_val_loss=2.71, train_loss_smoothed=3.16, final_train_split_loss=3.15),
        ],
        "![loss curves](figures/loss_curves.png)",
    )
    assert image.startswith("![loss curves]")
    assert "mean of the logged batch losses over the final tenth" in text and "without the auxiliary or z-loss" in text
    # gap: mean(0.51, 0.45) = 0.48; the training split scored as validation: mean(0.47, 0.44) = 0.455
    assert "train minus validation loss is +0.480 nats" in text and "give +0.455" in text and "remaining +0.025" in text
    older = loss_curve_lines([_run()], "")[2]
    assert "predate `final_train_split_loss`" in older and "+0." not in older


def test_figures_the_report_no_longer_draws_are_removed_and_nothing_else(tmp_path):
    folder = tmp_path / "figures"
    folder.mkdir()
    for name in ("loss_curves.png", "old_name.png", "notes.txt"):
        (folder / name).write_text("x")
    _remove_stale_figures(tmp_path)
    assert sorted(p.name for p in folder.iterdir()) == ["loss_curves.png", "notes.txt"]


def test_the_snakemake_report_lists_the_loss_curves_first():
    rules = (ROOT / "workflows" / "rules" / "report.smk").read_text()
    figures = re.findall(r'figures/(\w+)\.png",\s*caption="\.\./report/(\w+)\.rst".*?"#": "(\d\d)"', rules, re.S)
    assert figures[0][0] == "loss_curves" and figures[0][2] == "01"
    assert sorted(no for _, _, no in figures) == [f"{i:02d}" for i in range(1, len(FIGURES) + 1)]
    assert {name for name, _, _ in figures} == set(FIGURES)
    for _, caption, _ in figures:
        assert (ROOT / "workflows" / "report" / f"{caption}.rst").is_file()
    caption = (ROOT / "workflows" / "report" / "fig_loss_curves.rst").read_text()
    assert "min to max" in caption and "mean over the model's seeds" in caption


@pytest.fixture(scope="module")
def rebuilt(tmp_path_factory):
    """The committed tiny reference rebuilt from its records, in a copy, with a figure of an older
    report left in its figures folder."""
    root = tmp_path_factory.mktemp("rebuilt") / "cpu"
    shutil.copytree(ROOT / "results" / "reference" / "cpu" / "tiny", root / "tiny")
    (root / "tiny" / "figures" / "dropped_figure.png").write_bytes(b"\x89PNG old")
    for png in (root / "tiny" / "figures").glob("*.png"):
        os.utime(png, (0, 0))  # written long ago
    assert main(["report", "tiny", "--results", str(root)]) == 0
    return root / "tiny"


@pytest.mark.slow
def test_a_rebuilt_reference_draws_every_figure_anew_loss_curves_first(rebuilt):
    folder = rebuilt
    drawn = sorted(p.name for p in (folder / "figures").glob("*.png"))
    assert drawn == sorted(f"{name}.png" for name in FIGURES)  # the old figure is gone
    for name in FIGURES:  # each written by this rebuild, in the code's current style
        png = folder / "figures" / f"{name}.png"
        assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_mtime > 0
    md = (folder / "report.md").read_text()
    # A figure this study cannot show (tiny: the IsoFLOP figure) is named once under "Not
    # applicable to this study" instead of being placed; the others keep their order.
    placed = [name for name in LOSS_FIGURES if FIGURES[name] in md]
    assert "loss_curves" in placed
    gone = [name for name in LOSS_FIGURES if name not in placed]
    assert gone in ([], ["isoflop"]), gone
    if gone:
        section = md.split("## Not applicable to this study", 1)[1].split("\n## ", 1)[0]
        assert "\n- IsoFLOP figure (needs " in section
    order = [md.index(FIGURES[name]) for name in placed]
    assert order == sorted(order) and md.index(FIGURES["loss_curves"]) < md.index("## Runs") + 2000
    assert "Train loss in the table is the mean of the logged batch losses" in md


@pytest.mark.slow
def test_a_figure_the_report_calls_not_applicable_is_not_drawn_and_the_contrast_is_named(rebuilt):
    from harness.analysis.contrast import FILE, contrast_warning
    from harness.study.spec import load_study

    md = (rebuilt / "report.md").read_text()
    assert "\n- IsoFLOP figure (needs " in md and FIGURES["isoflop"] not in md
    png = (rebuilt / "figures" / "isoflop.png").read_bytes()
    assert struct.unpack(">II", png[16:24])[1] == 216  # one low panel saying why (1.8 inches at 120 dpi)
    assert "here `moe-d64-e16k2` against `dense-d64` at 7e12 FLOPs" in md  # R1's default, named
    assert read_json(rebuilt / FILE) == {
        "study": "tiny",
        "rule": "default",
        "contrast": {"moe": "moe-d64-e16k2", "dense": "dense-d64", "budget_flops": 7e12},
    }
    assert contrast_warning(load_study("tiny"), rebuilt) is None  # the plan chooses as the report did


@pytest.mark.slow
def test_the_rendered_report_shows_the_loss_curves_first_and_every_figure_loads(rebuilt):
    folder = rebuilt
    try:
        find_browser()
    except HarnessError as e:
        pytest.skip(f"needs Chromium (Debian package chromium): {e}")
    findings, shot = check(folder / "report.html", folder / "report.png")
    assert findings.problems() == []
    placed = [name for name in FIGURES if FIGURES[name] in (folder / "report.md").read_text()]
    assert len(placed) >= 2 and [im["ok"] for im in findings.images] == [True] * len(placed)
    assert findings.images[0]["alt"] == "loss curves"
    assert shot.read_bytes()[:4] == b"\x89PNG"
