"""The study report: report.md, summary.json, tables/ (CSV and HTML) and figures/ of a study.

    harness report tiny          # results/tiny/report.md, tables/*.{csv,html}, figures/*.png, report.html
    harness report tiny --reference                      # keep it: results/reference/<device>/tiny/
    harness report tiny --results results/reference/cpu  # rebuild that reference from its records alone

The tables are built in ``harness.report.tables`` (the main one in ``harness.report.glance``), the
analyses in ``harness.analysis``, the figures in ``harness.report.figures``; this module reads the
runs' files, runs them and writes the report.
report.html (``harness.report.html``) is report.md rendered for a browser, figures inline.
A reference folder holds the small records the report reads (``harness.analysis.reproduce``):
the report needs no checkpoint, token shard or tokenizer.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import numpy as np
from tabulate import tabulate

from harness.core.errors import HarnessError
from harness.core.io import read_json, write_json, write_text
from harness.core.remedy import run_file
from harness.data.current import trained_on_other_data
from harness.measure.plausibility import LABELS, MARK, mark, overhead_flags
from harness.report.glance import glance_table, main_table_intro
from harness.report.html import write_html
from harness.report.notes import (
    drop_sections,
    not_applicable,
    not_applicable_lines,
    remeasure_lines,
    study_argument,
    training_flags,
    training_notes,
)
from harness.report.tables import (
    claim_flags,
    claims_table,
    comparison_table,
    cost_table,
    eval_table,
    eval_tasks,
    flag_notes,
    health_table,
    microbench_table,
    reproduction_table,
    run_table,
    seed_table,
    specialisation_table,
)
from harness.study.registration import registration_lines
from harness.study.runs import plan
from harness.study.spec import Study


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


def _load_all(results: Path, runs, name: str, study: str = "STUDY") -> dict[str, dict[str, Any]]:
    """Each run's ``name`` where it exists; a damaged one names the verb that writes it again."""
    return {
        run.run_id: read_json(p, remedy=run_file(p, study))
        for run in runs
        if (p := results / "runs" / run.run_id / name).exists()
    }


FIGURES = {
    "loss_curves": "figures/loss_curves.png",
    "loss_vs_params": "figures/loss_vs_params.png",
    "isoflop": "figures/isoflop.png",
    "loss_vs_cost": "figures/loss_vs_cost.png",
    "cost_scaling": "figures/cost_scaling.png",
    "routing_health": "figures/routing_health.png",
    "specialisation": "figures/specialisation.png",
    "downstream_vs_loss": "figures/downstream_vs_loss.png",
}


def _records(study: Study, results: Path, runs) -> list[dict]:
    """Every run's record.json; refused, naming the runs and how to train them, if any is missing
    or was trained on other data than data/data.json describes (the report would mix the two)."""
    missing = [run.run_id for run in runs if not (results / "runs" / run.run_id / "record.json").is_file()]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise HarnessError(
            f"{results / 'runs'}: {len(missing)} of {len(runs)} runs have no record.json ({shown}); "
            f"train them with `snakemake --config study={study.name}` or `harness train {study.path} --run RUN`"
        )
    paths = [results / "runs" / run.run_id / "record.json" for run in runs]
    records = [read_json(p, remedy=run_file(p, study.path)) for p in paths]
    if refusal := trained_on_other_data(records, results / "data" / "data.json"):
        raise HarnessError(refusal)
    return records


def overhead_lines(overhead: float | None) -> list[str]:
    """The energy meter's overhead from the micro-benchmark, marked when it cannot be right."""
    if overhead is None:
        return []
    bad = overhead_flags(overhead)
    return [
        f"Energy-meter sampling overhead: {mark(f'{overhead:+.2%}', bad)} of training-step time (micro-benchmark)."
        + "".join(f" {MARK} {LABELS[f['figure']]}: {f['reason']}." for f in bad),
        "",
    ]


def _marked(table: tuple[list[str], list[list[Any]]]) -> bool:
    return any(MARK in str(cell) for row in table[1] for cell in row)


def _flag_section(notes: list[str]) -> list[str]:
    """The notes under the cost table: each flagged figure and why (``harness.measure.plausibility``)."""
    if not notes:
        return []
    return [
        f"{MARK} Flagged measurements: shown, but not to be read as facts. Each breaks a plausibility rule "
        "(`harness/measure/plausibility.py`; the flags are also in each run's measure.json). A figure computed from "
        f"a flagged one carries the {MARK} too; the 'vs dense' ratios divide the figures of two rows and are "
        "as uncertain as the marked ones among them.",
        "",
        *notes,
        "",
    ]


def _metrics(records: list[dict[str, Any]], results: Path, study: str) -> dict[str, list[dict[str, Any]]]:
    """Every run's metrics.jsonl; a record without ``train_loss_smoothed`` (trained before it was
    recorded) gets it from its log, computed as training computes it (``harness.train.train_loss``)."""
    from harness.analysis.routing_health import read_metrics
    from harness.train.train_loss import train_loss_smoothed

    logs = {}
    for r in records:
        path = results / "runs" / r["run_id"] / "metrics.jsonl"
        logs[r["run_id"]] = read_metrics(path, study) if path.is_file() or r["arm"] == "moe" else []
        if r.get("train_loss_smoothed") is None:
            r["train_loss_smoothed"] = train_loss_smoothed(logs[r["run_id"]])
    return logs


def _remove_stale_figures(results: Path) -> None:
    """PNG files under figures/ that this report no longer draws (renamed or dropped figures): a
    rebuilt report holds exactly its own figures. Nothing else in the folder is touched."""
    drawn = {Path(v).name for v in FIGURES.values()}
    for png in (results / "figures").glob("*.png"):
        if png.name not in drawn:
            png.unlink()


def loss_curve_lines(records: list[dict[str, Any]], image: str) -> list[str]:
    """The loss curves, what the table's training loss is, and, where the records hold the final
    weights' loss on the training split, how much of the gap between training and validation loss
    lies in the text of the two splits."""
    from harness.train.train_loss import SMOOTHING

    text = (
        f"Train loss in the table is the {SMOOTHING}: a logged loss is the cross-entropy of one batch, taken "
        "before that step's update, without the auxiliary or z-loss; no model here has dropout."
    )
    both = [r for r in records if r.get("final_train_split_loss") is not None and r.get("train_loss_smoothed")]
    if both:
        gap = np.mean([r["train_loss_smoothed"] - r["final_val_loss"] for r in both])
        split = np.mean([r["final_train_split_loss"] - r["final_val_loss"] for r in both])
        text += (
            f" Over the {len(both)} runs, train minus validation loss is {gap:+.3f} nats on average; the final "
            f"weights scored on the training split as validation is scored give {split:+.3f}: that much of it "
            f"lies in the text of the two splits, the remaining {gap - split:+.3f} in the training loss being "
            "a mean over batches of the final tenth, each before its update."
        )
    elif records:
        text += (
            " These records predate `final_train_split_loss` (the final weights scored on the training split as "
            "validation is scored), which tells a gap that lies in the text of the splits from one in the computation."
        )
    return [image, "", text, ""]


def write_report(study: Study, results: Path, microbench: Path | None = None) -> Path:
    """Read every run's record.json (and measure.json, eval.json, routing.json where present) and
    write report.md, summary.json, tables/ (CSV and HTML), figures/ (PNG) and report.html."""
    from harness.analysis import scaling, scaling_report
    from harness.analysis.claims import evaluate_claims, routing_penalty_text
    from harness.analysis.curves import loss_bands
    from harness.analysis.reproduce import reproduction, summary
    from harness.analysis.routing_health import (
        COLLAPSE_IMBALANCE,
        health_dicts,
        routing_health,
        routing_series,
    )
    from harness.analysis.stats import seed_comparison, seed_components
    from harness.report import figures

    runs = plan(study)
    records = _records(study, results, runs)
    measures = _load_all(results, runs, "measure.json", study.path)
    evals = _load_all(results, runs, "eval.json", study.path)
    routing = _load_all(results, runs, "routing.json", study.path)
    data = read_json(results / "data" / "data.json")
    series, health, experts, top_k = {}, {}, {}, {}
    logs = _metrics(records, results, study.path)
    for r in records:
        if r["arm"] == "moe":
            metrics = logs[r["run_id"]]
            series[r["run_id"]] = routing_series(metrics)
            health[r["run_id"]] = health_dicts(routing_health(metrics, r["experts"], r["top_k"]))
            experts[r["run_id"]] = r["experts"]
            top_k[r["run_id"]] = r["top_k"]
    seed_rows = seed_comparison(records)
    analysis = scaling.analyse(records)
    claims = evaluate_claims(records, measures, seed_rows, health, routing, registration=study.registration)
    # This study's name, whatever study a reused or copied record was trained in.
    ours = summary(records, measures, evals) | {"study": study.name}
    repro = reproduction(results, ours)
    trained = training_flags(results, records, study.path)

    eval_headers, eval_rows, not_run = eval_table(records, evals)
    tables = {
        "main": glance_table(records, evals, measures, analysis, trained),
        "runs": run_table(records, evals, trained),
        "dense_vs_moe": comparison_table(records, evals),
        "seeds": seed_table(seed_rows),
        "joint_law": scaling_report.law_table(analysis),
        "effective_params": scaling_report.effective_table(analysis),
        "compute_multiplier": scaling_report.multiplier_table(analysis),
        "isoflop": scaling_report.isoflop_table(analysis),
        "published_laws": scaling_report.published_table(analysis),
        "krajewski": scaling_report.krajewski_table(analysis),
        "eval": (eval_headers, eval_rows),
        "cost": cost_table(records, measures),
        "routing_health": health_table(records, health),
        "specialisation": specialisation_table(routing),
        "claims": claims_table(claims, claim_flags(records, measures, trained)),
        "reproduction": reproduction_table(repro),
        "microbench": microbench_table(microbench),
    }
    for name, (headers, rows) in tables.items():
        write_text(results / "tables" / f"{name}.csv", _csv(headers, rows))
        write_text(
            results / "tables" / f"{name}.html",
            tabulate(rows, headers=headers, tablefmt="html", disable_numparse=True) + "\n",
        )

    fig = {k: results / v for k, v in FIGURES.items()}
    _remove_stale_figures(results)
    figures.loss_curves(records, loss_bands(records, logs), fig["loss_curves"])
    figures.loss_vs_params(records, fig["loss_vs_params"])
    figures.isoflop_figure(records, scaling.isoflop_curves(analysis), fig["isoflop"])
    figures.loss_vs_cost(records, fig["loss_vs_cost"])
    figures.cost_scaling(records, measures, fig["cost_scaling"])
    figures.routing_health_figure(series, experts, fig["routing_health"], top_k)
    spec_run, spec_layer = _specialisation_example(routing)
    figures.specialisation_figure(spec_run, spec_layer, fig["specialisation"])
    figures.downstream_figure(records, evals, eval_tasks(evals), fig["downstream_vs_loss"])
    write_json(results / "summary.json", ours)
    na = not_applicable(tables, records, analysis, scaling.isoflop_curves(analysis))

    gfm = {"tablefmt": "github", "disable_numparse": True}

    def table(name: str) -> str:
        headers, rows = tables[name]
        return tabulate(rows, headers=headers, **gfm) if rows else "(no rows)"

    def image(name: str, alt: str) -> str:
        return "" if f"figure:{name}" in na else f"![{alt}]({FIGURES[name]})"

    seeds = sorted({r["seed"] for r in records})
    md = [f"# Study `{study.name}`", "", study.description.strip(), ""]
    md += ["## At a glance", "", main_table_intro(), "", table("main"), ""]
    if _marked(tables["main"]):
        md += [f"{MARK} Computed from a flagged measurement (see the notes under Cost per run): not a fact.", ""]
    primary = study.registration.primary if study.registration else None
    md += [
        "## Claims",
        "",
        "Each expectation from the literature this study can test, with the verdict its data gives: supported, "
        "not supported, inconclusive (the data cannot tell) or not enough data (too few seeds or runs). "
        "Comparisons are within seed (a seed fixes the data order for every model).",
        "",
        "- Iso-FLOP gain (R1) rests on one contrast: "
        + (
            f"the study's registered primary contrast, {primary.moe} against {primary.dense}"
            if primary
            else "no contrast is registered, so the stated default: the sparse (E > k) arm at the largest budget "
            "with the most seeds (ties: the largest E) against its dense peer, alpha 0.05, smallest gain of "
            "interest 0.01 nats"
        )
        + ". Gain = dense - MoE validation loss paired by seed; supported when the one-sided paired t-test "
        "rejects 'no gain' at alpha, not supported when the one-sided upper confidence bound of the gain is "
        "below the smallest gain of interest, inconclusive otherwise. The evidence gives the exact Wilcoxon "
        "signed-rank p beside it and the power of the rule; other arms appear with their intervals only.",
        "- The gain's growth with E is tested on sparse arms (E > k) only; the E = k gap is the routing "
        "penalty, reported under Dense versus MoE over seeds.",
        "- Routing collapse is two claims (without balancing it collapses; with balancing it does not), "
        "each judged on its own runs by the normalised imbalance described under Routing health.",
        "- Specialisation is judged on runs with E > k by the per-layer permutation p-values of the routing "
        "analysis (Holm over layers) and the excess NMI by category against topic.",
        "",
        *registration_lines(study, records),
    ]
    if len(seeds) == 1:
        md += [
            "**One seed shows the direction only.** The claims on loss need the spread of replicate seeds; "
            "this study has none, so they get no verdict here. The shipped `cpu` study tests its registered "
            "primary contrast over eight seeds, with the twins and dense sizes the other claims need.",
            "",
        ]
    md += [table("claims"), ""]
    if _marked(tables["claims"]):
        md += [
            f"{MARK} No verdict: the claim rests on measurements flagged as disturbed or impossible "
            "(its caveat names them, and the verdict they would give).",
            "",
        ]
    md += ["## Runs", "", table("runs"), "", *training_notes(trained), *_remeasure(study, results, {}, trained, repro)]
    md += loss_curve_lines(records, image("loss_curves", "loss curves"))
    md += ["## Dense versus MoE, run by run", "", table("dense_vs_moe"), ""]
    md += [
        "## Dense versus MoE over seeds",
        "",
        "Each row pairs an MoE run with its dense peer of the same seed and averages over the seeds both have "
        "(named in the seeds column); the interval is the two-sided 95% paired t interval of MoE - dense. "
        "Seed effects are shared by every model: " + seed_components(records).text() + ".",
        "",
    ]
    if len(seeds) == 1:
        md += ["With one seed per run no claim of significance is made.", ""]
    md += [table("seeds"), "", routing_penalty_text(seed_rows), ""]
    md += [
        *scaling_report.markdown(analysis, table, skip=set(na)),
        "",
        image("loss_vs_params", "loss against active and total parameters"),
        "",
    ]
    md += [image("isoflop", "IsoFLOP curves"), "", image("loss_vs_cost", "loss against FLOPs, seconds and joules"), ""]
    if tables["cost"][1]:
        device = next(iter(measures.values()))["device_name"]
        md += [
            "## Cost per run",
            "",
            f"Measured by `harness measure` on {device}. Parameter and optimizer-state memory is computed from "
            "tensor sizes; the training peak is measured (CUDA peak allocated, or the resident memory that "
            "training adds to a fresh process on a CPU). Energy is GPU board energy from NVML, not wall-socket "
            "energy; on a CPU it is absent.",
            "",
            table("cost"),
            "",
            *_flag_section(flag_notes(records, measures)),
            *_remeasure(study, results, measures, {}, repro),
            image("cost_scaling", "memory against total parameters, throughput against active parameters"),
            "",
        ]
    overhead = _meter_overhead(microbench)
    md += overhead_lines(overhead)
    if tables["microbench"][1]:
        md += [
            "## MoE FFN micro-benchmark",
            "",
            "Forward + backward, same weights, implementations interleaved round by round; "
            "medians of per-round ratios.",
            "",
            table("microbench"),
            "",
        ]
    md += [
        "## Routing health",
        "",
        "Per MoE layer over the final tenth of training. Balanced, each expert sees k/E of the tokens and "
        "max/mean load is 1; at most it is E/k (every token on the same k experts). The collapse rule is the "
        "same at every E and k: normalised imbalance = (max/mean load - 1) / (E/k - 1), from 0 (balanced) to "
        f"1, and a layer has collapsed at {COLLAPSE_IMBALANCE:g} or more. Runs with E <= k are not judged "
        "(every expert gets every token). Dead experts are shown; they do not decide collapse on their own.",
        "",
        table("routing_health"),
        "",
        image("routing_health", "normalised load imbalance, load CV and router entropy over training"),
        "",
        "## Expert specialisation",
        "",
        "Normalised mutual information between a token's experts and its category (keyword, identifier, number, "
        "punctuation, string/comment, whitespace) or its topic (the package its file belongs to), minus the same "
        "with labels shuffled, on held-out tokens (`harness routing`).",
        "",
        table("specialisation"),
        "",
        image("specialisation", "expert by token-category lift"),
        "",
    ]
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
            table("eval"),
            "",
            image("downstream_vs_loss", "downstream metrics against validation loss"),
            "",
        ]
        md += [f"- not run: `{task}`: {why}" for task, why in sorted(not_run.items())]
        md += [""] if not_run else []
    else:
        md += [
            "## Downstream evaluation (lm-eval)",
            "",
            "No run has an eval.json (`harness evaluate`).",
            "",
            image("downstream_vs_loss", "downstream metrics against validation loss"),
            "",
        ]
    md = drop_sections(md, na) + not_applicable_lines(na)
    md += ["## Reproduction", "", *reproduction_lines(repro, study.name, ours["device_class"], table)]
    md += manifest(records, data, evals)
    path = write_text(results / "report.md", "\n".join(md))
    # report.html: the same text for a browser, figures inline (and the pages `snakemake --report` shows).
    write_html(results)
    return path


def _remeasure(study: Study, results: Path, measures, trained, repro: dict[str, Any]) -> list[str]:
    """The commands that take the flagged figures again: the flagged measurements of ``measures``
    and the flagged training times of ``trained``."""
    from harness.report.tables import measure_flags

    measured = sorted(run for run, flags in measure_flags(measures).items() if flags)
    retrain = sorted(run for run, flags in trained.items() if flags)
    return remeasure_lines(study_argument(study), results, measured, retrain, repro["is_reference"])


def reproduction_lines(repro: dict[str, Any], study: str, device_class: str, table) -> list[str]:
    """The Reproduction section's text: this folder is the reference, or has none, or how many
    numbers reproduced (the per-seed MoE - dense differences counted apart)."""
    from harness.analysis.reproduce import DIFFERENCE_TOLERANCE

    if repro["is_reference"]:
        return [
            f"This is the committed reference for `{study}` on `{device_class}`, built from the small records "
            "kept in this folder (runs/, data/): it is compared with nothing. A new run's report is compared "
            "with its summary.json.",
            "",
        ]
    if repro["reference"] is None:
        return [f"No committed reference for `{study}` on `{device_class}` under results/reference/.", ""]
    rows = repro["rows"]
    diffs, per_run = [r for r in rows if r["difference"]], [r for r in rows if not r["difference"]]
    good = sum(r["reproduced"] for r in rows)
    text = (
        f"Against `{repro['reference']}` (commit {repro['reference_commit']}): {good} of {len(rows)} numbers "
        f"reproduced within tolerance: {sum(r['reproduced'] for r in diffs)} of {len(diffs)} per-seed MoE - dense "
        f"validation-loss differences (the effect under study, to {DIFFERENCE_TOLERANCE} nats absolute, below "
        f"the effect) and {sum(r['reproduced'] for r in per_run)} of {len(per_run)} per-run numbers (a 1% "
        "tolerance on a loss is about as large as the effect: these alone do not show it reproduced)."
    )
    if not repro["has_differences"]:
        text += " The reference predates per-seed differences: it is compared on its per-run numbers only."
    return [" ".join(f"{text} {repro['note']}".split()), "", table("reproduction"), ""]


def _specialisation_example(routing: dict[str, dict[str, Any]]) -> tuple[str | None, dict[str, Any] | None]:
    """The analysed MoE run with the most experts (then the most tokens), and its middle layer."""
    analysed = [(run, r) for run, r in routing.items() if r.get("moe") and r.get("layers")]
    if not analysed:
        return None, None
    run, r = max(analysed, key=lambda kv: (kv[1]["experts"], kv[1].get("tokens", 0), kv[0]))
    layer = r["layers"][len(r["layers"]) // 2]
    lift = [[1.0 if v is None else v for v in row] for row in layer["expert_category_lift"]]
    return run, {"layer": layer["layer"], "lift": lift, "categories": r["categories"]}


def manifest(records: list[dict[str, Any]], data: dict[str, Any], evals: dict[str, dict[str, Any]]) -> list[str]:
    commits = sorted(
        {
            f"{r['provenance']['git'].get('commit')}{' (dirty)' if r['provenance']['git'].get('dirty') else ''}"
            for r in records
        }
    )
    devices = sorted(
        {
            f"{r['provenance']['host']['device']} ({r['provenance']['host']['gpu'] or r['provenance']['host']['cpu']})"
            for r in records
        }
    )
    packages = records[0]["provenance"]["packages"]
    return [
        "## Manifest",
        "",
        f"- FLOP convention: {', '.join(sorted({r['flop_convention'] for r in records}))} (see models/accounting.py)",
        f"- data: {data['source']}, fingerprint `{data['fingerprint'][:16]}`, "
        f"{data['splits']['train']['tokens']:,} train tokens, vocabulary {data['tokenizer']['vocab_size']}",
        f"- code: git {', '.join(commits)}",
        f"- devices: {', '.join(devices)}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in packages.items() if v),
        f"- lm-eval: {', '.join(sorted({e['lm_eval_version'] for e in evals.values()})) or 'not run'}",
        f"- seeds: {', '.join(map(str, sorted({r['seed'] for r in records})))}",
        "",
    ]
