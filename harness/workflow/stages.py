"""The whole pipeline's time for ``harness plan``: each stage's recorded seconds where it has run
(Snakemake's ``benchmarks/*.tsv``, a run's record), else an estimate from the work it does.

The later stages are counted in eager training steps of the run's model (its estimated
:attr:`~harness.workflow.estimate.RunEstimate.eager_step_seconds`), from their settings: ``measure``'s
windows and steps (``harness.measure.throughput.MeasureSettings``), the tokens ``evaluate`` and ``routing``
read; a start-up of each job stands beside it. The fixed parts were read off the tiny study's
jobs on 2 CPU cores (their benchmark files): data 20.8 s for 12 MB, tasks 0.6 s, measure
38.6 s and 77.1 s (with 19 s and 45 s of compilation), evaluate 26.7 s and 40.5 s, routing
2.2 s and 6.5 s, the micro-benchmark 44.9 s, the report 12.1 s.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

from harness.measure.throughput import MeasureSettings
from harness.study.spec import Run, Study
from harness.workflow.estimate import RunEstimate, makespan

DATA_BYTES_PER_S = 0.67e6
"""Corpus bytes read, tokenizer trained and shards written per second (tiny: 12 MB, 17.8 s
beyond its start-up)."""
JOB_START_S = {"data": 3.0, "tasks": 1.0, "measure": 10.0, "evaluate": 20.0, "routing": 2.0}
"""A job's start-up: imports, loading the checkpoint (lm-eval's own imports for evaluate; two
processes for measure on a CPU)."""
FIXED_S = {"microbench": 45.0, "report": 12.0}
"""Jobs whose work does not follow the study's models."""
DECODE_TOKEN_S = 0.0075
"""One decoded token of a small model, latency-bound (tiny: 134 tokens/s at batch 1)."""
BYTES_PER_TOKEN = 2.8
"""Held-out bytes per token before the data is prepared (tiny's byte-level BPE: 2.8-3.0)."""
STAGES = ("data", "tasks", "train", "measure", "evaluate", "routing", "microbench", "report")


@dataclass(frozen=True)
class Stage:
    name: str
    jobs_left: int
    jobs: int
    todo_seconds: float
    """Wall time of the jobs left (NaN: not estimated)."""
    done_seconds: float
    """Recorded wall time of the jobs that ran (0 when none recorded)."""
    basis: str


@dataclass(frozen=True)
class Setting:
    """Where and how a study's stages run."""

    study: Study
    results: Path
    device: str
    slots: int
    """Per-run jobs at once (the GPUs; one on a CPU, where each takes every core)."""
    compile_s: float
    """A compilation, for a compiled study's measure jobs."""
    corpus: int | None
    """Corpus bytes the data step reads (None: prepared already, or not known)."""
    data_again: bool = False
    """The prepared data is not current: the data step (and what follows it) runs again."""


def recorded_seconds(tsv: Path) -> float | None:
    """The wall seconds a Snakemake benchmark file recorded (its first row's ``s``)."""
    try:
        with tsv.open() as f:
            row = next(csv.DictReader(f, delimiter="\t"))
        return float(row["s"])
    except (OSError, StopIteration, KeyError, ValueError, TypeError):
        return None


def measure_steps(run: Run, settings: MeasureSettings, device: str) -> tuple[float, float]:
    """(eager training-step equivalents, decoded tokens) of ``harness measure`` on ``run``."""
    s, reps = settings, settings.warmup_steps + settings.windows
    train = s.warmup_steps + s.windows * s.steps_per_window
    train *= 2 if run.model.moe is not None else 1  # learned, then forced-balanced routing
    fresh = reps if device == "cpu" else 0  # the peak, measured in a fresh process
    forwards = reps / 3 + 2 * reps / 3  # prefill, and the two decodes' prompts
    return train + fresh + forwards, 2 * reps * s.decode_tokens


def eval_tokens(study: Study, bytes_per_token: float) -> float:
    """Tokens the local tasks read, one forward pass each: the held-out text, and each
    multiple-choice question once per choice at up to the context length."""
    e, tokens = study.eval, 0.0
    if "heldout_ppl" in e.tasks:
        tokens += e.heldout_max_bytes / bytes_per_token
    if "heldout_code_mc" in e.tasks:
        tokens += e.mc_questions * e.mc_choices * study.recipe.seq_len
    return tokens


def job_seconds(stage: str, run: Run, est: RunEstimate, study: Study, device: str, compile_s: float) -> float:
    """One job of a per-run stage, estimated."""
    step = est.eager_step_seconds
    start = JOB_START_S[stage]
    if stage == "measure":
        steps, tokens = measure_steps(run, MeasureSettings(batch_size=run.recipe.batch_size), device)
        return start + (compile_s if run.recipe.compile else 0.0) + steps * step + tokens * DECODE_TOKEN_S
    tokens = eval_tokens(study, BYTES_PER_TOKEN)
    if stage == "routing":
        tokens = study.eval.heldout_max_bytes / BYTES_PER_TOKEN
    return start + tokens / (3 * run.tokens_per_step) * step


def megabytes(n: float) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.0f} KB"


def _basis(stage: str, study: Study) -> str:
    e = study.eval
    if stage == "measure":
        s = MeasureSettings()
        return f"estimate: {s.windows} windows x {s.steps_per_window} steps, prefill, decode"
    if stage == "evaluate":
        hub = [t for t in e.tasks if t not in ("heldout_ppl", "heldout_code_mc")]
        parts = [f"{megabytes(e.heldout_max_bytes)} held out"] if "heldout_ppl" in e.tasks else []
        parts += [f"{e.mc_questions} x {e.mc_choices} choices"] if "heldout_code_mc" in e.tasks else []
        parts += [f"{len(hub)} hub task(s) not counted"] if hub else []
        return "estimate: " + ", ".join(parts)
    return f"estimate: {megabytes(e.heldout_max_bytes)} held out"


def run_stage(stage: str, runs: list[Run], estimates: dict[str, RunEstimate], at: Setting) -> Stage:
    """measure, evaluate or routing over the analysed ``runs``: recorded where the job's output
    exists, else estimated."""
    out = {"measure": "measure.json", "evaluate": "eval.json", "routing": "routing.json"}[stage]
    done, todo = 0.0, []
    for run in runs:
        run_dir = at.results / "runs" / run.run_id
        if (run_dir / out).is_file():
            done += recorded_seconds(at.results / "benchmarks" / stage / f"{run.run_id}.tsv") or 0.0
        else:
            todo.append(job_seconds(stage, run, estimates[run.run_id], at.study, at.device, at.compile_s))
    return Stage(stage, len(todo), len(runs), makespan(todo, at.slots), done, _basis(stage, at.study))


def corpus_bytes(study: Study) -> int | None:
    """What the data step reads: the corpus files' sizes, capped at data.max_bytes (None for a
    remote dataset without max_bytes)."""
    from harness.data.prepare import corpus_files

    files = corpus_files(study.data, study.path)
    if files is None:
        return study.data.max_bytes
    size = sum(p.stat().st_size for p in files if p.is_file())
    return min(size, study.data.max_bytes) if study.data.max_bytes else size


def single_stage(stage: str, results: Path, output: Path, corpus: int | None, again: bool = False) -> Stage:
    """data, tasks, microbench or report: one job (``again``: it reruns though its output exists)."""
    if output.is_file() and not again:
        return Stage(stage, 0, 1, 0.0, recorded_seconds(results / "benchmarks" / f"{stage}.tsv") or 0.0, "done")
    if stage == "data":
        if corpus is None:
            return Stage(stage, 1, 1, math.nan, 0.0, "not estimated: a remote dataset's size is known once read")
        seconds = JOB_START_S["data"] + corpus / DATA_BYTES_PER_S
        return Stage(stage, 1, 1, seconds, 0.0, f"estimate: {megabytes(corpus)} at {DATA_BYTES_PER_S / 1e6:.2f} MB/s")
    seconds = JOB_START_S.get(stage) or FIXED_S[stage]
    return Stage(stage, 1, 1, seconds, 0.0, "estimate: the tiny study's job")


def pipeline(
    runs: list[Run], analysed: list[Run], estimates: list[RunEstimate], train: Stage, at: Setting
) -> list[Stage]:
    """Every stage of the study, in pipeline order."""
    by_id = {run.run_id: e for run, e in zip(runs, estimates, strict=True)}
    data = at.results / "data"
    outputs = {"data": data / "data.json", "tasks": data / "tasks" / "tasks.json"}
    outputs |= {"microbench": at.results / "microbench" / "moe_ffn.json", "report": at.results / "report.md"}
    stages = []
    for stage in STAGES:
        if stage == "train":
            stages.append(train)
        elif stage in outputs:
            # the data step reruns on changed data, the tasks after it, the report after everything
            again = {"data": at.data_again, "tasks": bool(stages and stages[0].jobs_left)}.get(stage, False)
            again |= stage == "report" and any(s.jobs_left for s in stages)
            stages.append(single_stage(stage, at.results, outputs[stage], at.corpus, again))
        else:
            stages.append(run_stage(stage, analysed, by_id, at))
    return stages
