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
- ``training_disagrees``: the measured training tokens/s differs from the training run's own over
  the whole run (record.json ``tokens_per_s``, per process) by more than :data:`AGREEMENT_LIMIT`.
  ``harness measure`` times the run's own training step with its settings, so the two agree up to
  noise; the flag's sentence says why they do not: the settings that differ (threads, dtype,
  compile, batch, sequence length, processes, what the heap does with freed memory), or, where none
  does, a different load on the host.
- ``speed_not_monotone`` (across runs, :func:`check_measures`): a larger dense model (more
  training FLOPs per token) measured faster than a smaller one at equal settings (device, dtype,
  compile, threads, batch size and sequence length) by more than the noise. A measurement's noise
  is the interquartile range of its window rates: the larger model is flagged when its lower
  quartile lies above the smaller one's upper quartile, so that at least three quarters of its
  windows ran faster than three quarters of the smaller model's. More work per token at the same
  settings cannot take less time, unless the larger model's shapes suit the kernels better (on a
  CPU, a width a multiple of 16) or the smaller one was disturbed. Where the two training runs
  (record.json, equal settings) ran in the same order and the measured ratio of the two speeds is
  at most :data:`AGREEMENT_LIMIT` above theirs, it is the former, and nothing is flagged;
  otherwise the order is not to be read as the models' cost, and the larger model's figure, the
  one that breaks it, carries the flag.

The training runs' own time (``train_seconds``, their tokens/s) is judged by the same rules
(:func:`check_training`): ``window_spread`` over :data:`TRAINING_WINDOWS` stretches of the run,
read from its metrics.jsonl (steps and training seconds of each logged row), and ``host_busy`` /
``cpu_steal`` from the load samples training logs with each row.
"""

from __future__ import annotations

import itertools
import statistics
from collections import defaultdict
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

AGREEMENT_LIMIT = 0.15
"""Relative difference between ``harness measure``'s training tokens/s (median window) and the
training run's own over the whole run above which the two disagree. The run's own includes its
warm-up (the tiny reference's dense-d64 ran its first tenth 27% slower than the rest) and whatever
else ran on the host over minutes; the measurement's windows take seconds. On a 2-core host whose
other load stayed under a core the two agreed within 10% (tests/measure/test_training_speed.py);
beyond 15% they measured different things, or under different loads."""

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
    "training_disagrees",
    "speed_not_monotone",
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


def check_measure(result: dict[str, Any], trained: dict[str, Any] | None = None) -> dict[str, list[dict[str, Any]]]:
    """Every rule on one measure.json result: figure -> its own flags (empty lists omitted).
    ``trained``: the training run's figures (:func:`training_run`), where the result does not hold
    them (``training_run``, written by ``harness measure`` since it compares the two)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for figure in TIMED:
        if isinstance(result.get(figure), dict):
            out[figure] = window_spread(result[figure], figure)
    if isinstance(result.get("train"), dict):  # the host's load at the start and the end of the measurement
        out["train"] += host_flags(result.get("host_load"), "train")
        out["train"] += training_disagrees(result, result.get("training_run") or trained)
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


def training_run(record: dict[str, Any]) -> dict[str, Any]:
    """A training run's own speed over the whole run (record.json) and the settings it trained
    with: what ``training_disagrees`` compares a measurement with."""
    precision, recipe = record.get("precision") or {}, record.get("recipe") or {}
    return {
        "run_id": record.get("run_id"),
        "tokens_per_s": record.get("tokens_per_s"),
        "dtype": precision.get("dtype"),
        "compile": precision.get("compile"),
        "threads": precision.get("threads"),
        "batch_size": recipe.get("batch_size"),
        "seq_len": recipe.get("seq_len"),
        "world_size": (record.get("parallel") or {}).get("world_size", 1),
        "heap": _heap(record),
    }


def _measured_settings(result: dict[str, Any]) -> dict[str, Any]:
    """The settings of a measure.json's training figure, named as :func:`training_run` names them."""
    precision, settings = result.get("precision") or {}, result.get("settings") or {}
    return {
        "dtype": precision.get("dtype", str(result.get("dtype", "")).removeprefix("torch.") or None),
        "compile": precision.get("compile"),
        "threads": precision.get("threads"),
        "batch_size": settings.get("batch_size"),
        "seq_len": settings.get("seq_len"),
        "world_size": 1,
        "heap": _heap(result),
    }


def _heap(result: dict[str, Any]) -> str | None:
    """What the process's heap did with freed memory (harness.core.cpu_heap), where it says."""
    return ((result.get("provenance") or {}).get("host") or {}).get("cpu_heap")


def training_disagrees(result: dict[str, Any], trained: dict[str, Any] | None) -> list[dict[str, Any]]:
    """``training_disagrees`` on a measure.json result against its training run's figures."""
    measured = (result.get("train") or {}).get("tokens_per_s_median")
    if not trained or not trained.get("tokens_per_s") or not measured:
        return []
    per_process = trained["tokens_per_s"] / (trained.get("world_size") or 1)
    ratio = measured / per_process
    if abs(ratio - 1) <= AGREEMENT_LIMIT:
        return []
    mine = _measured_settings(result)
    differs = [
        f"{name.replace('_', ' ')} {mine[name]} (the run: {trained[name]})"
        for name in ("threads", "dtype", "compile", "batch_size", "seq_len", "world_size", "heap")
        if mine[name] is not None and trained.get(name) is not None and mine[name] != trained[name]
    ]
    why = (
        f"it was measured with {', '.join(differs)}"
        if differs
        else "both ran the run's settings, so the host's load differed: other jobs shared the cores while the run "
        "trained or while it was measured"
    )
    reason = (
        f"not as trained: {_number(measured)} tokens/s measured against {_number(per_process)} over the training "
        f"run (x{ratio:.2f}; at most {AGREEMENT_LIMIT:.0%} apart expected): {why}"
    )
    values = {"measured": measured, "training": per_process, "ratio": ratio, "limit": AGREEMENT_LIMIT}
    return [_flag("training_disagrees", "train", reason, **values, differs=differs)]


def _quartiles(rates: list[float]) -> tuple[float, float]:
    q1, _, q3 = statistics.quantiles(rates, n=4)
    return q1, q3


def _dense(result: dict[str, Any]) -> bool:
    """A measure.json of a dense model (written before ``arm`` was: one without forced-balanced routing)."""
    return result.get("arm", "moe" if "train_forced_balanced" in result else "dense") == "dense"


def _training_ratio(a: dict[str, Any] | None, b: dict[str, Any] | None) -> float | None:
    """Training run ``a``'s tokens/s over ``b``'s (:func:`training_run`) where both trained at the
    same settings, else None."""
    if not a or not b or not a.get("tokens_per_s") or not b.get("tokens_per_s"):
        return None
    same = all(a[k] == b[k] for k in a if k not in ("run_id", "tokens_per_s"))
    return a["tokens_per_s"] / b["tokens_per_s"] if same else None


def _explained(measured: float, trained: float | None) -> bool:
    """A measured speed ratio (larger model over smaller) that the two training runs show too: the
    larger one trained faster as well, by as much within :data:`AGREEMENT_LIMIT`."""
    return trained is not None and trained > 1 and measured <= trained * (1 + AGREEMENT_LIMIT)


def speed_not_monotone(
    measures: dict[str, dict[str, Any]], trained: dict[str, dict[str, Any]] | None = None
) -> dict[str, list[dict[str, Any]]]:
    """``speed_not_monotone`` across the dense runs of ``measures`` (run id -> measure.json): run id ->
    its flag on ``train``, naming every smaller model it outran (the rule's noise: the module docstring).
    ``trained``: run id -> its training run's figures (:func:`training_run`); an order the two
    training runs show too, by as much (:func:`_explained`), is the models' (their shapes on this
    device's kernels), not the measurement's, and is not flagged."""
    trained = trained or {}
    groups: dict[tuple, list[tuple[float, str, list[float]]]] = defaultdict(list)
    for run, m in measures.items():
        rates = [r for r in (m.get("train") or {}).get("tokens_per_s_windows", []) if r]
        fpt = (((m.get("mfu") or {}).get("conventions") or {}).get("detailed") or {}).get("flops_per_token")
        if _dense(m) and len(rates) >= 2 and fpt:
            key = (m.get("device_name"), *_measured_settings(m).values())
            groups[key].append((fpt, run, rates))
    out: dict[str, list[dict[str, Any]]] = {}
    for members in groups.values():
        for fpt, run, rates in members:
            low, median = _quartiles(rates)[0], statistics.median(rates)
            beaten = sorted(
                (other_fpt, other, _quartiles(other_rates)[1])
                for other_fpt, other, other_rates in members
                if other_fpt < fpt
                and low > _quartiles(other_rates)[1]
                and not _explained(
                    median / statistics.median(other_rates), _training_ratio(trained.get(run), trained.get(other))
                )
            )
            if not beaten:
                continue
            names = " and ".join(f"`{other}`'s ({_number(q3)})" for _, other, q3 in beaten)
            reason = (
                f"implausible: a larger dense model (x{fpt / beaten[-1][0]:.2f} the FLOPs per token or more) trained "
                f"faster at the same settings: the lower quartile of its windows, {_number(low)} tokens/s, lies above "
                f"the upper quartile of {names}; more work per token does not take less time unless its shapes suit "
                "the kernels better (its training run would then be as much faster) or the smaller models were "
                "disturbed"
            )
            values = {"lower_quartile": low, "flops_per_token": fpt, "smaller": [other for _, other, _ in beaten]}
            out[run] = [_flag("speed_not_monotone", "train", reason, **values)]
    return out


def check_measures(
    measures: dict[str, dict[str, Any]], records: list[dict[str, Any]] | tuple = ()
) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """Every rule on a study's measure.json results (run id -> result): run id -> figure -> flags.
    :func:`check_measure` on each (against its training run's figures from ``records`` where the
    result does not hold them and the record states its precision), and ``speed_not_monotone``
    across them (an order the training runs show too is not flagged)."""
    # A record that does not state the settings it trained with cannot say why the two would differ.
    trained = {r["run_id"]: training_run(r) for r in records if r.get("precision")}
    out = {run: check_measure(m, trained.get(run)) for run, m in measures.items()}
    for run, flags in speed_not_monotone(measures, trained).items():
        out[run].setdefault("train", []).extend(flags)
    return out


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
