"""The report's main table, "At a glance": what each MoE bought and cost against its compute-matched
dense run, compared within seed and summarised over seeds, and the text that introduces it. A
``(headers, rows)`` pair like the tables of ``harness.report.tables``, rendered by ``harness.report.build``.

    headers, rows = glance_table(records, evals, measures, analysis)
    headers, rows, withheld = glance(records, evals, measures, analysis, training_flags)
    lines = withheld_lines(withheld, study, results, is_reference)   # the notes under the table

A figure computed from a measurement that ``harness.measure.plausibility`` flags (disturbed or
impossible) is no headline: its cell says so and points to a numbered note under the table
(``withheld_lines``), which holds the value, the flagged measurements it rests on and the commands
that take them again.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.analysis.stats import peer_pairs, task_metric, training_memory
from harness.measure.plausibility import LABELS, MARK
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


@dataclass
class Withheld:
    """A glance figure computed from flagged measurements: shown in a note, not in the table."""

    n: int
    """Its note's number (the cell reads 'disturbed: see †n below')."""
    column: str
    row: str
    """The MoE, its dense peer and the budget, in words."""
    value: str
    """What the cell would have shown."""
    flags: list[tuple[str, dict[str, Any]]]
    """(run id, flag) of each flagged measurement it rests on."""
    measured: set[str] = field(default_factory=set)
    """Runs whose ``harness measure`` figures are flagged (measured again with --force)."""
    trained: set[str] = field(default_factory=set)
    """Runs whose training time is flagged (trained again with --restart)."""


def _withhold(
    text: str, flags: list[tuple[str, dict[str, Any]]], column: int, row: str, by_training: bool, withheld: list
) -> str:
    """``text`` as it is when no flag concerns it (or it holds no figure for another reason than an
    impossible one); else the cell that points to its note, a ``Withheld`` added to ``withheld``
    (``by_training``: the flags are of training times, not of ``harness measure``'s figures)."""
    impossible = any(f["reason"].startswith("impossible") for _, f in flags)
    if not flags or (text.strip() == "-" and not impossible):  # no figure, for another reason than a flag
        return text
    runs = {run for run, _ in flags}
    n = len(withheld) + 1
    withheld.append(
        Withheld(
            n, GLANCE_HEADERS[column], row, text, flags, set() if by_training else runs, runs if by_training else set()
        )
    )
    return f"{'impossible' if impossible else 'disturbed'}: see {MARK}{n} below"


def glance(
    records: list[dict[str, Any]],
    evals: dict[str, dict[str, Any]],
    measures: dict[str, dict[str, Any]],
    analysis,
    training_flags: dict[str, list[dict[str, Any]]] | None = None,
) -> tuple[list[str], list[list[Any]], list[Withheld]]:
    """What each MoE bought and cost against its compute-matched dense run: the main table, and the
    figures it withholds. Every measured column is a within-seed comparison (a difference or ratio
    of the MoE and its dense peer of the same seed), summarised over the seeds both arms share that
    have the figure: differences by their mean, ratios by their geometric mean; a cell says when
    fewer seeds than the pair count have it. The multipliers are read from
    ``analysis.multiplier_flops`` / ``multiplier_seconds``. A cell computed from a flagged
    measurement (``harness.measure.plausibility``) holds no number: it points to its ``Withheld``."""
    from harness.analysis.cost_claims import training_rate_ratios

    training_flags = training_flags or {}
    flops = {(r["model"], r["budget_flops"]): r for r in analysis.multiplier_flops}
    secs = {(r["model"], r["budget_flops"]): r for r in analysis.multiplier_seconds}
    rates = training_rate_ratios(records)
    flags = measure_flags(measures, records)
    withheld: list[Withheld] = []

    def measured(pairs: list[tuple[dict, dict]], figure: str) -> list[tuple[str, dict[str, Any]]]:
        return [(r["run_id"], f) for pair in pairs for r in pair for f in flags.get(r["run_id"], {}).get(figure, [])]

    def trained(runs: list[str]) -> list[tuple[str, dict[str, Any]]]:
        return [(run, f) for run in runs for f in training_flags.get(run, [])]

    rows = []
    for (model, budget), pairs in peer_pairs(records).items():
        m0, d0 = pairs[0]
        n = len(pairs)
        row = f"`{model}` against `{d0['model']}` at {budget_label(budget)} FLOPs"
        bpb_diffs = [
            None if _bpb(evals, m) is None or _bpb(evals, d) is None else _bpb(evals, m) - _bpb(evals, d)
            for m, d in pairs
        ]
        memory = [_ratio(measures, m, d, training_memory) for m, d in pairs]
        speed = [_ratio(measures, m, d, _tokens_per_s) for m, d in pairs]
        paired_runs = [r["run_id"] for pair in pairs for r in pair]
        rows.append(
            [
                budget_label(budget),
                model,
                d0["model"],
                n,
                _over([m["final_val_loss"] - d["final_val_loss"] for m, d in pairs], n, "+.4f"),
                _over(bpb_diffs, n, "+.4f"),
                _multiplier(flops.get((model, budget), {})),
                _withhold(
                    _multiplier(secs.get((model, budget), {})),
                    trained(secs.get((model, budget), {}).get("runs", [])),
                    7,
                    row,
                    True,
                    withheld,
                ),
                f"{m0['params']['total'] / d0['params']['total']:.2f}",
                _withhold(_over(memory, n, ".2f", True), measured(pairs, "memory"), 9, row, False, withheld),
                _withhold(_over(speed, n, ".2f", True), measured(pairs, "train"), 10, row, False, withheld),
                _withhold(_flop_rate(rates.get((model, budget)), n), trained(paired_runs), 11, row, True, withheld),
            ]
        )
    return list(GLANCE_HEADERS), rows, withheld


def glance_table(
    records: list[dict[str, Any]],
    evals: dict[str, dict[str, Any]],
    measures: dict[str, dict[str, Any]],
    analysis,
    training_flags: dict[str, list[dict[str, Any]]] | None = None,
) -> tuple[list[str], list[list[Any]]]:
    """The main table (``glance``) as a ``(headers, rows)`` pair."""
    headers, rows, _ = glance(records, evals, measures, analysis, training_flags)
    return headers, rows


def withheld_lines(withheld: list[Withheld], study: str, results: Path, is_reference: bool = False) -> list[str]:
    """The notes under the glance table: each withheld figure with its value and the flagged
    measurements it rests on, then the commands that take those measurements again
    (``harness.report.notes.remeasure_lines``; ``study`` as a command names it)."""
    from harness.report.notes import remeasure_lines

    if not withheld:
        return []
    lines = [
        f"{MARK} Not shown as a number: a figure computed from measurements that `harness/measure/plausibility.py` "
        "flags as disturbed or impossible is no headline. Each is here, with what it rests on (why each measurement "
        "is flagged: the notes under Runs and Cost per run):",
        "",
    ]
    for w in withheld:
        groups: dict[tuple[str, str], set[str]] = defaultdict(set)
        for run, f in w.flags:
            groups[(LABELS.get(f["figure"], f["figure"]), f["rule"])].add(run)
        rests = "; ".join(
            f"the {label} of {', '.join(f'`{run}`' for run in sorted(runs))}, flagged {rule}"
            for (label, rule), runs in sorted(groups.items())
        )
        value = "no value (the flagged figures give none)" if w.value.strip() == "-" else f"{w.value}, not a fact"
        lines.append(f"- {MARK}{w.n} {w.column}, {w.row}: {value}; it rests on {rests}")
    measured = sorted({run for w in withheld for run in w.measured})
    trained = sorted({run for w in withheld for run in w.trained})
    return [*lines, "", *remeasure_lines(study, results, measured, trained, is_reference)]


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
        "dense run that reaches the MoE's loss). A figure computed from measurements flagged as disturbed or "
        f"impossible is not shown: its cell says so and points to its note under the table ({MARK}n), which "
        "holds the value and the commands that take the measurements again."
    )
