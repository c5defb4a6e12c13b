"""A study's headline numbers as ``summary.json``, their comparison with a committed reference,
and the reference itself: the small records its report is built from.

    harness report tiny                                 # results/tiny/summary.json, compared with
                                                        # results/reference/<device class>/tiny/
    harness report tiny --reference                     # copy tiny's small records into that folder
                                                        # and build its report there from them alone
    harness report tiny --results results/reference/cpu # rebuild a reference's report from its records

The device class is ``cpu`` or the GPU's name in lower case with dashes (``nvidia-h100-80gb-hbm3``).
Loss and bits per byte must agree to a relative tolerance (float reduction order differs between
machines of one class); throughput only to a wide band, since hosts of one class differ. The
effect under study, each seed's MoE - dense validation loss, must agree to an absolute tolerance
below it (``DIFFERENCE_TOLERANCE``).

A reference folder (``results/reference/<device class>/<study>/``) holds report.md, summary.json,
tables/, figures/ and what they are computed from: ``runs/<run>/`` {record.json, measure.json,
eval.json, routing.json, metrics.jsonl} where present, ``data/data.json`` and
``microbench/moe_ffn.json``; never checkpoints, token shards, the tokenizer or tensorboard logs.
``keep_reference`` copies them (each file written atomically) and refuses a study with an
unfinished run; a report built from a reference folder says that it is the reference.
"""

from __future__ import annotations

import contextlib
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.analysis.stats import peer_pairs, task_metric
from harness.core.errors import HarnessError
from harness.core.io import atomic_write, read_json

if TYPE_CHECKING:
    from harness.study.spec import Study

TOLERANCE = {
    "final_val_loss": ("relative", 0.01),
    "bits_per_byte": ("relative", 0.01),
    "code_mc_acc_norm": ("absolute", 0.05),
    "train_tokens_per_s": ("relative", 0.30),
}
DIFFERENCE_TOLERANCE = 0.005
"""Nats, absolute, on each seed's MoE - dense validation loss. The 1% relative tolerance on a loss
(about 0.03 nats at loss 3) is as large as the effect the studies report (tiny: -0.034), so a
reproduction could reverse the effect and still pass. 0.005 nats is below the smallest effects
the literature reports (routing variants, ~0.005) and a seventh of tiny's effect; hosts of one device
class have given identical losses (results/reference/cpu/tiny/README.md), and a difference of
two runs on one host cancels much of what a change of host moves in both."""


def device_folder(gpu: str | None) -> str:
    """The folder under results/reference/ of a device: ``cpu``, or the GPU's name in lower case
    with dashes ('NVIDIA H200' -> 'nvidia-h200')."""
    return re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-") if gpu else "cpu"


def device_class(record: dict[str, Any]) -> str:
    return device_folder(record["provenance"]["host"].get("gpu"))


def summary(
    records: list[dict[str, Any]], measures: dict[str, dict[str, Any]], evals: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    runs = {}
    for r in records:
        ev = evals.get(r["run_id"])
        m = measures.get(r["run_id"])
        runs[r["run_id"]] = {
            "final_val_loss": r["final_val_loss"],
            "bits_per_byte": task_metric(ev, "heldout_ppl", "bits_per_byte"),
            "code_mc_acc_norm": task_metric(ev, "heldout_code_mc", "acc_norm"),
            "train_tokens_per_s": None if m is None else m["train"]["tokens_per_s_median"],
        }
    first = records[0]
    return {
        "study": first["study"],
        "device_class": device_class(first),
        "device": first["provenance"]["host"].get("gpu") or first["provenance"]["host"].get("cpu"),
        "git_commit": first["provenance"]["git"].get("commit"),
        "data_fingerprint": first["data_fingerprint"],
        "runs": runs,
        "differences": differences(records),
    }


def differences(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """MoE run -> its dense peer (same budget and seed) and the MoE - dense validation loss."""
    return {
        m["run_id"]: {"dense": d["run_id"], "val_loss": m["final_val_loss"] - d["final_val_loss"]}
        for pairs in peer_pairs(records).values()
        for m, d in pairs
    }


def reference_folder(root: Path, study: str, cls: str) -> Path:
    """Where the committed reference of ``study`` on device class ``cls`` lives under results root ``root``."""
    return root / "reference" / cls / study


def find_reference(root: Path, study: str, cls: str) -> Path | None:
    path = reference_folder(root, study, cls) / "summary.json"
    return path if path.is_file() else None


def is_reference(results: Path, ours: dict[str, Any]) -> bool:
    """Whether the study folder ``results`` is itself a reference folder (…/reference/<class>/<study>)."""
    parts = results.resolve().parts
    return parts[-3:-1] == ("reference", ours["device_class"]) and parts[-1] == ours["study"]


def other_cpu_model(ours: dict[str, Any], ref: dict[str, Any]) -> bool:
    """Whether a CPU study ran on another CPU model than its reference: bf16 kernels round
    differently between CPU models, moving a loss by up to about 1% (results/reference/cpu/tiny/
    README.md), as much as the effect; the per-seed difference is then not checked."""
    return ours.get("device_class") == "cpu" and bool(ref.get("device")) and ours.get("device") != ref.get("device")


def compare(ours: dict[str, Any], ref: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
    """One row per (run, metric) both hold: values, tolerance, and whether it reproduced."""
    if ours["data_fingerprint"] != ref["data_fingerprint"]:
        note = "the reference was trained on other data (fingerprints differ): losses are not comparable"
    else:
        note = ""
    rows = []
    other_model = other_cpu_model(ours, ref)
    for run, diff in ours.get("differences", {}).items():
        theirs = ref.get("differences", {}).get(run)
        if theirs is None or theirs["dense"] != diff["dense"]:
            continue
        close = abs(diff["val_loss"] - theirs["val_loss"]) <= DIFFERENCE_TOLERANCE
        rows.append(
            {
                "run": run,
                "metric": f"val loss MoE - dense (vs {diff['dense']})",
                "this run": diff["val_loss"],
                "reference": theirs["val_loss"],
                "tolerance": f"{DIFFERENCE_TOLERANCE} absolute"
                + (f", on the reference's CPU model ({ref.get('device')})" if other_model else ""),
                # None: not checked (another CPU model's bf16 kernels round otherwise)
                "reproduced": None if other_model else close,
                "difference": True,
            }
        )
    for run, metrics in ours["runs"].items():
        theirs = ref["runs"].get(run)
        if theirs is None:
            continue
        for metric, (kind, tol) in TOLERANCE.items():
            a, b = metrics.get(metric), theirs.get(metric)
            if a is None or b is None:
                continue
            delta = abs(a - b) if kind == "absolute" else abs(a - b) / abs(b)
            rows.append(
                {
                    "run": run,
                    "metric": metric,
                    "this run": a,
                    "reference": b,
                    "tolerance": f"{tol:.0%} relative" if kind == "relative" else f"{tol} absolute",
                    "reproduced": delta <= tol,
                    "difference": False,
                }
            )
    return rows, note


def reproduction(results: Path, ours: dict[str, Any]) -> dict[str, Any]:
    """The comparison of the study folder ``results`` with its committed reference (found beside it,
    under ``results.parent / "reference"``). ``is_reference``: the folder is a reference itself and
    is compared with nothing. ``has_differences``: whether the reference holds per-seed differences
    (an older one does not, and is compared on its per-run numbers only)."""
    if is_reference(results, ours):
        return {"reference": None, "is_reference": True, "rows": [], "note": ""}
    ref_path = find_reference(results.parent, ours["study"], ours["device_class"])
    if ref_path is None:
        return {"reference": None, "is_reference": False, "rows": [], "note": ""}
    ref = read_json(ref_path)
    rows, note = compare(ours, ref)
    return {
        "reference": str(ref_path),
        "is_reference": False,
        "reference_commit": ref.get("git_commit"),
        "has_differences": "differences" in ref,
        "rows": rows,
        "note": note,
    }


RUN_FILES = ("record.json", "measure.json", "eval.json", "routing.json", "metrics.jsonl")
"""A run's small records: what the report reads of it (never checkpoints or tensorboard logs)."""
STUDY_FILES = ("data/data.json", "microbench/moe_ffn.json")
"""The study's small records the report reads besides its runs'."""


def _copy(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(dest, lambda tmp: shutil.copyfile(src, tmp))


def require_finished(results: Path, run_ids: list[str], study: Study | None = None) -> None:
    """Refuse, naming the runs, when a run of ``results`` (the folder of ``study``) has no
    record.json (has not finished), or was trained on other data than its data/data.json
    describes; a damaged record, or one of another run or study, is refused (harness.study.records)."""
    unfinished = [run for run in run_ids if not (results / "runs" / run / "record.json").exists()]
    if unfinished:
        shown = ", ".join(unfinished[:5]) + (f" and {len(unfinished) - 5} more" if len(unfinished) > 5 else "")
        raise HarnessError(
            f"{results / 'runs'}: {len(unfinished)} of {len(run_ids)} runs have not finished (no record.json: "
            f"{shown}); a reference keeps a finished study only"
        )
    from harness.core.remedy import run_file
    from harness.data.current import trained_on_other_data
    from harness.study.records import read_record

    paths = [results / "runs" / run / "record.json" for run in run_ids]
    name, as_named = (None, "STUDY") if study is None else (study.name, study.path)
    records = [read_record(p, name, run_file(p, as_named)) for p in paths]
    if refusal := trained_on_other_data(records, results / "data" / "data.json", study):
        raise HarnessError(refusal)


def keep_reference(results: Path, run_ids: list[str], dest: Path, study: Study | None = None) -> list[Path]:
    """Copy the small records of a finished study (``results``: its folder, ``run_ids``: every run
    of its plan) into the reference folder ``dest``; each file written atomically. Refused, naming
    the runs, when one has no record.json (it has not finished). Records of runs no longer in the
    plan are removed from ``dest`` (their record files, and their folder once empty); README.md,
    report files and anything else a user put there are left as they are."""
    require_finished(results, run_ids, study)
    if not (results / "data" / "data.json").is_file():
        raise HarnessError(f"{results / 'data' / 'data.json'} does not exist: run `harness data` first")
    if dest.resolve() == results.resolve():
        raise HarnessError(f"{dest} is the study folder itself: nothing to copy")
    copied = []
    for run in run_ids:
        for name in RUN_FILES:
            if (src := results / "runs" / run / name).is_file():
                _copy(src, dest / "runs" / run / name)
                copied.append(dest / "runs" / run / name)
            else:
                (dest / "runs" / run / name).unlink(missing_ok=True)
    if (dest / "runs").is_dir():  # runs no longer planned: their records go, anything else stays
        for stale in sorted(p for p in (dest / "runs").iterdir() if p.is_dir() and p.name not in run_ids):
            for name in RUN_FILES:
                (stale / name).unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                stale.rmdir()  # only when nothing else is in it
    for name in STUDY_FILES:
        if (src := results / name).is_file():
            _copy(src, dest / name)
            copied.append(dest / name)
        else:
            (dest / name).unlink(missing_ok=True)
    return copied
