"""The two cost expectations of the literature, tested on replicates: speed (R10) and memory.

    from harness.analysis.cost_claims import memory_follows_total, wall_clock_below_flop_gain
    claim = wall_clock_below_flop_gain(records, measures)   # a harness.analysis.claims.Claim

Each verdict is ``supported``, ``not supported``, ``inconclusive`` (the test ran and decided
neither way) or ``not enough data`` (no test could run), at ALPHA = 0.05:

- R10 (wall-clock gain below FLOP gain): at one budget both arms spend the same FLOPs, so the
  MoE's wall-clock gain is its FLOP gain times its training FLOP/s over its dense peer's. Each
  seed gives one such ratio from the two training runs (``flops_spent / train_seconds``; the
  peer is ``stats.dense_peer``: same budget and seed, so same data order). Replicates are the
  seeds, never the timing windows of one process: a one-sample t interval on the
  log ratios. Supported when the interval lies below 1, not supported above 1, inconclusive when
  it includes 1, not enough data with fewer than two paired seeds. ``harness measure`` results of
  two or more separately measured pairs are a second, independent interval.
- memory (training memory follows total parameters): within a family that shares active
  parameters (a dense base and its routed twins at one k), the OLS slope of the measured
  training peak on total parameters, with its 95% t interval, in bytes per parameter, next to
  what parameters, gradients and optimizer state predict per parameter. The routed runs (E = k
  included) are fitted; the dense base is shown beside them, not fitted, since it has no
  dispatch buffers, and a fixed dispatch overhead would otherwise tilt the slope. Supported when
  the interval lies above half the prediction (the midpoint between 0, what active-only
  accounting predicts, and the state's bytes per parameter), not supported when below it,
  inconclusive when it includes it; not enough data without three distinct total sizes and one
  residual degree of freedom.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import numpy as np
from scipy import stats as sps

from harness.analysis.stats import ALPHA, measured_pairs, peer_pairs, training_memory
from harness.analysis.verdicts import INCONCLUSIVE, NO_DATA, NOT_SUPPORTED, SUPPORTED, Claim
from harness.study.spec import budget_label

MEMORY_FRACTION = 0.5
"""The decision point of the memory claim, as a fraction of the state's bytes per parameter."""
MIN_TOTAL_SIZES = 3
"""Distinct total parameter counts a memory family needs for a slope with a residual."""


def _log_interval(logs: list[float]) -> dict[str, Any]:
    """Geometric mean of exp(logs) and, with two or more, its 95% one-sample t interval."""
    x = np.asarray(logs, dtype=float)
    out: dict[str, Any] = {"n": len(x), "ratio": float(math.exp(x.mean())), "ci": None}
    if len(x) >= 2 and np.ptp(x) > 0:
        ci = sps.ttest_1samp(x, 0.0).confidence_interval(1 - ALPHA)
        out["ci"] = (math.exp(ci.low), math.exp(ci.high))
    return out


def _outcome(ci: tuple[float, float] | None, at: float, claim_side: str) -> str:
    """One interval's outcome: supported when it lies wholly on ``claim_side`` ('below' or
    'above') of ``at``, not supported when wholly on the other, inconclusive when it includes it."""
    if ci is None:
        return NO_DATA
    side = "below" if ci[1] < at else "above" if ci[0] > at else None
    return INCONCLUSIVE if side is None else SUPPORTED if side == claim_side else NOT_SUPPORTED


def _combine(outcomes: list[str]) -> str:
    """Supported when every test supports the claim, not supported when one refutes it,
    inconclusive when one ran and neither holds, not enough data when none could run."""
    tested = [o for o in outcomes if o != NO_DATA]
    if not tested:
        return NO_DATA
    if NOT_SUPPORTED in tested:
        return NOT_SUPPORTED
    return SUPPORTED if len(tested) == len(outcomes) and all(o == SUPPORTED for o in tested) else INCONCLUSIVE


def _host(rec: dict[str, Any]) -> str:
    host = rec["provenance"]["host"]
    return host.get("gpu") or host.get("cpu") or "unknown"


def training_rate_ratios(records: list[dict[str, Any]]) -> dict[tuple[str, float], dict[str, Any]]:
    """(MoE model, budget) -> the per-seed ratios of training FLOP/s (MoE over its dense peer, from
    the training runs) and their geometric mean with 95% t interval over seeds. Pairs trained on
    different devices are left out and counted."""
    out = {}
    for (model, budget), pairs in peer_pairs(records).items():
        logs, seeds, other_device = [], [], 0
        for m, d in pairs:
            if not (m.get("train_seconds") or 0) > 0 or not (d.get("train_seconds") or 0) > 0:
                continue
            if _host(m) != _host(d):
                other_device += 1
                continue
            rate_m, rate_d = m["flops_spent"] / m["train_seconds"], d["flops_spent"] / d["train_seconds"]
            logs.append(math.log(rate_m / rate_d))
            seeds.append(m["seed"])
        if logs:
            row = _log_interval(logs) | {"seeds": seeds, "dense_model": pairs[0][1]["model"]}
            out[(model, budget)] = row | {"per_seed": [math.exp(x) for x in logs], "other_device": other_device}
    return out


def measured_rate_ratios(
    records: list[dict[str, Any]], measures: dict[str, dict[str, Any]]
) -> dict[tuple[str, float], dict[str, Any]]:
    """The same ratio from ``harness measure`` (median training tokens/s times FLOPs per token),
    one per measured pair of one seed: each measure.json is a process of its own."""
    logs: dict[tuple[str, float], list[float]] = defaultdict(list)
    for m, _d, mm, dm in measured_pairs(records, measures):
        fm, fd = (r["flops_per_token"][r["flop_convention"]] for r in (m, _d))
        rate_m, rate_d = mm["train"]["tokens_per_s_median"] * fm, dm["train"]["tokens_per_s_median"] * fd
        logs[(m["model"], m["budget_flops"])].append(math.log(rate_m / rate_d))
    return {key: _log_interval(x) for key, x in logs.items()}


def _load_note(records: list[dict[str, Any]]) -> str:
    """What the records say about host load while training, for the R10 caveat."""
    shares = set()
    for r in records:
        host = r["provenance"]["host"]
        threads, cores = host.get("torch_threads"), host.get("cpu_count")
        if r["provenance"]["host"].get("gpu") is None and threads and cores:
            shares.add((threads, cores))
    shared = sorted(s for s in shares if s[0] < s[1])
    if shared:
        t, c = shared[0]
        return (
            f"the records show CPU runs of {t} thread(s) on {c} cores, so the workflow may have trained several "
            "runs at once; they do not record which runs trained side by side (a run whose log shows an "
            "overloaded host or a spread of speeds is flagged under Runs). A pair's ratio is fair only if both "
            "arms trained under the same load (side by side, or each alone): that is assumed"
        )
    return (
        "the records do not say which runs trained at once (a run whose log shows an overloaded host or a "
        "spread of speeds is flagged under Runs); the ratio assumes both arms of a seed trained under the same "
        "load (each alone, or side by side)"
    )


def wall_clock_below_flop_gain(records: list[dict[str, Any]], measures: dict[str, dict[str, Any]]) -> Claim:
    claim = "The wall-clock gain of MoE is smaller than its FLOP gain (it runs fewer FLOP/s than dense)"
    source = "R10: Muennighoff 2024 (OLMoE: ~3x fewer tokens, ~2x less time)"
    trained = training_rate_ratios(records)
    measured = {k: v for k, v in measured_rate_ratios(records, measures).items() if v["n"] >= 2}
    if not trained and not measured:
        return Claim("R10", claim, source, NO_DATA, "no MoE run with a dense peer of the same budget and seed")
    parts, sides = [], []
    for (model, budget), r in sorted(trained.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        name = f"{model} vs {r['dense_model']} at {budget_label(budget)} FLOPs"
        away = f"; {r['other_device']} pair(s) on different devices left out" if r["other_device"] else ""
        if r["ci"] is None:
            why = "one seed" if r["n"] < 2 else "identical ratios"
            parts.append(f"{name}: x{r['ratio']:.2f} ({why}: no interval{away})")
            sides.append(NO_DATA)
            continue
        parts.append(
            f"{name}: x{r['ratio']:.2f} [{r['ci'][0]:.2f}, {r['ci'][1]:.2f}] over {r['n']} paired seeds "
            f"(per seed {', '.join(f'x{x:.2f}' for x in r['per_seed'])}{away})"
        )
        sides.append(_outcome(r["ci"], 1.0, "below"))
    evidence = (
        "training FLOP/s of MoE over its dense peer from the training runs (flops_spent / train_seconds), "
        "per seed, geometric mean [95% t interval over seeds] (wall-clock gain = FLOP gain x this): "
        + ("; ".join(parts) or "none")
    )
    second, measured_sides = [], []
    for (model, budget), r in sorted(measured.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        interval = "" if r["ci"] is None else f" [{r['ci'][0]:.2f}, {r['ci'][1]:.2f}]"
        pairs = f"over {r['n']} separately measured pairs"
        second.append(f"{model} at {budget_label(budget)}: x{r['ratio']:.2f}{interval} {pairs}")
        measured_sides.append(_outcome(r["ci"], 1.0, "below"))
    if second:
        evidence += "; harness measure, median tokens/s x FLOPs per token: " + "; ".join(second)
    if all(s == NO_DATA for s in sides) and measured_sides:  # the training runs decide where they can
        sides = measured_sides
        evidence += " (the verdict rests on these: the training runs gave no interval)"
    caveat = (
        "replicates are seeds (separate training processes), never timing windows within one; "
        + _load_note(records)
        + "; training time excludes evaluation, checkpointing and compilation"
    )
    return Claim("R10", claim, source, _combine(sides), evidence, caveat)


def _state_per_param(measure: dict[str, Any], total: int) -> float:
    """Parameter + gradient + optimizer-state bytes per (total) parameter of a measure.json."""
    mem = measure["memory"]
    return (mem["param_bytes"] + mem.get("gradient_bytes", mem["param_bytes"]) + mem["optimizer_state_bytes"]) / total


def memory_families(
    records: list[dict[str, Any]], measures: dict[str, dict[str, Any]]
) -> dict[tuple[str, int, str], dict[str, list[dict[str, Any]]]]:
    """(dense base, k, device) -> {"routed": [...], "dense": [...]}: the measured runs sharing
    active parameters, as points {run, model, total, peak, per_param}. The base is each MoE's
    dense peer; every measured run of a model enters once (its seeds and budgets are separate
    processes: replicated measurements)."""
    out: dict[tuple[str, int, str], dict[str, list[dict[str, Any]]]] = defaultdict(lambda: {"routed": [], "dense": []})
    seen: set[tuple[tuple[str, int, str], str]] = set()

    for pairs in peer_pairs(records).values():
        for m, d in pairs:
            if m["run_id"] not in measures:
                continue
            key = (d["model"], m["top_k"], measures[m["run_id"]]["device_name"])
            for rec, kind in ((m, "routed"), (d, "dense")):
                measure = measures.get(rec["run_id"])
                peak = None if measure is None else training_memory(measure)
                if peak is None or measure["device_name"] != key[2] or (key, rec["run_id"]) in seen:
                    continue
                seen.add((key, rec["run_id"]))
                total = rec["params"]["total"]
                out[key][kind].append(
                    {"run": rec["run_id"], "model": rec["model"], "total": total, "peak": peak}
                    | {"per_param": _state_per_param(measure, total)}
                )
    return dict(out)


def _ols(x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """Slope and intercept of y on x with the slope's 95% t interval (n - 2 degrees of freedom)."""
    fit = sps.linregress(x, y)
    dof = len(x) - 2
    half = sps.t.ppf(1 - ALPHA / 2, dof) * fit.stderr
    return {"slope": fit.slope, "intercept": fit.intercept, "ci": (fit.slope - half, fit.slope + half), "dof": dof}


def memory_follows_total(records: list[dict[str, Any]], measures: dict[str, dict[str, Any]]) -> Claim:
    claim = "Training memory follows total parameters, not active ones"
    source = "Fedus 2022; Artetxe 2022"
    families = memory_families(records, measures)
    if not families:
        return Claim(
            "memory",
            claim,
            source,
            NO_DATA,
            "no MoE run with a measured training peak and a dense peer (harness measure)",
        )
    parts, sides = [], []
    for (base, k, _device), f in sorted(families.items()):
        routed = f["routed"]
        totals = sorted({p["total"] for p in routed})
        size = {p["model"]: p["total"] for p in routed}
        models = sorted(size, key=lambda mod: (size[mod], mod))
        name = f"{base} and its k = {k} twins ({', '.join(models)})"
        replicates = len(routed) - len(models)
        count = (
            f"{len(routed)} measured routed runs of {len(models)} models ({replicates} replicate a model: "
            f"other seeds or budgets, each a process of its own), {len(totals)} distinct total sizes"
        )
        if len(totals) < MIN_TOTAL_SIZES:
            parts.append(f"{name}: {count}; a slope with an interval needs >= {MIN_TOTAL_SIZES} total sizes")
            sides.append(NO_DATA)
            continue
        fit = _ols(np.array([p["total"] for p in routed], float), np.array([p["peak"] for p in routed], float))
        predicted = float(np.median([p["per_param"] for p in routed]))
        text = (
            f"{name}: {count}, "
            f"slope {fit['slope']:.1f} bytes per parameter [{fit['ci'][0]:.1f}, {fit['ci'][1]:.1f}] "
            f"(OLS, 95% t, {fit['dof']} residual dof) against {predicted:.1f} predicted by parameters, gradients "
            "and optimizer state"
        )
        if f["dense"]:
            dense_peak = float(np.mean([p["peak"] for p in f["dense"]]))
            at_dense = fit["intercept"] + fit["slope"] * f["dense"][0]["total"]
            text += (
                f"; the routed line at the dense size is {(at_dense - dense_peak) / 2**20:+.1f} MiB from "
                f"{base}'s measured peak (fixed routing and dispatch cost; dense not fitted)"
            )
        if fit["ci"][0] > 2 * predicted:
            text += "; the slope exceeds twice the prediction: buffers growing with E add to the parameters"
        parts.append(text)
        sides.append(_outcome(fit["ci"], MEMORY_FRACTION * predicted, "above"))
    device = next(iter(families))[2]
    peak = "CUDA peak allocated" if device != "cpu" else "resident memory added by training steps (RSS)"
    rule = (
        f"supported when the slope's interval lies above {MEMORY_FRACTION:.0%} of the predicted bytes per parameter "
        "(midway between active-only accounting, 0, and total), not supported when below, inconclusive when it "
        f"includes it; not enough data below {MIN_TOTAL_SIZES} distinct total sizes"
    )
    return Claim("memory", claim, source, _combine(sides), "; ".join(parts), f"{peak} on {device}; {rule}")
