"""What redoes each file of a run folder, and what is lost: the remedy a damaged file names.

record.json     `harness train` writes it again from the final checkpoint, without training
metrics.jsonl   the damaged line goes (one point of the curve); or the run trains again
measure.json, eval.json, routing.json   their verb with --force (only that step is redone)
"""

from __future__ import annotations

from pathlib import Path

REDO = {"measure.json": "measure", "eval.json": "evaluate", "routing.json": "routing"}


def run_file(path: str | Path, study: str) -> str:
    """The remedy for a damaged file of a run folder (``path``: runs/<run>/<file>; ``study``: the
    study as the user names it)."""
    path = Path(path)
    run = path.parent.name
    train = f"harness train {study} --run {run}"
    if path.name == "record.json":
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
