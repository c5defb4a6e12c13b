"""A CPU training process keeps what a step frees for the next step (harness.core.cpu_heap): once
the heap has grown to a step's size, a training step takes no page faults, where under glibc's
default a bf16 step of dense-d64 gives part of its activations back and faults them in again,
about 4,000 pages a step."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

import pytest
from verb_subprocess import REPO

WARMUP, STEPS = 4, 6

SCRIPT = f"""
import json, resource, sys, torch
from harness.core import cpu_heap
from harness.measure.throughput import train_step
from harness.study.spec import Recipe
from harness.train.loop import make_optimizer
from harness.train.precision import Precision
from models.config import load_config
from models.transformer import Transformer

if sys.argv[1] == "kept":
    assert cpu_heap.keep_freed_memory()
torch.set_num_threads(1)
torch.manual_seed(0)
cfg = load_config("models/configs/dense-d64.yaml")
model = Transformer(cfg)
opt = make_optimizer(model, Recipe())
x = torch.randint(0, cfg.vocab_size, (4, 128))
faults = []
for _ in range({WARMUP + STEPS}):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    train_step(model, model, opt, x, x, Precision(torch.bfloat16, compile=False), torch.device("cpu"))
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({{"faults": faults[{WARMUP}:], "heap": cpu_heap.describe()}}))
"""


def _step_faults(mode: str) -> tuple[float, str]:
    """Median page faults of a training step after the warm-up, and what the heap did."""
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode], cwd=REPO, capture_output=True, text=True, timeout=300, check=True
    )
    out = json.loads(done.stdout)
    return statistics.median(out["faults"]), out["heap"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt and ru_minflt")
def test_a_kept_heap_serves_the_next_training_step_without_page_faults():
    default, said_default = _step_faults("default")
    kept, said_kept = _step_faults("kept")
    assert default > 1000, default  # freed activations given back, faulted in again each step
    assert kept < 50, kept
    assert said_default.startswith("glibc's default") and said_kept.startswith("freed memory kept")
