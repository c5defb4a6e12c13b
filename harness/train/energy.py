"""GPU energy (NVML): joules from the driver's energy counter; a sampled power trace where the
counter is missing or a trace is asked for.

This is GPU board energy as NVML reports it, not energy at the wall socket (MLPerf Power
measures there). Joules come from the difference of ``nvmlDeviceGetTotalEnergyConsumption``
(millijoules, Volta and newer) across a synchronised window; the counter updates every
10-100 ms, so windows shorter than ``MIN_WINDOW_S`` are flagged.

Where the device has the counter a window is counter-only: two readings, at ``start()`` and
``stop()``, each with the temperature, SM clock and clock-event (throttle) reasons; nothing runs
during the window, so metering costs the measured work next to nothing (the counter path of
tests/benchmarks/test_meter_overhead.py). Where it has none (boards older than Volta), or with
``trace=True``, a sampling thread records power (``NVML_FI_DEV_POWER_INSTANT`` where the driver
offers it, else ``nvmlDeviceGetPowerUsage``, which on A100/H100 is a one-second average covering
only part of the time: Yang et al. 2024, "Part-time power measurements"), temperature, SM clock
and reasons every ``interval_s``, and the trace's integral stands in for the joules
(``trace_energy_j``). Use a trace for shape, the counter for joules.

Where NVML is missing (no library, no driver) the meter is a :class:`NullMeter` that says why;
a query the device does not support is recorded as absent with its reason, never as zero.

    meter = open_meter(torch.device("cuda"))               # trace=True: a power trace as well
    meter.start(); ...work...; torch.cuda.synchronize(); window = meter.stop()
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

MIN_WINDOW_S = 5.0

# Clock-event (throttle) reason bits, named as NVML's nvmlClocksEventReason* constants.
CLOCK_EVENT_REASONS = {
    0x1: "gpu_idle",
    0x2: "applications_clocks_setting",
    0x4: "sw_power_cap",
    0x8: "hw_slowdown",
    0x10: "sync_boost",
    0x20: "sw_thermal_slowdown",
    0x40: "hw_thermal_slowdown",
    0x80: "hw_power_brake_slowdown",
    0x100: "display_clock_setting",
}


def decode_reasons(mask: int) -> list[str]:
    return [name for bit, name in CLOCK_EVENT_REASONS.items() if mask & bit]


@dataclass
class EnergyWindow:
    """One measured window; units in the field names; None means absent (see ``absent``)."""

    seconds: float
    energy_j: float | None = None
    trace_energy_j: float | None = None
    mean_power_w: float | None = None
    max_power_w: float | None = None
    samples: int = 0
    power_source: str | None = None
    max_temperature_c: float | None = None
    mean_sm_clock_mhz: float | None = None
    clock_event_reasons: list[str] = field(default_factory=list)
    device: str | None = None
    absent: dict[str, str] = field(default_factory=dict)
    label: str = "GPU energy (NVML)"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class NullMeter:
    """Stands in where NVML cannot be used; every figure it gives is absent with the reason."""

    available = False

    def __init__(self, reason: str):
        self.reason = reason
        self._t0 = 0.0

    def start(self) -> None:
        self._t0 = time.perf_counter()

    def energy_so_far_j(self) -> None:
        return None

    def stop(self) -> EnergyWindow:
        absent = dict.fromkeys(("energy_j", "power_w", "temperature_c", "sm_clock_mhz"), self.reason)
        return EnergyWindow(seconds=time.perf_counter() - self._t0, absent=absent)


COUNTER_ONLY = (
    "counter-only window: the energy counter gives the joules and no power trace was sampled "
    "(open_meter(..., trace=True) samples one)"
)
"""Why a counter-only window has no trace figures (``trace_energy_j``, ``max_power_w``)."""


class NvmlMeter:
    """Energy counter of one GPU, found by UUID; a power trace where the counter is missing or
    ``trace`` asks for one."""

    available = True

    def __init__(self, nvml: Any, handle: Any, name: str, interval_s: float = 0.05, trace: bool = False):
        self.nvml, self.handle, self.name, self.interval_s = nvml, handle, name, interval_s
        self.trace = trace
        self._samples: list[tuple[float, float | None, float | None, float | None, int | None]] = []
        self._absent: dict[str, str] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._power_source: str | None = None
        self._energy0: float | None = None
        self._t0 = 0.0

    def _query(self, key: str, fn, *args):
        """One NVML query; NotSupported (or any NVML error) marks the figure absent."""
        if key in self._absent:
            return None
        try:
            return fn(self.handle, *args)
        except self.nvml.NVMLError as e:
            self._absent[key] = f"{type(e).__name__}: {e}"
            return None

    def _energy_mj(self) -> float | None:
        return self._query("energy_j", self.nvml.nvmlDeviceGetTotalEnergyConsumption)

    def _power_w(self) -> float | None:
        nvml = self.nvml
        if self._power_source in (None, "instant"):
            try:
                (value,) = nvml.nvmlDeviceGetFieldValues(self.handle, [nvml.NVML_FI_DEV_POWER_INSTANT])
                if value.nvmlReturn == nvml.NVML_SUCCESS:
                    self._power_source = "instant"
                    return value.value.uiVal / 1000.0
            except nvml.NVMLError:
                pass
            self._power_source = "average"
        mw = self._query("power_w", nvml.nvmlDeviceGetPowerUsage)
        return None if mw is None else mw / 1000.0

    def _reasons(self) -> int | None:
        nvml = self.nvml
        # The newer name, else the one older drivers' bindings have.
        fn = (
            getattr(nvml, "nvmlDeviceGetCurrentClocksEventReasons", None)
            or nvml.nvmlDeviceGetCurrentClocksThrottleReasons
        )
        return self._query("clock_event_reasons", fn)

    def _sample(self, power: bool = True) -> None:
        nvml = self.nvml
        self._samples.append(
            (
                time.perf_counter(),
                self._power_w() if power else None,
                self._query("temperature_c", nvml.nvmlDeviceGetTemperature, nvml.NVML_TEMPERATURE_GPU),
                self._query("sm_clock_mhz", nvml.nvmlDeviceGetClockInfo, nvml.NVML_CLOCK_SM),
                self._reasons(),
            )
        )

    def energy_so_far_j(self) -> float | None:
        """Counter joules since start(), without ending the window."""
        now = self._energy_mj()
        return None if now is None or self._energy0 is None else (now - self._energy0) / 1000.0

    def memory_used_bytes(self) -> int | None:
        """Device memory in use as NVML sees it (every process, plus the CUDA context)."""
        info = self._query("nvml_used_bytes", self.nvml.nvmlDeviceGetMemoryInfo)
        return None if info is None else int(info.used)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    @property
    def sampling(self) -> bool:
        """Whether the current window runs the sampling thread (no counter, or a trace asked for)."""
        return self._thread is not None

    def start(self) -> None:
        self._samples, self._absent, self._power_source = [], {}, None
        self._stop.clear()
        self._thread = None
        self._energy0 = self._energy_mj()
        self._t0 = time.perf_counter()
        tracing = self.trace or self._energy0 is None
        self._sample(power=tracing)
        if tracing:
            self._thread = threading.Thread(target=self._loop, name="nvml-sampler", daemon=True)
            self._thread.start()

    def stop(self) -> EnergyWindow:
        energy1 = self._energy_mj()
        t1 = time.perf_counter()
        tracing = self.sampling
        if tracing:
            self._stop.set()
            self._thread.join()
        self._sample(power=tracing)
        seconds = t1 - self._t0
        w = EnergyWindow(seconds=seconds, device=self.name, samples=len(self._samples))
        if self._energy0 is not None and energy1 is not None:
            w.energy_j = (energy1 - self._energy0) / 1000.0
            if seconds < MIN_WINDOW_S:
                self._absent.setdefault(
                    "energy_j_accuracy",
                    f"window of {seconds:.2f} s is shorter than {MIN_WINDOW_S} s; the counter updates every 10-100 ms",
                )
        if tracing:
            self._trace(w)
        else:
            w.mean_power_w = None if w.energy_j is None or seconds <= 0 else w.energy_j / seconds
            w.power_source = "nvmlDeviceGetTotalEnergyConsumption (mean over the window)"
            self._absent.setdefault("power_trace", COUNTER_ONLY)
        temps = [s[2] for s in self._samples if s[2] is not None]
        clocks = [s[3] for s in self._samples if s[3] is not None]
        masks = [s[4] for s in self._samples if s[4] is not None]
        w.max_temperature_c = max(temps) if temps else None
        w.mean_sm_clock_mhz = sum(clocks) / len(clocks) if clocks else None
        w.clock_event_reasons = sorted({r for m in masks for r in decode_reasons(m)})
        w.absent = dict(self._absent)
        self._thread = None
        return w

    def _trace(self, w: EnergyWindow) -> None:
        """The sampled power trace's figures: its integral (trapezoid rule), mean and maximum."""
        power = [(t, p) for t, p, *_ in self._samples if p is not None]
        if len(power) < 2:
            return
        w.trace_energy_j = sum((tb - ta) * (pa + pb) / 2 for (ta, pa), (tb, pb) in itertools.pairwise(power))
        w.mean_power_w = w.trace_energy_j / (power[-1][0] - power[0][0])
        w.max_power_w = max(p for _, p in power)
        w.power_source = (
            "nvmlDeviceGetFieldValues(NVML_FI_DEV_POWER_INSTANT)"
            if self._power_source == "instant"
            else "nvmlDeviceGetPowerUsage (driver-averaged)"
        )


def _nvml_uuid(device_index: int) -> str:
    """The NVML UUID of a torch CUDA device index (indices already follow CUDA_VISIBLE_DEVICES)."""
    import torch

    return "GPU-" + str(torch.cuda.get_device_properties(device_index).uuid)


def open_meter(device: Any, nvml: Any = None, uuid: str | None = None, interval_s: float = 0.05, trace: bool = False):
    """A meter for ``device`` (a torch.device); a NullMeter with the reason where none can work.

    ``nvml`` defaults to the pynvml module (package nvidia-ml-py); tests pass a stand-in with
    the same interface. ``uuid`` overrides the device's NVML UUID lookup. Windows are
    counter-only where the device has the energy counter; ``trace`` also samples a power trace
    every ``interval_s`` (to check the counter against it, or to see the power's shape).
    """
    if getattr(device, "type", str(device)) != "cuda":
        return NullMeter("no GPU: the run is on the CPU")
    if nvml is None:
        try:
            import pynvml as nvml
        except ImportError:
            return NullMeter("nvidia-ml-py (pynvml) is not installed")
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as e:  # LibraryNotFound, DriverNotLoaded, ...
        return NullMeter(f"NVML unavailable: {type(e).__name__}: {e}")
    if uuid is None:
        uuid = _nvml_uuid(device.index if device.index is not None else _current_device())
    try:
        handle = nvml.nvmlDeviceGetHandleByUUID(uuid.encode() if isinstance(uuid, str) else uuid)
        name = nvml.nvmlDeviceGetName(handle)
    except nvml.NVMLError as e:
        return NullMeter(
            f"no NVML device with UUID {uuid} (CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES')}): {type(e).__name__}: {e}"
        )
    return NvmlMeter(nvml, handle, name.decode() if isinstance(name, bytes) else str(name), interval_s, trace)


def _current_device() -> int:
    import torch

    return torch.cuda.current_device()


def combine(windows: list[EnergyWindow]) -> EnergyWindow:
    """One meter per rank: energy summed over ranks, time the slowest rank's; a rank without
    a figure makes the sum absent rather than short."""
    if not windows:
        raise ValueError("no windows to combine")
    out = EnergyWindow(seconds=max(w.seconds for w in windows), samples=sum(w.samples for w in windows))
    out.device = ", ".join(sorted({w.device for w in windows if w.device})) or None
    for key in ("energy_j", "trace_energy_j"):
        values = [getattr(w, key) for w in windows]
        if all(v is not None for v in values):
            setattr(out, key, sum(values))
        else:
            missing = [i for i, v in enumerate(values) if v is None]
            reasons = {w.absent.get(key, "not measured") for i, w in enumerate(windows) if i in missing}
            out.absent[key] = f"absent on rank(s) {missing}: {'; '.join(sorted(reasons))}"
    powers = [w.mean_power_w for w in windows]
    out.mean_power_w = sum(powers) if all(p is not None for p in powers) else None
    out.max_temperature_c = max((w.max_temperature_c for w in windows if w.max_temperature_c is not None), default=None)
    out.clock_event_reasons = sorted({r for w in windows for r in w.clock_event_reasons})
    for w in windows:
        for key, reason in w.absent.items():
            out.absent.setdefault(key, reason)
    return out


def combine_across_ranks(window: EnergyWindow) -> EnergyWindow:
    """Gather every rank's window (torch.distributed) and combine them; alone, the window."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return window
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, window.to_dict())
    return combine([EnergyWindow(**w) for w in gathered])
