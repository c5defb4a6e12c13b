"""The NVML energy meter's arithmetic and fallbacks, against a stand-in NVML module: counter-only
windows where the device has the energy counter, a sampled power trace where it has none or one
is asked for."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from fake_nvml import FakeNvml

from harness.train.energy import (
    COUNTER_ONLY,
    EnergyWindow,
    NullMeter,
    NvmlMeter,
    combine,
    combine_across_ranks,
    decode_reasons,
    open_meter,
)

CUDA0 = torch.device("cuda", 0)


def _measure(nvml: FakeNvml, seconds: float = 0.4, trace: bool = True) -> EnergyWindow:
    meter = open_meter(CUDA0, nvml=nvml, uuid=nvml.uuid, interval_s=0.01, trace=trace)
    assert isinstance(meter, NvmlMeter) and meter.available
    meter.start()
    time.sleep(seconds)
    return meter.stop()


def test_a_window_is_counter_only_where_the_device_has_the_counter():
    """Two counter readings and the endpoint readings of temperature, clock and reasons; no thread
    runs during the window and no power query is made; the mean power is the counter's."""
    nvml = FakeNvml(power_w=250.0)
    meter = open_meter(CUDA0, nvml=nvml, uuid=nvml.uuid, interval_s=0.01)
    meter.start()
    assert not meter.sampling
    calls = nvml.calls
    time.sleep(0.2)
    assert nvml.calls == calls  # nothing queried NVML during the window
    w = meter.stop()
    assert nvml.calls == calls + 1  # the closing counter reading
    assert w.energy_j == pytest.approx(250.0 * w.seconds, rel=0.02)
    assert w.mean_power_w == pytest.approx(250.0, rel=0.02)
    assert w.samples == 2 and w.trace_energy_j is None and w.max_power_w is None
    assert w.absent["power_trace"] == COUNTER_ONLY
    assert "TotalEnergyConsumption" in w.power_source
    assert w.max_temperature_c == 61 and w.mean_sm_clock_mhz == 1980 and w.clock_event_reasons == ["sw_power_cap"]
    assert "energy_j_accuracy" in w.absent  # 0.2 s is below the 5 s the counter needs


def test_the_sampler_is_the_fallback_where_the_counter_is_missing():
    """No counter: the sampling thread runs and its trace gives the joules (``trace_energy_j``);
    the next window of the same meter on a device that has it again is counter-only."""
    nvml = FakeNvml(power_w=120.0, energy_supported=False)
    meter = open_meter(CUDA0, nvml=nvml, uuid=nvml.uuid, interval_s=0.01)
    meter.start()
    assert meter.sampling
    time.sleep(0.2)
    w = meter.stop()
    assert w.energy_j is None and "NotSupported" in w.absent["energy_j"]
    assert w.trace_energy_j == pytest.approx(120.0 * w.seconds, rel=0.15)
    assert w.samples >= 5 and "power_trace" not in w.absent
    nvml.energy_supported = True
    meter.start()
    assert not meter.sampling
    assert meter.stop().energy_j is not None


def test_counter_joules_and_trace_agree_with_the_power_drawn():
    w = _measure(FakeNvml(power_w=250.0))
    assert w.energy_j == pytest.approx(250.0 * w.seconds, rel=0.02)
    assert w.trace_energy_j == pytest.approx(w.energy_j, rel=0.10)
    assert w.mean_power_w == pytest.approx(250.0) and w.max_power_w == pytest.approx(250.0)
    assert w.samples >= 10
    assert "POWER_INSTANT" in w.power_source
    assert w.max_temperature_c == 61 and w.mean_sm_clock_mhz == 1980
    assert w.clock_event_reasons == ["sw_power_cap"]
    assert w.device == "Fake GPU" and w.label == "GPU energy (NVML)"
    assert "energy_j_accuracy" in w.absent  # 0.4 s is below the 5 s the counter needs
    meter = open_meter(CUDA0, nvml=FakeNvml(), uuid="GPU-0000-fake")
    assert meter.memory_used_bytes() == 12 * 2**30


def test_falls_back_to_averaged_power_where_instant_is_not_offered():
    w = _measure(FakeNvml(power_w=100.0, instant=False), seconds=0.2)
    assert w.power_source == "nvmlDeviceGetPowerUsage (driver-averaged)"
    assert w.mean_power_w == pytest.approx(100.0)


def test_unsupported_counter_is_absent_with_reason_not_zero():
    w = _measure(FakeNvml(energy_supported=False), seconds=0.2, trace=False)
    assert w.energy_j is None
    assert "NotSupported" in w.absent["energy_j"]
    assert w.trace_energy_j is not None  # the trace still works


def test_no_nvml_gives_a_null_meter_that_says_why():
    meter = open_meter(CUDA0, nvml=FakeNvml(library=False), uuid="GPU-0000-fake")
    assert isinstance(meter, NullMeter) and not meter.available
    meter.start()
    w = meter.stop()
    assert w.energy_j is None and "LibraryNotFound" in w.absent["energy_j"]
    cpu = open_meter(torch.device("cpu"))
    assert isinstance(cpu, NullMeter) and "CPU" in cpu.reason


def test_device_is_found_by_uuid():
    meter = open_meter(CUDA0, nvml=FakeNvml(uuid="GPU-aaaa"), uuid="GPU-bbbb")
    assert isinstance(meter, NullMeter)
    assert "GPU-bbbb" in meter.reason and "CUDA_VISIBLE_DEVICES" in meter.reason


def test_decode_reasons():
    assert decode_reasons(0) == []
    assert decode_reasons(0x4 | 0x40) == ["sw_power_cap", "hw_thermal_slowdown"]


def test_combine_sums_energy_and_takes_the_slowest_rank():
    a = EnergyWindow(seconds=10.0, energy_j=3000.0, trace_energy_j=2900.0, mean_power_w=300.0, samples=5)
    b = EnergyWindow(seconds=12.0, energy_j=2000.0, trace_energy_j=2100.0, mean_power_w=170.0, samples=6)
    c = combine([a, b])
    assert c.seconds == 12.0 and c.energy_j == 5000.0 and c.trace_energy_j == 5000.0
    assert c.mean_power_w == 470.0 and c.samples == 11
    missing = EnergyWindow(seconds=11.0, absent={"energy_j": "NVMLError_NotSupported"})
    d = combine([a, missing])
    assert d.energy_j is None and "rank(s) [1]" in d.absent["energy_j"]


def _rank(rank: int, world: int, port: int, out) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        w = EnergyWindow(seconds=1.0 + rank, energy_j=100.0 * (rank + 1))
        out[rank] = combine_across_ranks(w).to_dict()
    finally:
        dist.destroy_process_group()


def test_one_meter_per_rank_summed_over_gloo():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_rank, args=(2, port, out), nprocs=2, join=True)
        results = dict(out)
    for rank in (0, 1):
        assert results[rank]["energy_j"] == 300.0 and results[rank]["seconds"] == 2.0
