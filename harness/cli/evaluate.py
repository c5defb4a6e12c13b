"""``harness evaluate STUDY --run RUN_ID``: evaluate a trained run with lm-eval on the study's tasks,
written to the run's eval.json with the inputs its numbers depend on
(``harness.evaluate.lm_eval_run.eval_inputs``).

    harness evaluate tiny --run dense-d64_7e12_s0 [--device cuda]
    harness evaluate tiny2 --run dense-d64_7e12_s0 --reuse results/tiny/runs/dense-d64_7e12_s0/eval.json

``--reuse FILE`` takes another study's eval.json of this run (a reused run: harness.workflow.reuse)
when it records the same inputs, and evaluates as usual where anything differs.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from harness.cli.common import (
    POSITIVE,
    checkpoint_kept,
    cuda_visible,
    out_replaceable,
    set_threads,
    trained_run,
    up_to_date,
)
from harness.study.spec import LOCAL_TASKS, load_study

HELP = "evaluate a trained run with lm-eval on the study's tasks (eval.json)"
STUDY = True


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="run id")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: CUDA when visible")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--threads", type=POSITIVE, default=None, help="torch CPU threads")
    p.add_argument("--out", help="where to write eval.json (default: the run's folder)")
    p.add_argument("--download", action="store_true", help="let lm-eval fetch datasets (overrides eval.download)")
    p.add_argument(
        "--reuse",
        metavar="FILE",
        help="another study's eval.json of this run: taken when made of the same checkpoint, data, settings and "
        "device, else the run is evaluated",
    )
    p.add_argument(
        "--force", action="store_true", help="evaluate again even when eval.json is up to date; replace any --out file"
    )


def run(args: argparse.Namespace) -> int:
    out_replaceable(args, "tasks")
    study = load_study(args.study)
    if args.download:
        study = replace(study, eval=replace(study.eval, download=True))
    if not study.eval.download:
        from harness.evaluate.lm_eval_run import go_offline

        go_offline()  # before anything imports datasets or huggingface_hub
    from harness.core.io import read_json, write_json
    from harness.core.provenance import provenance
    from harness.evaluate.lm_eval_run import eval_device, eval_inputs, evaluate_run
    from harness.train.checkpoint import recorded_digest
    from harness.workflow.reuse import take_result

    run, results, run_dir = trained_run(args, study)
    cuda_visible(args.device)
    tasks_dir = results / "data" / "tasks"
    if up_to_date(run_dir / "eval.json", [run_dir / "record.json", tasks_dir / "tasks.json"], args):
        return 0
    checkpoint_kept(study, run, run_dir)
    tasks = None
    if any(t in LOCAL_TASKS for t in study.eval.tasks):
        tasks = read_json(tasks_dir / "tasks.json", made_by=f"harness tasks {study.path}")  # present and whole
    out = Path(args.out) if args.out else run_dir / "eval.json"
    fingerprint = read_json(run_dir / "record.json").get("data_fingerprint")
    device, dtype = eval_device(args.device, args.dtype)
    inputs = eval_inputs(study.eval, recorded_digest(run_dir / "checkpoint.pt"), fingerprint, tasks, device, dtype)
    if args.reuse and take_result(study, run, Path(args.reuse), inputs, out) is not None:
        print(f"{run.run_id}: evaluation reused from {args.reuse} (the same checkpoint, data, settings) -> {out}")
        return 0
    set_threads(args.threads)
    result = evaluate_run(run_dir, tasks_dir, study.eval, device=args.device, dtype=args.dtype)
    import torch

    write_json(
        out,
        {"run_id": run.run_id, "study": study.name}
        | result
        | {"inputs": inputs, "provenance": provenance(torch.device(result["device"]))},
    )
    for task, metrics in result["tasks"].items():
        shown = {k: v for k, v in metrics.items() if isinstance(v, float) and not k.endswith("_stderr")}
        print(f"{task}: " + ", ".join(f"{k} {v:.4f}" for k, v in shown.items()))
    for task, reason in result["not_run"].items():
        print(f"{task}: not run: {reason}", file=sys.stderr)
    print(f"-> {out}")
    return 0
