"""The CPU probe of ``harness plan``: a few timed training steps of a model, only where they are
safe and quick, remembered between plans.

A probe runs only when both bounds allow it, so that planning never trains what may not fit:

* memory: :func:`probe_bytes`, the probe's peak (float32 weights, gradients and AdamW's two
  moments, and the activations one eager step keeps for its backward pass) must be at most
  :data:`PROBE_MEMORY_FRACTION` of the memory available now (MemAvailable);
* time: the probe's steps, at the FLOP rate of the largest model probed so far (before any, at
  :data:`PRIOR_FLOPS_PER_THREAD`), must take at most :data:`PROBE_MAX_SECONDS`, and all probes of
  one plan at most :data:`PROBE_BUDGET_SECONDS`.

A refusal says which bound and by how much. Measured step times are kept in a small JSON file
(``$MOE_HARNESS_CACHE``, else ``$XDG_CACHE_HOME/moe-harness``, else ``~/.cache/moe-harness``),
keyed by the model's configuration, batch, context, threads, dtype, CPU and torch version, so
that the next plan of the same study answers at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from harness.core.provenance import cpu_name
from harness.study.spec import Run
from models.accounting import count_params
from models.transformer import Transformer

PROBE_STEPS, PROBE_WARMUP = 4, 2
PROBE_MEMORY_FRACTION = 0.5
"""At most this share of the available memory: the probe must leave room for everything else."""
PROBE_MAX_SECONDS = 15.0
PROBE_BUDGET_SECONDS = 60.0
PRIOR_FLOPS_PER_THREAD = 10e9
"""FLOP/s of one thread before anything is probed: an eager float32 training step of the tiny
study's models ran at about 15-20 GFLOP/s per thread (AMD EPYC, 2 threads); a lower figure makes
the first probe's time bound err on the side of not probing."""
ACTIVATION_FLOATS_PER_LAYER = 16
"""Values of width d a block keeps per token for its backward pass, beside its FFN hidden
values: norms, q/k/v before and after RoPE, the attention output, projections and residuals
(Korthikanti et al. 2022, sec. 4.1, count 34 sbh bytes per layer in 16-bit with dropout; this
model has no dropout, and float32 doubles the bytes)."""
FFN_HIDDEN_COPIES = 4
"""SwiGLU keeps gate, up, silu(gate) and their product per hidden unit (and per chosen expert)."""
LOGIT_COPIES = 4
"""Logits, the loss's log-softmax, and the gradients of both, each batch x context x vocab."""
FLOAT_BYTES = 4


def activation_bytes(run: Run) -> int:
    """Activations one eager float32 training step of ``run`` keeps: blocks plus logits."""
    cfg, r = run.model, run.recipe
    tokens = r.batch_size * r.seq_len
    per_layer = []
    for i in range(cfg.n_layers):
        if cfg.is_moe_layer(i):
            m = cfg.moe
            hidden = m.d_expert * (m.top_k + m.shared_experts)
            # each token's k dispatched copies, their expert outputs and weighted outputs, and
            # its router scores and probabilities
            extra = 3 * m.top_k * cfg.d_model + 2 * m.experts
        else:
            hidden, extra = cfg.d_ff or 0, 0
        per_layer.append(ACTIVATION_FLOATS_PER_LAYER * cfg.d_model + FFN_HIDDEN_COPIES * hidden + extra)
    # one layer's attention scores, where the kernel materialises them (batch x heads x S x S)
    scores = r.batch_size * cfg.n_heads * r.seq_len * r.seq_len
    logits = LOGIT_COPIES * tokens * cfg.vocab_size
    return FLOAT_BYTES * (tokens * sum(per_layer) + scores + logits)


def probe_bytes(run: Run) -> int:
    """Peak memory of a probe step: 16 bytes per parameter (float32 weight, gradient and AdamW's
    two moments) plus :func:`activation_bytes`."""
    return 16 * count_params(run.model).total + activation_bytes(run)


def available_memory() -> int | None:
    from harness.train.resources import available_bytes

    return available_bytes(torch.device("cpu"))


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def memory_refusal(run: Run, available: int | None) -> str | None:
    """Why ``run``'s model is not probed for memory (None: it may be)."""
    need = probe_bytes(run)
    if available is None or need <= PROBE_MEMORY_FRACTION * available:
        return None
    return (
        f"a training step of {run.model.name} holds about {_gib(need)}, more than "
        f"{PROBE_MEMORY_FRACTION:.0%} of the {_gib(available)} of memory available"
    )


def time_refusal(run: Run, step_flops: float, rate: float, spent: float) -> str | None:
    """Why ``run``'s model is not probed for time (None: it may be), at ``rate`` FLOP/s with
    ``spent`` seconds of probing already done in this plan."""
    seconds = (PROBE_WARMUP + PROBE_STEPS) * step_flops / rate
    if seconds > PROBE_MAX_SECONDS:
        return f"probing {run.model.name} would take about {seconds:.0f} s (more than {PROBE_MAX_SECONDS:.0f} s)"
    if spent + seconds > PROBE_BUDGET_SECONDS:
        return f"this plan has probed for {spent:.0f} s already (at most {PROBE_BUDGET_SECONDS:.0f} s)"
    return None


def probe_step_seconds(run: Run, threads: int, dtype: torch.dtype) -> float:
    """Median seconds of an eager training step of ``run``'s model on this CPU."""
    from harness.train.loop import make_optimizer

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        model = Transformer(run.model)
        opt = make_optimizer(model, run.recipe)
        r = run.recipe
        x = torch.randint(0, run.model.vocab_size, (r.batch_size, r.seq_len))
        times = []
        for i in range(PROBE_WARMUP + PROBE_STEPS):
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                out = model(x, x)
            (out.loss + out.aux_loss).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i >= PROBE_WARMUP:
                times.append(time.perf_counter() - start)
        return statistics.median(times)
    finally:
        torch.set_num_threads(old)


# --- the cache of measured steps --------------------------------------------------------------


def cache_path() -> Path:
    if os.environ.get("MOE_HARNESS_CACHE"):
        return Path(os.environ["MOE_HARNESS_CACHE"]) / "probes.json"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "moe-harness" / "probes.json"


def cache_key(run: Run, threads: int, dtype: torch.dtype) -> str:
    """What a probed step time depends on: the model, batch, context, threads, dtype, the CPU and
    torch."""
    r = run.recipe
    what = [run.model.to_dict(), r.batch_size, r.seq_len, threads, str(dtype), cpu_name(), os.cpu_count()]
    what.append(torch.__version__)
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:24]


def read_cache() -> dict[str, float]:
    try:
        data = json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, (int, float)) and v > 0} if isinstance(data, dict) else {}


def write_cache(entries: dict[str, float]) -> None:
    """Add ``entries`` to the cache; a cache that cannot be written is only a slower next plan."""
    from harness.core.io import write_text

    with contextlib.suppress(Exception):  # the cache is an optimisation, never a failure
        write_text(cache_path(), json.dumps(read_cache() | entries, indent=1, sort_keys=True) + "\n")


@dataclass
class Prober:
    """The probes of one plan: step seconds by cache key, FLOP rates measured so far, and the
    seconds spent probing."""

    cached: dict[str, float]
    available: int | None
    measured: dict[str, float]
    rates: list[float]
    spent: float = 0.0

    @classmethod
    def start(cls) -> Prober:
        return cls(read_cache(), available_memory(), {}, [])

    def step_seconds(self, run: Run, step_flops: float, threads: int, dtype: torch.dtype) -> tuple[float | None, str]:
        """(seconds of one eager step, basis) or (None, why it was not probed)."""
        key = cache_key(run, threads, dtype)
        kind = f"eager {str(dtype).removeprefix('torch.')}"
        if key in self.measured or key in self.cached:
            seconds = self.measured.get(key) or self.cached[key]
            self.rates.append(step_flops / seconds)
            return seconds, f"probe, {kind}"
        rate = max(self.rates) if self.rates else PRIOR_FLOPS_PER_THREAD * threads
        why = memory_refusal(run, self.available) or time_refusal(run, step_flops, rate, self.spent)
        if why:
            return None, why
        start = time.perf_counter()
        seconds = probe_step_seconds(run, threads, dtype)
        self.spent += time.perf_counter() - start
        self.measured[key] = seconds
        self.rates.append(step_flops / seconds)
        return seconds, f"probe, {kind}"

    def save(self) -> None:
        if self.measured:
            write_cache(self.measured)
