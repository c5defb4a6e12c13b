"""Read what a run's model writes, without exporting it: ``harness sample``.

    harness sample tiny --run dense-d64_7e12_s0 --prompt "def " --tokens 64
    harness sample tiny --run dense-d64_7e12_s0 --temperature 0    # greedy: the likeliest token each step

The model is the run's ``checkpoint.pt``: a finished run's final weights, or the latest
checkpoint of a run that stopped before its end (``harness train --stop-after N``, a killed job).
The prompt is encoded with the study's tokenizer and follows an end-of-text token, as every
document does in training; new tokens come one at a time through a KV cache until ``--tokens``
of them or the end-of-text token, and the prompt with its continuation is printed. Each token is
drawn from softmax(logits / temperature), restricted to the ``--top-k`` likeliest tokens when
given (top-k sampling, Fan et al. 2018, "Hierarchical Neural Story Generation"); temperature 0
takes the argmax. ``--seed`` seeds the draws: the same command prints the same text on the same
machine. A prompt that does not fit the run's training context with the tokens asked for is
refused, never cut.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from harness.cli.common import POSITIVE
from harness.core.errors import HarnessError
from harness.evaluate.sample import generate, load_model
from models.config import ConfigError

HELP = "print a trained run's continuation of a prompt, decoded with the study's tokenizer"
STUDY = True
DEFAULT_TOKENS = 128
"""New tokens when --tokens is not given (fewer when the context leaves less room)."""


def _temperature(text: str) -> float:
    """An argparse type: a finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="run id, as harness plan lists them")
    p.add_argument("--prompt", default="", help="text to continue (default: none, a new document)")
    p.add_argument(
        "--tokens",
        type=POSITIVE,
        metavar="N",
        help=f"new tokens at most (default {DEFAULT_TOKENS}, or what the run's context leaves after the prompt)",
    )
    p.add_argument(
        "--temperature", type=_temperature, default=0.8, help="softmax temperature; 0 is greedy (default 0.8)"
    )
    p.add_argument("--top-k", dest="top_k", type=POSITIVE, metavar="K", help="draw among the K likeliest tokens")
    p.add_argument("--seed", type=int, default=0, help="seed of the draws (default 0)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="default cpu")
    p.add_argument("--threads", type=POSITIVE, help="torch CPU threads")


def _tokens(asked: int | None, prompt: int, context: int, run_id: str) -> int:
    """New tokens to generate: ``asked`` (or the default) when the end-of-text token, the prompt and
    they fit the run's context; a prompt or --tokens that do not are refused, not cut."""
    room = context - 1 - prompt
    if room < 1:
        raise ConfigError(
            "--prompt",
            f"the prompt is {prompt} tokens; with an end-of-text token before it and a new token after, run "
            f"{run_id}'s context of {context} tokens holds at most {context - 2} (a prompt is refused, not cut)",
        )
    if asked is None:
        return min(DEFAULT_TOKENS, room)
    if asked > room:
        raise ConfigError(
            "--tokens",
            f"{asked} new tokens after the {prompt}-token prompt exceed run {run_id}'s context of {context} "
            f"tokens; at most {room}",
        )
    return asked


def run(args: argparse.Namespace) -> int:
    import torch

    from harness.core.io import read_json
    from harness.data.current import trained_on_other_data
    from harness.data.prepare import EOS, load_tokenizer
    from harness.study.runs import find_run
    from harness.study.spec import load_study
    from harness.train import run_lock

    study = load_study(args.study)
    run = find_run(study, args.run)
    results = Path(args.results) / study.name
    run_dir = results / "runs" / run.run_id
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device", "cuda requested but no CUDA device is visible")
    if args.threads:
        torch.set_num_threads(args.threads)
    run_lock.reading(run_dir, run.run_id, "sample")  # refused while the run trains
    if (run_dir / "record.json").is_file():
        record = read_json(run_dir / "record.json")
        if refusal := trained_on_other_data([record], results / "data" / "data.json"):
            raise HarnessError(refusal)
    model, step = load_model(study, run, run_dir, args.device)
    tok = load_tokenizer(results / "data", f"harness data {study.path}")
    if tok.get_vocab_size() != model.cfg.vocab_size:
        raise HarnessError(
            f"{results / 'data' / 'tokenizer.json'} has {tok.get_vocab_size():,} tokens, run {run.run_id}'s model "
            f"{model.cfg.vocab_size:,}: the data was prepared again since it trained; `harness train {study.path} "
            f"--run {run.run_id} --restart` trains it on this data"
        )
    eos = tok.token_to_id(EOS)
    prompt = tok.encode(args.prompt, add_special_tokens=False).ids
    tokens = _tokens(args.tokens, len(prompt), model.cfg.max_seq_len, run.run_id)
    new = generate(model, [eos, *prompt], tokens, args.temperature, args.top_k, args.seed, stop=eos)
    top_k = "all" if args.top_k is None else args.top_k
    print(
        f"# {run.run_id} at step {step}: {len(new)} tokens, temperature {args.temperature}, top-k {top_k}, "
        f"seed {args.seed}, {args.device}",
        file=sys.stderr,
    )
    print(tok.decode(prompt + new, skip_special_tokens=False))
    return 0
