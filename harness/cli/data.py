"""``harness data STUDY``: read the study's corpus, train its tokenizer and write the token shards
under RESULTS/STUDY/data/ (nothing to do when they are already made from this corpus). A symbolic
link in the corpus is read as its target (harness.data.listing); one that leads nowhere is refused.

    harness data tiny [--force]
"""

from __future__ import annotations

import argparse

from harness.cli.common import study_results
from harness.study.spec import load_study

HELP = "read the corpus, train the tokenizer, write token shards"
STUDY = True


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true", help="write the data again even when it is unchanged")


def run(args: argparse.Namespace) -> int:
    from harness.data.prepare import prepare

    study = load_study(args.study)
    data_dir = study_results(args, study) / "data"
    meta = prepare(study, data_dir, force=args.force)
    if meta.get("unchanged"):
        print(f"{data_dir}: nothing to do, the data is already prepared from this corpus with these settings")
    for split, info in meta["splits"].items():
        print(f"{split}: {info['documents']} documents, {info['bytes']:,} bytes, {info['tokens']:,} tokens")
    print(f"fingerprint {meta['fingerprint']}")
    return 0
