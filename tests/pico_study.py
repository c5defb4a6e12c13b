"""A prepared pico study on disk, as a user has it: data, one trained run (with a previous
checkpoint) and its tasks, made through the CLI. conftest.py's fixtures ``pristine`` (once per
module) and ``study`` (a private copy per test) build it."""

from __future__ import annotations

import contextlib
import io
import shutil
from pathlib import Path

import numpy as np
import torch
import yaml
from conftest import PICO_MODEL

from harness.cli import main

MODEL = PICO_MODEL
RUN = "dense-pico_6e9_s0"
RUNDIR = "results/pico/runs/" + RUN
STUDY, MODEL_FILE = "study.yaml", "model.yaml"


def study_dict(root: Path) -> dict:
    return {
        "name": "pico",
        "description": "a study folder for the CLI tests",
        "device": "cpu",
        "data": {
            "source": "files",
            "paths": [str(root / "corpus")],
            "validation_fraction": 0.1,
            "test_fraction": 0.2,
            "vocab_size": 512,
        },
        "models": [{"config": str(root / "model.yaml")}],
        "budgets": [6e9],
        "seeds": [0],
        "recipe": {
            "batch_size": 4,
            "seq_len": 32,
            "eval_every": 20,
            "eval_batches": 2,
            "checkpoint_every": 10,
            "min_steps": 20,
        },
        "eval": {"tasks": ["heldout_ppl"], "heldout_max_bytes": 30000, "mc_questions": 20, "batch_size": 8},
    }


def write_corpus(root: Path, names: int = 300, files: int = 80, lines: int = 30, longest: int = 7) -> None:
    """``files`` code-like files of ``lines`` lines in ``root``/corpus, each line 3 to ``longest`` - 1
    words drawn from keywords and ``names`` made-up identifiers (seed 0: the same bytes every time)."""
    rng = np.random.default_rng(0)
    letters = list("abcdefghijklmnopqrstuvwxyz_")
    made_up = ["".join(rng.choice(letters, size=rng.integers(2, 9))) for _ in range(names)]
    words = ["def", "return", "self", "(", ")", ":", "=", "if", "else", "for", "in", *made_up]
    (root / "corpus").mkdir(parents=True)
    width = len(str(files - 1))
    for i in range(files):
        text = [" ".join(rng.choice(words, size=rng.integers(3, longest))) for _ in range(lines)]
        (root / "corpus" / f"m{i:0{width}d}.py").write_text("\n".join(text) + "\n")


def cli(*argv: str) -> tuple[int, str]:
    """Exit code and stderr of ``harness argv``, run in this process."""
    code, _, err = cli_output(*argv)
    return code, err


def cli_output(*argv: str) -> tuple[int, str, str]:
    """Exit code, stdout and stderr of ``harness argv``, run in this process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code = main(list(argv))
        except SystemExit as e:  # argparse refusals
            code = e.code
    return code, out.getvalue(), err.getvalue()


def make_pristine(root: Path) -> Path:
    """A study folder with data, one trained run (finished: its checkpoint holds the weights alone) and its tasks."""
    write_corpus(root)
    (root / MODEL_FILE).write_text(yaml.safe_dump(MODEL))
    (root / STUDY).write_text(yaml.safe_dump(study_dict(root)))
    threads = torch.get_num_threads()
    for argv in (["data"], ["train", "--run", RUN, "--quiet", "--threads", "1"], ["tasks"]):
        code, err = cli(argv[0], str(root / STUDY), "--results", str(root / "results"), *argv[1:])
        assert code == 0, err
    torch.set_num_threads(threads)
    return root


def copy_study(pristine: Path, dest: Path) -> Path:
    """A private copy of the prepared study (timestamps kept), its paths rewritten to the copy."""
    shutil.copytree(pristine, dest, dirs_exist_ok=True)
    text = (dest / STUDY).read_text().replace(str(pristine), str(dest))
    (dest / STUDY).write_text(text)
    return dest


def extended_copy(root: Path, change=None, copy: str = "copy.yaml") -> None:
    """The pico study copied under the name pico2 into ``copy``, with one more dense model (and ``change``)."""
    data = yaml.safe_load((root / STUDY).read_text()) | {"name": "pico2"}
    model = yaml.safe_load((root / "model.yaml").read_text()) | {"name": "dense-pico-b"}
    (root / "b.yaml").write_text(yaml.safe_dump(model))
    data["models"].append({"config": str(root / "b.yaml")})
    if change:
        change(data)
    (root / copy).write_text(yaml.safe_dump(data))
