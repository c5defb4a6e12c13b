"""The harness command as a user runs it."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import re
import subprocess
import sys

import pytest
import yaml
from conftest import CONFIGS, ROOT

from harness.cli import build_parser, main
from harness.study.spec import load_study, resolve_model_specs
from models.config import ConfigError, MoEConfig, load_config
from models.matching import match_moe


def harness(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "harness", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_count_prints_published_totals():
    r = harness("count", str(CONFIGS / "reference" / "mixtral-8x7b.yaml"), str(CONFIGS / "dense-s.yaml"))
    assert r.returncode == 0, r.stderr
    row = next(line for line in r.stdout.splitlines() if line.startswith("mixtral-8x7b"))
    assert "46.70B" in row and "12.88B" in row
    assert "dense-s" in r.stdout


def test_count_json_is_exact():
    r = harness("count", str(CONFIGS / "reference" / "olmoe-1b-7b.yaml"), "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["params"]["total"] == 6_919_161_856
    assert data["params"]["active"] == 1_282_017_280
    assert set(data["training_flops_per_token"]) == {"6N_active", "detailed"}


def test_bad_config_exits_2_with_one_message(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((CONFIGS / "dense-s.yaml").read_text() + "dropout: 0.1\n")
    r = harness("count", str(bad))
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0
    assert str(bad) in r.stderr and "'dropout'" in r.stderr and "allowed keys" in r.stderr


@pytest.mark.slow
def test_match_writes_a_loadable_config_named_after_its_file(tmp_path):
    out = tmp_path / "moe-s-e16k4.yaml"
    r = harness("match", str(CONFIGS / "dense-s.yaml"), "--experts", "16", "--top-k", "4", "--out", str(out))
    assert r.returncode == 0, r.stderr
    cfg = load_config(out)
    assert cfg.name == "moe-s-e16k4" and cfg.moe.d_expert == 256
    assert "router" in r.stderr and "all at MoEConfig's defaults" in r.stderr
    assert not list(tmp_path.glob(".*.tmp"))
    r = harness("match", str(CONFIGS / "dense-s.yaml"), "--experts", "16", "--top-k", "4")
    assert yaml.safe_load(r.stdout)["name"] == "dense-s-e16k4", "without --out: named after the dense model"


def _tiny_variant():
    """tiny's derived MoE entry and the config the study resolves it to."""
    (spec, cfg), *_ = [(s, c) for s, c in resolve_model_specs(load_study("tiny")) if s.base is not None]
    return spec, cfg


def _match(tmp_path, capsys, *args: str) -> tuple:
    out = tmp_path / "configs" / "moe-d64-e16k2.yaml"
    assert main(["match", *args, "--out", str(out), "--force"]) == 0  # --force: each call rewrites the file
    return load_config(out), capsys.readouterr().err


def test_match_with_a_studys_options_writes_the_studys_variant(tmp_path, capsys):
    spec, variant = _tiny_variant()
    args = [str(CONFIGS / spec.base), f"--experts={spec.experts}", f"--top-k={spec.top_k}"]
    args += [f"--shared={spec.shared_experts}"]
    options = [f"--moe={k}={v}" for k, v in spec.moe.items()]
    written, err = _match(tmp_path, capsys, *args, *options)
    assert written.name == spec.name
    # The study sets the vocabulary and the context; everything else is the entry's.
    assert written == dataclasses.replace(variant, vocab_size=written.vocab_size, max_seq_len=written.max_seq_len)
    defaults = {f.name: f.default for f in dataclasses.fields(MoEConfig)}
    set_apart = [k for k, v in spec.moe.items() if v != defaults[k]]
    assert set_apart, "tiny's entry sets an MoE option away from its default"
    for key in set_apart:
        assert f"{key} {spec.moe[key]} (default {defaults[key]})" in err
        left_out = [o for o in options if not o.startswith(f"--moe={key}=")]
        config, _ = _match(tmp_path, capsys, *args, *left_out)
        assert config.moe != variant.moe, f"leaving out {key} changes the config"


def test_match_flags_equal_their_moe_options(tmp_path, capsys):
    dense = str(CONFIGS / "dense-d64.yaml")
    flags, _ = _match(
        tmp_path, capsys, dense, "--experts=8", "--top-k=2", "--z-loss-coef=1e-3", "--load-balance-coef=0.02"
    )
    options, _ = _match(
        tmp_path, capsys, dense, "--experts=8", "--top-k=2", "--moe", "z_loss_coef=1e-3", "--moe=load_balance_coef=.02"
    )
    assert flags == options and flags.moe.z_loss_coef == 0.001 and flags.moe.load_balance_coef == 0.02
    every, _ = _match(tmp_path, capsys, dense, "--experts=8", "--top-k=2", "--moe=every=2", "--moe=shared_gate=false")
    assert every.moe.every == 2


def test_match_refuses_a_bad_moe_option_naming_it(capsys):
    dense = str(CONFIGS / "dense-d64.yaml")
    for option, fragment in [
        ("zloss=1", "'moe.zloss': unknown key; allowed keys: bias_update_rate, capacity_factor"),
        ("d_expert=4", "'moe.d_expert': set by matching itself"),
        ("z_loss_coef", "expected KEY=VALUE"),
        ("z_loss_coef=high", "'moe.z_loss_coef': must be a number"),
    ]:
        assert main(["match", dense, "--experts=8", "--top-k=2", f"--moe={option}"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and fragment in err, err
    assert main(["match", dense, "--experts=8", "--top-k=2", "--z-loss-coef=0.1", "--moe=z_loss_coef=0.1"]) == 2
    assert "given more than once" in capsys.readouterr().err
    # A study's moe: mapping goes through the same check: d_expert there once undid the matching.
    with pytest.raises(ConfigError, match=r"'moe\.d_expert': set by matching itself"):
        match_moe(load_config(dense), experts=8, top_k=2, d_expert=4)


def test_match_refusal_names_the_field():
    r = harness("match", str(CONFIGS / "dense-s.yaml"), "--experts", "8", "--top-k", "3")
    assert r.returncode == 2
    assert "'top_k'" in r.stderr and "split evenly" in r.stderr


PIPELINE = [
    "count",
    "match",
    "plan",
    "forecast",
    "data",
    "tasks",
    "train",
    "measure",
    "evaluate",
    "routing",
    "export",
    "sample",
    "report",
]


def _parsers():
    parser = build_parser()
    (verbs,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return parser, verbs, [("harness", parser)] + [(f"harness {n}", p) for n, p in verbs.choices.items()]


def test_every_argument_has_plain_help():
    _, verbs, parsers = _parsers()
    for where, parser in parsers:
        for action in parser._actions:
            if action is verbs:
                continue
            name = "/".join(action.option_strings) or action.dest
            assert action.help and action.help != argparse.SUPPRESS, f"{where} {name}: no help"
        text = parser.format_help()
        assert "`" not in text and ":class:" not in text, f"{where} --help has markup"
    assert all(choice.help for choice in verbs._choices_actions)


def test_verbs_are_listed_in_pipeline_order():
    _, verbs, _ = _parsers()
    assert list(verbs.choices) == PIPELINE
    # The workflow calls them in the same order: rule files as the Snakefile includes them.
    smk = re.findall(r'^include: "(.+)"', (ROOT / "Snakefile").read_text(), re.M)
    called = [v for f in smk for v in re.findall(r"-m harness (\w+)", (ROOT / f).read_text())]
    assert called and [PIPELINE.index(v) for v in called] == sorted(PIPELINE.index(v) for v in called)


def _declared(parser: argparse.ArgumentParser) -> list[tuple]:
    return [(tuple(a.option_strings), a.dest, a.help) for a in parser._actions]


def test_each_verb_is_a_module_of_the_cli_that_declares_its_own_arguments():
    """harness/cli/VERB.py holds each verb: its HELP, whether it takes a study and --results, its
    arguments and its command; build_parser declares no verb's argument itself."""
    import importlib

    import harness.cli as cli

    parser, verbs, _ = _parsers()
    assert tuple(verbs.choices) == cli.VERBS
    assert [a.dest for a in parser._actions if a is not verbs] == ["help", "version"]
    for name, built in verbs.choices.items():
        assert (ROOT / "harness" / "cli" / f"{name}.py").is_file(), name
        module = importlib.import_module(f"harness.cli.{name}")
        assert isinstance(module.HELP, str) and isinstance(module.STUDY, bool), name
        assert built.get_default("func") is module.run, name
        alone = argparse.ArgumentParser()
        if module.STUDY:
            alone.add_argument("study", help=built._actions[1].help)
            alone.add_argument("--results", default="results", help=built._actions[2].help)
        module.add_arguments(alone)
        assert _declared(built) == _declared(alone), f"harness {name}: arguments not all from its module"
    study_verbs = {n for n in cli.VERBS if importlib.import_module(f"harness.cli.{n}").STUDY}
    assert study_verbs == set(cli.VERBS) - {"count", "match", "measure"}


def test_version_names_the_package_and_the_commit():
    r = harness("--version")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"harness (moe-harness) {importlib.metadata.version('moe-harness')}")
    if (ROOT / ".git").exists():
        assert re.search(r"commit [0-9a-f]{12}", r.stdout)
