"""Sigmoid-bias MoEs export as GLM-4.5 (Glm4MoeForCausalLM): the selection bias picks experts and
stays out of their gate weights there as here, and the run's balancing that the class cannot hold is
named. test_export.py checks the logits of each layout; this shows that check has teeth."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config

from harness.evaluate.export import export
from models.config import Routing
from models.transformer import Transformer

TOLERANCE = {"rtol": 1e-4, "atol": 1e-4}
"""test_export.py's parity tolerance."""


def biased_model(**moe) -> Transformer:
    """A sigmoid-bias MoE with spread routers and selection biases of about the scores' size."""
    cfg = tiny_config({"routing": Routing.SIGMOID_BIAS, **moe}, rope_theta=100.0, norm_eps=0.01, init_std=0.1)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for m in model.moe_layers:
            m.router.weight.normal_(std=0.5)
            m.router.bias.normal_(std=0.3)
    return model


def exported(model: Transformer, folder):
    from transformers import AutoModelForCausalLM

    assert export(model.cfg, model.state_dict(), None, folder) == "Glm4MoeForCausalLM"
    return AutoModelForCausalLM.from_pretrained(folder).eval()


def chosen_experts(model: Transformer, idx: torch.Tensor) -> list[torch.Tensor]:
    """Each MoE layer's (T, K) chosen experts, as sets (sorted ids), on ``idx``."""
    seen = []
    hooks = [m.router.register_forward_hook(lambda _m, _i, out: seen.append(out.experts_TK)) for m in model.moe_layers]
    with torch.no_grad():
        model(idx)
    for h in hooks:
        h.remove()
    return [e.sort(-1).values for e in seen]


def gates_from_biased_scores(self, hidden_states):
    """Glm4MoeTopkRouter.forward with the bias wrongly in the gate weights too."""
    logits_TE = F.linear(hidden_states.view(-1, self.hidden_dim).float(), self.weight.float())
    biased_TE = logits_TE.sigmoid() + self.e_score_correction_bias
    experts_TK = biased_TE.topk(self.top_k, dim=-1).indices
    gates_TK = biased_TE.gather(1, experts_TK)
    if self.norm_topk_prob:
        gates_TK = gates_TK / gates_TK.sum(-1, keepdim=True)
    return logits_TE, gates_TK * self.routed_scaling_factor, experts_TK


@pytest.mark.parametrize("renormalize", [True, False], ids=["renorm", "no-renorm"])
def test_a_dropped_bias_or_one_in_the_gates_fails_the_parity_check(renormalize, tmp_path, monkeypatch):
    from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeTopkRouter

    model = biased_model(renormalize=renormalize)
    theirs = exported(model, tmp_path / "hf")
    idx = torch.randint(0, model.cfg.vocab_size, (2, 16))
    with torch.no_grad():
        ours = model(idx).logits
        torch.testing.assert_close(theirs(idx).logits, ours, **TOLERANCE)

    # The bias decides: without it a good share of the tokens choose other experts.
    biased = chosen_experts(model, idx)
    with torch.no_grad():
        for m in model.moe_layers:
            m.router.bias.zero_()
    unbiased = chosen_experts(model, idx)
    changed = sum(int((a != b).any(-1).sum()) for a, b in zip(biased, unbiased, strict=True))
    assert changed >= 4, f"only {changed} token choices depend on the bias"

    with torch.no_grad():
        gate = theirs.model.layers[0].mlp.gate
        bias = gate.e_score_correction_bias.clone()
        gate.e_score_correction_bias.zero_()  # an export that dropped the bias
        assert not torch.allclose(theirs(idx).logits, ours, **TOLERANCE)
        gate.e_score_correction_bias.copy_(bias)
        monkeypatch.setattr(Glm4MoeTopkRouter, "forward", gates_from_biased_scores)
        assert not torch.allclose(theirs(idx).logits, ours, **TOLERANCE)
        monkeypatch.undo()
        torch.testing.assert_close(theirs(idx).logits, ours, **TOLERANCE)


def test_the_balancing_glm4_moe_has_no_field_for_is_named(tmp_path):
    """GLM-4.5 computes no balancing loss and does not update its selection bias: the run's
    coefficients and bias update rate are named in config.json and README.md, not dropped."""
    model = biased_model(load_balance_coef=0.01, z_loss_coef=0.001, bias_update_rate=1e-3)
    theirs = exported(model, tmp_path / "hf")
    assert theirs.config.output_router_logits is False
    assert not hasattr(theirs.config, "router_aux_loss_coef")
    meta = json.loads((tmp_path / "hf" / "config.json").read_text())["moe_harness"]
    assert set(meta["not_carried"]) == {"load_balance_coef", "z_loss_coef", "bias_update_rate"}
    assert "Glm4MoeConfig has no field" in meta["not_carried"]["load_balance_coef"]
    assert "e_score_correction_bias" in meta["not_carried"]["bias_update_rate"]
    readme = (tmp_path / "hf" / "README.md").read_text()
    assert "not carried: bias_update_rate 0.001" in readme and "not carried: load_balance_coef 0.01" in readme
    assert "No tokenizer was exported" in readme, "no usage snippet without a tokenizer"

    # The shipped studies' MoE: no load-balance loss, a z-loss, the bias update.
    model = biased_model(load_balance_coef=0.0, z_loss_coef=0.001)
    exported(model, tmp_path / "studied")
    meta = json.loads((tmp_path / "studied" / "config.json").read_text())["moe_harness"]
    assert set(meta["not_carried"]) == {"z_loss_coef", "bias_update_rate"}
