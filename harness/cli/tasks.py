"""``harness tasks STUDY``: write the offline lm-eval tasks built from the prepared held-out split.

harness tasks tiny [--force]
"""

from __future__ import annotations

import argparse
import sys

from harness.cli.common import data_ready, study_results, up_to_date
from harness.study.spec import load_study

HELP = "write the offline lm-eval tasks built from the held-out split"
STUDY = True


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true", help="write the tasks again even when they are up to date")


def run(args: argparse.Namespace) -> int:
    from harness.data.tasks import write_tasks

    study = load_study(args.study)
    data_dir = data_ready(study_results(args, study), study)
    if up_to_date(data_dir / "tasks" / "tasks.json", [data_dir / "data.json"], args):
        return 0
    try:
        meta = write_tasks(data_dir, study.eval, study.recipe.seq_len, made_by=f"harness data {study.path}")
    except ValueError as e:
        print(f"harness tasks: error: {e}", file=sys.stderr)
        return 1
    ppl, mc = meta["tasks"]["heldout_ppl"], meta["tasks"]["heldout_code_mc"]
    print(
        f"{data_dir / 'tasks'}: heldout_ppl {ppl['documents']} documents ({ppl['bytes']:,} bytes), "
        f"heldout_code_mc {mc['questions']} questions x {mc['choices']} choices, from the {meta['split']} split"
    )
    return 0
