"""``harness export STUDY --run RUN_ID``: write a trained run as a Hugging Face model directory.

harness export tiny --run dense-d64_7e12_s0 [--out DIR]

The folder holds the transformers class that computes what the run's model does (Llama, Qwen3,
Mixtral, Qwen3-MoE, OLMoE, Qwen2-MoE, or GLM-4.5 for sigmoid-bias routing:
harness.evaluate.export_families), its weights, the study's tokenizer (its model_max_length the
training context) and a README.md whose snippet continues a prompt as ``harness sample`` does. A
model no class computes exactly is refused in one line naming the field.

An --out that is a symbolic link is refused, naming the path to give instead (its target): the
export writes a folder of its own there and replaces no link. A link in a folder above --out is
followed (the export is written in its target), and no other: a link inside an earlier export is
the user's, so exporting into it again is refused, naming the link (harness.evaluate.export).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from harness.cli.common import trained_run, trained_state
from harness.core.errors import MissingStep
from harness.study.spec import load_study

HELP = "write a trained run as a Hugging Face model directory"
STUDY = True


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="run id")
    p.add_argument(
        "--out",
        help="output directory (default results/<study>/export/<run>); not a symbolic link (a link in a folder "
        "above it is followed), and if it exists, an earlier export holding no file or link of the user's",
    )


def run(args: argparse.Namespace) -> int:
    from harness.evaluate.export import NotExportable, check_destination, export, hf_family

    study = load_study(args.study)
    run, results, run_dir = trained_run(args, study)
    out = Path(args.out or results / "export" / run.run_id)
    tokenizer = results / "data" / "tokenizer.json"
    try:
        hf_family(run.model)  # a model with no faithful class is refused before anything is read
        if not tokenizer.is_file():
            raise MissingStep(tokenizer, f"harness data {study.path}")
        check_destination(out)  # before the checkpoint is read
        state = trained_state(study, run, run_dir)["model"]
        source = f"study {study.name}, run {run.run_id}"
        cls = export(run.model, state, tokenizer, out, source=source)
    except NotExportable as e:
        message = " ".join(str(e).split())  # one line
        print(f"harness export: error: {message}", file=sys.stderr)
        return 2
    print(f"{run.run_id} -> {out} ({cls})")
    return 0
