"""The report's tables: each a ``(headers, rows)`` pair built from a study's records, measurements,
evaluations and analyses, rendered by ``harness.report.build`` as Markdown, CSV and HTML.

    headers, rows = run_table(records, evals)

Each MoE run is compared with the dense run of the same budget and seed whose active
non-embedding parameter count is closest (its matched base in a matched study).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from harness.analysis.stats import (
    arm_label,
    dense_peer,
    measured_pairs,
    peer_pairs,
    state_bytes,
    task_metric,
    training_memory,
)
from harness.core.host_load import taken_at
from harness.core.io import read_json
from harness.measure.plausibility import LABELS, MARK, check_measures, flags_for, mark
from harness.study.spec import budget_label


def _m(n: float) -> str:
    return f"{n / 1e6:.2f}M"


TRAIN_SECONDS = "train s (training run, wall clock)"
TRAINING_TOKENS_PER_S = "train tokens/s (training run, over the whole run)"
MEASURED_TOKENS_PER_S = "train tokens/s (harness measure, median window)"
"""Training speed from two sources, each header naming its own: the training run (every step, on
the host's load then) and ``harness measure``'s median window (the run's own training step and
settings, warm, later, on another load). The two agree within 15% or the measurement is flagged
``training_disagrees`` with the reason (``harness.measure.plausibility``)."""

PRIMARY_METRICS = ("bits_per_byte", "acc_norm", "acc", "exact_match", "f1", "mcc", "word_perplexity")
"""The metric a task is plotted and tabulated by: the first of these it reports."""


def primary_metric(metrics: dict[str, Any]) -> str | None:
    return next((m for m in PRIMARY_METRICS if isinstance(metrics.get(m), (int, float))), None)


def _task_value(ev: dict[str, Any] | None, task: str, metric: str) -> str:
    """'value ± stderr' of one task metric of one run's eval.json, or '-'."""
    value, err = task_metric(ev, task, metric), task_metric(ev, task, f"{metric}_stderr")
    if value is None:
        return "-"
    return f"{value:.4f}" + ("" if err is None else f" ± {err:.4f}")


def run_table(
    records: list[dict[str, Any]],
    evals: dict[str, dict[str, Any]] | None = None,
    training_flags: dict[str, list[dict[str, Any]]] | None = None,
) -> tuple[list[str], list[list[Any]]]:
    """``training_flags``: run id -> the flags of its training time (``harness.measure.plausibility.check_training``),
    marked on its training seconds and tokens/s."""
    evals, training_flags = evals or {}, training_flags or {}
    headers = [
        "run",
        "arm",
        "total params",
        "active params",
        "budget FLOPs",
        "tokens",
        "epochs",
        "FLOPs spent / budget",
        "train loss (final tenth)",
        "val loss",
        "held-out bits/byte",
        "code MC acc_norm",
        TRAIN_SECONDS,
        TRAINING_TOKENS_PER_S,
        "trained (UTC)",
    ]
    rows = [
        [
            r["run_id"],
            arm_label(r),
            _m(r["params"]["total"]),
            _m(r["params"]["active"]),
            budget_label(r["budget_flops"]),
            f"{r['tokens']:,}",
            f"{r['epochs']:.2f}",
            f"{r['flops_spent_over_budget']:.4f}",
            _fmt(r.get("train_loss_smoothed"), ".4f"),
            f"{r['final_val_loss']:.4f}",
            _task_value(evals.get(r["run_id"]), "heldout_ppl", "bits_per_byte"),
            _task_value(evals.get(r["run_id"]), "heldout_code_mc", "acc_norm"),
            mark(f"{r['train_seconds']:.1f}", training_flags.get(r["run_id"], [])),
            mark(f"{r['tokens_per_s']:,.0f}", training_flags.get(r["run_id"], [])),
            taken_at(r),
        ]
        for r in records
    ]
    return headers, rows


def eval_tasks(evals: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Each evaluated task and the metric it is shown by."""
    tasks: dict[str, str] = {}
    for ev in evals.values():
        for task, metrics in ev["tasks"].items():
            if (metric := primary_metric(metrics)) is not None:
                tasks.setdefault(task, metric)
    return tasks


def eval_table(
    records: list[dict[str, Any]], evals: dict[str, dict[str, Any]]
) -> tuple[list[str], list[list[Any]], dict[str, str]]:
    """Every evaluated task's primary metric per run, and the tasks that did not run (why)."""
    tasks = eval_tasks(evals)
    not_run: dict[str, str] = {}
    for ev in evals.values():
        not_run.update(ev.get("not_run", {}))
    headers = ["run", "arm", "budget FLOPs", "val loss"] + [f"{t} {m}" for t, m in tasks.items()]
    rows = [
        [r["run_id"], arm_label(r), budget_label(r["budget_flops"]), f"{r['final_val_loss']:.4f}"]
        + [_task_value(evals[r["run_id"]], t, m) for t, m in tasks.items()]
        for r in records
        if r["run_id"] in evals
    ]
    return headers, rows, {t: why for t, why in not_run.items() if t not in tasks}


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
        "train s, training run (MoE / dense)",
    ]
    evals = evals or {}

    def bpb(rec: dict[str, Any]) -> float | None:
        return task_metric(evals.get(rec["run_id"]), "heldout_ppl", "bits_per_byte")

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


def measure_flags(
    measures: dict[str, dict[str, Any]], records: list[dict[str, Any]] | tuple = ()
) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """run id -> figure -> flags, the rules of ``harness.measure.plausibility`` applied to each measure.json
    (against its training run in ``records``) and across them (``check_measures``)."""
    return check_measures(measures, records)


def flag_notes(records: list[dict[str, Any]], measures: dict[str, dict[str, Any]]) -> list[str]:
    """One Markdown bullet per flagged figure of a measured run: run, figure and why."""
    flags = measure_flags(measures, records)
    notes = []
    for r in sorted(records, key=lambda r: (r["budget_flops"], r["run_id"])):
        for figure, fs in flags.get(r["run_id"], {}).items():
            notes += [f"- {MARK} `{r['run_id']}` {LABELS.get(figure, figure)}: {f['reason']}" for f in fs]
    return notes


def cost_table(records: list[dict[str, Any]], measures: dict[str, dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """One row per measured run; a figure flagged by ``harness.measure.plausibility`` (or computed from one)
    is followed by the mark, and ``flag_notes`` says why."""
    headers = [
        "budget FLOPs",
        "run",
        "arm",
        "total params",
        "params + optimizer MB",
        "peak training memory MB",
        MEASURED_TOKENS_PER_S,
        "MFU (detailed, spec peak)",
        "detailed FLOPs / measured matmul",
        "prefill tokens/s",
        "decode b1 tokens/s",
        "train J/token (GPU, NVML)",
        "prefill J/token (GPU, NVML)",
        "learned / balanced step time",
        "vs dense: total params, training memory, train tokens/s (harness measure)",
        "measured (UTC)",
    ]
    flags = measure_flags(measures, records)
    rows = []
    for r in sorted(records, key=lambda r: (r["budget_flops"], r["run_id"])):
        m = measures.get(r["run_id"])
        if m is None:
            continue
        f = flags[r["run_id"]]

        def flagged(*figures: str, f=f) -> list[dict[str, Any]]:
            return [x for figure in figures for x in flags_for(f, figure)]

        d = dense_peer(r, records) if r["arm"] == "moe" else None
        dm = measures.get(d["run_id"]) if d else None
        versus = "-"
        if d and dm:  # unmarked: its ratios are as flagged as the two rows' figures they divide
            peaks = training_memory(m), training_memory(dm)
            memory = "-" if None in peaks else f"{peaks[0] / peaks[1]:.2f}"
            versus = (
                f"x{r['params']['total'] / d['params']['total']:.2f}, x{memory}, "
                f"x{m['train']['tokens_per_s_median'] / dm['train']['tokens_per_s_median']:.2f}"
            )
        mem = m["memory"]
        # Measured (harness.measure.throughput): device peak on CUDA, RSS over a pre-model baseline on a CPU; the
        # fallbacks read measure.json files written before peak_training_bytes existed.
        peak = mem.get("peak_training_bytes", mem.get("peak_allocated_bytes") or mem.get("peak_rss_bytes"))
        detailed = m["mfu"]["conventions"]["detailed"]
        mfu = _fmt(detailed["mfu_vs_spec_peak"], ".1%", "absent (no spec peak)")
        rows.append(
            [
                budget_label(r["budget_flops"]),
                r["run_id"],
                arm_label(r),
                _m(r["params"]["total"]),
                f"{state_bytes(m) / 2**20:.1f}",
                mark(_fmt(None if peak is None else peak / 2**20, ".1f"), flagged("memory")),
                mark(f"{m['train']['tokens_per_s_median']:,.0f}", flagged("train")),
                mfu if detailed["mfu_vs_spec_peak"] is None else mark(mfu, flagged("mfu.detailed")),
                mark(f"{detailed['fraction_of_measured_matmul']:.1%}", flagged("mfu.detailed")),
                mark(f"{m['prefill']['tokens_per_s_median']:,.0f}", flagged("prefill")),
                mark(f"{m['decode_batch1']['tokens_per_s_median']:,.0f}", flagged("decode_batch1")),
                mark(_fmt(m["energy_train"]["j_per_token"], ".3g", "absent (no NVML)"), flagged("energy_train")),
                mark(_fmt(m["energy_prefill"]["j_per_token"], ".3g", "absent (no NVML)"), flagged("energy_prefill")),
                _fmt(m.get("imbalance_cost"), ".3f", "-")
                + ("" if m.get("imbalance_cost") is None else mark("", flagged("imbalance_cost"))),
                versus,
                taken_at(m),
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


STEP_BENCH = "cpu_training_step.json"
"""``make bench``'s training-step benchmark (tests/benchmarks/test_cpu_training_step.py), in its
results folder (results/benchmarks/)."""


def step_bench_table(path: Path | None, study: str) -> tuple[list[str], list[list[Any]]]:
    """The training-step benchmark's cases that cover ``study`` (each case names the studies whose
    dense model, sparse MoE and recipe it times): the study's path (dtype, compile, threads) over
    eager float32, and MoE over dense, with the goals and whether each was met."""
    headers = [
        "studies: dense / MoE",
        "study path",
        "dense speed-up",
        "MoE speed-up",
        "MoE / dense step",
        "where the MoE's extra time goes (torch.profiler)",
        "goals",
        "CPU, run at",
    ]
    if path is None or not path.exists():
        return headers, []
    data = read_json(path)
    cpu = (data.get("machine_info") or {}).get("cpu", {}).get("brand_raw") or "cpu"
    rows = []
    for bench in data["benchmarks"]:
        i = bench["extra_info"]
        if i.get("kind") != "cpu_training_step" or study not in i.get("studies", []):
            continue
        chosen = i["chosen"]
        path_label = chosen["dtype"] + (" + compile" if chosen["compile"] else "") + f", {i['threads']} thread(s)"
        goals = (
            f"speed-ups >= {i['goal_speedup']}: {'met' if i['meets_goal_speedup'] else 'not met'}; "
            f"MoE / dense <= {i['goal_moe_over_dense']}: {'met' if i['meets_goal_moe_over_dense'] else 'not met'}"
        )
        if i.get("smoke"):
            goals += " (smoke run: a few rounds)"
        rows.append(
            [
                i["case"],
                path_label,
                f"{i['speedup_dense']:.2f}",
                f"{i['speedup_moe']:.2f}",
                f"{i['moe_over_dense_chosen']:.2f}",
                extra_time(i.get("profile_ms")),
                goals,
                f"{cpu}, {str(data.get('datetime', '?'))[:10]}",
            ]
        )
    return headers, rows


def extra_time(profile_ms: dict[str, dict[str, float]] | None, parts: int = 3) -> str:
    """The parts of a step where the MoE spends the most time beyond its dense twin, each with
    its milliseconds and share of the gap (harness/measure/step_profile.py)."""
    if not profile_ms:
        return "not profiled"
    dense, moe = profile_ms["dense"], profile_ms["moe"]
    gap = sum(moe.values()) - sum(dense.values())
    if gap <= 0:
        return f"none: the MoE step is {-gap:.1f} ms shorter"
    extra = sorted(((moe[p] - dense.get(p, 0.0), p) for p in moe), reverse=True)[:parts]
    return ", ".join(f"{p} +{ms:.1f} ms ({ms / gap:.0%})" for ms, p in extra) + f" of +{gap:.1f} ms"


def seed_table(seed_rows: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """One row per (MoE model, budget): means over the seeds the MoE and its dense peer share (named
    in 'seeds'), the within-seed difference and its two-sided paired t interval. E = k rows are the
    routing penalty (no sparsity)."""
    headers = [
        "budget FLOPs",
        "MoE",
        "dense",
        "seeds",
        "val loss MoE",
        "val loss dense",
        "MoE - dense",
        "95% t interval",
        "p (paired t)",
        "note",
    ]

    def pm(mean: float, std: float | None) -> str:
        return f"{mean:.4f}" + ("" if std is None else f" ± {std:.4f}")

    def seeds(r: dict[str, Any]) -> str:
        used = f"{r['seeds']} ({', '.join(map(str, r['seed_ids']))})"
        return used + (f"; excluded {', '.join(map(str, r['excluded_seeds']))}" if r["excluded_seeds"] else "")

    rows = [
        [
            budget_label(r["budget_flops"]),
            r["model"],
            r["dense_model"],
            seeds(r),
            pm(r["moe_mean"], r["moe_std"]),
            pm(r["dense_mean"], r["dense_std"]),
            pm(r["difference_mean"], r["difference_std"]),
            "-" if r["difference_ci"] is None else f"[{r['difference_ci'][0]:+.4f}, {r['difference_ci'][1]:+.4f}]",
            _fmt(r["p_value"], ".3g", "-"),
            r["verdict"] if r["sparse"] else f"routing penalty (E = k, not sparse); {r['verdict']}",
        ]
        for r in seed_rows
    ]
    return headers, rows


def health_table(
    records: list[dict[str, Any]], health: dict[str, list[dict[str, Any]]]
) -> tuple[list[str], list[list[Any]]]:
    """Per MoE layer over the last tenth of training, with the normalised imbalance the collapse
    rule reads (``harness.analysis.routing_health``; '-' for E <= k, never judged)."""
    from harness.analysis.routing_health import COLLAPSE_IMBALANCE

    headers = [
        "run",
        "layer",
        "load CV",
        "max / mean load",
        "busiest expert's token share",
        f"normalised imbalance (collapsed >= {COLLAPSE_IMBALANCE:g})",
        "dead experts",
        "dropped",
        "entropy / log E",
        "z-loss",
        "collapse",
    ]
    rows = []
    for r in records:
        for h in health.get(r["run_id"], []):
            imbalance = h.get("imbalance")
            rows.append(
                [
                    r["run_id"],
                    h["layer"],
                    f"{h['load_cv']:.3f}",
                    f"{h['max_over_mean']:.2f}",
                    f"{h['busiest_token_share']:.1%}",
                    "- (E <= k)" if imbalance is None else f"{imbalance:.3f}",
                    h["dead_experts"],
                    f"{h['dropped_fraction']:.2%}",
                    f"{h['entropy_over_log_e']:.3f}",
                    f"{h['z_loss']:.3g}",
                    "not judged" if imbalance is None else h["reason"] or "no",
                ]
            )
    return headers, rows


def specialisation_table(routing: dict[str, dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """Per analysed MoE run: excess NMI by category and topic and the smallest Holm-adjusted
    category p over layers (the specialisation claim's test); E <= k runs are marked, not judged."""
    from harness.analysis.stats import holm

    headers = [
        "run",
        "tokens",
        "NMI(expert; category) - shuffled",
        "NMI(expert; topic) - shuffled",
        "category p (Holm over layers)",
        "verdict",
    ]
    rows = []
    for run, r in sorted(routing.items()):
        if not r.get("moe") or not r.get("summary"):
            continue
        s = r["summary"]
        topic = "unknown" if s["topic_nmi_excess"] is None else f"{s['topic_nmi_excess']:.4f}"
        ps = [layer["category"]["p_value"] for layer in r.get("layers", []) if layer.get("category")]
        p = f"{min(holm(ps)):.3g}" if ps else "-"
        dense_like = r.get("experts", 2) <= r.get("top_k", 1)
        verdict = "E <= k: every token goes to every expert, not judged" if dense_like else s["verdict"]
        rows.append([run, f"{r.get('tokens', 0):,}", f"{s['category_nmi_excess']:.4f}", topic, p, verdict])
    return headers, rows


def _claim_runs(records: list[dict[str, Any]], measures: dict[str, dict[str, Any]]) -> dict[tuple[str, str], set[str]]:
    """(claim key, measured figure) -> the runs whose figure its verdict rests on
    (``harness.analysis.cost_claims``): memory on every run in a fitted family; R10 on measured
    pairs only where the training runs give no interval and ``harness measure`` decides."""
    from harness.analysis.cost_claims import memory_families, training_rate_ratios

    memory = {p["run"] for f in memory_families(records, measures).values() for p in f["routed"]}
    out = {("memory", "memory"): memory}
    if all(r["ci"] is None for r in training_rate_ratios(records).values()):
        out[("R10", "train")] = {r["run_id"] for m, d, _, _ in measured_pairs(records, measures) for r in (m, d)}
    return out


def claim_flags(
    records: list[dict[str, Any]],
    measures: dict[str, dict[str, Any]],
    training: dict[str, list[dict[str, Any]]] | None = None,
) -> dict[str, list[str]]:
    """Claim key -> the flagged measurements its verdict rests on ('run figure (rule)'). ``training``:
    run id -> the flags of its training time; R10's training FLOP/s rest on those of every pair."""
    flags = measure_flags(measures, records)
    out: dict[str, list[str]] = {}
    for (key, figure), runs in _claim_runs(records, measures).items():
        hits = [f"{run} {LABELS[figure]} ({f['rule']})" for run in sorted(runs) for f in flags[run].get(figure, [])]
        if hits:
            out[key] = hits
    paired = sorted({r["run_id"] for pairs in peer_pairs(records).values() for pair in pairs for r in pair})
    timed = [f"{run} {LABELS['training']} ({f['rule']})" for run in paired for f in (training or {}).get(run, [])]
    if timed:
        out["R10"] = out.get("R10", []) + timed
    return out


def claims_table(claims, flagged: dict[str, list[str]] | None = None) -> tuple[list[str], list[list[Any]]]:
    """``flagged``: from ``claim_flags``. A claim resting on a flagged measurement gets no verdict
    from it: 'not enough data', its caveat beginning with the mark, the measurements, and the
    verdict those figures would have given."""
    from harness.analysis.claims import NO_DATA

    flagged = flagged or {}
    headers = ["expectation", "source", "verdict", "evidence", "caveat"]
    rows = []
    for c in claims:
        caveat, verdict = c.caveat or "-", c.verdict
        if c.key in flagged:
            verdict = NO_DATA
            rests = (
                f"{MARK} rests on measurements flagged as disturbed or impossible ({', '.join(flagged[c.key])}); "
                f"taken at face value they would give '{c.verdict}'. The commands printed under the flagged "
                "figures take them again on a quiet machine"
            )
            caveat = rests if caveat == "-" else f"{rests}; {caveat}"
        rows.append([c.claim, c.source, verdict, c.evidence, caveat])
    return headers, rows


def reproduction_table(repro: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """One row per compared number: first each seed's MoE - dense validation loss (the effect under
    study, to an absolute tolerance below it), then the per-run metrics."""
    headers = ["run", "metric", "this run", "reference", "tolerance", "reproduced"]

    def value(row: dict[str, Any], key: str) -> str:
        return f"{row[key]:+.4f}" if row.get("difference") else f"{row[key]:.4g}"

    rows = [
        [
            r["run"],
            r["metric"],
            value(r, "this run"),
            value(r, "reference"),
            r["tolerance"],
            "not checked (another CPU model)" if r["reproduced"] is None else "yes" if r["reproduced"] else "NO",
        ]
        for r in repro["rows"]
    ]
    return headers, rows
