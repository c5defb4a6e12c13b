"""The CUDA paths of a whole model, where only a GPU can check them (marked ``gpu``: skipped on a
CPU; `make gpu-check` runs them): a training step's forward and backward with no host sync,
torch.compile against eager, the NVML meter on the device, and a job pinned to its own GPU."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch
from conftest import tiny_config

from models.config import Dispatch
from models.transformer import Transformer

pytestmark = pytest.mark.gpu


def _moe_model(dispatch: Dispatch = Dispatch.DROPLESS, **overrides):
    cfg = tiny_config(
        moe={"experts": 8, "top_k": 2, "d_expert": 128, "dispatch": dispatch},
        vocab_size=1024,
        d_model=128,
        n_heads=4,
        n_kv_heads=2,
        d_ff=256,
        max_seq_len=256,
        **overrides,
    )
    return cfg, Transformer(cfg).cuda()


def _batch(cfg, B: int = 4, S: int = 256):
    idx = torch.randint(0, cfg.vocab_size, (B, S), device="cuda")
    return idx, torch.roll(idx, -1, dims=1)


@pytest.mark.parametrize("dispatch", list(Dispatch))
def test_model_training_step_has_no_host_sync(dispatch):
    """Forward, losses and backward of a whole MoE model in bf16, the trainer's order: any
    synchronising call (a .item(), a data-dependent shape on the host) raises."""
    cfg, model = _moe_model(dispatch)
    idx, targets = _batch(cfg)
    with torch.autocast("cuda", dtype=torch.bfloat16):  # warm-up: kernels and caches
        out = model(idx, targets)
    (out.loss + out.aux_loss).backward()
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(idx, targets)
        (out.loss + out.aux_loss).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert torch.isfinite(out.loss) and all(torch.isfinite(g).all() for g in grads)


def test_compiled_model_matches_eager():
    """torch.compile (inductor) of the MoE model in bf16: the same loss and gradients as eager,
    to bf16 rounding."""
    cfg, model = _moe_model()
    idx, targets = _batch(cfg)

    def step(m):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = m(idx, targets)
        (out.loss + out.aux_loss).backward()
        return out.loss.detach().float(), [p.grad.float().clone() for p in model.parameters()]

    eager_loss, eager_grads = step(model)
    compiled = torch.compile(model)
    for _ in range(2):  # the second call runs the compiled graph as training does
        loss, grads = step(compiled)
    torch.testing.assert_close(loss, eager_loss, rtol=2e-2, atol=2e-2)
    for (name, _), g, e in zip(model.named_parameters(), grads, eager_grads, strict=True):
        # bf16 kernels round differently: the same direction and size, not the same bits
        assert torch.nn.functional.cosine_similarity(g.flatten(), e.flatten(), dim=0) > 0.99, name
        assert abs(g.norm() / e.norm() - 1) < 0.1, name


def test_nvml_meter_reads_this_device():
    """The meter finds the process's GPU by UUID; under load the counter's joules and the power
    trace's integral (a trace asked for: windows are counter-only otherwise) are both positive and
    agree within 5% over a window of some seconds."""
    from harness.train.energy import MIN_WINDOW_S, open_meter

    meter = open_meter(torch.device("cuda"), trace=True)
    assert meter.available, meter
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    meter.start()
    start = time.perf_counter()
    while time.perf_counter() - start < MIN_WINDOW_S * 1.2:
        for _ in range(20):
            a @ a
        torch.cuda.synchronize()
    w = meter.stop()
    assert w.energy_j and w.energy_j > 0 and w.samples > 10
    assert abs(w.trace_energy_j - w.energy_j) / w.energy_j < 0.05
    assert w.mean_power_w > 50  # an H100/H200 draws more than that under a matmul loop


def test_a_job_is_pinned_to_a_gpu_of_its_own(tmp_path):
    """harness.train.devices claims a free GPU by UUID: the job sees one device, and NVML agrees that
    the UUID is a device of this host."""
    from harness.train.devices import host_devices

    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    env["MOE_HARNESS_GPU_LOCKS"] = str(tmp_path / "locks")
    code = "import os, torch; print(os.environ['CUDA_VISIBLE_DEVICES']); print(torch.cuda.device_count())"
    out = subprocess.run(
        [sys.executable, "-m", "harness.devices", "1", sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert out[0] in host_devices() and out[0].startswith(("GPU-", "MIG-"))
    assert out[1] == "1"
