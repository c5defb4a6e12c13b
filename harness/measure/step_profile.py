"""Where a training step's time goes, by part, from ``torch.profiler``: the numbers behind a
ratio such as MoE step / dense step.

    shares = profile_step(step, steps=5)   # step() runs one forward, backward and optimizer step
    shares["parts_ms"]["expert GEMMs"], shares["total_ms"]

Every profiled operator's self time (its own CPU time, children excluded, so nothing is counted
twice) goes to exactly one part, decided by the operator and the ones that called it:

- ``expert GEMMs``: a grouped GEMM call (``aten::_grouped_mm``) and the matmuls inside it (the
  MoE layer's experts; the expert loop, float32 on CUDA only, counts as other GEMMs);
- ``other GEMMs``: every other matmul (attention projections, dense FFN, output layer);
- ``attention``: the scaled-dot-product attention kernels;
- ``top-k, sort, gather, scatter``: the routing and dispatch operators (top-k, sorts, gathers,
  scatters, index adds, counts), wherever they run (an embedding's lookup is one too);
- ``fused elementwise``: the kernels torch.compile generates (norms, activations, casts, losses);
- ``optimizer and clipping``: whatever runs under the ``optimizer`` phase the step marks;
- ``other``: the rest (allocation, dispatch, Python-side launch overhead).

The profiler's own cost inflates small operators, so shares are for comparison between models
profiled the same way, not absolute times; the benchmark that calls this times its steps
without the profiler.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch.autograd.profiler_util import FunctionEvent

PARTS = (
    "expert GEMMs",
    "other GEMMs",
    "attention",
    "top-k, sort, gather, scatter",
    "fused elementwise",
    "optimizer and clipping",
    "other",
)
OPTIMIZER_PHASE = "optimizer"
"""The ``torch.profiler.record_function`` label a step puts around clipping and the optimizer."""

_GEMMS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear"}
_ROUTING = (
    "aten::topk",
    "aten::sort",
    "aten::argsort",
    "aten::index_select",
    "aten::index_add",
    "aten::index_copy",
    "aten::index_put",
    "aten::_index_put_impl_",
    "aten::scatter",
    "aten::scatter_add",
    "aten::gather",
    "aten::cumsum",
    "aten::searchsorted",
    "aten::bincount",
    "aten::repeat_interleave",
)


def _ancestors(event: FunctionEvent) -> list[str]:
    names, parent = [], event.cpu_parent
    while parent is not None:
        names.append(parent.name)
        parent = parent.cpu_parent
    return names


def part_of(event: FunctionEvent) -> str:
    """The part one profiled operator's self time belongs to (see the module docstring)."""
    name, above = event.name, _ancestors(event)
    if OPTIMIZER_PHASE in above or name == OPTIMIZER_PHASE or name.startswith("Optimizer."):
        return "optimizer and clipping"
    if name == "aten::_grouped_mm" or "aten::_grouped_mm" in above:
        return "expert GEMMs"
    if name in _GEMMS:
        return "other GEMMs"
    if "scaled_dot_product" in name:
        return "attention"
    if name.rstrip("_").startswith(_ROUTING):
        return "top-k, sort, gather, scatter"
    if name.startswith(("## Call CompiledFxGraph", "graph_")):
        return "fused elementwise"
    return "other"


def shares_of(events: list[FunctionEvent], steps: int) -> dict[str, Any]:
    """Milliseconds a step per part, their total and each part's share of it."""
    parts_us = dict.fromkeys(PARTS, 0.0)
    for event in events:
        if event.device_type.name == "CPU":
            parts_us[part_of(event)] += event.self_cpu_time_total
    total_us = sum(parts_us.values())
    return {
        "steps_profiled": steps,
        "total_ms": total_us / steps / 1e3,
        "parts_ms": {p: us / steps / 1e3 for p, us in parts_us.items()},
        "parts_share": {p: (us / total_us if total_us else 0.0) for p, us in parts_us.items()},
    }


def profile_step(step: Callable[[], None], steps: int = 5) -> dict[str, Any]:
    """Profile ``steps`` calls of ``step`` (already warmed up: compiled, first allocations done)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    return shares_of(list(prof.events()), steps)
