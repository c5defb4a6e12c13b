"""torchrun that exits as its ranks do: ``python -m harness.launch`` takes torchrun's arguments.

    python -m harness.launch --standalone --nproc-per-node 2 -m harness -- train tiny --run RUN

torchrun exits 1, with a ChildFailedError traceback, whenever a worker fails, whatever the
worker's own exit code: 2 for input harness refused, 3 for a run stopped by ``--stop-after``.
This runs torchrun's own launcher (``torch.distributed.run``) in this process and exits with the
code of the first rank that failed, its one line (``harness train: error: ...``, printed by the
rank itself) followed by one line saying which rank, in place of the traceback. The train rule
launches runs of several processes through it.
"""

from __future__ import annotations

import os
import signal
import sys

LAUNCHED = "MOE_HARNESS_LAUNCH"
"""Set for the ranks this launcher starts: a rank that finds torchrun's variables without it was
started by plain torchrun, whose exit code is 1 whatever the rank's."""
MEANING = {
    2: "refused to go on (its one line above says why)",
    3: "stopped where --stop-after said; run it again to resume",
}


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(sys.argv[1:] if argv is None else argv)
    os.environ[LAUNCHED] = "1"
    try:
        run(args)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        code = failure.exitcode
        if code < 0:  # killed by a signal: as a shell reports it
            name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else -code
            print(f"harness.launch: rank {rank} was killed by {name}; torchrun ended the others", file=sys.stderr)
            return 128 - code
        what = MEANING.get(code, f"exited with code {code} (its output above says why)")
        print(f"harness.launch: rank {rank} {what}; exit code {code}", file=sys.stderr)
        return code
    return 0


def under_plain_torchrun(code: int) -> str:
    """What a rank adds to its refusal or stop (exit ``code``) when plain torchrun started it:
    torchrun reports exit code 1 with a traceback, and the launcher would not."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or os.environ.get(LAUNCHED):
        return ""
    return (
        f" (torchrun prints its own traceback after this and exits 1 where this rank exits {code}: "
        "`python -m harness.launch`, with the same arguments, exits with the rank's code and no traceback)"
    )


if __name__ == "__main__":
    sys.exit(main())
