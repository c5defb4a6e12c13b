"""``harness plan STUDY``: the run matrix, what is done, how long the rest takes and the disk it
needs, answered in seconds and without training anything that may not fit.

Each run's training time is recorded (``train`` job's benchmark, else its record) once done, and
estimated before (``harness.workflow.estimate``; on a CPU a bounded probe, ``harness.workflow.probe``). When no
model of a study could be probed on this CPU and the study may use a GPU (``device: auto``),
the times are those of the GPU, with a warning saying why the CPU was not probed. The stages
after training are estimated from their settings (``harness.workflow.stages``); the total is the sum of
the stage rows shown. The disk is ``harness.workflow.disk``'s.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import replace
from pathlib import Path

from tabulate import tabulate

from harness.study.runs import analysed, plan, plan_rows
from harness.study.spec import budget_label, load_study
from harness.workflow.disk import SHORT, describe, study_disk
from harness.workflow.estimate import (
    COMPILE_SECONDS,
    concurrent_runs,
    estimate_runs,
    finished_rates,
    makespan,
    read_record,
    step_flops,
)
from harness.workflow.reuse import REUSED, reusable_sources, reuse_lines
from harness.workflow.stages import BYTES_PER_TOKEN, Setting, Stage, corpus_bytes, megabytes, pipeline, recorded_seconds
from models.config import ConfigError


def human(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def duration(seconds: float) -> str:
    if seconds != seconds:  # NaN: not estimated
        return "-"
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def plan_device(study, runs, args: argparse.Namespace) -> tuple[str, list[str]]:
    """The device the study's runs will use ('cpu' or 'cuda'), and warnings about the plan."""
    import torch

    visible = torch.cuda.is_available()
    device = args.device or ("cuda" if study.device == "cuda" or (study.device == "auto" and visible) else "cpu")
    args.gpus = plan_gpus(study, len(runs), device, args.gpus)
    warnings = []
    if device == "cuda" and not visible:
        warnings.append(
            f"no CUDA device is visible here: the times assume {args.gpus} x {args.gpu} at {args.mfu:.0%} MFU"
        )
    return device, warnings


def plan_gpus(study, runs: int, device: str, gpus: int | None) -> int:
    """The GPUs the plan's runs share (--gpus; default: one run's world size), checked against
    the runs' world size (parallel.data) and the GPUs this host has. On a CPU, the study's world
    size is checked against the cores instead."""
    from harness.train.parallel import check_world, host_slots

    world = study.parallel.data
    if device == "cpu":
        check_world(world, "cpu", "parallel.data", study.path)
        return 0
    check_world(world, "cuda", "parallel.data", study.path)  # counts only where GPUs are visible
    if gpus is None:
        return world
    if gpus < world:
        raise ConfigError(
            "--gpus",
            f"each run of study {study.name} trains on {world} GPUs (parallel.data: {world}); give at least {world}",
            "(command line)",
        )
    visible = host_slots("cuda")
    most = visible or world * runs  # no GPU here: at most every run at once
    if gpus > most:
        have = (
            f"this host has {visible} GPU(s)"
            if visible
            else f"its {runs} run(s) of {world} GPU(s) each use at most {most}"
        )
        raise ConfigError(
            "--gpus", f"{gpus} is more than study {study.name} can use: {have}; give at most {most}", "(command line)"
        )
    return gpus


def gpu_flops(args: argparse.Namespace) -> float:
    import torch

    from harness.measure.throughput import peak_flops

    name = torch.cuda.get_device_name() if torch.cuda.is_available() else args.gpu
    peak, why = peak_flops(name)
    if peak is None:
        raise ConfigError("--gpu", why)
    return peak * args.mfu


def run_estimates(runs, states, finished: tuple, device: str, args: argparse.Namespace) -> list:
    """Each run's training estimate; ``finished``: ``finished_rates`` of the study's results."""
    rates, compile_s = finished
    flops = gpu_flops(args) if device == "cuda" else None
    done_steps = [s.step or 0 if s.state == "in progress" else 0 for s in states]
    measured = rates if device == "cpu" or flops is None else {}
    return estimate_runs(runs, device, done_steps, rates=measured, gpu_flops=flops, compile_s=compile_s)


def recorded_train(results: Path, run) -> float | None:
    """A finished run's training wall time: its train job's benchmark, else its record's
    ``train_seconds``."""
    seconds = recorded_seconds(results / "benchmarks" / "train" / f"{run.run_id}.tsv")
    return seconds if seconds is not None else read_record(results, run).get("train_seconds")


def reused_from(results: Path, run, state: str, sources: dict[str, Path]) -> str | None:
    """The run folder another study trained ``run`` in: to be reused, or reused already."""
    if state == "reuse":
        return str(sources[run.run_id])
    came = read_record(results, run).get(REUSED) if state == "done" else None
    return str(came.get("run_dir")) if isinstance(came, dict) else None


def cpu_not_probed(runs, estimates) -> str | None:
    """Why the CPU estimate is missing, for the smallest model (None when every run has one)."""
    missing = [(step_flops(r), e.basis) for r, e in zip(runs, estimates, strict=True) if math.isnan(e.seconds)]
    return min(missing)[1].removeprefix("not probed: ") if missing else None


def check_records(study, runs, results: Path) -> None:
    """Refuse, in one line naming the file and the remedy, a finished run's record.json that is
    damaged or not its run's and study's (harness.study.records): the plan reads them leniently
    afterwards (``read_record``), and would count such a run done, or to run, on its word."""
    from harness.study.records import study_record

    for run in runs:
        if (path := results / "runs" / run.run_id / "record.json").exists():
            study_record(study, path)


def cmd_plan(args: argparse.Namespace) -> int:
    from harness.study.records import read_data_meta
    from harness.workflow.snakefile import run_states

    study = load_study(args.study)
    results = Path(args.results) / study.name
    data_json = results / "data" / "data.json"
    made_by = f"harness data {study.path}"
    meta = read_data_meta(data_json, made_by, study.name) if data_json.exists() else None
    train_tokens = None if meta is None else meta["splits"]["train"]["tokens"]
    runs = plan(study, train_tokens=train_tokens)
    check_records(study, runs, results)
    device, warnings = plan_device(study, runs, args)
    states = run_states(study, runs, results)
    sources = reusable_sources(study, runs, results)
    # A run another study finished the same is brought in, not trained (harness.workflow.reuse).
    states = [replace(s, state="reuse") if s.state == "to run" and s.run_id in sources else s for s in states]
    finished = finished_rates(results, runs)
    estimates = run_estimates(runs, states, finished, device, args)
    why = cpu_not_probed(runs, estimates) if device == "cpu" else None
    if why and study.device == "auto" and args.device is None:
        # The runs would train on this CPU, but no model here could be probed: the GPU's times.
        args.device, args.gpus = "cuda", None
        device, _ = plan_device(study, runs, args)
        gpu = f"the times assume {args.gpus} x {args.gpu} at {args.mfu:.0%} MFU (as `--device cuda`)"
        warnings = [
            f"no GPU is visible and the CPU was not probed ({why}): {gpu}; on this CPU it would take far longer"
        ]
        estimates = run_estimates(runs, states, finished, device, args)
    came = [reused_from(results, r, s.state, sources) for r, s in zip(runs, states, strict=True)]
    # A reused run trained in the other study: no training time of this one.
    recorded = [
        recorded_train(results, r) if s.state == "done" and c is None else None
        for r, s, c in zip(runs, states, came, strict=True)
    ]
    rows = [
        row
        | {"state": s.state, "changes": list(s.changes), "est_seconds": None if rec is not None else e.seconds}
        | {"recorded_seconds": rec, "est_basis": e.basis, "reused_from": c}
        for row, s, e, rec, c in zip(plan_rows(runs, train_tokens), states, estimates, recorded, came, strict=True)
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print_plan(study, runs, rows, states, estimates, device, warnings, args, results, finished[1])
    for line in reuse_lines(study, sources):
        print(line)
    return 0


def run_time(row: dict) -> str:
    if row["reused_from"] is not None:
        return "none (reused)"
    if row["recorded_seconds"] is not None:
        return f"{duration(row['recorded_seconds'])} rec."
    return "-" if row["est_seconds"] is None else f"{duration(row['est_seconds'])} est."


def train_stage(study, runs, rows, estimates, device: str, args: argparse.Namespace) -> tuple[Stage, int]:
    """The training stage: the runs left at the concurrency the plan says (a list schedule of
    their rows), and the runs that train at once."""
    todo = [i for i, r in enumerate(rows) if r["state"] not in ("done", "reuse")]
    world = study.parallel.data
    at_once = max(1, min(concurrent_runs(study.recipe, device, args.gpus, world), len(todo) or 1))
    left = makespan([estimates[i].seconds for i in todo], at_once)
    done = sum(r["recorded_seconds"] or 0.0 for r in rows)
    each = f"{world} GPU(s) per run of {args.gpus}" if device == "cuda" else f"{world} process(es) per run"
    bases = "; ".join(sorted({estimates[i].basis for i in todo})) or "recorded"
    return Stage("train", len(todo), len(runs), left, done, f"{at_once} at once, {each}; {bases}"), at_once


def stage_table(stages: list[Stage]) -> tuple[str, float]:
    """The stages as a table with their total row, and the total still to do."""
    table = [
        [s.name, f"{s.jobs_left} of {s.jobs}", duration(s.todo_seconds) if s.jobs_left else "-",
         duration(s.done_seconds) if s.done_seconds else "-", s.basis]
        for s in stages
    ]  # fmt: skip
    left = sum(s.todo_seconds for s in stages if s.jobs_left)
    done = sum(s.done_seconds for s in stages)
    table.append(["total", "", duration(left), duration(done) if done else "-", "the sum of the rows above"])
    headers = ["stage", "jobs left", "to do (est.)", "done (rec.)", "from"]
    return tabulate(table, headers=headers, disable_numparse=True), left


def print_plan(study, runs, rows, states, estimates, device, warnings, args, results: Path, compiled) -> None:
    from harness.workflow.snakefile import data_changes

    table = [
        [
            r["run_id"],
            r["arm"],
            human(r["total_params"]),
            human(r["active_params"]),
            human(r["flops_per_token"]),
            budget_label(r["budget"]),
            human(r["tokens"]),
            r["steps"],
            "-" if r["epochs"] is None else f"{r['epochs']:.2f}",
            r["state"] if s.step is None else f"{r['state']} (step {s.step})",
            run_time(r),
        ]
        for r, s in zip(rows, states, strict=True)
    ]
    headers = ["run", "arm", "total", "active", "FLOPs/token", "budget", "tokens", "steps", "epochs", "state", "train"]
    convention = study.recipe.flop_convention
    print(f"study {study.name} ({study.path}): {plural(len(runs), 'run')} on {device}, FLOP convention {convention}")
    print(tabulate(table, headers=headers, disable_numparse=True))
    train, _ = train_stage(study, runs, rows, estimates, device, args)
    slots = max(1, args.gpus) if device == "cuda" else 1
    compile_s = compiled or COMPILE_SECONDS[device]
    changed = data_changes(study, results)
    prepared = (results / "data" / "data.json").is_file() and not changed
    corpus = None if prepared else corpus_bytes(study)
    at = Setting(study, results, device, slots, compile_s, corpus, bool(changed))
    stages = pipeline(runs, analysed(study, runs), estimates, train, at)
    text, left = stage_table(stages)
    print("\n" + text)
    todo = [i for i, s in enumerate(states) if s.state not in ("done", "reuse")]
    reused = sum(r["reused_from"] is not None for r in rows)
    trained = len(runs) - len(todo) - reused
    print(
        f"\n{trained} of {plural(len(runs), 'run')} done"
        + (f", {reused} reused from another study (trained there, not here)" if reused else "")
        + f". To do: {plural(len(todo), 'run')}, "
        f"{sum(runs[i].flops for i in todo):.3g} training FLOPs; "
        f"{'time not estimated' if left != left else f'about {duration(left)} in all'} "
        "(the total above: stages one after another; Snakemake may overlap some)."
    )
    need = study_disk(study, runs, results, corpus)
    print(describe(need, results) + (f" ({SHORT})" if need.more > need.free else ""))
    warnings += repetition_warnings(study, runs, corpus if rows and rows[0]["epochs"] is None else None)
    notes(study, rows, states, changed, train.todo_seconds, device, warnings)


EPOCH_MARGIN = 0.9
"""Estimated epochs from which the plan warns, before the data is prepared: the bytes per token
is a guess (``BYTES_PER_TOKEN``, measured on byte-level BPE at 2,048 tokens: 2.8-3.0), and a
larger vocabulary gives fewer tokens."""


def repetition_warnings(study, runs, corpus: int | None) -> list[str]:
    """Before the data is prepared (``corpus``: the bytes the data step will read), the runs that
    may need more than one epoch of the train split, which training refuses unless
    ``data.allow_repetition`` is true."""
    if corpus is None or study.data.allow_repetition or not runs:
        return []
    d = study.data
    tokens = corpus * (1 - d.validation_fraction - d.test_fraction) / BYTES_PER_TOKEN
    worst = max(runs, key=lambda run: run.tokens)
    if worst.tokens < EPOCH_MARGIN * tokens:
        return []
    return [
        f"{worst.run_id} needs {human(worst.tokens)} tokens and the train split will hold about {human(tokens)} "
        f"({megabytes(corpus)} at about {BYTES_PER_TOKEN} bytes per token): about {worst.tokens / tokens:.2f} epochs. "
        f"Training refuses a second epoch unless data.allow_repetition is true ({study.path}); "
        f"`harness data {study.path}` gives the exact count"
    ]


def notes(study, rows, states, changed: list[str], train_left: float, device: str, warnings: list[str]) -> None:
    """What the plan says below its totals: missing data, stale runs, warnings."""
    if rows and rows[0]["epochs"] is None:
        print("epochs: run `harness data` first to know the train split's size")
    if changed:
        print(f"data: the prepared data is not current ({'; '.join(changed)}): `harness data` prepares it again")
    for s in states:
        if s.state == "stale":
            print(f"stale: {s.run_id} would be trained again: {'; '.join(s.changes)}")
    too_long = train_left != train_left or train_left > 86400  # NaN: a model not probed
    if device == "cpu" and study.device == "auto" and too_long:
        shown = "models not probed on this CPU" if train_left != train_left else f"{duration(train_left)} on this CPU"
        warnings.append(
            f"this study looks made for a GPU (device: auto, {shown}) but no GPU is visible: it would train "
            "on this CPU; `--device cuda` shows the GPU estimate"
        )
    elif device == "cpu" and train_left != train_left:
        warnings.append("the training time is not estimated: " + "; ".join(sorted({r["est_basis"] for r in rows})))
    for w in warnings:
        print(f"warning: {w}")
