"""The MoE layer's expert kernels compute one function: the grouped call (with or without block
padding) against the expert loop, and the layer against transformers' Mixtral block holding the
same weights, in outputs and every gradient; and the layer traces into one graph."""

from __future__ import annotations

import pytest
import torch

from models.config import Dispatch, MoEConfig, Routing
from models.moe import MoE

D = 32


def _layer(**moe) -> MoE:
    torch.manual_seed(0)
    cfg = MoEConfig(**{"experts": 8, "top_k": 2, "d_expert": 24, **moe})
    return MoE(D, cfg, init_std=0.3, out_std=0.3)


def _forward_backward(layer: MoE, x: torch.Tensor, bf16: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Output and the gradients of x and of every parameter, for a fixed weighting of the output."""
    x = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        y = layer(x)
    weights = torch.linspace(-1, 1, y.numel()).view_as(y)
    (y.float() * weights).sum().backward()
    named = layer.named_parameters()  # a compiled layer's names start with _orig_mod.
    grads = {"x": x.grad} | {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in named if p.grad is not None}
    layer.zero_grad(set_to_none=True)
    return y.detach().float(), grads


def _assert_same(got, want, rtol: float, atol: float) -> None:
    (y_got, g_got), (y_want, g_want) = got, want
    torch.testing.assert_close(y_got, y_want, rtol=rtol, atol=atol)
    assert g_got.keys() == g_want.keys()
    for name in g_want:
        torch.testing.assert_close(g_got[name], g_want[name], rtol=rtol, atol=atol, msg=name)


def _set(layer: MoE, grouped: bool | None, block: int | None) -> MoE:
    layer.experts.use_grouped_mm, layer.experts.block_rows = grouped, block
    return layer


@pytest.mark.parametrize("routing", [Routing.SOFTMAX_TOPK, Routing.SIGMOID_BIAS])
def test_default_float32_path_equals_the_expert_loop(routing):
    """float32 on CPU now takes the grouped call, unpadded: the loop's function to round-off."""
    layer = _layer(routing=routing)
    x = torch.randn(3, 40, D)
    default = _forward_backward(_set(layer, None, None), x, bf16=False)
    assert layer.experts.rows_per_block(x) == 1
    loop = _forward_backward(_set(layer, False, None), x, bf16=False)
    _assert_same(default, loop, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("block", [None, 1, 64])
def test_bf16_grouped_paths_equal_the_expert_loop(block):
    """bf16 on CPU: the default block padding, none, and the earlier 64 rows a block all give the
    loop's outputs and gradients to bf16 accuracy."""
    layer = _layer(routing=Routing.SIGMOID_BIAS)
    x = torch.randn(4, 64, D)
    loop = _forward_backward(_set(layer, False, None), x, bf16=True)
    grouped = _forward_backward(_set(layer, True, block), x, bf16=True)
    _assert_same(grouped, loop, rtol=2e-2, atol=2e-2)
    if block is None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert layer.experts.rows_per_block(x) == layer.experts.CPU_BF16_BLOCK_ROWS == 16


def _mixtral_block(layer: MoE):
    """transformers' Mixtral block holding ``layer``'s weights, so it routes identically."""
    pytest.importorskip("transformers")
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = layer.cfg
    block = MixtralSparseMoeBlock(
        MixtralConfig(
            hidden_size=D,
            intermediate_size=cfg.d_expert,
            num_local_experts=cfg.experts,
            num_experts_per_tok=cfg.top_k,
            router_jitter_noise=0.0,
        )
    )
    with torch.no_grad():
        block.gate.weight.copy_(layer.router.weight)
        block.experts.gate_up_proj.copy_(torch.cat([layer.experts.w1, layer.experts.w3], dim=1))
        block.experts.down_proj.copy_(layer.experts.w2)
    return block


def test_matches_transformers_mixtral_block_in_outputs_and_gradients():
    """Softmax top-k with renormalised gates is Mixtral's router; same weights, same function,
    same gradients for the input, the router and every expert."""
    layer = _layer(routing=Routing.SOFTMAX_TOPK, renormalize=True)
    block = _mixtral_block(layer)
    x = torch.randn(2, 48, D)
    ours_y, ours = _forward_backward(layer, x, bf16=False)
    theirs_y, theirs = _forward_backward(block, x, bf16=False)
    torch.testing.assert_close(ours_y, theirs_y, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours["x"], theirs["x"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours["router.weight"], theirs["gate.weight"], rtol=1e-5, atol=1e-6)
    gate_up = torch.cat([ours["experts.w1"], ours["experts.w3"]], dim=1)
    torch.testing.assert_close(gate_up, theirs["experts.gate_up_proj"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours["experts.w2"], theirs["experts.down_proj"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dispatch", list(Dispatch))
def test_layer_traces_into_one_graph_under_bf16(dispatch):
    """Routing, top-k, dispatch and the grouped experts stay in one graph under torch.compile:
    no graph break, so no host sync (the expert loop's split sizes would break it)."""
    layer = _layer(routing=Routing.SIGMOID_BIAS, dispatch=dispatch).train()
    x = torch.randn(2, 32, D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        explained = torch._dynamo.explain(layer)(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
    layer.experts.use_grouped_mm = False  # the loop does break: the check can fail
    with torch.autocast("cpu", dtype=torch.bfloat16):
        looped = torch._dynamo.explain(layer)(x)
    assert dispatch is Dispatch.CAPACITY or looped.graph_break_count > 0


def test_compiled_float32_layer_trains_on_cpu():
    """Compiled float32 takes the expert loop (the grouped GEMM's shape function refuses float32):
    it runs, forward and backward, and computes eager's function."""
    layer = _layer(routing=Routing.SIGMOID_BIAS)
    x = torch.randn(2, 24, D)
    eager = _forward_backward(layer, x, bf16=False)
    compiled = _forward_backward(torch.compile(layer), x, bf16=False)
    _assert_same(compiled, eager, rtol=1e-4, atol=1e-5)
