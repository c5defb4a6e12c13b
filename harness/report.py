"""The study report: one row per run, dense versus MoE at each budget, cost, lm-eval results.

    harness report tiny          # results/tiny/report.md, tables/*.{csv,html}, figures/*.png

Each MoE run is compared with the dense run of the same budget and seed whose active
non-embedding parameter count is closest (its matched base in a matched study).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from tabulate import tabulate

from harness.io import atomic_write, read_json, write_text
from harness.study import Study, budget_label, plan


def _arm(rec: dict[str, Any]) -> str:
    return "dense" if rec["arm"] == "dense" else f"MoE E{rec['experts']} k{rec['top_k']}"


def _m(n: float) -> str:
    return f"{n / 1e6:.2f}M"


PRIMARY_METRICS = ("bits_per_byte", "acc_norm", "acc", "exact_match", "f1", "mcc", "word_perplexity")
"""The metric a task is plotted and tabulated by: the first of these it reports."""


def primary_metric(metrics: dict[str, Any]) -> str | None:
    return next((m for m in PRIMARY_METRICS if isinstance(metrics.get(m), (int, float))), None)


def _task_value(ev: dict[str, Any] | None, task: str, metric: str) -> str:
    """'value ± stderr' of one task metric of one run's eval.json, or '-'."""
    m = (ev or {}).get("tasks", {}).get(task, {})
    if not isinstance(m.get(metric), (int, float)):
        return "-"
    err = m.get(f"{metric}_stderr")
    return f"{m[metric]:.4f}" + (f" ± {err:.4f}" if isinstance(err, (int, float)) else "")


def run_table(
    records: list[dict[str, Any]], evals: dict[str, dict[str, Any]] | None = None
) -> tuple[list[str], list[list[Any]]]:
    evals = evals or {}
    headers = [
        "run",
        "arm",
        "total params",
        "active params",
        "budget FLOPs",
        "tokens",
        "epochs",
        "FLOPs spent / budget",
        "train loss",
        "val loss",
        "held-out bits/byte",
        "code MC acc_norm",
        "train s",
        "tokens/s",
    ]
    rows = [
        [
            r["run_id"],
            _arm(r),
            _m(r["params"]["total"]),
            _m(r["params"]["active"]),
            budget_label(r["budget_flops"]),
            f"{r['tokens']:,}",
            f"{r['epochs']:.2f}",
            f"{r['flops_spent_over_budget']:.4f}",
            f"{r['final_train_loss']:.4f}",
            f"{r['final_val_loss']:.4f}",
            _task_value(evals.get(r["run_id"]), "heldout_ppl", "bits_per_byte"),
            _task_value(evals.get(r["run_id"]), "heldout_code_mc", "acc_norm"),
            f"{r['train_seconds']:.1f}",
            f"{r['tokens_per_s']:,.0f}",
        ]
        for r in records
    ]
    return headers, rows


def eval_table(
    records: list[dict[str, Any]], evals: dict[str, dict[str, Any]]
) -> tuple[list[str], list[list[Any]], dict[str, str]]:
    """Every evaluated task's primary metric per run, and the tasks that did not run (why)."""
    tasks: dict[str, str] = {}
    not_run: dict[str, str] = {}
    for ev in evals.values():
        for task, metrics in ev["tasks"].items():
            metric = primary_metric(metrics)
            if metric is not None:
                tasks.setdefault(task, metric)
        not_run.update(ev.get("not_run", {}))
    headers = ["run", "arm", "budget FLOPs", "val loss"] + [f"{t} {m}" for t, m in tasks.items()]
    rows = [
        [r["run_id"], _arm(r), budget_label(r["budget_flops"]), f"{r['final_val_loss']:.4f}"]
        + [_task_value(evals[r["run_id"]], t, m) for t, m in tasks.items()]
        for r in records
        if r["run_id"] in evals
    ]
    return headers, rows, {t: why for t, why in not_run.items() if t not in tasks}


def downstream_figure(records: list[dict[str, Any]], evals: dict[str, dict[str, Any]], path: Path) -> Path | None:
    """Each task's primary metric against validation loss, one point per run, coloured by arm:
    dense, and MoE by expert count (the view of Abnar et al. 2025, Fig. 5). None without evals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks: dict[str, str] = {}
    for ev in evals.values():
        for task, metrics in ev["tasks"].items():
            if (metric := primary_metric(metrics)) is not None:
                tasks.setdefault(task, metric)
    if not tasks:
        return None
    experts = sorted({r["experts"] for r in records if r["arm"] == "moe"})
    cmap = plt.get_cmap("viridis")
    colour = {e: cmap(0.15 + 0.7 * i / max(1, len(experts) - 1)) for i, e in enumerate(experts)}
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.6), squeeze=False)
    for ax, (task, metric) in zip(axes[0], tasks.items(), strict=True):
        seen = set()
        for r in records:
            m = evals.get(r["run_id"], {}).get("tasks", {}).get(task, {})
            if not isinstance(m.get(metric), (int, float)):
                continue
            label = "dense" if r["arm"] == "dense" else f"MoE E={r['experts']}"
            err = m.get(f"{metric}_stderr")
            ax.errorbar(
                r["final_val_loss"],
                m[metric],
                yerr=err if isinstance(err, (int, float)) else None,
                color="black" if r["arm"] == "dense" else colour[r["experts"]],
                marker="s" if r["arm"] == "dense" else "o",
                linestyle="none",
                capsize=2,
                label=None if label in seen else label,
                zorder=3,
            )
            seen.add(label)
        chance = next(iter(evals.values())).get("local_tasks", {}).get("tasks", {}).get(task, {}).get("chance_accuracy")
        if chance is not None and metric.startswith("acc"):
            ax.axhline(chance, color="grey", linestyle="--", linewidth=1, label="chance")
        ax.set_xlabel("validation loss (nats/token)")
        ax.set_ylabel(metric)
        ax.set_title(task)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=120))
    plt.close(fig)
    return path


def dense_peer(moe: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The dense run of the same budget and seed with the closest active parameter count."""
    peers = [
        d
        for d in records
        if d["arm"] == "dense" and d["budget_flops"] == moe["budget_flops"] and d["seed"] == moe["seed"]
    ]
    if not peers:
        return None
    return min(peers, key=lambda p: abs(p["params"]["active_non_embedding"] - moe["params"]["active_non_embedding"]))


def comparison_table(
    records: list[dict[str, Any]], evals: dict[str, dict[str, Any]] | None = None
) -> tuple[list[str], list[list[Any]]]:
    headers = [
        "budget FLOPs",
        "seed",
        "MoE run",
        "dense run",
        "active params (MoE / dense)",
        "total / active (MoE)",
        "val loss MoE",
        "val loss dense",
        "loss difference (MoE - dense)",
        "bits/byte difference (MoE - dense)",
        "train s (MoE / dense)",
    ]
    evals = evals or {}

    def bpb(rec: dict[str, Any]) -> float | None:
        value = evals.get(rec["run_id"], {}).get("tasks", {}).get("heldout_ppl", {}).get("bits_per_byte")
        return value if isinstance(value, (int, float)) else None

    rows = []
    for m in (r for r in records if r["arm"] == "moe"):
        d = dense_peer(m, records)
        if d is None:
            continue
        rows.append(
            [
                budget_label(m["budget_flops"]),
                m["seed"],
                m["run_id"],
                d["run_id"],
                f"{_m(m['params']['active'])} / {_m(d['params']['active'])}",
                f"{m['params']['total'] / m['params']['active']:.2f}",
                f"{m['final_val_loss']:.4f}",
                f"{d['final_val_loss']:.4f}",
                f"{m['final_val_loss'] - d['final_val_loss']:+.4f}",
                "-" if bpb(m) is None or bpb(d) is None else f"{bpb(m) - bpb(d):+.4f}",
                f"{m['train_seconds']:.1f} / {d['train_seconds']:.1f}",
            ]
        )
    rows.sort(key=lambda row: (float(row[0]), row[1], row[2]))
    return headers, rows


def _fmt(value: float | None, spec: str, absent: str = "absent") -> str:
    return absent if value is None else format(value, spec)


def cost_table(records: list[dict[str, Any]], measures: dict[str, dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    headers = [
        "budget FLOPs",
        "run",
        "arm",
        "total params",
        "params + optimizer MB",
        "peak memory MB",
        "train tokens/s",
        "MFU (detailed, spec peak)",
        "detailed FLOPs / measured matmul",
        "prefill tokens/s",
        "decode b1 tokens/s",
        "train J/token (GPU, NVML)",
        "prefill J/token (GPU, NVML)",
        "learned / balanced step time",
        "vs dense: total params, memory, train tokens/s",
    ]
    rows = []

    def memory(m: dict[str, Any]) -> int:
        return m["memory"]["param_bytes"] + m["memory"]["optimizer_state_bytes"]

    for r in sorted(records, key=lambda r: (r["budget_flops"], r["run_id"])):
        m = measures.get(r["run_id"])
        if m is None:
            continue
        d = dense_peer(r, records) if r["arm"] == "moe" else None
        dm = measures.get(d["run_id"]) if d else None
        versus = "-"
        if d and dm:
            versus = (
                f"x{r['params']['total'] / d['params']['total']:.2f}, x{memory(m) / memory(dm):.2f}, "
                f"x{m['train']['tokens_per_s_median'] / dm['train']['tokens_per_s_median']:.2f}"
            )
        mem = m["memory"]
        peak = mem.get("peak_allocated_bytes") or mem.get("peak_rss_bytes")
        detailed = m["mfu"]["conventions"]["detailed"]
        rows.append(
            [
                budget_label(r["budget_flops"]),
                r["run_id"],
                _arm(r),
                _m(r["params"]["total"]),
                f"{memory(m) / 2**20:.1f}",
                _fmt(None if peak is None else peak / 2**20, ".1f"),
                f"{m['train']['tokens_per_s_median']:,.0f}",
                _fmt(detailed["mfu_vs_spec_peak"], ".1%", "absent (no spec peak)"),
                f"{detailed['fraction_of_measured_matmul']:.1%}",
                f"{m['prefill']['tokens_per_s_median']:,.0f}",
                f"{m['decode_batch1']['tokens_per_s_median']:,.0f}",
                _fmt(m["energy_train"]["j_per_token"], ".3g", "absent (no NVML)"),
                _fmt(m["energy_prefill"]["j_per_token"], ".3g", "absent (no NVML)"),
                _fmt(m.get("imbalance_cost"), ".3f", "-"),
                versus,
            ]
        )
    return headers, rows


def microbench_table(path: Path | None) -> tuple[list[str], list[list[Any]]]:
    headers = [
        "case",
        "device",
        "moe / dense",
        "moe / Mixtral",
        "moe / Mixtral grouped_mm",
        "Mixtral / dense",
        "targets",
    ]
    if path is None or not path.exists():
        return headers, []
    rows = []
    for bench in read_json(path)["benchmarks"]:
        i = bench["extra_info"]
        if "ratio_moe_to_dense" not in i:
            continue
        peers = [k.removeprefix("meets_target_moe_to_") for k in i if k.startswith("meets_target_moe_to_")]
        targets = ", ".join(
            f"moe/{p} <= {i['target_moe_to_' + p]}: {'met' if i['meets_target_moe_to_' + p] else 'not met'}"
            for p in peers
        )
        rows.append(
            [
                i["case"],
                i["device"],
                f"{i['ratio_moe_to_dense']:.3f}",
                f"{i['ratio_moe_to_mixtral']:.3f}",
                f"{i['ratio_moe_to_mixtral_grouped_mm']:.3f}",
                f"{i['ratio_mixtral_to_dense']:.3f}",
                targets or "-",
            ]
        )
    return headers, rows


def _meter_overhead(path: Path | None) -> float | None:
    if path is None or not path.exists():
        return None
    for bench in read_json(path)["benchmarks"]:
        if "overhead_fraction" in bench["extra_info"]:
            return bench["extra_info"]["overhead_fraction"]
    return None


def _csv(headers: list[str], rows: list[list[Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(headers)
    writer.writerows(rows)
    return buf.getvalue()


def write_report(study: Study, results: Path, microbench: Path | None = None) -> Path:
    """Read every run's record.json (and measure.json where present) and write report.md and
    tables/ (CSV and HTML)."""
    runs = plan(study)
    records = [read_json(results / "runs" / run.run_id / "record.json") for run in runs]
    measures = {
        run.run_id: read_json(path) for run in runs if (path := results / "runs" / run.run_id / "measure.json").exists()
    }
    evals = {
        run.run_id: read_json(path) for run in runs if (path := results / "runs" / run.run_id / "eval.json").exists()
    }
    data = read_json(results / "data" / "data.json")
    eval_headers, eval_rows, not_run = eval_table(records, evals)
    tables = {
        "runs": run_table(records, evals),
        "dense_vs_moe": comparison_table(records, evals),
        "eval": (eval_headers, eval_rows),
        "cost": cost_table(records, measures),
        "microbench": microbench_table(microbench),
    }
    for name, (headers, rows) in tables.items():
        write_text(results / "tables" / f"{name}.csv", _csv(headers, rows))
        write_text(results / "tables" / f"{name}.html", tabulate(rows, headers=headers, tablefmt="html") + "\n")
    prov = records[0]["provenance"]
    conventions = sorted({r["flop_convention"] for r in records})
    seeds = sorted({r["seed"] for r in records})
    md = [
        f"# Study `{study.name}`",
        "",
        study.description.strip(),
        "",
        "## Runs",
        "",
        tabulate(tables["runs"][1], headers=tables["runs"][0], tablefmt="github", disable_numparse=True),
        "",
        "## Dense versus MoE at each budget",
        "",
        "Each MoE run is set against the dense run of the same budget and seed with the closest active "
        "parameter count. A negative loss difference means the MoE reached lower validation loss.",
        "",
        tabulate(
            tables["dense_vs_moe"][1], headers=tables["dense_vs_moe"][0], tablefmt="github", disable_numparse=True
        ),
        "",
    ]
    if len(seeds) == 1:
        md += ["With one seed per run no claim of significance is made.", ""]
    gfm = {"tablefmt": "github", "disable_numparse": True}
    figure = downstream_figure(records, evals, results / "figures" / "downstream_vs_loss.png")
    if eval_rows:
        any_eval = next(iter(evals.values()))
        local = any_eval["local_tasks"]
        md += [
            "## Downstream evaluation (lm-eval)",
            "",
            f"`harness evaluate` with lm-eval {any_eval['lm_eval_version']}: heldout_ppl is bits per byte "
            f"over {local['tasks']['heldout_ppl']['documents']} documents of the {local['split']} split in "
            f"windows of the training context ({local['seq_len']} tokens); heldout_code_mc picks the real next "
            f"line of a held-out file among {local['tasks']['heldout_code_mc']['choices']} "
            f"(chance {local['tasks']['heldout_code_mc']['chance_accuracy']:.2f}, "
            f"{local['tasks']['heldout_code_mc']['questions']} questions). Values are ± standard error.",
            "",
            tabulate(eval_rows, headers=eval_headers, **gfm),
            "",
        ]
        if figure is not None:
            md += [f"![downstream metrics against validation loss]({figure.relative_to(results).as_posix()})", ""]
        for task, why in sorted(not_run.items()):
            md += [f"- not run: `{task}`: {why}"]
        md += [""] if not_run else []
    if tables["cost"][1]:
        device = next(iter(measures.values()))["device_name"]
        md += [
            "## Cost per run",
            "",
            f"Measured by `harness measure` on {device}. Memory for parameters and optimizer state follows "
            "total parameters; throughput follows active parameters. Energy is GPU board energy from NVML, "
            "not wall-socket energy; on a CPU it is absent.",
            "",
            tabulate(tables["cost"][1], headers=tables["cost"][0], **gfm),
            "",
        ]
    overhead = _meter_overhead(microbench)
    if overhead is not None:
        md += [f"Energy-meter sampling overhead: {overhead:+.2%} of training-step time (micro-benchmark).", ""]
    if tables["microbench"][1]:
        md += [
            "## MoE FFN micro-benchmark",
            "",
            "Forward + backward, same weights, implementations interleaved round by round; "
            "medians of per-round ratios.",
            "",
            tabulate(tables["microbench"][1], headers=tables["microbench"][0], **gfm),
            "",
        ]
    md += [
        "## Manifest",
        "",
        f"- FLOP convention: {', '.join(conventions)} (see models/accounting.py)",
        f"- data: {data['source']}, fingerprint `{data['fingerprint'][:16]}`, "
        f"{data['splits']['train']['tokens']:,} train tokens, vocabulary {data['tokenizer']['vocab_size']}",
        f"- code: git {prov['git'].get('commit')} (dirty: {prov['git'].get('dirty')})",
        f"- device: {prov['host']['device']} ({prov['host']['gpu'] or prov['host']['cpu']}), "
        f"torch {prov['packages']['torch']}",
        f"- seeds: {', '.join(map(str, seeds))}",
        "",
    ]
    return write_text(results / "report.md", "\n".join(md))
