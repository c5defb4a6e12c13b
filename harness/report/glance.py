"""The report's main table, "At a glance": what each MoE bought and cost against its compute-matched
dense run, compared within seed and summarised over seeds, and the text that introduces it. A
``(headers, rows)`` pair like the tables of ``harness.report.tables``, rendered by ``harness.report.build``.

    headers, rows = glance_table(records, evals, measures, analysis)
"""

from __future__ import annotations

import math
from typing import Any

from harness.analysis.stats import peer_pairs, task_metric, training_memory
from harness.measure.plausibility import mark
from harness.report.tables import measure_flags
from harness.study.spec import budget_label

GLANCE_HEADERS = (
    "budget FLOPs",
    "MoE",
    "vs dense",
    "seeds (both arms)",
    "val loss MoE - dense (mean over seeds)",
    "bits/byte MoE - dense (mean over seeds with lm-eval)",
    "compute multiplier (vs dense frontier)",
    "wall-clock multiplier (vs compute-optimal dense at its own FLOP/s)",
    "total params x (config)",
    "training memory x (harness measure, measured seeds)",
    "train tokens/s x (harness measure, measured seeds)",
    "training FLOP/s x (training runs, over the whole run, 95% t over seeds)",
)


def _over(values: list[float | None], seeds: int, spec: str, geometric: bool = False) -> str:
    """Mean (geometric for ratios) of the seeds that have the figure, and how many when not all."""
    have = [v for v in values if v is not None and (v > 0 or not geometric)]
    if not have:
        return "-"
    mean = math.exp(sum(map(math.log, have)) / len(have)) if geometric else sum(have) / len(have)
    return format(mean, spec) + ("" if len(have) == seeds else f" ({len(have)} of {seeds} seeds)")


def _bpb(evals: dict[str, dict[str, Any]], rec: dict[str, Any]) -> float | None:
    """The run's held-out bits per byte from its eval.json; None without one."""
    return task_metric(evals.get(rec["run_id"]), "heldout_ppl", "bits_per_byte")


def _measured(measures: dict[str, dict[str, Any]], rec: dict[str, Any], get) -> float | None:
    """The figure ``get`` reads from the run's measure.json; None without one."""
    m = measures.get(rec["run_id"])
    return None if m is None else get(m)


def _ratio(measures: dict[str, dict[str, Any]], m: dict[str, Any], d: dict[str, Any], get) -> float | None:
    """MoE ``m`` over dense ``d`` of a measured figure; None when either lacks it or the dense one is zero."""
    a, b = _measured(measures, m, get), _measured(measures, d, get)
    return None if a is None or b is None or not b else a / b


def _tokens_per_s(m: dict[str, Any]) -> float:
    """The median training tokens/s of a measure.json."""
    return m["train"]["tokens_per_s_median"]


def _multiplier(row: dict[str, Any]) -> str:
    """A compute or wall-clock multiplier row's value, starred when extrapolated; '-' without one."""
    value = row.get("multiplier")
    return ("-" if value is None else format(value, ".2f")) + ("*" if row.get("extrapolated") else "")


def _flop_rate(rate: dict[str, Any] | None, n: int) -> str:
    """The training FLOP/s ratio with its interval, and the seeds it rests on when fewer than the
    ``n`` pairs; '-' without one."""
    if rate is None:
        return "-"
    text = f"{rate['ratio']:.2f}" + ("" if rate["ci"] is None else f" [{rate['ci'][0]:.2f}, {rate['ci'][1]:.2f}]")
    return text + ("" if rate["n"] == n else f" ({rate['n']} of {n} seeds)")


def glance_table(
    records: list[dict[str, Any]],
    evals: dict[str, dict[str, Any]],
    measures: dict[str, dict[str, Any]],
    analysis,
    training_flags: dict[str, list[dict[str, Any]]] | None = None,
) -> tuple[list[str], list[list[Any]]]:
    """What each MoE bought and cost against its compute-matched dense run: the main table. Every
    measured column is a within-seed comparison (a difference or ratio of the MoE and its dense peer
    of the same seed), summarised over the seeds both arms share that have the figure: differences
    by their mean, ratios by their geometric mean; a cell says when fewer seeds than the pair count
    have it. The multipliers are read from ``analysis.multiplier_flops`` / ``multiplier_seconds``."""
    from harness.analysis.cost_claims import training_rate_ratios

    training_flags = training_flags or {}
    flops = {(r["model"], r["budget_flops"]): r for r in analysis.multiplier_flops}
    secs = {(r["model"], r["budget_flops"]): r for r in analysis.multiplier_seconds}
    rates = training_rate_ratios(records)
    flags = measure_flags(measures)

    def flagged(pairs: list[tuple[dict, dict]], figure: str) -> list[dict[str, Any]]:
        return [f for pair in pairs for r in pair for f in flags.get(r["run_id"], {}).get(figure, [])]

    rows = []
    for (model, budget), pairs in peer_pairs(records).items():
        m0, d0 = pairs[0]
        n = len(pairs)
        bpb_diffs = [
            None if _bpb(evals, m) is None or _bpb(evals, d) is None else _bpb(evals, m) - _bpb(evals, d)
            for m, d in pairs
        ]
        memory = [_ratio(measures, m, d, training_memory) for m, d in pairs]
        speed = [_ratio(measures, m, d, _tokens_per_s) for m, d in pairs]
        rows.append(
            [
                budget_label(budget),
                model,
                d0["model"],
                n,
                _over([m["final_val_loss"] - d["final_val_loss"] for m, d in pairs], n, "+.4f"),
                _over(bpb_diffs, n, "+.4f"),
                _multiplier(flops.get((model, budget), {})),
                mark(
                    _multiplier(secs.get((model, budget), {})),
                    [f for run in secs.get((model, budget), {}).get("runs", []) for f in training_flags.get(run, [])],
                ),
                f"{m0['params']['total'] / d0['params']['total']:.2f}",
                mark(_over(memory, n, ".2f", True), flagged(pairs, "memory")),
                mark(_over(speed, n, ".2f", True), flagged(pairs, "train")),
                mark(
                    _flop_rate(rates.get((model, budget)), n),
                    [f for pair in pairs for r in pair for f in training_flags.get(r["run_id"], [])],
                ),
            ]
        )
    return list(GLANCE_HEADERS), rows


def main_table_intro() -> str:
    return (
        "Each MoE against its compute-matched dense run (same budget and seed, closest active parameter count). "
        "Every measured column compares the two arms within a seed, then summarises over the seeds both have "
        "(differences by their mean, ratios x, MoE over dense, by their geometric mean); a cell names the seeds "
        "it rests on when fewer have the figure. Negative differences: the MoE reached lower loss (validation "
        "loss from the training runs, bits/byte from lm-eval). Memory and tokens/s come from `harness measure`; "
        "training FLOP/s from the training runs' FLOPs over their training seconds (at equal FLOPs the "
        "wall-clock gain is the FLOP gain times this), with a 95% t interval over seeds. Multipliers: the "
        "FLOPs the dense frontier needs to reach the MoE's loss over the MoE's own, and the seconds the "
        "frontier's compute-optimal dense size would take at its own measured FLOP/s over the MoE's measured "
        "seconds (* extrapolated beyond the dense budgets or sizes; the scaling section also gives the fastest "
        "dense run that reaches the MoE's loss)."
    )
