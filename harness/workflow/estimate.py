"""How long a study's runs will take, and how much they need, on the device they will use:
``harness plan``'s estimate.

* A model with a finished run of the same recipe: that run's own training rate.
* CPU: a probe (:mod:`harness.workflow.probe`): a few training steps of the model in the study's
  precision, timed on this machine with the threads a run gets, only where the probe's memory
  and time stay within bounds; a model over them gets the FLOP rate of the largest model probed,
  or no estimate when none was. A compiled study is probed eagerly in float32 and divided by
  :data:`CPU_COMPILE_SPEEDUP`: compiling in a plan would cost more than the estimate is worth.
* CUDA: the FLOPs at ``mfu`` of the device's bf16 peak (``harness.measure.throughput.PEAK_FLOPS``); with no
  GPU visible, of the GPU named with ``--gpu``.

A run's time adds its validation passes (a forward pass, a third of a training step, per
batch; the batches are as many as the validation split holds, up to ``eval_batches``:
:func:`evaluation_steps`), its compilation and a process start-up; a run in progress counts only
its steps left.
The study's training time is a list schedule (:func:`makespan`) of the runs left over the runs
that train at once (CPU: cores / (``train_threads`` x world size); CUDA: ``--gpus`` / world
size, the world size being the study's ``parallel.data``). The cores are this host's, or, with
``harness plan --probes FILE``, those of the host that took the probes.
"""

from __future__ import annotations

import math
import os
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch

from harness.core.io import read_json_object
from harness.study.spec import Recipe, Run
from harness.workflow.probe import Prober
from models.accounting import count_params

CPU_COMPILE_SPEEDUP = 1.65
"""bf16 autocast + torch.compile over eager float32, CPU training step at the tiny and cpu
studies' shapes: 1.63-1.71x (tests/benchmarks/test_cpu_training_step.py, AMD EPYC, 2 threads)."""

COMPILE_SECONDS = {"cpu": 60.0, "cuda": 60.0}
"""The first compiled step of a run when no finished run of the study says: on CPU the tiny
study's two runs took 56 s and 64 s (two compiling at once on 2 cores, empty inductor cache). No
GPU run has recorded it yet; the CPU figure stands in."""

STARTUP_SECONDS = 14.0
"""Process start, imports, shard verification, checkpoints and the final record: the tiny study's
train jobs took 13-15 s beyond training, validation and compile time."""

CHECKPOINT_COPIES = 2
"""checkpoint.pt and checkpoint.prev.pt, each weights + AdamW's two moments in float32."""


@dataclass(frozen=True)
class RunEstimate:
    seconds: float
    basis: str
    checkpoint_bytes: int
    eager_step_seconds: float
    """One eager training step: what the later stages (measure, evaluate) are counted in."""


def step_flops(run: Run) -> float:
    return run.flops_per_token * run.tokens_per_step


def cpu_step_seconds(run: Run, threads: int, prober: Prober) -> tuple[float, str]:
    """(seconds per training step, how it was found) on this CPU: the probe
    (:mod:`harness.workflow.probe`), else the FLOPs at the largest probed model's rate, else NaN with
    why the model was not probed."""
    r = run.recipe
    compiled = r.compile
    dtype = torch.float32 if compiled or r.dtype != "bfloat16" else torch.bfloat16
    seconds, basis = prober.step_seconds(run, step_flops(run), threads, dtype)
    if seconds is None:
        if not prober.rates:
            return float("nan"), f"not probed: {basis}"
        seconds, basis = step_flops(run) / max(prober.rates), "FLOPs at the largest probed model's rate"
    if compiled:
        return seconds / CPU_COMPILE_SPEEDUP, f"{basis} / {CPU_COMPILE_SPEEDUP} (compiled)"
    return seconds, basis


def validation_batches(run: Run, validation_tokens: float | None) -> float:
    """Batches of one validation pass: ``eval_batches``, or fewer where the validation split holds
    fewer windows of ``seq_len`` (``TokenShard.eval_indices`` takes each window at most once)."""
    r: Recipe = run.recipe
    if validation_tokens is None:
        return r.eval_batches
    windows = max(1.0, (validation_tokens - 1) // r.seq_len)
    return min(r.eval_batches, math.ceil(windows / r.batch_size))


def evaluation_steps(run: Run, validation_tokens: float | None = None) -> float:
    """Validation passes of a run, in training-step equivalents; ``validation_tokens``: what the
    validation split holds (None: not known, ``eval_batches`` are counted)."""
    r: Recipe = run.recipe
    passes = run.steps // r.eval_every + (run.steps % r.eval_every != 0)
    return passes * validation_batches(run, validation_tokens) / 3


def checkpoint_bytes(run: Run) -> int:
    return CHECKPOINT_COPIES * 3 * 4 * count_params(run.model).total


def estimate_run(
    run: Run,
    device: str,
    prober: Prober | None = None,
    measured_tokens_per_s: float | None = None,
    gpu_flops: float | None = None,
    compile_s: float | None = None,
    done_steps: int = 0,
    validation_tokens: float | None = None,
) -> RunEstimate:
    """One run's wall time on ``device`` ('cpu' or 'cuda'): ``measured_tokens_per_s`` from a
    finished run of the same model, else the probe (CPU) or ``gpu_flops`` (CUDA: peak x MFU).
    ``done_steps``: steps a run in progress has behind it; only the rest is counted.
    ``validation_tokens``: the validation split's tokens, which bound its passes."""
    if measured_tokens_per_s:
        step_s, basis = run.tokens_per_step / measured_tokens_per_s, "a finished run's rate"
    elif device == "cuda":
        step_s, basis = step_flops(run) / gpu_flops, "FLOPs at the assumed MFU of the GPU's peak"
    else:
        prober = prober or Prober.start()
        threads = run.recipe.train_threads or prober.cores
        step_s, basis = cpu_step_seconds(run, threads, prober)
    compiled = run.recipe.compile
    compiling = (compile_s if compile_s is not None else COMPILE_SECONDS[device]) if compiled else 0.0
    # Validation runs the eager model: on a CPU, at the uncompiled rate.
    eager_step_s = step_s * CPU_COMPILE_SPEEDUP if compiled and device == "cpu" else step_s
    left = 1 - min(done_steps, run.steps) / run.steps
    work = left * (run.steps * step_s + evaluation_steps(run, validation_tokens) * eager_step_s)
    return RunEstimate(work + compiling + STARTUP_SECONDS, basis, checkpoint_bytes(run), eager_step_s)


def estimate_runs(runs: list[Run], device: str, done_steps: list[int], **how) -> list[RunEstimate]:
    """:func:`estimate_run` of every run; on a CPU the models are probed smallest step first, so
    that each probe's time bound uses the rate of the largest model probed before it (with
    ``prober``, the plan's; else this host's cache)."""
    prober = how.pop("prober", None)
    prober = (prober or Prober.start()) if device == "cpu" else None
    order = sorted(range(len(runs)), key=lambda i: step_flops(runs[i]))
    out: dict[int, RunEstimate] = {}
    rates = how.pop("rates", {})
    for i in order:
        measured = rates.get(runs[i].model.name)
        out[i] = estimate_run(runs[i], device, prober, measured, done_steps=done_steps[i], **how)
    if prober is not None:
        prober.save()
    return [out[i] for i in range(len(runs))]


def makespan(seconds: list[float], slots: int) -> float:
    """Wall time of jobs of ``seconds`` on ``slots`` workers taking the longest first (Graham's
    LPT list schedule, 1969): at least the longest job and the total over the slots."""
    loads = [0.0] * max(1, slots)
    for s in sorted(seconds, reverse=True):
        loads[loads.index(min(loads))] += s
    return max(loads)


def concurrent_runs(recipe: Recipe, device: str, gpus: int, world: int = 1, cores: int | None = None) -> int:
    """How many runs train at once, each over ``world`` processes (parallel.data): the GPUs
    over the GPUs a run takes, or the CPU cores (``cores``, else this host's) over a run's threads
    (train_threads per process; without it, a run takes every core)."""
    if device == "cuda":
        return max(1, gpus // world)
    cores = cores or os.cpu_count() or 1
    return max(1, cores // (recipe.train_threads * world if recipe.train_threads else cores))


def finished_rates(results: Path, runs: list[Run]) -> tuple[dict[str, float], float | None]:
    """Training tokens/s of finished runs by model name (same recipe), and their median compile
    seconds."""
    rates, compiles = {}, []
    for run in runs:
        record = read_record(results, run)
        if record.get("tokens_per_s"):
            rates[run.model.name] = record["tokens_per_s"]
        if record.get("compile_seconds"):
            compiles.append(record["compile_seconds"])
    return rates, (statistics.median(compiles) if compiles else None)


def read_record(results: Path, run: Run) -> dict:
    """A run's record.json ({} when it has none or it does not parse; `harness plan` refuses a
    damaged or misplaced one before it reads any, harness.workflow.plan.check_records)."""
    return read_json_object(results / "runs" / run.run_id / "record.json") or {}
