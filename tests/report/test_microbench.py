"""The report's micro-benchmark section: the pipeline's MoE FFN benchmark and, beside it, `make
bench`'s CPU training-step benchmark (results/benchmarks/cpu_training_step.json) where it covers
the study."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from harness.cli.report import _step_bench
from harness.core.errors import HarnessError
from harness.core.io import write_json
from harness.report.sections import StudyReport, _microbench
from harness.report.tables import STEP_BENCH, microbench_table, step_bench_table

ROOT = Path(__file__).resolve().parents[2]


def step_info(studies=("tiny", "cpu"), smoke: bool = False) -> dict:
    """A training-step case's extra_info, as tests/benchmarks/test_cpu_training_step.py records it."""
    return {
        "kind": "cpu_training_step",
        "case": f"{', '.join(studies)}: dense-d64 / moe-d64-e16k2",
        "studies": list(studies),
        "device": "cpu",
        "threads": 1,
        "chosen": {"dtype": "bfloat16", "autocast": True, "compile": True, "threads": 1},
        "speedup_dense": 1.71,
        "speedup_moe": 1.62,
        "moe_over_dense_chosen": 1.34,
        "goal_speedup": 1.5,
        "goal_moe_over_dense": 1.15,
        "meets_goal_speedup": True,
        "meets_goal_moe_over_dense": False,
        "smoke": smoke,
        "goals_asserted": not smoke,
    }


def write_step_bench(folder: Path, *infos: dict) -> Path:
    path = folder / STEP_BENCH
    write_json(
        path,
        {
            "machine_info": {"cpu": {"brand_raw": "AMD EPYC 7B13"}},
            "datetime": "2025-06-01T10:00:00",
            "benchmarks": [{"extra_info": i} for i in infos],
        },
    )
    return path


def test_the_step_table_holds_the_cases_that_cover_the_study(tmp_path):
    path = write_step_bench(tmp_path, step_info(), step_info(studies=("other",)))
    headers, rows = step_bench_table(path, "tiny")
    assert len(rows) == 1
    row = dict(zip(headers, rows[0], strict=True))
    assert row["studies: dense / MoE"] == "tiny, cpu: dense-d64 / moe-d64-e16k2"
    assert row["study path"] == "bfloat16 + compile, 1 thread(s)"
    assert (row["dense speed-up"], row["MoE speed-up"], row["MoE / dense step"]) == ("1.71", "1.62", "1.34")
    assert "speed-ups >= 1.5: met" in row["goals"] and "MoE / dense <= 1.15: not met" in row["goals"]
    assert row["CPU, run at"] == "AMD EPYC 7B13, 2025-06-01"
    assert step_bench_table(path, "full")[1] == []
    assert step_bench_table(None, "tiny")[1] == [] and step_bench_table(tmp_path / "none.json", "tiny")[1] == []
    smoke = write_step_bench(tmp_path / "smoke", step_info(smoke=True))
    assert "smoke run" in step_bench_table(smoke, "cpu")[1][0][6]
    assert row["where the MoE's extra time goes (torch.profiler)"] == "not profiled"


def test_the_step_table_names_where_the_moe_spends_its_extra_time(tmp_path):
    parts = ("expert GEMMs", "other GEMMs", "fused elementwise", "optimizer and clipping")
    dense = dict(zip(parts, (0.0, 28.0, 18.0, 3.0), strict=True))
    moe = dict(zip(parts, (26.0, 16.0, 24.0, 4.0), strict=True))
    path = write_step_bench(tmp_path, step_info() | {"profile_ms": {"dense": dense, "moe": moe}})
    headers, rows = step_bench_table(path, "cpu")
    extra = dict(zip(headers, rows[0], strict=True))["where the MoE's extra time goes (torch.profiler)"]
    # +21 ms in all: experts +26 (124%), elementwise +6 (29%), optimizer +1 (5%); GEMMs elsewhere -12
    assert extra == (
        "expert GEMMs +26.0 ms (124%), fused elementwise +6.0 ms (29%), optimizer and clipping +1.0 ms (5%) of +21.0 ms"
    )


def _report(tables: dict) -> SimpleNamespace:
    r = SimpleNamespace(tables=tables)
    r.table = lambda name: StudyReport.table(r, name)
    return r


def test_the_section_shows_the_step_benchmark_beside_the_ffn_one(tmp_path):
    ffn = ROOT / "results" / "reference" / "cpu" / "tiny" / "microbench" / "moe_ffn.json"
    step = write_step_bench(tmp_path, step_info())
    both = "\n".join(
        _microbench(_report({"microbench": microbench_table(ffn), "microbench_step": step_bench_table(step, "tiny")}))
    )
    assert both.startswith("## Micro-benchmarks")
    assert "cpu-float32-T4096" in both and "tiny, cpu: dense-d64 / moe-d64-e16k2" in both
    assert both.index("cpu-float32-T4096") < both.index("CPU training step")
    ffn_only = "\n".join(
        _microbench(_report({"microbench": microbench_table(ffn), "microbench_step": step_bench_table(None, "tiny")}))
    )
    assert ffn_only.startswith("## MoE FFN micro-benchmark") and "CPU training step" not in ffn_only
    step_only = _microbench(
        _report({"microbench": microbench_table(None), "microbench_step": step_bench_table(step, "cpu")})
    )
    assert "dense-d64 / moe-d64-e16k2" in "\n".join(step_only)
    assert (
        _microbench(_report({"microbench": microbench_table(None), "microbench_step": step_bench_table(step, "full")}))
        == []
    )


def test_report_reads_make_bench_results_from_the_results_root(tmp_path):
    args = argparse.Namespace(bench=None, results=str(tmp_path))
    assert _step_bench(args) is None
    path = write_step_bench(tmp_path / "benchmarks", step_info())
    assert _step_bench(args) == path
    assert _step_bench(argparse.Namespace(bench="none", results=str(tmp_path))) is None
    with pytest.raises(HarnessError, match="make bench"):
        _step_bench(argparse.Namespace(bench=str(tmp_path / "elsewhere"), results=str(tmp_path)))


@pytest.mark.slow
def test_the_tiny_reference_report_shows_the_step_row_when_make_bench_has_run(tmp_path):
    """The committed tiny reference rebuilt, with `make bench`'s step JSON in the results root: the
    micro-benchmark section holds the FFN rows and the step row, and tables/ the step table."""
    from harness.cli import main

    shutil.copytree(ROOT / "results" / "reference" / "cpu" / "tiny", tmp_path / "tiny")
    write_step_bench(tmp_path / "benchmarks", step_info())
    assert main(["report", "tiny", "--results", str(tmp_path)]) == 0
    md = (tmp_path / "tiny" / "report.md").read_text()
    section = md[md.index("## Micro-benchmarks") :]
    section = section[: section.index("\n## ", 1)]
    assert "cpu-float32-T4096" in section and "tiny, cpu: dense-d64 / moe-d64-e16k2" in section
    assert "dense-d64 / moe-d64-e16k2" in (tmp_path / "tiny" / "tables" / "microbench_step.csv").read_text()
