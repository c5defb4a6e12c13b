"""A deliberately naive MoE reference: one token at a time, one chosen expert at a time.

Written from the published formulas (Shazeer et al. 2017, Fedus et al. 2022, DeepSeek-V3), not
from models/moe.py, so that the vectorised dispatch is checked against something that shares
none of its indexing.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from models.config import Dispatch, Routing
from models.moe import MoE


def _expert(layer: MoE, e: int, x_D: torch.Tensor) -> torch.Tensor:
    w = layer.experts
    return w.w2[e] @ (F.silu(w.w1[e] @ x_D) * (w.w3[e] @ x_D))


def naive_choices(
    layer: MoE, x_TD: torch.Tensor, noise_TE: torch.Tensor | None
) -> list[list[tuple[int, torch.Tensor]]]:
    """For each token, its K (expert, gate) pairs, best first."""
    cfg, router = layer.cfg, layer.router
    E, K = cfg.experts, cfg.top_k
    out = []
    for t in range(x_TD.shape[0]):
        x = x_TD[t].float()
        logits = router.weight.float() @ x
        if cfg.routing is Routing.SOFTMAX_TOPK:
            select = scores = torch.softmax(logits, 0)
        elif cfg.routing is Routing.TOPK_SOFTMAX:
            select = scores = logits
        elif cfg.routing is Routing.NOISY_TOPK:
            select = logits
            if noise_TE is not None:
                select = logits + noise_TE[t] * (F.softplus(router.noise_weight.float() @ x) + 1e-9)
            scores = select
        else:
            scores = torch.sigmoid(logits)
            select = scores + router.bias
        if router.force_balanced:
            chosen = [(t * K + j) % E for j in range(K)]
        else:
            chosen = sorted(range(E), key=lambda e: -float(select[e].detach()))[:K]
        picked = torch.stack([scores[e] for e in chosen])
        if cfg.routing in (Routing.TOPK_SOFTMAX, Routing.NOISY_TOPK):
            gates = torch.softmax(picked, 0)
        elif cfg.renormalize:
            gates = picked / picked.sum()
        else:
            gates = picked
        gates = gates * cfg.route_scale
        out.append([(e, gates[j]) for j, e in enumerate(chosen)])
    return out


def naive_moe(layer: MoE, x_BSD: torch.Tensor, noise_TE: torch.Tensor | None = None) -> torch.Tensor:
    cfg = layer.cfg
    B, S, D = x_BSD.shape
    x_TD = x_BSD.reshape(B * S, D)
    T, E, K = B * S, cfg.experts, cfg.top_k
    choices = naive_choices(layer, x_TD, noise_TE)

    kept = {(t, j): True for t in range(T) for j in range(K)}
    if cfg.dispatch is Dispatch.CAPACITY:
        cf = cfg.capacity_factor if layer.training else cfg.eval_capacity_factor
        capacity = math.ceil(cf * T * K / E)
        used = [0] * E
        for j in range(K):  # all first choices, in token order, then all second choices, ...
            for t in range(T):
                e = choices[t][j][0]
                kept[(t, j)] = used[e] < capacity
                used[e] += 1

    rows = []
    for t in range(T):
        acc = torch.zeros(D, dtype=x_TD.dtype)
        for j, (e, gate) in enumerate(choices[t]):
            if kept[(t, j)]:
                acc = acc + gate * _expert(layer, e, x_TD[t])
        if layer.shared is not None:
            s = layer.shared
            shared = s.w2.weight @ (F.silu(s.w1.weight @ x_TD[t]) * (s.w3.weight @ x_TD[t]))
            if layer.shared_gate is not None:
                shared = shared * torch.sigmoid(layer.shared_gate.weight[0] @ x_TD[t])
            acc = acc + shared
        rows.append(acc)
    return torch.stack(rows).view(B, S, D)
