"""Will a run fit? Its memory from the accounting, against what the machine has, before allocating.

The estimate is a floor, so that nothing that fits is refused: float32 weights and gradients,
AdamW's two moments (16 bytes per parameter), and the logits of one batch with their gradient
(float32, the widest activation of a small-vocabulary model). Activations of the blocks come on
top; the error says so.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from harness.core.errors import TooLarge
from models.accounting import count_params
from models.config import ModelConfig

BYTES_PER_PARAM = 16  # fp32 weight + gradient + AdamW exp_avg + exp_avg_sq


def training_bytes(cfg: ModelConfig, batch_size: int, seq_len: int) -> int:
    """A lower bound on the memory one training step of ``cfg`` holds."""
    params = count_params(cfg).total
    logits = 2 * batch_size * seq_len * cfg.vocab_size * 4
    return params * BYTES_PER_PARAM + logits


def available_bytes(device: torch.device) -> int | None:
    """Memory free for a new run: free GPU memory, or the host's MemAvailable; None if unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


def check_memory(cfg: ModelConfig, batch_size: int, seq_len: int, device: torch.device, what: str) -> None:
    """Refuse, before anything is allocated, a step that cannot fit in the device's free memory."""
    need, have = training_bytes(cfg, batch_size, seq_len), available_bytes(device)
    if have is not None and need > have:
        params = count_params(cfg).total
        raise TooLarge(
            f"{what}: model {cfg.name} needs at least {need / 2**30:,.1f} GiB to train "
            f"({params:,} parameters x {BYTES_PER_PARAM} bytes for weights, gradients and AdamW state, plus the "
            f"logits of a {batch_size} x {seq_len} batch; activations come on top), and {device.type} has "
            f"{have / 2**30:,.1f} GiB free: use a smaller model, batch or vocabulary"
        )
