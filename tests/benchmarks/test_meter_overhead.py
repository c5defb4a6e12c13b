"""The energy meter's sampling thread costs under 1% of a training step.

A stand-in NVML (same interface, see tests/fake_nvml.py) lets the sampler run on a CPU; on a
GPU machine the real pynvml is measured the same way by ``harness measure``'s windows.
Steps with and without the sampler are interleaved round by round; the median of per-round
ratios is the overhead.
"""

from __future__ import annotations

import statistics
import time

import torch
from fake_nvml import FakeNvml

from harness.train.energy import open_meter
from models.config import ModelConfig, MoEConfig
from models.transformer import Transformer


def test_sampler_overhead_under_one_percent(benchmark, request):
    cfg = ModelConfig(
        name="overhead",
        vocab_size=4096,
        d_model=128,
        n_layers=4,
        n_heads=4,
        d_ff=512,
        max_seq_len=128,
        moe=MoEConfig(experts=8, top_k=2, d_expert=256),
    )
    torch.manual_seed(0)
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, 4096, (8, 128))

    def step() -> None:
        out = model(x, x)
        (out.loss + out.aux_loss).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    nvml = FakeNvml()
    meter = open_meter(torch.device("cuda", 0), nvml=nvml, uuid=nvml.uuid, interval_s=0.05)
    ratios: list[float] = []

    def one_round() -> None:
        start = time.perf_counter()
        for _ in range(3):
            step()
        bare = time.perf_counter() - start
        meter.start()
        start = time.perf_counter()
        for _ in range(3):
            step()
        metered = time.perf_counter() - start
        meter.stop()
        ratios.append(metered / bare)

    benchmark.pedantic(one_round, rounds=12, iterations=1, warmup_rounds=1)
    overhead = statistics.median(ratios[1:]) - 1.0
    benchmark.extra_info.update({"case": "meter-overhead", "sampler_interval_s": 0.05, "overhead_fraction": overhead})
    print(f"\nsampler overhead: {overhead:+.2%} of step time (median of per-round ratios)")
    if not request.config.getoption("--no-targets"):
        assert overhead < 0.01
