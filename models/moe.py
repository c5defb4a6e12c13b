"""Mixture-of-Experts FFN: router -> dispatch -> experts -> combine, a drop-in for the SwiGLU FFN.

Shape legend used in names below:
    B batch, S sequence, T = B*S tokens, D model width, E routed experts, K experts per token,
    F expert hidden width, N = T*K token-expert assignments, C capacity (slots) per expert.

Router math runs in float32 even under bf16 autocast: ST-MoE (Zoph et al. 2022, sec. 3.3)
found bf16 round-off in the router's exponentials destabilises training.

Every forward leaves a :class:`RoutingStats` of detached device tensors on the layer
(``layer.stats``): reading them never forces a host sync, the caller decides when to.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.config import Dispatch, MoEConfig, Routing
from models.ffn import SwiGLU


@dataclass
class RouterOutput:
    experts_TK: Tensor  # chosen expert ids, int64
    gates_TK: Tensor  # gate weights of the chosen experts, float32
    probs_TE: Tensor  # distribution over all E used for balance losses and entropy, float32
    logits_TE: Tensor  # raw router logits (pre-softmax / pre-sigmoid), float32
    smooth_load_TE: Tensor | None  # Shazeer's P(x, i), noisy-topk in training only


@dataclass
class RoutingStats:
    """Per-layer routing health of one forward pass: device tensors, detached but for aux_loss."""

    tokens_per_expert: Tensor  # (E,) assignments routed to each expert, before any dropping
    dropped_fraction: Tensor  # () share of the T*K assignments dropped by capacity
    router_entropy: Tensor  # () mean over tokens of the entropy (nats) of probs_TE
    load_balance_loss: Tensor  # () Switch E * sum f_i P_i, unweighted (1.0 when uniform)
    z_loss: Tensor  # () mean_t logsumexp(logits_t)^2, unweighted
    importance_loss: Tensor  # () CV(importance)^2, unweighted
    load_loss: Tensor  # () CV(smooth load)^2, unweighted (0 unless noisy-topk in training)
    seq_balance_loss: Tensor  # () sequence-wise Switch loss, unweighted
    aux_loss: Tensor  # () the coefficient-weighted sum this layer adds; keeps its graph


def switch_balance_loss(probs_XE: Tensor, counts_XE: Tensor) -> Tensor:
    """E * sum_i f_i * P_i (Switch Transformer, Fedus et al. 2021, eq. 4; GShard).

    f_i is the fraction of the T*K assignments that chose expert i (so sum_i f_i = 1; we do
    not divide by K again), P_i the mean router probability of expert i. It is 1 for perfectly
    uniform routing, so the weighted loss equals its coefficient there. Leading dims are
    averaged: pass (E,) counts for a batch-level loss, (B, E) for DeepSeek-V3's sequence-wise one.
    """
    E = probs_XE.shape[-1]
    f_XE = counts_XE / counts_XE.sum(-1, keepdim=True).clamp_min(1)
    return (E * (f_XE * probs_XE).sum(-1)).mean()


def cv_squared(v_E: Tensor, eps: float = 1e-10) -> Tensor:
    """Squared coefficient of variation, population variance (Shazeer et al. 2017, appendix A)."""
    if v_E.numel() <= 1:
        return v_E.new_zeros(())
    return v_E.var(unbiased=False) / (v_E.mean() ** 2 + eps)


class Router(nn.Module):
    """Scores tokens against experts and picks K of them, per the configured routing variant."""

    def __init__(self, d_model: int, cfg: MoEConfig, init_std: float):
        super().__init__()
        self.cfg = cfg
        E = cfg.experts
        self.weight = nn.Parameter(torch.empty(E, d_model))
        noisy = cfg.routing is Routing.NOISY_TOPK
        self.noise_weight = nn.Parameter(torch.empty(E, d_model)) if noisy else None
        if cfg.routing is Routing.SIGMOID_BIAS:
            # Selection bias of DeepSeek-V3's auxiliary-loss-free balancing: not a gradient
            # parameter, updated by update_bias() after each optimizer step.
            self.register_buffer("bias", torch.zeros(E))
            self.register_buffer("load_accum", torch.zeros(E), persistent=False)
        else:
            self.bias = None
        self.init_std = init_std
        self.force_balanced = cfg.force_balanced  # switchable at run time for benchmarks
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.cfg.routing is Routing.NOISY_TOPK:
            # Shazeer et al. 2017 sec. 2.1: W_g and W_noise start at zero (uniform, noisy routing).
            nn.init.zeros_(self.weight)
            nn.init.zeros_(self.noise_weight)
        else:
            nn.init.normal_(self.weight, std=self.init_std)

    def forward(self, x_TD: Tensor) -> RouterOutput:
        cfg, K, E = self.cfg, self.cfg.top_k, self.cfg.experts
        with torch.autocast(x_TD.device.type, enabled=False):
            x_TD = x_TD.float()
            logits_TE = F.linear(x_TD, self.weight.float())
            smooth_load_TE = None
            if cfg.routing is Routing.SOFTMAX_TOPK:
                probs_TE = logits_TE.softmax(-1)
                select_TE = probs_TE
            elif cfg.routing is Routing.TOPK_SOFTMAX:
                probs_TE = logits_TE.softmax(-1)
                select_TE = logits_TE
            elif cfg.routing is Routing.NOISY_TOPK:
                # H(x) = x W_g + N(0, 1) * softplus(x W_noise), noise in training only (eq. 4).
                select_TE = logits_TE
                if self.training:
                    noise_std_TE = F.softplus(F.linear(x_TD, self.noise_weight.float())) + 1e-9
                    select_TE = logits_TE + torch.randn_like(logits_TE) * noise_std_TE
                    if cfg.load_coef > 0 and K < E:
                        smooth_load_TE = _smooth_load(logits_TE, select_TE, noise_std_TE, K)
                probs_TE = select_TE.softmax(-1)
            else:  # SIGMOID_BIAS
                scores_TE = logits_TE.sigmoid()
                # DeepSeek-V3 eq. 20: normalised affinities for the balance losses.
                probs_TE = scores_TE / scores_TE.sum(-1, keepdim=True)
                select_TE = scores_TE + self.bias

            if self.force_balanced:
                T = x_TD.shape[0]
                slots_TK = torch.arange(T, device=x_TD.device)[:, None] * K + torch.arange(K, device=x_TD.device)
                experts_TK = slots_TK % E
            else:
                experts_TK = select_TE.topk(K, dim=-1).indices

            if cfg.routing is Routing.SOFTMAX_TOPK:
                gates_TK = probs_TE.gather(-1, experts_TK)
            elif cfg.routing is Routing.SIGMOID_BIAS:
                gates_TK = scores_TE.gather(-1, experts_TK)  # the bias never enters the gate
            else:  # topk-softmax and noisy-topk: softmax over the K chosen scores
                gates_TK = select_TE.gather(-1, experts_TK).softmax(-1)
            if cfg.renormalize and cfg.routing in (Routing.SOFTMAX_TOPK, Routing.SIGMOID_BIAS):
                gates_TK = gates_TK / gates_TK.sum(-1, keepdim=True).clamp_min(1e-20)
            if cfg.route_scale != 1.0:
                gates_TK = gates_TK * cfg.route_scale
        return RouterOutput(experts_TK, gates_TK, probs_TE, logits_TE, smooth_load_TE)

    @torch.no_grad()
    def update_bias(self) -> None:
        """DeepSeek-V3 aux-loss-free update: b_i -= gamma if expert i took more than the mean
        load since the last update, += gamma if less (sign rule). Call after optimizer.step()."""
        if self.bias is None:
            return
        load_E = self.load_accum
        self.bias.add_(self.cfg.bias_update_rate * torch.sign(load_E.mean() - load_E))
        load_E.zero_()


def _smooth_load(clean_TE: Tensor, noisy_TE: Tensor, noise_std_TE: Tensor, K: int) -> Tensor:
    """Shazeer et al. 2017 appendix A, eq. 8-9: P(x, i) = Phi((clean_i - kth_excluding(H, k, i))
    / noise_std_i), the probability that expert i stays in the top k under fresh noise on i.
    Excluding i, the k-th largest of H is the (k+1)-th of H when i is in the top k, else the k-th.
    """
    top_TK1 = noisy_TE.topk(K + 1, dim=-1).values
    threshold_if_in_T1 = top_TK1[:, K:]
    threshold_if_out_T1 = top_TK1[:, K - 1 : K]
    is_in_TE = noisy_TE > threshold_if_in_T1
    p_in_TE = torch.special.ndtr((clean_TE - threshold_if_in_T1) / noise_std_TE)
    p_out_TE = torch.special.ndtr((clean_TE - threshold_if_out_T1) / noise_std_TE)
    return torch.where(is_in_TE, p_in_TE, p_out_TE)


class Experts(nn.Module):
    """E SwiGLU experts stored as 3-D weights (out x in per expert, like nn.Linear)."""

    CPU_BF16_BLOCK_ROWS = 16
    """On CPU in bf16 each expert's rows are padded to a multiple of this: oneDNN builds a kernel
    per matmul shape and keeps a bounded cache of them, so a row count that changes every step
    rebuilds kernels every step (measured: the expert matmuls of a d64 E16 k2 layer, forward and
    backward, with fresh routing loads each call, take 20.0 ms unpadded against 12.7-13.9 ms at
    8 to 32 rows a block and 13.6-14.8 ms at 64, where the padding rows cost more than the
    kernels saved; MegaBlocks pads to blocks for its own kernels). float32 is not padded: the
    same measurement gives 13.5 ms unpadded against 14.4-17.7 ms padded."""

    def __init__(self, n_experts: int, d_model: int, d_hidden: int, init_std: float, out_std: float):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(n_experts, d_hidden, d_model))  # gate
        self.w3 = nn.Parameter(torch.empty(n_experts, d_hidden, d_model))  # up
        self.w2 = nn.Parameter(torch.empty(n_experts, d_model, d_hidden))  # down
        self.init_std, self.out_std = init_std, out_std
        self.use_grouped_mm: bool | None = None  # None: grouped on CPU and in bf16 on CUDA, else a loop
        self.block_rows: int | None = None  # None: CPU_BF16_BLOCK_ROWS on CPU in bf16, else 1
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.w1, std=self.init_std)
        nn.init.normal_(self.w3, std=self.init_std)
        nn.init.normal_(self.w2, std=self.out_std)

    def compute_dtype(self, x: Tensor) -> torch.dtype:
        device = x.device.type
        if torch.is_autocast_enabled(device):
            return torch.get_autocast_dtype(device)  # autocast does not cover _grouped_mm
        return x.dtype

    def rows_per_block(self, x: Tensor) -> int:
        if self.block_rows is not None:
            return self.block_rows
        cpu_bf16 = x.device.type == "cpu" and self.compute_dtype(x) == torch.bfloat16
        return self.CPU_BF16_BLOCK_ROWS if cpu_bf16 else 1

    def forward_sorted(self, x_RD: Tensor, rows_per_expert_E: Tensor) -> Tensor:
        """Rows of x_RD are grouped by expert, rows_per_expert_E rows each (dropless); rows past
        the last group (block padding) are ignored and come back unspecified."""
        dtype = self.compute_dtype(x_RD)
        grouped = self.use_grouped_mm
        if grouped is None:
            # torch's grouped GEMM takes bf16 on CUDA and under torch.compile (its shape function
            # refuses other dtypes); eager on a CPU, any dtype.
            eager_cpu = x_RD.device.type == "cpu" and not torch.compiler.is_compiling()
            grouped = dtype == torch.bfloat16 or eager_cpu
        if grouped:
            # One call for all experts, offsets stay on the device: no host sync, no Python loop.
            offs_E = rows_per_expert_E.cumsum(0).to(torch.int32)
            x_RD = x_RD.to(dtype)
            w1, w2, w3 = (w.to(dtype).transpose(-2, -1) for w in (self.w1, self.w2, self.w3))
            h_RF = F.silu(torch._grouped_mm(x_RD, w1, offs=offs_E)) * torch._grouped_mm(x_RD, w3, offs=offs_E)
            return torch._grouped_mm(h_RF, w2, offs=offs_E)
        # A loop over experts (float32 on CUDA, and the reference the grouped call is tested
        # against); split sizes come to the host. unbind() rather than
        # w[e]: its backward stacks the E gradients once instead of zero-filling a full (E, ., .)
        # gradient per expert.
        w1, w2, w3 = self.w1.unbind(0), self.w2.unbind(0), self.w3.unbind(0)
        sizes = rows_per_expert_E.tolist()
        rest = x_RD.shape[0] - sum(sizes)
        outs = []
        for e, x_nD in enumerate(x_RD.split([*sizes, rest])[: len(sizes)]):
            h_nF = F.silu(F.linear(x_nD, w1[e])) * F.linear(x_nD, w3[e])
            outs.append(F.linear(h_nF, w2[e]))
        return torch.cat([*outs, x_RD.new_zeros(rest, x_RD.shape[1]).to(outs[0].dtype)])

    def forward_padded(self, x_ECD: Tensor) -> Tensor:
        """Fixed-capacity slots, C per expert (capacity dispatch): batched matmuls."""
        w1, w2, w3 = (w.to(x_ECD.dtype) for w in (self.w1, self.w2, self.w3))
        h_ECF = F.silu(torch.bmm(x_ECD, w1.transpose(1, 2))) * torch.bmm(x_ECD, w3.transpose(1, 2))
        return torch.bmm(h_ECF, w2.transpose(1, 2))

    # The two dispatch paths below are shared by MoE and the expert-parallel layer
    # (models/expert_parallel.py), whose owner rank runs them on the rows it received.

    def forward_grouped(self, x_ND: Tensor, experts_sorted_N: Tensor, tokens_per_expert_E: Tensor) -> Tensor:
        """Dropless: rows of x_ND sorted by expert (expert ids experts_sorted_N, tokens_per_expert_E
        rows each), block-padded where rows_per_block asks for it."""
        if x_ND.shape[0] == 0:
            # Only an expert-parallel rank that received no rows gets here. One ignored zero row
            # keeps the weights in the graph (zero gradients, as in the single-process layer) and
            # avoids _grouped_mm's backward, which rejects empty inputs; concatenated to x_ND, so
            # that the collective that brought x_ND still runs its backward on this rank.
            padded_1D = torch.cat([x_ND, x_ND.new_zeros(1, x_ND.shape[1])])
            return self.forward_sorted(padded_1D, tokens_per_expert_E)[:0]
        block = self.rows_per_block(x_ND)
        if block == 1:
            return self.forward_sorted(x_ND, tokens_per_expert_E)
        rows_N, rows_per_expert_E, R = block_rows(experts_sorted_N, tokens_per_expert_E, block)
        x_RD = x_ND.new_zeros(R, x_ND.shape[1]).index_copy(0, rows_N, x_ND)
        return self.forward_sorted(x_RD, rows_per_expert_E).index_select(0, rows_N)

    def forward_slots(self, x_ND: Tensor, slot_N: Tensor, capacity: int) -> Tensor:
        """Capacity dispatch: row n goes to slot slot_N[n] of the E * capacity slots (expert
        slot // capacity); slot E * capacity means dropped, and such rows come back as zeros."""
        E, D, C = self.w1.shape[0], x_ND.shape[1], capacity
        trash = E * C  # one extra row takes every dropped assignment and is discarded
        slots_XD = x_ND.new_zeros(E * C + 1, D).index_copy(0, slot_N, x_ND)
        y_ECD = self.forward_padded(slots_XD[:trash].view(E, C, D))
        y_XD = torch.cat([y_ECD.reshape(E * C, D), y_ECD.new_zeros(1, D)])
        return y_XD.index_select(0, slot_N)


def block_rows(experts_sorted_N: Tensor, tokens_per_expert_E: Tensor, block: int) -> tuple[Tensor, Tensor, int]:
    """Rows of a block-padded layout: expert e's assignments start at a multiple of ``block``.

    Returns each sorted assignment's row, the padded rows per expert, and a row count that
    depends only on N, E and block (N + E * (block - 1)), so shapes stay static with no host sync.
    """
    E, N = tokens_per_expert_E.numel(), experts_sorted_N.numel()
    rows_per_expert_E = (tokens_per_expert_E + block - 1) // block * block
    start_E = tokens_per_expert_E.cumsum(0) - tokens_per_expert_E
    padded_start_E = rows_per_expert_E.cumsum(0) - rows_per_expert_E
    shift_E = padded_start_E - start_E
    rows_N = torch.arange(N, device=experts_sorted_N.device) + shift_E[experts_sorted_N]
    return rows_N, rows_per_expert_E, N + E * (block - 1)


class MoE(nn.Module):
    """Router + routed experts (+ shared experts); input and output (B, S, D)."""

    def __init__(self, d_model: int, cfg: MoEConfig, init_std: float, out_std: float):
        super().__init__()
        self.cfg = cfg
        self.router = Router(d_model, cfg, init_std)
        self.experts = Experts(cfg.experts, d_model, cfg.d_expert, init_std, out_std)
        n_shared = cfg.shared_experts
        self.shared = SwiGLU(d_model, n_shared * cfg.d_expert, init_std, out_std) if n_shared else None
        self.shared_gate = nn.Linear(d_model, 1, bias=False) if cfg.shared_gate else None
        if self.shared_gate is not None:
            nn.init.normal_(self.shared_gate.weight, std=init_std)
        self.stats: RoutingStats | None = None

    def forward(self, x_BSD: Tensor) -> Tensor:
        cfg = self.cfg
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(B * S, D)
        r = self.router(x_TD)
        E, K = cfg.experts, cfg.top_k
        tokens_per_expert_E = _count(r.experts_TK.reshape(-1), E)

        if cfg.dispatch is Dispatch.DROPLESS:
            y_TD = self._dropless(x_TD, r, tokens_per_expert_E)
            dropped = x_TD.new_zeros((), dtype=torch.float32)
        else:
            cf = cfg.capacity_factor if self.training else cfg.eval_capacity_factor
            capacity = math.ceil(cf * B * S * K / E)
            y_TD, dropped = self._with_capacity(x_TD, r, tokens_per_expert_E, capacity)

        y_TD = self._add_shared(x_TD, y_TD)

        if self.training and self.router.bias is not None:
            self.router.load_accum.add_(tokens_per_expert_E.float())
        self.stats = self._losses(r, tokens_per_expert_E, dropped, B, S)
        return y_TD.view(B, S, D)

    def _add_shared(self, x_TD: Tensor, y_TD: Tensor) -> Tensor:
        if self.shared is None:
            return y_TD
        shared_TD = self.shared(x_TD)
        if self.shared_gate is not None:
            shared_TD = shared_TD * torch.sigmoid(self.shared_gate(x_TD))
        return y_TD + shared_TD

    def _dropless(self, x_TD: Tensor, r: RouterOutput, tokens_per_expert_E: Tensor) -> Tensor:
        K = self.cfg.top_k
        experts_N = r.experts_TK.reshape(-1)  # token-major: n = t * K + j
        order_N = torch.argsort(experts_N, stable=True)  # group assignments by expert
        token_N = order_N // K
        x_ND = x_TD.index_select(0, token_N)
        y_ND = self.experts.forward_grouped(x_ND, experts_N[order_N], tokens_per_expert_E)
        gates_N1 = r.gates_TK.reshape(-1)[order_N].unsqueeze(-1).to(y_ND.dtype)
        return y_ND.new_zeros(x_TD.shape).index_add_(0, token_N, y_ND * gates_N1)

    def _with_capacity(
        self, x_TD: Tensor, r: RouterOutput, tokens_per_expert_E: Tensor, capacity: int
    ) -> tuple[Tensor, Tensor]:
        """GShard-style dispatch: slots are filled in priority order (all first choices by token
        position, then all second choices, ...); assignments past an expert's capacity are
        dropped and contribute nothing, so the token passes on through the residual only."""
        E, T, C = self.cfg.experts, x_TD.shape[0], capacity
        experts_P = r.experts_TK.t().reshape(-1)  # priority order: p = j * T + t
        order_P = torch.argsort(experts_P, stable=True)
        expert_sorted_P = experts_P[order_P]
        start_E = tokens_per_expert_E.cumsum(0) - tokens_per_expert_E
        position_P = torch.arange(order_P.numel(), device=x_TD.device) - start_E[expert_sorted_P]
        keep_P = position_P < C
        slot_P = torch.where(keep_P, expert_sorted_P * C + position_P, E * C)
        token_P = order_P % T
        y_PD = self.experts.forward_slots(x_TD.index_select(0, token_P), slot_P, C)
        gate_P1 = r.gates_TK.t().reshape(-1)[order_P].unsqueeze(-1).to(y_PD.dtype)
        y_TD = y_PD.new_zeros(x_TD.shape).index_add_(0, token_P, y_PD * gate_P1)
        dropped = 1.0 - keep_P.float().mean()
        return y_TD, dropped

    def _losses(self, r: RouterOutput, tokens_per_expert_E: Tensor, dropped: Tensor, B: int, S: int) -> RoutingStats:
        cfg = self.cfg
        probs_TE = r.probs_TE
        zero = probs_TE.new_zeros(())
        lb = switch_balance_loss(probs_TE.mean(0), tokens_per_expert_E.float())
        z = torch.logsumexp(r.logits_TE, dim=-1).square().mean()  # ST-MoE eq. 5
        importance = cv_squared(gate_matrix(r).sum(0))
        load = cv_squared(r.smooth_load_TE.sum(0)) if r.smooth_load_TE is not None else zero
        seq = sequence_balance_loss(r, B, S)
        aux = weighted_aux(cfg, lb, z, importance, load, seq)
        entropy = token_entropy(probs_TE).mean()
        return routing_stats(tokens_per_expert_E, dropped, entropy, lb, z, importance, load, seq, aux)


def routing_stats(
    tokens_per_expert_E: Tensor,
    dropped: Tensor,
    entropy: Tensor,
    lb: Tensor,
    z: Tensor,
    importance: Tensor,
    load: Tensor,
    seq: Tensor,
    aux: Tensor,
) -> RoutingStats:
    """A layer's statistics, detached; only ``aux`` keeps its graph (it is trained on)."""
    d = Tensor.detach
    return RoutingStats(
        tokens_per_expert=d(tokens_per_expert_E),
        dropped_fraction=d(dropped),
        router_entropy=d(entropy),
        load_balance_loss=d(lb),
        z_loss=d(z),
        importance_loss=d(importance),
        load_loss=d(load),
        seq_balance_loss=d(seq),
        aux_loss=aux,
    )


def gate_matrix(r: RouterOutput) -> Tensor:
    """(T, E) gate values, zero for unchosen experts: Shazeer et al. 2017 eq. 6's Importance(X)
    = sum_x G(x) is its column sum."""
    return torch.zeros_like(r.probs_TE).scatter(-1, r.experts_TK, r.gates_TK)


def sequence_balance_loss(r: RouterOutput, B: int, S: int) -> Tensor:
    """DeepSeek-V3 eq. 17-20: the Switch form computed within each of the B sequences, then
    averaged over them."""
    probs_TE, K = r.probs_TE, r.experts_TK.shape[1]
    E = probs_TE.shape[-1]
    counts_BE = probs_TE.new_zeros(B, E).scatter_add_(1, r.experts_TK.view(B, S * K), probs_TE.new_ones(B, S * K))
    return switch_balance_loss(probs_TE.view(B, S, E).mean(1), counts_BE)


def token_entropy(probs_TE: Tensor) -> Tensor:
    """(T,) entropy in nats of each token's router distribution."""
    return -(probs_TE * probs_TE.clamp_min(1e-20).log()).sum(-1)


def weighted_aux(cfg: MoEConfig, lb: Tensor, z: Tensor, importance: Tensor, load: Tensor, seq: Tensor) -> Tensor:
    """The coefficient-weighted sum of the balance losses that a layer adds to the loss."""
    return (
        cfg.load_balance_coef * lb
        + cfg.z_loss_coef * z
        + cfg.importance_coef * importance
        + cfg.load_coef * load
        + cfg.seq_balance_coef * seq
    )


def _count(ids_N: Tensor, n: int) -> Tensor:
    """Histogram of ids in [0, n) without the host sync that torch.bincount needs on CUDA."""
    return torch.zeros(n, dtype=torch.long, device=ids_N.device).index_add_(0, ids_N, torch.ones_like(ids_N))
