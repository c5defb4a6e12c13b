"""``harness routing STUDY --run RUN_ID``: what a trained MoE run's experts specialise in, token
category or topic, written to the run's routing.json with the inputs its numbers depend on.

    harness routing tiny --run moe-d64-e16k2_7e12_s0 [--max-tokens N]
    harness routing tiny2 --run moe-d64-e16k2_7e12_s0 --reuse results/tiny/runs/moe-d64-e16k2_7e12_s0/routing.json

``--reuse FILE`` takes another study's routing.json of this run (a reused run: harness.workflow.reuse)
when it records the same inputs, and analyses the run as usual where anything differs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from harness.cli.common import (
    POSITIVE,
    checkpoint_kept,
    cuda_visible,
    data_ready,
    out_replaceable,
    set_threads,
    trained_run,
    up_to_date,
)
from harness.study.spec import load_study

HELP = "what a trained MoE run's experts specialise in: token category or topic"
STUDY = True


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="run id")
    p.add_argument("--threads", type=POSITIVE, default=None, help="torch CPU threads")
    p.add_argument("--max-tokens", dest="max_tokens", type=POSITIVE, default=65_536, help="held-out tokens to route")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: CUDA when visible")
    p.add_argument("--out", help="where to write routing.json (default: the run's folder)")
    p.add_argument(
        "--reuse",
        metavar="FILE",
        help="another study's routing.json of this run: taken when made of the same checkpoint, data, settings "
        "and device, else the run is analysed",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="analyse again even when routing.json is up to date; replace any --out file",
    )


def run(args: argparse.Namespace) -> int:
    from harness.analysis.specialisation import routing_analysis
    from harness.core.io import read_json, write_json
    from harness.train.checkpoint import recorded_digest
    from harness.workflow.reuse import routing_inputs, take_result

    out_replaceable(args, "moe")
    study = load_study(args.study)
    run, results, run_dir = trained_run(args, study)
    cuda_visible(args.device)
    if up_to_date(run_dir / "routing.json", [run_dir / "record.json", results / "data" / "data.json"], args):
        return 0
    if run.model.moe is not None:  # a dense run has no routing: its weights are not read
        checkpoint_kept(study, run, run_dir)
    data_dir = data_ready(results, study)
    out = Path(args.out) if args.out else run_dir / "routing.json"
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    fingerprint = read_json(run_dir / "record.json").get("data_fingerprint")
    inputs = routing_inputs(recorded_digest(run_dir / "checkpoint.pt"), fingerprint, args.max_tokens, device)
    if args.reuse and take_result(study, run, Path(args.reuse), inputs, out) is not None:
        print(f"{run.run_id}: routing reused from {args.reuse} (the same checkpoint, data, settings) -> {out}")
        return 0
    set_threads(args.threads)
    result = routing_analysis(run_dir, data_dir, device=args.device, max_tokens=args.max_tokens)
    write_json(out, {"run_id": run.run_id, "study": study.name} | result | {"inputs": inputs})
    if not result["moe"]:
        print(f"{run.run_id}: dense, no routing to analyse -> {out}")
        return 0
    s = result["summary"]
    topic = "unknown" if s["topic_nmi_excess"] is None else f"{s['topic_nmi_excess']:.3f}"
    print(
        f"{run.run_id}: {result['tokens']:,} {result['split']} tokens, excess NMI expert~category "
        f"{s['category_nmi_excess']:.3f}, expert~topic {topic}: {s['specialises_by']} -> {out}"
    )
    return 0
