"""CPU training step of the CPU studies' models: the study's own path against eager float32.

One training step (forward, backward, clipping, AdamW) of a study's primary pair under two
settings: eager float32 (the default before studies set a dtype) and the study's own recipe
(``dtype``, ``compile``), both at the study's threads (``recipe.train_threads``; all cores
where it names none) and its batch and sequence length. The four are interleaved round by round
(this machine drifts) and the medians of the per-round ratios are reported:

- speed-up of the study's path over eager float32, dense and MoE (goal: at least 1.5);
- the MoE step over the dense step, both on the study's path (goal: at most 1.15).

After the timed rounds each arm's study-path step is profiled (harness/measure/step_profile.py):
the milliseconds a step spends in expert GEMMs, other GEMMs, attention, the routing operators,
compiled elementwise kernels and the optimizer, dense and MoE side by side, so a missed goal
comes with where the MoE's extra time goes.

The pair is picked by what the benchmark needs, a sparse MoE (E > k) and its dense model, never
by how the MoE balances its experts: the study's primary contrast (its ``registration.primary``,
else its pinned ``contrast``, else R1's stated default over its planned runs:
harness.analysis.contrast) when that MoE is sparse; otherwise the sparse twin of the contrast's
dense model (same width and depth) with the most experts, ties broken by the most runs, then the
name. Each model runs its own entry's recipe (a study's model entry may override the batch; the
MoE over dense ratio is then per token). Studies that give the same pair with the same recipe
(``tiny`` and ``cpu``) are one case.

``make bench`` asserts both goals (they depend on the CPU: bf16 pays off only with native bf16
matrix instructions); ``make bench-smoke`` compiles each model once and times two rounds of one
step, recording the goals without asserting them.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import pytest
import torch

from harness.analysis.contrast import planned_contrast
from harness.measure.step_profile import OPTIMIZER_PHASE, profile_step
from harness.study.runs import plan
from harness.study.spec import Recipe, Run, Study, load_study
from harness.train.loop import make_optimizer
from harness.train.precision import Precision, cpu_native_bf16, resolve
from models.config import ModelConfig
from models.transformer import Transformer

STUDIES = ("tiny", "cpu")
ROUNDS, STEPS_PER_ROUND, WARMUP_STEPS, PROFILED_STEPS = 8, 3, 3, 5
GOAL_SPEEDUP, GOAL_MOE_OVER_DENSE = 1.5, 1.15


@dataclass(frozen=True)
class Pair:
    """A dense model and its sparse MoE twin, each with the recipe its study trains it with."""

    studies: tuple[str, ...]
    dense: Run
    moe: Run

    @property
    def id(self) -> str:
        return "+".join(self.studies)

    def same(self, other: Pair) -> bool:
        """The same models trained the same way (the runs' budgets and seeds do not matter here)."""
        return all(
            (a.model, a.recipe) == (b.model, b.recipe) for a, b in ((self.dense, other.dense), (self.moe, other.moe))
        )


def sparse(cfg: ModelConfig) -> bool:
    return cfg.moe is not None and cfg.moe.experts > cfg.moe.top_k


def primary_pair(study: Study) -> Pair | None:
    """The study's primary contrast when its MoE is sparse, else the sparse twin of the contrast's
    dense model with the most experts (ties: the most runs, then the name); None when the study
    has no sparse MoE."""
    runs: dict[str, Run] = {}
    count: dict[str, int] = {}
    for run in plan(study):
        runs.setdefault(run.model.name, run)
        count[run.model.name] = count.get(run.model.name, 0) + 1
    registered = study.registration.primary if study.registration else None
    contrast = registered or study.contrast or planned_contrast(study)
    if contrast is None:
        return None
    dense = runs[contrast.dense]
    twins = [
        r
        for r in runs.values()
        if sparse(r.model) and (r.model.d_model, r.model.n_layers) == (dense.model.d_model, dense.model.n_layers)
    ]
    if not twins:
        return None
    named = runs.get(contrast.moe)
    moe = (
        named if named in twins else max(twins, key=lambda r: (r.model.moe.experts, count[r.model.name], r.model.name))
    )
    return Pair((study.name,), dense, moe)


def distinct_pairs(names: tuple[str, ...] = STUDIES) -> list[Pair]:
    """Each study's primary pair, studies that give the same one merged into one case."""
    pairs: list[Pair] = []
    for name in names:
        pair = primary_pair(load_study(name))
        if pair is None:
            continue
        for i, seen in enumerate(pairs):
            if seen.same(pair):
                pairs[i] = Pair((*seen.studies, name), seen.dense, seen.moe)
                break
        else:
            pairs.append(pair)
    return pairs


def _stepper(cfg: ModelConfig, precision: Precision, recipe: Recipe, warmup: int):
    torch.manual_seed(0)
    model = Transformer(cfg)
    opt = make_optimizer(model, recipe)
    run_model = torch.compile(model) if precision.compile else model
    x = torch.randint(0, cfg.vocab_size, (recipe.batch_size, recipe.seq_len))
    y = torch.randint(0, cfg.vocab_size, (recipe.batch_size, recipe.seq_len))
    cpu = torch.device("cpu")

    def step() -> None:
        with precision.autocast(cpu):
            out = run_model(x, y)
        (out.loss + out.aux_loss).backward()
        with torch.profiler.record_function(OPTIMIZER_PHASE):
            torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)

    for _ in range(warmup):  # compilation (the first step) and first-step allocations
        step()
    return step


@pytest.fixture
def study_threads():
    """Restores the process's thread count after a case set its study's."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.mark.parametrize("pair", distinct_pairs(), ids=lambda p: p.id)
def test_cpu_training_step_chosen_path_against_eager_fp32(benchmark, report_row, goals, study_threads, pair: Pair):
    assert sparse(pair.moe.model), f"{pair.moe.model.name} is not sparse (E <= k)"
    cpu = torch.device("cpu")
    # The study's threads before anything compiles: inductor's CPU kernels keep the count they
    # were compiled with.
    threads = pair.moe.recipe.train_threads or torch.get_num_threads()
    study_threads(threads)
    chosen = resolve(pair.moe.recipe, cpu)
    assert chosen == resolve(pair.dense.recipe, cpu), "the two arms of a study train at one precision"
    eager = Precision(torch.float32, compile=False)
    warmup = 1 if goals.smoke else WARMUP_STEPS
    arms = {"dense": pair.dense, "moe": pair.moe}
    steppers = {
        (arm, path): _stepper(run.model, precision, run.recipe, warmup)
        for arm, run in arms.items()
        for path, precision in (("eager", eager), ("chosen", chosen))
    }
    steps_per_round = 1 if goals.smoke else STEPS_PER_ROUND
    times: dict[tuple[str, str], list[float]] = {k: [] for k in steppers}

    def one_round() -> None:
        for key, step in steppers.items():
            start = time.perf_counter()
            for _ in range(steps_per_round):
                step()
            times[key].append((time.perf_counter() - start) / steps_per_round)

    benchmark.pedantic(one_round, rounds=goals.rounds(ROUNDS), iterations=1, warmup_rounds=0)

    tokens = {arm: run.recipe.batch_size * run.recipe.seq_len for arm, run in arms.items()}

    def ratio(a: tuple[str, str], b: tuple[str, str]) -> float:
        """Median of the per-round ratios of time per token (the arms' batches may differ)."""
        per_a, per_b = ([t / tokens[k[0]] for t in times[k]] for k in (a, b))
        return statistics.median(ta / tb for ta, tb in zip(per_a, per_b, strict=True))

    info = {
        "kind": "cpu_training_step",
        "case": f"{', '.join(pair.studies)}: {pair.dense.model.name} / {pair.moe.model.name}",
        "studies": list(pair.studies),
        "models": {"dense": pair.dense.model.name, "moe": pair.moe.model.name},
        "experts": pair.moe.model.moe.experts,
        "top_k": pair.moe.model.moe.top_k,
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "cpu_native_bf16": cpu_native_bf16(),
        "chosen": chosen.describe(cpu),
        "batch_size": {arm: run.recipe.batch_size for arm, run in arms.items()},
        "seq_len": pair.moe.recipe.seq_len,
        "tokens_per_step": tokens,
        "rounds_timed": len(times[("moe", "chosen")]),
        "steps_per_round": steps_per_round,
        "median_ms": {f"{m}_{p}": 1e3 * statistics.median(t) for (m, p), t in times.items()},
        "tokens_per_s": {f"{m}_{p}": tokens[m] / statistics.median(t) for (m, p), t in times.items()},
        "speedup_dense": ratio(("dense", "eager"), ("dense", "chosen")),
        "speedup_moe": ratio(("moe", "eager"), ("moe", "chosen")),
        "moe_over_dense_chosen": ratio(("moe", "chosen"), ("dense", "chosen")),
        "moe_over_dense_eager": ratio(("moe", "eager"), ("dense", "eager")),
        "goal_speedup": GOAL_SPEEDUP,
        "goal_moe_over_dense": GOAL_MOE_OVER_DENSE,
    }
    profiled = 1 if goals.smoke else PROFILED_STEPS
    info["profile_ms"] = {arm: profile_step(steppers[(arm, "chosen")], profiled)["parts_ms"] for arm in arms}
    info["profiled_steps"] = profiled
    info["meets_goal_speedup"] = min(info["speedup_dense"], info["speedup_moe"]) >= GOAL_SPEEDUP
    info["meets_goal_moe_over_dense"] = info["moe_over_dense_chosen"] <= GOAL_MOE_OVER_DENSE
    goals.finish(benchmark, report_row, info)
