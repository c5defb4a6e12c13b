"""harness measure on the CPU: every figure present or absent with a reason, and consistent."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from fake_nvml import FakeNvml

from harness.measure import throughput as measure
from harness.measure.throughput import (
    VMHWM_RESET,
    WHOLE_PROCESS,
    MeasureSettings,
    mfu_table,
    parse_statm_rss,
    parse_vmhwm,
    peak_flops,
    reset_rss_peak,
    rss_bytes,
    rss_peak_bytes,
)
from harness.train import energy
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
        rates = s["tokens_per_s_windows"]  # every window, for a confidence interval of a ratio
        assert len(rates) == s["windows"] and statistics.median(rates) == s["tokens_per_s_median"]
        assert min(rates) == s["tokens_per_s_min"] and max(rates) == s["tokens_per_s_max"]
    assert moe_result["decode_batch1"]["batch"] == 1 and moe_result["decode_large_batch"]["batch"] == 3
    assert moe_result["imbalance_cost"] > 0


def test_memory_follows_total_parameters(moe_result):
    cfg = tiny_config(moe={})
    m = moe_result["memory"]
    assert m["param_bytes"] == 4 * count_params(cfg).total
    assert m["optimizer_state_bytes"] >= 2 * m["param_bytes"]  # AdamW: two moments per parameter
    assert m["kv_cache_bytes_per_token"] == KVCache.bytes_per_token(cfg) == 2 * 2 * 2 * 8 * 4
    assert m["gradient_bytes"] == m["param_bytes"]  # every parameter is trained
    assert "peak_allocated_bytes" not in m  # CUDA-only figures are not invented on a CPU


def test_measured_cpu_peak_is_over_a_baseline(moe_result):
    m = moe_result["memory"]
    assert m["baseline_rss_bytes"] > 0 and m["peak_rss_bytes"] > 0
    assert m["peak_training_bytes"] == m["peak_rss_bytes"] - m["baseline_rss_bytes"]
    # measure() takes VmHWM exactly where this process may reset it (Linux), else ru_maxrss.
    assert m["peak_source"] == (VMHWM_RESET if reset_rss_peak() else WHOLE_PROCESS)
    if m["large_allocations_mapped"] and m["peak_source"] == VMHWM_RESET:
        # RSS follows live tensors: weights, gradients and both AdamW moments of the copy at least,
        # even in a process whose earlier tests left freed heap behind.
        assert m["peak_training_bytes"] >= m["param_bytes"] + m["gradient_bytes"] + m["optimizer_state_bytes"]


# One measurement per fresh process, as `harness measure` runs: an MoE with eight experts of the
# dense model's FFN width, and that dense model.
_MEASURE_IN_A_FRESH_PROCESS = """
import json, sys
import torch
from conftest import tiny_config
from harness.measure.throughput import MeasureSettings, measure
torch.set_num_threads(1)
cfg = tiny_config(moe=json.loads(sys.argv[1]), d_model=128, d_ff=512)
settings = MeasureSettings(
    batch_size=2, seq_len=16, windows=2, steps_per_window=1, warmup_steps=1, decode_tokens=2, decode_batch=2
)
print(json.dumps(measure(cfg, torch.device("cpu"), settings)["memory"]))
"""


@pytest.mark.slow
def test_measured_peak_follows_total_parameters():
    tests = Path(__file__).parents[1]
    procs = {
        arm: subprocess.Popen(
            [sys.executable, "-c", _MEASURE_IN_A_FRESH_PROCESS, json.dumps(moe)],
            cwd=tests,
            stdout=subprocess.PIPE,
            text=True,
            env=os.environ | {"PYTHONPATH": os.pathsep.join([str(tests), str(tests.parent)])},
        )
        for arm, moe in (("moe", {"experts": 8, "d_expert": 512}), ("dense", None))
    }
    memory = {}
    for arm, proc in procs.items():
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0
        memory[arm] = json.loads(out.splitlines()[-1])
    for m in memory.values():
        # Weights, gradients and both AdamW moments are all alive during a step.
        assert m["peak_training_bytes"] >= m["param_bytes"] + m["gradient_bytes"] + m["optimizer_state_bytes"]
    moe, dense = memory["moe"], memory["dense"]
    assert moe["param_bytes"] > 5 * dense["param_bytes"]
    assert moe["peak_training_bytes"] > 3 * dense["peak_training_bytes"]


def test_vmhwm_and_statm_parsing():
    status = "Name:\tpython\nVmPeak:\t  16580 kB\nVmHWM:\t   13536 kB\nVmRSS:\t   13000 kB\n"
    assert parse_vmhwm(status) == 13536 * 1024
    assert parse_vmhwm("Name:\tpython\n") is None
    with pytest.raises(ValueError, match="unexpected unit"):
        parse_vmhwm("VmHWM:\t 1 MB\n")
    assert parse_statm_rss("4145 3384 2560 1 0 663 0\n", page_size=4096) == 3384 * 4096


def test_rss_helpers_on_a_fake_proc(tmp_path, monkeypatch):
    (tmp_path / "status").write_text("VmHWM:\t 2048 kB\n")
    (tmp_path / "statm").write_text("100 25 10 1 0 50 0\n")
    assert rss_bytes(tmp_path) == 25 * measure.os.sysconf("SC_PAGE_SIZE")
    assert reset_rss_peak(tmp_path) and (tmp_path / "clear_refs").read_text() == "5"
    assert rss_peak_bytes(True, tmp_path) == (2048 * 1024, VMHWM_RESET)
    # Without /proc, or where the reset failed: the whole process's peak, said to be so.
    monkeypatch.setattr(measure.resource, "getrusage", lambda who: type("R", (), {"ru_maxrss": 3})())
    absent = tmp_path / "absent"
    assert not reset_rss_peak(absent)
    assert rss_peak_bytes(False, tmp_path) == (3 * 1024, WHOLE_PROCESS)
    assert rss_peak_bytes(True, absent) == (3 * 1024, WHOLE_PROCESS)
    assert rss_bytes(absent) == 3 * 1024
    assert measure.ru_maxrss_bytes("darwin") == 3  # macOS reports bytes, Linux KiB


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


def test_every_measured_figure_carries_its_plausibility_flags(moe_result):
    """Each checked section has a ``flags`` list (empty when clean) and the top level lists them all;
    the reference matmul keeps its windows so that one measured under load is seen."""
    sections = ("train", "train_forced_balanced", "prefill", "decode_batch1", "decode_large_batch", "matmul")
    for section in (*sections, "memory", "energy_train", "energy_prefill"):
        assert isinstance(moe_result[section]["flags"], list)
    assert all(isinstance(row["flags"], list) for row in moe_result["mfu"]["conventions"].values())
    assert len(moe_result["matmul"]["flops_per_s_windows"]) == 5
    nested = [f for s in sections for f in moe_result[s]["flags"]] + [
        f for row in moe_result["mfu"]["conventions"].values() for f in row["flags"]
    ]
    assert sorted(map(str, moe_result["flags"])) == sorted(map(str, nested))
    assert all(f["rule"] and f["reason"] and f["figure"] for f in moe_result["flags"])


# --- the training step as the run takes it ------------------------------------------------------


def test_warm_up_lasts_until_compilation_has_settled(monkeypatch):
    """Steps that compile (the first, and a recompilation two steps later) are warm-up; the windows
    begin after STABLE_STEPS steps in a row that compiled nothing."""
    compiled = iter([1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2])  # the counter after each call, from 0
    count = {"now": 0}

    def step() -> None:
        count["now"] = next(compiled)

    monkeypatch.setattr(measure, "compilations", lambda: count["now"])
    settings = MeasureSettings(warmup_steps=2)
    assert measure.warm_up(step, settings) == 4 + measure.STABLE_STEPS  # the 4th call compiled
    count["now"], compiled = 0, iter(range(1, 100))  # compiling at every step: bounded
    assert measure.warm_up(step, settings) == measure.MAX_WARMUP_STEPS


def test_the_training_windows_say_how_long_the_warm_up_was_and_that_nothing_compiled_in_them(moe_result):
    for section in ("train", "train_forced_balanced"):
        assert moe_result[section]["warmup_steps"] >= FAST.warmup_steps
        assert moe_result[section]["compilations_in_windows"] == 0  # eager here: nothing compiles
    assert moe_result["arm"] == "moe" and moe_result["batches"] == "random tokens, a new batch each step"


def test_the_measured_step_is_the_training_runs(monkeypatch):
    """Clipping at the recipe's norm and the aux-loss-free bias update, as Trainer.train_step does;
    and a new batch each step."""
    from harness.study.spec import Recipe
    from harness.train.layouts import SINGLE
    from harness.train.loop import make_optimizer
    from harness.train.precision import resolve
    from models.config import Routing
    from models.transformer import Transformer

    cfg = tiny_config(moe={"routing": Routing.SIGMOID_BIAS, "load_balance_coef": 0.0, "bias_update_rate": 0.01})
    model = Transformer(cfg)
    clipped = []
    monkeypatch.setattr(SINGLE, "reduce_and_clip", lambda m, norm: clipped.append(norm))
    batches = measure.random_batches(cfg, 2, 16)
    x, y = batches(0)
    assert x.shape == (2, 16) and not torch.equal(x, batches(1)[0]) and torch.equal(x, batches(0)[0])
    opt = make_optimizer(model, Recipe())
    cpu = torch.device("cpu")
    measure.train_step(model, model, opt, x, y, resolve(Recipe(), cpu), cpu, grad_clip=0.5)
    assert clipped == [0.5]
    for layer in model.moe_layers:
        assert layer.router.bias.abs().sum() > 0 and layer.router.load_accum.sum() == 0
