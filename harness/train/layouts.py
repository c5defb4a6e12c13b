"""How one run is laid out over processes, as one object the training loop calls.

    layout = for_run(Layout(), moe=False)                          # from harness.train.parallel
    model, opt, step_model = layout.apply(model, opt, rebuild, device)
    x, y = x[layout.rows(batch_size)], y[layout.rows(batch_size)]
    (loss + aux).backward(); grad_norm = layout.reduce_and_clip(model, max_norm)
    opt.step(); layout.sum_router_loads(model); model.update_router_biases()

Three layouts, each a class with the same operations: :class:`SingleProcess` does the plain
single-process thing in each; :class:`DataParallel` wraps the model in DDP and reduces what the
ranks hold apart (harness.train.parallel says why DDP); :class:`ExpertParallel` also shards the
routed experts of every MoE layer over groups of ranks (models.expert_parallel). The loop
(harness.train.loop) never asks which layout it runs in: it calls these operations, which is why
a run's numbers do not depend on how it is laid out beyond the order of floating-point sums.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch
import torch.distributed as dist

from harness.train import parallel
from harness.train.parallel import ALONE, Layout

Rebuild = Callable[[torch.nn.Module], torch.optim.Optimizer]
"""Builds the run's optimizer over a model's parameters (harness.train.loop.make_optimizer)."""


class SingleProcess:
    """One process: every operation the plain single-process one."""

    def __init__(self, layout: Layout = ALONE):
        self.layout = layout

    @property
    def writes(self) -> bool:
        """Whether this rank writes the run's files and logs (the first does)."""
        return self.layout.main

    def apply(
        self, model: torch.nn.Module, opt: torch.optim.Optimizer, rebuild: Rebuild, device: torch.device
    ) -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.nn.Module]:
        """Lay the model (and its loaded optimizer) out over the ranks: returns the model, its
        optimizer and the module a training step calls."""
        return model, opt, model

    def rows(self, batch_size: int) -> slice:
        """This rank's rows of a global batch."""
        return parallel.local_rows(batch_size, self.layout)

    def evaluates(self, batch: int) -> bool:
        """Whether this rank scores evaluation batch number ``batch``."""
        return True

    def eval_totals(self, values: list[float]) -> list[float]:
        """The evaluation's sums of every rank's batches."""
        return values

    def reduce_and_clip(self, model: torch.nn.Module, max_norm: float) -> torch.Tensor:
        """Gradients of the mean loss over all ranks, clipped to ``max_norm``; returns their norm."""
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)

    def sum_router_loads(self, model: torch.nn.Module) -> None:
        """Aux-loss-free routers update their bias from the load of the whole global batch, so
        every rank keeps the same bias: their load accumulators summed over the ranks."""

    def sum_routing(self, load: torch.Tensor) -> None:
        """A layer's token counts per expert, summed in place to the whole global batch's."""

    def mean(self, value: float) -> float:
        """The mean of a per-rank number over all ranks."""
        return parallel.mean(value, self.layout)

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order."""
        return parallel.gather(obj, self.layout)

    def barrier(self) -> None:
        parallel.barrier(self.layout)

    def full_state(self, model: torch.nn.Module, opt: torch.optim.Optimizer) -> tuple[dict, dict]:
        """The single-process model and optimizer state dicts, for a checkpoint."""
        return model.state_dict(), opt.state_dict()

    def describe(self, model: torch.nn.Module, device: torch.device) -> dict[str, Any]:
        """The layout for record.json, with every rank's device and how the experts are parallel."""
        from models.expert_parallel import describe

        return parallel.describe(self.layout, device) | {"experts": describe(model)}

    def sink(self, path: Path) -> contextlib.AbstractContextManager[IO[str]]:
        """Where this rank's log lines go: appended to ``path`` on the writing rank, else nowhere."""
        return path.open("a") if self.writes else contextlib.nullcontext(io.StringIO())


class DataParallel(SingleProcess):
    """Data parallelism: DDP averages the gradients of the ranks' slices of each global batch."""

    def apply(self, model, opt, rebuild, device):
        return model, opt, parallel.wrap(model, device, self.layout, ignored=[])

    def evaluates(self, batch: int) -> bool:
        # Every rank takes every world-th batch, unless expert-parallel layers run collectively.
        split = self._eval_split()
        return batch % split == self.layout.rank % split

    def eval_totals(self, values: list[float]) -> list[float]:
        return parallel.total(values, self.layout) if self._eval_split() > 1 else values

    def _eval_split(self) -> int:
        return self.layout.world if self.layout.expert == 1 else 1

    def sum_router_loads(self, model: torch.nn.Module) -> None:
        for m in model.moe_layers:
            if m.router.bias is not None:  # expert-parallel layers hold their group's load already
                self.sum_routing(m.router.load_accum)

    def sum_routing(self, load: torch.Tensor) -> None:
        dist.all_reduce(load)


class ExpertParallel(DataParallel):
    """Data and expert parallelism: each rank keeps its shard of every MoE layer's experts, whose
    gradients belong to their owner; DDP averages the replicated parameters."""

    replicas: dist.ProcessGroup | None = None
    """The ranks holding the same shards in the other expert-parallel groups (None: one group)."""

    def apply(self, model, opt, rebuild, device):
        """Shard the experts, rebuild the optimizer over the shards with the loaded state cut to
        them, and wrap in DDP with the expert shards left to their own group."""
        from models.expert_parallel import expert_groups, expert_parameter_names, shard_experts

        full = opt.state_dict()
        group, self.replicas = expert_groups(self.layout.expert)
        shard_experts(model, group)
        opt = rebuild(model)
        opt.load_state_dict(parallel.shard_optimizer_state(full, model))
        return model, opt, parallel.wrap(model, device, self.layout, ignored=expert_parameter_names(model))

    def reduce_and_clip(self, model: torch.nn.Module, max_norm: float) -> torch.Tensor:
        from models import expert_parallel

        expert_parallel.reduce_expert_gradients(model, self.replicas)
        return expert_parallel.clip_grad_norm_(model, max_norm)

    def sum_routing(self, load: torch.Tensor) -> None:
        # Expert-parallel layers already sum over their group: only the replicas are left.
        if self.replicas is not None:
            dist.all_reduce(load, group=self.replicas)

    def full_state(self, model, opt):
        """Shards gathered: the single-process checkpoint (collective)."""
        from models.expert_parallel import full_state_dict

        return full_state_dict(model), parallel.full_optimizer_state(opt, model)


SINGLE = SingleProcess()
"""One process: the default everywhere."""


def for_run(layout: Layout, moe: bool) -> SingleProcess:
    """The layout of a run at ``layout``'s place: experts sharded only for an MoE with an
    expert-parallel degree above 1."""
    if not layout.distributed:
        return SingleProcess(layout)
    if layout.expert > 1 and moe:
        return ExpertParallel(layout)
    return DataParallel(layout)
