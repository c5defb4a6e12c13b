"""``harness plan STUDY``: the run matrix, what is done, how long the rest takes and the disk it
needs, answered in seconds and without training anything that may not fit.

Each run's training time is recorded (``train`` job's benchmark, else its record) once done, and
estimated before (``harness.workflow.estimate``; on a CPU a bounded probe, ``harness.workflow.probe``). When no
model of a study could be probed on this CPU and the study may use a GPU (``device: auto``),
the times are those of the GPU, with a warning saying why the CPU was not probed. The plan lists
the probes it used, each with its age and the load it was taken under; ``--reprobe`` takes them
again, ``--probes FILE`` reads another host's (``harness.workflow.probe``). The stages after
training are estimated from their settings, bounded by what the study's data holds
(``harness.workflow.stages``); the total is the sum of the stage rows shown. The disk is
``harness.workflow.disk``'s.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, replace
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
from harness.workflow.probe import Prober
from harness.workflow.reuse import REUSED, reusable_sources, reuse_lines
from harness.workflow.stages import (
    BYTES_PER_TOKEN,
    Heldout,
    Setting,
    Stage,
    corpus_bytes,
    current_tasks,
    heldout_before_data,
    heldout_of_data,
    megabytes,
    pipeline,
    recorded_seconds,
)
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


@dataclass(frozen=True)
class DataState:
    """What the plan knows of the study's data: the corpus the data step will read (None: prepared
    and current, or a remote dataset), how the prepared data differs from the study's, and the
    held-out split the later stages read (None: not known)."""

    corpus: int | None
    changed: list[str]
    heldout: Heldout | None


def data_state(study, results: Path, meta: dict | None) -> DataState:
    """The study's data as the plan counts it: prepared and current (data.json, and tasks.json where
    it was built from it), else the corpus the data step will read."""
    from harness.workflow.snakefile import data_changes

    changed = data_changes(study, results)
    if meta is not None and not changed:
        tasks = current_tasks(study, meta, results / "data" / "tasks" / "tasks.json")
        return DataState(None, changed, heldout_of_data(study, meta, tasks))
    corpus = corpus_bytes(study)
    return DataState(corpus, changed, None if corpus is None else heldout_before_data(study, corpus))


def run_estimates(runs, states, finished: tuple, device: str, args: argparse.Namespace, **how) -> list:
    """Each run's training estimate; ``finished``: ``finished_rates`` of the study's results;
    ``how``: ``prober`` and ``validation_tokens`` (:func:`harness.workflow.estimate.estimate_run`)."""
    rates, compile_s = finished
    flops = gpu_flops(args) if device == "cuda" else None
    done_steps = [s.step or 0 if s.state == "in progress" else 0 for s in states]
    measured = rates if device == "cpu" or flops is None else {}
    return estimate_runs(runs, device, done_steps, rates=measured, gpu_flops=flops, compile_s=compile_s, **how)


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


@dataclass
class Plan:
    """What ``harness plan`` worked out, before it prints it."""

    study: object
    runs: list
    rows: list[dict]
    states: list
    estimates: list
    device: str
    warnings: list[str]
    results: Path
    compiled: float | None
    """The median compile seconds of the study's finished runs (None: none recorded)."""
    data: DataState
    prober: Prober | None
    """The CPU probes the estimates used (None: the estimates are the GPU's)."""
    sources: dict[str, Path]
    """Runs another study finished the same (harness.workflow.reuse)."""


def make_plan(args: argparse.Namespace) -> Plan:
    """The plan of ``args.study``: runs, states, estimates and what the data holds."""
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
    data = data_state(study, results, meta)
    validation = None if data.heldout is None else data.heldout.validation_tokens
    prober = Prober.start(getattr(args, "reprobe", False), getattr(args, "probes", None)) if device == "cpu" else None
    estimates = run_estimates(runs, states, finished, device, args, prober=prober, validation_tokens=validation)
    why = cpu_not_probed(runs, estimates) if device == "cpu" else None
    if why and study.device == "auto" and args.device is None:
        # The runs would train on this CPU, but no model here could be probed: the GPU's times.
        args.device, args.gpus = "cuda", None
        device, _ = plan_device(study, runs, args)
        gpu = f"the times assume {args.gpus} x {args.gpu} at {args.mfu:.0%} MFU (as `--device cuda`)"
        warnings = [
            *prober.warnings,  # a damaged cache, still
            f"no GPU is visible and the CPU was not probed ({why}): {gpu}; on this CPU it would take far longer",
        ]
        prober = None
        estimates = run_estimates(runs, states, finished, device, args, validation_tokens=validation)
    came = [reused_from(results, r, s.state, sources) for r, s in zip(runs, states, strict=True)]
    # A reused run trained in the other study: no training time of this one.
    recorded = [
        recorded_train(results, r) if s.state == "done" and c is None else None
        for r, s, c in zip(runs, states, came, strict=True)
    ]
    probes = {} if prober is None else prober.used
    rows = [
        row
        | {"state": s.state, "changes": list(s.changes), "est_seconds": None if rec is not None else e.seconds}
        | {"recorded_seconds": rec, "est_basis": e.basis, "reused_from": c}
        | {"probe": probes[r.model.name].probe.to_json() if r.model.name in probes else None}
        for row, r, s, e, rec, c in zip(
            plan_rows(runs, train_tokens), runs, states, estimates, recorded, came, strict=True
        )
    ]
    if prober is not None:
        warnings = prober.warnings_now + warnings
    return Plan(study, runs, rows, states, estimates, device, warnings, results, finished[1], data, prober, sources)


def cmd_plan(args: argparse.Namespace) -> int:
    p = make_plan(args)
    if args.json:
        print(json.dumps(p.rows, indent=2))
        for w in p.warnings:
            print(f"warning: {w}", file=sys.stderr)
        return 0
    print_plan(p, args)
    for line in reuse_lines(p.study, p.sources):
        print(line)
    return 0


def run_time(row: dict) -> str:
    if row["reused_from"] is not None:
        return "none (reused)"
    if row["recorded_seconds"] is not None:
        return f"{duration(row['recorded_seconds'])} rec."
    return "-" if row["est_seconds"] is None else f"{duration(row['est_seconds'])} est."


def train_stage(p: Plan, args: argparse.Namespace) -> tuple[Stage, int]:
    """The training stage: the runs left at the concurrency the plan says (a list schedule of
    their rows), and the runs that train at once (on a CPU, over the cores the probes stand for)."""
    todo = [i for i, r in enumerate(p.rows) if r["state"] not in ("done", "reuse")]
    world = p.study.parallel.data
    cores = p.prober.cores if p.prober is not None else None
    at_once = concurrent_runs(p.study.recipe, p.device, args.gpus, world, cores)
    at_once = max(1, min(at_once, len(todo) or 1))
    left = makespan([p.estimates[i].seconds for i in todo], at_once)
    done = sum(r["recorded_seconds"] or 0.0 for r in p.rows)
    each = f"{world} GPU(s) per run of {args.gpus}" if p.device == "cuda" else f"{world} process(es) per run"
    bases = "; ".join(sorted({p.estimates[i].basis for i in todo})) or "recorded"
    jobs = tuple((p.runs[i].run_id, p.estimates[i].seconds) for i in todo)
    stage = Stage("train", len(todo), len(p.runs), left, done, f"{at_once} at once, {each}; {bases}", jobs)
    return stage, at_once


def plan_stages(p: Plan, args: argparse.Namespace) -> list[Stage]:
    """Every stage of the plan, in pipeline order (``harness.workflow.stages.pipeline``)."""
    train, _ = train_stage(p, args)
    slots = max(1, args.gpus) if p.device == "cuda" else 1
    compile_s = p.compiled or COMPILE_SECONDS[p.device]
    d = p.data
    at = Setting(p.study, p.results, p.device, slots, compile_s, d.corpus, bool(d.changed), d.heldout)
    return pipeline(p.runs, analysed(p.study, p.runs), p.estimates, train, at)


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


def print_plan(p: Plan, args: argparse.Namespace) -> None:
    study, runs, rows = p.study, p.runs, p.rows
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
        for r, s in zip(rows, p.states, strict=True)
    ]
    headers = ["run", "arm", "total", "active", "FLOPs/token", "budget", "tokens", "steps", "epochs", "state", "train"]
    convention = study.recipe.flop_convention
    print(f"study {study.name} ({study.path}): {plural(len(runs), 'run')} on {p.device}, FLOP convention {convention}")
    print(tabulate(table, headers=headers, disable_numparse=True))
    stages = plan_stages(p, args)
    text, left = stage_table(stages)
    print("\n" + text)
    if p.prober is not None and (lines := p.prober.lines()):
        print("\n" + "\n".join(lines))
    todo = [i for i, s in enumerate(p.states) if s.state not in ("done", "reuse")]
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
    corpus = p.data.corpus
    need = study_disk(study, runs, p.results, corpus)
    print(describe(need, p.results) + (f" ({SHORT})" if need.more > need.free else ""))
    warnings = p.warnings + repetition_warnings(study, runs, corpus if rows and rows[0]["epochs"] is None else None)
    train = next(s for s in stages if s.name == "train")
    notes(study, rows, p.states, p.data.changed, train.todo_seconds, p.device, warnings)


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
