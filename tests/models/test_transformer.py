"""The shared transformer: causality, GQA, RoPE, tying, determinism and a training sanity check."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_config

from models.config import Dispatch, QKNorm, Routing
from models.transformer import Transformer, apply_rope, rope_tables


@pytest.mark.parametrize("moe", [None, {}], ids=["dense", "moe"])
def test_causal(moe):
    model = Transformer(tiny_config(moe=moe)).eval()
    idx = torch.randint(0, 97, (1, 16))
    changed = idx.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % 97
    a, b = model(idx).logits, model(changed).logits
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_grouped_query_attention_equals_mha_with_repeated_kv():
    gqa_cfg = tiny_config(n_heads=4, n_kv_heads=2, qk_norm=QKNorm.PER_HEAD)
    mha_cfg = tiny_config(n_heads=4, n_kv_heads=4, qk_norm=QKNorm.PER_HEAD)
    gqa, mha = Transformer(gqa_cfg), Transformer(mha_cfg)
    state = gqa.state_dict()
    hd = gqa_cfg.head_dim
    for i in range(gqa_cfg.n_layers):
        for w in ("wk", "wv"):
            key = f"blocks.{i}.attn.{w}.weight"
            heads = state[key].view(2, hd, -1)
            state[key] = heads.repeat_interleave(2, dim=0).reshape(4 * hd, -1)
    mha.load_state_dict(state)
    idx = torch.randint(0, 97, (2, 16))
    torch.testing.assert_close(gqa(idx).logits, mha(idx).logits, rtol=1e-5, atol=1e-5)


def test_rope_scores_depend_only_on_relative_position():
    cos, sin = rope_tables(8, 64, 10000.0)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def score(m: int, n: int) -> float:
        qm = apply_rope(q, cos[m : m + 1], sin[m : m + 1])
        kn = apply_rope(k, cos[n : n + 1], sin[n : n + 1])
        return float((qm * kn).sum())

    assert score(5, 2) == pytest.approx(score(40, 37), abs=1e-5)
    assert score(0, 0) == pytest.approx(float((q * k).sum()), abs=1e-6)  # position 0: identity
    assert score(5, 2) != pytest.approx(score(5, 3), abs=1e-3)


def test_rope_matches_complex_rotation():
    """Rotate-half layout: pair (i, i + hd/2) rotated by angle pos * theta^(-2i/hd)."""
    hd, pos = 8, 7
    cos, sin = rope_tables(hd, 16, 10000.0)
    x = torch.randn(hd)
    got = apply_rope(x.view(1, 1, 1, hd), cos[pos : pos + 1], sin[pos : pos + 1]).view(hd)
    freqs = 10000.0 ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    z = torch.complex(x[: hd // 2].double(), x[hd // 2 :].double()) * torch.exp(1j * pos * freqs)
    torch.testing.assert_close(got, torch.cat([z.real, z.imag]).float(), rtol=1e-5, atol=1e-6)


def test_tied_embeddings_share_storage():
    tied = Transformer(tiny_config(tie_embeddings=True))
    assert tied.lm_head.weight is tied.tok_emb.weight
    untied = Transformer(tiny_config(tie_embeddings=False))
    assert untied.lm_head.weight is not untied.tok_emb.weight


def test_initial_loss_is_near_uniform():
    cfg = tiny_config(vocab_size=512, tie_embeddings=False)
    model = Transformer(cfg)
    idx = torch.randint(0, 512, (4, 16))
    targets = torch.randint(0, 512, (4, 16))
    with torch.no_grad():
        loss = float(model(idx, targets).loss)
    assert loss == pytest.approx(math.log(512), rel=0.05)


def test_rejects_sequences_longer_than_context():
    model = Transformer(tiny_config())
    with pytest.raises(ValueError, match="exceeds max_seq_len 16"):
        model(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize(
    "moe",
    [
        None,
        dict(routing=Routing.NOISY_TOPK, load_coef=0.01),
        dict(dispatch=Dispatch.CAPACITY, capacity_factor=1.0, z_loss_coef=1e-3),
    ],
    ids=["dense", "noisy", "capacity"],
)
def test_reruns_are_bitwise_identical(moe):
    def run() -> tuple[torch.Tensor, list[torch.Tensor]]:
        torch.manual_seed(123)
        model = Transformer(tiny_config(moe=moe)).train()
        idx = torch.randint(0, 97, (2, 16))
        out = model(idx, idx.roll(-1, 1))
        (out.loss + out.aux_loss).backward()
        return out.loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    (loss_a, grads_a), (loss_b, grads_b) = run(), run()
    assert torch.equal(loss_a, loss_b)
    assert len(grads_a) == len(grads_b) > 0
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b, strict=True))


@pytest.mark.parametrize("moe", [None, {}, dict(routing=Routing.SIGMOID_BIAS)], ids=["dense", "moe", "aux-free"])
def test_a_few_steps_learn_a_repeating_sequence(moe):
    model = Transformer(tiny_config(moe=moe)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    idx = torch.arange(17).remainder(7).view(1, 17).repeat(4, 1)
    first = None
    for _ in range(60):
        out = model(idx[:, :-1], idx[:, 1:])
        (out.loss + out.aux_loss).backward()
        opt.step()
        opt.zero_grad()
        model.update_router_biases()
        first = out.loss.item() if first is None else first
    assert out.loss.item() < 0.2 * first


def test_routing_stats_per_moe_layer():
    model = Transformer(tiny_config(moe=dict(every=2), n_layers=4))
    model(torch.randint(0, 97, (2, 16)))
    stats = model.routing_stats()
    assert len(stats) == 2
    assert all(int(s.tokens_per_expert.sum()) == 2 * 16 * 2 for s in stats)
    assert Transformer(tiny_config()).routing_stats() == []


def test_force_balanced_switches_at_run_time():
    model = Transformer(tiny_config(moe=dict(experts=4, top_k=2)))
    with torch.no_grad():
        for m in model.moe_layers:
            m.router.weight.zero_()
            m.router.weight[0] += 1.0  # skewed learned routing
    idx = torch.randint(0, 97, (2, 16))
    model(idx)
    assert max(model.routing_stats()[0].tokens_per_expert.tolist()) > 16
    model.set_force_balanced(True)
    learned_free = model(idx)
    assert all(s.tokens_per_expert.tolist() == [16] * 4 for s in model.routing_stats())
    model.set_force_balanced(False)
    assert not torch.equal(model(idx).logits, learned_free.logits)


@pytest.mark.parametrize(
    "overrides",
    [{}, {"qk_norm": QKNorm.FULL, "n_kv_heads": 4}, {"moe": {}}, {"moe": {"routing": Routing.SIGMOID_BIAS}}],
    ids=["dense-gqa", "dense-mha-qknorm", "moe", "moe-sigmoid"],
)
def test_kv_cache_decoding_equals_the_full_forward(overrides):
    from models.transformer import KVCache

    cfg = tiny_config(**overrides)
    model = Transformer(cfg).eval()
    idx = torch.randint(0, 97, (3, 16))
    with torch.no_grad():
        full = model(idx).logits
        cache = KVCache(cfg, batch_size=3, max_len=16)
        steps = [model(idx[:, :5], cache=cache).logits]  # prefill
        steps.append(model(idx[:, 5:9], cache=cache).logits)  # a chunk after the prefix
        for t in range(9, 16):  # one token at a time
            steps.append(model(idx[:, t : t + 1], cache=cache).logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    assert cache.pos == 16
    assert cache.bytes == 16 * 3 * KVCache.bytes_per_token(cfg)
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        model(idx[:, :1], cache=cache)


def test_left_padded_rows_in_a_kv_cache_equal_each_prompt_alone():
    """Prompts of 3, 7 and 10 tokens, left-padded into one batch, then decoded together: every
    real position's logits equal those of the prompt run alone (RoPE sees only distances)."""
    from models.transformer import KVCache

    cfg = tiny_config(moe={})
    model = Transformer(cfg).eval()
    lengths, width, new = [3, 7, 10], 10, 4
    seqs = [torch.randint(0, 97, (n + new,)) for n in lengths]
    idx = torch.zeros(3, width, dtype=torch.long)
    for i, (s, n) in enumerate(zip(seqs, lengths, strict=True)):
        idx[i, width - n :] = s[:n]
    pad = torch.tensor([width - n for n in lengths])
    with torch.no_grad():
        cache = KVCache(cfg, batch_size=3, max_len=width + new, left_pad=pad)
        out = [model(idx, cache=cache).logits]
        for t in range(new):
            step = torch.stack([s[n + t] for s, n in zip(seqs, lengths, strict=True)])[:, None]
            out.append(model(step, cache=cache).logits)
        logits = torch.cat(out, dim=1)
        assert torch.isfinite(logits).all()  # padding queries see themselves, never nothing
        for i, (s, n) in enumerate(zip(seqs, lengths, strict=True)):
            alone = model(s[None]).logits[0]
            torch.testing.assert_close(logits[i, width - n :], alone, rtol=1e-5, atol=1e-5)
