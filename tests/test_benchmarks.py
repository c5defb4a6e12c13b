"""The micro-benchmarks' own logic, in the fast tier (the benchmarks themselves run under `make
bench` and, a few rounds each, `make bench-smoke`): which models the training-step benchmark
picks, how the meter benchmark decides its goal, and which goals fail `make bench`."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest

from harness.study.spec import load_study

BENCHMARKS = Path(__file__).resolve().parent / "benchmarks"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


step = _load("test_cpu_training_step")
meter = _load("test_meter_overhead")
modes = _load("conftest")


def test_the_step_benchmark_times_each_studys_primary_sparse_pair_once():
    """tiny (no registration: R1's default) and cpu (registered) name the same pair and recipe:
    one case; cpu's softmax twin with as many experts is not it. Picked whatever the balancing."""
    (pair,) = step.distinct_pairs(("tiny", "cpu"))
    assert pair.studies == ("tiny", "cpu")
    assert (pair.dense.model.name, pair.moe.model.name) == ("dense-d64", "moe-d64-e16k2")
    assert pair.moe.model.moe.load_balance_coef == 0.0 and step.sparse(pair.moe.model)
    assert pair.moe.recipe.train_threads == 1 and pair.moe.recipe.compile


def test_a_primary_moe_that_is_not_sparse_gives_way_to_the_sparse_twin_with_most_experts():
    study = load_study("cpu")
    e_equals_k = dataclasses.replace(study.registration.primary, moe="moe-d64-e2k2")
    study = dataclasses.replace(study, registration=dataclasses.replace(study.registration, primary=e_equals_k))
    pair = step.primary_pair(study)
    # E16 twice (balanced and not): the one with more runs
    assert pair.moe.model.name == "moe-d64-e16k2" and pair.dense.model.name == "dense-d64"


@pytest.mark.parametrize(
    ("end_to_end", "own", "expected"),
    [
        ((0.002, 0.009), (0.02, 0.03), ("met", "end to end")),
        ((0.011, 0.02), (0.0, 0.001), ("not met", "end to end")),
        ((-0.02, 0.03), (0.006, 0.007), ("met", "own time (end to end undecided)")),
        ((-0.02, 0.03), (0.012, 0.013), ("not met", "own time (end to end undecided)")),
        ((-0.02, 0.03), (0.008, 0.012), ("undecided", "neither interval")),
    ],
)
def test_the_meter_goal_is_decided_by_the_interval_that_can(end_to_end, own, expected):
    assert meter.verdict(meter.side(*end_to_end), meter.side(*own)) == expected


def test_the_meter_interval_is_a_t_interval_of_the_paired_log_ratios():
    logs = [math.log(1.002), math.log(1.004), math.log(1.0), math.log(1.006)]
    p = meter.summarise(logs, [0.001, 0.002, 0.001, 0.002])
    mean = sum(logs) / 4
    assert p["overhead_fraction"] == pytest.approx(math.expm1(mean))
    assert p["ci95"][0] < p["overhead_fraction"] < p["ci95"][1] < 0.01
    # t(0.975, 3) = 3.182: the half-width of the mean of 0.001, 0.002, 0.001, 0.002
    assert p["own_ci95"][1] - 0.0015 == pytest.approx(3.182 * 0.000577 / 2, rel=1e-3)
    assert (p["verdict"], p["rounds"]) == ("met", 4)
    assert meter.summarise([0.0], [0.0])["verdict"] == "undecided"  # one round decides nothing


def _info(**meets) -> dict:
    return {"case": "x", **{f"meets_{k}": v for k, v in meets.items()}}


def test_make_bench_fails_on_every_goal_not_met_and_the_smoke_records_them():
    bench, rows = SimpleNamespace(extra_info={}), []
    full = modes.Goals(smoke=False, asserted=True)
    with pytest.raises(AssertionError, match="goals not met: goal_speedup, goal_overhead"):
        full.finish(bench, rows.append, _info(goal_speedup=False, goal_overhead=None, goal_ok=True))
    assert bench.extra_info["goals_asserted"] is True and rows[0]["smoke"] is False  # recorded first
    full.finish(bench, rows.append, _info(goal_ok=True))
    smoke = modes.Goals(smoke=True, asserted=False)
    smoke.finish(bench, rows.append, _info(goal_speedup=False))
    assert bench.extra_info["smoke"] is True and bench.extra_info["goals_asserted"] is False
    assert (smoke.rounds(8), full.rounds(8), smoke.rounds(8, smoke=1)) == (2, 8, 1)
