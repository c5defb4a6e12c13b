"""Expert-parallel dispatch against local dispatch at the same global shape.

Forward + backward of the MoE layer on a global batch of T tokens, two ways: one process holding
all E experts (``models.moe.MoE``, local dispatch), and P ranks each holding E / P experts and
T / P tokens (``models.expert_parallel.ExpertParallelMoE``: an all-gather of the routing counts,
two all_to_all_single of the rows, an all-reduce of the balance sums). This pytest process is
rank 0, the other ranks are spawned; rounds interleave the two (this machine drifts), the other
ranks waiting while rank 0 runs the local layer, and the median of the per-round ratios (P-rank
step time / local step time) goes into ``extra_info`` with the shapes and medians. Run with
``make bench``.

CPU: gloo, 2 ranks of one thread each against one process on the same two cores, float32, the
shape of tests/benchmarks/test_moe_ffn.py's CPU case; the local layer runs with two threads and
with one (on a loaded machine OpenMP over two threads can be several times slower), both are
recorded and the faster is the baseline: the ratio is the price of dispatching over processes
(1.0 would be free, 0.5 a perfect split). CUDA, when 2 GPUs are visible: NCCL, 2 ranks
on 2 GPUs against one GPU, bf16: below 1.0, sharding pays. Ratios are recorded; there is no
goal to assert.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from models.config import Dispatch, MoEConfig
from models.expert_parallel import ExpertParallelMoE
from models.moe import MoE


@dataclass(frozen=True)
class Case:
    device: str
    dtype: torch.dtype
    ranks: int
    tokens: int  # global: every rank gets tokens / ranks
    d_model: int
    experts: int
    top_k: int
    d_expert: int
    dispatch: Dispatch
    rounds: int

    @property
    def id(self) -> str:
        dt = str(self.dtype).removeprefix("torch.")
        return (
            f"{self.device}-{dt}-P{self.ranks}-T{self.tokens}-d{self.d_model}-E{self.experts}k{self.top_k}"
            f"-F{self.d_expert}-{self.dispatch.value}"
        )


CASES = [
    Case("cpu", torch.float32, 2, 4096, 256, 8, 2, 512, Dispatch.DROPLESS, rounds=10),
    Case("cpu", torch.float32, 2, 4096, 256, 8, 2, 512, Dispatch.CAPACITY, rounds=10),
    Case("cuda", torch.bfloat16, 2, 32768, 1024, 8, 2, 2048, Dispatch.DROPLESS, rounds=30),
    Case("cuda", torch.bfloat16, 2, 32768, 1024, 64, 8, 512, Dispatch.DROPLESS, rounds=30),
]
SEQ = 512  # tokens per sequence: a rank's batch is (tokens / ranks / SEQ, SEQ, d_model)


def _layer(case: Case) -> MoE:
    torch.manual_seed(0)  # identical on every rank: the same layer, sharded or not
    cfg = MoEConfig(experts=case.experts, top_k=case.top_k, d_expert=case.d_expert, dispatch=case.dispatch)
    return MoE(case.d_model, cfg, 0.02, 0.02)


def _batch(case: Case, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(case.tokens // SEQ, SEQ, case.d_model, generator=g)
    return x.to(device).requires_grad_()


def _rows(case: Case, rank: int) -> slice:
    per = case.tokens // SEQ // case.ranks
    return slice(rank * per, (rank + 1) * per)


def _step(layer: MoE, x: torch.Tensor, case: Case) -> torch.Tensor:
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=case.dtype == torch.bfloat16):
        y = layer(x)
    (y.float().sum() + layer.stats.aux_loss).backward()
    layer.zero_grad(set_to_none=True)
    x.grad = None
    return y


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _join(case: Case, rank: int, store: str) -> torch.device:
    device = torch.device("cpu")
    backend = "gloo"
    if case.device == "cuda":
        device, backend = torch.device("cuda", rank), "nccl"
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend, init_method=f"file://{store}", rank=rank, world_size=case.ranks, timeout=timedelta(seconds=300)
    )
    return device


def _ep_layer(case: Case, device: torch.device) -> tuple[ExpertParallelMoE, torch.Tensor]:
    layer = ExpertParallelMoE(_layer(case)).to(device)
    x = _batch(case, torch.device("cpu"))[_rows(case, dist.get_rank())].detach().to(device).requires_grad_()
    return layer, x


def _go(flag: int, device: torch.device) -> int:
    """Rank 0 tells the others whether another round follows (1) or the run is over (0)."""
    t = torch.tensor([flag], device=device)
    dist.broadcast(t, src=0)
    return int(t.item())


def _worker(index: int, case: Case, store: str) -> None:
    """Ranks 1 to P - 1 (start_processes numbers them from 0): one EP step per round."""
    torch.set_num_threads(1)
    device = _join(case, index + 1, store)
    try:
        layer, x = _ep_layer(case, device)
        _step(layer, x, case)  # the equality check's step
        while _go(0, device):
            _step(layer, x, case)
            _sync(device)
            dist.barrier()
    finally:
        dist.destroy_process_group()


def _measure(benchmark, case: Case, device: torch.device, rounds: int, warmup: int) -> dict:
    local, x_all = _layer(case).to(device), _batch(case, device)
    ep, x = _ep_layer(case, device)
    threads = torch.get_num_threads()
    # The same function: rank 0's rows of the local layer's output are the EP layer's.
    y_local, y_ep = _step(local, x_all, case)[_rows(case, 0)], _step(ep, x, case)
    tol = 2e-2 if case.dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(y_ep.float(), y_local.float(), rtol=tol, atol=tol)

    # CPU: the local layer on the P cores the ranks use between them, and on one (on a loaded
    # machine OpenMP over several threads can be the slower); the faster is the baseline.
    local_threads = {f"local_{n}_threads": n for n in (case.ranks, 1)} if device.type == "cpu" else {"local": 0}
    times: dict[str, list[float]] = {name: [] for name in [*local_threads, "expert_parallel"]}

    def one_round() -> None:
        for name, n in local_threads.items():
            if n:
                torch.set_num_threads(n)
            _sync(device)
            start = time.perf_counter()
            _step(local, x_all, case)
            _sync(device)
            times[name].append(time.perf_counter() - start)
        if device.type == "cpu":
            torch.set_num_threads(1)
        _go(1, device)
        start = time.perf_counter()
        _step(ep, x, case)
        _sync(device)
        dist.barrier()  # the step ends when the slowest rank is done
        times["expert_parallel"].append(time.perf_counter() - start)

    try:
        benchmark.pedantic(one_round, rounds=rounds, iterations=1, warmup_rounds=warmup)
    finally:
        torch.set_num_threads(threads)
    for name in times:  # drop the warm-up rounds
        times[name] = times[name][warmup:]
    best = [min(ts) for ts in zip(*(times[name] for name in local_threads), strict=True)]
    ratios = [e / loc for e, loc in zip(times["expert_parallel"], best, strict=True)]

    def ratio_to(name: str) -> float:
        return statistics.median(e / t for e, t in zip(times["expert_parallel"], times[name], strict=True))

    return {
        "case": case.id,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "backend": dist.get_backend(),
        "dtype": str(case.dtype),
        "ranks": case.ranks,
        "threads_per_rank": 1 if device.type == "cpu" else None,
        "tokens_global": case.tokens,
        "tokens_per_rank": case.tokens // case.ranks,
        "d_model": case.d_model,
        "experts": case.experts,
        "experts_per_rank": case.experts // case.ranks,
        "top_k": case.top_k,
        "d_expert": case.d_expert,
        "dispatch": case.dispatch.value,
        "rounds_timed": len(ratios),
        "median_ms": {name: 1e3 * statistics.median(t) for name, t in times.items()},
        "ratio_expert_parallel_to_local": statistics.median(ratios),
        **{f"ratio_expert_parallel_to_{name}": ratio_to(name) for name in local_threads if name != "local"},
    }


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_expert_parallel_dispatch_against_local(benchmark, report_row, goals, case: Case):
    if case.device == "cuda" and torch.cuda.device_count() < case.ranks:
        pytest.skip(f"needs {case.ranks} CUDA devices")
    store = os.path.join(tempfile.mkdtemp(prefix="ep-bench-"), "store")
    others = mp.start_processes(_worker, args=(case, store), nprocs=case.ranks - 1, join=False, start_method="spawn")
    try:
        device = _join(case, 0, store)
        try:
            info = _measure(benchmark, case, device, goals.rounds(case.rounds, smoke=1), 1 if goals.smoke else 2)
        finally:
            _go(0, device)  # the other ranks leave their loop
            dist.destroy_process_group()
        while not others.join():
            pass
    finally:
        for process in others.processes:
            if process.is_alive():
                process.terminate()
    goals.finish(benchmark, report_row, info)  # no goals: ratios recorded
    medians = ", ".join(f"{name} {ms:.1f} ms" for name, ms in info["median_ms"].items())
    print(f"\n{case.id}: {medians}; ratio to the faster local {info['ratio_expert_parallel_to_local']:.3f}")
