"""A study's headline numbers as ``summary.json``, and their comparison with a committed reference.

    harness report tiny      # writes results/tiny/summary.json; compares with
                             # results/reference/<device class>/tiny/summary.json when present

The device class is ``cpu`` or the GPU's name in lower case with dashes (``nvidia-h100-80gb-hbm3``).
Loss and bits per byte must agree to a relative tolerance (float reduction order differs between
machines of one class); throughput only to a wide band, since hosts of one class differ.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from harness.analysis.stats import task_metric
from harness.io import read_json

TOLERANCE = {
    "final_val_loss": ("relative", 0.01),
    "bits_per_byte": ("relative", 0.01),
    "code_mc_acc_norm": ("absolute", 0.05),
    "train_tokens_per_s": ("relative", 0.30),
}


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
    }


def find_reference(root: Path, study: str, cls: str) -> Path | None:
    path = root / "reference" / cls / study / "summary.json"
    return path if path.is_file() else None


def compare(ours: dict[str, Any], ref: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
    """One row per (run, metric) both hold: values, tolerance, and whether it reproduced."""
    if ours["data_fingerprint"] != ref["data_fingerprint"]:
        note = "the reference was trained on other data (fingerprints differ): losses are not comparable"
    else:
        note = ""
    rows = []
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
                }
            )
    return rows, note


def reproduction(results_root: Path, ours: dict[str, Any]) -> dict[str, Any]:
    ref_path = find_reference(results_root, ours["study"], ours["device_class"])
    if ref_path is None:
        return {"reference": None, "rows": [], "note": ""}
    ref = read_json(ref_path)
    rows, note = compare(ours, ref)
    return {"reference": str(ref_path), "reference_commit": ref.get("git_commit"), "rows": rows, "note": note}
