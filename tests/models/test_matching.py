"""The matching helper: same active parameters and FLOPs as the dense model, up to the router."""

from __future__ import annotations

import pytest
from conftest import CONFIGS

from models.accounting import count_params, training_flops_per_token
from models.config import ConfigError, Routing, load_config
from models.matching import match_moe

DENSE = load_config(CONFIGS / "dense-s.yaml")


@pytest.mark.parametrize(("experts", "top_k", "shared"), [(8, 2, 0), (64, 8, 0), (8, 1, 1), (16, 3, 1)])
def test_matched_moe_differs_from_dense_only_by_the_router(experts, top_k, shared):
    cfg, report = match_moe(DENSE, experts=experts, top_k=top_k, shared_experts=shared)
    assert cfg.moe.d_expert * (top_k + shared) == DENSE.d_ff
    assert cfg.granularity == top_k + shared
    for field in ("d_model", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "max_seq_len", "tie_embeddings"):
        assert getattr(cfg, field) == getattr(DENSE, field)
    router = DENSE.n_layers * DENSE.d_model * experts
    assert count_params(cfg).active - count_params(DENSE).active == router == report.router_params
    flops_extra = training_flops_per_token(cfg, "detailed") - training_flops_per_token(DENSE, "detailed")
    assert flops_extra == 3 * 2 * router
    assert 1.0 < report.flops_ratio < 1.02  # the router is a small extra at this width
    assert report.moe_total_params == count_params(cfg).total
    assert any("router" in line for line in report.lines())


def test_the_shipped_moe_config_is_matched_to_the_shipped_dense_one():
    derived, _ = match_moe(DENSE, experts=8, top_k=2, name="moe-s-e8k2", z_loss_coef=0.001)
    assert derived == load_config(CONFIGS / "moe-s-e8k2.yaml")


def test_options_pass_through_and_are_validated():
    cfg, _ = match_moe(DENSE, experts=8, top_k=2, routing="sigmoid-bias")
    assert cfg.moe.routing is Routing.SIGMOID_BIAS
    with pytest.raises(ConfigError, match=r"'moe.routing'.*one of"):
        match_moe(DENSE, experts=8, top_k=2, routing="best")
    with pytest.raises(ConfigError, match="unknown key"):
        match_moe(DENSE, experts=8, top_k=2, capacity=1.0)


def test_refuses_what_cannot_be_matched():
    with pytest.raises(ConfigError, match="top_k \\+ shared_experts == granularity"):
        match_moe(DENSE, experts=8, top_k=2, granularity=4)
    with pytest.raises(ConfigError, match="split evenly"):
        match_moe(DENSE, experts=8, top_k=3)
    moe, _ = match_moe(DENSE, experts=8, top_k=2)
    with pytest.raises(ConfigError, match="already an MoE"):
        match_moe(moe, experts=8, top_k=2)
