"""Expert parallelism: the MoE layer's routed experts sharded over the ranks of a process group.

Each of the P ranks of an expert-parallel (EP) group holds experts [rank * E/P, (rank + 1) * E/P)
of every MoE layer; the router and the shared experts are replicated. A rank routes its own
tokens, sends every assignment's row to the rank that owns the chosen expert with one
``all_to_all_single``, the owner runs its experts on what it received, and a second
``all_to_all_single`` brings the outputs back to be combined with the gates (NCCL on GPU, gloo
on CPU). The layer computes the single-process :class:`models.moe.MoE` applied to the
concatenation of the group's local batches in rank order: the same outputs and gradients, the
same capacity (over the group's token count, slots filled in the group-wide priority order),
the same balance losses and routing statistics (see :data:`BALANCE_REDUCTION`).

    group, replicas = expert_groups(ep_size)     # or group=None: the whole world
    model = Transformer(cfg).to(device)          # same seed on every rank: identical replicas
    shard_experts(model, group)                  # after loading a checkpoint, before the optimizer
    (out.loss + out.aux_loss).backward()         # out.loss: the mean over this rank's tokens
    reduce_gradients(model, replicas)            # or DDP ignoring expert_parameter_names(model),
                                                 # then reduce_expert_gradients(model, replicas)
    clip_grad_norm_(model, max_norm)             # the norm of the whole sharded model
    opt.step(); model.update_router_biases()

Gradients. Every collective here is differentiable, so backward on each rank computes the
gradient of the *sum over the group's ranks* of their losses: an expert shard's gradient on its
owner already holds every rank's contribution, a replicated parameter holds this rank's share.
Training on the mean over ranks (each rank's loss a mean over its tokens) therefore averages
the replicated gradients over all ranks (what DDP does) and divides the expert gradients by the
world size after summing them over the ranks holding the same shard (Megatron-Core scales
expert gradients by 1 / data-parallel size for the same reason).

Host syncs: one per layer forward, ``.tolist()`` of the split sizes that ``all_to_all_single``
needs on the host (with the capacity and the sequence lengths in the same copy). Routing
counts, capacity positions and losses stay on the device. (The expert loop of
``Experts.forward_sorted``, float32 on CUDA, syncs too, on one rank as on one process; CPU and
bf16 on CUDA use grouped GEMMs.)

Tests: ``pytest tests/models/test_expert_parallel.py`` (gloo, 2 and 4 processes on CPU); benchmark:
``tests/benchmarks/test_expert_parallel_dispatch.py`` (``make bench``).

Shape legend beyond models/moe.py's: P ranks in the EP group, L = E / P experts per rank,
R rows a rank receives for its experts.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from models.config import Dispatch
from models.moe import (
    Experts,
    MoE,
    RouterOutput,
    RoutingStats,
    _count,
    cv_squared,
    gate_matrix,
    routing_stats,
    sequence_balance_loss,
    switch_balance_loss,
    token_entropy,
    weighted_aux,
)

BALANCE_REDUCTION = "global"
"""Where the balance losses and routing statistics of an expert-parallel layer are reduced:
``"global"``, over the tokens of the whole EP group (the concatenation of its ranks' batches).

Every rank computes its local sums (router probabilities per expert, token counts, z-loss and
entropy terms, gate importance, smooth load, per-sequence losses), one all-reduce over the group
adds them up, and the losses are formed from the totals, so every rank holds the same values
and they equal the single-process layer's on the concatenated batch: ``tokens_per_expert``,
``dropped_fraction`` and the entropy are the group's, not the rank's. The aux-loss-free
routers' load accumulators add the group's counts, so their biases stay identical on all ranks.
The all-reduce is differentiable: the gradient reaching each rank's router is its share of the
gradient of the group-level loss.

Other systems differ. Megatron-Core's default ``aux_loss`` balance type forms f_i and P_i on
each rank's micro-batch (counts summed only over tensor/context-parallel ranks), with
``global_aux_loss`` as the option that counts over data-parallel ranks too; torchtitan sums the
expert load counts over ranks before its aux-loss-free bias update. A global loss is the
single-process loss of the same batch, so expert-parallel and single-process runs of a study
optimise the same objective; the cost is one all-reduce of about 3E + 4 floats per layer.
"""


def expert_groups(size: int) -> tuple[dist.ProcessGroup, dist.ProcessGroup | None]:
    """Split the world into EP groups of ``size`` consecutive ranks. Returns this rank's EP group
    and its replica group (the ranks holding the same expert shard in the other EP groups;
    None when one group spans the world). Collective: every rank calls it, in the same order.

    A group of its own, even one spanning the world, keeps the layer's collectives apart from
    DDP's gradient all-reduces on the default group."""
    world, rank = dist.get_world_size(), dist.get_rank()
    if size < 1 or world % size:
        raise ValueError(f"expert-parallel size must divide the world size ({world}), got {size}")
    mine: dict[str, Any] = {}
    for k in range(world // size):
        ranks = list(range(k * size, (k + 1) * size))
        group = dist.new_group(ranks)
        if rank in ranks:
            mine["ep"] = group
    if world == size:
        return mine["ep"], None
    for i in range(size):
        ranks = list(range(i, world, size))
        group = dist.new_group(ranks)
        if rank in ranks:
            mine["replicas"] = group
    return mine["ep"], mine["replicas"]


@dataclass
class _RoutingTable:
    """One forward's routing over the EP group, from the one collective of counts and the one
    host sync: what the sender, the owner and the statistics each need."""

    experts_N: Tensor  # this rank's assignments' experts, in priority order n = j * T + t
    counts_KE: Tensor  # this rank's assignments per (choice, expert), flat
    base_PKE: Tensor  # global priority position of each (rank, choice, expert) group's first
    kept_PKE: Tensor  # assignments within capacity per (rank, choice, expert)
    B_all: Tensor  # the group's batch size
    tokens_per_expert_E: Tensor
    send: list[int]  # rows this rank sends each owner
    recv: list[int]  # rows each rank sends here
    C: int  # the capacity per expert (0 without one)


class ExpertParallelMoE(MoE):
    """An :class:`MoE` whose routed experts are sharded over ``group`` (default: the world).

    Built from a single-process layer, whose router and shared experts it adopts and whose
    experts it slices (this rank's E / P, copied; the full weights can then be freed). Still an
    ``MoE``: the model finds it, reads ``stats``, calls ``router.update_bias()`` as before.

    The ranks' batches may differ in size but must share the sequence length. The
    forced-balanced benchmark routing counts token positions per rank."""

    def __init__(self, moe: MoE, group: dist.ProcessGroup | None = None):
        if isinstance(moe, ExpertParallelMoE):
            raise ValueError("this MoE layer is already expert-parallel")
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        E = moe.cfg.experts
        if E % size:
            raise ValueError(
                f"moe.experts ({E}) must be divisible by the expert-parallel group size ({size}): "
                f"each rank holds experts / size of them"
            )
        # Not MoE.__init__: that would build (and initialise) a full set of experts.
        nn.Module.__init__(self)
        self.cfg = moe.cfg
        self.group, self.size, self.rank = group, size, rank
        self.local_experts = E // size
        self.first_expert = rank * self.local_experts
        self.router = moe.router
        self.experts = _local_experts(moe.experts, self.first_expert, self.local_experts)
        self.shared = moe.shared
        self.shared_gate = moe.shared_gate
        self.stats: RoutingStats | None = None
        self.train(moe.training)

    def forward(self, x_BSD: Tensor) -> Tensor:
        cfg = self.cfg
        B, S, D = x_BSD.shape
        T = B * S
        x_TD = x_BSD.reshape(T, D)
        r = self.router(x_TD)
        capacity = cfg.dispatch is Dispatch.CAPACITY
        table = self._routing_table(r, B, S, capacity)

        sent_N = self._sent_assignments(table, T, capacity)
        token_N = sent_N % T
        x_ND = x_TD.index_select(0, token_N).to(self.experts.compute_dtype(x_TD))
        x_RD = _AllToAll.apply(x_ND, table.recv, table.send, self.group)
        y_RD = self._run_received(x_RD, table, capacity)

        # Back to the sender, combined with the gates as the single-process layer does.
        y_ND = _AllToAll.apply(y_RD, table.send, table.recv, self.group)
        gate_N1 = r.gates_TK.t().reshape(-1)[sent_N].unsqueeze(-1).to(y_ND.dtype)
        y_TD = y_ND.new_zeros(x_TD.shape).index_add_(0, token_N, y_ND * gate_N1)
        y_TD = self._add_shared(x_TD, y_TD)

        if self.training and self.router.bias is not None:
            self.router.load_accum.add_(table.tokens_per_expert_E.float())
        if capacity:
            dropped = 1.0 - table.kept_PKE.sum().float() / (table.B_all * S * cfg.top_k).float()
        else:
            dropped = x_TD.new_zeros((), dtype=torch.float32)
        self.stats = self._group_losses(r, table.tokens_per_expert_E, dropped, B, S, table.B_all)
        return y_TD.view(B, S, D)

    def _routing_table(self, r: RouterOutput, B: int, S: int, capacity: bool) -> _RoutingTable:
        """The whole group's routing in counts, the capacity, and the rows each rank sends where."""
        cfg, P, L, G = self.cfg, self.size, self.local_experts, self.first_expert
        T, E, K = B * S, cfg.experts, cfg.top_k
        dev = r.experts_TK.device

        # Every rank's assignment counts per (choice j, expert e), batch size and sequence length,
        # gathered in one collective: the whole group's routing table, in counts.
        experts_N = r.experts_TK.t().reshape(-1)  # priority order: n = j * T + t
        choice_N = torch.arange(T * K, device=dev) // T
        counts_KE = _count(choice_N * E + experts_N, K * E)
        shape_2 = torch.stack([counts_KE.new_full((), B), counts_KE.new_full((), S)])
        table_PX = _all_gather(torch.cat([counts_KE, shape_2]), self.group)
        counts_PKE = table_PX[:, : K * E].view(P, K, E)
        B_all = table_PX[:, K * E].sum()
        tokens_per_expert_E = counts_PKE.sum((0, 1))

        # Global priority position of the first assignment of each (rank, choice, expert) group:
        # all earlier choices of every rank, then the same choice of the ranks before.
        total_KE = counts_PKE.sum(0)
        base_PKE = (total_KE.cumsum(0) - total_KE)[None] + (counts_PKE.cumsum(0) - counts_PKE)
        if capacity:
            cf = cfg.capacity_factor if self.training else cfg.eval_capacity_factor
            # ceil(cf * B * S * K / E) on the group's batch, in float64 and in the order the
            # single-process layer's Python evaluates it, so the two agree to the last bit.
            C_1 = torch.ceil(B_all.double() * cf * S * K / E).long().view(1)
            kept_PKE = (C_1 - base_PKE).clamp_min(0).minimum(counts_PKE)
        else:
            C_1 = counts_KE.new_zeros(1)
            kept_PKE = counts_PKE
        send_P = kept_PKE[self.rank].sum(0).view(P, L).sum(1)  # rows this rank sends each owner
        recv_P = kept_PKE[:, :, G : G + L].sum((1, 2))  # rows each rank sends here
        # The one host sync: split sizes for the collectives, the capacity, every rank's S.
        host = torch.cat([send_P, recv_P, C_1, table_PX[:, K * E + 1]]).tolist()
        send, recv, C, seq_lens = host[:P], host[P : 2 * P], host[2 * P], host[2 * P + 1 :]
        if any(s != S for s in seq_lens):
            raise ValueError(f"expert-parallel ranks must share the sequence length, got {seq_lens}")
        return _RoutingTable(experts_N, counts_KE, base_PKE, kept_PKE, B_all, tokens_per_expert_E, send, recv, C)

    def _sent_assignments(self, table: _RoutingTable, T: int, capacity: bool) -> Tensor:
        """The assignments this rank sends, in the order the owners receive them."""
        K, experts_N = self.cfg.top_k, table.experts_N
        # Sender: assignments sorted by expert (owners in rank order), each expert's in priority
        # order; with a capacity the dropped ones move to the end and are never sent.
        order_N = torch.argsort(experts_N, stable=True)
        if capacity:
            expert_sorted_N = experts_N[order_N]
            group_N = expert_sorted_N * K + order_N // T  # its (expert, choice) group, flat
            size_EK = table.counts_KE.view(K, self.cfg.experts).t().reshape(-1)
            start_EK = size_EK.cumsum(0) - size_EK
            index_N = torch.arange(T * K, device=experts_N.device) - start_EK[group_N]
            position_N = table.base_PKE[self.rank].t().reshape(-1)[group_N] + index_N
            dropped_N = (position_N >= table.C).to(torch.uint8)
            order_N = order_N[torch.argsort(dropped_N, stable=True)]
        return order_N[: sum(table.send)]

    def _run_received(self, x_RD: Tensor, table: _RoutingTable, capacity: bool) -> Tensor:
        """This rank's experts on the rows sent to it, outputs in the order the rows came."""
        P, L, G, K, C = self.size, self.local_experts, self.first_expert, self.cfg.top_k, table.C
        dev = x_RD.device
        # Owner: received rows come grouped by (source rank, local expert, choice).
        size_PLK = table.kept_PKE[:, :, G : G + L].permute(0, 2, 1).reshape(-1)  # flat, as the rows come
        R = x_RD.shape[0]
        group_R = torch.repeat_interleave(torch.arange(P * L * K, device=dev), size_PLK, output_size=R)
        local_R = group_R // K % L
        if capacity:
            start_PLK = size_PLK.cumsum(0) - size_PLK
            base_PLK = table.base_PKE[:, :, G : G + L].permute(0, 2, 1).reshape(-1)
            position_R = base_PLK[group_R] + torch.arange(R, device=dev) - start_PLK[group_R]
            return self.experts.forward_slots(x_RD, local_R * C + position_R, C)
        order_R = torch.argsort(local_R, stable=True)
        rows_L = size_PLK.view(P, L, K).sum((0, 2))
        y_sorted_RD = self.experts.forward_grouped(x_RD.index_select(0, order_R), local_R[order_R], rows_L)
        return y_sorted_RD.new_zeros(y_sorted_RD.shape).index_copy(0, order_R, y_sorted_RD)

    def _group_losses(
        self, r: RouterOutput, tokens_per_expert_E: Tensor, dropped: Tensor, B: int, S: int, B_all: Tensor
    ) -> RoutingStats:
        """MoE._losses over the group's batch: local sums, one differentiable all-reduce, totals."""
        cfg, probs_TE = self.cfg, r.probs_TE
        local = {
            "probs": probs_TE.sum(0),
            "z": torch.logsumexp(r.logits_TE, dim=-1).square().sum().view(1),  # ST-MoE eq. 5
            "importance": gate_matrix(r).sum(0),  # Shazeer et al. 2017 eq. 6
            "seq": (sequence_balance_loss(r, B, S) * B).view(1),  # sum over this rank's sequences
            "entropy": token_entropy(probs_TE).sum().detach().view(1),
        }
        if r.smooth_load_TE is not None:
            local["load"] = r.smooth_load_TE.sum(0)
        summed = _AllReduceSum.apply(torch.cat(list(local.values())), self.group)
        total = dict(zip(local, summed.split([v.numel() for v in local.values()]), strict=True))
        T_all = (B_all * S).float()
        lb = switch_balance_loss(total["probs"] / T_all, tokens_per_expert_E.float())
        z = total["z"][0] / T_all
        importance = cv_squared(total["importance"])
        load = cv_squared(total["load"]) if "load" in total else probs_TE.new_zeros(())
        seq = total["seq"][0] / B_all.float()
        aux = weighted_aux(cfg, lb, z, importance, load, seq)
        entropy = total["entropy"][0] / T_all
        return routing_stats(tokens_per_expert_E, dropped, entropy, lb, z, importance, load, seq, aux)


def _local_experts(experts: Experts, first: int, count: int) -> Experts:
    """Experts [first, first + count) of ``experts``, copied into a module of their own."""
    _, F, D = experts.w1.shape
    with torch.device("meta"):  # shapes only: no memory, no draw from the random generator
        local = Experts(count, D, F, experts.init_std, experts.out_std)
    for name in ("w1", "w2", "w3"):
        full = getattr(experts, name)
        shard = full.detach()[first : first + count].clone()
        setattr(local, name, nn.Parameter(shard, requires_grad=full.requires_grad))
    local.use_grouped_mm, local.block_rows = experts.use_grouped_mm, experts.block_rows
    return local


def shard_experts(model: nn.Module, group: dist.ProcessGroup | None = None) -> list[ExpertParallelMoE]:
    """Replace every MoE layer inside ``model`` by its expert-parallel form over ``group``.

    Collective in spirit: every rank of the group calls it on an identical model (same seed,
    or the same checkpoint loaded before sharding). Build the optimizer afterwards."""
    layers = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, MoE) and not isinstance(child, ExpertParallelMoE):
                layer = ExpertParallelMoE(child, group)
                setattr(parent, name, layer)
                layers.append(layer)
    return layers


def expert_parallel_layers(model: nn.Module) -> list[ExpertParallelMoE]:
    return [m for m in model.modules() if isinstance(m, ExpertParallelMoE)]


def expert_parameter_names(model: nn.Module) -> list[str]:
    """Names of the sharded expert parameters: the list DDP must ignore."""
    ids = {id(p) for p in _expert_parameters(model)}
    return [n for n, p in model.named_parameters() if id(p) in ids]


def _expert_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    for layer in expert_parallel_layers(model):
        yield from layer.experts.parameters()


def reduce_expert_gradients(model: nn.Module, replicas: dist.ProcessGroup | None = None) -> None:
    """Expert gradients of the mean over all ranks' losses: summed over ``replicas`` (the ranks
    holding the same shards in other EP groups, see :func:`expert_groups`), divided by the world
    size. Call after backward, with DDP taking care of the replicated parameters."""
    grads = [p.grad for p in _expert_parameters(model) if p.grad is not None]
    if replicas is not None and dist.get_world_size(replicas) > 1:
        _all_reduce_flat(grads, replicas)
    world = dist.get_world_size()
    for g in grads:
        g.div_(world)


def reduce_gradients(model: nn.Module, replicas: dist.ProcessGroup | None = None) -> None:
    """Without DDP: replicated gradients averaged over all ranks, then
    :func:`reduce_expert_gradients`. Afterwards every parameter's gradient is that of the mean of
    the ranks' losses."""
    experts = {id(p) for p in _expert_parameters(model)}
    grads = [p.grad for p in model.parameters() if id(p) not in experts and p.grad is not None]
    _all_reduce_flat(grads, None)
    world = dist.get_world_size()
    for g in grads:
        g.div_(world)
    reduce_expert_gradients(model, replicas)


@torch.no_grad()
def clip_grad_norm_(model: nn.Module, max_norm: float) -> Tensor:
    """torch.nn.utils.clip_grad_norm_ (2-norm) over the whole sharded model: replicated parameters
    counted once, each expert shard once. Call after the gradients are reduced (replicas agree);
    returns the total norm, a device tensor."""
    experts = {id(p) for p in _expert_parameters(model)}
    params = [p for p in model.parameters() if p.grad is not None]
    zero = torch.zeros((), dtype=torch.float32, device=params[0].grad.device) if params else torch.zeros(())
    replicated_sq = sum((p.grad.float().square().sum() for p in params if id(p) not in experts), zero)
    expert_sq = sum((p.grad.float().square().sum() for p in params if id(p) in experts), zero.clone())
    layers = expert_parallel_layers(model)
    if layers:
        dist.all_reduce(expert_sq, group=layers[0].group)
    total = (replicated_sq + expert_sq).sqrt()
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for p in params:
        p.grad.mul_(scale.to(p.grad.dtype))
    return total


def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The single-process model's state dict: each layer's expert shards gathered over its EP
    group. Collective: every rank calls it."""
    state = model.state_dict()
    for prefix, module in model.named_modules():
        if isinstance(module, ExpertParallelMoE):
            for name in ("w1", "w2", "w3"):
                key = f"{prefix}.experts.{name}" if prefix else f"experts.{name}"
                state[key] = _all_gather(getattr(module.experts, name).detach(), module.group).flatten(0, 1)
    return state


def describe(model: nn.Module) -> dict[str, Any] | None:
    """How the model's experts are parallel, for record.json; None when they are not."""
    layers = expert_parallel_layers(model)
    if not layers:
        return None
    return {
        "expert_parallel_size": layers[0].size,
        "experts_per_rank": layers[0].local_experts,
        "balance_reduction": BALANCE_REDUCTION,
        "balance_reduction_over": "expert-parallel group",
        "dispatch": "all_to_all_single",
    }


# Collectives. Autograd-aware ones carry the gradient back across ranks.


class _AllToAll(torch.autograd.Function):
    """all_to_all_single of rows; backward sends the gradients back the way the rows came."""

    @staticmethod
    def forward(ctx, x_ND: Tensor, recv: list[int], send: list[int], group) -> Tensor:
        ctx.recv, ctx.send, ctx.group = recv, send, group
        return _all_to_all(x_ND, recv, send, group)

    @staticmethod
    def backward(ctx, grad_RD: Tensor):
        return _all_to_all(grad_RD, ctx.send, ctx.recv, ctx.group), None, None, None


def _all_to_all(x_ND: Tensor, recv: list[int], send: list[int], group) -> Tensor:
    out = x_ND.new_empty((sum(recv), *x_ND.shape[1:]))
    dist.all_to_all_single(out, x_ND.contiguous(), recv, send, group=group)
    return out


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; every rank's result depends on every rank's input, so backward sums the
    incoming gradients over ranks as well."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def _all_gather(x: Tensor, group) -> Tensor:
    """(P, *x.shape): every rank's x, in rank order."""
    P = dist.get_world_size(group)
    out = x.new_empty((P * x.shape[0], *x.shape[1:]))  # gloo takes the concatenated form only
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.13
    gather(out, x.contiguous(), group=group)
    return out.view(P, *x.shape)


def _all_reduce_flat(grads: list[Tensor], group) -> None:
    """Sum tensors over ranks in one collective per dtype."""
    for dtype in {g.dtype for g in grads}:
        same = [g for g in grads if g.dtype == dtype]
        flat = torch.cat([g.reshape(-1) for g in same])
        dist.all_reduce(flat, group=group)
        for g, part in zip(same, flat.split([g.numel() for g in same]), strict=True):
            g.copy_(part.view_as(g))
