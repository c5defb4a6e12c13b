"""`harness sample`: a run's text, drawn reproducibly, greedy as a direct forward, refusals in one line."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from pico_study import RUN, RUNDIR, STUDY, cli_output

from harness.data.prepare import EOS, load_tokenizer
from harness.evaluate.sample import GREEDY_WEIGHT, generate, load_model, pick
from harness.study.runs import find_run
from harness.study.spec import load_study
from models.transformer import Transformer

SAMPLE = ("sample", STUDY, "--results", "results", "--run", RUN)


def _sample(*args: str) -> tuple[int, str, str]:
    return cli_output(*SAMPLE, *args)


def test_a_seed_gives_the_same_text_and_another_seed_other_text(study: Path, monkeypatch, one_thread):
    monkeypatch.chdir(study)
    runs = [_sample("--seed", seed, "--temperature", "1", "--tokens", "24") for seed in ("1", "1", "2")]
    assert [code for code, _, _ in runs] == [0, 0, 0], runs
    first, again, other = (out for _, out, _ in runs)
    assert first == again and first != other
    steps = json.loads((study / RUNDIR / "record.json").read_text())["steps"]
    said = runs[0][2]
    assert re.fullmatch(rf"# {RUN} at step {steps}: \d+ tokens, temperature 1.0, top-k all, seed 1, cpu\n", said)


def test_greedy_sampling_is_the_argmax_of_a_direct_forward(study: Path, monkeypatch, one_thread):
    monkeypatch.chdir(study)
    s = load_study(STUDY)
    run = find_run(s, RUN)
    model, step = load_model(s, run, study / RUNDIR, "cpu")
    assert step == json.loads((study / RUNDIR / "record.json").read_text())["steps"]
    tok = load_tokenizer(study / "results" / "pico" / "data")
    eos, prompt = tok.token_to_id(EOS), tok.encode("def f (", add_special_tokens=False).ids
    seq = [eos, *prompt]
    with torch.no_grad():
        for _ in range(6):  # the whole sequence each step, no cache
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    direct = seq[len(prompt) + 1 :]
    assert eos not in direct, "a test of six tokens needs six before the end-of-text token"
    assert generate(model, [eos, *prompt], 6, temperature=0.0, seed=5, stop=eos) == direct
    code, out, err = _sample("--prompt", "def f (", "--temperature", "0", "--tokens", "6")
    assert code == 0, err
    assert out == tok.decode(prompt + direct, skip_special_tokens=False) + "\n"


@pytest.mark.parametrize("moe", [None, {}, {"experts": 8, "top_k": 1}], ids=["dense", "moe", "moe-e8k1"])
def test_greedy_generation_through_the_cache_equals_full_forwards(moe):
    model = Transformer(tiny_config(moe, d_ff=48 if moe is None else None)).eval()
    seq = [3, 14, 15, 92]
    direct = list(seq)
    with torch.no_grad():
        for _ in range(8):
            direct.append(int(model(torch.tensor([direct])).logits[0, -1].argmax()))
    assert generate(model, seq, 8, temperature=0.0) == direct[len(seq) :]


def test_top_k_draws_only_among_the_k_likeliest():
    logits = torch.tensor([0.0, 3.0, 1.0, 2.9, -1.0])
    drawn = {pick(logits, 5.0, 2, torch.Generator().manual_seed(s)) for s in range(200)}
    assert drawn == {1, 3}
    assert {pick(logits, 5.0, None, torch.Generator().manual_seed(s)) for s in range(200)} == set(range(5))
    assert pick(logits, 0.0, None, torch.Generator()) == 1


def test_a_vanishing_temperature_is_the_argmax_and_a_huge_one_draws_evenly():
    logits, tied = torch.tensor([0.0, 3.0, 1.0, 2.9, -1.0]), torch.tensor([0.0, 3.0, 1.0, 3.0, -1.0])
    for temperature in (1e-3, 1e-45, 5e-324):
        g = torch.Generator().manual_seed(0)
        state = g.get_state()
        assert pick(logits, temperature, None, g) == 1 == pick(logits, 0.0, None, g)
        assert torch.equal(g.get_state(), state), "greedy draws nothing"
        # Tokens tied at the top share the probability at every temperature: a draw among them.
        assert {pick(tied, temperature, None, torch.Generator().manual_seed(s)) for s in range(50)} == {1, 3}
    for top_k in (None, 2, 5):  # 1e300 and 1.7e308 are inf in float32: -inf / inf was NaN under top-k
        drawn = {pick(logits, t, top_k, torch.Generator().manual_seed(s)) for s in range(100) for t in (1e300, 1.7e308)}
        assert drawn == ({1, 3} if top_k == 2 else set(range(5)))


def test_greedy_starts_where_the_rest_weighs_under_double_precision():
    # Two tokens a gap g apart: the rest weighs exp(-g / T) of the likeliest; greedy below 2**-53.
    at = math.log(2) * 53
    for ratio, greedy in ((at * 1.01, True), (at * 0.99, False)):
        g = torch.Generator().manual_seed(0)
        state = g.get_state()
        pick(torch.tensor([0.0, -1.0]), 1 / ratio, None, g)
        assert torch.equal(g.get_state(), state) is greedy, ratio
    assert GREEDY_WEIGHT == 2.0**-53


def test_a_stopped_run_is_sampled_from_its_latest_checkpoint(study: Path, monkeypatch, one_thread):
    monkeypatch.chdir(study)
    (study / RUNDIR / "record.json").unlink()
    code, out, err = _sample("--tokens", "4")
    assert code == 0 and out, err


def _one_line(code: int, out: str, err: str, *fragments: str) -> None:
    assert code == 2 and out == "", err
    assert err.startswith("harness sample: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err


def _no_run_folder(root: Path) -> None:
    import shutil

    shutil.rmtree(root / RUNDIR)


@pytest.mark.parametrize(
    ("args", "change", "fragments"),
    [
        (("--run", "nope"), None, ("no run 'nope' in study 'pico'; runs: dense-pico_6e9_s0",)),
        (
            (),
            _no_run_folder,
            (
                "checkpoint.pt does not exist (no checkpoint yet: training writes one every 10 steps",
                f"run `harness train study.yaml --run {RUN}` first",
            ),
        ),
        (
            (),
            lambda root: (root / RUNDIR / "checkpoint.pt").unlink(),
            ("checkpoint.pt is gone, though record.json says the run finished", "--restart"),
        ),
        (
            ("--prompt", "def return self " * 20),
            None,
            (
                "field '--prompt': the prompt is ",
                "context of 32 tokens holds at most 30 (a prompt is refused, not cut)",
            ),
        ),
        (("--tokens", "40"), None, ("field '--tokens': 40 new tokens after the 0-token prompt", "at most 31")),
    ],
    ids=["unknown-run", "never-trained", "checkpoint-gone", "prompt-too-long", "too-many-tokens"],
)
def test_refusals_are_one_line(args, change, fragments, study: Path, monkeypatch):
    monkeypatch.chdir(study)
    if change is not None:
        change(study)
    argv = list(SAMPLE)
    if args[:1] == ("--run",):
        argv = argv[:-2]
    _one_line(*cli_output(*argv, *args), *fragments)
