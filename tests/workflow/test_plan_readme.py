"""The README's study table gives each study's time as ``harness plan`` computes it from committed
inputs: the study files, and for a CPU study the reference host's probes
(``results/reference/cpu/probes.json``), read as they are with ``--probes``; a GPU study is planned
for the GPU the plan assumes (``--device cuda``: one H100 at 40% MFU). The corpus counts at the
study's ``data.max_bytes``, what the data step reads of any installed corpus larger than that; a
study without it (``full``, the whole site-packages) has its time in a word, hours or days.

To regenerate the cells, with an empty results folder so that nothing counts as done:

    harness plan tiny --probes results/reference/cpu/probes.json --results /tmp/none
    harness plan quick --device cuda --results /tmp/none

and, on the reference host (2-core AMD EPYC), the probes themselves:

    MOE_HARNESS_CACHE=results/reference/cpu harness plan STUDY --reprobe --results /tmp/none
"""

from __future__ import annotations

import json
import re

import pytest
from conftest import ROOT
from pico_study import cli_output

from harness.study.spec import load_study
from harness.workflow import plan as workflow_plan
from harness.workflow.probe import Probe

REFERENCE = ROOT / "results" / "reference" / "cpu" / "probes.json"
WORDS = {"hours": " h", "days": " days"}
"""A time the README says in a word, and the unit the plan's total then has."""


def _table() -> dict[str, str]:
    """The README's study table: study -> its 'where' cell."""
    table = (ROOT / "README.md").read_text().split("| study | where | disk | what |")[1].split("\n\n")[0]
    return {row.split("|")[1].strip(" `"): row.split("|")[2].strip() for row in table.splitlines()[2:]}


def _planned(name: str, results, monkeypatch) -> tuple[str, list[str]]:
    """The plan's total for study ``name`` from nothing done, and the arguments that gave it."""
    study = load_study(name)
    # what the data step reads, from the study file alone
    monkeypatch.setattr(workflow_plan, "corpus_bytes", lambda s: s.data.max_bytes or _installed(s))
    how = ["--probes", str(REFERENCE.relative_to(ROOT))] if study.device == "cpu" else ["--device", "cuda"]
    monkeypatch.chdir(ROOT)
    code, out, err = cli_output("plan", name, *how, "--results", str(results))
    assert code == 0, err
    total = re.search(r"about (.+?) in all", out)
    assert total, out
    return total.group(1), how


def _installed(study):
    from harness.workflow.stages import corpus_bytes

    return corpus_bytes(study)


def test_the_reference_probes_are_of_the_reference_host_and_quiet():
    probes = [Probe.from_json(entry) for entry in json.loads(REFERENCE.read_text())["probes"].values()]
    assert probes and all(p is not None for p in probes)
    assert {p.cores for p in probes} == {2} and {p.cpu for p in probes} == {"AMD EPYC"}
    assert all(p.busy() is None for p in probes), [p for p in probes if p.busy()]


@pytest.mark.parametrize("name", sorted(_table()))
def test_the_readme_time_of_each_study_is_the_plans(name, tmp_path, monkeypatch):
    cell = _table()[name]
    total, how = _planned(name, tmp_path, monkeypatch)
    command = f"`harness plan {name} {' '.join(how)} --results /tmp/none`"
    said = re.search(r"~([\d.]+ (?:s|min|h|days))\b", cell)
    if said is None:
        word = next((w for w in WORDS if w in cell), None)
        assert word is not None, f"README: {name}'s cell {cell!r} gives no time; {command} gives ~{total}"
        assert total.endswith(WORDS[word]), f"README: {name} takes {word}, {command} gives ~{total}"
        return
    assert said.group(1) == total, f"README: {name} takes ~{said.group(1)}; {command} gives ~{total}"
    if "--probes" in how:
        assert "on 2 cores" in cell, f"README: {name} is planned on the reference host's 2 cores"
