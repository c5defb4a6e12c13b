"""The primary contrast of a study without a registration is a stated default chosen among its
arms: the report records the one it tested, and a change of models that would move it is said
before anything runs, naming the old and the new contrast and how to pin one."""

from __future__ import annotations

import io
from types import SimpleNamespace

import pytest
import yaml
from conftest import ROOT

from harness.analysis.contrast import (
    FILE,
    contrast_warning,
    planned_contrast,
    print_contrast_warning,
    recorded_contrast,
    report_contrast,
    write_contrast,
)
from harness.study.spec import load_study

SHARED = {"base": "dense-d64.yaml", "experts": 32, "top_k": 3, "shared_experts": 1}
"""The E32 k3 twin with a shared expert (d_expert 256 / 4): more experts than tiny's E16 k2."""


def _study(tmp_path, name="tiny-copy", extra=(), drop=(), seeds=(0,), registration=None, contrast=None):
    data = yaml.safe_load((ROOT / "workflows" / "studies" / "tiny.yaml").read_text())
    data["name"] = name
    data["seeds"] = list(seeds)
    data["models"] = [
        {**m, "config": str(ROOT / "models" / "configs" / m["config"])} if "config" in m else m
        for m in data["models"]
        if m.get("name") not in drop
    ]
    for m in data["models"]:
        if "base" in m:
            m["base"] = str(ROOT / "models" / "configs" / m["base"])
    data["models"] += [{**m, "base": str(ROOT / "models" / "configs" / m["base"])} for m in extra]
    if registration:
        data["registration"] = registration
    if contrast:
        data["contrast"] = contrast
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_study(path)


def test_no_warning_while_the_contrast_is_the_one_the_last_report_tested(tmp_path):
    study = _study(tmp_path)
    results = tmp_path / "results" / study.name
    assert contrast_warning(study, results) is None  # no report yet: nothing to compare with
    c = planned_contrast(study)
    assert (c.moe, c.dense, c.budget) == ("moe-d64-e16k2", "dense-d64", 7e12)
    write_contrast(results, study, c, "default")
    recorded = recorded_contrast(results)
    assert recorded["contrast"] == {"moe": "moe-d64-e16k2", "dense": "dense-d64", "budget_flops": 7e12}
    assert contrast_warning(study, results) is None


def test_a_model_that_moves_the_default_is_named_with_the_old_contrast_and_the_pin(tmp_path):
    study = _study(tmp_path)
    results = tmp_path / "results" / study.name
    write_contrast(results, study, planned_contrast(study), "default")
    grown = _study(tmp_path, extra=[SHARED])  # the same study, a model added
    line = contrast_warning(grown, results)
    assert line is not None
    assert "tested `moe-d64-e16k2` against `dense-d64` at 7e12 FLOPs (the stated default)" in line
    assert "is `dense-d64-e32k3s1` against `dense-d64` at 7e12 FLOPs" in line
    assert "ties going to the largest E" in line and str(results / FILE) in line
    pin = "contrast: {moe: moe-d64-e16k2, dense: dense-d64, budget: 7e12}"
    assert f"pin it in {grown.path}: `{pin}`" in line  # one seed is enough for a pin
    out = io.StringIO()
    print_contrast_warning(grown, results.parent, file=out)
    assert out.getvalue() == f"warning: {line}\n"
    # The pin, as the warning prints it, is all it takes: no warning, and the report tests it.
    pinned = _study(tmp_path, extra=[SHARED], contrast=yaml.safe_load(pin)["contrast"])
    assert contrast_warning(pinned, results) is None
    c, rule = report_contrast(pinned, [])
    assert (c.moe, c.dense, c.budget, c.seeds, rule) == ("moe-d64-e16k2", "dense-d64", 7e12, 1, "pinned")
    # Without the old arm, putting it back is what keeps it.
    gone = _study(tmp_path, extra=[SHARED], drop=("moe-d64-e16k2",))
    assert "put `moe-d64-e16k2` back in the study at 7e12 FLOPs" in contrast_warning(gone, results)


def test_removing_the_only_sparse_arm_is_said_too(tmp_path):
    study = _study(tmp_path)
    results = tmp_path / "results" / study.name
    write_contrast(results, study, planned_contrast(study), "default")
    alone = _study(tmp_path, drop=("moe-d64-e16k2",))
    assert planned_contrast(alone) is None
    assert "R1 would have no contrast" in contrast_warning(alone, results)


def test_no_warning_where_the_study_registers_its_contrast(tmp_path):
    study = _study(tmp_path, seeds=(0, 1))
    results = tmp_path / "results" / study.name
    write_contrast(results, study, planned_contrast(study), "default")
    primary = {"moe": "moe-d64-e16k2", "dense": "dense-d64", "budget": 7e12}
    pinned = _study(tmp_path, extra=[SHARED], seeds=(0, 1), registration={"primary": primary})
    assert contrast_warning(pinned, results) is None
    c, rule = report_contrast(pinned, [])
    assert (c.moe, rule) == ("moe-d64-e16k2", "registered")


@pytest.mark.parametrize("text", ["", "not json", '{"rule": "default", "contrast": {"moe": 3}}', "[1]"])
def test_an_unreadable_record_is_no_record(tmp_path, text):
    (tmp_path / FILE).write_text(text)
    assert recorded_contrast(tmp_path) is None


def test_the_report_names_the_contrast_its_rule_and_a_change_since_the_last_report():
    from harness.report.sections import _contrast_sentence
    from harness.study.spec import PrimaryContrast

    new = PrimaryContrast("dense-d64-e32k3s1", "dense-d64", 7e12)
    old = {"rule": "default", "contrast": {"moe": "moe-d64-e16k2", "dense": "dense-d64", "budget_flops": 7e12}}
    report = SimpleNamespace(contrast=new, contrast_rule="default", previous_contrast=None)
    text = _contrast_sentence(report)
    assert "stated default, the sparse MoE arm, E > k" in text
    assert "here `dense-d64-e32k3s1` against `dense-d64` at 7e12 FLOPs" in text and "changed" not in text
    report.previous_contrast = old
    text = _contrast_sentence(report)
    assert "**changed**: the last report of this folder tested `moe-d64-e16k2` against `dense-d64`" in text
    report.contrast = PrimaryContrast("moe-d64-e16k2", "dense-d64", 7e12)
    assert "changed" not in _contrast_sentence(report)


def test_a_pinned_contrast_is_checked_like_a_registered_one(tmp_path):
    from harness.study.runs import plan
    from models.config import ConfigError

    bad = _study(tmp_path, contrast={"moe": "moe-d64-e8k2", "dense": "dense-d64", "budget": 7e12})
    with pytest.raises(ConfigError, match=r"contrast\.moe.*'moe-d64-e8k2' is not an MoE model of this study"):
        plan(bad)
    off = _study(tmp_path, contrast={"moe": "moe-d64-e16k2", "dense": "dense-d64", "budget": 3.5e12})
    with pytest.raises(ConfigError, match=r"contrast\.budget"):
        plan(off)
    primary = {"moe": "moe-d64-e16k2", "dense": "dense-d64", "budget": 7e12}
    with pytest.raises(ConfigError, match=r"contrast.*beside registration\.primary"):
        _study(tmp_path, seeds=(0, 1), registration={"primary": primary}, contrast=primary)


def test_r1_tests_the_pinned_contrast_and_says_it_is_pinned_not_registered():
    from harness.analysis.claims import iso_flop_gain
    from harness.study.spec import PrimaryContrast

    records = [
        {
            "run_id": f"{m}_7e12_s{s}",
            "model": m,
            "budget_flops": 7e12,
            "seed": s,
            "final_val_loss": loss,
            "tokens": 1e6,
            "params": {"active": 1e5},
        }
        for s in (0, 1, 2)
        for m, loss in (("dense-d64", 3.0 + 0.01 * s), ("moe-d64-e16k2", 2.9 + 0.012 * s))
    ]
    claim = iso_flop_gain(records, [], None, PrimaryContrast("moe-d64-e16k2", "dense-d64", 7e12, seeds=1))
    assert "the study pins its contrast (`contrast:`): moe-d64-e16k2 vs dense-d64 at 7e12 FLOPs" in claim.evidence
    assert "exploratory: the study registers no primary contrast" in claim.caveat
