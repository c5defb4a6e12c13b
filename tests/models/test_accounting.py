"""Accounting from the config against the built module, torch's FLOP counter and published totals."""

from __future__ import annotations

import pytest
import torch
from conftest import CONFIGS, tiny_config
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from models.accounting import count_params, forward_flops, training_flops_per_token
from models.config import QKNorm, Routing, load_config
from models.moe import MoE
from models.transformer import Transformer

GRID = {
    "dense": tiny_config(),
    "dense-mha-untied": tiny_config(n_kv_heads=4, tie_embeddings=False),
    "dense-gqa-headdim-qknorm": tiny_config(head_dim=12, qk_norm=QKNorm.PER_HEAD, tie_embeddings=True),
    "moe": tiny_config(moe={}),
    "moe-qknorm-full": tiny_config(moe={}, qk_norm=QKNorm.FULL, n_layers=3),
    "moe-shared-gated": tiny_config(moe=dict(shared_experts=2, shared_gate=True)),
    "moe-interleaved": tiny_config(moe=dict(every=2), n_layers=4),
    "moe-first-dense": tiny_config(moe=dict(first_dense=1, experts=8, top_k=1), n_layers=3, tie_embeddings=True),
    "moe-noisy": tiny_config(moe=dict(routing=Routing.NOISY_TOPK)),
    "moe-sigmoid-bias": tiny_config(moe=dict(routing=Routing.SIGMOID_BIAS, experts=6, top_k=3)),
    "moe-all-moe-no-dff": tiny_config(moe={}, d_ff=None),
}


def _active_from_module(model: torch.nn.Module) -> int:
    """Active parameters read off the module: all, less the unchosen experts' weights."""
    total = sum(p.numel() for p in model.parameters())
    for m in model.modules():
        if isinstance(m, MoE):
            per_expert = sum(w[0].numel() for w in (m.experts.w1, m.experts.w2, m.experts.w3))
            total -= (m.cfg.experts - m.cfg.top_k) * per_expert
    return total


@pytest.mark.parametrize("name", GRID)
def test_counted_params_equal_module_numel(name):
    cfg = GRID[name]
    model = Transformer(cfg)
    counts = count_params(cfg)
    assert counts.total == sum(p.numel() for p in model.parameters())
    assert counts.active == _active_from_module(model)
    emb = model.tok_emb.weight.numel() + (0 if cfg.tie_embeddings else model.lm_head.weight.numel())
    assert counts.embedding == emb
    assert counts.total_non_embedding == counts.total - emb
    assert counts.active_non_embedding == counts.active - emb
    routers = sum(p.numel() for n, p in model.named_parameters() if ".router." in n)
    assert counts.router == routers


def test_dense_model_counts_no_router_and_all_params_active():
    counts = count_params(GRID["dense"])
    assert counts.router == 0 and counts.active == counts.total


def test_interleaving_places_moe_layers():
    cfg = GRID["moe-interleaved"]
    assert [cfg.is_moe_layer(i) for i in range(4)] == [False, True, False, True]
    cfg = GRID["moe-first-dense"]
    assert [cfg.is_moe_layer(i) for i in range(3)] == [False, True, True]
    model = Transformer(cfg)
    assert [isinstance(b.ffn, MoE) for b in model.blocks] == [False, True, True]


def _counted_flops(cfg, batch: int = 2, backward: bool = False) -> tuple[float, float]:
    model = Transformer(cfg).train()
    for layer in model.modules():  # the counter has no formula for grouped GEMMs; the expert
        if isinstance(layer, MoE):  # loop computes the same function (tests/models/test_moe.py)
            layer.experts.use_grouped_mm = False
    idx = torch.randint(0, cfg.vocab_size, (batch, cfg.max_seq_len))
    # The math backend decomposes attention into matmuls that the counter sees.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        out = model(idx, idx)
        fwd = counter.get_total_flops()
        if backward:
            (out.loss + out.aux_loss).backward()
    tokens = idx.numel()
    return fwd / tokens, counter.get_total_flops() / tokens


@pytest.mark.parametrize(
    "cfg",
    [
        load_config(CONFIGS / "dense-s.yaml"),
        load_config(CONFIGS / "moe-s-e8k2.yaml"),
        GRID["dense-gqa-headdim-qknorm"],
        GRID["moe-shared-gated"],
        GRID["moe-interleaved"],
        GRID["moe-noisy"],
    ],
    ids=lambda c: c.name + ("-moe" if c.moe else ""),
)
def test_detailed_flops_agree_with_torch_flop_counter(cfg):
    fwd_counted, train_counted = _counted_flops(cfg, backward=True)
    fwd = forward_flops(cfg).total
    assert fwd_counted == pytest.approx(fwd, rel=0.02)
    assert train_counted == pytest.approx(training_flops_per_token(cfg, "detailed"), rel=0.02)


def test_attention_flops_scale_with_context():
    cfg = load_config(CONFIGS / "dense-s.yaml")
    a, b = forward_flops(cfg, seq_len=128), forward_flops(cfg, seq_len=256)
    assert b.attention_scores == 2 * a.attention_scores
    assert b.attention_proj == a.attention_proj
    d_attn = cfg.n_heads * cfg.head_dim
    assert b.attention_scores == cfg.n_layers * 2 * 2 * 256 * d_attn


def test_six_n_active_convention():
    cfg = load_config(CONFIGS / "moe-s-e8k2.yaml")
    assert training_flops_per_token(cfg, "6N_active") == 6 * count_params(cfg).active_non_embedding
    with pytest.raises(ValueError):
        training_flops_per_token(cfg, "6N_total")


PUBLISHED = {  # (total, active), from the papers and model cards
    "mixtral-8x7b": (46.70e9, 12.88e9),
    "olmoe-1b-7b": (6.92e9, 1.28e9),
    "qwen3-30b-a3b": (30.53e9, 3.35e9),
    "llama-2-7b": (6.74e9, 6.74e9),
}


@pytest.mark.parametrize("name", PUBLISHED)
def test_reference_architectures_reproduce_published_totals(name):
    counts = count_params(load_config(CONFIGS / "reference" / f"{name}.yaml"))
    total, active = PUBLISHED[name]
    assert counts.total == pytest.approx(total, rel=0.005)
    assert counts.active == pytest.approx(active, rel=0.005)
