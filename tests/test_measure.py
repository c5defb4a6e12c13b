"""harness measure on the CPU: every figure present or absent with a reason, and consistent."""

from __future__ import annotations

import time

import pytest
import torch
from conftest import tiny_config
from fake_nvml import FakeNvml

from harness import energy, measure
from harness.measure import MeasureSettings, mfu_table, peak_flops
from models.accounting import count_params
from models.transformer import KVCache

FAST = MeasureSettings(
    batch_size=2, seq_len=16, windows=5, steps_per_window=1, warmup_steps=1, decode_tokens=4, decode_batch=3
)


@pytest.fixture(scope="module")
def moe_result():
    return measure.measure(tiny_config(moe={}), torch.device("cpu"), FAST)


def test_every_section_has_median_and_spread(moe_result):
    for section in ("train", "train_forced_balanced", "prefill", "decode_batch1", "decode_large_batch"):
        s = moe_result[section]
        assert s["windows"] == 5
        assert 0 < s["tokens_per_s_min"] <= s["tokens_per_s_median"] <= s["tokens_per_s_max"]
    assert moe_result["decode_batch1"]["batch"] == 1 and moe_result["decode_large_batch"]["batch"] == 3
    assert moe_result["imbalance_cost"] > 0


def test_memory_follows_total_parameters(moe_result):
    cfg = tiny_config(moe={})
    m = moe_result["memory"]
    assert m["param_bytes"] == 4 * count_params(cfg).total
    assert m["optimizer_state_bytes"] >= 2 * m["param_bytes"]  # AdamW: two moments per parameter
    assert m["kv_cache_bytes_per_token"] == KVCache.bytes_per_token(cfg) == 2 * 2 * 2 * 8 * 4
    assert m["peak_rss_bytes"] > m["param_bytes"]
    assert "peak_allocated_bytes" not in m  # CUDA-only figures are not invented on a CPU


def test_mfu_conventions_and_cpu_absences(moe_result):
    mfu = moe_result["mfu"]
    assert mfu["spec_peak_flops_per_s"] is None and "CPU" in mfu["spec_peak_absent_reason"]
    rows = mfu["conventions"]
    assert set(rows) == {"detailed", "6N_active", "6N_total"}
    assert all(r["mfu_vs_spec_peak"] is None and r["fraction_of_measured_matmul"] > 0 for r in rows.values())
    # Counting every expert overstates an MoE's utilisation.
    assert rows["6N_total"]["achieved_flops_per_s"] > rows["6N_active"]["achieved_flops_per_s"]
    assert moe_result["energy_train"]["energy_j"] is None and moe_result["energy_train"]["j_per_token"] is None
    assert "CPU" in moe_result["energy_train"]["absent"]["energy_j"]


def test_dense_has_no_routing_figures():
    result = measure.measure(tiny_config(), torch.device("cpu"), FAST)
    assert "imbalance_cost" not in result and "train_forced_balanced" not in result


def test_peak_table_lookup():
    assert peak_flops("NVIDIA H100 80GB HBM3") == (989e12, "H100")
    assert peak_flops("NVIDIA H100 PCIe") == (756e12, "H100 PCIe")
    assert peak_flops("NVIDIA H200") == (989e12, "H200")
    assert peak_flops("NVIDIA A100-SXM4-80GB")[0] == 312e12
    value, reason = peak_flops("Mystery Accelerator")
    assert value is None and "Mystery Accelerator" in reason


def test_mfu_against_a_named_peak():
    cfg = tiny_config(moe={})
    table = mfu_table(cfg, 1e6, "NVIDIA H100 80GB HBM3", {"flops_per_s": 800e12}, 16)
    row = table["conventions"]["detailed"]
    assert row["mfu_vs_spec_peak"] == pytest.approx(row["achieved_flops_per_s"] / 989e12)
    assert row["fraction_of_measured_matmul"] == pytest.approx(row["achieved_flops_per_s"] / 800e12)
    assert table["spec_peak_source"] == "H100"


def test_energy_window_gives_joules_per_token(monkeypatch):
    monkeypatch.setattr(measure, "MIN_WINDOW_S", 0.2)
    nvml = FakeNvml(power_w=200.0)
    meter = energy.open_meter(torch.device("cuda", 0), nvml=nvml, uuid=nvml.uuid, interval_s=0.01)
    window = measure._energy_window(meter, lambda: time.sleep(0.01), torch.device("cpu"), tokens_per_call=100)
    assert window["seconds"] >= 0.2
    assert window["j_per_token"] == pytest.approx(window["energy_j"] / window["tokens"])
    assert window["energy_j"] == pytest.approx(200.0 * window["seconds"], rel=0.05)
