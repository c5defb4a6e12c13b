"""Which transformers class computes exactly what a model config does, its config, and the weight
mapping onto it (written out by ``harness.evaluate.export``).

  dense, no QK-norm                         -> LlamaForCausalLM
  dense, per-head QK-norm                   -> Qwen3ForCausalLM
  MoE softmax-topk + renorm, every block    -> MixtralForCausalLM   (no QK-norm, no shared experts)
  MoE softmax-topk, per-head QK-norm        -> Qwen3MoeForCausalLM  (norm_topk_prob = renormalize)
  MoE softmax-topk, full QK-norm            -> OlmoeForCausalLM     (every block MoE, n_heads * head_dim = d_model)
  MoE softmax-topk, gated shared experts    -> Qwen2MoeForCausalLM  (no QK-norm)
  MoE sigmoid-bias                          -> Glm4MoeForCausalLM   (no or per-head QK-norm, ungated shared experts,
                                                                     MoE from a block on)

Every class takes head_dim, num_key_value_heads (grouped-query attention), the RoPE base
(rope_parameters), rms_norm_eps and tie_word_embeddings from its config, so those fields map one
to one, head_dim given explicitly (Qwen3-MoE, OLMoE, Qwen2-MoE and GLM-4.5 read it through
``getattr(config, "head_dim", ...)``). The exception is OLMoE's full-width QK-norm: OlmoeAttention
sizes q_norm from hidden_size and k_norm from hidden_size // n_heads * n_kv_heads, which are our
n_heads * head_dim and n_kv_heads * head_dim only when head_dim = d_model / n_heads; any other
head_dim is refused. Qwen's MoE classes place sparse layers as we do ((i + 1) % decoder_sparse_step
== 0, with ``mlp_only_layers`` for leading dense blocks); Mixtral and OLMoE have an MoE in every
block, so a model with dense blocks is refused there. Also refused: a dense model with full QK-norm
(OLMo 2 has one, but normalises after attention and FFN, Olmo2DecoderLayer), softmax routing other
than softmax over E then top-k, capacity dispatch, a softmax route_scale other than 1,
forced-balanced routing, and softmax shared experts other than Qwen2-MoE's (gated, no QK-norm).

Sigmoid-bias routing (DeepSeek-V3's auxiliary-loss-free balancing, models/moe.py Router) is
GLM-4.5's router (Glm4MoeTopkRouter): sigmoid scores, top-k of scores + e_score_correction_bias,
gate weights gathered from the unbiased scores, renormalised when norm_topk_prob (dividing by their
sum + 1e-20, where we clamp the sum at 1e-20: the same in float32 for any sum above 1e-12), then
times routed_scaling_factor (our route_scale). Its expert groups are set to n_group = topk_group = 1, which
keeps every expert in the choice: plain top-k. Its shared experts are one ungated SwiGLU of
n_shared_experts * moe_intermediate_size, as ours (shared_gate is refused); its blocks are dense
below first_k_dense_replace and MoE from there on, so a layout with a dense block after an MoE block
(``moe.every`` > 1) is refused; its QK-norm is per head (use_qk_norm), so full QK-norm is refused;
and its RoPE covers head_dim * partial_rotary_factor, set to 1 (the class defaults to 0.5). Among
transformers' classes with this router, DeepSeek-V3 and GLM-4.5's lite model use multi-head latent
attention and dots.llm1 always normalises queries and keys; GLM-4.5's plain grouped-query attention
with optional per-head QK-norm covers ours with and without it. None of them gates its shared
experts. Its router scores expert groups by their two best experts, so one expert is refused.
"""

from __future__ import annotations

from typing import Any

import torch

from models.config import Dispatch, ModelConfig, MoEConfig, QKNorm, Routing


class NotExportable(ValueError):
    pass


CLASSES = {
    "llama": "LlamaConfig",
    "qwen3": "Qwen3Config",
    "mixtral": "MixtralConfig",
    "olmoe": "OlmoeConfig",
    "qwen3_moe": "Qwen3MoeConfig",
    "qwen2_moe": "Qwen2MoeConfig",
    "glm4_moe": "Glm4MoeConfig",
}


def hf_family(cfg: ModelConfig) -> str:
    """The transformers architecture that computes exactly what ``cfg`` does, or NotExportable."""
    m = cfg.moe
    if m is None:
        if cfg.qk_norm is QKNorm.NONE:
            return "llama"
        if cfg.qk_norm is QKNorm.PER_HEAD:
            return "qwen3"
        raise NotExportable(
            f"{cfg.name}: qk_norm '{cfg.qk_norm.value}' on a dense model has no transformers class "
            "(OLMo 2's full-width QK-norm comes with norms after attention and FFN, not before)"
        )
    problems = []
    if m.dispatch is not Dispatch.DROPLESS:
        problems.append("capacity dispatch drops tokens; transformers' MoE blocks are dropless")
    if m.force_balanced:
        problems.append("force_balanced routing")
    if m.routing is Routing.SIGMOID_BIAS:
        family = "glm4_moe"
        problems += _glm4_moe_problems(cfg)
    elif m.routing is Routing.SOFTMAX_TOPK:
        family = _softmax_family(cfg, problems)
    else:
        problems.append(
            f"routing '{m.routing.value}' (transformers' MoE classes use softmax over E, then top-k, or sigmoid "
            f"scores with a selection bias: routing '{Routing.SOFTMAX_TOPK.value}' or '{Routing.SIGMOID_BIAS.value}')"
        )
        family = None
    if problems:
        raise NotExportable(f"{cfg.name} has no faithful transformers equivalent: " + "; ".join(problems))
    return family


def _softmax_family(cfg: ModelConfig, problems: list[str]) -> str:
    """The class for softmax-topk routing; what it cannot express is added to ``problems``."""
    m = cfg.moe
    if m.route_scale != 1.0:
        problems.append(f"route_scale {m.route_scale} (softmax-topk classes have no routed scaling factor)")
    dense_blocks = cfg.n_dense_layers > 0
    if m.shared_experts:
        if not m.shared_gate or cfg.qk_norm is not QKNorm.NONE:
            problems.append(
                "shared experts with softmax-topk routing export only as Qwen2-MoE: with shared_gate and "
                "without QK-norm"
            )
        return "qwen2_moe"
    if cfg.qk_norm is QKNorm.PER_HEAD:
        return "qwen3_moe"
    if cfg.qk_norm is QKNorm.FULL:
        if dense_blocks:
            problems.append("OLMoE has an MoE in every block")
        # OlmoeAttention sizes q_norm from hidden_size and k_norm from hidden_size // n_heads *
        # n_kv_heads: ours span n_heads * head_dim and n_kv_heads * head_dim, equal only here.
        if cfg.n_heads * cfg.head_dim != cfg.d_model:
            problems.append(
                f"head_dim {cfg.head_dim} with qk_norm 'full': the norms span n_heads * head_dim = "
                f"{cfg.n_heads * cfg.head_dim}, but OLMoE sizes them from hidden_size (d_model {cfg.d_model})"
            )
        return "olmoe"
    if not m.renormalize or dense_blocks:
        problems.append(
            "without QK-norm only Mixtral matches (renormalised gates, MoE in every block); "
            "Qwen3-MoE would add a QK-norm"
        )
    return "mixtral"


def first_moe_block(cfg: ModelConfig) -> int:
    """The first block that holds an MoE layer."""
    return next(i for i in range(cfg.n_layers) if cfg.is_moe_layer(i))


def _glm4_moe_problems(cfg: ModelConfig) -> list[str]:
    """What of a sigmoid-bias MoE GLM-4.5 (Glm4MoeForCausalLM) cannot express."""
    m, problems = cfg.moe, []
    if m.shared_gate:
        problems.append("shared_gate: no transformers class with sigmoid-bias routing gates its shared experts")
    if cfg.qk_norm is QKNorm.FULL:
        problems.append(
            "qk_norm 'full' with sigmoid-bias routing: GLM-4.5 normalises queries and keys per head "
            "(qk_norm 'per-head' or 'none')"
        )
    if m.experts < 2:
        problems.append("experts 1: GLM-4.5's router scores expert groups by their two best experts")
    first = first_moe_block(cfg)
    dense_after = [i for i in range(first, cfg.n_layers) if not cfg.is_moe_layer(i)]
    if dense_after:
        problems.append(
            f"moe.every {m.every} leaves block(s) {dense_after} dense after MoE block {first}: GLM-4.5's dense "
            "blocks all come before its first MoE block (first_k_dense_replace; moe.first_dense here), so "
            "moe.every must be 1"
        )
    return problems


LOSSES = {
    "z_loss_coef": ("router z-loss (ST-MoE)", "router_z_loss_coef"),
    "importance_coef": ("CV(importance)^2 loss (Shazeer et al. 2017)", None),
    "load_coef": ("smooth CV(load)^2 loss (Shazeer et al. 2017)", None),
    "seq_balance_coef": ("sequence-wise balance loss (DeepSeek-V3)", None),
}
"""Our balancing coefficients besides load_balance_coef: what each weights, and the transformers
config field that holds it where some class has one (Switch Transformers' router_z_loss_coef)."""


def hf_balancing(m: MoEConfig, config_class: type) -> tuple[dict[str, Any], dict[str, str], dict[str, str]]:
    """The run's balancing losses for ``config_class``: (its config fields, how each was derived,
    a note per coefficient the run used that it has no field for)."""
    name = config_class.__name__
    defaults = config_class()
    fields: dict[str, Any] = {"output_router_logits": False}
    carried: dict[str, str] = {}
    missing: dict[str, str] = {}

    def not_carried(coef: str, value: float, what: str) -> None:
        missing[coef] = (
            f"{coef} {value}: the run trained with the {what}; {name} has no field for it, so "
            "transformers computes no such loss when training this model further"
        )

    if hasattr(defaults, "router_aux_loss_coef"):
        # transformers' load_balancing_loss_func counts all T*k assignments, so sum_i f_i = k, where
        # ours normalises sum_i f_i = 1 (models/moe.py switch_balance_loss, Fedus et al. 2021 eq. 4):
        # its loss is k times ours, and alpha / k applies the run's penalty.
        fields["router_aux_loss_coef"] = m.load_balance_coef / m.top_k
        carried["router_aux_loss_coef"] = (
            f"load_balance_coef {m.load_balance_coef} / top_k {m.top_k}: transformers' load-balancing "
            "loss counts all k choices per token, so it is k times ours. It pools the counts and "
            "probabilities over layers before the product where we average per-layer losses: the "
            "two agree for one MoE layer and for uniform routing"
        )
        # On, transformers cannot generate from a padded batch (the new token's router logits
        # meet the whole attention mask), so the export is for inference as trained.
        carried["output_router_logits"] = (
            "false, so batched generation works; set it to true to fine-tune with the load-balance loss"
        )
    else:
        model = name.replace("Config", "ForCausalLM")
        carried["output_router_logits"] = f"false: {model} computes no balancing loss from the router logits"
        if m.load_balance_coef:
            not_carried("load_balance_coef", m.load_balance_coef, "Switch load-balance loss (Fedus et al. 2021)")
    for coef, (what, field) in LOSSES.items():
        value = getattr(m, coef)
        if field is not None and hasattr(defaults, field):
            fields[field] = value
            carried[field] = f"{coef} {value}"
        elif value:
            not_carried(coef, value, what)
    if m.routing is Routing.SIGMOID_BIAS and m.bias_update_rate:
        missing["bias_update_rate"] = (
            f"bias_update_rate {m.bias_update_rate}: the run balanced its experts with DeepSeek-V3's "
            "auxiliary-loss-free bias update; the bias it reached is e_score_correction_bias (selection only), "
            "but transformers does not update it when training this model further"
        )
    return fields, carried, missing


def hf_config(cfg: ModelConfig, family: str, eos_id: int | None, source: str | None = None):
    """The transformers config of ``family`` for ``cfg``; ``moe_harness`` in it records the run's
    model config, how its balancing losses were carried and which have no field."""
    import transformers

    common: dict[str, Any] = {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "torch_dtype": "float32",
    }
    cls = getattr(transformers, CLASSES[family])
    common["moe_harness"] = {"source": source, "config": cfg.to_dict()}
    m = cfg.moe
    if m is None:
        return cls(**common, intermediate_size=cfg.d_ff, attention_bias=False)
    balancing, carried, missing = hf_balancing(m, cls)
    common["moe_harness"] |= {"carried": carried, "not_carried": missing}
    moe = {"num_experts_per_tok": m.top_k, **balancing}
    if family == "mixtral":
        return cls(**common, **moe, intermediate_size=m.d_expert, num_local_experts=m.experts, router_jitter_noise=0.0)
    if family == "olmoe":
        return cls(**common, **moe, intermediate_size=m.d_expert, num_experts=m.experts, norm_topk_prob=m.renormalize)
    if family == "glm4_moe":
        return cls(**common, **moe, **_glm4_moe_fields(cfg))
    sparse = {
        "num_experts": m.experts,
        "moe_intermediate_size": m.d_expert,
        "intermediate_size": cfg.d_ff or m.d_expert,
        "norm_topk_prob": m.renormalize,
        "decoder_sparse_step": m.every,
        "mlp_only_layers": list(range(m.first_dense)),
    }
    if family == "qwen3_moe":
        return cls(**common, **moe, **sparse)
    return cls(**common, **moe, **sparse, shared_expert_intermediate_size=m.shared_experts * m.d_expert)


def _glm4_moe_fields(cfg: ModelConfig) -> dict[str, Any]:
    """Glm4MoeConfig's MoE, attention and RoPE fields for ``cfg`` (see the module docstring)."""
    m = cfg.moe
    return {
        "n_routed_experts": m.experts,
        "moe_intermediate_size": m.d_expert,
        "intermediate_size": cfg.d_ff or m.d_expert,
        "n_shared_experts": m.shared_experts,
        "first_k_dense_replace": first_moe_block(cfg),
        "norm_topk_prob": m.renormalize,
        "routed_scaling_factor": m.route_scale,
        "n_group": 1,  # one group, kept: top-k over all experts
        "topk_group": 1,
        "use_qk_norm": cfg.qk_norm is QKNorm.PER_HEAD,
        "attention_bias": False,
        "partial_rotary_factor": 1.0,  # RoPE over the whole head, as ours; the class defaults to half
        "num_mtp_layers": 0,  # no multi-token prediction modules
    }


def hf_state_dict(cfg: ModelConfig, state: dict[str, torch.Tensor], family: str) -> dict[str, torch.Tensor]:
    out = {"model.embed_tokens.weight": state["tok_emb.weight"], "model.norm.weight": state["norm.weight"]}
    out["lm_head.weight"] = state["tok_emb.weight" if cfg.tie_embeddings else "lm_head.weight"]
    for i in range(cfg.n_layers):
        src, dst = f"blocks.{i}.", f"model.layers.{i}."
        out[dst + "input_layernorm.weight"] = state[src + "attn_norm.weight"]
        out[dst + "post_attention_layernorm.weight"] = state[src + "ffn_norm.weight"]
        for ours, theirs in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj"), ("wo", "o_proj")):
            out[f"{dst}self_attn.{theirs}.weight"] = state[f"{src}attn.{ours}.weight"]
        if family == "qwen2_moe":  # its attention has q/k/v biases: ours are zero
            for name in ("q_proj", "k_proj", "v_proj"):
                w = out[f"{dst}self_attn.{name}.weight"]
                out[f"{dst}self_attn.{name}.bias"] = torch.zeros(w.shape[0], dtype=w.dtype)
        if cfg.qk_norm is not QKNorm.NONE:
            out[dst + "self_attn.q_norm.weight"] = state[src + "attn.q_norm.weight"]
            out[dst + "self_attn.k_norm.weight"] = state[src + "attn.k_norm.weight"]
        if not cfg.is_moe_layer(i):
            for ours, theirs in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
                out[f"{dst}mlp.{theirs}.weight"] = state[f"{src}ffn.{ours}.weight"]
            continue
        out[dst + "mlp.gate.weight"] = state[src + "ffn.router.weight"]
        out[dst + "mlp.experts.gate_up_proj"] = torch.cat(
            [state[src + "ffn.experts.w1"], state[src + "ffn.experts.w3"]], dim=1
        )
        out[dst + "mlp.experts.down_proj"] = state[src + "ffn.experts.w2"]
        if family == "glm4_moe":
            out |= _glm4_moe_extras(cfg, state, src, dst)
        elif cfg.moe.shared_experts:
            for ours, theirs in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
                out[f"{dst}mlp.shared_expert.{theirs}.weight"] = state[f"{src}ffn.shared.{ours}.weight"]
            out[dst + "mlp.shared_expert_gate.weight"] = state[src + "ffn.shared_gate.weight"]
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def _glm4_moe_extras(cfg: ModelConfig, state: dict[str, torch.Tensor], src: str, dst: str) -> dict[str, torch.Tensor]:
    """One GLM-4.5 MoE block's selection bias and shared experts. Glm4MoeMoE always has shared
    experts, n_shared_experts * d_expert wide: without ours they are zero wide and add zero."""
    out = {dst + "mlp.gate.e_score_correction_bias": state[src + "ffn.router.bias"]}
    shared = f"{dst}mlp.shared_experts."
    if cfg.moe.shared_experts:
        for ours, theirs in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
            out[f"{shared}{theirs}.weight"] = state[f"{src}ffn.shared.{ours}.weight"]
    else:
        d, dtype = cfg.d_model, state[src + "ffn.experts.w1"].dtype
        out[shared + "gate_proj.weight"] = torch.zeros(0, d, dtype=dtype)
        out[shared + "up_proj.weight"] = torch.zeros(0, d, dtype=dtype)
        out[shared + "down_proj.weight"] = torch.zeros(d, 0, dtype=dtype)
    return out
