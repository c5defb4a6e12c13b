"""The sampling behind ``harness sample`` (its command: ``harness.cli.sample``): a run's model loaded
from its ``checkpoint.pt``, new tokens one at a time through a KV cache, each the argmax at
temperature 0 (or one so small that softmax(logits / temperature) is one-hot: :data:`GREEDY_WEIGHT`),
else drawn from softmax(logits / temperature) over the ``top_k`` likeliest tokens (top-k sampling,
Fan et al. 2018, "Hierarchical Neural Story Generation") with a seeded generator.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from harness.core.errors import HarnessError, MissingStep

if TYPE_CHECKING:
    import torch


GREEDY_WEIGHT = 2.0**-53
"""Double precision's unit roundoff. At a temperature where the other tokens weigh together
(exp((logit - max) / T), summed) less than this against the one likeliest token, softmax(logits / T)
gives it probability 1 in double precision, so :func:`pick` takes the argmax there, exactly as at
temperature 0. Every other logit (36.8 + ln V) * T or more below the maximum suffices:
(V - 1) * exp(-36.8 - ln V) < 2**-53. Tokens tied at the maximum share it at every temperature (the
limit as T goes to 0 too), so they are drawn among.
Float32 logits / T would overflow to inf, and softmax to NaN, only at far smaller temperatures
(below |logit| / 3.4e38, e.g. 1e-45), deep inside this greedy range: two float32 logits that
differ do so by at least about 6e-8 of their size."""


def pick(logits_V: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator) -> int:
    """The next token: the argmax at temperature 0, else a draw from softmax(logits / T) over the
    ``top_k`` likeliest tokens (all when None). A temperature small enough that the draw is the
    likeliest token to double precision (:data:`GREEDY_WEIGHT`) takes the argmax, without a draw, so
    a vanishing temperature gives the tokens of temperature 0 (but draws among tokens tied at the top).
    Any finite T > 0 is safe: the logits are scaled as (logits - max) / T in double precision, all
    <= 0, which neither overflows to inf at a tiny T nor makes -inf / inf a NaN at a huge one."""
    import torch

    if temperature == 0:
        return int(logits_V.argmax())
    if top_k is not None and top_k < logits_V.numel():
        kth = torch.topk(logits_V, top_k).values[-1]
        logits_V = logits_V.masked_fill(logits_V < kth, float("-inf"))
    scaled_V = (logits_V.double() - logits_V.max()) / temperature
    rest = float(scaled_V[scaled_V < 0].exp().sum())  # the other tokens' weight, the likeliest's 1
    if rest < GREEDY_WEIGHT and int((scaled_V == 0).sum()) == 1:
        return int(logits_V.argmax())
    probs_V = torch.softmax(scaled_V.float(), dim=-1)
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
