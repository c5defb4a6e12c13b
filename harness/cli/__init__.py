"""The harness command: one verb per pipeline step, each runnable by hand.

    harness count models/configs/moe-s-e8k2.yaml [--json] [--seq-len N]
    harness match models/configs/dense-s.yaml --experts 8 --top-k 2 [--moe KEY=VALUE ...] [--out FILE]
    harness plan | forecast | data | tasks | train | measure | evaluate | routing | export | sample | report STUDY [...]
    harness --version

Every expected failure (a bad config, study or flag, a missing earlier step, a damaged file, a
full disk, a run too large for the machine) is one line, "harness VERB: error: ...", and exit
code 2; anything else is a defect and prints its traceback with a request to report it. The
first line of this docstring and EPILOG are what --help shows, so they stay plain text.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback

from harness.cli.common import Version
from harness.core.errors import HarnessError, os_failure
from harness.train import devices, run_lock
from harness.train.launch import under_plain_torchrun
from models.config import ConfigError

VERBS = ("count", "match", "plan", "forecast", "data", "tasks", "train", "measure", "evaluate", "routing", "export")
VERBS += ("sample", "report")
"""The verbs in pipeline order, as --help lists them."""
GPU_VERBS = ("train", "measure", "evaluate", "routing")
"""The verbs that run on a GPU when the study does: each takes its own device (harness.train.devices)."""
EPILOG = """\
The steps in pipeline order: count and match (model configs), then per study plan, data,
tasks, train, measure, evaluate, routing, export, sample (a run's text) and report.
snakemake runs a whole study; each step runs alone too, and "harness VERB --help" says what
it takes. An expected failure is one line, "harness VERB: error: ...", with exit code 2."""


class Parser(argparse.ArgumentParser):
    """argparse's parser, whose refusal of a flag says what plain torchrun does to its exit code."""

    def error(self, message: str):
        super().error(message + under_plain_torchrun(2))


def build_parser() -> argparse.ArgumentParser:
    """The parser of the harness command: each verb's subcommand comes from its module, harness/cli/VERB.py, which
    declares HELP (the verb's line in --help), STUDY (whether it takes a study and --results),
    add_arguments(parser) and run(args), the verb's exit code."""
    parser = Parser(
        prog="harness",
        description=__doc__.splitlines()[0],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action=Version, help="print the version (and commit, in a checkout) and exit")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB", title="verbs, in pipeline order")
    for name in VERBS:
        verb = importlib.import_module(f"harness.cli.{name}")
        p = sub.add_parser(name, help=verb.HELP, description=verb.HELP[0].upper() + verb.HELP[1:] + ".")
        p.set_defaults(func=verb.run)
        if verb.STUDY:
            p.add_argument("study", help="a study name in workflows/studies/ or a path to a study YAML")
            p.add_argument("--results", default="results", help="results root (default: results)")
        verb.add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        # A GPU job of the workflow (MOE_HARNESS_GPUS) gets devices of its own, before CUDA starts.
        with devices.pinned(devices.requested() if args.verb in GPU_VERBS else 0), run_lock.released():
            return args.func(args)
    except (ConfigError, HarnessError) as e:
        message = " ".join(str(e).split())  # one line, whatever a library put in the message
        print(f"harness {args.verb}: error: {message}{under_plain_torchrun(2)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"harness {args.verb}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        # Read-only, no permission, no space, a file where a folder belongs: the OS's refusal,
        # or a library's error that carries its text, is one line too.
        if (failure := os_failure(e)) is not None:
            message = " ".join(str(failure).split())
            print(f"harness {args.verb}: error: {message}{under_plain_torchrun(2)}", file=sys.stderr)
            return 2
        traceback.print_exc()
        print(
            f"harness {args.verb}: internal error: this is a defect in moe-harness, not in your input; "
            "please report it with the command line and the traceback above",
            file=sys.stderr,
        )
        return 70


if __name__ == "__main__":
    sys.exit(main())
