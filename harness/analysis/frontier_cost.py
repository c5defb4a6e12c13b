"""Wall-clock and energy multipliers of an MoE against real dense models (a wall-clock
or energy multiplier multiplies a FLOP multiplier by a *real* model's speed).

    rows = optimal_dense_costs(records, flop_rows, "train_seconds")   # (a) the frontier's dense size
    rows = fastest_dense_costs(records, law, "train_seconds")         # (b) a dense run of the study

(a) **The compute-optimal dense model at its own speed.** ``harness.analysis.frontier`` gives the
dense compute C* at which the law's frontier reaches the MoE's loss and the frontier's size
N_opt there. That dense model would train at its own FLOP/s, which on a CPU or a GPU depends on
its size: the rate is interpolated (linearly in ln N, on ln rate) over the dense sizes' measured
training rates (FLOPs spent over training seconds, geometric mean over each size's runs), held at
the nearest measured size outside them. Multiplier = (C* / rate(N_opt)) / (the MoE's seconds for
its own FLOPs at its measured rate). Each bootstrap draw carries its own C* and N_opt.

(b) **The fastest dense run that reaches the MoE's loss.** Among the study's dense (model,
budget) groups whose seed-adjusted loss (runs less their fitted seed effects) is at or below the
MoE's, the one with the fewest mean training seconds; multiplier = its seconds over the MoE's
mean seconds. No model is invented: both numbers are runs' measured times.

Energy: the same with GPU energy (NVML) in place of seconds, where every run has it.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import numpy as np

from harness.analysis.fits import interval, interval_mc_error
from harness.analysis.law import LawFit

WHAT = {"train_seconds": ("FLOP/s", "s"), "gpu_energy_j": ("FLOP/J", "J")}


def _rate(rec: dict[str, Any], cost_key: str) -> float | None:
    cost = rec.get(cost_key)
    return None if not cost else float(rec["flops_spent"]) / float(cost)


def dense_rates(records: list[dict[str, Any]], cost_key: str) -> tuple[np.ndarray, np.ndarray]:
    """(ln N, ln rate) of each dense size with a measured rate, sorted by N."""
    by_size: dict[float, list[float]] = defaultdict(list)
    for r in records:
        if r["arm"] == "dense" and (rate := _rate(r, cost_key)):
            by_size[float(r["params"]["active_non_embedding"])].append(math.log(rate))
    sizes = sorted(by_size)
    return np.log(np.array(sizes, float)), np.array([np.mean(by_size[n]) for n in sizes], float)


def _moe_cost(runs: list[dict[str, Any]], cost_key: str) -> float | None:
    """The MoE's cost for its own FLOPs: mean FLOPs over its geometric-mean rate (None without one)."""
    rates = [r for rec in runs if (r := _rate(rec, cost_key))]
    if len(rates) != len(runs) or not runs:
        return None
    return float(np.mean([rec["flops_spent"] for rec in runs])) / math.exp(float(np.mean(np.log(rates))))


def optimal_dense_costs(
    records: list[dict[str, Any]], flop_rows: list[dict[str, Any]], cost_key: str = "train_seconds"
) -> list[dict[str, Any]]:
    """(a) per FLOP row: the frontier's compute-optimal dense model at its own measured rate."""
    what = WHAT.get(cost_key, (f"FLOPs per {cost_key}", cost_key))[0]
    rows = []
    for f in flop_rows:
        # Speeds compare only within one study: pooled studies may have run on other hosts.
        same = [r for r in records if r.get("study") == f.get("study")]
        ln_n, ln_rate = dense_rates(same, cost_key)
        row = {k: f[k] for k in ("model", "budget_flops", "study")} | {
            "cost_key": cost_key,
            "multiplier": None,
            "multiplier_ci": None,
            "multiplier_mc": None,
            "dense_rate": None,
            "moe_rate": None,
            "outside": None,
            "reason": f["reason"],
            "runs": [r["run_id"] for r in f.get("moe_runs") or []] + [r["run_id"] for r in same if r["arm"] == "dense"],
        }
        rows.append(row)
        moe = _moe_cost(f.get("moe_runs") or [], cost_key)
        if f["multiplier"] is None or moe is None or not len(ln_n):
            row["reason"] = row["reason"] or (
                f"no dense size with a measured {what}" if not len(ln_n) else f"the MoE has no measured {what}"
            )
            continue

        def dense_cost(ln_c: float, ln_n_opt: float, ln_n=ln_n, ln_rate=ln_rate) -> float:
            return math.exp(ln_c - float(np.interp(ln_n_opt, ln_n, ln_rate)))

        n_opt = math.log(f["dense_n_opt"])
        row.update(
            multiplier=dense_cost(math.log(f["dense_compute"]), n_opt) / moe,
            dense_rate=math.exp(float(np.interp(n_opt, ln_n, ln_rate))),
            moe_rate=float(np.mean([r["flops_spent"] for r in f["moe_runs"]])) / moe,
            outside=not (ln_n[0] - 1e-9 <= n_opt <= ln_n[-1] + 1e-9),
            method=f"C* at the {what} of a dense model of N_opt (interpolated over {len(ln_n)} dense sizes)",
        )
        draws = f.get("draws")
        if draws is not None and len(draws["ln_c"]):
            values = np.array(
                [
                    dense_cost(c, n) / moe if math.isfinite(c) and math.isfinite(n) else (math.inf if c > 0 else 0.0)
                    for c, n in zip(draws["ln_c"], draws["ln_n"], strict=True)
                ]
            )
            row["multiplier_ci"], row["multiplier_mc"] = interval(values), interval_mc_error(values)
    return rows


def _groups(law: LawFit) -> dict[tuple[str, str, float], list[int]]:
    """(study, model, budget) -> the law's runs: times compare only within one study's runs."""
    groups: dict[tuple[str, str, float], list[int]] = defaultdict(list)
    for i, r in enumerate(law.data.runs):
        groups[(str(r.get("study")), r["model"], r["budget_flops"])].append(i)
    return groups


def fastest_dense_costs(law: LawFit | None, cost_key: str = "train_seconds") -> list[dict[str, Any]]:
    """(b) per MoE (model, budget) of the law: the dense group of fewest mean ``cost_key`` whose
    seed-adjusted loss is at or below the MoE's, and the ratio of the two costs."""
    if law is None:
        return []
    unit = WHAT.get(cost_key, (cost_key, cost_key))[1]
    groups = _groups(law)
    dense = {}
    for key, index in groups.items():
        runs = [law.data.runs[i] for i in index]
        costs = [r.get(cost_key) for r in runs]
        if runs[0]["arm"] == "dense" and all(costs):
            dense[key] = (law.adjusted(index), float(np.mean(costs)), runs)
    rows = []
    for (study, model, budget), index in sorted(groups.items(), key=lambda kv: (kv[0][2], kv[0][1], kv[0][0])):
        runs = [law.data.runs[i] for i in index]
        if runs[0]["arm"] != "moe":
            continue
        loss = law.adjusted(index)
        costs = [r.get(cost_key) for r in runs]
        row = {"model": model, "budget_flops": budget, "study": runs[0].get("study"), "cost_key": cost_key}
        row.update(loss_adjusted=loss, multiplier=None, dense=None, dense_loss=None, dense_cost=None, reason="")
        rows.append(row)
        if not all(costs):
            row["reason"] = f"the MoE has no {cost_key}"
            continue
        same = {key: v for key, v in dense.items() if key[0] == study}
        reach = [(c, key, lo) for key, (lo, c, _) in same.items() if lo <= loss]
        if not reach:
            best = min(same.items(), key=lambda kv: kv[1][0], default=None)
            row["reason"] = f"no dense run of {study} reaches the MoE's loss" + (
                f" (the lowest: {best[0][1]} at {best[0][2]:g} FLOPs, {best[1][0]:.4f})" if best else ""
            )
            continue
        cost, key, dense_loss = min(reach)
        row.update(
            multiplier=cost / float(np.mean(costs)),
            dense=f"{key[1]} at {key[2]:g} FLOPs",
            runs=[r["run_id"] for r in runs] + [r["run_id"] for r in dense[key][2]],
            dense_loss=dense_loss,
            dense_cost=cost,
            moe_cost=float(np.mean(costs)),
            unit=unit,
        )
    return rows
