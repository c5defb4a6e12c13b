"""Plausibility rules for measured figures: a figure that cannot be right is flagged, not shown as fact.

    flags = check_measure(result)        # {"decode_batch1": [flag, ...], "mfu.detailed": [...], ...}
    annotate(result)                     # the same, written into a measure.json result in place

``harness measure`` writes the flags into ``measure.json``: each measured section carries a
``flags`` list (empty when clean) and the top level a ``flags`` list of all of them, each naming
the ``figure`` it concerns. The report re-applies the rules to the numbers it reads, so a
``measure.json`` from before a rule existed is judged by it too, and marks every flagged figure
(and every ratio or verdict built on one) with :data:`MARK` and a footnote.

A flag is a dict: ``rule`` (one of :data:`RULES`), ``figure``, ``reason`` (a sentence with the
numbers) and ``values`` (the numbers and the threshold). The rules:

- ``window_spread``: the timing windows of one figure disagree by more than :data:`SPREAD_LIMIT`
  (fastest window over slowest). The same computation repeated in one process runs at one rate
  up to noise; a larger spread means other work shared the machine during some windows, and the
  median then depends on how many windows it hit. A timing is reported as the median *and the
  spread* of the windows; this rule reads the spread.
- ``above_measured_matmul``: model FLOP/s above a large matmul's measured in the same run
  (fraction > :data:`MATMUL_CEILING`). The matmul is the practical ceiling; above it, the
  matmul was measured under load or the convention's FLOP count exceeds the work done.
- ``above_spec_peak``: MFU above the device's specification peak: impossible.
- ``nonpositive_memory``: a measured training peak of zero or less (the baseline was taken while
  memory was held that was later released).
- ``nonpositive_energy``: an energy counter difference of zero or less over a window.
- ``negative_overhead``: a sampling thread cannot make the step it samples faster; a meter
  overhead below ``-OVERHEAD_TOLERANCE`` says the rounds of the micro-benchmark differ by more
  than the overhead it measures (:func:`overhead_flags`).
- ``host_busy``: the host's 1-minute load average, sampled while the figure was timed, had a
  median above its number of cores (:data:`LOAD_LIMIT`): threads queued for a core, so other work
  shared the cores (``harness.core.host_load``).
- ``cpu_steal``: more than :data:`STEAL_LIMIT` of the CPU time went to other virtual machines.

The training runs' own time (``train_seconds``, their tokens/s) is judged by the same rules
(:func:`check_training`): ``window_spread`` over :data:`TRAINING_WINDOWS` stretches of the run,
read from its metrics.jsonl (steps and training seconds of each logged row), and ``host_busy`` /
``cpu_steal`` from the load samples training logs with each row.
"""

from __future__ import annotations

import itertools
from typing import Any

MARK = "†"
"""What the report puts after a flagged figure (and after anything computed from one)."""

SPREAD_LIMIT = 2.0
"""Fastest over slowest timing window above which a figure is disturbed. Repeats of one
computation in one quiet process agree within tens of percent; on the shared 2-core host of the
references, separate processes of the same model differed by up to 1.5x (results/reference/cpu/
tiny/README.md). A window at under half another's rate is beyond what the computation itself
does: another process ran during it."""

MATMUL_CEILING = 1.0
"""The model's FLOP/s over the large matmul's: the matmul is the ceiling, so above 1 one of the two
numbers is wrong (no tolerance: noise that carries the ratio past 1 makes it unusable too)."""

SPEC_PEAK_CEILING = 1.0
"""MFU against the specification peak: above 1 is impossible."""

OVERHEAD_TOLERANCE = 0.001
"""A meter overhead below -0.1% is flagged. The true overhead is >= 0, so a negative median is
noise; the micro-benchmark records only the median of its per-round ratios, not their spread, so
the noise is judged from the median alone. Below -0.1%, a tenth of the 1% the benchmark checks the
overhead against (tests/benchmarks/test_meter_overhead.py), the noise is large enough to decide
whether that target is met."""

LOAD_LIMIT = 1.0
"""Median 1-minute load average over the number of cores above which a timed figure is disturbed.
The load counts the measured process's own threads, so a host running only the study's jobs, each
on its share of the cores, stays at or below 1 per core; above it, threads waited for a core."""

STEAL_LIMIT = 0.05
"""Fraction of CPU time stolen by the hypervisor above which a timed figure is disturbed."""

TRAINING_WINDOWS = 10
"""Stretches of equal steps a training run is cut into for ``window_spread`` (as many as
``harness measure`` times by default)."""

TIMED = ("train", "train_forced_balanced", "prefill", "decode_batch1", "decode_large_batch", "matmul")
"""Sections of a measure.json timed in windows."""

DEPENDS = {
    "mfu.detailed": ("train", "matmul"),
    "mfu.6N_active": ("train", "matmul"),
    "imbalance_cost": ("train", "train_forced_balanced"),
}
"""Derived figures and the measured ones they are computed from: a flag on an input carries over."""

CHECKED_CONVENTIONS = ("detailed", "6N_active")
"""FLOP conventions held to the ceilings. ``6N_total`` counts every expert although a token runs
through k of them, so it overstates the work by design (that is what it is shown for)."""

LABELS = {
    "train": "train tokens/s (harness measure)",
    "train_forced_balanced": "train tokens/s with forced-balanced routing",
    "prefill": "prefill tokens/s",
    "decode_batch1": "decode b1 tokens/s",
    "decode_large_batch": "decode large-batch tokens/s",
    "matmul": "reference matmul FLOP/s",
    "mfu.detailed": "detailed FLOPs / measured matmul",
    "mfu.6N_active": "6N_active FLOPs / measured matmul",
    "memory": "peak training memory",
    "energy_train": "train J/token",
    "energy_prefill": "prefill J/token",
    "meter_overhead": "energy-meter overhead",
    "training": "training time and tokens/s (training run)",
}
"""How the report names each checked figure."""

RULES = (
    "window_spread",
    "above_measured_matmul",
    "above_spec_peak",
    "nonpositive_memory",
    "nonpositive_energy",
    "negative_overhead",
    "host_busy",
    "cpu_steal",
)


def _flag(rule: str, figure: str, reason: str, **values: Any) -> dict[str, Any]:
    return {"rule": rule, "figure": figure, "reason": reason, "values": values}


def _number(x: float) -> str:
    """2,118; 27.7; 3.76e11: readable at any magnitude."""
    if abs(x) >= 1e7:
        mantissa, exponent = f"{x:.3g}".split("e")
        return f"{mantissa}e{int(exponent)}"
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def window_spread(section: dict[str, Any], figure: str) -> list[dict[str, Any]]:
    """``window_spread`` on a section with per-window rates (``*_windows``)."""
    key = next((k for k in section if k.endswith("_windows") and isinstance(section[k], list)), None)
    rates = [r for r in section.get(key, []) if r is not None] if key else []
    if len(rates) < 2 or min(rates) <= 0:
        return []
    unit = key.removesuffix("_windows")
    lo, hi = min(rates), max(rates)
    if hi / lo <= SPREAD_LIMIT:
        return []
    shown = unit.replace("_per_s", "/s").replace("_", " ")
    reason = (
        f"disturbed: its {len(rates)} timing windows ran from {_number(lo)} to {_number(hi)} {shown} "
        f"(x{hi / lo:.1f}; at most x{SPREAD_LIMIT:g} expected of one computation repeated): other work "
        "shared the machine, and the median depends on how many windows it hit"
    )
    return [_flag("window_spread", figure, reason, min=lo, max=hi, ratio=hi / lo, limit=SPREAD_LIMIT, unit=unit)]


def _ceiling(value: float | None, limit: float, rule: str, figure: str, what: str, why: str) -> list[dict[str, Any]]:
    """``what`` holds ``{value}``, where the percentage goes."""
    if value is None or value <= limit:
        return []
    reason = f"impossible: {what.format(value=f'{value:.1%}')} (above {limit:.0%}): {why}"
    return [_flag(rule, figure, reason, value=value, limit=limit)]


def check_measure(result: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Every rule on one measure.json result: figure -> its own flags (empty lists omitted)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for figure in TIMED:
        if isinstance(result.get(figure), dict):
            out[figure] = window_spread(result[figure], figure)
    if isinstance(result.get("train"), dict):  # the host's load at the start and the end of the measurement
        out["train"] += host_flags(result.get("host_load"), "train")
    for name in CHECKED_CONVENTIONS:
        row = (result.get("mfu") or {}).get("conventions", {}).get(name)
        if row is None:
            continue
        figure = f"mfu.{name}"
        out[figure] = _ceiling(
            row.get("fraction_of_measured_matmul"),
            MATMUL_CEILING,
            "above_measured_matmul",
            figure,
            f"{name} model FLOP/s at {{value}} of the large matmul measured in the same run",
            "the matmul was measured under load or the FLOP count exceeds the work done",
        ) + _ceiling(
            row.get("mfu_vs_spec_peak"),
            SPEC_PEAK_CEILING,
            "above_spec_peak",
            figure,
            f"{name} MFU {{value}} of the specification peak",
            "no device runs above its peak; the time or the FLOP count is wrong",
        )
    peak = (result.get("memory") or {}).get("peak_training_bytes")
    if peak is not None and peak <= 0:
        reason = (
            f"impossible: training added {peak / 2**20:+.1f} MiB (at least its parameters, gradients and "
            "optimizer state): the baseline held memory that was released later"
        )
        out["memory"] = [_flag("nonpositive_memory", "memory", reason, peak_training_bytes=peak)]
    for figure in ("energy_train", "energy_prefill"):
        energy = (result.get(figure) or {}).get("energy_j")
        if energy is not None and energy <= 0:
            reason = f"impossible: {energy:.3g} J over a window of work: the energy counter did not advance"
            out[figure] = [_flag("nonpositive_energy", figure, reason, energy_j=energy)]
    return {k: v for k, v in out.items() if v}


def flags_for(flags: dict[str, list[dict[str, Any]]], figure: str) -> list[dict[str, Any]]:
    """A figure's own flags and those of the measured figures it is computed from."""
    out = list(flags.get(figure, []))
    for source in DEPENDS.get(figure, ()):
        out += [f for f in flags.get(source, []) if f not in out]
    return out


def annotate(result: dict[str, Any]) -> dict[str, Any]:
    """Write the flags into a measure.json result: ``flags`` on each checked section (empty when
    clean) and the top-level ``flags``, all of them. Returns ``result``."""
    flags = check_measure(result)
    for figure in (*TIMED, "memory", "energy_train", "energy_prefill"):
        if isinstance(result.get(figure), dict):
            result[figure]["flags"] = flags.get(figure, [])
    for name, row in (result.get("mfu") or {}).get("conventions", {}).items():
        row["flags"] = flags.get(f"mfu.{name}", [])
    result["flags"] = [f for fs in flags.values() for f in fs]
    return result


def overhead_flags(overhead: float | None) -> list[dict[str, Any]]:
    """``negative_overhead`` on the energy meter's overhead fraction from the micro-benchmark."""
    if overhead is None or overhead >= -OVERHEAD_TOLERANCE:
        return []
    reason = (
        f"impossible: {overhead:+.2%} (a sampling thread cannot make the step faster; below "
        f"-{OVERHEAD_TOLERANCE:.1%} the rounds differ by more than the overhead measured, so it is known "
        f"only to about ±{abs(overhead):.1%})"
    )
    return [_flag("negative_overhead", "meter_overhead", reason, value=overhead, limit=-OVERHEAD_TOLERANCE)]


def mark(text: str, flags: list[dict[str, Any]]) -> str:
    """``text`` with :data:`MARK` after it when ``flags`` holds any."""
    return f"{text} {MARK}" if flags else text


def host_flags(host: dict[str, Any] | None, figure: str) -> list[dict[str, Any]]:
    """``host_busy`` and ``cpu_steal`` on a ``harness.core.host_load.summary`` of the samples taken
    while ``figure`` was timed (None: no samples, no flag)."""
    if not host:
        return []
    out = []
    load, cores = host.get("load_1m_median"), host.get("cpu_count")
    if load is not None and cores and load / cores > LOAD_LIMIT:
        reason = (
            f"disturbed: the host's load average was {load:.2f} (median of {host['samples']} samples, up to "
            f"{host['load_1m_max']:.2f}) on {cores} cores while it was timed: threads waited for a core, so other "
            "work shared the machine"
        )
        out.append(_flag("host_busy", figure, reason, load=load, cores=cores, limit=LOAD_LIMIT))
    steal = host.get("steal_fraction")
    if steal is not None and steal > STEAL_LIMIT:
        reason = (
            f"disturbed: {steal:.1%} of the CPU time went to other virtual machines (steal) while it was timed "
            f"(at most {STEAL_LIMIT:.0%})"
        )
        out.append(_flag("cpu_steal", figure, reason, steal=steal, limit=STEAL_LIMIT))
    return out


def training_windows(
    rows: list[dict[str, Any]], tokens_per_step: float, windows: int = TRAINING_WINDOWS
) -> list[float]:
    """Tokens/s of ``windows`` consecutive stretches of a training run, from its metrics.jsonl rows
    (``step``, ``elapsed_s``: training seconds, without evaluation, checkpointing or compilation).
    The run is cut into ``windows + 1`` stretches and the first left out: it is the warm-up
    (allocator, caches), which ``harness measure`` excludes too. A resumed run logged some steps
    twice: the later row counts, as its time is the one kept."""
    last: dict[int, float] = {}
    for r in rows:
        if isinstance(r.get("step"), int) and isinstance(r.get("elapsed_s"), (int, float)):
            last[r["step"]] = r["elapsed_s"]
    points = [(0, 0.0)]
    for step, elapsed in sorted(last.items()):
        if step > points[-1][0] and elapsed > points[-1][1]:
            points.append((step, elapsed))
    if len(points) < 4:
        return []
    n = min(windows + 1, len(points) - 1)
    bounds = sorted({round(i * (len(points) - 1) / n) for i in range(n + 1)})
    return [
        (points[b][0] - points[a][0]) * tokens_per_step / (points[b][1] - points[a][1])
        for a, b in itertools.pairwise(bounds[1:])
    ]


def check_training(record: dict[str, Any], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The flags of a training run's time (figure ``training``): ``window_spread`` over its stretches
    and ``host_busy`` / ``cpu_steal`` over the load samples of its log (:func:`host_flags`)."""
    from harness.core.host_load import summary

    rates = training_windows(rows, record["tokens"] / record["steps"])
    flags = window_spread({"tokens_per_s_windows": rates}, "training")
    for f in flags:
        f["reason"] = f["reason"].replace("timing windows", "stretches of training", 1)
    cores = record.get("provenance", {}).get("host", {}).get("cpu_count")
    return flags + host_flags(summary(rows, cores), "training")
