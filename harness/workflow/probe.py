"""The CPU probe of ``harness plan``: a few timed training steps of a model, only where they are
safe and quick, remembered between plans with when and under what load they were taken.

A probe runs only when both bounds allow it, so that planning never trains what may not fit:

* memory: :func:`probe_bytes`, the probe's peak (float32 weights, gradients and AdamW's two
  moments, and the activations one eager step keeps for its backward pass) must be at most
  :data:`PROBE_MEMORY_FRACTION` of the memory available now (MemAvailable);
* time: the probe's steps, at the FLOP rate of the largest model probed so far (before any, at
  :data:`PRIOR_FLOPS_PER_THREAD`), must take at most :data:`PROBE_MAX_SECONDS`, and all probes of
  one plan at most :data:`PROBE_BUDGET_SECONDS`.

A refusal says which bound and by how much. Measured step times are kept in a small JSON file
(:func:`cache_path`: ``$MOE_HARNESS_CACHE``, else ``$XDG_CACHE_HOME/moe-harness``, else
``~/.cache/moe-harness``), keyed by what is timed (the model's configuration, batch, context,
threads and dtype), each entry saying where and when it was taken: the CPU, its cores, torch's
version, the time, and the host's load (:mod:`harness.core.host_load`). A cached probe is taken
again (:meth:`Probe.stale`) when it was taken on a busy host, more than :data:`PROBE_MAX_AGE_DAYS`
ago, or on another CPU, core count or torch; ``harness plan --reprobe`` takes every probe again.
An entry of an older harness (no time or load) is stale; a file that is not a probe cache is named
in a warning and ignored, then replaced by the plan's probes.

``harness plan --probes FILE`` reads another host's probes (``results/reference/cpu/probes.json``,
the reference host's, from which the README's study times come) as they are, and probes nothing:

    MOE_HARNESS_CACHE=results/reference/cpu harness plan cpu --reprobe   # on the reference host
    harness plan cpu --probes results/reference/cpu/probes.json --results /tmp/none
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from harness.core import host_load
from harness.core.provenance import cpu_name
from harness.measure.plausibility import LOAD_LIMIT, STEAL_LIMIT
from harness.study.spec import Run
from models.accounting import count_params
from models.config import ConfigError
from models.transformer import Transformer

PROBE_STEPS, PROBE_WARMUP = 4, 2
PROBE_MEMORY_FRACTION = 0.5
"""At most this share of the available memory: the probe must leave room for everything else."""
PROBE_MAX_SECONDS = 15.0
PROBE_BUDGET_SECONDS = 60.0
PRIOR_FLOPS_PER_THREAD = 10e9
"""FLOP/s of one thread before anything is probed: an eager float32 training step of the tiny
study's models ran at about 15-20 GFLOP/s per thread (AMD EPYC, 2 threads); a lower figure makes
the first probe's time bound err on the side of not probing."""
ACTIVATION_FLOATS_PER_LAYER = 16
"""Values of width d a block keeps per token for its backward pass, beside its FFN hidden
values: norms, q/k/v before and after RoPE, the attention output, projections and residuals
(Korthikanti et al. 2022, sec. 4.1, count 34 sbh bytes per layer in 16-bit with dropout; this
model has no dropout, and float32 doubles the bytes)."""
FFN_HIDDEN_COPIES = 4
"""SwiGLU keeps gate, up, silu(gate) and their product per hidden unit (and per chosen expert)."""
LOGIT_COPIES = 4
"""Logits, the loss's log-softmax, and the gradients of both, each batch x context x vocab."""
FLOAT_BYTES = 4


def activation_bytes(run: Run) -> int:
    """Activations one eager float32 training step of ``run`` keeps: blocks plus logits."""
    cfg, r = run.model, run.recipe
    tokens = r.batch_size * r.seq_len
    per_layer = []
    for i in range(cfg.n_layers):
        if cfg.is_moe_layer(i):
            m = cfg.moe
            hidden = m.d_expert * (m.top_k + m.shared_experts)
            # each token's k dispatched copies, their expert outputs and weighted outputs, and
            # its router scores and probabilities
            extra = 3 * m.top_k * cfg.d_model + 2 * m.experts
        else:
            hidden, extra = cfg.d_ff or 0, 0
        per_layer.append(ACTIVATION_FLOATS_PER_LAYER * cfg.d_model + FFN_HIDDEN_COPIES * hidden + extra)
    # one layer's attention scores, where the kernel materialises them (batch x heads x S x S)
    scores = r.batch_size * cfg.n_heads * r.seq_len * r.seq_len
    logits = LOGIT_COPIES * tokens * cfg.vocab_size
    return FLOAT_BYTES * (tokens * sum(per_layer) + scores + logits)


def probe_bytes(run: Run) -> int:
    """Peak memory of a probe step: 16 bytes per parameter (float32 weight, gradient and AdamW's
    two moments) plus :func:`activation_bytes`."""
    return 16 * count_params(run.model).total + activation_bytes(run)


def available_memory() -> int | None:
    from harness.train.resources import available_bytes

    return available_bytes(torch.device("cpu"))


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def memory_refusal(run: Run, available: int | None) -> str | None:
    """Why ``run``'s model is not probed for memory (None: it may be)."""
    need = probe_bytes(run)
    if available is None or need <= PROBE_MEMORY_FRACTION * available:
        return None
    return (
        f"a training step of {run.model.name} holds about {_gib(need)}, more than "
        f"{PROBE_MEMORY_FRACTION:.0%} of the {_gib(available)} of memory available"
    )


def time_refusal(run: Run, step_flops: float, rate: float, spent: float) -> str | None:
    """Why ``run``'s model is not probed for time (None: it may be), at ``rate`` FLOP/s with
    ``spent`` seconds of probing already done in this plan."""
    seconds = (PROBE_WARMUP + PROBE_STEPS) * step_flops / rate
    if seconds > PROBE_MAX_SECONDS:
        return f"probing {run.model.name} would take about {seconds:.0f} s (more than {PROBE_MAX_SECONDS:.0f} s)"
    if spent + seconds > PROBE_BUDGET_SECONDS:
        return f"this plan has probed for {spent:.0f} s already (at most {PROBE_BUDGET_SECONDS:.0f} s)"
    return None


def probe_step_seconds(run: Run, threads: int, dtype: torch.dtype) -> float:
    """Median seconds of an eager training step of ``run``'s model on this CPU."""
    from harness.train.loop import make_optimizer

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        model = Transformer(run.model)
        opt = make_optimizer(model, run.recipe)
        r = run.recipe
        x = torch.randint(0, run.model.vocab_size, (r.batch_size, r.seq_len))
        times = []
        for i in range(PROBE_WARMUP + PROBE_STEPS):
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                out = model(x, x)
            (out.loss + out.aux_loss).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i >= PROBE_WARMUP:
                times.append(time.perf_counter() - start)
        return statistics.median(times)
    finally:
        torch.set_num_threads(old)


# --- the cache of measured steps --------------------------------------------------------------

PROBE_MAX_AGE_DAYS = 14.0
"""A cached probe older than this is taken again. What is known to change a step's time is in its
key (model, batch, context, threads, dtype) or its entry (CPU, cores, torch), but not all that
does: a BLAS or kernel update, the CPU's frequency governor, a virtual machine moved to another
host or given new neighbours (this project's 2-core reference host ran the same dense run at
28,000 to 45,000 tokens/s over a few weeks, results/reference/cpu/tiny/README.md). Two weeks bounds
how long such a figure stands unchecked, and taking it again costs a plan at most
:data:`PROBE_BUDGET_SECONDS`."""
PROBE_LOAD_SLACK = 0.5
"""Cores of load beyond ``cores x LOAD_LIMIT`` that a probe tolerates (:func:`busy`). A quiet
host's 1-minute load average sits at 0.0-0.3 (daemons, the shell, the plan's own start-up); one
other job that keeps a core busy lifts it by 1, and then a probe that needs every core waits for
one."""
STEAL_MIN_TICKS = 100
"""CPU ticks (USER_HZ, 1/100 s of one core) over which steal is judged: over fewer, one stolen tick is
a percent or more of them."""
CACHE_FORMAT = 2
"""The cache's layout: ``{"format": 2, "probes": {key: entry}}``, each entry a :class:`Probe`.
Format 1 (before it) mapped keys to bare seconds, with no time or load: its entries are stale."""


def busy(load_1m: float | None, steal: float | None, threads: int, cores: int) -> str | None:
    """Why a probe of ``threads`` threads on ``cores`` cores was disturbed (None: it was not), by
    the rules that judge a timed figure (harness.measure.plausibility): the load average beside it
    (taken before probing, so the probe's own threads are added) over the cores above
    ``LOAD_LIMIT`` by more than :data:`PROBE_LOAD_SLACK` (threads waited for a core), or more than
    ``STEAL_LIMIT`` of the CPU time stolen by the hypervisor."""
    if load_1m is not None and load_1m + threads > cores * LOAD_LIMIT + PROBE_LOAD_SLACK:
        return f"a busy host (load {load_1m:.2f} on {cores} cores)"
    if steal is not None and steal > STEAL_LIMIT:
        return f"a busy host ({steal:.0%} of the CPU time stolen)"
    return None


@dataclass(frozen=True)
class Probe:
    """One probed step time, and when, where and under what load it was taken."""

    model: str
    step_s: float
    """Median seconds of an eager training step."""
    taken_utc: str
    """When (ISO 8601, UTC)."""
    load_1m: float | None
    """The host's 1-minute load average as the plan began probing, before its own probes (None:
    not available here)."""
    steal: float | None
    """Fraction of the CPU time the hypervisor gave other guests while it was timed."""
    threads: int
    cores: int
    cpu: str
    torch: str

    def to_json(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, entry) -> Probe | None:
        """The probe an entry holds; None for one of format 1 (bare seconds) or otherwise not one."""
        if not isinstance(entry, dict):
            return None
        try:
            probe = cls(**{k: entry[k] for k in cls.__dataclass_fields__})
        except (KeyError, TypeError):
            return None
        numbers = (probe.load_1m, probe.steal)
        ok = isinstance(probe.step_s, (int, float)) and 0 < probe.step_s < math.inf and probe.taken() is not None
        ok &= all(x is None or (isinstance(x, (int, float)) and math.isfinite(x)) for x in numbers)
        ok &= all(isinstance(x, int) and x > 0 for x in (probe.threads, probe.cores))
        ok &= all(isinstance(x, str) for x in (probe.model, probe.cpu, probe.torch))
        return probe if ok else None

    def taken(self) -> datetime.datetime | None:
        try:
            when = datetime.datetime.fromisoformat(self.taken_utc)
        except (TypeError, ValueError):
            return None
        return when if when.tzinfo else when.replace(tzinfo=datetime.UTC)

    def age_s(self, now: datetime.datetime) -> float:
        return max(0.0, (now - self.taken()).total_seconds())

    def busy(self) -> str | None:
        return busy(self.load_1m, self.steal, self.threads, self.cores)

    def stale(self, now: datetime.datetime) -> str | None:
        """Why this cached probe does not stand for this host now (None: it does)."""
        if self.torch != torch.__version__:
            return f"taken with torch {self.torch}"
        if self.cpu != cpu_name() or self.cores != os.cpu_count():
            return f"taken on another CPU ({self.cpu}, {self.cores} cores)"
        if (why := self.busy()) is not None:
            return f"taken on {why}"
        if self.age_s(now) > PROBE_MAX_AGE_DAYS * 86400:
            return f"taken {ago(self.age_s(now))}, over {PROBE_MAX_AGE_DAYS:.0f} days"
        return None

    def describe(self, now: datetime.datetime, how: str = "taken") -> str:
        """'41 ms a step, cached 3 min ago, load 0.05 on 2 cores' (``how``: taken, cached, probed)."""
        load = "load not known" if self.load_1m is None else f"load {self.load_1m:.2f}"
        return f"{self.step_s * 1e3:.0f} ms a step, {how} {ago(self.age_s(now))}, {load} on {self.cores} cores"


def ago(seconds: float) -> str:
    if seconds < 60:
        return "just now"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min ago"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h ago"
    return f"{seconds / 86400:.1f} days ago"


def cache_path() -> Path:
    if os.environ.get("MOE_HARNESS_CACHE"):
        return Path(os.environ["MOE_HARNESS_CACHE"]) / "probes.json"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "moe-harness" / "probes.json"


def cache_key(run: Run, threads: int, dtype: torch.dtype) -> str:
    """What a probed step time is of: the model, batch, context, threads and dtype (where and
    when it was taken is in its entry, :class:`Probe`)."""
    r = run.recipe
    what = [run.model.to_dict(), r.batch_size, r.seq_len, threads, str(dtype)]
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:24]


def read_cache(path: Path) -> tuple[dict[str, Probe], str | None]:
    """The probes of the cache at ``path`` by key, and why it was ignored where it is not a probe
    cache (None: it is one, or there is none). Entries of format 1 or otherwise not probes are
    left out: stale, taken again."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}, None
    except UnicodeDecodeError:
        return {}, "it is not UTF-8 text"
    except OSError as e:
        return {}, f"it cannot be read: {e.strerror or e.__class__.__name__}"
    except ValueError as e:
        return {}, f"it is not JSON ({e})"
    if not isinstance(data, dict):
        return {}, "it is not a JSON object"
    if "format" not in data and all(isinstance(v, (int, float)) for v in data.values()):
        return {}, None  # format 1: seconds alone, stale
    if data.get("format") != CACHE_FORMAT or not isinstance(data.get("probes"), dict):
        return {}, f"it is not a probe cache of format {CACHE_FORMAT}"
    probes = {k: Probe.from_json(v) for k, v in data["probes"].items()}
    return {k: p for k, p in probes.items() if p is not None}, None


def write_cache(path: Path, probes: dict[str, Probe]) -> None:
    """Write ``probes`` as the cache at ``path``; a cache that cannot be written is only a slower
    next plan."""
    from harness.core.io import write_text

    doc = {"format": CACHE_FORMAT, "probes": {k: p.to_json() for k, p in sorted(probes.items())}}
    with contextlib.suppress(Exception):  # the cache is an optimisation, never a failure
        write_text(path, json.dumps(doc, indent=1, sort_keys=True) + "\n")


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


@dataclass
class Used:
    """A model's probe as one plan used it: ``how`` is 'probed' (now), 'cached' or 'taken' (read
    from another host's file); ``again``: why the cached one was not used."""

    probe: Probe
    how: str
    again: str | None = None


@dataclass
class Prober:
    """The probes of one plan: the cached ones, those measured now, the FLOP rates seen so far,
    the seconds spent probing, and what the plan prints about them (:meth:`lines`, ``warnings``).

    ``reprobe``: take every probe again. ``fixed``: the cache is another host's record
    (``harness plan --probes FILE``): its entries are used as they are, nothing is probed or written.
    """

    path: Path
    cached: dict[str, Probe]
    available: int | None
    reprobe: bool = False
    fixed: bool = False
    measured: dict[str, Probe] = field(default_factory=dict)
    rates: list[float] = field(default_factory=list)
    used: dict[str, Used] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    spent: float = 0.0
    load_1m: float | None = None
    ticks: list[int] | None = None
    damaged: bool = False

    @classmethod
    def start(cls, reprobe: bool = False, source: str | Path | None = None) -> Prober:
        """The probes of this host's cache, or, with ``source``, of that file as it stands."""
        path = Path(source) if source is not None else cache_path()
        cached, damage = read_cache(path)
        if source is not None:
            if not path.is_file() or damage or not cached:
                why = damage or ("no such file" if not path.is_file() else "it holds no probes")
                raise ConfigError("--probes", f"{path}: {why}", "(command line)")
            return cls(path, cached, None, fixed=True)
        prober = cls(path, cached, available_memory(), reprobe=reprobe, damaged=damage is not None)
        if damage:
            prober.warnings.append(
                f"the probe cache {path} is damaged ({damage}): ignored, and replaced by this plan's probes"
            )
        return prober

    @property
    def cores(self) -> int:
        """The cores the probes stand for: this host's, or those of the host whose file is read."""
        if self.fixed:
            return statistics.mode(p.cores for p in self.cached.values())
        return os.cpu_count() or 1

    def step_seconds(self, run: Run, step_flops: float, threads: int, dtype: torch.dtype) -> tuple[float | None, str]:
        """(seconds of one eager step, basis) or (None, why it was not probed)."""
        key = cache_key(run, threads, dtype)
        kind = f"eager {str(dtype).removeprefix('torch.')}"
        probe, cached = self.measured.get(key), self.cached.get(key)
        again = None
        if probe is None and cached is not None:
            again = None if self.fixed else "--reprobe" if self.reprobe else cached.stale(_now())
            if again is None:
                probe = cached
                self.used.setdefault(run.model.name, Used(cached, "taken" if self.fixed else "cached"))
        if probe is not None:
            self.rates.append(step_flops / probe.step_s)
            return probe.step_s, f"probe, {kind}"
        if self.fixed:
            return None, f"{self.path} holds no probe of {run.model.name} at this shape"
        rate = max(self.rates) if self.rates else PRIOR_FLOPS_PER_THREAD * threads
        why = memory_refusal(run, self.available) or time_refusal(run, step_flops, rate, self.spent)
        if why:
            return None, why
        probe = self._probe(run, threads, dtype)
        self.measured[key] = probe
        self.used[run.model.name] = Used(probe, "probed", again)
        self.rates.append(step_flops / probe.step_s)
        return probe.step_s, f"probe, {kind}"

    def _probe(self, run: Run, threads: int, dtype: torch.dtype) -> Probe:
        """Time ``run``'s model now, with the host's load before this plan's first probe and the
        CPU time stolen since."""
        if not self.measured:  # before any probe of this plan, so that its own threads are not counted
            self.load_1m = host_load.sample().get("host_load_1m")
            self.ticks = host_load.cpu_ticks()
        start = time.perf_counter()
        seconds = probe_step_seconds(run, threads, dtype)
        self.spent += time.perf_counter() - start
        after, ticks = host_load.cpu_ticks(), self.ticks
        steal = None
        if ticks and after and after[0] - ticks[0] >= STEAL_MIN_TICKS:
            steal = (after[1] - ticks[1]) / (after[0] - ticks[0])
        cores = os.cpu_count() or 1
        return Probe(
            run.model.name, seconds, host_load.utc_now(), self.load_1m, steal, threads, cores, cpu_name(),
            torch.__version__,
        )  # fmt: skip

    def lines(self) -> list[str]:
        """What the plan says of its probes: one line a model, with the probe's age and load."""
        if not self.used:
            return []
        now = _now()
        if self.fixed:
            out = [f"probes (eager training steps, another host's, read from {self.path} as they are):"]
        else:
            out = [f"probes (eager training steps, cached in {self.path}; `harness plan --reprobe` takes them again):"]
        width = max(len(name) for name in self.used)
        for name, u in self.used.items():
            notes = ["a busy host, so the next plan probes it again" if u.probe.busy() and not self.fixed else None]
            notes.append(f"replaces one {u.again}" if u.again and u.again != "--reprobe" else None)
            note = "; ".join(n for n in notes if n)
            out.append(f"  {name:<{width}}  {u.probe.describe(now, u.how)}" + (f": {note}" if note else ""))
        return out

    @property
    def warnings_now(self) -> list[str]:
        """The cache's damage, and the probes this plan took on a busy host."""
        disturbed = [(n, u.probe.busy()) for n, u in self.used.items() if u.how == "probed" and u.probe.busy()]
        if not disturbed:
            return self.warnings
        names = ", ".join(n for n, _ in disturbed)
        return [
            *self.warnings,
            f"{names} probed on {disturbed[0][1]}: the times may be too long; the next plan probes again "
            "(`harness plan --reprobe` once the host is quiet)",
        ]

    def save(self) -> None:
        """Add this plan's probes to the cache (a damaged cache is replaced); format-1 entries go."""
        if self.measured and not self.fixed:
            cached = {} if self.damaged else read_cache(self.path)[0]
            write_cache(self.path, cached | self.measured)
