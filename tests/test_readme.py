"""The README tells a user what they need before the commands it shows."""

from __future__ import annotations

import re

from conftest import ROOT

README = (ROOT / "README.md").read_text()
COMMAND = re.compile(r"(?:^|`)(snakemake|harness|lm_eval)(?=[ `]|$)", re.M)
"""A command of the virtual environment where the README shows it: a line of a code block or the
start of an inline code span (not `harness/...` paths, nor the name moe-harness)."""


def test_the_readme_says_how_to_reach_the_venvs_commands_before_showing_one():
    first = COMMAND.search(README)
    assert first is not None
    activate = README.find("`. .venv/bin/activate`")
    assert 0 <= activate < first.start(), f"first command at {README[first.start() : first.start() + 40]!r}"
    said = README[activate - 300 : first.start()]
    assert all(f"`.venv/bin/{c}`" in said for c in ("snakemake", "harness", "lm_eval")), said


def test_the_readme_shows_harness_sample_with_its_options():
    assert re.search(r"^harness sample tiny --run \S+ --prompt ", README, re.M)
    for option in ("--tokens N", "--temperature", "--top-k K", "--seed"):
        assert f"`{option}" in README, option
