"""Collects each benchmark's ratios and prints them as one table at the end of the run."""

from __future__ import annotations

import pytest
from tabulate import tabulate

ROWS = pytest.StashKey[list]()


def pytest_addoption(parser):
    parser.addoption(
        "--no-targets",
        action="store_true",
        help="record whether the speed targets were met without failing on them (pipeline runs)",
    )


@pytest.fixture
def report_row(request):
    return request.config.stash.setdefault(ROWS, []).append


def pytest_terminal_summary(terminalreporter, config):
    rows = config.stash.get(ROWS, [])
    steps = [r for r in rows if r.get("kind") == "cpu_training_step"]
    rows = [r for r in rows if r.get("kind") != "cpu_training_step"]
    if steps:
        _training_step_summary(terminalreporter, steps)
    if not rows:
        return
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
                f"{k.removeprefix('meets_target_')}: {'yes' if v else 'NO'}"
                for k, v in r.items()
                if k.startswith("meets_")
            ),
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
        "targets met",
    ]
    terminalreporter.section("MoE FFN forward+backward, median of per-round ratios")
    terminalreporter.write_line(tabulate(table, headers=headers, disable_numparse=True))


def _training_step_summary(terminalreporter, rows) -> None:
    table = [
        [
            r["case"],
            r["chosen"]["dtype"] + (" + compile" if r["chosen"]["compile"] else ""),
            f"{r['tokens_per_s']['dense_eager']:,.0f}",
            f"{r['tokens_per_s']['dense_chosen']:,.0f}",
            f"{r['tokens_per_s']['moe_eager']:,.0f}",
            f"{r['tokens_per_s']['moe_chosen']:,.0f}",
            f"{r['speedup_dense']:.2f}",
            f"{r['speedup_moe']:.2f}",
            f"{r['moe_over_dense_chosen']:.2f}",
            f"speed-up >= {r['goal_speedup']}: {'yes' if r['meets_goal_speedup'] else 'NO'}, "
            f"MoE/dense <= {r['goal_moe_over_dense']}: {'yes' if r['meets_goal_moe_over_dense'] else 'NO'}",
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
