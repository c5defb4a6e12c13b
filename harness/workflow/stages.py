"""The whole pipeline's time for ``harness plan``: each stage's recorded seconds where it has run
(Snakemake's ``benchmarks/*.tsv``, a run's record), else an estimate from the work it does.

The later stages are counted in eager training steps of the run's model (its estimated
:attr:`~harness.workflow.estimate.RunEstimate.eager_step_seconds`), from their settings: ``measure``'s
windows and steps (``harness.measure.throughput.MeasureSettings``), the tokens ``evaluate`` and ``routing``
read; a start-up of each job stands beside it. What they read is bounded by what the study's data
holds (:class:`Heldout`): the held-out split that ``harness tasks`` and ``harness routing`` read
(``tasks.json``'s counts once the tasks are built, the split in ``data.json`` once the data is
prepared, the split's share of the corpus before), never more than the settings allow.

The fixed parts were read off the tiny study's jobs on 2 CPU cores (their benchmark files): data
11.4-20.8 s for 12 MB, measure 38.6 s and 77.1 s (with 19 s and 45 s of compilation), evaluate 26.7 s
and 40.5 s, routing 2.2 s and 6.5 s; the start-up of the short jobs off their CPU time
(:data:`JOB_START_S`); the micro-benchmark and the report as their constants say. A stage's time
against its estimate is checked end to end in tests/workflow/test_plan_clock.py.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

from harness.measure.throughput import MeasureSettings
from harness.study.spec import Run, Study
from harness.workflow.estimate import RunEstimate, makespan

DATA_BYTES_PER_S = 1.3e6
"""Corpus bytes read, tokenizer trained and shards written per second: tiny's 12 MB took 7.4 s
(a CI run's clock check, alone on two cores), 11.4 s (a pipeline run on the reference host) and
20.8 s (the tiny reference), start-up included; at this rate the estimate, 12.2 s, is within 2x
of each."""
JOB_START_S = {"data": 3.0, "tasks": 4.5, "measure": 10.0, "evaluate": 20.0, "routing": 3.0}
"""A job's start-up: imports, loading the checkpoint (lm-eval's own imports for evaluate; two
processes for measure on a CPU). ``harness tasks`` and ``harness routing`` of a dense run (which
routes nothing) are little more than it: 2.6-3.1 s and 3.3 s of CPU time; ``harness tasks`` took
3.0 s on a quiet host and 6.9 s beside the training jobs it runs with."""
MICROBENCH_S = 28.0
"""The micro-benchmark, the same work whatever the study (tests/benchmarks/test_moe_ffn.py): 17 s
on a quiet 2-core host, 45 s in the tiny reference's pipeline."""
REPORT_S = 6.0
"""The report of a study with no law to fit: tiny's took 5.1-7.4 s, two runs of a small study 5.3 s."""
LAW_FIT_S = 70.0
"""What fitting the joint law (with its bootstrap refits) adds to the report, where the study's
dense runs span two budgets or more, or it pools another study's: ``harness report`` of the cpu
reference (29 runs) took 77 s, of cpu-frontier (22 runs and cpu's 29) 80 s, of tiny 5.4 s."""
MEASURE_COMPILE_S = 10.0
"""Compilation in a measure job, at most: the graphs its run's training compiled are in
inductor's cache by then. The tiny study's two measure jobs took 54 s together, of which steps,
decoding and start-ups are about 50 s (the tiny reference's, before that cache, compiled for 19 s
and 45 s); a training run's own compile time, where less, stands for it."""
DECODE_TOKEN_S = 0.0075
"""One decoded token of a small model, latency-bound (tiny: 134 tokens/s at batch 1)."""
BYTES_PER_TOKEN = 2.8
"""Held-out bytes per token before the data is prepared (tiny's byte-level BPE: 2.8-3.0)."""
MC_LINE_BYTES = 36.0
"""Bytes of a line of code with its newline, for the multiple-choice task's context lines: the
Python standard library's .py files average 36 (3.11: 31.5 MB in 0.87M lines)."""
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
    each: tuple[tuple[str, float], ...] = ()
    """Each job left and its estimated seconds (a per-run stage's jobs by run id)."""


@dataclass(frozen=True)
class Setting:
    """Where and how a study's stages run."""

    study: Study
    results: Path
    device: str
    slots: int
    """Per-run jobs at once (the GPUs; one on a CPU, where each takes every core)."""
    compile_s: float
    """A training run's compilation (the median of the finished runs', else the default), which
    bounds a compiled study's measure jobs' (:data:`MEASURE_COMPILE_S`)."""
    corpus: int | None
    """Corpus bytes the data step reads (None: prepared already, or not known)."""
    data_again: bool = False
    """The prepared data is not current: the data step (and what follows it) runs again."""
    heldout: Heldout | None = None
    """What the held-out split holds (None: not known, the settings' maxima are counted)."""


@dataclass(frozen=True)
class Heldout:
    """The held-out text the later stages read: the split ``harness tasks`` and ``harness routing``
    take (test, else validation), as far as it is known before they run."""

    bytes: float
    """Bytes of the split."""
    tokens: float
    documents: float | None
    """Documents of the split (None: not known before the data is prepared)."""
    validation_tokens: float
    """Tokens of the validation split, which bound a training run's validation passes."""
    source: str
    """Where the figures come from: 'tasks.json', 'data.json' or 'about N of a M corpus'."""
    ppl_bytes: float | None = None
    """heldout_ppl's bytes as ``harness tasks`` kept them (tasks.json; None: not built yet)."""
    questions: float | None = None
    """heldout_code_mc's questions as built (tasks.json; None: not built yet)."""


def heldout_before_data(study: Study, corpus: int) -> Heldout:
    """The held-out split's expected share of a corpus of ``corpus`` bytes, before the data step:
    documents are split by a hash of their key, so each split takes about its fraction."""
    d = study.data
    share = d.test_fraction or d.validation_fraction
    return Heldout(
        corpus * share,
        corpus * share / BYTES_PER_TOKEN,
        None,
        corpus * d.validation_fraction / BYTES_PER_TOKEN,
        f"about {share:.0%} of a {megabytes(corpus)} corpus",
    )


def heldout_of_data(study: Study, meta: dict, tasks: dict | None) -> Heldout:
    """The held-out split of prepared data (``meta``: its data.json), with the counts of the tasks
    built from it (``tasks``: tasks.json, where it is current for this study)."""
    splits = meta["splits"]
    split = splits["test"] if splits["test"]["documents"] else splits["validation"]
    val = splits["validation"]["tokens"]
    if tasks is None:
        return Heldout(split["bytes"], split["tokens"], split["documents"], val, "data.json")
    t = tasks["tasks"]
    ppl, mc = t["heldout_ppl"]["bytes"], t["heldout_code_mc"]["questions"]
    return Heldout(split["bytes"], split["tokens"], split["documents"], val, "tasks.json", ppl, mc)


def current_tasks(study: Study, meta: dict, path: Path) -> dict | None:
    """tasks.json at ``path`` where it was built from this data with the study's task settings
    (those the workflow's tasks rule depends on), else None: the tasks are built again."""
    from harness.core.io import read_json_object

    tasks = read_json_object(path)
    if not tasks:
        return None
    e, cfg = study.eval, tasks.get("config") or {}
    same = tasks.get("data_fingerprint") == meta.get("fingerprint") and tasks.get("seq_len") == study.recipe.seq_len
    same &= all(cfg.get(k) == getattr(e, k) for k in ("heldout_max_bytes", "mc_questions", "mc_choices"))
    same &= cfg.get("mc_context_lines") == e.mc_context_lines
    try:
        int(tasks["tasks"]["heldout_ppl"]["bytes"]), int(tasks["tasks"]["heldout_code_mc"]["questions"])
    except (KeyError, TypeError, ValueError):
        return None
    return tasks if same else None


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


def ppl_bytes(study: Study, heldout: Heldout | None) -> float:
    """Bytes heldout_ppl reads: the held-out documents up to ``heldout_max_bytes`` (the split's
    bytes where it holds fewer), and at most ``eval.limit`` documents of the split's mean size."""
    e = study.eval
    if heldout is None:
        return e.heldout_max_bytes
    kept = heldout.ppl_bytes if heldout.ppl_bytes is not None else min(e.heldout_max_bytes, heldout.bytes)
    if e.limit is not None and heldout.documents:
        kept = min(kept, e.limit * heldout.bytes / heldout.documents)
    return kept


def mc_questions(study: Study, heldout: Heldout | None) -> float:
    """heldout_code_mc's questions: as built (tasks.json), else ``mc_questions``; at most ``eval.limit``."""
    e = study.eval
    questions = heldout.questions if heldout is not None and heldout.questions is not None else e.mc_questions
    return min(questions, e.limit) if e.limit is not None else questions


def bytes_per_token(heldout: Heldout | None) -> float:
    return heldout.bytes / heldout.tokens if heldout is not None and heldout.tokens else BYTES_PER_TOKEN


def eval_tokens(study: Study, heldout: Heldout | None) -> float:
    """Tokens the local tasks read, one forward pass each: the held-out text (:func:`ppl_bytes`),
    and each multiple-choice question once per choice, its context lines and answer up to the
    context length."""
    e, tokens, bpt = study.eval, 0.0, bytes_per_token(heldout)
    if "heldout_ppl" in e.tasks:
        tokens += ppl_bytes(study, heldout) / bpt
    if "heldout_code_mc" in e.tasks:
        choice = min(study.recipe.seq_len, (e.mc_context_lines + 1) * MC_LINE_BYTES / bpt)
        tokens += mc_questions(study, heldout) * e.mc_choices * choice
    return tokens


def routing_tokens(run: Run, heldout: Heldout | None) -> float:
    """Held-out tokens ``harness routing`` runs through an MoE model: at most its ``--max-tokens``
    (the workflow's default), at most what the split holds; none for a dense model."""
    from harness.analysis.specialisation import DEFAULT_MAX_TOKENS

    if run.model.moe is None:
        return 0.0
    return min(DEFAULT_MAX_TOKENS, heldout.tokens) if heldout is not None else DEFAULT_MAX_TOKENS


def job_seconds(stage: str, run: Run, est: RunEstimate, at: Setting) -> float:
    """One job of a per-run stage, estimated."""
    step = est.eager_step_seconds
    start = JOB_START_S[stage]
    if stage == "measure":
        steps, tokens = measure_steps(run, MeasureSettings(batch_size=run.recipe.batch_size), at.device)
        compiling = min(at.compile_s, MEASURE_COMPILE_S) if run.recipe.compile else 0.0
        return start + compiling + steps * step + tokens * DECODE_TOKEN_S
    tokens = routing_tokens(run, at.heldout) if stage == "routing" else eval_tokens(at.study, at.heldout)
    return start + tokens / (3 * run.tokens_per_step) * step


def megabytes(n: float) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.0f} KB"


def _basis(stage: str, study: Study, heldout: Heldout | None, runs: list[Run]) -> str:
    e = study.eval
    source = f" ({heldout.source})" if heldout is not None else " (the settings' maxima: data not known)"
    if stage == "measure":
        s = MeasureSettings()
        return f"estimate: {s.windows} windows x {s.steps_per_window} steps, prefill, decode"
    if stage == "evaluate":
        hub = [t for t in e.tasks if t not in ("heldout_ppl", "heldout_code_mc")]
        parts = [f"{megabytes(ppl_bytes(study, heldout))} held out"] if "heldout_ppl" in e.tasks else []
        parts += (
            [f"{mc_questions(study, heldout):.0f} x {e.mc_choices} choices"] if "heldout_code_mc" in e.tasks else []
        )
        parts += [f"{len(hub)} hub task(s) not counted"] if hub else []
        return "estimate: " + ", ".join(parts) + source
    moe = [run for run in runs if run.model.moe is not None]
    if not moe:
        return "estimate: dense runs, no routing to analyse"
    return f"estimate: {routing_tokens(moe[0], heldout) / 1e3:.0f}K held-out tokens an MoE run{source}"


def run_stage(stage: str, runs: list[Run], estimates: dict[str, RunEstimate], at: Setting) -> Stage:
    """measure, evaluate or routing over the analysed ``runs``: recorded where the job's output
    exists, else estimated."""
    out = {"measure": "measure.json", "evaluate": "eval.json", "routing": "routing.json"}[stage]
    done, todo = 0.0, {}
    for run in runs:
        run_dir = at.results / "runs" / run.run_id
        if (run_dir / out).is_file():
            done += recorded_seconds(at.results / "benchmarks" / stage / f"{run.run_id}.tsv") or 0.0
        else:
            todo[run.run_id] = job_seconds(stage, run, estimates[run.run_id], at)
    left = makespan(list(todo.values()), at.slots)
    basis = _basis(stage, at.study, at.heldout, runs)
    return Stage(stage, len(todo), len(runs), left, done, basis, tuple(todo.items()))


def corpus_bytes(study: Study) -> int | None:
    """What the data step reads: the corpus files' sizes, capped at data.max_bytes (None for a
    remote dataset without max_bytes)."""
    from harness.data.prepare import corpus_files

    files = corpus_files(study.data, study.path)
    if files is None:
        return study.data.max_bytes
    size = sum(p.stat().st_size for p in files if p.is_file())
    return min(size, study.data.max_bytes) if study.data.max_bytes else size


def report_seconds(study: Study, runs: list[Run]) -> float:
    """The report: :data:`REPORT_S`, and :data:`LAW_FIT_S` where it fits the joint law."""
    budgets = {run.budget for run in runs if run.model.moe is None}
    return REPORT_S + (LAW_FIT_S if len(budgets) > 1 or study.pool else 0.0)


def single_stage(stage: str, at: Setting, output: Path, runs: list[Run], again: bool = False) -> Stage:
    """data, tasks, microbench or report: one job (``again``: it reruns though its output exists)."""
    if output.is_file() and not again:
        return Stage(stage, 0, 1, 0.0, recorded_seconds(at.results / "benchmarks" / f"{stage}.tsv") or 0.0, "done")
    corpus = at.corpus
    if stage == "data":
        if corpus is None:
            return Stage(stage, 1, 1, math.nan, 0.0, "not estimated: a remote dataset's size is known once read")
        seconds = JOB_START_S["data"] + corpus / DATA_BYTES_PER_S
        basis = f"estimate: {megabytes(corpus)} at {DATA_BYTES_PER_S / 1e6:.2f} MB/s"
    elif stage == "tasks":
        seconds, basis = JOB_START_S["tasks"], "estimate: its start-up"
    elif stage == "microbench":
        seconds, basis = MICROBENCH_S, "estimate: the same work for every study"
    else:
        seconds = report_seconds(at.study, runs)
        basis = "estimate: with the joint law's fits" if seconds > REPORT_S else "estimate: no law to fit"
    return Stage(stage, 1, 1, seconds, 0.0, basis, ((stage, seconds),))


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
            stages.append(single_stage(stage, at, outputs[stage], runs, again))
        else:
            stages.append(run_stage(stage, analysed, by_id, at))
    return stages
