"""What the report says around its tables: which figures are disturbed and how to take them
again, and which tables and figures do not apply to a study.

    flags = training_flags(records, logs)                # run -> flags of its training time
    lines = remeasure_lines("tiny", results, measured, trained)   # the commands, one a line
    na = not_applicable(tables, records, analysis, curves)  # name -> why it does not apply

``harness.report.build`` calls these; the rules that flag a figure are ``harness.measure.plausibility``'s.
"""

from __future__ import annotations

import shlex
from collections import defaultdict
from pathlib import Path
from typing import Any

from harness.analysis.stats import arm_label
from harness.core.host_load import taken_utc
from harness.measure.plausibility import LABELS, MARK, check_training
from harness.study.spec import Study, budget_label, study_path


def training_flags(
    records: list[dict[str, Any]], logs: dict[str, list[dict[str, Any]]]
) -> dict[str, list[dict[str, Any]]]:
    """Run id -> the flags of its training time, from its metrics.jsonl rows (``logs``, as the
    report read them; ``check_training``)."""
    return {r["run_id"]: check_training(r, logs.get(r["run_id"], [])) for r in records}


def training_notes(flags: dict[str, list[dict[str, Any]]]) -> list[str]:
    """The notes under the run table: each run whose training time is flagged, and why."""
    notes = [f"- {MARK} `{run}` {LABELS['training']}: {f['reason']}" for run, fs in sorted(flags.items()) for f in fs]
    if not notes:
        return []
    return [
        f"{MARK} Training time taken on a disturbed host (the rules of `harness/measure/plausibility.py`, applied "
        "to the run's log): its seconds and tokens/s, and the training FLOP/s ratios built on them, are not to be read "
        "as facts.",
        "",
        *notes,
        "",
    ]


APART_HOURS = 12.0
"""An MoE and its dense peer measured further apart than this were measured in two sessions of the
host (another load, perhaps another state of the machine): their speed ratio is noted, and both are
offered for measuring again in one session."""


def measured_apart(records: list[dict[str, Any]], measures: dict[str, dict[str, Any]]) -> list[tuple[str, str, float]]:
    """(MoE run, its dense peer, hours between their measurements) for each MoE whose speed is
    compared with a dense figure taken more than ``APART_HOURS`` before or after its own."""
    from harness.analysis.stats import dense_peer

    out = []
    for r in sorted(records, key=lambda r: r["run_id"]):
        peer = dense_peer(r, records) if r["arm"] == "moe" else None
        if peer is None:
            continue
        times = taken_utc(measures.get(r["run_id"])), taken_utc(measures.get(peer["run_id"]))
        if None in times:
            continue
        hours = abs((times[0] - times[1]).total_seconds()) / 3600
        if hours > APART_HOURS:
            out.append((r["run_id"], peer["run_id"], hours))
    return out


def apart_notes(apart: list[tuple[str, str, float]]) -> list[str]:
    """The notes under the cost table for the pairs ``measured_apart`` found."""
    if not apart:
        return []
    lines = [
        f"- `{moe}` and its dense peer `{dense}` were measured "
        + (f"{hours / 24:.1f} days" if hours >= 48 else f"{hours:.0f} hours")
        + " apart (the measured (UTC) column): their speed ratio compares two sessions of the host, not two "
        "models in one session"
        for moe, dense, hours in apart
    ]
    return [*lines, ""]


def study_argument(study: Study) -> str:
    """The study as a command names it: its name when that finds its file, else its path."""
    found = study_path(study.name)
    same = found.is_file() and Path(study.path).resolve() == found.resolve()
    return study.name if same else shlex.quote(str(study.path))


def remeasure_lines(
    study: str,
    results: Path,
    measured: list[str],
    trained: list[str],
    is_reference: bool = False,
    apart: bool = False,
) -> list[str]:
    """The report's paragraph that takes the flagged figures again: `harness measure --force` for
    each run with a flagged measurement, `harness train --restart` for each with a flagged training
    time (``results``: the study folder; its parent is the results root the commands name)."""
    if not measured and not trained:
        return []
    if is_reference:
        return [
            f"{MARK} The flagged figures can be taken again only where the runs' checkpoints are: a reference "
            "keeps none. Run the study, then the commands its report prints. A measurement alone can be taken "
            "again with random weights (`harness measure STUDY --run RUN --random-weights --force`): a dense "
            "model's speed as its checkpoint's, an MoE's with its initial routing, not its trained one.",
            "",
        ]
    root = results.parent
    where = "" if root == Path("results") else f" --results {shlex.quote(str(root))}"
    commands = [f"harness measure {study} --run {run} --force{where}" for run in measured]
    commands += [f"harness train {study} --run {run} --restart{where}" for run in trained]
    restart = (
        "; `--restart` trains the run again from its first step, to the same losses, and `snakemake` then "
        "redoes its measurement, evaluation and routing analysis"
        if trained
        else ""
    )
    return [
        f"{MARK} To take the flagged figures again"
        + (" (and both runs of each pair measured apart, in one session)" if apart else "")
        + f", on a quiet machine (then `harness report {study}{where}`{restart}):",
        "",
        "```bash",
        *commands,
        "```",
        "",
    ]


def _all_placeholder(table: tuple[list[str], list[list[Any]]], column: str) -> bool:
    """Whether no row of ``table`` has a value in the column whose header starts with ``column``."""
    headers, rows = table
    i = next(i for i, h in enumerate(headers) if h.startswith(column))
    return all(str(row[i]).strip() in ("-", "") for row in rows)


def _most_sizes(records: list[dict[str, Any]]) -> str:
    sizes: dict[tuple[str, float], set] = defaultdict(set)
    for r in records:
        sizes[(arm_label(r), r["budget_flops"])].add(r["params"]["active_non_embedding"])
    (arm, budget), most = max(sizes.items(), key=lambda kv: len(kv[1]))
    return f"here at most {len(most)}: {arm} at {budget_label(budget)} FLOPs"


def not_applicable(tables: dict, records: list[dict[str, Any]], analysis, curves: list) -> dict[str, str]:
    """Name of a table, figure or section -> what it needs that this study lacks; the report leaves
    each out and lists them in one place. ``tables``: the report's (headers, rows) by name;
    ``curves``: the IsoFLOP curves drawn (``harness.analysis.scaling.isoflop_curves``)."""
    from harness.analysis.isoflop import MIN_SIZES

    sizes = f"{MIN_SIZES} or more model sizes of one arm at one budget; {_most_sizes(records)}"
    out = {}
    if analysis.law is None:
        out["compute_multiplier"] = (
            "compute and wall-clock multipliers against the dense frontier (need the joint scaling law: dense "
            "runs of 2 or more sizes at 2 or more budgets)"
        )
    if not tables["isoflop"][1] or _all_placeholder(tables["isoflop"], "N_opt"):
        out["isoflop"] = f"IsoFLOP table (needs {sizes})"
    if not curves:
        out["figure:isoflop"] = f"IsoFLOP figure (needs {sizes})"
    if not tables["effective_params"][1] or _all_placeholder(tables["effective_params"], "effective N"):
        out["effective_params"] = (
            "effective parameter count, Clark et al. 2022 (needs dense runs of 3 or more sizes trained on an "
            "MoE's number of tokens)"
        )
    if not any(r["arm"] == "moe" for r in records):
        out["section:Routing health"] = "Routing health table and figure (need an MoE run)"
    if not tables["specialisation"][1]:
        out["section:Expert specialisation"] = (
            "Expert specialisation table and figure (need `harness routing` on an MoE run)"
        )
    if not tables["eval"][1]:
        out["section:Downstream evaluation (lm-eval)"] = (
            "Downstream evaluation table and figure (need an eval.json: `harness evaluate`)"
        )
    if not tables["cost"][1]:
        out["section:Cost per run"] = "Cost per run and its figure (need a measure.json: `harness measure`)"
    return out


def not_applicable_lines(na: dict[str, str]) -> list[str]:
    """One short section listing what does not apply to this study, in place of empty tables."""
    if not na:
        return []
    return ["## Not applicable to this study", "", *(f"- {why}" for why in na.values()), ""]


def drop_sections(md: list[str], na: dict[str, str]) -> list[str]:
    """``md`` (report.md's lines and blocks) without the ``## `` sections ``na`` names (keys
    ``section:TITLE``): each from its heading up to the next ``## `` heading."""
    titles = {key.removeprefix("section:") for key in na if key.startswith("section:")}
    out, dropping = [], False
    for block in md:
        if block.startswith("## "):
            dropping = block[3:].strip() in titles
        if not dropping:
            out.append(block)
    return out
