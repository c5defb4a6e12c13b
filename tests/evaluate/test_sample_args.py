"""`harness sample`'s arguments, met as a user meets them: each bad one is exit code 2 and one error
line naming the argument and what is allowed, no traceback and nothing changed in the study
folder; a vanishing temperature is greedy, exactly as 0, and a huge one draws without NaN.

Most cases run the verb in a subprocess (``python -m harness sample``) on a copy of the prepared
pico study; the refusals argparse makes before the study is read run in this process too, a wider
table of them at no start-up cost, and so does a prompt of NUL characters, which no command line
can carry.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
from conftest import PICO_MODEL
from pico_study import RUN, STUDY, cli_output
from verb_subprocess import assert_one_line, assert_unchanged, run_verb, snapshot

from harness.cli import build_parser

pytestmark = pytest.mark.slow  # each case runs harness sample as a subprocess

SAMPLE = ["harness", "sample", STUDY, "--results", "results", "--run", RUN]
PREFIX = "harness sample: error: "
VOCAB = PICO_MODEL["vocab_size"]
SEEDS = "from 0 to 2**64 - 1 (18446744073709551615)"
CPUS = os.cpu_count() or 1

# (id, arguments after SAMPLE, fragments the error line must hold: the argument and what is allowed)
REFUSALS = [
    (
        "prompt-not-utf8",
        ["--prompt", b"def \xff"],  # a byte no UTF-8 text holds, as a shell passes it
        ["argument --prompt: not valid UTF-8 (byte 0xff at character 4)", "give the prompt as UTF-8 text"],
    ),
    (
        "prompt-far-past-the-context",
        ["--prompt", "def return self " * 6000],
        ["field '--prompt': the prompt is ", "context of 32 tokens holds at most 30 (a prompt is refused, not cut)"],
    ),
    ("temperature-nan", ["--temperature", "nan"], ["argument --temperature: must be a finite number >= 0, got nan"]),
    ("seed-not-an-integer", ["--seed", "1e30"], ["argument --seed: must be an integer", SEEDS, "'1e30'"]),
    ("seed-past-64-bits", ["--seed", str(2**64)], ["argument --seed: must be an integer", SEEDS, str(2**64)]),
    (
        "top-k-past-the-vocabulary",
        ["--top-k", str(VOCAB + 1)],
        [f"field '--top-k': {VOCAB + 1} is more tokens than run {RUN}'s vocabulary of {VOCAB}; at most {VOCAB}"],
    ),
    ("threads-past-the-cpus", ["--threads", "1000000"], [f"argument --threads: must be an integer from 1 to {CPUS}"]),
]


@pytest.mark.parametrize(("args", "fragments"), [case[1:] for case in REFUSALS], ids=[case[0] for case in REFUSALS])
def test_a_bad_argument_is_one_line_and_changes_nothing(args, fragments, study: Path):
    before = snapshot(study)
    done = run_verb([*SAMPLE, *args], study)
    assert done.stdout == "", done.stdout
    assert_one_line(done, PREFIX, fragments)
    assert_unchanged(before, snapshot(study))


FIXED = ["--prompt", "def f (", "--tokens", "12", "--seed", "3", "--threads", "1"]


def _sample(study: Path, temperature: str, *args: str, env: dict[str, str] | None = None):
    done = run_verb([*SAMPLE, *FIXED, "--temperature", temperature, *args], study, env=env)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    return done


def test_a_vanishing_temperature_is_greedy_exactly_as_zero(study: Path, monkeypatch, one_thread):
    before = snapshot(study)
    runs = {t: _sample(study, t) for t in ("0", "-0.0", "1e-45")}  # 1e-45: logits / T was inf, softmax NaN
    greedy = runs["0"].stdout
    assert greedy.startswith("def f (") and len(greedy) > len("def f (\n"), greedy
    assert {t: done.stdout for t, done in runs.items()} == dict.fromkeys(runs, greedy)
    assert ", temperature 0.0, " in runs["-0.0"].stderr, runs["-0.0"].stderr  # -0 is 0
    monkeypatch.chdir(study)  # the least double > 0, in this process (it saves a start-up)
    assert cli_output(*SAMPLE[1:], *FIXED, "--temperature", "5e-324")[:2] == (0, greedy)
    assert_unchanged(before, snapshot(study))


def test_a_huge_temperature_draws_text_and_an_ascii_terminal_gets_it_escaped(study: Path):
    # 1e300 was a float32 inf: -inf / inf, a NaN, for every token --top-k left out. On a terminal
    # that takes ASCII only, what it cannot show is printed escaped, not a UnicodeEncodeError.
    ascii_only = {"PYTHONIOENCODING": "ascii"}
    done = _sample(study, "1e300", "--top-k", "5", "--prompt", "d\u00e9f f (", env=ascii_only)
    assert done.stdout.startswith("d\\xe9f f (") and len(done.stdout) > len("d\\xe9f f (\n"), done
    assert ", temperature 1e+300, top-k 5, seed 3, " in done.stderr, done.stderr


# --- argparse's refusals, in this process: what each argument allows --------------------------

ARGPARSE = [
    (["--prompt", "def \udcff"], ["--prompt", "not valid UTF-8 (byte 0xff at character 4)", "UTF-8 text"]),
    (["--prompt", "a\ud800b"], ["--prompt", "not valid UTF-8 (character U+D800 at character 1)"]),
    (["--temperature", "inf"], ["--temperature", "finite number >= 0, got inf"]),
    (["--temperature", "1e400"], ["--temperature", "finite number >= 0, got 1e400"]),
    (["--temperature=-1e-45"], ["--temperature", "finite number >= 0, got -1e-45"]),
    (["--temperature", "warm"], ["--temperature", "must be a number, got 'warm'"]),
    (["--seed", "-1"], ["--seed", SEEDS, "'-1'"]),
    (["--seed", "1.0"], ["--seed", SEEDS, "'1.0'"]),
    (["--seed", "9" * 5000], ["--seed", SEEDS, "'" + "9" * 40 + "...'"]),
    (["--threads", "0"], ["--threads", f"from 1 to {CPUS}"]),
    (["--top-k", "0"], ["--top-k", "must be >= 1, got 0"]),
    (["--tokens", "1e3"], ["--tokens", "must be an integer, got '1e3'"]),
]


@pytest.mark.parametrize(("args", "fragments"), ARGPARSE, ids=[" ".join(a)[:30] for a, _ in ARGPARSE])
def test_argparse_refuses_in_one_line(args, fragments):
    code, out, err = cli_output(*SAMPLE[1:], *args)
    lines = err.splitlines()
    assert code == 2 and out == "" and "Traceback" not in err, err
    assert lines[-1].startswith(PREFIX + "argument ") and [x for x in lines if ": error: " in x] == lines[-1:], err
    for fragment in fragments:
        assert fragment in lines[-1], (fragment, err)


def test_the_edges_of_what_is_allowed_parse():
    parse = build_parser().parse_args
    args = parse([*SAMPLE[1:], "--temperature", "-0.0", "--seed", str(2**64 - 1), "--threads", str(CPUS)])
    assert args.temperature == 0 and math.copysign(1, args.temperature) == 1 and args.seed == 2**64 - 1
    assert parse([*SAMPLE[1:], "--prompt", "", "--temperature", "5e-324", "--seed", "0"]).prompt == ""


def test_an_empty_prompt_is_a_new_document_and_nul_is_text(study: Path, monkeypatch, one_thread):
    monkeypatch.chdir(study)
    greedy = ("--temperature", "0", "--tokens", "4")
    empty, default = cli_output(*SAMPLE[1:], "--prompt", "", *greedy), cli_output(*SAMPLE[1:], *greedy)
    assert empty[0] == 0 and empty[1:] == default[1:], empty
    code, out, err = cli_output(*SAMPLE[1:], "--prompt", "a\x00b\x00", *greedy)
    assert code == 0 and out.startswith("a\x00b\x00"), err
