"""Parameter and FLOP accounting from a config alone, without building the model.

Conventions (named in every record that uses them):

``6N_active``
    6 x non-embedding active parameters per training token (Kaplan et al. 2020, sec. 2.1).
``detailed``
    Training = 3 x forward. Forward per token: 2 FLOPs per multiply-add of the attention
    projections, of the active FFN (k routed + shared experts) and of the unembedding (2 d V);
    attention scores QK^T and AV as 2 * 2 * n_ctx * d_attn per layer with no causal discount
    (Chinchilla, Hoffmann et al. 2022, appendix F); the router's 2 d E per MoE layer (counted,
    as Krajewski et al. 2024 and Abnar et al. 2025 do), plus the noise projection of a
    noisy-top-k router. Norms, activations, softmax and RoPE are not counted.

Tested against ``numel`` of the built module and against ``torch.utils.flop_counter``.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass

from models.config import ModelConfig, QKNorm, Routing


class FlopConvention(enum.StrEnum):
    SIX_N_ACTIVE = "6N_active"
    DETAILED = "detailed"


@dataclass(frozen=True)
class ParamCounts:
    total: int
    """All parameters (a tied embedding counted once)."""
    active: int
    """Parameters a token passes through: all but the unchosen routed experts."""
    embedding: int
    """Input embedding plus a separate output projection when untied."""
    total_non_embedding: int
    active_non_embedding: int
    router: int
    """Router weights over all MoE layers (the MoE's extra over a matched dense model)."""


@dataclass(frozen=True)
class ForwardFlops:
    """Forward FLOPs per token under the detailed convention, by component."""

    attention_proj: float
    attention_scores: float
    dense_ffn: float
    routed_experts: float
    shared_experts: float
    router: float
    unembedding: float

    @property
    def total(self) -> float:
        return sum(asdict(self).values())


def _attention_params(cfg: ModelConfig) -> int:
    d, hd = cfg.d_model, cfg.head_dim
    proj = d * cfg.n_heads * hd * 2 + d * cfg.n_kv_heads * hd * 2  # wq, wo; wk, wv
    if cfg.qk_norm is QKNorm.PER_HEAD:
        proj += 2 * hd
    elif cfg.qk_norm is QKNorm.FULL:
        proj += (cfg.n_heads + cfg.n_kv_heads) * hd
    return proj


def _router_params(cfg: ModelConfig) -> int:
    m = cfg.moe
    n = cfg.d_model * m.experts
    return 2 * n if m.routing is Routing.NOISY_TOPK else n


def count_params(cfg: ModelConfig) -> ParamCounts:
    d, m = cfg.d_model, cfg.moe
    norms = 2 * d  # attn_norm, ffn_norm
    per_block_common = _attention_params(cfg) + norms
    swiglu = 3 * d  # per hidden unit: gate, up, down
    dense_ffn = swiglu * cfg.d_ff if cfg.d_ff else 0
    total = active = router = 0
    for i in range(cfg.n_layers):
        total += per_block_common
        active += per_block_common
        if cfg.is_moe_layer(i):
            r = _router_params(cfg)
            shared = swiglu * m.d_expert * m.shared_experts + (d if m.shared_gate else 0)
            total += r + shared + swiglu * m.d_expert * m.experts
            active += r + shared + swiglu * m.d_expert * m.top_k
            router += r
        else:
            total += dense_ffn
            active += dense_ffn
    embedding = cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2)
    final_norm = d
    return ParamCounts(
        total=total + embedding + final_norm,
        active=active + embedding + final_norm,
        embedding=embedding,
        total_non_embedding=total + final_norm,
        active_non_embedding=active + final_norm,
        router=router,
    )


def forward_flops(cfg: ModelConfig, seq_len: int | None = None) -> ForwardFlops:
    """Detailed forward FLOPs per token at context ``seq_len`` (default: max_seq_len)."""
    n_ctx = cfg.max_seq_len if seq_len is None else seq_len
    d, hd, m = cfg.d_model, cfg.head_dim, cfg.moe
    d_attn = cfg.n_heads * hd
    L, L_moe = cfg.n_layers, cfg.n_moe_layers
    L_dense = L - L_moe
    proj = 2 * (2 * d * d_attn + 2 * d * cfg.n_kv_heads * hd)
    routed = shared = router = 0.0
    if m is not None:
        routed = L_moe * 2 * 3 * d * m.d_expert * m.top_k
        shared = L_moe * (2 * 3 * d * m.d_expert * m.shared_experts + (2 * d if m.shared_gate else 0))
        router = L_moe * 2 * _router_params(cfg)
    return ForwardFlops(
        attention_proj=float(L * proj),
        attention_scores=float(L * 2 * 2 * n_ctx * d_attn),
        dense_ffn=float(L_dense * 2 * 3 * d * (cfg.d_ff or 0)),
        routed_experts=float(routed),
        shared_experts=float(shared),
        router=float(router),
        unembedding=float(2 * d * cfg.vocab_size),
    )


def training_flops_per_token(cfg: ModelConfig, convention: FlopConvention | str, seq_len: int | None = None) -> float:
    convention = FlopConvention(convention)
    if convention is FlopConvention.SIX_N_ACTIVE:
        return 6.0 * count_params(cfg).active_non_embedding
    return 3.0 * forward_flops(cfg, seq_len).total


def summary(cfg: ModelConfig, seq_len: int | None = None) -> dict:
    """Everything ``harness count`` prints, as plain data."""
    p = count_params(cfg)
    fwd = forward_flops(cfg, seq_len)
    return {
        "name": cfg.name,
        "arm": "dense" if cfg.moe is None else "moe",
        "experts": None if cfg.moe is None else cfg.moe.experts,
        "top_k": None if cfg.moe is None else cfg.moe.top_k,
        "n_ctx": cfg.max_seq_len if seq_len is None else seq_len,
        "params": asdict(p),
        "active_fraction": p.active / p.total,
        "granularity": cfg.granularity,
        "forward_flops_per_token_detailed": {**asdict(fwd), "total": fwd.total},
        "training_flops_per_token": {c.value: training_flops_per_token(cfg, c, seq_len) for c in FlopConvention},
    }
