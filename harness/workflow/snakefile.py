"""Helpers the Snakefile imports: which study to run, and which finished runs a change would
train again.

A run's identity (``harness.study.runs.run_identity``) lives in ``runs/<run>/identity.json``, an
input of its training that :func:`sync_identities` writes only when the identity changes:
Snakemake then retrains the run, and only then (or when its data is prepared again). It needs no
Snakemake metadata, so a study copied to another machine with its timestamps is not retrained.
Before anything finished is deleted, the runs and what changed are named and the workflow stops,
unless told to retrain them.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from harness.core.errors import HarnessError, os_failure
from harness.data.current import other_data
from harness.study.runs import essential_fields, identity_changes, recorded_identity, run_identity
from harness.study.spec import BOOKKEEPING, DataConfig, Run, Study
from harness.workflow.disk import DiskRefused
from models.config import ConfigError


def choose_study(requested: str | None, given: bool | None = None) -> tuple[str, str]:
    """The study named with --config study=NAME, else `full` where CUDA is visible, else `tiny`.
    ``given``: whether --config named the key at all (``study=`` with nothing after it, as from an
    unset shell variable, is refused rather than taken for no choice)."""
    if given is None:
        given = requested is not None
    if given and (requested is None or not str(requested).strip()):
        raise ConfigError(
            "study",
            "is empty (an unset shell variable?); name a study of workflows/studies/ or a study file, "
            "or leave --config study out for the default",
            "--config",
        )
    if requested:
        return str(requested), "chosen with --config study=..."
    import torch

    if torch.cuda.is_available():
        return "full", f"CUDA is visible ({torch.cuda.get_device_name()}); pick another with --config study=NAME"
    return "tiny", "no CUDA device visible, so the CPU-sized study; pick another with --config study=NAME"


def essential_json(settings: Any, leave_out: tuple[str, ...] = ()) -> str:
    """A rule parameter from a settings dataclass: canonical JSON, fields at their default left
    out, so that a field added to the code later reruns nothing."""
    return json.dumps(essential_fields(settings, leave_out), sort_keys=True)


def data_params(study: Study) -> str:
    """The data rule's settings parameter: every data setting but those that say where files lie
    (``harness.data.prepare.WHERE``) and those only training reads (``TRAINING_SIDE``); what the files
    hold reaches the rule as data/corpus.json (``harness.data.corpus``), so a corpus moved or copied
    with the same content reruns nothing."""
    from harness.data.prepare import NOT_TOKENS

    return essential_json(study.data, NOT_TOKENS)


@dataclass(frozen=True)
class RunState:
    run_id: str
    state: str
    """done, in progress, to run, or stale (finished or in progress, but the study now asks for
    something else)."""
    changes: tuple[str, ...] = ()
    """For a stale run: what changed, ``field old -> new``."""
    step: int | None = None
    """For a run in progress: its last logged step."""


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _data_meta(study: Study, results: Path) -> dict[str, Any] | None:
    """The prepared data's data.json (None where there is none), refused in one line when it is
    damaged or another study's: a dry run and a real run alike stop there."""
    from harness.study.records import read_data_meta

    path = results / "data" / "data.json"
    if not (path.exists() or path.is_symlink()):
        return None
    return read_data_meta(path, f"harness data {study.path}", study.name)


def data_changes(study: Study, results: Path, corpus: dict[str, Any] | None = None) -> list[str]:
    """How the study's data section and its corpus differ from those the prepared data was made
    with (empty when they do not, or when no data is prepared yet). Where the corpus lies is no
    change while its content is the same (``harness.data.corpus``)."""
    from harness.data.corpus import corpus_changes
    from harness.data.prepare import NOT_TOKENS
    from models.config import from_dict

    meta = _data_meta(study, results)
    if not meta or "config" not in meta:
        return []
    try:
        prepared = essential_fields(from_dict(DataConfig, meta["config"]), NOT_TOKENS)
    except Exception:  # a data.json from another version: the data rule decides
        return []
    settings = [f"data.{c}" for c in identity_changes(prepared, essential_fields(study.data, NOT_TOKENS))]
    return settings + corpus_changes(study, results, corpus)


def _data_now(study: Study, results: Path, corpus: dict[str, Any] | None) -> tuple[str | None, list[str]]:
    """The fingerprint of the prepared data (None when there is none) and how the study's data
    now differs from it: a finished run is current only on that data, unchanged."""
    meta = _data_meta(study, results)
    fingerprint = meta.get("fingerprint") if meta else None
    return fingerprint, (data_changes(study, results, corpus) if fingerprint else [])


def _last_step(metrics: Path) -> int | None:
    try:
        lines = metrics.read_text().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue
    return None


def _record(path: Path, results: Path, study_path: str) -> dict[str, Any]:
    """A finished run's record.json, refused in one line when it is damaged or misplaced (a
    workflow that went on would report it, or train over it)."""
    from harness.core.remedy import run_file
    from harness.study.records import read_record

    return read_record(path, results.name, run_file(path, study_path))


def run_state(
    run: Run, results: Path, data: tuple[str | None, list[str]] = (None, []), study_path: str = "STUDY"
) -> RunState:
    """``data``: the prepared data's fingerprint and how the study's data differs from it
    (:func:`_data_now`); a run trained on other data, or on data about to be prepared again,
    is stale."""
    prepared, data_changed = data
    run_dir = results / "runs" / run.run_id
    record = run_dir / "record.json"
    if record.is_file():
        content = _record(record, results, study_path)
        changes = identity_changes(recorded_identity(content), run_identity(run))
        changes += other_data(content.get("data_fingerprint"), prepared) + data_changed
        return RunState(run.run_id, "stale" if changes else "done", tuple(changes))
    spec = _read(run_dir / "spec.json")
    if spec is None or not (run_dir / "checkpoint.pt").is_file():
        return RunState(run.run_id, "to run")
    current = run_identity(run)
    trained = {k: v for k, v in spec["spec"].items() if k in current}
    changes = identity_changes(trained, current)
    if "data_fingerprint" in spec["spec"]:
        changes += other_data(spec["spec"]["data_fingerprint"], prepared)
    changes += data_changed
    step = _last_step(run_dir / "metrics.jsonl")
    return RunState(run.run_id, "stale" if changes else "in progress", tuple(changes), step)


def run_states(study: Study, runs: list[Run], results: Path, corpus: dict[str, Any] | None = None) -> list[RunState]:
    """Each run's state on disk against what the study now asks for and the data it would train
    on: a run is done only when its identity is the same and it was trained on the prepared
    data, made from the corpus as it is now (``corpus``: its content, when already read)."""
    data = _data_now(study, results, corpus)
    return [run_state(run, results, data, str(study.path)) for run in runs]


def retrained_runs(
    study: Study, runs: list[Run], results: Path, corpus: dict[str, Any] | None = None
) -> list[RunState]:
    """The finished or started runs that the workflow would train again, with the reasons."""
    return [s for s in run_states(study, runs, results, corpus) if s.state == "stale"]


def retrain_refusal(
    stale: list[RunState], study: Study, shown: int = 20, remedy: str | None = None, why: tuple[str, ...] = ()
) -> str:
    """The message that stops the workflow before it deletes finished work: the runs, ``why``
    (further reasons), then what to do: ``remedy``, in place of reverting the change, when
    nothing changed in content."""
    lines = [
        f"moe-harness: with {study.path} as it is now, {len(stale)} finished or started run(s) would be trained again:"
    ]
    for s in stale[:shown]:
        lines.append(f"  {s.run_id}: {'; '.join(s.changes)}")
    if len(stale) > shown:
        lines.append(f"  ... and {len(stale) - shown} more (`harness plan {study.path}` lists them all)")
    lines.extend(why)
    lines.append(
        remedy
        or "Revert the change to keep them, or run again with `--config retrain=stale` to replace them "
        "(their checkpoints and records are deleted). A change to "
        + ", ".join(f"recipe.{f}" for f in BOOKKEEPING)
        + " or data.allow_repetition never retrains anything."
    )
    return "\n".join(lines)


IDENTITY = "identity.json"


def identity_text(run: Run) -> str:
    """What a run's identity.json holds."""
    return json.dumps(run_identity(run), sort_keys=True, indent=1) + "\n"


def identity_problem(path: Path, text: str) -> str | None:
    """How a run's identity.json differs from ``text``, what the workflow writes there: None when
    it does not, else "is missing" or "is damaged (...)"."""
    try:
        content = path.read_text()
    except FileNotFoundError:
        return "is missing"
    except (OSError, UnicodeDecodeError) as e:
        return f"is damaged (unreadable: {getattr(e, 'strerror', None) or type(e).__name__})"
    if content == text:
        return None
    try:
        json.loads(content)
    except ValueError:
        return "is damaged (not JSON)"
    return "is damaged (not this run's identity as the study gives it)"


def identity_repairs(runs: list[Run], results: Path, stale: set[str]) -> dict[str, str]:
    """The identity files of finished or started runs that are missing or damaged while their run
    is current (not in ``stale``): path -> the problem. The workflow writes them again from the
    study, with a time before the record's, so that nothing is trained again."""
    out = {}
    for run in runs:
        run_dir = results / "runs" / run.run_id
        if run.run_id in stale or not any((run_dir / f).is_file() for f in ("record.json", "spec.json")):
            continue
        path = run_dir / IDENTITY
        if (problem := identity_problem(path, identity_text(run))) is not None:
            out[str(path)] = problem
    return out


def repair_lines(repairs: dict[str, str], dry_run: bool) -> list[str]:
    """What a real run and a dry run both say of the identity files they (would) write again."""
    does = "a real run writes it again" if dry_run else "written again"
    return [
        f"moe-harness: {path} {problem}; {does} from the study (the run is current: nothing is trained again)"
        for path, problem in repairs.items()
    ]


def _backdated(run_dir: Path) -> float | None:
    """The time an identity file gets when its run's record is current: just before the record's."""
    record = run_dir / "record.json"
    return record.stat().st_mtime - 1 if record.is_file() else None


def sync_identities(
    study: Study,
    runs: list[Run],
    results: Path,
    retrain_stale: bool,
    corpus: dict[str, Any] | None = None,
    write: bool = True,
) -> list[RunState]:
    """Write each run's identity.json where it is missing or differs. A finished or started run
    whose identity changed stops this (:class:`RetrainRefused`) unless ``retrain_stale``. A new
    identity file of a run finished as asked gets its record's time, so that it reruns nothing;
    one that was missing or damaged is named on stderr. ``write`` False (a dry run): only check
    and say what a real run would write. Returns the runs that are trained again."""
    from harness.core.io import write_text

    stale = {s.run_id: s for s in retrained_runs(study, runs, results, corpus)}
    if stale and not retrain_stale:
        raise RetrainRefused(retrain_refusal(list(stale.values()), study))
    for run in runs:  # refused alike by a dry run, which would otherwise find nothing in the way
        path = results / "runs" / run.run_id / IDENTITY
        if (path.exists() or path.is_symlink()) and (path.is_symlink() or not path.is_file()):
            what = "a symbolic link" if path.is_symlink() else "a folder" if path.is_dir() else "no regular file"
            raise HarnessError(
                f"{path}: {what} is where the run's identity file belongs; move it aside, and the workflow "
                "writes the file from the study"
            )
    for line in repair_lines(identity_repairs(runs, results, set(stale)), dry_run=not write):
        print(line, file=sys.stderr)
    if not write:
        return list(stale.values())
    for run in runs:
        run_dir = results / "runs" / run.run_id
        path, text = run_dir / IDENTITY, identity_text(run)
        if identity_problem(path, text) is None:
            if run.run_id in stale:  # the same identity on other data: retrained all the same
                os.utime(path)
            continue
        write_text(path, text)
        when = None if run.run_id in stale else _backdated(run_dir)
        if when is not None:
            os.utime(path, (when, when))
    return list(stale.values())


_STAND_INS: list[Any] = []
"""The temporary folders of this process's dry-run stand-ins, removed when it exits."""


def stand_ins(files: dict[str, tuple[str, float | None]]) -> dict[str, str]:
    """For a dry run, which writes nothing under results/: each file a real run would write when
    it starts (path: its text and the time it would get, None for now), written instead to a
    temporary folder (removed when Snakemake exits), so that the dry run lists the jobs a real run
    would run."""
    import tempfile

    if not files:
        return {}
    _STAND_INS.append(tempfile.TemporaryDirectory(prefix="moe-harness-dry-run-"))
    out = {}
    for path, (text, when) in files.items():
        stand_in = Path(_STAND_INS[-1].name) / path
        stand_in.parent.mkdir(parents=True, exist_ok=True)
        stand_in.write_text(text)
        if when is not None:
            os.utime(stand_in, (when, when))
        out[path] = str(stand_in)
    return out


def dry_run_files(
    runs: list[Run], retrained: list[RunState], results: Path, corpus: dict[str, Any]
) -> dict[str, tuple[str, float | None]]:
    """The files a real run would now write (path: text and time, None for now): the identity of
    each run it trains again (new), of each run whose identity file is missing or damaged (with
    the time before its record's, as :func:`sync_identities` gives it), and corpus.json where
    :func:`harness.data.corpus.sync_corpus` would write it or change its time."""
    from harness.data.corpus import CORPUS, corpus_update

    again = {s.run_id for s in retrained}
    files: dict[str, tuple[str, float | None]] = {}
    for run in runs:
        run_dir, text = results / "runs" / run.run_id, identity_text(run)
        if run.run_id in again:
            files[str(run_dir / IDENTITY)] = (text, None)
        elif (run_dir / "record.json").is_file() and identity_problem(run_dir / IDENTITY, text) is not None:
            files[str(run_dir / IDENTITY)] = (text, _backdated(run_dir))
    if (update := corpus_update(results, corpus)) is not None:
        files[str(results / "data" / CORPUS)] = update
    return files


def written_input(path: str, dry_run: bool, stand_in: dict[str, str] | None = None) -> list[Any]:
    """An input the workflow writes when it starts (corpus.json, identity.json). A dry run writes
    nothing there: one a real run would write anew is its stand-in (:func:`stand_ins`), which
    Snakemake compares and prints under the path it stands in for, so that the dry run lists
    what a real run would run; a missing one is left out (its job runs all the same: its output
    is missing too)."""
    if not dry_run:
        return [path]
    if stand_in and path in stand_in:
        return [_standing_in(stand_in[path], path)]
    return [path] if Path(path).exists() else []


def _standing_in(stand_in: str, path: str) -> Any:
    """The stand-in as an input that Snakemake records and prints as ``path``: the flag of a file
    Snakemake itself keeps a copy of elsewhere. Without it (another Snakemake), the stand-in's
    own path, which differs from the recorded one only where Snakemake kept a record of inputs."""
    try:
        from snakemake.io import sourcecache_entry
    except ImportError:
        return stand_in
    return sourcecache_entry(stand_in, path)


class RetrainRefused(Exception):
    """Raised as the workflow starts (parse time, onstart): finished runs would be trained again unasked."""


REFUSED = 2
"""The exit code of a workflow that refuses its study or --config, as `harness` exits on bad input."""


@contextlib.contextmanager
def refusals() -> Iterator[None]:
    """Around the Snakefile's own code (parse time and onstart): a refusal of the user's input
    prints its message alone and exits with :data:`REFUSED`. Snakemake would print its own
    traceback frames after the message; anything else still goes to Snakemake as a defect."""
    try:
        yield
    except (RetrainRefused, DiskRefused) as e:
        _refuse(str(e))
    except (ConfigError, HarnessError) as e:
        _refuse(f"moe-harness: error: {' '.join(str(e).split())}")
    except OSError as e:
        if (failure := os_failure(e)) is None:
            raise
        _refuse(f"moe-harness: error: {' '.join(str(failure).split())}")


def _refuse(message: str) -> NoReturn:
    print(message, file=sys.stderr)
    sys.exit(REFUSED)


def _scheduled_retrains(dag, results: Path) -> tuple[dict[str, str], list[str]]:
    """Train jobs Snakemake is about to run over a finished run (record.json present), with its
    reason, and the reasons of the other jobs they follow (the data step): this catches every
    trigger, not only a changed identity."""
    runs, upstream = {}, []
    try:
        jobs = list(dag.needrun_jobs())
    except Exception:  # Snakemake's DAG API moved: the identity check still applies
        return runs, upstream
    for job in jobs:
        run_id = getattr(job, "wildcards_dict", {}).get("run")
        reason = str(dag.reason(job)).replace("\n", "; ")
        finished = run_id and (results / "runs" / run_id / "record.json").is_file()
        if job.rule.name == "train" and finished:
            runs[run_id] = reason
        elif job.rule.name == "reuse" and finished:
            runs[run_id] = _reuse_reason(job, reason)
        elif job.rule.name == "data":
            upstream.append(f"the data step runs again first (Snakemake: {reason})")
    return runs, upstream


def _reuse_reason(job: Any, reason: str) -> str:
    """Why a finished copy of another study's run would be replaced: that run, named with its
    study, changed since it was copied."""
    from harness.workflow.reuse import describe

    try:
        source = Path(str(job.input.source)).parent
    except AttributeError:  # the rule's inputs renamed: Snakemake's reason alone
        return f"Snakemake: {reason}"
    return (
        f"its copy of {describe(source)} would be replaced: that run changed since it was copied (Snakemake: {reason})"
    )


METADATA_HINT = (
    "If `harness plan` lists these runs as done, only Snakemake's own record of an earlier "
    "parameter or rule changed: `snakemake --cleanup-metadata FILE...` on their outputs makes it "
    "forget that record."
)


TOUCH_HINT = (
    "Their inputs are unchanged in content (the same identity, data fingerprint, data settings and corpus): "
    "only timestamps, paths or Snakemake's own records differ, as after a copy without timestamps, a move of "
    "data.paths or data prepared again the same. `snakemake --touch` (with the same --config) marks the "
    "outputs current without training anything; `--config retrain=stale` trains them again all the same."
)


def guard_retraining(workflow, study: Study, runs: list[Run], results: Path, retrain: str | None) -> None:
    """The workflow's onstart check: stop before a finished or started run is trained again,
    unless the user said ``--config retrain=stale``. ``snakemake --touch`` retrains nothing: it
    passes. When nothing the runs depend on changed in content, the refusal says so and names
    ``snakemake --touch``."""
    if getattr(workflow, "touch", False):
        return
    stale = {s.run_id: s for s in retrained_runs(study, runs, results)}
    changed_content = bool(stale) or bool(data_changes(study, results))
    scheduled, upstream = _scheduled_retrains(workflow.dag, results)
    for run_id, reason in scheduled.items():
        stale.setdefault(run_id, RunState(run_id, "stale", (f"Snakemake: {reason}",)))
    if stale and retrain != "stale":
        remedy = None if changed_content else TOUCH_HINT
        message = retrain_refusal(list(stale.values()), study, remedy=remedy, why=tuple(upstream))
        said = " ".join([*upstream, *scheduled.values()])
        hint = METADATA_HINT if "have changed" in said or "has changed" in said else ""
        raise RetrainRefused("\n".join(filter(None, [message, hint])))


def at_a_glance(results: Path) -> str:
    """What the end of a successful workflow prints: the report's at-a-glance table and where the
    report is (empty when no report was written)."""
    report = results / "report.md"
    try:
        text = report.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):  # none, or not one the report step wrote: nothing to show
        return ""
    lines, inside = [], False
    for line in text.splitlines():
        if line.startswith("## "):
            if inside:
                break
            inside = line.strip() == "## At a glance"
        if inside:
            lines.append(line)
    where = [f"report: {report}"] + [f"        {p}" for p in (results / "report.html",) if p.is_file()]
    return "\n".join([*lines, "", *where]).strip() + "\n"
