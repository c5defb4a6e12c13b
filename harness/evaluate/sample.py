"""The sampling behind ``harness sample`` (its command: ``harness.cli.sample``): a run's model loaded
from its ``checkpoint.pt``, new tokens one at a time through a KV cache, each the argmax at
temperature 0, else drawn from softmax(logits / temperature) over the ``top_k`` likeliest tokens
(top-k sampling, Fan et al. 2018, "Hierarchical Neural Story Generation") with a seeded generator.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from harness.core.errors import HarnessError, MissingStep

if TYPE_CHECKING:
    import torch


def pick(logits_V: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator) -> int:
    """The next token: the argmax at temperature 0, else a draw from softmax(logits / T) over the
    ``top_k`` likeliest tokens (all when None)."""
    import torch

    if temperature == 0:
        return int(logits_V.argmax())
    if top_k is not None and top_k < logits_V.numel():
        kth = torch.topk(logits_V, top_k).values[-1]
        logits_V = logits_V.masked_fill(logits_V < kth, float("-inf"))
    probs_V = torch.softmax(logits_V.float() / temperature, dim=-1)
    return int(torch.multinomial(probs_V, 1, generator=generator))


def generate(
    model,
    prompt: list[int],
    tokens: int,
    temperature: float,
    top_k: int | None = None,
    seed: int = 0,
    stop: int | None = None,
) -> list[int]:
    """Up to ``tokens`` new token ids after ``prompt`` (not empty), one model call per token
    through a KV cache; ``stop`` (the end-of-text id) ends it and is not returned."""
    import torch

    from models.transformer import KVCache

    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    cache = KVCache(model.cfg, 1, len(prompt) + tokens, device=device)
    new: list[int] = []
    with torch.no_grad():
        logits_V = model(torch.tensor([prompt], device=device), cache=cache).logits[0, -1]
        while True:
            token = pick(logits_V, temperature, top_k, generator)
            if token == stop:
                break
            new.append(token)
            if len(new) == tokens:
                break
            logits_V = model(torch.tensor([[token]], device=device), cache=cache).logits[0, -1]
    return new


def load_model(study, run, run_dir: Path, device: str):
    """The run's model with the weights of its checkpoint.pt, in eval mode on ``device``: refused,
    saying how to get one, when there is none."""
    from harness.train.checkpoint import gone, load_checkpoint
    from models.config import load_config
    from models.transformer import Transformer

    ckpt, train = run_dir / "checkpoint.pt", f"harness train {study.path} --run {run.run_id}"
    if (why := gone(ckpt, train)) is not None:
        raise HarnessError(why)
    if not ckpt.is_file():
        every = run.recipe.checkpoint_every
        raise MissingStep(
            ckpt, train, f"no checkpoint yet: training writes one every {every} steps, at its end and at --stop-after N"
        )
    state = load_checkpoint(ckpt, train, f"`{train} --restart` trains it again")
    # The configuration the weights were trained with (written when training started).
    cfg = load_config(run_dir / "config.yaml") if (run_dir / "config.yaml").is_file() else run.model
    model = Transformer(cfg)
    missing, unexpected = model.load_state_dict(state["model"], strict=False)
    if missing or unexpected:
        raise HarnessError(
            f"{ckpt}: its weights do not fit the run's model config (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}); `{train} --restart` trains it again"
        )
    return model.to(device).eval(), state.get("step")
