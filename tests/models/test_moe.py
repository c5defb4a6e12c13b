"""The MoE layer against a naive per-token reference, the dense FFN, and the balancing formulas."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_config
from naive_moe import naive_choices, naive_moe

from models.config import Dispatch, MoEConfig, Routing
from models.moe import MoE, cv_squared, switch_balance_loss
from models.transformer import SwiGLU, Transformer

D = 32


def make_layer(**moe) -> MoE:
    cfg = MoEConfig(**{"experts": 4, "top_k": 2, "d_expert": 24, **moe})
    layer = MoE(D, cfg, init_std=0.3, out_std=0.3)
    if layer.router.noise_weight is not None:  # zero-initialised by design; give it something
        torch.nn.init.normal_(layer.router.weight, std=0.3)
        torch.nn.init.normal_(layer.router.noise_weight, std=0.3)
    if layer.router.bias is not None:
        layer.router.bias.copy_(torch.tensor([0.3, -0.2, 0.0, 0.1]))
    return layer


VARIANTS = [
    dict(routing=Routing.SOFTMAX_TOPK, renormalize=True),
    dict(routing=Routing.SOFTMAX_TOPK, renormalize=False),
    dict(routing=Routing.TOPK_SOFTMAX),
    dict(routing=Routing.NOISY_TOPK),
    dict(routing=Routing.SIGMOID_BIAS, route_scale=2.5),
    dict(routing=Routing.SOFTMAX_TOPK, shared_experts=1, shared_gate=True),
    dict(routing=Routing.SIGMOID_BIAS, shared_experts=2, force_balanced=True),
]


def _id(v: dict) -> str:
    return "-".join(f"{k}={getattr(x, 'value', x)}" for k, x in v.items())


@pytest.mark.parametrize("dispatch", list(Dispatch))
@pytest.mark.parametrize("variant", VARIANTS, ids=_id)
def test_matches_naive_reference_in_output_and_gradients(variant, dispatch):
    layer = make_layer(dispatch=dispatch, capacity_factor=1.0, **variant).train()
    x = torch.randn(2, 8, D)
    x_fast = x.clone().requires_grad_()
    x_ref = x.clone().requires_grad_()

    torch.manual_seed(1)
    y_fast = layer(x_fast)
    torch.manual_seed(1)  # same generator state: the reference draws the same router noise
    noise = torch.randn(16, 4) if layer.cfg.routing is Routing.NOISY_TOPK else None
    grad_out = torch.randn_like(y_fast)

    (y_fast * grad_out).sum().backward()
    fast_grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    layer.zero_grad()
    y_ref = naive_moe(layer, x_ref, noise)
    (y_ref * grad_out).sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}

    torch.testing.assert_close(y_fast, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_fast.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    assert fast_grads.keys() == ref_grads.keys()
    assert "router.weight" in fast_grads and "experts.w2" in fast_grads
    for name in fast_grads:
        torch.testing.assert_close(fast_grads[name], ref_grads[name], rtol=1e-4, atol=1e-5, msg=name)
    if dispatch is Dispatch.CAPACITY and not variant.get("force_balanced"):
        assert layer.stats.dropped_fraction > 0, "the test should exercise dropping"


def test_grouped_mm_path_equals_expert_loop():
    layer = make_layer()
    x = torch.randn(2, 8, D)
    layer.experts.use_grouped_mm = False
    y_loop = layer(x)
    layer.experts.use_grouped_mm = True
    y_grouped = layer(x)
    torch.testing.assert_close(y_grouped, y_loop, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dispatch", list(Dispatch))
def test_single_expert_equals_dense_ffn(dispatch):
    layer = make_layer(experts=1, top_k=1, d_expert=48, dispatch=dispatch, capacity_factor=1.0)
    dense = SwiGLU(D, 48, 0.3, 0.3)
    with torch.no_grad():
        dense.w1.weight.copy_(layer.experts.w1[0])
        dense.w3.weight.copy_(layer.experts.w3[0])
        dense.w2.weight.copy_(layer.experts.w2[0])
    x = torch.randn(3, 5, D)
    torch.testing.assert_close(layer(x), dense(x), rtol=1e-5, atol=1e-6)
    assert float(layer.stats.dropped_fraction) == 0.0


def test_capacity_drops_exactly_the_overflow():
    T, E, cf = 24, 4, 1.0
    layer = make_layer(experts=E, top_k=1, dispatch=Dispatch.CAPACITY, capacity_factor=cf)
    with torch.no_grad():  # every token prefers expert 2
        layer.router.weight.zero_()
        layer.router.weight[2, 0] = 10.0
    x = torch.randn(1, T, D)
    x[..., 0] = x[..., 0].abs() + 1.0
    y = layer.train()(x)
    capacity = math.ceil(cf * T * 1 / E)
    assert capacity == 6
    # The first `capacity` tokens in position order are served; the rest pass through as zero.
    assert torch.all(y[0, :capacity].abs().sum(-1) > 0)
    assert torch.all(y[0, capacity:] == 0)
    assert float(layer.stats.dropped_fraction) == pytest.approx(1 - capacity / T)
    assert layer.stats.tokens_per_expert.tolist() == [0, 0, T, 0]
    # Eval uses its own capacity factor.
    layer.eval()
    layer(x)
    assert float(layer.stats.dropped_fraction) == pytest.approx(1 - math.ceil(2.0 * T / E) / T)


def test_uniform_routing_gives_load_balance_loss_its_coefficient():
    coef = 0.01
    layer = make_layer(experts=8, top_k=2, load_balance_coef=coef, force_balanced=True)
    with torch.no_grad():
        layer.router.weight.zero_()  # uniform probabilities
    layer(torch.randn(2, 8, D))
    s = layer.stats
    assert s.tokens_per_expert.tolist() == [4] * 8
    assert float(s.load_balance_loss) == pytest.approx(1.0)
    assert float(s.aux_loss.detach()) == pytest.approx(coef)
    assert float(s.router_entropy) == pytest.approx(math.log(8))
    assert float(s.z_loss) == pytest.approx(math.log(8) ** 2)  # logsumexp of E zeros = log E
    assert float(s.seq_balance_loss) == pytest.approx(1.0)
    assert float(s.importance_loss) == pytest.approx(0.0, abs=1e-12)


def test_collapsed_routing_maximises_load_balance_loss():
    layer = make_layer(experts=4, top_k=1)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0, 0] = 50.0
    x = torch.randn(1, 16, D)
    x[..., 0] = x[..., 0].abs() + 1
    layer(x)
    assert float(layer.stats.load_balance_loss) == pytest.approx(4.0, rel=1e-4)  # E * 1 * 1


def test_balance_losses_against_formulas():
    probs = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.1, 0.7, 0.1, 0.1]])
    counts = torch.tensor([3.0, 1.0, 0.0, 0.0])
    expected = 4 * (0.75 * 0.4 + 0.25 * 0.4)
    assert float(switch_balance_loss(probs.mean(0), counts)) == pytest.approx(expected)
    v = torch.tensor([1.0, 2.0, 3.0, 6.0])
    assert float(cv_squared(v)) == pytest.approx(v.var(unbiased=False).item() / 9.0)


def test_z_loss_and_coefficients_enter_aux():
    layer = make_layer(load_balance_coef=0.0, z_loss_coef=1e-3, importance_coef=0.1)
    layer(torch.randn(2, 8, D))
    s = layer.stats
    assert float(s.aux_loss.detach()) == pytest.approx(
        1e-3 * float(s.z_loss) + 0.1 * float(s.importance_loss), rel=1e-6
    )
    assert float(s.z_loss) > 0.1 and float(s.importance_loss) > 0  # neither term is trivially zero


def test_noise_only_in_training():
    layer = make_layer(routing=Routing.NOISY_TOPK)
    x = torch.randn(2, 8, D)
    layer.eval()
    a, b = layer(x), layer(x)
    assert torch.equal(a, b)
    # Without noise, noisy top-k is top-k-then-softmax on the clean logits.
    clean = make_layer(routing=Routing.TOPK_SOFTMAX)
    clean.load_state_dict({k: v for k, v in layer.state_dict().items() if "noise" not in k})
    torch.testing.assert_close(clean.eval()(x), a)
    layer.train()
    assert not torch.equal(layer(x), layer(x))


def test_noisy_router_starts_at_zero():
    layer = MoE(D, MoEConfig(experts=4, top_k=2, d_expert=8, routing=Routing.NOISY_TOPK), 0.02, 0.02)
    assert torch.count_nonzero(layer.router.weight) == 0
    assert torch.count_nonzero(layer.router.noise_weight) == 0


def test_smooth_load_matches_monte_carlo():
    """Shazeer's P(x, i): probability that i stays in the top k when only i's noise is redrawn."""
    layer = make_layer(routing=Routing.NOISY_TOPK, load_coef=0.1, experts=6, top_k=2).train()
    x = torch.randn(1, 3, D)
    torch.manual_seed(3)
    r = layer.router(x.view(3, D))
    clean = (x.view(3, D) @ layer.router.weight.T).detach()
    std = torch.nn.functional.softplus(x.view(3, D) @ layer.router.noise_weight.T).detach()
    torch.manual_seed(3)
    noisy = clean + torch.randn(3, 6) * (std + 1e-9)
    n = 20000
    for i in range(6):
        h = noisy.unsqueeze(0).repeat(n, 1, 1)
        h[:, :, i] = clean[:, i] + torch.randn(n, 3) * std[:, i]
        freq = (h.topk(2, dim=-1).indices == i).any(-1).float().mean(0)
        torch.testing.assert_close(r.smooth_load_TE[:, i].detach(), freq, atol=0.015, rtol=0)
    layer(x)
    assert float(layer.stats.load_loss) > 0


def test_sigmoid_bias_steers_selection_but_not_gates():
    layer = make_layer(routing=Routing.SIGMOID_BIAS, renormalize=False)
    x = torch.randn(4, D)
    with torch.no_grad():
        layer.router.bias.copy_(torch.tensor([100.0, 100.0, 0.0, 0.0]))
    r = layer.router(x)
    assert sorted(r.experts_TK[0].tolist()) == [0, 1]
    assert torch.all(r.experts_TK.sort(-1).values == torch.tensor([0, 1]))
    scores = torch.sigmoid(x @ layer.router.weight.T)
    torch.testing.assert_close(r.gates_TK.sort(-1).values, scores[:, :2].sort(-1).values)


def test_aux_free_bias_update_follows_the_sign_rule():
    layer = make_layer(routing=Routing.SIGMOID_BIAS, bias_update_rate=0.01).train()
    with torch.no_grad():
        layer.router.bias.zero_()
    layer.router.load_accum.copy_(torch.tensor([10.0, 2.0, 4.0, 0.0]))  # mean 4
    layer.router.update_bias()
    assert layer.router.bias.tolist() == pytest.approx([-0.01, 0.01, 0.0, 0.01])
    assert layer.router.load_accum.sum() == 0
    # Forward passes in training accumulate the load that the next update uses.
    layer(torch.randn(2, 8, D))
    layer(torch.randn(2, 8, D))
    assert float(layer.router.load_accum.sum()) == 2 * 16 * 2
    layer.eval()(torch.randn(2, 8, D))
    assert float(layer.router.load_accum.sum()) == 2 * 16 * 2


def test_aux_free_bias_balances_a_skewed_router():
    layer = make_layer(routing=Routing.SIGMOID_BIAS, bias_update_rate=0.01, experts=4, top_k=1).train()
    with torch.no_grad():
        layer.router.bias.copy_(torch.tensor([0.5, 0.0, 0.0, 0.0]))  # expert 0 starts overloaded
    x = torch.randn(4, 64, D)
    layer(x)
    before = layer.stats.tokens_per_expert.float()
    late = []
    for step in range(300):
        layer(x)
        layer.router.update_bias()
        if step >= 250:
            late.append(layer.stats.tokens_per_expert.float())
    after = torch.stack(late).mean(0)
    assert before[0] > 0.6 * before.sum()
    assert float(cv_squared(after)) < 0.05 * float(cv_squared(before))


def test_force_balanced_gives_equal_loads_and_distinct_experts():
    layer = make_layer(experts=8, top_k=3, force_balanced=True)
    layer(torch.randn(2, 16, D))
    assert layer.stats.tokens_per_expert.tolist() == [12] * 8
    r = layer.router(torch.randn(32, D))
    assert all(len(set(row)) == 3 for row in r.experts_TK.tolist())


@pytest.mark.parametrize("dispatch", list(Dispatch))
def test_router_math_is_float32_under_autocast(dispatch):
    layer = make_layer(dispatch=dispatch, shared_experts=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r = layer.router(torch.randn(8, D))
        y = layer(torch.randn(1, 8, D))
    assert r.logits_TE.dtype == torch.float32 and r.gates_TK.dtype == torch.float32
    assert y.dtype == torch.bfloat16


def test_stats_are_detached_tensors():
    layer = make_layer()
    layer(torch.randn(2, 8, D, requires_grad=True))
    s = layer.stats
    for name in ("tokens_per_expert", "dropped_fraction", "router_entropy", "load_balance_loss", "z_loss"):
        value = getattr(s, name)
        assert isinstance(value, torch.Tensor) and not value.requires_grad, name
    assert s.aux_loss.requires_grad
    assert int(s.tokens_per_expert.sum()) == 2 * 8 * 2


def test_naive_reference_sees_the_same_choices():
    """Guards the reference itself: its choices agree with the router's."""
    layer = make_layer(routing=Routing.SOFTMAX_TOPK)
    x = torch.randn(6, D)
    r = layer.router(x)
    ref = naive_choices(layer, x, None)
    assert [[e for e, _ in row] for row in ref] == r.experts_TK.tolist()


def test_moe_model_with_one_expert_equals_dense_model():
    dense_cfg = tiny_config()
    moe_cfg = tiny_config(moe=dict(experts=1, top_k=1, d_expert=48, load_balance_coef=0.0))
    dense, moe = Transformer(dense_cfg), Transformer(moe_cfg)
    state = dense.state_dict()
    for i in range(dense_cfg.n_layers):
        for w in ("w1", "w2", "w3"):
            state[f"blocks.{i}.ffn.experts.{w}"] = state.pop(f"blocks.{i}.ffn.{w}.weight").unsqueeze(0)
        state[f"blocks.{i}.ffn.router.weight"] = moe.state_dict()[f"blocks.{i}.ffn.router.weight"]
    moe.load_state_dict(state)
    idx = torch.randint(0, 97, (2, 16))
    a, b = dense(idx, idx), moe(idx, idx)
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-5, atol=1e-5)
    assert float(b.aux_loss.detach()) == 0.0


@pytest.mark.gpu
@pytest.mark.parametrize("dispatch", list(Dispatch))
def test_cuda_bf16_forward_backward_without_host_syncs(dispatch):
    layer = MoE(256, MoEConfig(experts=8, top_k=2, d_expert=512, dispatch=dispatch), 0.02, 0.02).cuda()
    x = torch.randn(2, 512, 256, device="cuda", requires_grad=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = layer(x)
        (y.float().sum() + layer.stats.aux_loss).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert torch.isfinite(x.grad).all()
    # The bf16 grouped path computes the fp32 loop path's function.
    layer.experts.use_grouped_mm = False
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y_loop = layer(x)
    torch.testing.assert_close(y.float(), y_loop.float(), rtol=3e-2, atol=3e-2)
