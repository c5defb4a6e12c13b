"""One run over several processes: data parallelism with DDP, launched by torchrun.

    torchrun --standalone --nproc-per-node 2 -m harness train tiny --run dense-d64_7e12_s0

The study's ``parallel:`` section sets the degrees (``harness.study.spec.Parallel``); the train rule
launches torchrun with them. This module holds the pieces: where a process sits (:class:`Layout`,
read from torchrun's environment), the host checks, the process group, DDP, the collectives on
host numbers, and the expert shards' optimizer state. harness.train.layouts puts them together
into the one object the training loop calls (single process, data parallel, data + expert
parallel), so that the loop never asks how the run is laid out.

Every rank takes an equal slice of each global batch, so a run's batch, data order, tokens and
steps are the study's whatever the world size; DDP averages the gradients, which makes a step the
single-process step on the whole batch (up to the order of floating-point sums).

Why DDP and not FSDP2 (``fully_shard``): the models of these studies fit on one device with
their AdamW state, so replicating them costs memory that is there anyway, and DDP overlaps the
gradient all-reduce with the backward pass while keeping the optimizer the plain single-process
AdamW, whose numbers the single-process runs share. FSDP2 is the choice for a model whose
weights, gradients and optimizer state do not fit on one device.

Balance losses and routing statistics of a data-parallel MoE are computed on each rank's local
batch (Megatron-Core's default); with expert parallelism they are reduced over the expert-
parallel group (``models.expert_parallel``). Every record states which (``parallel`` in
record.json). Noisy top-k routing draws its noise per rank from the same seeded generator, so ranks share a
noise pattern where one process would draw fresh noise for every token: the same distribution
per token, correlated across ranks. Checkpoints are written by rank 0 in the single-process
format (expert shards gathered first), so a run resumes on any number of ranks.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

STRATEGY = "DDP"


@dataclass(frozen=True)
class Layout:
    """Where this process sits: its rank among ``world`` processes, and the degrees."""

    world: int = 1
    rank: int = 0
    local_rank: int = 0
    expert: int = 1
    """Expert-parallel degree: experts sharded over groups of this many ranks (1: none)."""

    @property
    def main(self) -> bool:
        """The rank that writes files and logs."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


ALONE = Layout()
"""One process: the default everywhere."""


def from_env(expert: int = 1) -> Layout:
    """The layout torchrun describes in the environment (one process when it is absent)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return Layout(world, rank, local, expert)


def host_slots(device_type: str) -> int:
    """How many ranks of one run this host can hold, one device each: its visible GPUs on CUDA
    (``CUDA_VISIBLE_DEVICES`` counts), else the CPU cores this process may use."""
    if device_type == "cuda":
        return torch.cuda.device_count()
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def check_world(ranks: int, device_type: str, field: str, source: str | None = None, todo: str = "") -> None:
    """Refuse ``ranks`` processes of one run on this host when it has fewer devices (GPUs, or
    CPU cores on a CPU) than that: ranks sharing a device run no faster and, on a GPU, do not
    start. With no GPU visible on a CUDA study (a cluster's submitting host) nothing is counted:
    each job checks on its own node."""
    from models.config import ConfigError

    have = host_slots(device_type)
    if ranks <= have or (device_type == "cuda" and have == 0):
        return
    each, unit = ("a GPU", "GPU(s) visible") if device_type == "cuda" else ("a CPU core", "CPU core(s)")
    raise ConfigError(
        field,
        f"{ranks} ranks need {each} each and this host has {have} {unit}; {todo or f'use at most {have}'}",
        source,
    )


def check_workflow(ranks: int, gpu: bool, gpu_limit: object, source: str) -> None:
    """The workflow's check, before any job starts: ``ranks`` processes per run fit this host
    (``check_world``) and, on GPUs, Snakemake's ``gpu`` resource (``gpu_limit``) lets one run's
    GPUs be taken at once: with fewer, its train job would never start."""
    from models.config import ConfigError

    check_world(ranks, "cuda" if gpu else "cpu", "parallel.data", source)
    if gpu and isinstance(gpu_limit, int) and gpu_limit < ranks:
        raise ConfigError(
            "parallel.data",
            f"each run trains on {ranks} GPUs and the workflow may hold {gpu_limit} at once (resources gpu="
            f"{gpu_limit}); run `snakemake --resources gpu={ranks}` or more, or set gpu in the profile's resources",
            source,
        )


def start(layout: Layout, device: torch.device) -> torch.device:
    """Join the process group (NCCL on CUDA, gloo on CPU); returns this rank's device."""
    if not layout.distributed:
        return device
    if device.type == "cuda":
        torch.cuda.set_device(layout.local_rank)
        device = torch.device("cuda", layout.local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def stop(layout: Layout) -> None:
    if layout.distributed and dist.is_initialized():
        dist.destroy_process_group()


def local_rows(batch_size: int, layout: Layout) -> slice:
    """This rank's rows of a global batch (equal slices; the study checks divisibility)."""
    per = batch_size // layout.world
    return slice(layout.rank * per, (layout.rank + 1) * per)


def wrap(model: torch.nn.Module, device: torch.device, layout: Layout, ignored: list[str]) -> torch.nn.Module:
    """DDP around the model; ``ignored``: parameter names DDP must not average (sharded experts,
    whose gradients belong to their owner rank)."""
    if not layout.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    if ignored:
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored)
    ids = [device.index] if device.type == "cuda" else None
    # An MoE may leave a parameter without gradient in a step (an expert no token chose): DDP
    # must not wait for it. Buffers are not broadcast: every rank computes the same ones (the
    # aux-loss-free routers' biases from the load summed over ranks), and the load
    # accumulators must stay per rank.
    moe = any(getattr(model, "moe_layers", []))
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=moe, broadcast_buffers=False)


def mean(value: float, layout: Layout) -> float:
    """The mean of a per-rank number over all ranks."""
    if not layout.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t) / layout.world


def total(values: list[float], layout: Layout) -> list[float]:
    """Element-wise sums of per-rank numbers over all ranks."""
    if not layout.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def gather(obj: Any, layout: Layout) -> list[Any]:
    """Every rank's ``obj``, in rank order."""
    if not layout.distributed:
        return [obj]
    out: list[Any] = [None] * layout.world
    dist.all_gather_object(out, obj)
    return out


def barrier(layout: Layout) -> None:
    if layout.distributed:
        dist.barrier()


@contextmanager
def process_group(layout: Layout, device: torch.device) -> Iterator[torch.device]:
    """Start the process group for the run, and leave it at the end whatever happens."""
    try:
        yield start(layout, device)
    finally:
        stop(layout)


def describe(layout: Layout, device: torch.device) -> dict[str, Any]:
    """The parallel layout for record.json, with every rank's device."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    devices = gather({"rank": layout.rank, "device": str(device), "name": name}, layout)
    return {
        "world_size": layout.world,
        "data_parallel": layout.world,
        "expert_parallel": layout.expert,
        "strategy": STRATEGY if layout.distributed else "single process",
        "balance_losses": "expert-parallel group" if layout.expert > 1 else "local batch",
        "devices": devices,
    }


# Expert parallelism in a training run: shard after loading, gather before saving, so that a
# checkpoint is always the single-process one (models.expert_parallel holds the layer).


def optimizer_names(model: torch.nn.Module) -> list[str]:
    """Parameter names in the order of the optimizer's state indices (harness.train.loop's groups:
    matrices first, then vectors)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [n for n, p in named if p.dim() >= 2] + [n for n, p in named if p.dim() < 2]


def _expert_slices(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """Sharded expert parameter name -> (first expert, experts on this rank)."""
    from models.expert_parallel import ExpertParallelMoE

    out = {}
    for prefix, module in model.named_modules():
        if isinstance(module, ExpertParallelMoE):
            for name, _ in module.experts.named_parameters():
                out[f"{prefix}.experts.{name}"] = (module.first_expert, module.local_experts)
    return out


def shard_optimizer_state(state: dict[str, Any], model: torch.nn.Module) -> dict[str, Any]:
    """A single-process optimizer state dict cut to this rank's expert shards (``model`` already
    sharded; indices are the same before and after, only expert tensors shrink)."""
    slices, names = _expert_slices(model), optimizer_names(model)
    out = {"param_groups": state["param_groups"], "state": {}}
    for index, entry in state["state"].items():
        span = slices.get(names[int(index)])
        out["state"][index] = {
            k: v[span[0] : span[0] + span[1]].clone() if span and torch.is_tensor(v) and v.dim() > 0 else v
            for k, v in entry.items()
        }
    return out


def full_optimizer_state(opt: torch.optim.Optimizer, model: torch.nn.Module) -> dict[str, Any]:
    """The optimizer state dict of the single-process model: expert moments gathered over each
    layer's expert-parallel group. Collective."""
    from models.expert_parallel import expert_parallel_layers

    state = opt.state_dict()
    layers = expert_parallel_layers(model)
    if not layers:
        return state
    # state_dict() shares the live per-parameter dicts: replace them, never their contents
    state = {**state, "state": {i: dict(entry) for i, entry in state["state"].items()}}
    slices, names, group = _expert_slices(model), optimizer_names(model), layers[0].group
    for index, entry in state["state"].items():
        if names[int(index)] not in slices:
            continue
        for k, v in list(entry.items()):
            if torch.is_tensor(v) and v.dim() > 0:
                parts = [torch.empty_like(v) for _ in range(dist.get_world_size(group))]
                dist.all_gather(parts, v.contiguous(), group=group)
                entry[k] = torch.cat(parts)
    return state
