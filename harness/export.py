"""Export a trained model to a Hugging Face directory that ``transformers`` loads as is.

    harness export tiny --run moe-d64-e8k2_7e12_s0 --out exported/

The target class is the one whose computation equals ours; a variant with no faithful
equivalent is refused with the reason rather than exported approximately:

  dense, no QK-norm                         -> LlamaForCausalLM
  dense, per-head QK-norm                   -> Qwen3ForCausalLM
  MoE softmax-topk + renorm, every block    -> MixtralForCausalLM   (no QK-norm, no shared experts)
  MoE softmax-topk, per-head QK-norm        -> Qwen3MoeForCausalLM  (norm_topk_prob = renormalize)
  MoE softmax-topk, full QK-norm            -> OlmoeForCausalLM     (every block MoE)
  MoE softmax-topk, gated shared experts    -> Qwen2MoeForCausalLM  (no QK-norm)

Qwen's MoE classes place sparse layers as we do ((i + 1) % decoder_sparse_step == 0, with
``mlp_only_layers`` for leading dense blocks). The tokenizer is exported as a fast tokenizer.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from models.config import Dispatch, ModelConfig, QKNorm, Routing


class NotExportable(ValueError):
    pass


def hf_family(cfg: ModelConfig) -> str:
    """The transformers architecture that computes exactly what ``cfg`` does, or NotExportable."""
    m = cfg.moe
    if m is None:
        if cfg.qk_norm is QKNorm.NONE:
            return "llama"
        if cfg.qk_norm is QKNorm.PER_HEAD:
            return "qwen3"
        raise NotExportable(f"{cfg.name}: a dense model with full-width QK-norm has no transformers class")
    problems = []
    if m.routing is not Routing.SOFTMAX_TOPK:
        problems.append(f"routing '{m.routing.value}' (transformers' MoE classes use softmax over E, then top-k)")
    if m.dispatch is not Dispatch.DROPLESS:
        problems.append("capacity dispatch drops tokens; transformers' MoE blocks are dropless")
    if m.route_scale != 1.0:
        problems.append(f"route_scale {m.route_scale}")
    if m.force_balanced:
        problems.append("force_balanced routing")
    dense_blocks = cfg.n_dense_layers > 0
    if m.shared_experts:
        if not m.shared_gate or cfg.qk_norm is not QKNorm.NONE:
            problems.append("shared experts export only as Qwen2-MoE: with shared_gate and without QK-norm")
        family = "qwen2_moe"
    elif cfg.qk_norm is QKNorm.PER_HEAD:
        family = "qwen3_moe"
    elif cfg.qk_norm is QKNorm.FULL:
        family = "olmoe"
        if dense_blocks:
            problems.append("OLMoE has an MoE in every block")
    else:
        family = "mixtral" if m.renormalize and not dense_blocks else "qwen3_moe"
        if family == "qwen3_moe":
            problems.append(
                "without QK-norm only Mixtral matches (renormalised gates, MoE in every block); "
                "Qwen3-MoE would add a QK-norm"
            )
    if problems:
        raise NotExportable(f"{cfg.name} has no faithful transformers equivalent: " + "; ".join(problems))
    return family


def hf_config(cfg: ModelConfig, family: str, eos_id: int | None):
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
    m = cfg.moe
    if family in ("llama", "qwen3"):
        cls = transformers.LlamaConfig if family == "llama" else transformers.Qwen3Config
        return cls(**common, intermediate_size=cfg.d_ff, attention_bias=False)
    moe = {"num_experts_per_tok": m.top_k, "output_router_logits": False}
    if family == "mixtral":
        return transformers.MixtralConfig(
            **common, **moe, intermediate_size=m.d_expert, num_local_experts=m.experts, router_jitter_noise=0.0
        )
    if family == "olmoe":
        return transformers.OlmoeConfig(
            **common, **moe, intermediate_size=m.d_expert, num_experts=m.experts, norm_topk_prob=m.renormalize
        )
    sparse = {
        "num_experts": m.experts,
        "moe_intermediate_size": m.d_expert,
        "intermediate_size": cfg.d_ff or m.d_expert,
        "norm_topk_prob": m.renormalize,
        "decoder_sparse_step": m.every,
        "mlp_only_layers": list(range(m.first_dense)),
    }
    if family == "qwen3_moe":
        return transformers.Qwen3MoeConfig(**common, **moe, **sparse)
    return transformers.Qwen2MoeConfig(
        **common, **moe, **sparse, shared_expert_intermediate_size=m.shared_experts * m.d_expert
    )


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
        if cfg.moe.shared_experts:
            for ours, theirs in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
                out[f"{dst}mlp.shared_expert.{theirs}.weight"] = state[f"{src}ffn.shared.{ours}.weight"]
            out[dst + "mlp.shared_expert_gate.weight"] = state[src + "ffn.shared_gate.weight"]
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def export(cfg: ModelConfig, state: dict[str, torch.Tensor], tokenizer_file: Path | None, out_dir: Path) -> str:
    """Write ``out_dir`` (config, safetensors weights, fast tokenizer); returns the class name."""
    import transformers

    family = hf_family(cfg)
    eos_id = None
    tokenizer = None
    if tokenizer_file is not None:
        tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file), eos_token="<|endoftext|>")
        eos_id = tokenizer.eos_token_id
    hf_cfg = hf_config(cfg, family, eos_id)
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg)
    missing, unexpected = model.load_state_dict(hf_state_dict(cfg, state, family), strict=False)
    missing = [k for k in missing if not (cfg.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise NotExportable(
            f"{cfg.name}: weight mapping to {type(model).__name__} is incomplete: {missing or unexpected}"
        )
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return type(model).__name__
