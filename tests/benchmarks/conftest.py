"""The micro-benchmarks' modes and their tables.

Three ways to run them:

- ``make bench``: every benchmark at full length, each goal asserted (a goal not met fails it),
  one JSON per benchmark file in results/benchmarks/;
- ``make bench-smoke`` (``--smoke``, CI): each benchmark once with a few rounds, its goals
  recorded with whether they were met but not asserted: a benchmark that errors fails, one whose
  goal a few noisy rounds miss does not;
- ``--no-targets`` (the pipeline's microbench rule): full length, goals recorded, not asserted.

A benchmark records each goal as ``goal_<name>`` (or ``target_<name>``) beside
``meets_goal_<name>`` (``meets_target_<name>``) in its ``extra_info`` and ends with
``goals.finish(benchmark, report_row, info)``. The ratios each collects are printed as tables at the end of the run.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from tabulate import tabulate

from harness.core.cpu_heap import keep_freed_memory

ROWS = pytest.StashKey[list]()


def pytest_addoption(parser):
    parser.addoption(
        "--no-targets",
        action="store_true",
        help="record whether the goals were met without failing on them (pipeline runs)",
    )
    parser.addoption(
        "--smoke",
        action="store_true",
        help="a few rounds of each benchmark; goals recorded, not asserted (CI: make bench-smoke)",
    )


@dataclass(frozen=True)
class Goals:
    """How long a benchmark runs and whether its goals are asserted."""

    smoke: bool
    asserted: bool

    def rounds(self, full: int, smoke: int = 2) -> int:
        return smoke if self.smoke else full

    def finish(self, benchmark, report_row, info: dict) -> None:
        """Record ``info`` (with the mode) in the JSON and the tables; under ``make bench``, fail on
        every goal not met, all named at once. A goal whose verdict is None (undecided) is not met."""
        info["smoke"], info["goals_asserted"] = self.smoke, self.asserted
        benchmark.extra_info.update(info)
        report_row(info)
        missed = [k.removeprefix("meets_") for k, v in info.items() if k.startswith("meets_") and v is not True]
        if self.asserted:
            assert not missed, f"{info.get('case')}: goals not met: {', '.join(missed)}"


@pytest.fixture(scope="session", autouse=True)
def heap_as_training_keeps_it():
    """Every benchmark times the CPU as ``harness train`` runs it: a step's freed memory kept for
    the next (harness.core.cpu_heap), from the first benchmark on."""
    keep_freed_memory()


@pytest.fixture
def goals(request) -> Goals:
    smoke = request.config.getoption("--smoke")
    return Goals(smoke=smoke, asserted=not (smoke or request.config.getoption("--no-targets")))


@pytest.fixture
def report_row(request):
    return request.config.stash.setdefault(ROWS, []).append


def _met(value) -> str:
    return {True: "yes", False: "NO", None: "undecided"}[value]


def pytest_terminal_summary(terminalreporter, config):
    rows = config.stash.get(ROWS, [])
    if config.getoption("--smoke") and rows:
        terminalreporter.section("smoke run: a few rounds each, goals recorded and not asserted")
    steps = [r for r in rows if r.get("kind") == "cpu_training_step"]
    meters = [r for r in rows if r.get("kind") == "meter_overhead"]
    ffn = [r for r in rows if "ratio_moe_to_dense" in r]
    if ffn:
        _ffn_summary(terminalreporter, ffn)
    if steps:
        _training_step_summary(terminalreporter, steps)
    if meters:
        _meter_summary(terminalreporter, meters)


def _ffn_summary(terminalreporter, rows) -> None:
    table = [
        [
            r["case"],
            r["device"],
            f"{r['median_ms']['moe']:.1f}",
            f"{r['median_ms']['dense']:.1f}",
            f"{r['median_ms']['mixtral']:.1f}",
            f"{r['median_ms']['mixtral_grouped_mm']:.1f}",
            f"{r['ratio_moe_to_dense']:.3f}",
            f"{r['ratio_moe_to_mixtral']:.3f}",
            f"{r['ratio_moe_to_mixtral_grouped_mm']:.3f}",
            f"{r['ratio_mixtral_to_dense']:.3f}",
            ", ".join(
                f"{k.removeprefix('meets_target_')} <= {r['target_' + k.removeprefix('meets_target_')]}: {_met(v)}"
                for k, v in r.items()
                if k.startswith("meets_target_")
            )
            or "-",
        ]
        for r in rows
    ]
    headers = [
        "case",
        "device",
        "moe ms",
        "dense ms",
        "mixtral ms",
        "mixtral gmm ms",
        "moe/dense",
        "moe/mixtral",
        "moe/mixtral gmm",
        "mixtral/dense",
        "goals met",
    ]
    terminalreporter.section("MoE FFN forward+backward, median of per-round ratios")
    terminalreporter.write_line(tabulate(table, headers=headers, disable_numparse=True))


def _training_step_summary(terminalreporter, rows) -> None:
    table = [
        [
            r["case"],
            r["chosen"]["dtype"] + (" + compile" if r["chosen"]["compile"] else "") + f", {r['threads']} thr",
            f"{r['tokens_per_s']['dense_eager']:,.0f}",
            f"{r['tokens_per_s']['dense_chosen']:,.0f}",
            f"{r['tokens_per_s']['moe_eager']:,.0f}",
            f"{r['tokens_per_s']['moe_chosen']:,.0f}",
            f"{r['speedup_dense']:.2f}",
            f"{r['speedup_moe']:.2f}",
            f"{r['moe_over_dense_chosen']:.2f}",
            f"speed-up >= {r['goal_speedup']}: {_met(r['meets_goal_speedup'])}, "
            f"MoE/dense <= {r['goal_moe_over_dense']}: {_met(r['meets_goal_moe_over_dense'])}",
        ]
        for r in rows
    ]
    headers = [
        "models",
        "study path",
        "dense eager tok/s",
        "dense study tok/s",
        "MoE eager tok/s",
        "MoE study tok/s",
        "dense speed-up",
        "MoE speed-up",
        "MoE/dense step",
        "goals met",
    ]
    terminalreporter.section("CPU training step: the study's path against eager float32, median of per-round ratios")
    terminalreporter.write_line(tabulate(table, headers=headers, disable_numparse=True))
    for r in rows:
        if "profile_ms" in r:
            terminalreporter.write_line("")
            terminalreporter.write_line(f"{r['case']}: where a study-path step goes (torch.profiler)")
            terminalreporter.write_line(_profile_table(r["profile_ms"]))


def _profile_table(profile_ms: dict[str, dict[str, float]]) -> str:
    """Dense and MoE milliseconds a step by part, the MoE's extra time and its share of the gap."""
    dense, moe = profile_ms["dense"], profile_ms["moe"]
    gap = sum(moe.values()) - sum(dense.values())
    rows = [
        [
            part,
            f"{dense[part]:.1f}",
            f"{moe[part]:.1f}",
            f"{moe[part] - dense[part]:+.1f}",
            f"{(moe[part] - dense[part]) / gap:.0%}" if gap > 0 else "-",
        ]
        for part in dense
    ]
    rows.append(["total", f"{sum(dense.values()):.1f}", f"{sum(moe.values()):.1f}", f"{gap:+.1f}", ""])
    return tabulate(
        rows, headers=["part", "dense ms", "MoE ms", "MoE - dense", "share of the gap"], disable_numparse=True
    )


def _meter_summary(terminalreporter, rows) -> None:
    table = [
        [
            path,
            f"{p['overhead_fraction']:+.2%}",
            f"[{p['ci95'][0]:+.2%}, {p['ci95'][1]:+.2%}]",
            f"{p['own_fraction']:+.3%}",
            f"[{p['own_ci95'][0]:+.3%}, {p['own_ci95'][1]:+.3%}]",
            str(p["rounds"]),
            f"< {r['goal_overhead']:.0%}: {p['verdict']} (by {p['decided_by']})",
        ]
        for r in rows
        for path, p in r["paths"].items()
    ]
    headers = ["meter path", "end to end", "95% t interval", "own time", "95% t interval", "rounds", "goal"]
    terminalreporter.section("Energy meter overhead on a training step (means over rounds)")
    terminalreporter.write_line(tabulate(table, headers=headers, disable_numparse=True))
