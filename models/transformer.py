"""The decoder-only transformer both arms share: RMSNorm -> attention -> FFN -> block -> model.

Pre-norm blocks with RoPE, grouped-query causal attention through
``scaled_dot_product_attention``, optional QK-norm, and a SwiGLU FFN that the MoE layer
(``models/moe.py``) replaces in some or all blocks. Dense and MoE models differ only there.

    model = Transformer(load_config("models/configs/dense-s.yaml"))
    out = model(idx_BS, targets_BS)   # out.loss, out.aux_loss, out.logits
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.config import ModelConfig, QKNorm
from models.ffn import SwiGLU
from models.moe import MoE, RoutingStats


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rope_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos and sin, (S, head_dim), for the rotate-half RoPE layout (Su et al. 2021; as in Llama)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (B, H, S, hd); cos, sin (S, hd)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, out_std: float):
        super().__init__()
        d, hd = cfg.d_model, cfg.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, hd
        self.wq = nn.Linear(d, cfg.n_heads * hd, bias=False)
        self.wk = nn.Linear(d, cfg.n_kv_heads * hd, bias=False)
        self.wv = nn.Linear(d, cfg.n_kv_heads * hd, bias=False)
        self.wo = nn.Linear(cfg.n_heads * hd, d, bias=False)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm is QKNorm.PER_HEAD:
            self.q_norm, self.k_norm = RMSNorm(hd, cfg.norm_eps), RMSNorm(hd, cfg.norm_eps)
        elif cfg.qk_norm is QKNorm.FULL:
            self.q_norm = RMSNorm(cfg.n_heads * hd, cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.n_kv_heads * hd, cfg.norm_eps)
        else:
            self.q_norm = self.k_norm = None
        for lin in (self.wq, self.wk, self.wv):
            nn.init.normal_(lin.weight, std=cfg.init_std)
        nn.init.normal_(self.wo.weight, std=out_std)

    def forward(self, x_BSD: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None = None, layer: int = 0) -> Tensor:
        B, S, _ = x_BSD.shape
        q, k, v = self.wq(x_BSD), self.wk(x_BSD), self.wv(x_BSD)
        if self.qk_norm is QKNorm.FULL:
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, S, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, S, hd)
        k = k.view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, S, hd)
        v = v.view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, S, hd)
        if self.qk_norm is QKNorm.PER_HEAD:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        gqa = self.n_kv_heads != self.n_heads
        if cache is None:
            if q.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
                with torch.autocast("cpu", enabled=False):
                    y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True, enable_gqa=gqa)
                y = y.to(torch.get_autocast_dtype("cpu"))
            else:
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)  # (B, H, S, hd)
        else:
            k, v, mask = cache.update(layer, k, v)  # (B, Hkv, pos + S, hd)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=False, enable_gqa=gqa)
        return self.wo(y.transpose(1, 2).reshape(B, S, self.n_heads * self.head_dim))


class KVCache:
    """Preallocated keys and values of every layer, (L, B, Hkv, max_len, hd), for decoding.

    ``model(idx, cache=cache)`` appends the new tokens' keys and values and attends over all
    cached positions; ``cache.pos`` advances once per model call.

    Prompts of different lengths share a batch left-padded: ``left_pad`` (B,) holds each row's
    number of padding positions, which no query attends to (a padding query sees only itself).
    A row's real tokens then sit at positions shifted by its padding, which RoPE ignores: it
    depends only on the distance between query and key.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        batch_size: int,
        max_len: int,
        device=None,
        dtype=torch.float32,
        left_pad: Tensor | None = None,
    ):
        if max_len > cfg.max_seq_len:
            raise ValueError(f"cache length {max_len} exceeds max_seq_len {cfg.max_seq_len}")
        shape = (cfg.n_layers, batch_size, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0
        self.max_len = max_len
        self._new = 0
        self.left_pad = None if left_pad is None else left_pad.to(device)

    @staticmethod
    def bytes_per_token(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> int:
        """Keys and values of one token across all layers: 2 L Hkv hd elements."""
        return 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * torch.empty((), dtype=dtype).element_size()

    @property
    def bytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def update(self, layer: int, k_new: Tensor, v_new: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        S = k_new.shape[2]
        end = self.pos + S
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions > {self.max_len}")
        self.k[layer, :, :, self.pos : end] = k_new
        self.v[layer, :, :, self.pos : end] = v_new
        self._new = S
        mask = None
        if S > 1 or self.left_pad is not None:  # each new token sees the positions up to itself
            rows = torch.arange(self.pos, end, device=k_new.device)[:, None]  # (S, 1)
            keys = torch.arange(end, device=k_new.device)[None, :]  # (1, end)
            mask = keys <= rows
            if self.left_pad is not None:  # ... except padding: (B, 1, S, end)
                real = keys[None] >= self.left_pad[:, None, None]
                mask = (mask[None] & (real | (keys == rows)[None]))[:, None]
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end], mask

    def advance(self) -> None:
        self.pos += self._new
        self._new = 0


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        # GPT-2 / nanoGPT: residual output projections scaled by 1/sqrt(2L).
        out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, out_std)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        if cfg.is_moe_layer(layer):
            self.ffn: nn.Module = MoE(cfg.d_model, cfg.moe, cfg.init_std, out_std)
        else:
            self.ffn = SwiGLU(cfg.d_model, cfg.d_ff, cfg.init_std, out_std)

    def forward(self, x_BSD: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None = None, layer: int = 0) -> Tensor:
        x_BSD = x_BSD + self.attn(self.attn_norm(x_BSD), cos, sin, cache, layer)
        return x_BSD + self.ffn(self.ffn_norm(x_BSD))


@dataclass
class ModelOutput:
    logits: Tensor  # (B, S, V)
    loss: Tensor | None  # mean next-token cross-entropy, nats; None without targets
    aux_loss: Tensor  # () mean over MoE layers of each layer's weighted aux loss; 0 for dense


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        nn.init.normal_(self.tok_emb.weight, std=cfg.init_std)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        else:
            nn.init.normal_(self.lm_head.weight, std=cfg.init_std)
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    @property
    def moe_layers(self) -> list[MoE]:
        return [b.ffn for b in self.blocks if isinstance(b.ffn, MoE)]

    def forward(self, idx_BS: Tensor, targets_BS: Tensor | None = None, cache: KVCache | None = None) -> ModelOutput:
        """Logits for ``idx_BS``; with a ``cache``, the tokens continue the cached positions."""
        S = idx_BS.shape[1]
        start = 0 if cache is None else cache.pos
        if start + S > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {start + S} exceeds max_seq_len {self.cfg.max_seq_len}")
        cos, sin = self.rope_cos[start : start + S], self.rope_sin[start : start + S]
        x_BSD = self.tok_emb(idx_BS)
        for i, block in enumerate(self.blocks):
            x_BSD = block(x_BSD, cos, sin, cache, i)
        if cache is not None:
            cache.advance()
        logits_BSV = self.lm_head(self.norm(x_BSD))
        loss = None
        if targets_BS is not None:
            loss = F.cross_entropy(logits_BSV.flatten(0, 1).float(), targets_BS.flatten())
        moe = self.moe_layers
        if moe:
            aux = torch.stack([m.stats.aux_loss for m in moe]).mean()
        else:
            aux = logits_BSV.new_zeros((), dtype=torch.float32)
        return ModelOutput(logits_BSV, loss, aux)

    def routing_stats(self) -> list[RoutingStats]:
        """Per-MoE-layer statistics of the last forward (device tensors, no host sync)."""
        return [m.stats for m in self.moe_layers]

    def set_force_balanced(self, enabled: bool) -> None:
        """Switch every router to forced-balanced selection (benchmarks) or back to learned."""
        for m in self.moe_layers:
            m.router.force_balanced = enabled

    @torch.no_grad()
    def update_router_biases(self) -> None:
        """Aux-loss-free balancing step for sigmoid-bias routers; call after optimizer.step()."""
        for m in self.moe_layers:
            m.router.update_bias()
