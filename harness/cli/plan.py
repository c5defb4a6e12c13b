"""``harness plan STUDY``: the run matrix of a study, what is done, how long the rest takes and the
disk it needs (the planning itself: ``harness.workflow.plan``).

    harness plan tiny [--json] [--device cpu|cuda] [--gpus N] [--mfu F] [--reprobe | --probes FILE]
"""

from __future__ import annotations

import argparse

from harness.cli.common import POSITIVE, fraction
from harness.workflow.plan import cmd_plan

HELP = "the run matrix of a study: sizes, tokens, what is done, time and disk"
STUDY = True


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="one object per run, as JSON")
    p.add_argument("--device", choices=["cpu", "cuda"], help="estimate for this device (default: the one the runs use)")
    p.add_argument("--gpu", default="H100", help="GPU to assume when none is visible (default H100)")
    p.add_argument(
        "--gpus",
        type=POSITIVE,
        default=None,
        help="GPUs the runs share, parallel.data of them per run (default: one run's, parallel.data)",
    )
    p.add_argument("--mfu", type=fraction, default=0.4, help="assumed model FLOP utilisation on a GPU (default 0.4)")
    probes = p.add_mutually_exclusive_group()
    probes.add_argument(
        "--reprobe", action="store_true", help="probe every model on this CPU again, whatever the cache holds"
    )
    probes.add_argument(
        "--probes",
        metavar="FILE",
        help="another host's probe cache, read as it is, nothing probed "
        "(results/reference/cpu/probes.json: the reference host's, which the README's times are)",
    )


def run(args: argparse.Namespace) -> int:
    """The plan is worked out and printed in harness.workflow.plan, beside its estimates and disk;
    then a warning where the study's models moved its primary contrast (harness.analysis.contrast)."""
    from harness.analysis.contrast import print_contrast_warning

    code = cmd_plan(args)
    print_contrast_warning(args.study, args.results)
    return code
