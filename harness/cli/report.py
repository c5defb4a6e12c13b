"""``harness report STUDY``: write the study report from its run records; ``--reference`` keeps the
finished study's small records as its reference and builds the report from that copy.

    harness report tiny [--print] [--reference] [--microbench FILE] [--bench DIR]

The micro-benchmark section shows the pipeline's MoE FFN benchmark (``--microbench``, which the
report rule passes) and, beside it, ``make bench``'s CPU training-step benchmark where one has
run and covers the study (``--bench``: RESULTS/benchmarks/cpu_training_step.json). The latter
compiles two models and is too slow for the pipeline's microbench stage; it is not an input of
the report rule either, so a newer one shows once the report is written again.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from harness.cli.common import study_results
from harness.core.errors import HarnessError
from harness.study.runs import plan
from harness.study.spec import load_study

HELP = "write the study report from the run records"
STUDY = True


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--print", action="store_true", help="print the report instead of its path")
    p.add_argument(
        "--reference",
        action="store_true",
        help="keep the finished study as its reference: copy each run's small records (no checkpoints or "
        "data) into RESULTS/reference/DEVICE/STUDY/ and write the report there from them; "
        "--results RESULTS/reference/DEVICE rebuilds it later",
    )
    p.add_argument(
        "--microbench",
        help="pytest-benchmark JSON to include (default: the study's results/<study>/microbench/moe_ffn.json, if any)",
    )
    p.add_argument(
        "--bench",
        help="make bench's results folder, whose training-step benchmark (cpu_training_step.json) is shown where "
        "it covers the study (default: RESULTS/benchmarks, if it holds one; 'none' leaves it out)",
    )


def run(args: argparse.Namespace) -> int:
    from harness.report.build import write_report

    study = load_study(args.study)
    results = study_results(args, study)
    if args.reference:
        results = _keep_reference(args, study, results)
    # The pipeline's micro-benchmark, as the report rule passes it, unless another is named.
    microbench = Path(args.microbench) if args.microbench else results / "microbench" / "moe_ffn.json"
    path = write_report(study, results, microbench if microbench.is_file() else None, _step_bench(args))
    if args.print:
        print(path.read_text())
    else:
        print(path)
    return 0


def _step_bench(args: argparse.Namespace) -> Path | None:
    """``make bench``'s training-step benchmark JSON, where there is one (``--bench``)."""
    from harness.report.tables import STEP_BENCH

    if args.bench == "none":
        return None
    path = Path(args.bench or Path(args.results) / "benchmarks") / STEP_BENCH
    if args.bench and not path.is_file():
        raise HarnessError(f"--bench {args.bench}: no {STEP_BENCH} there (`make bench` writes it)")
    return path if path.is_file() else None


def _keep_reference(args: argparse.Namespace, study, results: Path) -> Path:
    """--reference: copy the finished study's small records into
    <results root>/reference/<device class>/<study>/ and return that folder, where the report is
    then built from the copy alone."""
    from harness.analysis.reproduce import device_class, keep_reference, reference_folder, require_finished
    from harness.study.records import study_record

    run_ids = [run.run_id for run in plan(study)]
    require_finished(results, run_ids, study)
    cls = device_class(study_record(study, results / "runs" / run_ids[0] / "record.json"))
    dest = reference_folder(Path(args.results), study.name, cls)
    copied = keep_reference(results, run_ids, dest, study)
    if args.microbench:  # the named micro-benchmark becomes the reference's
        from harness.core.io import atomic_write

        (dest / "microbench").mkdir(parents=True, exist_ok=True)
        atomic_write(
            dest / "microbench" / "moe_ffn.json", lambda tmp: tmp.write_bytes(Path(args.microbench).read_bytes())
        )
        args.microbench = None
    print(f"# kept {len(copied)} records of {len(run_ids)} runs in {dest}", file=sys.stderr)
    return dest
