"""MoE FFN speed against the FLOP-matched dense SwiGLU and transformers' MixtralSparseMoeBlock
(eager and grouped_mm), and in bf16 against our own expert loop.

Forward + backward of each implementation at one shape, interleaved round by round (this
machine drifts), and the median of the per-round ratios. Run with ``make bench``; the
JSON keeps shapes, dtype, device, per-implementation medians and ratios in ``extra_info``.

Goals (CPU, fp32, T=4096, d=256, E=8, k=2, F=512, dense hidden 1024): MoE <= 1.10 x dense and
<= 0.8 x the Mixtral block, both asserted by ``make bench`` and recorded with whether they were
met by ``make bench-smoke`` and the pipeline's microbench rule (tests/benchmarks/conftest.py).
On CUDA the cases run in bf16 and report ratios only.
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass

import pytest
import torch

from models.config import MoEConfig
from models.moe import MoE
from models.transformer import SwiGLU


@dataclass(frozen=True)
class Case:
    device: str
    dtype: torch.dtype
    tokens: int
    d_model: int
    experts: int
    top_k: int
    d_expert: int
    rounds: int
    target_vs_dense: float | None = None
    target_vs_mixtral: float | None = None

    @property
    def id(self) -> str:
        dt = str(self.dtype).removeprefix("torch.")
        return f"{self.device}-{dt}-T{self.tokens}-d{self.d_model}-E{self.experts}k{self.top_k}-F{self.d_expert}"


CASES = [
    Case("cpu", torch.float32, 4096, 256, 8, 2, 512, rounds=15, target_vs_dense=1.10, target_vs_mixtral=0.8),
    Case("cuda", torch.bfloat16, 16384, 1024, 8, 2, 2048, rounds=30),
    Case("cuda", torch.bfloat16, 16384, 1024, 64, 8, 512, rounds=30),
]


def _mixtral_block(moe: MoE, case: Case, implementation: str) -> torch.nn.Module:
    """transformers' Mixtral block holding the same weights, so it routes identically."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = MixtralConfig(
        hidden_size=case.d_model,
        intermediate_size=case.d_expert,
        num_local_experts=case.experts,
        num_experts_per_tok=case.top_k,
        experts_implementation=implementation,
    )
    block = MixtralSparseMoeBlock(cfg)
    with torch.no_grad():
        block.gate.weight.copy_(moe.router.weight)
        block.experts.gate_up_proj.copy_(torch.cat([moe.experts.w1, moe.experts.w3], dim=1))
        block.experts.down_proj.copy_(moe.experts.w2)
    return block


def _implementations(case: Case) -> dict[str, torch.nn.Module]:
    d, F = case.d_model, case.d_expert
    moe = MoE(d, MoEConfig(experts=case.experts, top_k=case.top_k, d_expert=F), 0.02, 0.02)
    impls = {
        "moe": moe,
        "dense": SwiGLU(d, case.top_k * F, 0.02, 0.02),
        "mixtral": _mixtral_block(moe, case, "eager"),
        "mixtral_grouped_mm": _mixtral_block(moe, case, "grouped_mm"),
    }
    if case.dtype == torch.bfloat16:  # grouped by default in bf16: our expert loop beside it
        impls["moe_loop"] = copy.deepcopy(moe)
        impls["moe_loop"].experts.use_grouped_mm = False
    return {k: m.to(case.device) for k, m in impls.items()}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _step(module: torch.nn.Module, x: torch.Tensor, autocast: bool) -> None:
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        y = module(x)
    y.float().sum().backward()


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_moe_ffn_against_dense_and_mixtral(benchmark, report_row, goals, case: Case):
    if case.device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    torch.manual_seed(0)
    impls = _implementations(case)
    x = torch.randn(1, case.tokens, case.d_model, device=case.device, requires_grad=True)
    autocast = case.dtype == torch.bfloat16

    # Same weights, same routing: the peers compute the same function.
    with torch.no_grad(), torch.autocast(case.device, dtype=torch.bfloat16, enabled=autocast):
        ours, theirs = impls["moe"](x[:, :256]), impls["mixtral"](x[:, :256])
    tol = 2e-2 if autocast else 1e-5
    torch.testing.assert_close(ours.float(), theirs.float(), rtol=tol, atol=tol)

    times: dict[str, list[float]] = {name: [] for name in impls}

    def one_round() -> None:
        for name, module in impls.items():
            _sync(case.device)
            start = time.perf_counter()
            _step(module, x, autocast)
            _sync(case.device)
            times[name].append(time.perf_counter() - start)
            module.zero_grad(set_to_none=True)
            x.grad = None

    warmup = 1 if goals.smoke else 2
    benchmark.pedantic(one_round, rounds=goals.rounds(case.rounds), iterations=1, warmup_rounds=warmup)
    for name in times:  # drop the warm-up rounds
        times[name] = times[name][warmup:]

    def ratio(a: str, b: str) -> float:
        return statistics.median(ta / tb for ta, tb in zip(times[a], times[b], strict=True))

    fwd_bwd_flops = 3 * 2 * 3 * case.tokens * case.d_model * case.d_expert * case.top_k
    info = {
        "case": case.id,
        "device": torch.cuda.get_device_name() if case.device == "cuda" else "cpu",
        "dtype": str(case.dtype),
        "threads": torch.get_num_threads(),
        "tokens": case.tokens,
        "d_model": case.d_model,
        "experts": case.experts,
        "top_k": case.top_k,
        "d_expert": case.d_expert,
        "dense_hidden": case.top_k * case.d_expert,
        "rounds_timed": len(times["moe"]),
        "median_ms": {n: 1e3 * statistics.median(t) for n, t in times.items()},
        "tflops_per_s": {n: fwd_bwd_flops / statistics.median(t) / 1e12 for n, t in times.items()},
        "ratio_moe_to_dense": ratio("moe", "dense"),
        "ratio_moe_to_mixtral": ratio("moe", "mixtral"),
        "ratio_moe_to_mixtral_grouped_mm": ratio("moe", "mixtral_grouped_mm"),
        "ratio_mixtral_to_dense": ratio("mixtral", "dense"),
        "ratio_mixtral_grouped_mm_to_dense": ratio("mixtral_grouped_mm", "dense"),
    }
    if "moe_loop" in times:
        info["ratio_moe_to_moe_loop"] = ratio("moe", "moe_loop")
    for peer, target in (("dense", case.target_vs_dense), ("mixtral", case.target_vs_mixtral)):
        if target is not None:
            info[f"target_moe_to_{peer}"] = target
            info[f"meets_target_moe_to_{peer}"] = info[f"ratio_moe_to_{peer}"] <= target
    goals.finish(benchmark, report_row, info)
