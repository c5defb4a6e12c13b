"""A study's results read back, each file checked for its shape and its place before anyone reads a
field of it: a run's record.json and metrics.jsonl, the prepared data's data.json.

A file that is not what its writer wrote (a field renamed, of another type, a list where an object
belongs) or that lies in another's place (another run's record copied into this run's folder,
another study's data) is refused in one line naming the file, the field and what writes it again
(:class:`~harness.core.errors.DamagedFile`): never a KeyError in a table, never a table that shows
one run twice and another not at all.

    record = study_record(study, results / "runs" / run_id / "record.json")   # this study's run
    record = read_record(path, "cpu", remedy)           # a run of the study whose folder is cpu
    rows = read_metrics(path, study.path)               # a run's training log, row by row
    meta = read_data_meta(path, f"harness data {study.path}", study.name)      # data.json

A record's place: its ``run_id`` is the name of its folder and agrees with its model, budget and
seed, and its ``study`` is the study whose results hold it (a reused run's record is rewritten
under the study that reuses it, harness.workflow.reuse; a pooled study's records are checked
against their own folder, harness.study.pool).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness.core.errors import DamagedFile
from harness.core.io import read_json, read_jsonl
from harness.core.remedy import lost_log, run_file
from harness.study.spec import Study, budget_label

Kind = tuple[Callable[[Any], bool], str]
"""A check of a value and what it says the value should be."""


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _whole(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


FINITE: Kind = (lambda v: _number(v) and math.isfinite(v), "a finite number")
NUMBER: Kind = (_number, "a number")
POSITIVE: Kind = (lambda v: _number(v) and math.isfinite(v) and v > 0, "a finite number > 0")
COUNT: Kind = (lambda v: _whole(v) and v >= 0, "a whole number >= 0")
WHOLE: Kind = (_whole, "a whole number")
AT_LEAST_ONE: Kind = (lambda v: _whole(v) and v >= 1, "a whole number >= 1")
TEXT: Kind = (lambda v: isinstance(v, str) and v != "", "a non-empty string")
OBJECT: Kind = (lambda v: isinstance(v, dict), "a JSON object")
LIST: Kind = (lambda v: isinstance(v, list), "a list")
ARM: Kind = (lambda v: v in ("dense", "moe"), "'dense' or 'moe'")


def optional(kind: Kind) -> Kind:
    check, wanted = kind
    return (lambda v: v is None or check(v), f"{wanted} or null")


RECORD: dict[str, Kind] = {
    "run_id": TEXT,
    "study": TEXT,
    "model": TEXT,
    "arm": ARM,
    "experts": optional(AT_LEAST_ONE),
    "top_k": optional(AT_LEAST_ONE),
    "seed": WHOLE,
    "config": OBJECT,
    "recipe": OBJECT,
    "params": OBJECT,
    "flops_per_token": OBJECT,
    "flop_convention": TEXT,
    "budget_flops": POSITIVE,
    "steps": AT_LEAST_ONE,
    "tokens": AT_LEAST_ONE,
    "flops_spent": POSITIVE,
    "final_train_loss": FINITE,
    "final_val_loss": FINITE,
    "train_seconds": FINITE,
    "tokens_per_s": FINITE,
    "data_fingerprint": TEXT,
    "provenance": OBJECT,
}
"""The fields of record.json (harness.train.record) that the report, the analyses and the verbs
read, each with its kind."""
RECORD_OPTIONAL: dict[str, Kind] = {
    "identity": OBJECT,
    "precision": OBJECT,
    "parallel": OBJECT,
    "spec_hash": TEXT,
    "train_loss_smoothing": TEXT,
    "gpu_energy_absent": optional(TEXT),
    "gpu_energy_label": TEXT,
    "train_loss_smoothed": optional(FINITE),
    "final_train_split_loss": optional(FINITE),
    "compile_seconds": optional(FINITE),
    "epochs": optional(FINITE),
    "flops_spent_over_budget": optional(FINITE),
    "gpu_energy_j": optional(FINITE),
    "gpu_energy_j_per_token": optional(FINITE),
    "registration_sha256": optional(TEXT),
    "reused_from": optional(OBJECT),
}
"""Fields an older record may lack (written before they were recorded), of this kind when present."""
RECORD_NESTED: dict[str, dict[str, Kind]] = {
    "params": {"total": POSITIVE, "active": POSITIVE, "total_non_embedding": FINITE, "active_non_embedding": FINITE},
    "recipe": {"seq_len": AT_LEAST_ONE, "batch_size": AT_LEAST_ONE},
    "provenance": {"host": OBJECT, "git": OBJECT, "packages": OBJECT},
}

ROW: dict[str, Kind] = {"step": COUNT, "tokens": FINITE, "flops": FINITE, "loss": FINITE}
"""The fields every metrics.jsonl row holds (harness.train.loop's ``log``); the trainer stops a
run whose loss is not finite, so a logged loss always is."""
ROW_OPTIONAL: dict[str, Kind] = {
    "val_loss": FINITE,
    "elapsed_s": FINITE,
    "lr": NUMBER,
    "aux_loss": NUMBER,
    "grad_norm": NUMBER,
    "tokens_per_s": NUMBER,
    "host_load_1m": optional(NUMBER),
    "host_cpu_ticks": optional(LIST),
    "routing": LIST,
}
ROUTING: dict[str, Kind] = {
    "tokens_per_expert": LIST,
    "load_cv": NUMBER,
    "load_max_over_mean": NUMBER,
    "dropped_fraction": NUMBER,
    "router_entropy": NUMBER,
    "z_loss": NUMBER,
}
"""The fields of each MoE layer's entry in a row's ``routing`` list (the routing-health table and figure)."""

SPLITS = ("train", "validation", "test")
SPLIT: dict[str, Kind] = {
    "documents": COUNT,
    "tokens": COUNT,
    "file_bytes": COUNT,
    "sha256": (TEXT[0], "the shard's SHA-256 checksum, a non-empty string"),
}
DATA: dict[str, Kind] = {
    "fingerprint": TEXT,
    "source": TEXT,
    "config": OBJECT,
    "dtype": TEXT,
    "tokenizer": OBJECT,
    "splits": OBJECT,
}
"""The fields of data.json (harness.data.prepare) that training, the report and pooling read."""
DATA_NESTED: dict[str, dict[str, Kind]] = {
    "tokenizer": {"vocab_size": AT_LEAST_ONE, "eos_id": COUNT},
    **{f"splits.{split}": SPLIT for split in SPLITS},
}


def shown(value: Any) -> str:
    """A value as a problem names it: ``a string 'abc'``, ``null``, ``a list``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f"a string {value[:40]!r}" if value else "an empty string"
    if isinstance(value, (int, float)):
        return repr(value) if math.isfinite(value) else f"{value} (not finite)"
    if isinstance(value, list):
        return "a list"
    return "a JSON object" if isinstance(value, dict) else type(value).__name__


def fields_problem(
    content: dict[str, Any],
    required: dict[str, Kind],
    optional_fields: dict[str, Kind] | None = None,
    nested: dict[str, dict[str, Kind]] | None = None,
) -> str | None:
    """The first field of ``content`` missing or of another kind, as one phrase; None when all hold.
    ``nested``: dotted object -> its own required fields (the object itself already checked)."""
    for name, (check, wanted) in required.items():
        if name not in content:
            unknown = sorted(set(content) - set(required) - set(optional_fields or {}))
            extra = ""
            if unknown:
                extra = f" (it has the unknown field{'s' * (len(unknown) > 1)} {', '.join(map(repr, unknown[:3]))})"
            return f"it has no field '{name}'{extra}"
        if not check(content[name]):
            return f"field '{name}' is {shown(content[name])}, not {wanted}"
    for name, (check, wanted) in (optional_fields or {}).items():
        if name in content and not check(content[name]):
            return f"field '{name}' is {shown(content[name])}, not {wanted}"
    for dotted, inner in (nested or {}).items():
        node: Any = content
        for key in dotted.split("."):
            node = node.get(key) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            return f"field '{dotted}' is {shown(node)}, not a JSON object"
        for name, (check, wanted) in inner.items():
            if name not in node:
                return f"field '{dotted}.{name}' is missing (it should be {wanted})"
            if not check(node[name]):
                return f"field '{dotted}.{name}' is {shown(node[name])}, not {wanted}"
    return None


def record_problem(record: Any, folder: str, study: str | None) -> str | None:
    """Why ``record`` is not the record of the run in ``folder`` of study ``study`` (None: not
    checked), as one phrase; None when it is."""
    if not isinstance(record, dict):
        return f"it holds {shown(record)}, not the JSON object a record is"
    if why := fields_problem(record, RECORD, RECORD_OPTIONAL, RECORD_NESTED):
        return why
    if record["arm"] == "moe" and (record["experts"] is None or record["top_k"] is None):
        return "its arm is 'moe' but field 'experts' or 'top_k' is null"
    made = f"{record['model']}_{budget_label(record['budget_flops'])}_s{record['seed']}"
    if record["run_id"] != made:
        return f"its run_id '{record['run_id']}' does not agree with its model, budget_flops and seed ('{made}')"
    if record["run_id"] != folder:
        return f"it is the record of run {record['run_id']}, not of {folder}, whose folder holds it"
    if study is not None and record["study"] != study:
        return f"it is the record of study '{record['study']}', not of '{study}', whose results hold it"
    return None


def read_record(path: str | Path, study: str | None, remedy: str) -> dict[str, Any]:
    """The record.json at ``path`` (runs/<run>/record.json of the study named ``study``; None: any
    study), refused with ``remedy`` unless it is a whole record of that run and study."""
    path = Path(path)
    record = read_json(path, remedy=remedy)
    if why := record_problem(record, path.parent.name, study):
        raise DamagedFile(path, why, remedy)
    return record


def study_record(study: Study, path: str | Path) -> dict[str, Any]:
    """The record.json at ``path`` of one of ``study``'s runs (in its own results); refused as
    :func:`read_record` with the remedy of a run folder (harness.core.remedy)."""
    return read_record(path, study.name, run_file(path, study.path))


def row_problem(row: Any) -> str | None:
    """Why a metrics.jsonl row is not one the trainer writes, as one phrase; None when it is."""
    if not isinstance(row, dict):
        return f"it holds {shown(row)}, not a JSON object"
    if why := fields_problem(row, ROW, ROW_OPTIONAL):
        return why
    for layer in row.get("routing", ()):
        if not isinstance(layer, dict):
            return f"field 'routing' holds {shown(layer)}, not a JSON object per MoE layer"
        for name, (check, wanted) in ROUTING.items():
            if name not in layer:
                return f"a layer of field 'routing' has no field '{name}'"
            if not check(layer[name]):
                return f"field 'routing.{name}' is {shown(layer[name])}, not {wanted}"
    return None


def read_metrics(path: str | Path, study: str = "STUDY", partial_last: bool = False) -> list[dict[str, Any]]:
    """A run's metrics.jsonl, every row checked (``study``: as the user names it, for the remedy).
    ``partial_last``: a last line cut short (a writer killed mid-line) is dropped."""
    path = Path(path)
    train = f"harness train {study} --run {path.parent.name}"
    rows = read_jsonl(path, made_by=train, partial_last=partial_last, remedy=run_file(path, study), check=row_problem)
    if not rows and (path.parent / "record.json").is_file():
        raise DamagedFile(path, "it holds no rows, though record.json says the run finished", lost_log(path, study))
    return rows


def data_problem(meta: Any, study: str | None) -> str | None:
    """Why ``meta`` is not the data.json of study ``study`` (None: any study); None when it is."""
    if not isinstance(meta, dict):
        return f"it holds {shown(meta)}, not the JSON object data.json is"
    if why := fields_problem(meta, DATA, {"study": TEXT, "heldout_keys": OBJECT}, DATA_NESTED):
        return why
    if study is not None and "study" in meta and meta["study"] != study:
        return f"it describes the data of study '{meta['study']}', not of '{study}', whose results hold it"
    return None


def read_data_meta(path: str | Path, made_by: str, study: str | None = None, remedy: str | None = None) -> dict:
    """The data.json at ``path`` of study ``study`` (None: any), checked for the fields its readers
    need; absent: :class:`~harness.core.errors.MissingStep` naming ``made_by``; damaged or another
    study's: refused with ``remedy``. By default ``made_by --force`` prepares it again: without
    --force the data step keeps a data.json whose shards and identity still match."""
    path = Path(path)
    remedy = remedy or f"`{made_by} --force` prepares it again"
    meta = read_json(path, made_by=made_by, remedy=remedy)
    if why := data_problem(meta, study):
        raise DamagedFile(path, why, remedy)
    return meta
