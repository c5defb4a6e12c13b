"""A stand-in for the pynvml module: the same names, a simulated board drawing a set power."""

from __future__ import annotations

import time
from types import SimpleNamespace

NVML_SUCCESS = 0
NVML_ERROR_NOT_SUPPORTED = 3
NVML_FI_DEV_POWER_INSTANT = 186
NVML_TEMPERATURE_GPU = 0
NVML_CLOCK_SM = 1


class NVMLError(Exception):
    pass


class NVMLError_LibraryNotFound(NVMLError):  # named as in pynvml
    pass


class NVMLError_NotSupported(NVMLError):
    pass


class NVMLError_NotFound(NVMLError):
    pass


class FakeNvml:
    """Constant power draw; the energy counter integrates it exactly (millijoules)."""

    NVMLError = NVMLError
    NVMLError_LibraryNotFound = NVMLError_LibraryNotFound
    NVMLError_NotSupported = NVMLError_NotSupported
    NVML_SUCCESS = NVML_SUCCESS
    NVML_FI_DEV_POWER_INSTANT = NVML_FI_DEV_POWER_INSTANT
    NVML_TEMPERATURE_GPU = NVML_TEMPERATURE_GPU
    NVML_CLOCK_SM = NVML_CLOCK_SM

    def __init__(
        self,
        power_w: float = 300.0,
        instant: bool = True,
        energy_supported: bool = True,
        library: bool = True,
        uuid: str = "GPU-0000-fake",
        reasons_mask: int = 0x4,
    ):
        self.power_w, self.instant, self.energy_supported = power_w, instant, energy_supported
        self.library, self.uuid, self.reasons_mask = library, uuid, reasons_mask
        self.t0 = time.perf_counter()
        self.calls = 0

    def nvmlInit(self):
        if not self.library:
            raise NVMLError_LibraryNotFound("NVML Shared Library Not Found")

    def nvmlDeviceGetHandleByUUID(self, uuid):
        if uuid.decode() != self.uuid:
            raise NVMLError_NotFound("Not Found")
        return "handle-0"

    def nvmlDeviceGetName(self, handle):
        return b"Fake GPU"

    def nvmlDeviceGetTotalEnergyConsumption(self, handle):
        self.calls += 1
        if not self.energy_supported:
            raise NVMLError_NotSupported("Not Supported")
        return int(self.power_w * (time.perf_counter() - self.t0) * 1000)

    def nvmlDeviceGetFieldValues(self, handle, field_ids):
        self.calls += 1
        status = NVML_SUCCESS if self.instant else NVML_ERROR_NOT_SUPPORTED
        return [SimpleNamespace(nvmlReturn=status, value=SimpleNamespace(uiVal=int(self.power_w * 1000)))]

    def nvmlDeviceGetPowerUsage(self, handle):
        self.calls += 1
        return int(self.power_w * 1000)

    def nvmlDeviceGetTemperature(self, handle, sensor):
        return 61

    def nvmlDeviceGetClockInfo(self, handle, clock):
        return 1980

    def nvmlDeviceGetMemoryInfo(self, handle):
        return SimpleNamespace(total=80 * 2**30, used=12 * 2**30, free=68 * 2**30)

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle):
        return self.reasons_mask
