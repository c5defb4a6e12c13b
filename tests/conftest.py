"""Shared fixtures: small configs that build in milliseconds on a CPU."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from models.config import ModelConfig, MoEConfig

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "models" / "configs"

PICO_MODEL = {
    "name": "dense-pico",
    "vocab_size": 512,
    "d_model": 32,
    "n_layers": 2,
    "n_heads": 2,
    "d_ff": 64,
    "max_seq_len": 32,
    "tie_embeddings": True,
}
"""The dense model of the pipeline tests' study: trains in seconds on a CPU."""


def tiny_config(moe: dict | None = None, **overrides) -> ModelConfig:
    """A 2-layer model; ``moe`` holds MoEConfig fields (experts 4, top_k 2, d_expert 24 default)."""
    base = dict(
        name="tiny",
        vocab_size=97,
        d_model=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        d_ff=48,
        max_seq_len=16,
    )
    base.update(overrides)
    if moe is not None:
        base["moe"] = MoEConfig(**{"experts": 4, "top_k": 2, "d_expert": 24, **moe})
    return ModelConfig(**base)


def with_moe(cfg: ModelConfig, **changes) -> ModelConfig:
    return dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, **changes))


@pytest.fixture(autouse=True)
def probe_cache(tmp_path_factory, monkeypatch) -> Path:
    """``harness plan``'s probe cache (harness.workflow.probe) in a folder of the test's own, not the
    user's: subprocesses inherit it."""
    path = tmp_path_factory.mktemp("probe-cache")
    monkeypatch.setenv("MOE_HARNESS_CACHE", str(path))
    return path


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """A prepared pico study folder (tests/pico_study.py), built once per module."""
    from pico_study import make_pristine

    return make_pristine(tmp_path_factory.mktemp("pristine"))


@pytest.fixture
def study(pristine, tmp_path) -> Path:
    """A private copy of the pristine pico study."""
    from pico_study import copy_study

    return copy_study(pristine, tmp_path)


@pytest.fixture
def one_thread():
    """Tiny matmuls: one thread is much faster than several on a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
