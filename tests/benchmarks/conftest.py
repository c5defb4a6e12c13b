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
