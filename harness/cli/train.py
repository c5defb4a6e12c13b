"""``harness train STUDY --run RUN_ID``: train one run of a study, resuming from its checkpoint;
under torchrun each process is one rank of the run.

    harness train tiny --run dense-d64_7e12_s0 [--stop-after N] [--restart]
"""

from __future__ import annotations

import argparse
import sys

from harness.cli.common import POSITIVE, data_ready, study_results
from harness.study.runs import find_run
from harness.study.spec import load_study
from harness.train.launch import under_plain_torchrun
from models.config import ConfigError

HELP = "train one run of a study (resumes from its checkpoint)"
STUDY = True


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="run id, as harness plan lists them")
    p.add_argument("--threads", type=POSITIVE, default=None, help="torch CPU threads")
    p.add_argument(
        "--stop-after",
        type=POSITIVE,
        default=None,
        help="stop after this step, leaving a checkpoint: exit code 3 "
        "(python -m harness.launch passes it on from torchrun's ranks)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    resume = p.add_mutually_exclusive_group()
    resume.add_argument("--restart", action="store_true", help="discard the run's checkpoints and start over")
    resume.add_argument(
        "--from-previous", action="store_true", help="resume from checkpoint.prev.pt (when checkpoint.pt is damaged)"
    )
    resume.add_argument(
        "--restart-if-changed",
        action="store_true",
        help="start over if the run's checkpoint or record is of another configuration, else resume",
    )


def _layout(study, run):
    """This process's place in the run: torchrun's environment (one process without it), with
    the study's expert-parallel degree for an MoE where the world size allows it. Every rank
    checks the layout before the process group starts, so each refuses one that cannot work
    with the same line and exit code."""
    import os

    from harness.train.loop import pick_device
    from harness.train.parallel import check_world, from_env

    layout = from_env()
    expert = study.parallel.expert if run.model.moe is not None else 1
    if layout.world != study.parallel.data and layout.main:
        print(
            f"harness train: {layout.world} process(es) where the study's parallel.data is {study.parallel.data}: "
            "the run's numbers are the same up to floating-point sums, only its speed differs",
            file=sys.stderr,
        )
    batch = run.recipe.batch_size
    if batch % layout.world:
        fits = ", ".join(str(n) for n in range(1, batch + 1) if batch % n == 0)
        raise ConfigError(
            "--nproc-per-node",
            f"{layout.world} processes cannot split {run.run_id}'s batch of {batch} evenly; "
            f"start a number that divides it ({fits})",
            "torchrun",
        )
    if layout.distributed:  # the ranks torchrun started on this host, one device each
        here = int(os.environ.get("LOCAL_WORLD_SIZE", layout.world))
        check_world(here, pick_device(study).type, "--nproc-per-node", "torchrun", "start fewer processes per host")
    return from_env(expert if layout.world % expert == 0 else 1)


def run(args: argparse.Namespace) -> int:
    from harness.train.loop import NonFiniteLoss, Stopped
    from harness.train.run import AlreadyTrained, train

    study = load_study(args.study)
    run = find_run(study, args.run)
    results = study_results(args, study)
    data_dir = data_ready(results, study, verify=False)  # the trainer verifies the shards
    resume = (
        "restart"
        if args.restart
        else "previous"
        if args.from_previous
        else "changed"
        if args.restart_if_changed
        else "auto"
    )
    try:
        record = train(
            run,
            study,
            data_dir,
            results / "runs" / run.run_id,
            threads=args.threads,
            stop_after=args.stop_after,
            progress=not args.quiet,
            resume=resume,
            layout=(layout := _layout(study, run)),
        )
    except AlreadyTrained as done:
        r = done.record
        ckpt = results / "runs" / run.run_id / "checkpoint.pt"
        kept = "" if ckpt.is_file() else f"; its {ckpt.name} is gone (measure, evaluate and export need it)"
        if layout.main:
            print(
                f"{run.run_id}: nothing to do, already trained with this configuration and data "
                f"(val loss {r['final_val_loss']:.4f}){kept}; `--restart` trains it again"
            )
        return 0
    except Stopped as e:
        if layout.main:
            print(f"harness train: {e}{under_plain_torchrun(3)}", file=sys.stderr)
        return 3
    except NonFiniteLoss as e:
        print(f"harness train: error: {e}", file=sys.stderr)
        return 1
    if not layout.main:
        return 0
    print(
        f"{record['run_id']}: val loss {record['final_val_loss']:.4f}, {record['tokens']:,} tokens, "
        f"{record['train_seconds']:.1f} s, FLOPs spent / budget {record['flops_spent_over_budget']:.4f}"
    )
    return 0
