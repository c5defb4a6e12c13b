"""A training step's time by part (harness/measure/step_profile.py): every operator counted once,
expert GEMMs only where there are experts, the optimizer phase where the step marks it."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config

from harness.measure.step_profile import OPTIMIZER_PHASE, PARTS, profile_step
from models.transformer import Transformer


def _step(moe: dict | None):
    torch.manual_seed(0)
    model = Transformer(tiny_config(moe))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, 97, (4, 16))

    def step() -> None:
        out = model(x, x)
        (out.loss + out.aux_loss).backward()
        with torch.profiler.record_function(OPTIMIZER_PHASE):
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

    step()
    return step


@pytest.mark.parametrize("moe", [None, {"experts": 4, "top_k": 2}], ids=["dense", "moe"])
def test_parts_cover_the_step_once(moe):
    shares = profile_step(_step(moe), steps=2)
    assert set(shares["parts_ms"]) == set(PARTS)
    assert sum(shares["parts_ms"].values()) == pytest.approx(shares["total_ms"])
    assert sum(shares["parts_share"].values()) == pytest.approx(1.0)
    parts = shares["parts_ms"]
    assert parts["other GEMMs"] > 0 and parts["attention"] > 0 and parts["optimizer and clipping"] > 0
    if moe is None:
        assert parts["expert GEMMs"] == 0
    else:
        assert parts["expert GEMMs"] > 0 and parts["top-k, sort, gather, scatter"] > 0
