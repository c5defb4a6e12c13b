"""``harness report STUDY``: write the study report from its run records; ``--reference`` keeps the
finished study's small records as its reference and builds the report from that copy.

    harness report tiny [--print] [--reference] [--microbench FILE]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from harness.cli.common import study_results
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


def run(args: argparse.Namespace) -> int:
    from harness.report.build import write_report

    study = load_study(args.study)
    results = study_results(args, study)
    if args.reference:
        results = _keep_reference(args, study, results)
    # The pipeline's micro-benchmark, as the report rule passes it, unless another is named.
    microbench = Path(args.microbench) if args.microbench else results / "microbench" / "moe_ffn.json"
    path = write_report(study, results, microbench if microbench.is_file() else None)
    if args.print:
        print(path.read_text())
    else:
        print(path)
    return 0


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
