"""Finished runs reused across studies by identity: a study copied or extended under a new name
trains only what no other study of the project has trained.

A run's result depends on its identity (``harness.study.runs.run_identity``: model, budget, seed,
recipe) and on the tokens it trained on, nothing else. So when ``results/<other study>/runs/<run>``
holds a finished run (record and checkpoint) with the same identity, trained on data that is the
same token for token (the same data identity, ``harness.data.prepare.data_identity``, and the same shard
hashes once this study's data is prepared), the workflow's ``reuse`` rule brings it in instead of
training: the final checkpoint is hard-linked (copied where the file system cannot link), the
small files copied, and the record rewritten under this study's name with ``reused_from`` saying
where it came from.

Its evaluation and routing analysis come with it when the study it came from made them of the
same checkpoint (its recorded SHA-256), data, settings and device: each eval.json and routing.json
records those ``inputs`` (``harness.evaluate.lm_eval_run.eval_inputs``,
:func:`routing_inputs`), and the workflow's ``reuse_eval`` and ``reuse_routing``
rules run ``harness evaluate --reuse`` and ``harness routing --reuse``, which check the file
again (whole, of this run, inputs equal to what this study's job would record) and write it under
this study's name, atomically; where anything differs they evaluate as the plain rules do
(:func:`result_elsewhere` decides which rule makes the file, :func:`reused_result` checks it).
Speed is measured again (``harness measure``), so that a study's speed ratios come from one session.

The reuse writes the run folder as a training does: under the run's lock (harness.train.run_lock),
with a reader's lock on the source, so that neither is trained meanwhile. Every file is linked or
copied under a temporary name and checked against the source (a checkpoint against the SHA-256
recorded beside it, another file byte for byte) before any replaces what the folder holds,
record.json last; a failure (a full disk, a read-only folder, a source that vanishes) removes what
it wrote and is one line. A finished copy is replaced only with ``--force`` (the workflow passes
it under ``--config retrain=stale``), when the run it came from has changed since; a run this
study trained itself never is.

    python -m harness.reuse STUDY.yaml --run RUN --from results/OTHER/runs/RUN [--force]
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from harness.core.errors import DamagedFile, HarnessError, os_failure
from harness.core.io import read_json_object
from harness.study.records import record_problem, study_record
from harness.study.runs import find_run, identity_changes, recorded_identity, run_identity
from harness.study.spec import Run, Study, load_study
from models.config import ConfigError

REUSED = "reused_from"
"""The record field of a reused run: the study and run folder it was trained in."""
LINKED = ("checkpoint.pt",)
"""Files shared by hard link: large, and always replaced whole (written to a temporary name)."""
COPIED = ("checkpoint.pt.sha256", "config.yaml", "spec.json", "metrics.jsonl")
"""The other products of training (the checkpoint's checksum among them), copied; record.json is
written last, under this study's name."""
NOT_BROUGHT = ("checkpoint.prev.pt", "checkpoint.prev.pt.sha256")
"""What a source finished before finished runs kept their final checkpoint alone may still hold:
never brought in, and removed from an older copy (harness.train.checkpoint)."""


def _shards(meta: dict[str, Any]) -> dict[str, Any]:
    return {split: info.get("sha256") for split, info in (meta.get("splits") or {}).items()}


def our_data(study: Study, results: Path, corpus: dict[str, Any] | None) -> tuple[tuple, dict | None] | None:
    """This study's data identity and shard hashes: from its data.json when prepared, else what it
    would be from the corpus as it is now (``corpus``: harness.data.corpus content; no hashes then)."""
    import tokenizers

    from harness.data.prepare import data_identity, meta_identity, settings_of

    meta = read_json_object(results / "data" / "data.json")
    if meta is not None:
        return meta_identity(meta), _shards(meta)
    if not corpus or corpus.get("fingerprint") is None:
        return None  # an hf dataset, not read yet: nothing to compare with
    ident = data_identity(
        settings_of(study.data), corpus["fingerprint"], corpus["tokenizer_file_sha256"], tokenizers.__version__
    )
    return ident, None


def _same_data(source: Path, ours: tuple[tuple, dict | None], record: dict[str, Any]) -> bool:
    """Whether the study of run folder ``source`` trained it on the tokens this study has."""
    from harness.data.prepare import meta_identity

    meta = read_json_object(source.parent.parent / "data" / "data.json")
    if meta is None or record.get("data_fingerprint") != meta.get("fingerprint"):
        return False
    ident, shards = ours
    return meta_identity(meta) == ident and (shards is None or shards == _shards(meta))


def finished_elsewhere(run: Run, results: Path, ours: tuple[tuple, dict | None] | None) -> Path | None:
    """The folder of a finished run with ``run``'s identity and data in another study's results
    (a sibling of ``results``; the committed references hold no checkpoints), or None. A run this
    study trained itself is never replaced; one it reused keeps its source while that stays the
    same run (so that the workflow's rule for it stays the same)."""
    if ours is None:
        return None
    wanted, own = run_identity(run), results / "runs" / run.run_id / "record.json"
    if own.exists():
        came = ((read_json_object(own) or {}).get(REUSED) or {}).get("run_dir")
        others = [] if came is None else [Path(came)]
    else:
        others = sorted(p for p in results.parent.glob(f"*/runs/{run.run_id}") if p.parent.parent != results)
    for source in others:
        record = read_json_object(source / "record.json")
        if record is None or not (source / "checkpoint.pt").is_file() or "identity" not in record:
            continue
        try:
            same = not identity_changes(recorded_identity(record), wanted)
        except Exception:  # a record of another version: not reused
            continue
        if same and _same_data(source, ours, record):
            return source
    return None


def describe(source: Path) -> str:
    """A run folder as a refusal names it: the run, its study and where it lies."""
    if source.parent.name != "runs" or not source.parent.parent.name:
        return str(source)  # not a run folder of a study's results
    return f"run {source.name} of study {source.parent.parent.name} ({source})"


def _source_record(study: Study, run: Run, source: Path) -> dict[str, Any]:
    """The record of the finished run in ``source``, whose checkpoint verifies; else one line
    naming the source study and run and the command that trains this run instead."""
    from harness.train import checkpoint

    train = f"`harness train {study.path} --run {run.run_id}` trains it here instead"
    if not source.is_dir():
        raise HarnessError(f"{source}: the run to reuse is gone ({describe(source)} no longer exists); {train}")
    record = read_json_object(source / "record.json")
    damaged = checkpoint.problem(source / checkpoint.NAME)
    if record is None or damaged is not None:
        why = "no readable record.json" if record is None else f"its {checkpoint.NAME} does not verify ({damaged})"
        raise HarnessError(f"{source}: {describe(source)} is no finished run to reuse ({why}); {train}")
    if why := record_problem(record, source.name, source.parent.parent.name):
        raise HarnessError(f"{source / 'record.json'}: {describe(source)} is no finished run to reuse ({why}); {train}")
    return record


def _what_changed(own: dict[str, Any], record: dict[str, Any], source: Path) -> list[str]:
    """How this study's copy differs from the source run as it is now (empty: the same)."""
    came = (own.get(REUSED) or {}).get("run_dir")
    if came is not None and Path(came) != source:
        return [f"the copy came from {came}, not {source}"]
    ours = {k: v for k, v in own.items() if k not in ("study", REUSED)}
    theirs = {k: v for k, v in record.items() if k not in ("study", REUSED)}
    if ours == theirs:
        return []
    old, new = ours.get("final_val_loss"), theirs.get("final_val_loss")
    if old != new and isinstance(old, float) and isinstance(new, float):
        return [f"it was trained again there (val loss {old:.4f} -> {new:.4f})"]
    fields = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
    return [f"its record.json differs in {', '.join(fields[:6])}{' ...' if len(fields) > 6 else ''}"]


def _replaceable(study: Study, run: Run, out: Path, record: dict[str, Any], source: Path, force: bool) -> bool:
    """Whether ``out`` may take the copy: True when it holds none or ``force`` replaces an older
    one; False when it holds this very copy already. A run this study trained is never replaced,
    a copy of a source that has changed since only with ``force``."""
    if not (out / "record.json").exists():
        return True
    own = study_record(study, out / "record.json")  # a damaged record is named, not replaced
    if REUSED not in own:
        raise HarnessError(f"{out / 'record.json'}: {run.run_id} was trained in this study; it is not replaced")
    changes = _what_changed(own, record, source)
    if not changes:  # the same run: its files are linked again where the copy lost or damaged one
        from harness.train import checkpoint

        return checkpoint.problem(out / checkpoint.NAME) is not None
    if force:
        return True
    raise HarnessError(
        f"{out / 'record.json'}: this study's finished copy of {run.run_id} is kept: {describe(source)}, which it "
        f"came from, has changed since ({'; '.join(changes)}). `python -m harness.reuse {study.path} --run "
        f"{run.run_id} --force` replaces the copy with that run as it is now (in the workflow: `snakemake "
        f"--config study={study.path} retrain=stale`); `harness train {study.path} --run {run.run_id} --restart` "
        "trains it here instead"
    )


def _stage(source: Path, out: Path, staged: list[tuple[Path, Path]]) -> None:
    """Every file of the source run, linked (checkpoints, where the file system allows) or copied
    under a temporary name in ``out``, each checked against the source: a checkpoint against the
    checksum recorded beside it, another file byte for byte. Adds (temporary, final) pairs to
    ``staged`` as it goes, so that a failure half-way can remove what it wrote."""
    from harness.core.io import sha256_file
    from harness.train import checkpoint

    for name in (*LINKED, *COPIED):
        if not (source / name).is_file():
            continue
        tmp = out / f".{name}.reuse.tmp"
        tmp.unlink(missing_ok=True)
        staged.append((tmp, out / name))
        if name in LINKED:
            try:
                os.link(source / name, tmp)
            except OSError:  # another file system, or one without hard links
                shutil.copyfile(source / name, tmp)
            digest = checkpoint.recorded_digest(source / name)
            if digest is None or sha256_file(tmp) != digest:
                raise DamagedFile(
                    out / name, f"the copy of {source / name} does not match its recorded checksum", "run it again"
                )
        else:
            shutil.copyfile(source / name, tmp)
            if not filecmp.cmp(source / name, tmp, shallow=False):
                raise DamagedFile(out / name, f"the copy of {source / name} differs from it", "run it again")


def _failure(e: BaseException, study: Study, run: Run, source: Path, out: Path) -> BaseException:
    """The one-line error for a failure while the run is copied: the source vanishing under it
    (named with its study), else the operating system's refusal in ``out``."""
    named = getattr(e, "filename", None)
    if isinstance(e, FileNotFoundError) and named is not None and Path(named).is_relative_to(source):
        return HarnessError(
            f"{named}: {describe(source)} changed or vanished while it was copied; nothing of it was kept in {out}: "
            f"run it again, or `harness train {study.path} --run {run.run_id}` trains it here instead"
        )
    if isinstance(e, OSError) and (failure := os_failure(e, out)) is not None:
        return HarnessError(f"{failure} (nothing of the copy was kept)")
    return e


def reuse(study: Study, run: Run, results: Path, source: Path, force: bool = False) -> dict[str, Any] | None:
    """Bring the finished run ``source`` in as ``run`` of ``study``, after checking again that it
    has the run's identity and was trained on this study's prepared data, token for token. Holds
    the run's lock (and a reader's lock on the source) throughout; every file is checked against
    the source before any replaces what the run folder holds, record.json last, so a failure
    leaves the folder as it was. None when the folder already holds this very copy."""
    from harness.core.io import write_json
    from harness.data.prepare import meta_identity, read_meta
    from harness.train import run_lock

    meta = read_meta(results / "data", f"harness data {study.path}")
    out = results / "runs" / run.run_id
    with run_lock.training(out, run.run_id, verb="reuse"), run_lock.released():
        record = _source_record(study, run, source)
        if source.resolve() != out.resolve():  # this study's own run is refused below
            run_lock.reading(source, source.name, "reuse")
        changes = identity_changes(recorded_identity(record), run_identity(run))
        if changes or not _same_data(source, (meta_identity(meta), _shards(meta)), record):
            why = "; ".join(changes) or "it was trained on other data than this study's"
            raise HarnessError(
                f"{source}: {describe(source)} is not the same run as {run.run_id} of {study.path} ({why}); "
                f"`harness train {study.path} --run {run.run_id}` trains it"
            )
        if not _replaceable(study, run, out, record, source, force):
            return None
        staged: list[tuple[Path, Path]] = []
        try:
            _stage(source, out, staged)
            for tmp, final in staged:
                os.replace(tmp, final)
            kept = {final.name for _, final in staged}
            for name in (*LINKED, *COPIED, *NOT_BROUGHT):  # an older copy's file the source no longer has
                if name not in kept:
                    (out / name).unlink(missing_ok=True)
            reused = record | {"study": study.name, REUSED: {"study": record.get("study"), "run_dir": str(source)}}
            write_json(out / "record.json", reused)
        except Exception as e:
            raise _failure(e, study, run, source, out) from None
        finally:
            for tmp, _ in staged:
                tmp.unlink(missing_ok=True)
    return reused


RESULT_KEYS = {"eval.json": "tasks", "routing.json": "moe"}
"""The results a reused run may take from the study it came from, each with a key only its verb
writes."""
UNKNOWN_BEFORE_JOB = ("tasks_fingerprint",)
"""Inputs the workflow cannot know before its jobs run (this study's tasks.json may not exist or
be about to change): checked by the job."""


def reused_result(
    path: Path, run_id: str, inputs: dict[str, Any], unknown: tuple[str, ...] = ()
) -> tuple[dict[str, Any] | None, str]:
    """The result in ``path`` (another study's eval.json or routing.json of run ``run_id``) when it
    is whole, that run's, and records ``inputs`` (but for the keys in ``unknown``); else None and
    why not, in words."""
    key = RESULT_KEYS.get(path.name)
    data = read_json_object(path)
    if key is None or data is None or key not in data:
        return None, f"{path} is no whole harness {path.stem} result"
    study = path.parent.parent.parent.name if path.parent.parent.name == "runs" else data.get("study")
    if data.get("run_id") != run_id or path.parent.name != run_id or data.get("study") != study:
        return (
            None,
            f"{path} is not {run_id}'s result in that folder (run {data.get('run_id')}, study {data.get('study')})",
        )
    recorded = data.get("inputs")
    if not isinstance(recorded, dict):
        return None, f"{path} records no inputs (made before they were recorded)"
    differ = sorted(k for k in inputs.keys() | recorded.keys() if k not in unknown and recorded.get(k) != inputs.get(k))
    if differ:
        return None, f"{path} was made with other {', '.join(differ)}"
    return data, ""


def routing_inputs(checkpoint_sha256: str | None, data_fingerprint: str | None, max_tokens: int, device: str) -> dict:
    """What the numbers of a routing analysis depend on, routing.json's ``inputs``: the checkpoint
    by its recorded SHA-256, the data by fingerprint, the held-out tokens routed, the permutation
    baseline and the device type."""
    from harness.analysis.specialisation import DEFAULT_PERMUTATIONS, DEFAULT_SEED

    return {
        "checkpoint_sha256": checkpoint_sha256,
        "data_fingerprint": data_fingerprint,
        "max_tokens": max_tokens,
        "permutations": DEFAULT_PERMUTATIONS,
        "seed": DEFAULT_SEED,
        "device": device,
    }


def result_inputs(
    study: Study, name: str, checkpoint_sha256: str | None, data_fingerprint: str | None, device: str, **given: Any
) -> dict[str, Any]:
    """What the job making ``name`` (eval.json or routing.json) records as its inputs, with the
    verb's defaults (``given``: tasks, download, dtype, max_tokens, as the verb has them)."""
    if name == "eval.json":
        from dataclasses import replace

        from harness.evaluate.lm_eval_run import eval_inputs

        cfg = replace(study.eval, download=True) if given.get("download") else study.eval
        dtype = given.get("dtype") or ("bfloat16" if device == "cuda" else "float32")
        return eval_inputs(cfg, checkpoint_sha256, data_fingerprint, given.get("tasks"), device, dtype)
    from harness.analysis.specialisation import DEFAULT_MAX_TOKENS

    return routing_inputs(checkpoint_sha256, data_fingerprint, given.get("max_tokens", DEFAULT_MAX_TOKENS), device)


def result_elsewhere(
    study: Study, run: Run, results: Path, ours: tuple[tuple, dict | None] | None, name: str, device: str, **given: Any
) -> Path | None:
    """The ``name`` (eval.json or routing.json) that the study a reused run comes from holds of it,
    when its recorded inputs are those this study's job would record on ``device``: the workflow
    then takes it (rule reuse_eval or reuse_routing) instead of evaluating. None where the run is
    not reused or anything differs; the inputs the job alone can know are checked there."""
    from harness.train import checkpoint

    source = finished_elsewhere(run, results, ours)
    if source is None:
        return None
    record = read_json_object(source / "record.json") or {}
    digest = checkpoint.recorded_digest(source / checkpoint.NAME)
    inputs = result_inputs(study, name, digest, record.get("data_fingerprint"), device, **given)
    taken, _ = reused_result(source / name, run.run_id, inputs, UNKNOWN_BEFORE_JOB)
    return None if taken is None else source / name


def take_result(study: Study, run: Run, path: Path, inputs: dict[str, Any], out: Path) -> dict[str, Any] | None:
    """Write ``path``'s result as ``out``, under this study's name with ``reused_from``, when
    :func:`reused_result` takes it for ``inputs``; else say why on stderr and return None (the
    verb then makes the result itself)."""
    from harness.core.io import write_json

    data, why = reused_result(path, run.run_id, inputs)
    if data is None:
        print(f"{run.run_id}: not reused: {why}; made here instead", file=sys.stderr)
        return None
    taken = data | {"study": study.name, REUSED: {"study": data.get("study"), "file": str(path)}}
    write_json(out, taken)
    return taken


def reusable_sources(study: Study, runs: list[Run], results: Path) -> dict[str, Path]:
    """The runs another study has finished the same, each with the folder it would come from."""
    from harness.data.corpus import corpus_content

    try:
        ours = our_data(study, results, corpus_content(study, results))
    except ConfigError:
        return {}
    found = {run.run_id: finished_elsewhere(run, results, ours) for run in runs}
    return {run_id: source for run_id, source in found.items() if source is not None}


def reuse_lines(study: Study, sources: dict[str, Path]) -> list[str]:
    """``harness plan``'s lines for the runs another study has finished the same."""
    return [
        f"reuse: {run_id} is finished with the same identity and data in {source}: `snakemake` "
        f"brings it in without training (`python -m harness.reuse {study.path} --run {run_id}`)"
        for run_id, source in sources.items()
    ]


def _no_source(study: Study, run: Run, results: Path) -> HarnessError:
    """Why ``python -m harness.reuse`` without --from has nothing to bring in, naming the source
    an earlier copy came from."""
    own = read_json_object(results / "runs" / run.run_id / "record.json") or {}
    train = f"`harness train {study.path} --run {run.run_id}"
    if REUSED in own:
        came = Path((own[REUSED] or {}).get("run_dir") or "?")
        return HarnessError(
            f"{results / 'runs' / run.run_id / 'record.json'}: this study's copy of {run.run_id} came from "
            f"{describe(came)}, which is no longer a finished run with the same identity and data (gone, or "
            f"trained again otherwise); the copy is kept as it is, and {train} --restart` trains the run here instead"
        )
    if own:
        return HarnessError(f"{run.run_id}: trained in this study ({results / 'runs' / run.run_id}); nothing to reuse")
    return HarnessError(
        f"{run.run_id}: no other study under {results.parent} finished it with the same identity and data; "
        f"{train}` trains it"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.reuse", description=__doc__.splitlines()[0])
    parser.add_argument("study", help="a study name in workflows/studies/ or a path to a study YAML")
    parser.add_argument("--run", required=True, help="run id")
    parser.add_argument("--from", dest="source", help="the finished run folder (default: found by identity)")
    parser.add_argument("--results", default="results", help="results root (default: results)")
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace this study's copy of the run when the run it came from has changed since (never a run "
        "this study trained itself)",
    )
    args = parser.parse_args(argv)
    try:
        study = load_study(args.study)
        run = find_run(study, args.run)
        results = Path(args.results) / study.name
        source = Path(args.source) if args.source else finished_elsewhere(run, results, our_data(study, results, None))
        if source is None:
            raise _no_source(study, run, results)
        record = reuse(study, run, results, source, force=args.force)
    except (ConfigError, HarnessError) as e:
        print(f"harness reuse: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except OSError as e:
        if (failure := os_failure(e)) is None:
            raise
        print(f"harness reuse: error: {' '.join(str(failure).split())}", file=sys.stderr)
        return 2
    if record is None:
        print(f"{run.run_id}: already reused from {source}, unchanged there; nothing to do")
    else:
        print(f"{run.run_id}: reused from {source} (val loss {record['final_val_loss']:.4f}), not trained again")
    return 0


if __name__ == "__main__":
    sys.exit(main())
