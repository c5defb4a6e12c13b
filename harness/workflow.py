"""Helpers the Snakefile imports: which study to run, and why."""

from __future__ import annotations


def choose_study(requested: str | None) -> tuple[str, str]:
    """The study named with --config study=NAME, else `full` where CUDA is visible, else `tiny`."""
    if requested:
        return str(requested), "chosen with --config study=..."
    import torch

    if torch.cuda.is_available():
        return "full", f"CUDA is visible ({torch.cuda.get_device_name()}); pick another with --config study=NAME"
    return "tiny", "no CUDA device visible, so the CPU-sized study; pick another with --config study=NAME"
