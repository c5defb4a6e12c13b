"""Everything a GPU must confirm, in one command: ``make gpu-check``.

The CUDA paths (bf16 autocast, ``torch._grouped_mm`` dispatch with no host sync,
``torch.compile``, the NVML meter, GPU throughput and MFU) are checked in one pass that fits a
short lease on a machine without network (``make gpu-check`` first installs offline, from
``make gpu-wheelhouse``'s folder, on top of the machine's own CUDA torch):

1. environment  device, driver, CUDA, torch and the packages the pipeline uses;
2. gpu tests    ``pytest -m gpu``: every test marked ``gpu`` passes, none is skipped;
3. micro-bench  the MoE FFN at bf16, T = 16384, d = 1024, E = 8 and 64: grouped dispatch,
                the expert loop, the FLOP-matched dense FFN and transformers' Mixtral block,
                interleaved (``tests/benchmarks/test_moe_ffn.py``);
4. pipeline     a slice of a study (``quick``: its dense model and one matched MoE, its data
                capped, compile on) through Snakemake, each run's budget sized to about
                ``--train-seconds`` (30) of training, then ``harness measure`` on both: the NVML
                counter's joules and the power trace's integral agree within 5%, no measured
                figure is flagged implausible, and MoE over dense training tokens/s at matched
                active parameters meets 0.85 (OLMoE reported 0.63; Muennighoff et al. 2024);
5. wide MFU     ``harness measure`` of the study's dense model widened to d = 1024, bf16 and
                compiled at the study's step shape: at least 40% of the measured bf16 matmul.

It writes ``summary.md`` and ``summary.json`` (every check, the device, driver and versions)
to ``results/reference/<device>/gpu-check/``, prints the table and exits 1 if any check failed
(2 if no CUDA device is visible). Each stage has a time limit, and all of them together
TOTAL_SECONDS, so a hung stage fails its own checks and the summary is still written in time.
``--rehearse`` runs the same stages on the CPU at the tiny study's size, with the GPU-only
checks marked skipped, into ``results/gpu-check-rehearsal/``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from harness.analysis.reproduce import device_folder
from harness.core.io import read_json, write_json, write_text

ROOT = Path(__file__).resolve().parents[2]

ENERGY_AGREEMENT = 0.05
"""Counter joules and the trace integral agree within this fraction."""
MFU_GOAL = 0.40
"""Dense training FLOP/s over the measured bf16 matmul, at d >= WIDE_D_MODEL."""
WIDE_D_MODEL = 1024
MOE_SPEED_GOAL = 0.85
"""MoE over dense training tokens/s at matched active parameters (OLMoE: 0.63)."""
ASSUMED_MFU = 0.3
"""Used only to size the slice's budgets to about --train-seconds of training each."""
DATA_BYTES = 30_000_000
"""The slice's data cap: the data step takes well under a minute, repetition allowed."""
STAGE_SECONDS = {"gpu tests": 100, "micro-benchmark": 75, "pipeline": 300, "wide MFU": 75}
"""Each stage's time limit (its subprocesses are killed after it)."""
TOTAL_SECONDS = 420
"""All stages together: with the install (a minute) the command ends within 8 minutes; a stage
gets what is left when that is less than its own limit."""


@dataclass
class Check:
    stage: str
    name: str
    status: str
    """pass, fail, skip (not applicable here, said why) or info (reported, not judged)."""
    value: str = ""
    goal: str = ""
    detail: str = ""


@dataclass
class Context:
    work: Path
    """Scratch for the slice's study, its results and the stages' raw outputs (git-ignored)."""
    rehearse: bool = False
    base_study: str = "quick"
    train_seconds: float = 30.0
    python: str = sys.executable
    slack: float = 1.0
    """The time limits' multiple: a rehearsal on a shared CPU is not bound to a lease."""
    deadline: float = 0.0

    def __post_init__(self):
        self.deadline = self.deadline or time.monotonic() + TOTAL_SECONDS * self.slack

    facts: dict[str, Any] = field(default_factory=dict)
    """What stages learn for later ones and for the summary (device, matmul FLOP/s, runs)."""

    @property
    def device(self) -> str:
        return "cpu" if self.rehearse else "cuda"

    def skip_on_cpu(self, stage: str, name: str, why: str = "needs a GPU") -> Check | None:
        return Check(stage, name, "skip", detail=f"rehearsal on the CPU: {why}") if self.rehearse else None


class StageFailed(RuntimeError):
    pass


def run(ctx: Context, stage: str, argv: list[str], log: Path) -> None:
    """A subprocess of a stage in a process group of its own, its output to ``log``. A failure
    raises StageFailed; so does its time limit, after the whole group (training jobs too) is killed."""
    left = ctx.deadline - time.monotonic()
    if left <= 1:
        raise StageFailed(f"not run: the {TOTAL_SECONDS * ctx.slack:.0f} s of all stages are spent")
    limit = min(STAGE_SECONDS.get(stage, 300) * ctx.slack, left)
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
        try:
            code = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise StageFailed(f"timed out after {limit:.0f} s: {' '.join(argv[:4])} ... (log: {log})") from None
    if code != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        raise StageFailed(f"exit {code} (log: {log}): " + " | ".join(tail))


# 1. environment


def environment(ctx: Context) -> list[Check]:
    import torch

    from harness.core.provenance import provenance
    from harness.measure.throughput import matmul_flops

    device = torch.device(ctx.device)
    ctx.facts["provenance"] = provenance(device)
    host = ctx.facts["provenance"]["host"]
    ctx.facts["matmul"] = matmul_flops(device, torch.bfloat16)
    tflops = ctx.facts["matmul"]["flops_per_s"] / 1e12
    shape = "x".join(map(str, ctx.facts["matmul"]["shape"]))
    name = host["gpu"] or host["cpu"]
    checks = [
        Check("environment", "device", "info", name, detail=f"driver {host['driver']}, CUDA {host['cuda']}"),
        Check("environment", f"bf16 matmul {shape}", "info", f"{tflops:,.1f} TFLOP/s", detail="the MFU denominator"),
    ]
    versions = ctx.facts["provenance"]["packages"]
    missing = [n for n in ("snakemake", "lm_eval", "datasets", "transformers") if not versions.get(n)]
    checks.append(
        Check(
            "environment",
            "packages",
            "fail" if missing else "pass",
            ", ".join(f"{k} {v}" for k, v in versions.items() if v),
            detail=f"missing: {', '.join(missing)}" if missing else "",
        )
    )
    return checks


# 2. gpu tests


def junit_counts(path: Path) -> dict[str, int]:
    """Passed, failed, errors and skipped of a pytest --junitxml file."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failed = [
        f"{case.get('classname', '')}::{case.get('name')}"
        for s in suites
        for case in s.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]
    passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
    return {"passed": passed, "failed": n["failures"], "errors": n["errors"], "skipped": n["skipped"], "names": failed}


def gpu_tests(ctx: Context) -> list[Check]:
    xml = ctx.work / "gpu-tests.xml"
    argv = [ctx.python, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}"]
    try:
        run(ctx, "gpu tests", argv, ctx.work / "check-logs" / "gpu-tests.log")
    except StageFailed:
        if not xml.is_file():
            raise
    n = junit_counts(xml)
    value = f"{n['passed']} passed, {n['failed'] + n['errors']} failed, {n['skipped']} skipped"
    broken = "; ".join(n["names"][:5])
    if ctx.rehearse:  # every gpu test skips on a CPU; one that fails there is broken everywhere
        ok = n["passed"] == 0 and not broken and n["skipped"] > 0
        return [Check("gpu tests", "pytest -m gpu", "skip" if ok else "fail", value, "all skip on a CPU", broken)]
    ok = not broken and n["failed"] + n["errors"] == 0 and n["passed"] > 0 and n["skipped"] == 0
    detail = broken or ("nothing ran" if n["passed"] == 0 else "")
    return [Check("gpu tests", "pytest -m gpu", "pass" if ok else "fail", value, "all pass, none skipped", detail)]


# 3. micro-benchmark

BENCH_IMPLS = ("moe", "moe_loop", "dense", "mixtral", "mixtral_grouped_mm")


def bench_rows(report: dict) -> list[dict[str, Any]]:
    """One row per CUDA case of pytest-benchmark's JSON: median ms per implementation and the
    ratios to the dense FFN."""
    rows = []
    for b in report.get("benchmarks", []):
        info = b.get("extra_info", {})
        if not str(info.get("case", "")).startswith("cuda"):
            continue
        ms = info["median_ms"]
        rows.append(
            {
                "case": info["case"],
                "median_ms": {k: ms[k] for k in BENCH_IMPLS if k in ms},
                "vs_dense": {k: ms[k] / ms["dense"] for k in BENCH_IMPLS if k in ms and k != "dense"},
            }
        )
    return rows


def microbench(ctx: Context) -> list[Check]:
    skip = ctx.skip_on_cpu("micro-benchmark", "MoE FFN, bf16, T=16384, d=1024", "its cases are CUDA only")
    if skip:
        return [skip]
    out = ctx.work / "moe_ffn.json"
    bench = ROOT / "tests" / "benchmarks" / "test_moe_ffn.py"
    argv = [ctx.python, "-m", "pytest", str(bench), "-k", "cuda", "-o", "addopts=", "-p", "no:cacheprovider"]
    run(
        ctx,
        "micro-benchmark",
        [*argv, "--benchmark-only", f"--benchmark-json={out}"],
        ctx.work / "check-logs" / "bench.log",
    )
    rows = bench_rows(json.loads(out.read_text()))
    ctx.facts["micro_benchmark"] = rows
    checks = [
        Check(
            "micro-benchmark",
            row["case"],
            "info",
            ", ".join(f"{k} {v:.2f} ms" for k, v in row["median_ms"].items()),
            detail="x dense: " + ", ".join(f"{k} {v:.2f}" for k, v in row["vs_dense"].items()),
        )
        for row in rows
    ]
    status = "pass" if len(rows) == 2 else "fail"
    return [Check("micro-benchmark", "cases run", status, str(len(rows)), "E=8 and E=64"), *checks]


# 4. pipeline


def slice_study(base: dict, name: str, budget: float, rehearse: bool) -> dict:
    """The base study's dense model and one matched MoE (top-k 2 where there is one) at one
    budget and seed, its data capped, compiled on a GPU; evaluation and checkpoints left to the end."""
    models = base["models"]
    dense = next(m for m in models if "config" in m)
    moes = [m for m in models if "base" in m and m["base"] == dense["config"]]
    if not moes:
        raise StageFailed(f"study {base['name']}: no MoE matched to {dense['config']}")
    moe = next((m for m in moes if m.get("top_k") == 2), moes[0])
    data = dict(base["data"])
    data["max_bytes"] = min(int(data.get("max_bytes", DATA_BYTES)), DATA_BYTES)
    data["allow_repetition"] = True
    recipe = dict(base.get("recipe", {}))
    # A slice trains briefly: a few dozen steps is enough for a rehearsal on the CPU.
    recipe.update(compile=not rehearse, eval_every=10**9, checkpoint_every=10**9, min_steps=10)
    return {
        **{k: v for k, v in base.items() if k not in ("models", "budgets", "seeds", "analysed_runs")},
        "name": name,
        "description": f"{base['name']}'s dense model and one matched MoE, about a minute each ({__name__})",
        "data": data,
        "models": [dense, moe],
        "budgets": [budget],
        "seeds": [0],
        "recipe": recipe,
    }


def slice_budget(matmul_flops_per_s: float, seconds: float) -> float:
    """FLOPs for about ``seconds`` of training at ASSUMED_MFU, to one significant figure."""
    raw = seconds * ASSUMED_MFU * matmul_flops_per_s
    return float(f"{raw:.0e}")


def write_slice(ctx: Context) -> tuple[Path, list]:
    """The slice's study file (with its models resolved from the base study's folder) and runs."""
    from harness.study.runs import plan
    from harness.study.spec import load_study, model_configs_dir, study_path

    base_path = study_path(ctx.base_study)
    base = yaml.safe_load(base_path.read_text())
    name = "gpu-check-rehearsal" if ctx.rehearse else "gpu-check"
    budget = slice_budget(ctx.facts["matmul"]["flops_per_s"], ctx.train_seconds)
    study = slice_study(base, name, budget, ctx.rehearse)
    configs = model_configs_dir()
    for m in study["models"]:
        key = "config" if "config" in m else "base"
        if not Path(m[key]).is_absolute():
            m[key] = str(configs / m[key])
    path = ctx.work / "study.yaml"
    write_text(path, yaml.safe_dump(study, sort_keys=False))
    return path, plan(load_study(path))


def pipeline(ctx: Context) -> list[Check]:
    path, runs = write_slice(ctx)
    ctx.facts["study"] = str(path.relative_to(ROOT))
    runs_dir = ctx.work / "runs"
    targets = [str((runs_dir / r.run_id / "measure.json").relative_to(ROOT)) for r in runs]  # as the rules name them
    snakemake = str(Path(ctx.python).with_name("snakemake"))
    argv = [snakemake, "--config", f"study={path}", "--cores", "all", "--resources", "gpu=1", "--", *targets]
    run(ctx, "pipeline", argv, ctx.work / "check-logs" / "snakemake.log")
    records = {r.run_id: read_json(runs_dir / r.run_id / "record.json") for r in runs}
    measured = {r.run_id: read_json(runs_dir / r.run_id / "measure.json") for r in runs}
    ctx.facts["runs"] = {rid: run_facts(records[rid], measured[rid]) for rid in records}
    dense_id, moe_id = (r.run_id for r in runs)
    checks = [trained(rid, records[rid]) for rid in records]
    for rid, m in measured.items():
        checks += energy_checks(rid, m, ctx.rehearse)
        checks.append(plausible(rid, m, ctx.rehearse))
    checks.append(dense_mfu(dense_id, records[dense_id]["config"]["d_model"], measured[dense_id]))
    checks.append(moe_speed(measured[dense_id], measured[moe_id], ctx.rehearse))
    return checks


def run_facts(record: dict, measured: dict) -> dict[str, Any]:
    keep = ("steps", "tokens", "train_seconds", "compile_seconds", "tokens_per_s", "final_val_loss", "precision")
    return {k: record.get(k) for k in keep} | {
        "measure_train_tokens_per_s": measured["train"]["tokens_per_s_median"],
        "mfu_detailed_vs_matmul": mfu(measured),
        "energy_train": {k: measured["energy_train"].get(k) for k in ("energy_j", "trace_energy_j", "j_per_token")},
    }


def trained(run_id: str, record: dict) -> Check:
    p = record.get("precision", {})
    value = f"{record['steps']} steps, {record['tokens_per_s']:,.0f} tokens/s, val loss {record['final_val_loss']:.3f}"
    compiling = record.get("compile_seconds") or 0
    detail = f"{p.get('dtype')}, compile {p.get('compile')} ({compiling:.0f} s), {record['train_seconds']:.0f} s"
    return Check("pipeline", f"train {run_id}", "pass", value, detail=detail)


def energy_checks(run_id: str, measured: dict, rehearse: bool) -> list[Check]:
    """Each energy window's joules: the counter's, against the power trace's integral where the
    window sampled one. Measurement windows read the counter alone where the device has it (no
    sampling thread to slow the step); the counter against a trace is then the GPU tests' check
    (tests/train/test_cuda.py), and here the counter must have counted."""
    checks = []
    goal = f"within {ENERGY_AGREEMENT:.0%}"
    for window in ("energy_prefill", "energy_train"):
        w = measured.get(window) or {}
        name = f"{run_id} {window.removeprefix('energy_')}: counter vs trace J"
        counter, trace = w.get("energy_j"), w.get("trace_energy_j")
        if counter is not None and trace is None:
            value = f"{counter:,.1f} (counter only, mean {w.get('mean_power_w') or 0:.0f} W)"
            status = "pass" if counter > 0 else "fail"
            checks.append(Check("pipeline", name, status, value, "> 0 J", "counter vs trace: the GPU tests"))
            continue
        if counter is None:
            why = "; ".join(f"{k}: {v}" for k, v in (w.get("absent") or {}).items()) or "not measured"
            checks.append(Check("pipeline", name, "skip" if rehearse else "fail", "absent", goal, why))
            continue
        gap = abs(counter - trace) / counter
        value = f"{counter:,.1f} vs {trace:,.1f} ({gap:.1%})"
        detail = f"{w.get('samples')} samples of {w.get('power_source')}, mean {w.get('mean_power_w') or 0:.0f} W"
        checks.append(Check("pipeline", name, "pass" if gap <= ENERGY_AGREEMENT else "fail", value, goal, detail))
    return checks


def plausible(run_id: str, measured: dict, rehearse: bool = False) -> Check:
    """harness.measure.plausibility's flags: on a GPU, a figure that cannot be right fails the check; a
    CPU rehearsal shares its cores with whatever else runs, so there they are reported only."""
    flags = measured.get("flags") or []
    reasons = "; ".join(f"{f.get('figure')}: {f.get('reason')}" for f in flags[:3])
    status = "pass" if not flags else ("info" if rehearse else "fail")
    return Check("pipeline", f"{run_id} measure flags", status, str(len(flags)), "0", reasons)


def mfu(measured: dict) -> float:
    """Training FLOP/s (detailed count) over the measured bf16 matmul's."""
    return measured["mfu"]["conventions"]["detailed"]["fraction_of_measured_matmul"]


def dense_mfu(run_id: str, d_model: int, measured: dict) -> Check:
    goal = f">= {MFU_GOAL:.0%} at d >= {WIDE_D_MODEL}"
    if d_model < WIDE_D_MODEL:
        detail = f"d = {d_model}: reported; the goal is judged on the same model at d = {WIDE_D_MODEL} (wide MFU)"
        return Check("pipeline", f"{run_id} MFU", "info", f"{mfu(measured):.1%}", goal, detail)
    return Check(
        "pipeline", f"{run_id} MFU", "pass" if mfu(measured) >= MFU_GOAL else "fail", f"{mfu(measured):.1%}", goal
    )


def moe_speed(dense: dict, moe: dict, rehearse: bool) -> Check:
    ratio = moe["train"]["tokens_per_s_median"] / dense["train"]["tokens_per_s_median"]
    name, goal = "MoE / dense training tokens/s", f">= {MOE_SPEED_GOAL}"
    if rehearse:
        return Check("pipeline", name, "info", f"{ratio:.2f}", goal, "rehearsal on the CPU: the goal is for a GPU")
    detail = "harness measure's training windows, matched active parameters; OLMoE reported 0.63"
    return Check("pipeline", name, "pass" if ratio >= MOE_SPEED_GOAL else "fail", f"{ratio:.2f}", goal, detail)


# 5. wide MFU


def widened(dense: dict, d_model: int) -> dict:
    """The dense config at width ``d_model``: heads of the same size, the same FFN and KV ratios."""
    head = dense.get("head_dim") or dense["d_model"] // dense["n_heads"]
    scale = d_model / dense["d_model"]
    out = dict(dense, name=f"{dense['name']}-w{d_model}", d_model=d_model, n_heads=d_model // head)
    if out.get("n_kv_heads"):
        out["n_kv_heads"] = max(1, out["n_heads"] * dense["n_kv_heads"] // dense["n_heads"])
    if out.get("d_ff"):
        out["d_ff"] = round(dense["d_ff"] * scale)
    return out


def wide_mfu(ctx: Context) -> list[Check]:
    if "study" not in ctx.facts:
        raise StageFailed("needs the pipeline stage's study slice, which did not get written")
    study = yaml.safe_load((ROOT / ctx.facts["study"]).read_text())
    dense = yaml.safe_load(Path(study["models"][0]["config"]).read_text())
    cfg = widened(dense, 2 * dense["d_model"] if ctx.rehearse else WIDE_D_MODEL)
    path, out = ctx.work / f"{cfg['name']}.yaml", ctx.work / f"measure-{cfg['name']}.json"
    write_text(path, yaml.safe_dump(cfg, sort_keys=False))
    r = study["recipe"]
    harness = str(Path(ctx.python).with_name("harness"))
    argv = [harness, "measure", "--config", str(path), "--device", ctx.device, "--out", str(out), "--windows", "5"]
    argv += ["--batch-size", str(r["batch_size"]), "--seq-len", str(r["seq_len"]), "--dtype", "bfloat16"]
    argv += [] if ctx.rehearse else ["--compile"]
    run(ctx, "wide MFU", argv, ctx.work / "check-logs" / "wide-mfu.log")
    value = mfu(read_json(out))
    ctx.facts["wide_mfu"] = {"config": cfg, "fraction_of_measured_matmul": value}
    name, goal = f"{cfg['name']} MFU", f">= {MFU_GOAL:.0%}"
    if ctx.rehearse:
        return [Check("wide MFU", name, "info", f"{value:.1%}", goal, "rehearsal on the CPU: the goal is for a GPU")]
    detail = f"bf16, compiled, batch {r['batch_size']} x {r['seq_len']}, detailed FLOP count over measured matmul"
    return [Check("wide MFU", name, "pass" if value >= MFU_GOAL else "fail", f"{value:.1%}", goal, detail)]


STAGES: tuple[tuple[str, Callable[[Context], list[Check]]], ...] = (
    ("environment", environment),
    ("gpu tests", gpu_tests),
    ("micro-benchmark", microbench),
    ("pipeline", pipeline),
    ("wide MFU", wide_mfu),
)


def run_stages(ctx: Context, stages: tuple = ()) -> list[Check]:
    """Every stage in order. One that raises fails with its reason and the others still run."""
    checks: list[Check] = []
    for name, fn in stages or STAGES:
        start = time.perf_counter()
        try:
            checks += fn(ctx)
        except Exception as e:  # a stage's failure is a failed check in the summary, not a crash
            reason = str(e) if isinstance(e, StageFailed) else f"{type(e).__name__}: {e}"
            checks.append(Check(name, "stage", "fail", detail=reason))
        ctx.facts.setdefault("stage_seconds", {})[name] = round(time.perf_counter() - start, 1)
    return checks


# summary


def headline(checks: list[Check]) -> str:
    count = {s: sum(c.status == s for c in checks) for s in ("pass", "fail", "skip", "info")}
    verdict = f"FAILED: {count['fail']} of {len(checks)} checks" if count["fail"] else "All checks passed"
    return f"**{verdict}** ({count['pass']} pass, {count['skip']} skipped, {count['info']} reported only)."


def markdown(checks: list[Check], facts: dict[str, Any]) -> str:
    from tabulate import tabulate

    prov = facts.get("provenance", {})
    host, git = prov.get("host", {}), prov.get("git", {})
    device = (
        f"Device: {host.get('gpu') or host.get('cpu')}; driver {host.get('driver')}, CUDA {host.get('cuda')}, "
        f"torch {prov.get('packages', {}).get('torch')}, Python {host.get('python')}; "
        f"commit {git.get('commit')}{' (uncommitted changes)' if git.get('dirty') else ''}."
    )
    rows = [
        [c.stage, c.name, c.status.upper() if c.status == "fail" else c.status, c.value, c.goal, c.detail]
        for c in checks
    ]
    table = tabulate(rows, ["stage", "check", "status", "value", "goal", "detail"], tablefmt="github")
    seconds = ", ".join(f"{k} {v:.0f} s" for k, v in facts.get("stage_seconds", {}).items())
    return "\n".join(["# gpu-check", "", device, "", headline(checks), "", table, "", f"Stage times: {seconds}.", ""])


def write_summary(out: Path, checks: list[Check], facts: dict[str, Any]) -> str:
    """summary.json (every check and fact) and summary.md (the table), each written atomically."""
    text = markdown(checks, facts)
    passed = not any(c.status == "fail" for c in checks)
    write_json(out / "summary.json", {"passed": passed, "checks": [asdict(c) for c in checks], **facts})
    write_text(out / "summary.md", text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.tools.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="where summary.md and .json go (default: see above)")
    parser.add_argument("--study", default="quick", help="the study to take a slice of (default: quick)")
    parser.add_argument(
        "--train-seconds", type=float, help="about how long each run trains (default: 45, rehearsal 10)"
    )
    parser.add_argument("--rehearse", action="store_true", help="the same stages on the CPU, at the tiny study's size")
    args = parser.parse_args(argv)
    import torch

    if not args.rehearse and not torch.cuda.is_available():
        print("gpu-check: error: no CUDA device is visible (--rehearse runs the stages on the CPU)", file=sys.stderr)
        return 2
    name = "gpu-check-rehearsal" if args.rehearse else "gpu-check"
    ctx = Context(
        work=ROOT / "results" / name,
        rehearse=args.rehearse,
        slack=4.0 if args.rehearse else 1.0,
        base_study="tiny" if args.rehearse and args.study == "quick" else args.study,
        train_seconds=args.train_seconds or (2.0 if args.rehearse else 30.0),
    )
    shutil.rmtree(ctx.work, ignore_errors=True)  # the slice always trains afresh
    ctx.work.mkdir(parents=True)
    checks = run_stages(ctx)
    host = ctx.facts.get("provenance", {}).get("host", {})
    slug = device_folder(host.get("gpu") or "unknown-gpu")
    out = args.out or (ctx.work if args.rehearse else ROOT / "results" / "reference" / slug / "gpu-check")
    print(write_summary(out, checks, ctx.facts))
    print(f"gpu-check: summary in {out}/summary.md and summary.json")
    return 1 if any(c.status == "fail" for c in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
