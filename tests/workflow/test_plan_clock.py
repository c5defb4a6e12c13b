"""``harness plan`` against the clock: the tiny study and a small custom one (two runs at 1e12
FLOPs on a 200 KB corpus, ``test_plan_bounds.small_study``) are planned, then run through the
whole workflow, and each stage's time as Snakemake's benchmark files record it (the sum over its
jobs) must be within 2x of the plan's estimate (the sum of the same jobs' estimates).

A wall-clock time is fair only on a host that gave the job its cores: the host's load is sampled
all along (``harness.core.host_load``), and a stage outside 2x is excused, as an expected
failure that says so, only where the load over its jobs (or over the plan's probes, which every
later estimate is counted from) says the host was busy, by the rule the probes are judged by
(``harness.workflow.probe.busy``). Anywhere else it fails.

The tiny half trains the tiny study, which CI trains anyway: it runs where ``CLOCK_IN`` names a
checkout with no ``results/tiny`` yet (``make clock-check``, which CI runs just before ``make
study STUDY=tiny``; that then finds the study done), and is skipped, saying so, elsewhere.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import ROOT
from test_plan_bounds import small_study

from harness.core import host_load
from harness.workflow import probe
from harness.workflow.plan import make_plan, plan_stages
from harness.workflow.stages import recorded_seconds

pytestmark = pytest.mark.slow

RATIO = 2.0
"""A stage's recorded time may be this many times its estimate, or this many times less."""
SAMPLE_S = 2.0
"""Seconds between load samples."""
CLOCK_IN = "MOE_HARNESS_CLOCK_IN"
"""The checkout in which the tiny half runs the tiny study (``make clock-check``)."""


class Sampler:
    """The host's load every :data:`SAMPLE_S` seconds, with the time of each sample."""

    def __init__(self):
        self.rows: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.rows.append(host_load.sample() | {"t": time.time()})
            self._stop.wait(SAMPLE_S)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def busy(self, start: float, end: float) -> str | None:
        """Why the host was busy from ``start`` to ``end`` (None: it was not, or it is not known),
        judged with the job's own threads inside the load."""
        rows = [r for r in self.rows if start - SAMPLE_S <= r["t"] <= end + SAMPLE_S]
        s = host_load.summary(rows, os.cpu_count())
        if s is None:
            return None
        return probe.busy(s["load_1m_median"], s["steal_fraction"], 0, os.cpu_count() or 1)


def _jobs(results: Path, stage: str, names: list[str]) -> list[tuple[str, float, float]]:
    """(job, recorded seconds, end time) of each of ``names``'s jobs of ``stage``."""
    out = []
    for name in names:
        tsv = results / "benchmarks" / (f"{stage}/{name}.tsv" if stage != name else f"{stage}.tsv")
        seconds = recorded_seconds(tsv)
        assert seconds is not None, f"{tsv} was not written"
        out.append((name, seconds, tsv.stat().st_mtime))
    return out


def _plan(study: str, results: Path):
    args = argparse.Namespace(study=study, results=str(results), json=False, device=None, gpu="H100", gpus=None)
    args.__dict__.update(mfu=0.4, reprobe=False, probes=None)
    p = make_plan(args)
    return p, plan_stages(p, args)


@pytest.mark.parametrize("which", ["tiny", "mini"])
def test_each_stage_takes_the_time_the_plan_gave_it(which, tmp_path):
    if which == "tiny":
        if not os.environ.get(CLOCK_IN):
            pytest.skip(f"the tiny study's clock is checked by `make clock-check` ({CLOCK_IN} unset), which CI runs")
        study, work = "tiny", Path(os.environ[CLOCK_IN])
        assert not (work / "results" / "tiny").exists(), f"{work}/results/tiny exists: the check needs a fresh study"
    else:
        study, work = str(small_study(tmp_path / "study")), tmp_path / "work"
        work.mkdir()
    with Sampler() as sampler:
        plan, stages = _plan(study, work / "results")
        assert all(s.jobs_left == s.jobs for s in stages), "a fresh study: every job is to run"
        probes = [u.probe for u in plan.prober.used.values()]
        cmd = [sys.executable, "-m", "snakemake", "--cores", "2", "-s", str(ROOT / "Snakefile")]
        cmd += ["--directory", str(work), "--config", f"study={study}"]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, cwd=work)
        assert out.returncode == 0, out.stderr[-4000:]
    results = work / "results" / plan.study.name
    planned_busy = next((p.busy() for p in probes if p.busy()), None)
    failures, excused, lines = [], [], []
    for stage in stages:
        names = [name for name, _ in stage.each]
        jobs = _jobs(results, stage.name, names)
        estimate = sum(seconds for _, seconds in stage.each)
        recorded = sum(seconds for _, seconds, _ in jobs)
        busy = next((f"run on {why}" for _, s, end in jobs if (why := sampler.busy(end - s, end))), None)
        if stage.name not in ("data", "tasks", "microbench", "report"):  # counted from the probes
            busy = busy or (planned_busy and f"estimated from probes taken on {planned_busy}")
        line = f"{stage.name}: recorded {recorded:.1f} s, estimated {estimate:.1f} s" + (f" ({busy})" if busy else "")
        lines.append(line)
        if not estimate / RATIO <= recorded <= estimate * RATIO:
            (excused if busy else failures).append(line)
    print(f"{which}:\n  " + "\n  ".join(lines))
    assert not failures, "outside 2x on a quiet host:\n" + "\n".join(failures)
    if excused:
        loads = [r["host_load_1m"] for r in sampler.rows if "host_load_1m" in r]
        median = statistics.median(loads) if loads else float("nan")
        pytest.xfail(
            f"outside 2x only where the host was measured busy (median load {median:.2f} on "
            f"{os.cpu_count()} cores over the run): " + "; ".join(excused)
        )
