"""CPU training step of the CPU studies' models: the chosen path against eager float32.

One training step (forward, backward, clipping, AdamW) of a study's dense model and of its MoE
twin with the most experts, under two settings: eager float32 (the default before studies set a
dtype) and the study's own recipe (``dtype``, ``compile``). The four are interleaved round by
round (this machine drifts) and the medians of the per-round ratios are reported:

- speed-up of the study's path over eager float32, dense and MoE (goal: at least 1.5);
- the MoE step over the dense step, both on the study's path (goal: at most 1.15).

Run with ``make bench``. The goals are recorded with whether they were met, not asserted:
they depend on the CPU (bf16 pays off only with native bf16 matrix instructions).
"""

from __future__ import annotations

import statistics
import time

import pytest
import torch

from harness.study.spec import Recipe, load_study, resolve_models
from harness.train.loop import make_optimizer
from harness.train.precision import Precision, cpu_native_bf16, resolve
from models.transformer import Transformer

STUDIES = ["tiny", "cpu"]
ROUNDS, STEPS_PER_ROUND, WARMUP_STEPS = 8, 3, 3
GOAL_SPEEDUP, GOAL_MOE_OVER_DENSE = 1.5, 1.15


def _models(study_name: str):
    study = load_study(study_name)
    cfgs = resolve_models(study)
    twins = [c for c in cfgs if c.moe is not None and c.moe.load_balance_coef > 0]
    moe = max(twins, key=lambda c: c.moe.experts)
    # its dense base: the dense model of the same width and depth (a study may hold several sizes)
    dense = next(c for c in cfgs if c.moe is None and (c.d_model, c.n_layers) == (moe.d_model, moe.n_layers))
    return study, dense, moe


def _stepper(cfg, precision: Precision, recipe: Recipe):
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
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(WARMUP_STEPS):  # compilation and first-step allocations
        step()
    return step


@pytest.mark.parametrize("study_name", STUDIES)
def test_cpu_training_step_chosen_path_against_eager_fp32(benchmark, report_row, study_name):
    study, dense, moe = _models(study_name)
    r = study.recipe
    chosen = resolve(r, torch.device("cpu"))
    eager = Precision(torch.float32, compile=False)
    steppers = {
        ("dense", "eager"): _stepper(dense, eager, r),
        ("dense", "chosen"): _stepper(dense, chosen, r),
        ("moe", "eager"): _stepper(moe, eager, r),
        ("moe", "chosen"): _stepper(moe, chosen, r),
    }
    times: dict[tuple[str, str], list[float]] = {k: [] for k in steppers}

    def one_round() -> None:
        for key, step in steppers.items():
            start = time.perf_counter()
            for _ in range(STEPS_PER_ROUND):
                step()
            times[key].append((time.perf_counter() - start) / STEPS_PER_ROUND)

    benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1, warmup_rounds=0)

    def ratio(a: tuple[str, str], b: tuple[str, str]) -> float:
        return statistics.median(ta / tb for ta, tb in zip(times[a], times[b], strict=True))

    tokens = r.batch_size * r.seq_len
    info = {
        "kind": "cpu_training_step",
        "case": f"{study_name}: {dense.name} / {moe.name}",
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "cpu_native_bf16": cpu_native_bf16(),
        "chosen": chosen.describe(torch.device("cpu")),
        "tokens_per_step": tokens,
        "median_ms": {f"{m}_{p}": 1e3 * statistics.median(t) for (m, p), t in times.items()},
        "tokens_per_s": {f"{m}_{p}": tokens / statistics.median(t) for (m, p), t in times.items()},
        "speedup_dense": ratio(("dense", "eager"), ("dense", "chosen")),
        "speedup_moe": ratio(("moe", "eager"), ("moe", "chosen")),
        "moe_over_dense_chosen": ratio(("moe", "chosen"), ("dense", "chosen")),
        "moe_over_dense_eager": ratio(("moe", "eager"), ("dense", "eager")),
        "goal_speedup": GOAL_SPEEDUP,
        "goal_moe_over_dense": GOAL_MOE_OVER_DENSE,
    }
    info["meets_goal_speedup"] = min(info["speedup_dense"], info["speedup_moe"]) >= GOAL_SPEEDUP
    info["meets_goal_moe_over_dense"] = info["moe_over_dense_chosen"] <= GOAL_MOE_OVER_DENSE
    benchmark.extra_info.update(info)
    report_row(info)
