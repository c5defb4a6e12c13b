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
machine.

Every argument is checked before anything is drawn, and a bad one is one error line:

- ``--prompt`` is UTF-8 text: empty is a new document, and any character, NUL and control
  characters too, is text the byte-level tokenizer encodes. A command-line argument of bytes that
  are not UTF-8 is refused. A prompt that does not fit the run's training context with the tokens
  asked for is refused, never cut.
- ``--temperature`` is a finite number >= 0 (-0 is 0). A temperature so small that the other
  tokens would get, together, under 2**-53 of the likeliest token's probability (every other logit
  (36.8 + ln V) * T or more below the maximum, V the vocabulary; 1e-45, say) is greedy, the same
  tokens as 0: softmax(logits / T) is one-hot in double precision there, where logits / T in
  float32 would overflow to inf. (Tokens tied at the top share the probability at any temperature
  and are drawn among.) A huge one (1e300) draws among the K likeliest tokens about evenly
  (harness.evaluate.sample.GREEDY_WEIGHT, pick).
- ``--top-k`` is at most the model's vocabulary (a K of the whole vocabulary draws among all,
  as leaving it out does); a larger K is refused, naming the vocabulary size.
- ``--seed`` is an integer from 0 to 2**64 - 1, the seeds torch's generator holds (it would read a
  negative seed as 2**64 + seed, an alias of a positive one, so negatives are refused).
- ``--threads`` is at most this machine's CPU count.
"""

from __future__ import annotations

import argparse
import math
import os
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
SEEDS = 2**64
"""--seed is below this: torch.Generator.manual_seed holds an unsigned 64-bit seed."""


def _prompt(text: str) -> str:
    """An argparse type: text that is valid UTF-8. Python hands bytes of a command line that are not
    UTF-8 over as lone surrogates (U+DC80..U+DCFF, PEP 383), which no tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        code = ord(text[e.start])
        what = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"character U+{code:04X}"
        raise argparse.ArgumentTypeError(
            f"not valid UTF-8 ({what} at character {e.start}): give the prompt as UTF-8 text (convert it "
            "with `iconv -t UTF-8`, or use a UTF-8 locale)"
        ) from None
    return text


def _temperature(text: str) -> float:
    """An argparse type: a finite number >= 0 (-0 read as 0)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value + 0.0  # -0.0 + 0.0 is 0.0


def _seed(text: str) -> int:
    """An argparse type: an integer from 0 to SEEDS - 1."""
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not 0 <= value < SEEDS:
        shown = text if len(text) <= 40 else text[:40] + "..."
        raise argparse.ArgumentTypeError(f"must be an integer from 0 to 2**64 - 1 ({SEEDS - 1}), got {shown!r}")
    return value


def _threads(text: str) -> int:
    """An argparse type: an integer from 1 to the machine's CPU count (more only slow a CPU run, and
    torch runs out of memory starting 100,000 of them)."""
    cpus = os.cpu_count() or 1
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not 1 <= value <= cpus:
        shown = text if len(text) <= 40 else text[:40] + "..."
        raise argparse.ArgumentTypeError(f"must be an integer from 1 to {cpus}, this machine's CPUs, got {shown!r}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="run id, as harness plan lists them")
    p.add_argument("--prompt", type=_prompt, default="", help="UTF-8 text to continue (default: none, a new document)")
    p.add_argument(
        "--tokens",
        type=POSITIVE,
        metavar="N",
        help=f"new tokens at most (default {DEFAULT_TOKENS}, or what the run's context leaves after the prompt)",
    )
    p.add_argument(
        "--temperature",
        type=_temperature,
        default=0.8,
        metavar="T",
        help="softmax temperature, finite and >= 0; 0 is greedy, and so is a T so small that the likeliest "
        "token would take all the probability, e.g. 1e-45 (default 0.8)",
    )
    p.add_argument(
        "--top-k",
        dest="top_k",
        type=POSITIVE,
        metavar="K",
        help="draw among the K likeliest tokens, K at most the vocabulary (default: all)",
    )
    p.add_argument("--seed", type=_seed, default=0, metavar="N", help="seed of the draws, 0 to 2**64 - 1 (default 0)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="default cpu")
    p.add_argument("--threads", type=_threads, metavar="N", help="torch CPU threads, at most the machine's CPUs")


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

    from harness.data.current import trained_on_other_data
    from harness.data.prepare import EOS, load_tokenizer
    from harness.study.records import study_record
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
        record = study_record(study, run_dir / "record.json")
        if refusal := trained_on_other_data([record], results / "data" / "data.json", study):
            raise HarnessError(refusal)
    model, step = load_model(study, run, run_dir, args.device)
    tok = load_tokenizer(results / "data", f"harness data {study.path}")
    if tok.get_vocab_size() != model.cfg.vocab_size:
        raise HarnessError(
            f"{results / 'data' / 'tokenizer.json'} has {tok.get_vocab_size():,} tokens, run {run.run_id}'s model "
            f"{model.cfg.vocab_size:,}: the data was prepared again since it trained; `harness train {study.path} "
            f"--run {run.run_id} --restart` trains it on this data"
        )
    vocab = model.cfg.vocab_size
    if args.top_k is not None and args.top_k > vocab:
        raise ConfigError(
            "--top-k",
            f"{args.top_k} is more tokens than run {run.run_id}'s vocabulary of {vocab:,}; at most {vocab} "
            "(leave --top-k out to draw among all)",
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
    _print(tok.decode(prompt + new, skip_special_tokens=False))
    return 0


def _print(text: str) -> None:
    """Print ``text`` on stdout; what its encoding cannot hold (an ASCII or Latin-1 terminal) as
    backslash escapes, as Python writes stderr."""
    encoding = getattr(sys.stdout, "encoding", None) or "utf-8"
    print(text.encode(encoding, "backslashreplace").decode(encoding))
