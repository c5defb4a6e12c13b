"""How busy the host was while a figure was timed, and when: load average and CPU steal, sampled
cheaply, and the time a record states.

    row |= host_load.sample()          # each logged training step (metrics.jsonl)
    host_load.summary(rows, cpu_count) # what the samples say, for the plausibility rules
    host_load.taken_at(record)         # '2026-12-03 01:23' (UTC), from provenance.time_utc

A wall-clock figure is fair only when the process had its cores. Two readings say when it did
not, both from the kernel (proc(5)): the 1-minute load average (``/proc/loadavg``, runnable and
uninterruptible threads, the process's own included) above the number of cores means threads
queued for a core; the ``steal`` column of ``/proc/stat`` counts time a hypervisor gave this
virtual machine's CPUs to another guest. Where a reading is not available (no /proc, as on
macOS) it is left out of the sample and the rule that needs it does not apply.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import statistics
from pathlib import Path
from typing import Any

PROC_STAT = Path("/proc/stat")


def cpu_ticks(stat: Path = PROC_STAT) -> list[int] | None:
    """[all ticks, steal ticks] of the first ``cpu`` line of /proc/stat, or None."""
    try:
        fields = stat.read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return None
    if not fields or fields[0] != "cpu" or len(fields) < 9:
        return None
    ticks = [int(x) for x in fields[1:]]
    # guest and guest_nice (fields 9 and 10) are already counted in user and nice
    return [sum(ticks[:8]), ticks[7]]


def sample(stat: Path = PROC_STAT) -> dict[str, Any]:
    """``host_load_1m`` and ``host_cpu_ticks`` ([all, steal]) now, each where available."""
    out: dict[str, Any] = {}
    with contextlib.suppress(OSError, AttributeError):  # no load average on this system
        out["host_load_1m"] = os.getloadavg()[0]
    if (ticks := cpu_ticks(stat)) is not None:
        out["host_cpu_ticks"] = ticks
    return out


def summary(rows: list[dict[str, Any]], cpu_count: int | None) -> dict[str, Any] | None:
    """The samples of ``rows`` (training log rows or measure samples) in one dict: the median
    and largest load average, the cores, and the fraction of CPU time stolen between the first
    and the last sample. None when no row holds a sample (a log written before they were)."""
    loads = [r["host_load_1m"] for r in rows if isinstance(r.get("host_load_1m"), (int, float))]
    ticks = [r["host_cpu_ticks"] for r in rows if isinstance(r.get("host_cpu_ticks"), list)]
    if not loads and not ticks:
        return None
    steal = None
    if len(ticks) >= 2 and ticks[-1][0] > ticks[0][0]:
        steal = (ticks[-1][1] - ticks[0][1]) / (ticks[-1][0] - ticks[0][0])
    return {
        "samples": max(len(loads), len(ticks)),
        "load_1m_median": statistics.median(loads) if loads else None,
        "load_1m_max": max(loads) if loads else None,
        "cpu_count": cpu_count,
        "steal_fraction": steal,
    }


def utc_now() -> str:
    """When a figure was taken, as records state it: ISO 8601 in UTC to the second."""
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def taken_at(doc: dict[str, Any] | None) -> str:
    """When a record or measure.json was written ('2026-12-03 01:23' UTC), from its provenance;
    'not recorded' for one written before records said."""
    stamp = _stamp(doc)
    return stamp[:16].replace("T", " ") if stamp is not None else "not recorded"


def taken_utc(doc: dict[str, Any] | None) -> datetime.datetime | None:
    """When a record or measure.json was written, as a time (None where it does not say)."""
    stamp = _stamp(doc)
    try:
        return datetime.datetime.fromisoformat(stamp) if stamp is not None else None
    except ValueError:
        return None


def _stamp(doc: dict[str, Any] | None) -> str | None:
    stamp = ((doc or {}).get("provenance") or {}).get("time_utc")
    return stamp if isinstance(stamp, str) else None
