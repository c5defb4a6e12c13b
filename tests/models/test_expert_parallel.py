"""The expert-parallel MoE layer against the single-process layer: gloo on CPU, 2 and 4 processes.

One spawned job per world size (2, then 4) runs every case in every layout and saves what each
rank got; the tests compare it with the single-process layer applied to each expert-parallel
group's concatenated batch. Layouts: 2 ranks in one EP group; 4 ranks in one group; 4 ranks as
two EP groups of 2 (each shard held twice, gradients summed over the replicas).

Each rank's loss is P * sum(y_r * g_r) + aux_r: like the trainer's, a mean over the rank's
tokens (here a sum scaled by the group size P) plus the layer's aux loss. After
``reduce_gradients`` the gradients are those of the mean of all ranks' losses, which for one EP
group is sum(y * g) + aux of the single-process layer on the group's batch (averaged over groups
when there are several), so that is what the reference differentiates. Input gradients hold the
group's sum, P times the reference's.

Noisy top-k draws its noise with ``torch.randn_like``: both sides are handed rows of one fixed
(tokens, E) tensor, so every rank sees the noise the reference sees for its tokens.

Tolerances: float32, rtol 1e-4 and atol 1e-5 (as tests/test_moe.py); token counts exactly.
"""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from models.config import Dispatch, MoEConfig, Routing
from models.expert_parallel import (
    BALANCE_REDUCTION,
    ExpertParallelMoE,
    clip_grad_norm_,
    describe,
    expert_groups,
    expert_parameter_names,
    full_state_dict,
    reduce_gradients,
    shard_experts,
)
from models.moe import MoE

D, S, E = 16, 16, 8
BASE = dict(
    experts=E,
    top_k=2,
    d_expert=12,
    capacity_factor=1.0,
    load_balance_coef=0.1,
    z_loss_coef=0.01,
    importance_coef=0.1,
    seq_balance_coef=0.1,
)
LAYOUTS = {2: [2], 4: [4, 2]}  # world size -> expert-parallel sizes run in it
STATS = ("dropped_fraction", "router_entropy", "load_balance_loss", "z_loss", "importance_loss", "load_loss")
STATS += ("seq_balance_loss", "aux_loss")


@dataclass(frozen=True)
class Case:
    name: str
    moe: dict = field(default_factory=dict)
    batches: tuple[int, ...] = (2,)  # sequences per rank, cycled over a group's ranks
    grouped: bool = False  # grouped-GEMM experts with 4-row blocks (the bf16 path's layout)
    collapsed: bool = False  # every token picks experts 0 and 1: other owners receive nothing
    train: bool = True


VARIANTS = {
    "softmax-topk": dict(routing=Routing.SOFTMAX_TOPK),
    "softmax-topk-raw": dict(routing=Routing.SOFTMAX_TOPK, renormalize=False),
    "topk-softmax": dict(routing=Routing.TOPK_SOFTMAX),
    "noisy-topk": dict(routing=Routing.NOISY_TOPK, load_coef=0.1),
    "sigmoid-bias": dict(routing=Routing.SIGMOID_BIAS, route_scale=2.5),
    "shared-gated": dict(routing=Routing.SOFTMAX_TOPK, shared_experts=1, shared_gate=True),
    "sigmoid-shared-balanced": dict(routing=Routing.SIGMOID_BIAS, shared_experts=2, force_balanced=True),
}
CASES = [Case(f"{v}-{d.value}", dict(moe, dispatch=d)) for v, moe in VARIANTS.items() for d in Dispatch]
CASES += [Case(f"uneven-{d.value}", dict(dispatch=d), batches=(1, 2, 3, 1)) for d in Dispatch] + [
    Case("grouped-blocks-dropless", dict(dispatch=Dispatch.DROPLESS), grouped=True),
    Case("collapsed-dropless", dict(dispatch=Dispatch.DROPLESS), grouped=True, collapsed=True),
    Case("collapsed-capacity", dict(dispatch=Dispatch.CAPACITY), collapsed=True),
    Case("eval-capacity", dict(dispatch=Dispatch.CAPACITY, eval_capacity_factor=0.75), train=False),
]


def build_layer(case: Case) -> MoE:
    torch.manual_seed(0)
    layer = MoE(D, MoEConfig(**{**BASE, **case.moe}), init_std=0.3, out_std=0.3)
    with torch.no_grad():
        if layer.router.noise_weight is not None:  # zero-initialised by design; give it something
            nn.init.normal_(layer.router.weight, std=0.3)
            nn.init.normal_(layer.router.noise_weight, std=0.3)
        if layer.router.bias is not None:
            layer.router.bias.copy_(torch.linspace(-0.3, 0.3, E))
        if case.collapsed:
            layer.router.weight.zero_()
            layer.router.weight[0, 0], layer.router.weight[1, 0] = 5.0, 4.0
    if case.grouped:
        layer.experts.use_grouped_mm, layer.experts.block_rows = True, 4
    return layer.train(case.train)


def batch_rows(case: Case, world: int, ep: int) -> list[slice]:
    """Each rank's sequences in the world's batch; an EP group's ranks are consecutive."""
    sizes = [case.batches[(r % ep) % len(case.batches)] for r in range(world)]
    starts = [sum(sizes[:r]) for r in range(world + 1)]
    return [slice(starts[r], starts[r + 1]) for r in range(world)]


def global_batch(case: Case, n_seq: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Input, output gradient and router noise of the whole world's batch."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n_seq, S, D, generator=g)
    if case.collapsed:
        x[..., 0] = x[..., 0].abs() + 1.0
    grad_out = torch.randn(n_seq, S, D, generator=g)
    noise = torch.randn(n_seq * S, E, generator=g)
    return x, grad_out, noise


@contextmanager
def fixed_noise(noise_TE: torch.Tensor):
    """torch.randn_like hands out these rows: the router's noise becomes a fixed tensor."""
    real = torch.randn_like

    def fake(t, *args, **kwargs):
        assert t.shape == noise_TE.shape, (t.shape, noise_TE.shape)
        return noise_TE.clone()

    torch.randn_like = fake
    try:
        yield
    finally:
        torch.randn_like = real


def token_rows(seq: slice) -> slice:
    return slice(seq.start * S, seq.stop * S)


# ---------------------------------------------------------------------------- spawned ranks


def _rank_main(rank: int, world: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{out_dir}/store", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    try:
        results: dict = {"errors": {}}
        for ep in LAYOUTS[world]:
            group, replicas = expert_groups(ep)
            for case in CASES:
                results[f"ep{ep}/{case.name}"] = _run_case(case, rank, world, ep, group, replicas)
        try:
            ExpertParallelMoE(MoE(D, MoEConfig(experts=6, top_k=2, d_expert=4), 0.1, 0.1))
        except ValueError as e:
            results["errors"]["experts"] = str(e)
        try:
            expert_groups(3)
        except ValueError as e:
            results["errors"]["groups"] = str(e)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _run_case(case: Case, rank: int, world: int, ep: int, group, replicas) -> dict:
    rows = batch_rows(case, world, ep)[rank]
    x, grad_out, noise = global_batch(case, batch_rows(case, world, ep)[-1].stop)
    holder = nn.ModuleDict({"ffn": build_layer(case)})
    shard_experts(holder, group)
    layer = holder["ffn"]
    x_r = x[rows].clone().requires_grad_()
    with fixed_noise(noise[token_rows(rows)]):
        y = layer(x_r)
    (ep * (y * grad_out[rows]).sum() + layer.stats.aux_loss).backward()
    reduce_gradients(holder, replicas)
    norm = clip_grad_norm_(holder, math.inf)
    state = full_state_dict(holder)
    out = {
        "y": y.detach(),
        "x_grad": x_r.grad / ep,
        "grads": {n.removeprefix("ffn."): p.grad.clone() for n, p in holder.named_parameters()},
        "stats": {k: getattr(layer.stats, k).detach() for k in ("tokens_per_expert", *STATS)},
        "norm": norm,
        "state": {k.removeprefix("ffn."): v for k, v in state.items() if ".experts." in k},
        "expert_names": expert_parameter_names(holder),
        "describe": describe(holder),
    }
    if layer.router.bias is not None:
        out["load_accum"] = layer.router.load_accum.clone()
        layer.router.update_bias()
        out["bias"] = layer.router.bias.clone()
    return out


# ------------------------------------------------------------------------------ the tests


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """world size -> every rank's saved results; each world's processes spawn once."""
    done: dict[int, list[dict]] = {}

    def run(world: int) -> list[dict]:
        if world not in done:
            out = tmp_path_factory.mktemp(f"ep-world{world}")
            mp.spawn(_rank_main, args=(world, str(out)), nprocs=world, join=True)
            done[world] = [torch.load(out / f"rank{r}.pt") for r in range(world)]
        return done[world]

    return run


def reference(case: Case, world: int, ep: int) -> list[dict]:
    """Per EP group: the single-process layer on the group's batch. Parameter gradients are
    those of the mean over groups of sum(y * g) + aux, as reduce_gradients leaves them."""
    rows = batch_rows(case, world, ep)
    x, grad_out, noise = global_batch(case, rows[-1].stop)
    n_groups = world // ep
    groups, grads = [], None
    for k in range(n_groups):
        seqs = slice(rows[k * ep].start, rows[(k + 1) * ep - 1].stop)
        layer = build_layer(case)
        x_k = x[seqs].clone().requires_grad_()
        with fixed_noise(noise[token_rows(seqs)]):
            y = layer(x_k)
        ((y * grad_out[seqs]).sum() + layer.stats.aux_loss).backward()
        g = {n: p.grad / n_groups for n, p in layer.named_parameters()}
        grads = g if grads is None else {n: grads[n] + g[n] for n in g}
        out = {"y": y.detach(), "x_grad": x_k.grad, "start": seqs.start, "stats": layer.stats}
        out["weights"] = {f"experts.{w}": getattr(layer.experts, w).detach() for w in ("w1", "w2", "w3")}
        if layer.router.bias is not None:
            out["load_accum"] = layer.router.load_accum.clone()
            layer.router.update_bias()
            out["bias"] = layer.router.bias.clone()
        groups.append(out)
    for out in groups:
        out["grads"] = grads
        out["norm"] = torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in grads.values()]))
    return groups


def close(actual, expected, what: str) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5, msg=lambda m: f"{what}: {m}")


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("world,ep", [(2, 2), (4, 4), (4, 2)], ids=["2ranks", "4ranks", "2x2ranks"])
def test_expert_parallel_equals_single_process(job, world, ep, case):
    ranks = job(world)
    refs = reference(case, world, ep)
    rows = batch_rows(case, world, ep)
    L = E // ep
    for rank, res in enumerate(ranks):
        got, ref = res[f"ep{ep}/{case.name}"], refs[rank // ep]
        local = slice(rows[rank].start - ref["start"], rows[rank].stop - ref["start"])
        where = f"rank {rank}"
        close(got["y"], ref["y"][local], f"{where} output")
        close(got["x_grad"], ref["x_grad"][local], f"{where} input gradient")
        assert got["grads"].keys() == ref["grads"].keys()
        for name, g in got["grads"].items():
            expected = ref["grads"][name]
            if name.startswith("experts."):  # this rank's shard of the experts
                expected = expected[rank % ep * L : (rank % ep + 1) * L]
            close(g, expected, f"{where} gradient of {name}")
        assert torch.equal(got["stats"]["tokens_per_expert"], ref["stats"].tokens_per_expert), where
        for name in STATS:
            close(got["stats"][name], getattr(ref["stats"], name).detach(), f"{where} {name}")
        close(got["norm"], ref["norm"], f"{where} gradient norm")
        for name, w in got["state"].items():  # full_state_dict gathers the shards back
            assert torch.equal(w, ref["weights"][name]), f"{where} {name}"
        assert sorted(got["expert_names"]) == ["ffn.experts.w1", "ffn.experts.w2", "ffn.experts.w3"]
        if "bias" in ref:  # the aux-loss-free update sees the group's load: biases agree
            assert torch.equal(got["load_accum"], ref["load_accum"]), where
            close(got["bias"], ref["bias"], f"{where} router bias")
    if case.moe["dispatch"] is Dispatch.CAPACITY and not case.moe.get("force_balanced"):
        assert all(float(r["stats"].dropped_fraction) > 0 for r in refs), "the case should drop assignments"


def test_collapsed_router_leaves_owners_idle():
    """The collapsed cases do what they are for: ranks that own neither expert 0 nor 1 get no rows."""
    refs = reference(next(c for c in CASES if c.name == "collapsed-dropless"), 4, 4)
    counts = refs[0]["stats"].tokens_per_expert
    assert counts[2:].sum() == 0 and counts[:2].sum() > 0


@pytest.mark.slow
def test_errors_and_record(job):
    rank0 = job(4)[0]
    assert "moe.experts (6) must be divisible by the expert-parallel group size (4)" in rank0["errors"]["experts"]
    assert "must divide the world size (4), got 3" in rank0["errors"]["groups"]
    info = rank0["ep2/softmax-topk-dropless"]["describe"]
    assert info["expert_parallel_size"] == 2 and info["experts_per_rank"] == E // 2
    assert info["balance_reduction"] == BALANCE_REDUCTION == "global"


@pytest.mark.gpu
@pytest.mark.parametrize("dispatch", list(Dispatch))
def test_cuda_bf16_one_host_sync_per_forward(dispatch, tmp_path):
    """On CUDA in bf16 the only host sync is the copy of the split sizes: one per forward, none
    in backward. A one-rank NCCL group: the all_to_all_single still runs, to itself."""
    dist.init_process_group("nccl", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        torch.cuda.set_device(0)
        cfg = MoEConfig(experts=8, top_k=2, d_expert=512, dispatch=dispatch)
        layer = ExpertParallelMoE(MoE(256, cfg, 0.02, 0.02)).cuda()
        x = torch.randn(2, 512, 256, device="cuda", requires_grad=True)

        def forward() -> torch.Tensor:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y = layer(x)
            return y.float().sum() + layer.stats.aux_loss

        forward().backward()  # communicator and kernel set-up
        torch.cuda.synchronize()
        counts = []
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                loss = forward()
                counts.append(sum("synchroniz" in str(w.message) for w in caught))
                loss.backward()
                counts.append(sum("synchroniz" in str(w.message) for w in caught) - counts[0])
            finally:
                torch.cuda.set_sync_debug_mode("default")
        assert counts == [1, 0], f"host syncs in forward, backward: {counts}"
        assert torch.isfinite(x.grad).all()
    finally:
        dist.destroy_process_group()
