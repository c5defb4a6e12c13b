"""What a model costs to run: throughput, MFU, memory and GPU energy, measured honestly.

    harness measure tiny --run moe-d64-e16k2_7e12_s0     # a trained run (its checkpoint)
    harness measure --config models/configs/moe-s-e8k2.yaml --out m.json   # random weights

Protocol: warm-up steps excluded; every window synchronised at both ends on
CUDA; the median, spread and every window's rate (ten windows by default, so a ratio of two
throughputs can be given a confidence interval from the windows); prefill and decode (KV cache,
batch 1 and a large batch) separately;
learned against forced-balanced routing to separate the cost of imbalance from the cost of
dispatch. MFU uses the named FLOP conventions side by side, including the naive
total-parameter count, against the device's peak from :data:`PEAK_FLOPS` and against a large
matmul measured here.

The training step is the run's own (:func:`train_step`): the step of
``harness.train.loop.Trainer.train_step`` in one process, with the run's dtype, torch.compile,
batch size, sequence length and CPU threads (``harness measure`` sets the threads the run trained
with), a new batch each step (the run's own training batches where its data is prepared), the
gradients clipped and the aux-loss-free routers' bias updated. Its tokens/s is then the training
run's own (record.json ``tokens_per_s``, over the whole run) up to noise; the plausibility rule
``training_disagrees`` says where they differ and why. The training steps come first, as in a
training process (inference run before them would leave the heap grown, see :func:`measure`).
Compilation is left out of the windows: the warm-up goes on until :data:`STABLE_STEPS` steps in
a row compiled nothing (:func:`warm_up`), and ``compilations_in_windows`` counts any that still
fell in a window (a bf16 MoE on a CPU keeps static shapes: it compiles in its first step, and
again in the first step after forced-balanced routing is switched on).

Memory (``result["memory"]``). ``param_bytes``, ``gradient_bytes``, ``optimizer_state_bytes``
and ``kv_cache_bytes_per_token`` are computed from tensor sizes, so they follow parameter
counts by construction. What is *measured* is ``peak_training_bytes``, the peak memory of
training steps, on every device:

* CUDA: ``torch.cuda.max_memory_allocated`` over the timed training windows, the peak reset
  after warm-up (everything the caching allocator handed out: weights, gradients, optimizer
  states, activations); also ``peak_reserved_bytes`` and NVML's ``nvml_used_bytes``.
* CPU: the resident set size that training adds to a fresh process (``cpu_training_peak``,
  spawned after every timing, given the weights). There glibc is told to give blocks of 64 KiB
  or more their own mapping (``mallopt``) and freed heap is handed back (``malloc_trim``), so
  that RSS follows the live tensors. In the measuring process itself the heap keeps freed pages
  (from the loaded checkpoint, from inference) that later allocations reuse unseen or add to,
  and the same model measured 150-180 MiB in two runs; in a fresh process repeats agree within
  1 MiB. ``baseline_rss_bytes`` is read (/proc/self/statm), the model is built with the weights
  and a fresh optimizer and warmed up for two steps, the RSS high-water mark is reset (writing
  "5" to /proc/self/clear_refs, Linux >= 4.0, proc(5)) and ``windows`` more steps run;
  ``peak_rss_bytes`` is VmHWM afterwards, and ``peak_training_bytes`` the difference: the
  model's parameters, gradients, optimizer state and activations. Where the high-water mark
  cannot be reset (no /proc, as on macOS) the peak is ``ru_maxrss`` over the whole process and
  ``peak_source`` says so; ``large_allocations_mapped`` says whether glibc took the setting.

Plausibility (``result["flags"]`` and a ``flags`` list on each section, empty when clean): the
rules of :mod:`harness.measure.plausibility` flag a figure that cannot be right, such as timing windows
spread beyond what one computation repeated gives (other work on the machine) or model FLOP/s
above the large matmul measured here; the flag names the rule and carries the numbers.
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import multiprocessing
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from harness.core import host_load
from harness.core.provenance import provenance
from harness.measure.plausibility import annotate
from harness.study.spec import Recipe
from harness.train.energy import MIN_WINDOW_S, open_meter
from harness.train.layouts import SINGLE
from harness.train.loop import make_optimizer, step_on_batch
from harness.train.precision import Precision, resolve
from models.accounting import count_params, forward_flops, training_flops_per_token
from models.config import ModelConfig
from models.transformer import KVCache, Transformer

# Dense bf16 tensor-core peak, FLOP/s, keyed by a substring of the device name (first match).
PEAK_FLOPS = [
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM / HBM3
    ("A100", 312e12),
    ("L40S", 362e12),
    ("A10G", 125e12),
]


def peak_flops(device_name: str) -> tuple[float | None, str]:
    for key, value in PEAK_FLOPS:
        if key in device_name:
            return value, key
    return None, f"no peak listed for '{device_name}' in harness.measure.throughput.PEAK_FLOPS"


@dataclasses.dataclass(frozen=True)
class MeasureSettings:
    batch_size: int = 8
    seq_len: int = 128
    windows: int = 10
    steps_per_window: int = 3
    warmup_steps: int = 2
    decode_tokens: int = 16
    decode_batch: int = 32


STABLE_STEPS = 3
"""Training steps in a row that compiled nothing, after the warm-up steps, before the windows."""

MAX_WARMUP_STEPS = 50
"""At most this many warm-up steps wait for compilation to settle (``compilations_in_windows`` then
says it did not)."""

Batches = Callable[[int], tuple[torch.Tensor, torch.Tensor]]
"""Step number -> (inputs, targets) of one training batch, on the host, as the run's data loader gives them."""


def random_batches(cfg: ModelConfig, batch_size: int, seq_len: int, seed: int = 0) -> Batches:
    """A new batch of uniformly random tokens each step (for a model measured without data)."""

    def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        xy = torch.randint(0, cfg.vocab_size, (2, batch_size, seq_len), generator=g)
        return xy[0], xy[1]

    return batch


def compilations() -> int:
    """Frames torch.compile has compiled in this process so far, recompilations included."""
    from torch._dynamo.utils import counters

    return counters["frames"]["total"]


def warm_up(fn: Callable[[], Any], settings: MeasureSettings) -> int:
    """Run ``fn`` ``settings.warmup_steps`` times, then on until :data:`STABLE_STEPS` calls in a row
    compiled nothing (at most :data:`MAX_WARMUP_STEPS` calls in all); returns the calls made."""
    calls, quiet = 0, 0
    while calls < settings.warmup_steps or (quiet < STABLE_STEPS and calls < MAX_WARMUP_STEPS):
        before = compilations()
        fn()
        calls += 1
        quiet = quiet + 1 if compilations() == before else 0
    return calls


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_windows(fn: Callable[[], Any], settings: MeasureSettings, device: torch.device, reps: int) -> list[float]:
    """Seconds per call in each of ``settings.windows`` synchronised windows, after warm-up."""
    for _ in range(settings.warmup_steps):
        fn()
    out = []
    for _ in range(settings.windows):
        _sync(device)
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        _sync(device)
        out.append((time.perf_counter() - start) / reps)
    return out


def summarise(seconds: list[float], units_per_call: float, unit: str) -> dict[str, Any]:
    """Median and range of the window rates, and every rate in the order measured.

    The per-window list lets a reader bootstrap a confidence interval for a ratio of two
    throughputs (MoE over dense) instead of comparing two medians with no spread.
    """
    in_order = [units_per_call / s for s in seconds]
    rates = sorted(in_order)
    return {
        f"{unit}_median": statistics.median(rates),
        f"{unit}_min": rates[0],
        f"{unit}_max": rates[-1],
        f"{unit}_windows": in_order,
        "seconds_per_call_median": statistics.median(seconds),
        "windows": len(seconds),
    }


def matmul_flops(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """A large square matmul's achieved FLOP/s on this device and dtype: the practical ceiling."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = time_windows(lambda: a @ b, MeasureSettings(windows=5, warmup_steps=2), device, reps=3)
    return {
        "shape": [n, n, n],
        "dtype": str(dtype),
        "flops_per_s": 2 * n**3 / statistics.median(seconds),
        # every window's rate, so that a reference measured under load is seen (harness.measure.plausibility)
        "flops_per_s_windows": [2 * n**3 / s for s in seconds],
    }


def train_step(
    model, step_model, opt, x, y, precision: Precision, device: torch.device, grad_clip: float = Recipe.grad_clip
) -> None:
    """One training step as ``harness.train.loop.Trainer.train_step`` takes it, in one process
    (``harness.train.loop.step_on_batch``): only the learning-rate assignment and logging are left out."""
    step_on_batch(model, step_model, opt, x, y, precision, device, SINGLE, grad_clip)


PROC_SELF = Path("/proc/self")
VMHWM_RESET = "VmHWM reset before the training windows"
WHOLE_PROCESS = "ru_maxrss over the whole process"


def parse_statm_rss(statm: str, page_size: int) -> int:
    """Resident bytes from /proc/<pid>/statm, whose second field is resident pages (proc(5))."""
    return int(statm.split()[1]) * page_size


def parse_vmhwm(status: str) -> int | None:
    """VmHWM, the peak resident set size, in bytes from /proc/<pid>/status (written in kB = KiB)."""
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            value, unit = line.split()[1:3]
            if unit != "kB":
                raise ValueError(f"unexpected unit in {line!r}")
            return int(value) * 1024
    return None


def ru_maxrss_bytes(platform: str = sys.platform) -> int:
    """The process's lifetime peak RSS; getrusage(2) reports it in bytes on macOS, KiB on Linux."""
    scale = 1 if platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def rss_bytes(proc: Path = PROC_SELF) -> int:
    """Current RSS; without /proc (macOS) the peak so far, which is never below it."""
    try:
        return parse_statm_rss((proc / "statm").read_text(), os.sysconf("SC_PAGE_SIZE"))
    except OSError:
        return ru_maxrss_bytes()


def release_freed_memory() -> bool:
    """Return the heap that freed tensors left behind to the OS (glibc ``malloc_trim(0)``), so that
    RSS counts live memory: otherwise a loaded checkpoint or an earlier phase leaves freed pages
    resident that later allocations reuse unseen. False where there is no glibc."""
    gc.collect()
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        return False
    return True


MMAP_THRESHOLD = 64 * 1024  # bytes: blocks at least this large get their own mapping
_M_MMAP_THRESHOLD = -3  # mallopt parameter number (glibc malloc.h)


def map_large_allocations() -> bool:
    """Make glibc serve every block of ``MMAP_THRESHOLD`` or more from its own mapping, returned to
    the OS when freed, so that RSS follows the live tensors instead of a heap that keeps freed
    pages (glibc raises its threshold as blocks are freed, up to 32 MiB, unless it is set).
    False where there is no glibc: RSS then includes whatever the allocator keeps."""
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):
        return False


def reset_rss_peak(proc: Path = PROC_SELF) -> bool:
    """Reset VmHWM to the current RSS so a later read covers only what follows.

    Writing "5" to clear_refs does this on Linux >= 4.0 (proc(5)); False where it cannot be
    done (no /proc, a read-only /proc, an older kernel rejecting the value).
    """
    try:
        (proc / "clear_refs").write_text("5")
    except OSError:
        return False
    return True


def rss_peak_bytes(was_reset: bool, proc: Path = PROC_SELF) -> tuple[int, str]:
    """Peak RSS since :func:`reset_rss_peak` succeeded, else the whole process's; and which it is."""
    if was_reset:
        try:
            peak = parse_vmhwm((proc / "status").read_text())
        except OSError:
            peak = None
        if peak is not None:
            return peak, VMHWM_RESET
    return ru_maxrss_bytes(), WHOLE_PROCESS


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _optimizer_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))


def _energy_window(meter, fn: Callable[[], Any], device: torch.device, tokens_per_call: int) -> dict[str, Any]:
    """Repeat fn for at least MIN_WINDOW_S under the meter (GPU); J/token from the counter."""
    if not meter.available:
        meter.start()
        return {**meter.stop().to_dict(), "j_per_token": None}
    calls = 0
    _sync(device)
    meter.start()
    start = time.perf_counter()
    while time.perf_counter() - start < MIN_WINDOW_S * 1.2:
        fn()
        calls += 1
        if calls % 8 == 0:
            _sync(device)
    _sync(device)
    window = meter.stop().to_dict()
    tokens = calls * tokens_per_call
    window["tokens"] = tokens
    window["j_per_token"] = None if window["energy_j"] is None else window["energy_j"] / tokens
    return window


def _memory(model, opt, cfg: ModelConfig, device: torch.device, dtype: torch.dtype, meter) -> dict[str, Any]:
    """Computed sizes plus the measured training peak (see the module docstring)."""
    params = [p for p in model.parameters() if p.requires_grad]
    memory = {
        "param_bytes": _tensor_bytes(model.parameters()),
        # The step ends in zero_grad(set_to_none=True), so no gradients are held here: this is then
        # the size the gradients take during backward (same shape and dtype as the trainable params).
        "gradient_bytes": _tensor_bytes(params),
        "optimizer_state_bytes": _optimizer_bytes(opt),
        "kv_cache_bytes_per_token": KVCache.bytes_per_token(cfg, dtype),
    }
    if device.type == "cuda":
        memory["peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
        memory["peak_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
        memory["nvml_used_bytes"] = meter.memory_used_bytes() if meter.available else None
        memory["peak_training_bytes"] = memory["peak_allocated_bytes"]
    return memory


def cpu_training_peak(
    cfg: ModelConfig, model, x: torch.Tensor, y: torch.Tensor, steps: int, precision: Precision
) -> dict[str, Any]:
    """Resident memory that training ``model`` (a copy with its weights) adds to a fresh process
    (see the module docstring); the process is spawned so that no earlier heap is reused."""
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    eager = Precision(precision.dtype, compile=False)  # compiling here would cost more than it shows
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_training_peak, (cfg, state, x.cpu(), y.cpu(), steps, torch.get_num_threads(), eager))


def _warm_runtime() -> None:
    """One throwaway training step of a toy model: a process's first step pays one-time costs that
    are not the model's (the first AdamW step imports torch._dynamo, about 70 MiB resident)."""
    layer = torch.nn.Linear(8, 8)
    opt = make_optimizer(layer, Recipe())
    layer(torch.ones(2, 8)).square().mean().backward()
    opt.step()


def _training_peak(
    cfg: ModelConfig, state: dict, x: torch.Tensor, y: torch.Tensor, steps: int, threads: int, precision: Precision
):
    mapped = map_large_allocations()
    torch.set_num_threads(threads)
    _warm_runtime()
    release_freed_memory()
    baseline = rss_bytes()
    model = Transformer(cfg)  # its parameters, gradients, optimizer state and activations are measured
    model.load_state_dict(state)
    del state
    opt = make_optimizer(model, Recipe())
    cpu = torch.device("cpu")
    for _ in range(2):  # the optimizer state exists from the first step on
        train_step(model, model, opt, x, y, precision, cpu)
    release_freed_memory()
    was_reset = reset_rss_peak()
    for _ in range(steps):
        train_step(model, model, opt, x, y, precision, cpu)
    peak, source = rss_peak_bytes(was_reset)
    return {
        "baseline_rss_bytes": baseline,
        "peak_rss_bytes": peak,
        "peak_source": source,
        "large_allocations_mapped": mapped,
        "peak_training_bytes": peak - baseline,
    }


def measure(
    cfg: ModelConfig,
    device: torch.device,
    settings: MeasureSettings = MeasureSettings(),
    state_dict: dict[str, torch.Tensor] | None = None,
    seed: int = 0,
    precision: Precision | None = None,
    recipe: Recipe | None = None,
    batches: Batches | None = None,
    batches_from: str = "given by the caller",
    trained: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """``precision``: the run's (default: ``recipe``'s on ``device``); inference runs eager.
    ``recipe``: the run's (optimizer and gradient clipping; default ``Recipe()``). ``batches``: the
    training batches (default: random tokens, a new batch each step), ``batches_from`` what they
    are. ``trained``: the training run's own speed and settings
    (``harness.measure.plausibility.training_run``), which the plausibility rules compare with the
    measured one. The CPU threads are the caller's (``torch.set_num_threads``)."""
    recipe = recipe or Recipe()
    precision = precision or resolve(recipe, device)
    compute_dtype = precision.dtype
    torch.manual_seed(seed)
    model = Transformer(cfg).to(device)
    if state_dict is not None:
        model.load_state_dict(state_dict)
    B, S = settings.batch_size, min(settings.seq_len, cfg.max_seq_len)
    x = torch.randint(0, cfg.vocab_size, (B, S), device=device)
    y = torch.randint(0, cfg.vocab_size, (B, S), device=device)
    meter = open_meter(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result: dict[str, Any] = {"model": cfg.name, "arm": "dense" if cfg.moe is None else "moe", "device_name": name}
    result["dtype"] = str(compute_dtype)
    result["precision"] = precision.describe(device)
    result["settings"] = settings.__dict__ | {"seq_len": S}
    result["batches"] = "random tokens, a new batch each step" if batches is None else batches_from
    if trained is not None:
        result["training_run"] = trained
    load_samples = [host_load.sample()]  # how busy the host was, at the start and the end (plausibility)

    # Training steps as the run takes them (train_step), learned routing, then forced-balanced
    # routing. First, as in a training process, where nothing ran before them: the heap then grows
    # to a step's size as a training run's does (on a CPU the verb keeps freed memory as
    # `harness train` does, harness.core.cpu_heap; under glibc's default, a heap grown by inference
    # first would spare the steps the page faults a training process takes).
    given = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}  # training changes them
    model.train()
    opt = make_optimizer(model, recipe)
    step_model = torch.compile(model) if precision.compile else model
    batches = batches or random_batches(cfg, B, S, seed)
    steps = iter(range(1 << 62))

    def step() -> None:
        train_step(model, step_model, opt, *batches(next(steps)), precision, device, recipe.grad_clip)

    result["train"] = _timed_training(step, settings, device, B * S)
    result["memory"] = _memory(model, opt, cfg, device, compute_dtype, meter)
    result["energy_train"] = _energy_window(meter, step, device, B * S)
    if cfg.moe is not None:
        model.set_force_balanced(True)  # a switch the compiled graph is guarded on: warm_up recompiles
        result["train_forced_balanced"] = _timed_training(step, settings, device, B * S)
        model.set_force_balanced(False)
        learned, balanced = result["train"], result["train_forced_balanced"]
        result["imbalance_cost"] = learned["seconds_per_call_median"] / balanced["seconds_per_call_median"]

    # Inference, on the weights as given.
    model.load_state_dict(given)
    del given
    result |= _inference(model, cfg, x, settings, device, precision, meter)

    result["matmul"] = matmul_flops(device, compute_dtype)
    result["mfu"] = mfu_table(cfg, result["train"]["tokens_per_s_median"], name, result["matmul"], S)
    if device.type == "cpu":  # last: it changes how the process allocates, which would change the timings
        result["memory"] |= cpu_training_peak(cfg, model, x, y, settings.windows, precision)
    load_samples.append(host_load.sample())
    result["host_load"] = host_load.summary(load_samples, os.cpu_count())
    result["provenance"] = provenance(device, time_utc=host_load.utc_now())
    return annotate(result)  # a figure that cannot be right carries a flag (harness.measure.plausibility)


def _inference(model, cfg: ModelConfig, x, settings: MeasureSettings, device, precision: Precision, meter) -> dict:
    """Prefill of the whole context (and its GPU energy), then decode with a KV cache at batch 1 and
    a large batch; eager, in eval mode."""
    out: dict[str, Any] = {}
    B, S = x.shape
    model.eval()
    with torch.no_grad(), precision.autocast(device):
        prefill = lambda: model(x)  # noqa: E731
        out["prefill"] = summarise(time_windows(prefill, settings, device, 1), B * S, "tokens_per_s")
        out["energy_prefill"] = _energy_window(meter, prefill, device, B * S)
        prompt = max(1, S - settings.decode_tokens)
        for label, batch in (("decode_batch1", 1), ("decode_large_batch", settings.decode_batch)):
            tokens = torch.randint(0, cfg.vocab_size, (batch, S), device=device)

            def decode(tokens=tokens, batch=batch) -> None:
                cache = KVCache(cfg, batch, S, device=device, dtype=precision.dtype)
                model(tokens[:, :prompt], cache=cache)
                for t in range(prompt, S):
                    model(tokens[:, t : t + 1], cache=cache)

            seconds = time_windows(decode, settings, device, 1)
            out[label] = summarise(seconds, batch * (S - prompt), "tokens_per_s") | {"batch": batch}
    return out


def _timed_training(step: Callable[[], None], settings: MeasureSettings, device: torch.device, tokens: int) -> dict:
    """Warm-up past compilation (:func:`warm_up`; memory peaks are reset after it), then the windows."""
    warmup = warm_up(step, settings)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    before = compilations()
    seconds = time_windows(step, dataclasses.replace(settings, warmup_steps=0), device, settings.steps_per_window)
    return summarise(seconds, tokens, "tokens_per_s") | {
        "warmup_steps": warmup,
        "compilations_in_windows": compilations() - before,
    }


def mfu_table(cfg: ModelConfig, tokens_per_s: float, device_name: str, matmul: dict, seq_len: int) -> dict[str, Any]:
    """Model FLOP utilisation under each convention, against spec peak and measured matmul."""
    p = count_params(cfg)
    conventions = {
        "detailed": training_flops_per_token(cfg, "detailed", seq_len),
        "6N_active": training_flops_per_token(cfg, "6N_active"),
        # What tools that count every expert report (e.g. 6 x tokens x all parameters).
        "6N_total": 6.0 * p.total_non_embedding,
    }
    peak, peak_key = peak_flops(device_name) if device_name != "cpu" else (None, "no spec peak for a CPU")
    rows = {}
    for name, fpt in conventions.items():
        achieved = tokens_per_s * fpt
        rows[name] = {
            "flops_per_token": fpt,
            "achieved_flops_per_s": achieved,
            "mfu_vs_spec_peak": None if peak is None else achieved / peak,
            "fraction_of_measured_matmul": achieved / matmul["flops_per_s"],
        }
    return {
        "spec_peak_flops_per_s": peak,
        "spec_peak_source": peak_key if peak is not None else None,
        "spec_peak_absent_reason": None if peak is not None else peak_key,
        "forward_flops_per_token_detailed": forward_flops(cfg, seq_len).total,
        "conventions": rows,
    }
