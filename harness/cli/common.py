"""What several verbs of the harness command share: argument types, the results folder of a study,
the checks that an earlier step has run (a trained run, prepared data), the rule that an
up-to-date output is left alone, and --version."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
from pathlib import Path

from harness.core.errors import HarnessError, MissingStep
from harness.study.runs import find_run
from harness.train import run_lock
from models.config import ConfigError


def at_least(low: int):
    """An argparse type: an integer >= low."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def fraction(text: str) -> float:
    """An argparse type: a number in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


POSITIVE = at_least(1)


def study_results(args: argparse.Namespace, study) -> Path:
    """The study's folder under --results."""
    return Path(args.results) / study.name


def trained_run(args: argparse.Namespace, study):
    """(run, results folder, run folder) of --run, which must have finished training: its
    record.json whole and its own (harness.study.records), on the data prepared now."""
    run = find_run(study, args.run)
    results = study_results(args, study)
    run_dir = results / "runs" / run.run_id
    run_lock.reading(run_dir, run.run_id, args.verb)  # refused while the run trains
    if not (run_dir / "record.json").exists():
        raise MissingStep(run_dir / "record.json", f"harness train {study.path} --run {run.run_id}", "not trained")
    from harness.data.current import trained_on_other_data
    from harness.study.records import study_record

    record = study_record(study, run_dir / "record.json")
    if refusal := trained_on_other_data([record], results / "data" / "data.json", study):
        raise HarnessError(refusal)
    return run, results, run_dir


def trained_state(study, run, run_dir: Path) -> dict:
    """The verified final checkpoint of a trained run."""
    from harness.train.checkpoint import load_checkpoint

    train = f"harness train {study.path} --run {run.run_id}"
    return load_checkpoint(run_dir / "checkpoint.pt", train, f"`{train} --restart` trains it again")


def checkpoint_kept(study, run, run_dir: Path) -> None:
    """Refuse a finished run whose checkpoint.pt is gone, saying how to get it back."""
    from harness.train.checkpoint import gone

    if (why := gone(run_dir / "checkpoint.pt", f"harness train {study.path} --run {run.run_id}")) is not None:
        raise HarnessError(why)


def data_ready(results: Path, study, verify: bool = True) -> Path:
    """The study's prepared data folder, its shards checked against data.json (``verify``);
    refused when `harness data` has not run or its output is damaged."""
    from harness.data.prepare import verify_shards
    from harness.study.records import read_data_meta

    data_dir, made_by = results / "data", f"harness data {study.path}"
    meta = read_data_meta(data_dir / "data.json", made_by, study.name)
    if verify:
        verify_shards(data_dir, meta, made_by)
    return data_dir


def up_to_date(out: Path, inputs: list[Path], args: argparse.Namespace) -> bool:
    """True (and says so) when ``out`` exists, is newer than every input and neither --force nor
    --out asks for it again: a step run by hand leaves an up-to-date output alone, as the
    pipeline does."""
    if getattr(args, "force", False) or getattr(args, "out", None) or not out.is_file():
        return False
    newest = max((p.stat().st_mtime for p in inputs if p.exists()), default=0.0)
    if out.stat().st_mtime < newest:
        return False
    print(f"{out}: nothing to do, it is up to date; --force does it again")
    return True


def out_replaceable(args: argparse.Namespace, key: str) -> None:
    """Refuse, before any work, an --out that is a folder, or a file this verb did not write (a
    JSON object with ``key``) unless --force: a user's file is never overwritten unasked."""
    if not getattr(args, "out", None):
        return
    out = Path(args.out)
    if out.is_dir():
        raise ConfigError("--out", f"{out} is a folder; give the file to write, e.g. {out / (args.verb + '.json')}")
    if not out.is_file() or args.force:
        return
    try:
        ours = key in json.loads(out.read_bytes())
    except (ValueError, TypeError):
        ours = False
    if not ours:
        raise ConfigError(
            "--out", f"{out} exists and is not a harness {args.verb} result; it is left as it is: --force replaces it"
        )


def cuda_visible(device: str | None) -> None:
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("--device", "cuda requested but no CUDA device is visible")


def set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def version_text() -> str:
    """The package version, and the commit when run from a git checkout."""
    try:
        version = importlib.metadata.version("moe-harness")
    except importlib.metadata.PackageNotFoundError:
        from harness import __version__ as version
    text = f"harness (moe-harness) {version}"
    commit = _checkout_commit()
    return f"{text}, commit {commit}" if commit else text


def _checkout_commit() -> str | None:
    """Short commit (+ "-dirty") of the checkout this package runs from, or None."""
    from harness.core.provenance import git_state

    state = git_state()
    if state["commit"] is None:
        return None
    return state["commit"][:12] + ("-dirty" if state["dirty"] else "")


class Version(argparse.Action):
    """--version, worked out only when asked for (it may call git)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_text())
        parser.exit()
