"""Dense-versus-MoE differences over seeds, with the test that says whether to believe them.

    rows = seed_comparison(records)   # one row per (MoE model, budget)

Runs with the same seed share the data order (``TokenShard.train_batch`` depends only on seed
and step), so an MoE run and its dense peer of the same seed form a pair and the test is the
paired t-test over seeds (``scipy.stats.ttest_rel``). Effects between routing variants are of
the order of 0.005 nats (SCIENCE.md): one seed supports no claim, and the rows say so.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import numpy as np
from scipy import stats

from harness.analysis.fits import Noise

ALPHA = 0.05


def arm_label(rec: dict[str, Any]) -> str:
    return "dense" if rec["arm"] == "dense" else f"MoE E{rec['experts']} k{rec['top_k']}"


def dense_peer(moe: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The dense run of the same budget and seed with the closest active parameter count."""
    peers = [
        d
        for d in records
        if d["arm"] == "dense" and d["budget_flops"] == moe["budget_flops"] and d["seed"] == moe["seed"]
    ]
    if not peers:
        return None
    return min(peers, key=lambda p: abs(p["params"]["active_non_embedding"] - moe["params"]["active_non_embedding"]))


def peer_pairs(records: list[dict[str, Any]]) -> dict[tuple[str, float], list[tuple[dict[str, Any], dict[str, Any]]]]:
    """(MoE model, budget) -> its (MoE run, dense peer) pairs, one per seed that has a peer."""
    pairs: dict[tuple[str, float], list[tuple[dict[str, Any], dict[str, Any]]]] = defaultdict(list)
    for m in records:
        if m["arm"] != "moe":
            continue
        d = dense_peer(m, records)
        if d is not None:
            pairs[(m["model"], m["budget_flops"])].append((m, d))
    return dict(sorted(pairs.items(), key=lambda kv: (kv[0][1], kv[0][0])))


def measured_pairs(
    records: list[dict[str, Any]], measures: dict[str, dict[str, Any]]
) -> list[tuple[dict[str, Any], dict[str, Any], dict[str, Any], dict[str, Any]]]:
    """(MoE run, dense peer, MoE measure.json, dense measure.json) for every pair measured on one
    device."""
    out = []
    for pairs in peer_pairs(records).values():
        for m, d in pairs:
            mm, dm = measures.get(m["run_id"]), measures.get(d["run_id"])
            if mm is not None and dm is not None and mm["device_name"] == dm["device_name"]:
                out.append((m, d, mm, dm))
    return out


def state_bytes(measure: dict[str, Any]) -> int:
    """Parameter plus optimizer-state bytes of a measure.json: the memory that follows total parameters."""
    return measure["memory"]["param_bytes"] + measure["memory"]["optimizer_state_bytes"]


def training_memory(measure: dict[str, Any]) -> int | None:
    """The measured training peak of a measure.json (CUDA peak allocated, or the RSS training adds
    on a CPU); None for a measure.json written before it was measured."""
    return measure["memory"].get("peak_training_bytes")


def task_metric(ev: dict[str, Any] | None, task: str, metric: str) -> float | None:
    """One metric of one task from an eval.json, or None where it is absent."""
    value = (ev or {}).get("tasks", {}).get(task, {}).get(metric)
    return value if isinstance(value, (int, float)) else None


def finite_runs(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Runs with a finite final validation loss."""
    return [r for r in records if r.get("final_val_loss") is not None and math.isfinite(r["final_val_loss"])]


def seed_noise(records: list[dict[str, Any]], metric: str = "final_val_loss") -> Noise:
    """The seed-to-seed standard deviation of one run's ``metric``, pooled over every (model, budget)
    that has two or more seeds: sqrt(sum of squared deviations / sum of (seeds - 1)). Its degrees of
    freedom are that sum (0 with one seed per run: no estimate)."""
    groups: dict[tuple[str, float], list[float]] = defaultdict(list)
    for r in records:
        value = r.get(metric)
        if value is not None and np.isfinite(value):
            groups[(r["model"], r["budget_flops"])].append(float(value))
    replicated = [np.asarray(v) for v in groups.values() if len(v) > 1]
    dof = sum(len(v) - 1 for v in replicated)
    if not dof:
        return Noise(sd=float("nan"), dof=0, source="no replicate seeds")
    ss = sum(float(((v - v.mean()) ** 2).sum()) for v in replicated)
    return Noise(sd=math.sqrt(ss / dof), dof=dof, source=f"{len(replicated)} replicated runs, {dof} degrees of freedom")


def paired_difference(moe: np.ndarray, dense: np.ndarray, confidence: float = 1 - ALPHA) -> dict[str, Any]:
    """Mean of the paired differences moe - dense with its t interval and two-sided p-value
    (``scipy.stats.ttest_rel``); interval and p are None with fewer than two pairs or when every
    pair differs by the same amount (no spread to test against)."""
    diff = np.asarray(moe, dtype=float) - np.asarray(dense, dtype=float)
    out: dict[str, Any] = {"n": len(diff), "mean": float(diff.mean()), "ci": None, "p_value": None}
    if len(diff) < 2 or np.allclose(diff, diff[0]):
        return out
    test = stats.ttest_rel(moe, dense)
    ci = test.confidence_interval(confidence)
    return out | {"ci": (float(ci.low), float(ci.high)), "p_value": float(test.pvalue)}


def seed_comparison(records: list[dict[str, Any]], metric: str = "final_val_loss") -> list[dict[str, Any]]:
    """Per (MoE model, budget): MoE and dense mean ± std over seeds, the mean paired difference
    (MoE - dense) and, with two or more seeds, its 95% t interval, the paired t-test's p-value and
    verdict."""
    rows = []
    for (model, budget), group in peer_pairs(records).items():
        moe = np.array([m[metric] for m, _ in group], dtype=float)
        dense = np.array([d[metric] for _, d in group], dtype=float)
        diff = moe - dense
        n = len(group)
        row: dict[str, Any] = {
            "model": model,
            "arm": arm_label(group[0][0]),
            "dense_model": group[0][1]["model"],
            "budget_flops": budget,
            "seeds": n,
            "moe_mean": float(moe.mean()),
            "moe_std": float(moe.std(ddof=1)) if n > 1 else None,
            "dense_mean": float(dense.mean()),
            "dense_std": float(dense.std(ddof=1)) if n > 1 else None,
            "difference_mean": float(diff.mean()),
            "difference_std": float(diff.std(ddof=1)) if n > 1 else None,
            "difference_ci": None,
            "p_value": None,
            "verdict": "one seed: no claim of significance",
        }
        test = paired_difference(moe, dense)
        if n > 1 and test["p_value"] is None:
            row["verdict"] = "identical differences across seeds: no test"
        elif test["p_value"] is not None:
            p = row["p_value"] = test["p_value"]
            row["difference_ci"] = test["ci"]
            better = "MoE lower" if diff.mean() < 0 else "MoE higher"
            row["verdict"] = (
                f"{better}, significant (paired t-test, p < {ALPHA})"
                if p < ALPHA
                else f"not significant (paired t-test, p = {p:.2g})"
            )
        rows.append(row)
    return rows
