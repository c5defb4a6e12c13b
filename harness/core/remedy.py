"""What redoes each file of a run folder, and what is lost: the remedy a damaged file names.

record.json     `harness train` writes it again from the final checkpoint, without training; in a
                folder of records alone (a reference), it is restored from where it was copied
metrics.jsonl   the damaged line goes (one point of the curve); or the run trains again
measure.json, eval.json, routing.json   their verb with --force (only that step is redone)
"""

from __future__ import annotations

from pathlib import Path

REDO = {"measure.json": "measure", "eval.json": "evaluate", "routing.json": "routing"}


def records_only(run_dir: Path) -> bool:
    """Whether a run folder holds the run's records alone (a reference keeps no checkpoint and
    no config.yaml, and no training writes there)."""
    return not any((run_dir / name).exists() for name in ("checkpoint.pt", "checkpoint.pt.sha256", "config.yaml"))


def restore(path: Path, study: str) -> str:
    """The remedy for a file of a folder of records alone: restore it from where it was copied."""
    return (
        f"restore it (`git restore {path}` where it is committed), or copy the study's records again "
        f"with `harness report {study} --reference`"
    )


def run_file(path: str | Path, study: str) -> str:
    """The remedy for a damaged file of a run folder (``path``: runs/<run>/<file>; ``study``: the
    study as the user names it)."""
    path = Path(path)
    run = path.parent.name
    train = f"harness train {study} --run {run}"
    if path.name == "record.json":
        if records_only(path.parent):
            return restore(path, study)
        return (
            f"delete it and run `{train}`, which writes it again from the final checkpoint without training "
            f"(should checkpoint.pt be gone too, `{train} --restart` trains the run again)"
        )
    if path.name == "metrics.jsonl":
        return (
            "delete that line and run the command again (the training curve loses that one point), "
            f"or `{train} --restart` trains the run again"
        )
    if path.name in REDO:
        verb = REDO[path.name]
        return f"`harness {verb} {study} --run {run} --force` writes it again (only that step is redone)"
    return f"delete it and run `{train}` again"


def lost_log(path: str | Path, study: str) -> str:
    """The remedy for the metrics.jsonl of a finished run that is gone: training alone writes it."""
    path = Path(path)
    if records_only(path.parent):
        return restore(path, study)
    return f"restore it, or `harness train {study} --run {path.parent.name} --restart` trains the run again"
