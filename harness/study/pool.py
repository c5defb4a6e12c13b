"""Other studies' runs pooled into a study's joint law and dense frontier (``pool:`` in its file).

    records = folder_records(Path("results/reference/cpu/cpu"))      # every record.json of a folder
    pooled, refusals = pooled_records(study, own_records, own_data)  # those that may join, and why not

A law fitted over more runs is better identified, and a fresh study's runs are what an older
law is tested on (fit over every comparable study's runs, never pooling into a
registered contrast). Runs are comparable only when their numbers mean the same thing: the same
data (fingerprint), tokenizer and validation sample, and the same recipe but for the fields the
study names in ``differs``. A source that is not is refused in one line naming the field; its
runs stay out. A pooled run that is one of the study's own (a reused run: same identity) is
counted once. Every pooled record keeps its ``study``, which the tables show. A source's record
or data.json that is damaged, or not of the study whose folder holds it, stops the report in one
line (harness.study.records): that file is another study's, and no step of this one writes it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from harness.core.errors import HarnessError
from harness.study.records import read_data_meta, read_record
from harness.study.spec import Recipe, Study, project_root

NOT_COMPARED = ("eval_every", "checkpoint_every", "train_threads", "min_steps", "tensorboard")
"""Recipe fields that change nothing a pooled law reads (the cadence of logs and checkpoints, the
CPU threads, a guard). ``eval_batches`` is compared: it sets the sample of the final loss."""
DATA_FIELDS = ("vocab_size", "tokenizer_file", "validation_fraction", "test_fraction", "max_bytes", "source")


RESTORE = "restore it from that study's results, or `git restore` it where it is committed"
"""The remedy for a damaged file of a pooled study: it is another study's, and this one does not write it."""


def folder_records(folder: Path) -> list[dict[str, Any]]:
    """Every ``runs/*/record.json`` under ``folder`` (a study's results), in run order; a damaged
    one, or one of another run or study than its folder's, is refused (harness.study.records)."""
    runs = folder / "runs"
    if not runs.is_dir():
        raise HarnessError(f"{folder}: no runs/ folder with records to read")
    return [read_record(path, folder.name, RESTORE) for path in sorted(runs.glob("*/record.json"))]


def _recipe_difference(rec: dict[str, Any], study: Study, differs: list[str]) -> str:
    """The first recipe field where ``rec`` differs from the study's (neither in ``differs`` nor
    ``NOT_COMPARED``), as 'recipe.lr 0.001 (run X) against 0.003'; '' when none."""
    own = {k: getattr(getattr(study.recipe, k), "value", getattr(study.recipe, k)) for k in Recipe.__dataclass_fields__}
    for key, value in own.items():
        if key in NOT_COMPARED or key in differs:
            continue
        theirs = rec.get("recipe", {}).get(key, value)
        same = theirs == value or (
            isinstance(theirs, float) and isinstance(value, float) and math.isclose(theirs, value, rel_tol=1e-12)
        )
        if not same:
            return f"recipe.{key} {theirs!r} (run {rec['run_id']}) against this study's {value!r}"
    return ""


def _data_difference(theirs: dict[str, Any], own: dict[str, Any]) -> str:
    if theirs.get("fingerprint") != own.get("fingerprint"):
        return (
            f"data fingerprint {str(theirs.get('fingerprint'))[:16]} against this study's "
            f"{str(own.get('fingerprint'))[:16]} (other data)"
        )
    for key in DATA_FIELDS:
        a, b = (theirs.get("config") or {}).get(key), (own.get("config") or {}).get(key)
        if a != b:
            return f"data.{key} {a!r} against this study's {b!r}"
    if theirs.get("tokenizer") != own.get("tokenizer"):
        return "data.json tokenizer differs (another vocabulary or tokenizer file)"
    return ""


def _source(study: Study, i: int, own_data: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
    source = study.pool[i]
    folder = Path(source.results)
    folder = folder if folder.is_absolute() else project_root() / folder
    where = f"pool[{i}] ({source.results})"
    data = folder / "data" / "data.json"
    if not data.is_file():
        return [], f"{where}: no data/data.json there, so its data cannot be compared: not pooled"
    theirs = read_data_meta(data, "harness data", folder.name, RESTORE)
    if why := _data_difference(theirs, own_data):
        return [], f"{where}: {why}: not pooled"
    records = folder_records(folder)
    for rec in records:
        if rec.get("data_fingerprint") != own_data.get("fingerprint"):
            return [], f"{where}: run {rec['run_id']} was trained on other data than its data.json: not pooled"
        if why := _recipe_difference(rec, study, source.differs):
            return [], f"{where}: {why}; name the field in pool[{i}].differs to pool it anyway: not pooled"
    return records, ""


def pool_files(study: Study) -> list[str]:
    """The files of ``study.pool``'s sources a report reads (data.json and each record.json, those
    that exist): the workflow's report rule takes them as inputs, so a changed source reruns it."""
    files = []
    for source in study.pool:
        folder = Path(source.results)
        folder = folder if folder.is_absolute() else project_root() / folder
        files += [
            str(p) for p in [folder / "data" / "data.json", *sorted(folder.glob("runs/*/record.json"))] if p.is_file()
        ]
    return files


def pooled_records(
    study: Study, own: list[dict[str, Any]], own_data: dict[str, Any]
) -> tuple[list[dict[str, Any]], list[str]]:
    """The records of ``study.pool``'s sources that may join its law and frontier (each with its
    ``study``), less those that are one of ``own`` (same identity); and one refusal per source
    that may not."""
    seen = [r.get("identity") for r in own if r.get("identity") is not None]
    pooled, refusals = [], []
    for i in range(len(study.pool)):
        records, refusal = _source(study, i, own_data)
        if refusal:
            refusals.append(refusal)
        pooled += [r for r in records if r.get("identity") is None or r["identity"] not in seen]
    return pooled, refusals
