"""The compute settings a study chooses (dtype, compile, threads) and the CPU bf16 dispatch."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config

from harness.study.spec import Recipe
from harness.train.precision import Precision, cpu_native_bf16, resolve
from models.config import MoEConfig
from models.moe import MoE, block_rows
from models.transformer import Transformer

CPU = torch.device("cpu")


def test_auto_dtype_is_float32_on_cpu_and_bf16_on_cuda():
    assert resolve(Recipe(), CPU) == Precision(torch.float32, compile=False)
    assert resolve(Recipe(), torch.device("cuda")).dtype == torch.bfloat16
    chosen = resolve(Recipe(dtype="bfloat16", compile=True), CPU)
    assert chosen.uses_autocast and chosen.compile
    described = chosen.describe(CPU)
    assert described["dtype"] == "bfloat16" and described["compile"] is True
    assert described["threads"] == torch.get_num_threads()


def test_native_bf16_is_read_from_the_cpu_flags(tmp_path):
    with_amx, without = tmp_path / "a", tmp_path / "b"
    with_amx.write_text("flags\t\t: fpu sse avx512f amx_bf16 amx_tile\n")
    without.write_text("flags\t\t: fpu sse avx2\n")
    assert cpu_native_bf16(with_amx) is True
    assert cpu_native_bf16(without) is False
    assert cpu_native_bf16(tmp_path / "missing") is None


def test_block_rows_start_each_expert_on_a_block_boundary():
    experts_sorted = torch.tensor([0, 0, 0, 2, 3, 3, 3, 3, 3])
    counts = torch.tensor([3, 0, 1, 5])
    rows, per_expert, total = block_rows(experts_sorted, counts, 4)
    assert per_expert.tolist() == [4, 0, 4, 8]
    assert rows.tolist() == [0, 1, 2, 4, 8, 9, 10, 11, 12]
    assert total == 9 + 4 * 3  # static: N + E * (block - 1)
    assert len(set(rows.tolist())) == len(rows) and int(rows.max()) < total


@pytest.mark.parametrize("grouped", [False, True])
def test_block_padded_dispatch_computes_the_unpadded_function(grouped):
    """Padding rows are never read back: outputs and every gradient equal the unpadded layer's."""
    layer = MoE(16, MoEConfig(experts=4, top_k=2, d_expert=8), 0.3, 0.3)
    layer.experts.use_grouped_mm = grouped
    x = torch.randn(3, 7, 16, requires_grad=True)
    results = []
    for block in (1, 8):
        layer.experts.block_rows = block
        y = layer(x)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        results.append((y.detach(), x.grad.clone(), {n: p.grad.clone() for n, p in layer.named_parameters()}))
        layer.zero_grad()
        x.grad = None
    (y1, gx1, g1), (y8, gx8, g8) = results
    torch.testing.assert_close(y8, y1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx8, gx1, rtol=1e-5, atol=1e-6)
    for name in g1:
        torch.testing.assert_close(g8[name], g1[name], rtol=1e-5, atol=1e-6, msg=name)


def test_cpu_bf16_pads_to_blocks_and_fp32_does_not():
    layer = MoE(16, MoEConfig(experts=4, top_k=2, d_expert=8), 0.3, 0.3)
    x = torch.randn(8, 16)
    assert layer.experts.rows_per_block(x) == 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer.experts.rows_per_block(x) == layer.experts.CPU_BF16_BLOCK_ROWS


@pytest.mark.slow
@pytest.mark.parametrize("moe", [None, {"experts": 4, "top_k": 2}])
def test_bf16_compiled_cpu_path_computes_the_eager_float32_loss(moe):
    """The speed-up is not bought with another function: same weights and batch, bf16 autocast
    under torch.compile gives eager float32's loss to bf16 accuracy, dense and MoE."""
    cfg = tiny_config(moe)
    model = Transformer(cfg)
    x = torch.randint(0, cfg.vocab_size, (8, cfg.max_seq_len))
    chosen = Precision(torch.bfloat16, compile=True)
    with torch.no_grad():
        reference = float(model(x, x).loss)
        with chosen.autocast(CPU):
            got = float(torch.compile(model)(x, x).loss)
    assert got == pytest.approx(reference, rel=2e-2)
    assert got != reference  # it did run in bf16
