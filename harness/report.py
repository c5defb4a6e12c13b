"""The study report: one row per run, and dense versus MoE at each budget.

    harness report tiny          # results/tiny/report.md and results/tiny/tables/*.{csv,html}

Each MoE run is compared with the dense run of the same budget and seed whose active
non-embedding parameter count is closest (its matched base in a matched study).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from tabulate import tabulate

from harness.io import read_json, write_text
from harness.study import Study, budget_label, plan


def _arm(rec: dict[str, Any]) -> str:
    return "dense" if rec["arm"] == "dense" else f"MoE E{rec['experts']} k{rec['top_k']}"


def _m(n: float) -> str:
    return f"{n / 1e6:.2f}M"


def run_table(records: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
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
            f"{r['train_seconds']:.1f}",
            f"{r['tokens_per_s']:,.0f}",
        ]
        for r in records
    ]
    return headers, rows


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


def comparison_table(records: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
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
        "train s (MoE / dense)",
    ]
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
    data = read_json(results / "data" / "data.json")
    tables = {
        "runs": run_table(records),
        "dense_vs_moe": comparison_table(records),
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
