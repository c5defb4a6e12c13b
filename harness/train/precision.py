"""How a run computes: the autocast dtype, torch.compile and the CPU threads, resolved from the
study's recipe and the device.

    p = resolve(study.recipe, device)
    with p.autocast(device):
        out = model(x, y)

``dtype: auto`` is bfloat16 autocast on CUDA and float32 on CPU. bfloat16 on CPU pays off only
where the CPU multiplies bf16 natively (AVX512-BF16 or AMX); ``describe`` records whether it does.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Precision:
    dtype: torch.dtype
    """The compute dtype: bfloat16 runs under autocast (weights and optimizer stay float32)."""
    compile: bool
    """torch.compile the model (inductor; a C compiler on CPU)."""

    @property
    def uses_autocast(self) -> bool:
        return self.dtype != torch.float32

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        return torch.autocast(device.type, dtype=self.dtype, enabled=self.uses_autocast)

    def describe(self, device: torch.device) -> dict[str, Any]:
        out = {
            "dtype": str(self.dtype).removeprefix("torch."),
            "autocast": self.uses_autocast,
            "compile": self.compile,
            "threads": torch.get_num_threads() if device.type == "cpu" else None,
        }
        if device.type == "cpu":
            out["cpu_native_bf16"] = cpu_native_bf16()
        return out


def resolve(recipe, device: torch.device) -> Precision:
    """The recipe's ``dtype`` ('auto', 'float32' or 'bfloat16') and ``compile`` on ``device``."""
    name = recipe.dtype
    if name == "auto":
        name = "bfloat16" if device.type == "cuda" else "float32"
    return Precision(DTYPES[name], bool(recipe.compile))


def cpu_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool | None:
    """Whether the CPU advertises bf16 matrix instructions (avx512_bf16 or amx_bf16); None if unknown."""
    try:
        flags = cpuinfo.read_text()
    except OSError:
        return None
    return "avx512_bf16" in flags or "amx_bf16" in flags
