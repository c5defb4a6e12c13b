"""Finished runs reused across studies by identity: a study copied or extended under a new name
trains only what no other study of the project has trained.

A run's result depends on its identity (``harness.study.runs.run_identity``: model, budget, seed,
recipe) and on the tokens it trained on, nothing else. So when ``results/<other study>/runs/<run>``
holds a finished run (record and checkpoint) with the same identity, trained on data that is the
same token for token (the same data identity, ``harness.data.prepare.data_identity``, and the same shard
hashes once this study's data is prepared), the workflow's ``reuse`` rule brings it in instead of
training: the checkpoints are hard-linked (copied where the file system cannot link), the small
files copied, and the record rewritten under this study's name with ``reused_from`` saying where it
came from. Measurement and evaluation run again, under this study's settings.

    python -m harness.reuse workflows/studies/tiny2.yaml --run dense-s_1e15_s0
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from harness.core.errors import HarnessError
from harness.core.io import read_json_object
from harness.study.runs import find_run, identity_changes, recorded_identity, run_identity
from harness.study.spec import Run, Study, load_study
from models.config import ConfigError

REUSED = "reused_from"
"""The record field of a reused run: the study and run folder it was trained in."""
LINKED = ("checkpoint.pt", "checkpoint.prev.pt")
"""Files shared by hard link: large, and always replaced whole (written to a temporary name)."""
COPIED = ("checkpoint.pt.sha256", "checkpoint.prev.pt.sha256", "config.yaml", "spec.json", "metrics.jsonl")
"""The other products of training (the checkpoints' checksums among them), copied; record.json is
written last, under this study's name."""


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


def _link_or_copy(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.reuse.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:  # another file system, or one without hard links
        shutil.copy2(src, tmp)
    os.replace(tmp, dst)


def reuse(study: Study, run: Run, results: Path, source: Path) -> dict[str, Any]:
    """Bring the finished run ``source`` in as ``run`` of ``study``, after checking again that it
    has the run's identity and was trained on this study's prepared data, token for token."""
    from harness.core.io import atomic_write, write_json
    from harness.data.prepare import meta_identity, read_meta

    meta = read_meta(results / "data", f"harness data {study.path}")
    from harness.train import checkpoint

    record = read_json_object(source / "record.json")
    damaged = checkpoint.problem(source / checkpoint.NAME)
    if record is None or damaged is not None:
        why = "no record.json" if record is None else f"its {checkpoint.NAME} does not verify ({damaged})"
        raise HarnessError(
            f"{source}: no finished run to reuse ({why}); `harness train {study.path} --run {run.run_id}` trains it"
        )
    changes = identity_changes(recorded_identity(record), run_identity(run))
    if changes or not _same_data(source, (meta_identity(meta), _shards(meta)), record):
        why = "; ".join(changes) or "it was trained on other data than this study's"
        raise HarnessError(
            f"{source}: not the same run as {run.run_id} of {study.path} ({why}); "
            f"`harness train {study.path} --run {run.run_id}` trains it"
        )
    out = results / "runs" / run.run_id
    own = read_json_object(out / "record.json")
    if own is not None and REUSED not in own:
        raise HarnessError(f"{out / 'record.json'}: {run.run_id} was trained in this study; it is not replaced")
    out.mkdir(parents=True, exist_ok=True)
    for name in LINKED:
        if (source / name).is_file():
            _link_or_copy(source / name, out / name)
    for name in COPIED:
        if (source / name).is_file():
            atomic_write(out / name, lambda p, name=name: shutil.copyfile(source / name, p))
    reused = record | {"study": study.name, REUSED: {"study": record.get("study"), "run_dir": str(source)}}
    write_json(out / "record.json", reused)
    return reused


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.reuse", description=__doc__.splitlines()[0])
    parser.add_argument("study", help="a study name in workflows/studies/ or a path to a study YAML")
    parser.add_argument("--run", required=True, help="run id")
    parser.add_argument("--from", dest="source", help="the finished run folder (default: found by identity)")
    parser.add_argument("--results", default="results", help="results root (default: results)")
    args = parser.parse_args(argv)
    try:
        study = load_study(args.study)
        run = find_run(study, args.run)
        results = Path(args.results) / study.name
        source = Path(args.source) if args.source else finished_elsewhere(run, results, our_data(study, results, None))
        if source is None:
            raise HarnessError(
                f"{run.run_id}: no other study under {results.parent} finished it with the same identity and data "
                f"(or this study has its own record); `harness train {study.path} --run {run.run_id}` trains it"
            )
        record = reuse(study, run, results, source)
    except (ConfigError, HarnessError) as e:
        print(f"harness reuse: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(f"{run.run_id}: reused from {source} (val loss {record['final_val_loss']:.4f}), not trained again")
    return 0


if __name__ == "__main__":
    sys.exit(main())
