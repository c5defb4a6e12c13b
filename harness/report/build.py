"""The study report: report.md, summary.json, tables/ (CSV and HTML) and figures/ of a study.

    harness report tiny          # results/tiny/report.md, tables/*.{csv,html}, figures/*.png, report.html
    harness report tiny --reference                      # keep it: results/reference/<device>/tiny/
    harness report tiny --results results/reference/cpu  # rebuild that reference from its records alone

The tables are built in ``harness.report.tables`` (the main one in ``harness.report.glance``), the
analyses in ``harness.analysis``, the figures in ``harness.report.figures``, the text section by section
in ``harness.report.sections``; this module reads the runs' files, runs them and writes the report.
report.html (``harness.report.html``) is report.md rendered for a browser, figures inline.
A reference folder holds the small records the report reads (``harness.analysis.reproduce``):
the report needs no checkpoint, token shard or tokenizer.
"""

from __future__ import annotations

import csv
import io
import sys
from pathlib import Path
from typing import Any

from tabulate import tabulate

from harness.analysis.contrast import recorded_contrast, report_contrast, write_contrast
from harness.analysis.forecast import forecast_table
from harness.core.errors import HarnessError
from harness.core.io import read_json, write_json, write_text
from harness.core.remedy import lost_log, run_file
from harness.data.current import trained_on_other_data
from harness.report.glance import glance
from harness.report.html import write_html
from harness.report.notes import not_applicable, training_flags
from harness.report.sections import FIGURES, StudyReport, report_lines
from harness.report.tables import (
    claim_flags,
    claims_table,
    comparison_table,
    cost_table,
    eval_table,
    eval_tasks,
    health_table,
    microbench_table,
    reproduction_table,
    run_table,
    seed_table,
    specialisation_table,
    step_bench_table,
)
from harness.study.pool import pooled_records
from harness.study.records import read_data_meta, read_metrics, study_record
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


def _records(study: Study, results: Path, runs) -> list[dict]:
    """Every run's record.json; refused, naming the runs and how to train them, if any is missing
    or was trained on other data than data/data.json describes (the report would mix the two)."""
    missing = [run.run_id for run in runs if not (results / "runs" / run.run_id / "record.json").exists()]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise HarnessError(
            f"{results / 'runs'}: {len(missing)} of {len(runs)} runs have no record.json ({shown}); "
            f"train them with `snakemake --config study={study.name}` or `harness train {study.path} --run RUN`"
        )
    records = [study_record(study, results / "runs" / run.run_id / "record.json") for run in runs]
    if refusal := trained_on_other_data(records, results / "data" / "data.json", study):
        raise HarnessError(refusal)
    return records


def _metrics(records: list[dict[str, Any]], results: Path, study: str) -> dict[str, list[dict[str, Any]]]:
    """Every run's metrics.jsonl, each row checked; a record without ``train_loss_smoothed``
    (trained before it was recorded) gets it from its log, computed as training computes it
    (``harness.train.train_loss``). A finished run whose log is gone is refused: its curve, its
    training-time flags and, for an MoE, its routing health would be missing from the report."""
    from harness.train.train_loss import train_loss_smoothed

    logs = {}
    for r in records:
        path = results / "runs" / r["run_id"] / "metrics.jsonl"
        if not path.exists():
            routing = ", its routing health" if r["arm"] == "moe" else ""
            raise HarnessError(
                f"{path} is missing, though record.json says the run finished; the report draws its training "
                f"curve{routing} and its training-time flags from it: {lost_log(path, study)}"
            )
        logs[r["run_id"]] = read_metrics(path, study)
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


def _routing_series(
    records: list[dict[str, Any]], logs: dict[str, list[dict[str, Any]]]
) -> tuple[dict[str, Any], dict[str, Any], dict[str, int], dict[str, int]]:
    """Per MoE run: its routing series over training, its routing health per layer, its number of
    experts and its top-k (the routing-health figure and table)."""
    from harness.analysis.routing_health import health_dicts, routing_health, routing_series

    series, health, experts, top_k = {}, {}, {}, {}
    for r in records:
        if r["arm"] == "moe":
            metrics = logs[r["run_id"]]
            series[r["run_id"]] = routing_series(metrics)
            health[r["run_id"]] = health_dicts(routing_health(metrics, r["experts"], r["top_k"]))
            experts[r["run_id"]] = r["experts"]
            top_k[r["run_id"]] = r["top_k"]
    return series, health, experts, top_k


def _read(study: Study, results: Path, microbench: Path | None) -> StudyReport:
    """The study's records and run files read, and the analyses run: what the tables, figures and
    text of the report are built from (its tables not yet built)."""
    from harness.analysis import scaling
    from harness.analysis.claims import evaluate_claims
    from harness.analysis.reproduce import reproduction, summary
    from harness.analysis.stats import seed_comparison

    runs = plan(study)
    records = _records(study, results, runs)
    measures = _load_all(results, runs, "measure.json", study.path)
    evals = _load_all(results, runs, "eval.json", study.path)
    routing = _load_all(results, runs, "routing.json", study.path)
    data = read_data_meta(results / "data" / "data.json", f"harness data {study.path}", study.name)
    logs = _metrics(records, results, study.path)
    series, health, experts, top_k = _routing_series(records, logs)
    seed_rows = seed_comparison(records)
    pooled, refusals = pooled_records(study, records, data)
    for refusal in refusals:
        print(f"harness report: {refusal}", file=sys.stderr)
    analysis = scaling.analyse(records + pooled, refusals=refusals)
    claims = evaluate_claims(
        records, measures, seed_rows, health, routing, registration=study.registration, pinned=study.contrast
    )
    # This study's name: every record names it (harness.study.records), a reused one too.
    ours = summary(records, measures, evals) | {"study": study.name}
    repro = reproduction(results, ours)
    trained = training_flags(records, logs)
    return StudyReport(
        study=study,
        results=results,
        overhead=_meter_overhead(microbench),
        records=records,
        measures=measures,
        evals=evals,
        routing=routing,
        data=data,
        logs=logs,
        series=series,
        health=health,
        experts=experts,
        top_k=top_k,
        seed_rows=seed_rows,
        analysis=analysis,
        claims=claims,
        ours=ours,
        repro=repro,
        trained=trained,
        pooled=pooled,
    )


def _tables(
    r: StudyReport, microbench: Path | None, step_bench: Path | None = None
) -> tuple[dict[str, tuple[list[str], list]], dict[str, str]]:
    """The report's tables by name, each ``(headers, rows)``, and the lm-eval tasks not run (task -> why)."""
    from harness.analysis import scaling_report
    from harness.analysis.law_report import forms_table, law_table

    eval_headers, eval_rows, not_run = eval_table(r.records, r.evals)
    headers, rows, r.withheld = glance(r.records, r.evals, r.measures, r.analysis, r.trained)
    tables = {
        "main": (headers, rows),
        "runs": run_table(r.records, r.evals, r.trained),
        "dense_vs_moe": comparison_table(r.records, r.evals),
        "seeds": seed_table(r.seed_rows),
        "joint_law": law_table(r.analysis),
        "law_forms": forms_table(r.analysis),
        "forecast": forecast_table(r.study, r.records),
        "effective_params": scaling_report.effective_table(r.analysis),
        "compute_multiplier": scaling_report.multiplier_table(r.analysis, {run for run, f in r.trained.items() if f}),
        "isoflop": scaling_report.isoflop_table(r.analysis),
        "published_laws": scaling_report.published_table(r.analysis),
        "krajewski": scaling_report.krajewski_table(r.analysis),
        "eval": (eval_headers, eval_rows),
        "cost": cost_table(r.records, r.measures),
        "routing_health": health_table(r.records, r.health),
        "specialisation": specialisation_table(r.routing),
        "claims": claims_table(r.claims, claim_flags(r.records, r.measures, r.trained)),
        "reproduction": reproduction_table(r.repro),
        "microbench": microbench_table(microbench),
        "microbench_step": step_bench_table(step_bench, r.study.name),
    }
    return tables, not_run


def _write_tables(results: Path, tables: dict[str, tuple[list[str], list[list[Any]]]]) -> None:
    """Each table as tables/<name>.csv and tables/<name>.html."""
    for name, (headers, rows) in tables.items():
        write_text(results / "tables" / f"{name}.csv", _csv(headers, rows))
        write_text(
            results / "tables" / f"{name}.html",
            tabulate(rows, headers=headers, tablefmt="html", disable_numparse=True) + "\n",
        )


def _draw_figures(r: StudyReport) -> None:
    """Every figure of ``FIGURES`` under figures/, after removing those the report no longer draws;
    one the report lists as not applicable (``r.na``) holds only what it needs."""
    from harness.analysis import scaling
    from harness.analysis.curves import loss_bands
    from harness.report import cost_figures, figures

    fig = {k: r.results / v for k, v in FIGURES.items()}
    _remove_stale_figures(r.results)
    figures.loss_curves(r.records, loss_bands(r.records, r.logs), fig["loss_curves"])
    figures.loss_vs_params(r.records, fig["loss_vs_params"])
    figures.isoflop_figure(
        r.records + r.pooled, scaling.isoflop_curves(r.analysis), fig["isoflop"], r.na.get("figure:isoflop")
    )
    disturbed = {run for run, flags in r.trained.items() if flags}
    cost_figures.loss_vs_cost(r.records, fig["loss_vs_cost"], disturbed)
    cost_figures.cost_scaling(r.records, r.measures, fig["cost_scaling"])
    figures.routing_health_figure(r.series, r.experts, fig["routing_health"], r.top_k)
    spec_run, spec_layer = _specialisation_example(r.routing)
    figures.specialisation_figure(spec_run, spec_layer, fig["specialisation"])
    figures.downstream_figure(r.records, r.evals, eval_tasks(r.evals), fig["downstream_vs_loss"])


def write_report(study: Study, results: Path, microbench: Path | None = None, step_bench: Path | None = None) -> Path:
    """Read every run's record.json (and measure.json, eval.json, routing.json where present) and
    write report.md, summary.json, tables/ (CSV and HTML), figures/ (PNG) and report.html.
    ``microbench``: the pipeline's FFN micro-benchmark JSON; ``step_bench``: ``make bench``'s
    training-step benchmark JSON (``harness.report.tables.step_bench_table``); each None without one."""
    from harness.analysis import scaling

    report = _read(study, results, microbench)
    report.tables, report.not_run = _tables(report, microbench, step_bench)
    _write_tables(results, report.tables)
    report.na = not_applicable(report.tables, report.records, report.analysis, scaling.isoflop_curves(report.analysis))
    _draw_figures(report)
    write_json(results / "summary.json", report.ours)
    # The contrast R1 tests, beside the one the last report tested: a change of models cannot move it silently.
    report.contrast, report.contrast_rule = report_contrast(study, report.seed_rows)
    report.previous_contrast = recorded_contrast(results)
    path = write_text(results / "report.md", "\n".join(report_lines(report)))
    write_contrast(results, study, report.contrast, report.contrast_rule)
    # report.html: the same text for a browser, figures inline (and the pages `snakemake --report` shows).
    write_html(results)
    return path


def _specialisation_example(routing: dict[str, dict[str, Any]]) -> tuple[str | None, dict[str, Any] | None]:
    """The analysed MoE run with the most experts (then the most tokens), and its middle layer."""
    analysed = [(run, r) for run, r in routing.items() if r.get("moe") and r.get("layers")]
    if not analysed:
        return None, None
    run, r = max(analysed, key=lambda kv: (kv[1]["experts"], kv[1].get("tokens", 0), kv[0]))
    layer = r["layers"][len(r["layers"]) // 2]
    lift = [[1.0 if v is None else v for v in row] for row in layer["expert_category_lift"]]
    return run, {"layer": layer["layer"], "lift": lift, "categories": r["categories"]}
