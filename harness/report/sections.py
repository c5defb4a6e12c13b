"""The text of report.md, section by section: each section a function of the study's records,
files and analyses (:class:`StudyReport`, gathered by ``harness.report.build``) that returns its
Markdown lines; :data:`SECTIONS` runs them in the order the report reads, and :func:`report_lines`
adds the notes on what does not apply, the reproduction and the manifest.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tabulate import tabulate

from harness.measure.plausibility import LABELS, MARK, mark, overhead_flags
from harness.report.glance import main_table_intro, withheld_lines
from harness.report.notes import (
    apart_notes,
    drop_sections,
    measured_apart,
    not_applicable_lines,
    remeasure_lines,
    study_argument,
    training_notes,
)
from harness.report.tables import flag_notes
from harness.study.registration import registration_lines
from harness.study.spec import Study

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


@dataclass
class StudyReport:
    """What the report is written from: the study, its runs' files, the analyses and the tables."""

    study: Study
    results: Path
    overhead: float | None  # the energy meter's sampling overhead (micro-benchmark); None without one
    records: list[dict[str, Any]]
    measures: dict[str, dict[str, Any]]
    evals: dict[str, dict[str, Any]]
    routing: dict[str, dict[str, Any]]
    data: dict[str, Any]
    logs: dict[str, list[dict[str, Any]]]  # each run's metrics.jsonl
    series: dict[str, Any]  # per MoE run: its routing series over training
    health: dict[str, Any]  # per MoE run: its routing health per layer
    experts: dict[str, int]
    top_k: dict[str, int]
    seed_rows: list[dict[str, Any]]
    analysis: Any  # over the study's runs and those its `pool:` brings (``pooled``)
    claims: list[Any]
    ours: dict[str, Any]  # this study's summary.json
    repro: dict[str, Any]
    trained: dict[str, list[dict[str, Any]]]  # each run's flagged training times
    tables: dict[str, tuple[list[str], list[list[Any]]]] = field(default_factory=dict)
    not_run: dict[str, str] = field(default_factory=dict)  # lm-eval task -> why it was not run
    na: dict[str, str] = field(default_factory=dict)  # what does not apply -> why (``notes.not_applicable``)
    pooled: list[dict[str, Any]] = field(default_factory=list)  # other studies' runs in the law (study's `pool:`)
    contrast: Any = None  # the PrimaryContrast R1 tests (None: none), chosen by ``contrast_rule``
    contrast_rule: str = ""  # registered or default (``harness.analysis.contrast``)
    previous_contrast: dict[str, Any] | None = None  # what the last report of this folder recorded testing
    withheld: list[Any] = field(default_factory=list)  # flagged at-a-glance figures (``harness.report.glance``)

    def table(self, name: str) -> str:
        """The table as GitHub Markdown; ``(no rows)`` when it has none."""
        headers, rows = self.tables[name]
        return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True) if rows else "(no rows)"

    def image(self, name: str, alt: str) -> str:
        """The figure's Markdown image; empty when it does not apply to the study."""
        return "" if f"figure:{name}" in self.na else f"![{alt}]({FIGURES[name]})"

    def one_seed(self) -> bool:
        """Whether every run has the same seed."""
        return len({r["seed"] for r in self.records}) == 1


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


def _remeasure(
    study: Study, results: Path, measures, trained, repro: dict[str, Any], apart=(), records=()
) -> list[str]:
    """The commands that take the flagged figures again: the flagged measurements of ``measures``
    (judged against their training runs in ``records``; with both runs of each MoE and dense pair
    ``measured_apart`` found: ``apart``) and the flagged training times of ``trained``."""
    from harness.report.tables import measure_flags

    flagged = {run for run, flags in measure_flags(measures, records).items() if flags}
    measured = sorted(flagged | {run for pair in apart for run in pair[:2]})
    retrain = sorted(run for run, flags in trained.items() if flags)
    return remeasure_lines(study_argument(study), results, measured, retrain, repro["is_reference"], bool(apart))


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
    unchecked = [r for r in repro["rows"] if r["reproduced"] is None]
    rows = [r for r in repro["rows"] if r["reproduced"] is not None]
    diffs, per_run = [r for r in rows if r["difference"]], [r for r in rows if not r["difference"]]
    good = sum(r["reproduced"] for r in rows)
    text = (
        f"Against `{repro['reference']}` (commit {repro['reference_commit']}): {good} of {len(rows)} numbers "
        f"reproduced within tolerance: {sum(r['reproduced'] for r in diffs)} of {len(diffs)} per-seed MoE - dense "
        f"validation-loss differences (the effect under study, to {DIFFERENCE_TOLERANCE} nats absolute, below "
        f"the effect) and {sum(r['reproduced'] for r in per_run)} of {len(per_run)} per-run numbers (a 1% "
        "tolerance on a loss is about as large as the effect: these alone do not show it reproduced)."
    )
    if unchecked:
        text += (
            f" {len(unchecked)} per-seed difference(s) not checked: the reference was made on another CPU model, "
            "whose bf16 kernels round differently and move a loss by up to about 1%, as much as the effect; "
            "reproducing the effect needs the reference's CPU model."
        )
    if not repro["has_differences"]:
        text += " The reference predates per-seed differences: it is compared on its per-run numbers only."
    return [" ".join(f"{text} {repro['note']}".split()), "", table("reproduction"), ""]


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


def _title(r: StudyReport) -> list[str]:
    """The study's name and description."""
    return [f"# Study `{r.study.name}`", "", r.study.description.strip(), ""]


def _glance(r: StudyReport) -> list[str]:
    """At a glance: each MoE against its compute-matched dense run."""
    md = ["## At a glance", "", main_table_intro(), "", r.table("main"), ""]
    return md + withheld_lines(r.withheld, study_argument(r.study), r.results, r.repro["is_reference"])


def _contrast_sentence(r: StudyReport) -> str:
    """Which contrast R1 tests and the rule that chose it; and the one the last report of this folder
    tested, where the study's models or registration have moved it since."""
    from harness.analysis.contrast import PINNED, REGISTERED, describe, same
    from harness.analysis.stats import DEFAULT_ALPHA, DEFAULT_DELTA_MIN, DEFAULT_RULE

    c, before = r.contrast, r.previous_contrast
    if r.contrast_rule == REGISTERED:
        text = f"the study's registered primary contrast, {describe(c)}"
    elif r.contrast_rule == PINNED:
        text = f"no contrast is registered; the study pins its contrast (`contrast:` in the study file), {describe(c)}"
    elif c is None:
        text = f"no contrast is registered, and the stated default, {DEFAULT_RULE}, finds none"
    else:
        text = (
            f"no contrast is registered, so the stated default, {DEFAULT_RULE}: here {describe(c)}, alpha "
            f"{DEFAULT_ALPHA:g}, smallest gain of interest {DEFAULT_DELTA_MIN:g} nats"
        )
    if before is not None and before["contrast"] is not None and not same(before["contrast"], c):
        text += (
            f" (**changed**: the last report of this folder tested {describe(before['contrast'])}"
            + (", registered" if before["rule"] == REGISTERED else "")
            + "; the study's models or its registration moved it; `contrast:` in the study file pins one)"
        )
    return text


def _claims(r: StudyReport) -> list[str]:
    """Claims: how each expectation from the literature is judged, and the verdicts."""
    md = [
        "## Claims",
        "",
        "Each expectation from the literature this study can test, with the verdict its data gives: supported, "
        "not supported, inconclusive (the data cannot tell) or not enough data (too few seeds or runs). "
        "Comparisons are within seed (a seed fixes the data order for every model).",
        "",
        "- Iso-FLOP gain (R1) rests on one contrast: "
        + _contrast_sentence(r)
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
        *registration_lines(r.study, r.records),
        *_forecast(r),
    ]
    if r.one_seed():
        md += [
            "**One seed shows the direction only.** The claims on loss need the spread of replicate seeds; "
            "this study has none, so they get no verdict here. The shipped `cpu` study tests its registered "
            "primary contrast over eight seeds, with the twins and dense sizes the other claims need.",
            "",
        ]
    md += [r.table("claims"), ""]
    if _marked(r.tables["claims"]):
        md += [
            f"{MARK} No verdict: the claim rests on measurements flagged as disturbed or impossible "
            "(its caveat names them, and the verdict they would give).",
            "",
        ]
    return md


def _forecast(r: StudyReport) -> list[str]:
    """The registered forecasts of the primary gain, scored against the result."""
    if not r.tables.get("forecast", ([], []))[1]:
        return []
    return [
        "**The forecast, scored.** Before the runs, the registration recorded what a joint law fitted to earlier "
        "runs predicts for the primary gain under each form of the law, with a prediction interval for the mean "
        "over the contrast's seeds (parameter uncertainty from the law's bootstrap plus the sampling noise of the "
        "mean at the planning sd). Scored against the observed mean gain: inside the interval or not, and the "
        "error in standard errors of the observed mean (its sd over the square root of the seeds).",
        "",
        r.table("forecast"),
        "",
    ]


def _runs(r: StudyReport) -> list[str]:
    """Runs: the run table, its flagged training times and the loss curves."""
    md = ["## Runs", "", r.table("runs"), "", *training_notes(r.trained)]
    md += _remeasure(r.study, r.results, {}, r.trained, r.repro)
    return md + loss_curve_lines(r.records, r.image("loss_curves", "loss curves"))


def _dense_vs_moe(r: StudyReport) -> list[str]:
    """Dense versus MoE, run by run and over seeds, with the routing penalty."""
    from harness.analysis.claims import routing_penalty_text
    from harness.analysis.stats import seed_components

    md = ["## Dense versus MoE, run by run", "", r.table("dense_vs_moe"), ""]
    md += [
        "## Dense versus MoE over seeds",
        "",
        "Each row pairs an MoE run with its dense peer of the same seed and averages over the seeds both have "
        "(named in the seeds column); the interval is the two-sided 95% paired t interval of MoE - dense. "
        "Seed effects are shared by every model: " + seed_components(r.records).text() + ".",
        "",
    ]
    if r.one_seed():
        md += ["With one seed per run no claim of significance is made.", ""]
    return [*md, r.table("seeds"), "", routing_penalty_text(r.seed_rows), ""]


def _scaling(r: StudyReport) -> list[str]:
    """The scaling analysis and its figures."""
    from harness.analysis import scaling_report

    return [
        *scaling_report.markdown(r.analysis, r.table, skip=set(r.na)),
        "",
        r.image("loss_vs_params", "loss against active and total parameters"),
        "",
        r.image("isoflop", "IsoFLOP curves"),
        "",
        r.image("loss_vs_cost", "loss against FLOPs, seconds and joules"),
        "",
    ]


def _cost(r: StudyReport) -> list[str]:
    """Cost per run, where any run was measured: the table, its flagged figures and how to measure them again."""
    if not r.tables["cost"][1]:
        return []
    device = next(iter(r.measures.values()))["device_name"]
    return [
        "## Cost per run",
        "",
        f"Measured by `harness measure` on {device}. Parameter and optimizer-state memory is computed from "
        "tensor sizes; the training peak is measured (CUDA peak allocated, or the resident memory that "
        "training adds to a fresh process on a CPU). Energy is GPU board energy from NVML, not wall-socket "
        "energy; on a CPU it is absent.",
        "",
        r.table("cost"),
        "",
        *_flag_section(flag_notes(r.records, r.measures)),
        *apart_notes(apart := measured_apart(r.records, r.measures)),
        *_remeasure(r.study, r.results, r.measures, {}, r.repro, apart, r.records),
        r.image("cost_scaling", "memory against total parameters, throughput against active parameters"),
        "",
    ]


def _overhead(r: StudyReport) -> list[str]:
    """The energy meter's overhead, where the micro-benchmark measured it."""
    return overhead_lines(r.overhead)


def _microbench(r: StudyReport) -> list[str]:
    """The micro-benchmarks, where they ran: the MoE FFN (the pipeline's microbench rule) and the
    CPU training step of the study's own models and recipe (``make bench``)."""
    ffn, step = r.tables["microbench"][1], r.tables.get("microbench_step", ([], []))[1]
    if not ffn and not step:
        return []
    lines = ["## Micro-benchmarks" if step else "## MoE FFN micro-benchmark", ""]
    if ffn:
        lines += [
            ("MoE FFN: f" if step else "F")
            + "orward + backward, same weights, implementations interleaved round by round; medians of per-round "
            "ratios.",
            "",
            r.table("microbench"),
            "",
        ]
    if step:
        lines += [
            "CPU training step (`make bench`, results/benchmarks/cpu_training_step.json): the study's dense "
            "model and sparse MoE, one step each (forward, backward, clipping, AdamW) on the study's path "
            "against eager float32 at the study's threads and batch, interleaved round by round; medians of "
            "per-round ratios. Run on the machine and date named, not by the pipeline.",
            "",
            r.table("microbench_step"),
            "",
        ]
    return lines


def _routing(r: StudyReport) -> list[str]:
    """Routing health and expert specialisation."""
    from harness.analysis.routing_health import COLLAPSE_IMBALANCE

    return [
        "## Routing health",
        "",
        "Per MoE layer over the final tenth of training. Balanced, each expert sees k/E of the tokens and "
        "max/mean load is 1; at most it is E/k (every token on the same k experts). The collapse rule is the "
        "same at every E and k: normalised imbalance = (max/mean load - 1) / (E/k - 1), from 0 (balanced) to "
        f"1, and a layer has collapsed at {COLLAPSE_IMBALANCE:g} or more. Runs with E <= k are not judged "
        "(every expert gets every token). Dead experts are shown; they do not decide collapse on their own.",
        "",
        r.table("routing_health"),
        "",
        r.image("routing_health", "normalised load imbalance, load CV and router entropy over training"),
        "",
        "## Expert specialisation",
        "",
        "Normalised mutual information between a token's experts and its category (keyword, identifier, number, "
        "punctuation, string/comment, whitespace) or its topic (the package its file belongs to), minus the same "
        "with labels shuffled, on held-out tokens (`harness routing`).",
        "",
        r.table("specialisation"),
        "",
        r.image("specialisation", "expert by token-category lift"),
        "",
    ]


def _downstream(r: StudyReport) -> list[str]:
    """Downstream evaluation: the lm-eval table and figure, and the tasks not run; or that none ran."""
    if not r.tables["eval"][1]:
        return [
            "## Downstream evaluation (lm-eval)",
            "",
            "No run has an eval.json (`harness evaluate`).",
            "",
            r.image("downstream_vs_loss", "downstream metrics against validation loss"),
            "",
        ]
    any_eval = next(iter(r.evals.values()))
    local = any_eval["local_tasks"]
    md = [
        "## Downstream evaluation (lm-eval)",
        "",
        f"`harness evaluate` with lm-eval {any_eval['lm_eval_version']}: heldout_ppl is bits per byte "
        f"over {local['tasks']['heldout_ppl']['documents']} documents of the {local['split']} split in "
        f"windows of the training context ({local['seq_len']} tokens); heldout_code_mc picks the real next "
        f"line of a held-out file among {local['tasks']['heldout_code_mc']['choices']} "
        f"(chance {local['tasks']['heldout_code_mc']['chance_accuracy']:.2f}, "
        f"{local['tasks']['heldout_code_mc']['questions']} questions). Values are ± standard error.",
        "",
        r.table("eval"),
        "",
        r.image("downstream_vs_loss", "downstream metrics against validation loss"),
        "",
    ]
    md += [f"- not run: `{task}`: {why}" for task, why in sorted(r.not_run.items())]
    return md + ([""] if r.not_run else [])


# The report's sections in the order it reads; each returns its Markdown lines (none when it has nothing).
SECTIONS = (
    _title,
    _glance,
    _claims,
    _runs,
    _dense_vs_moe,
    _scaling,
    _cost,
    _overhead,
    _microbench,
    _routing,
    _downstream,
)


def report_lines(r: StudyReport) -> list[str]:
    """report.md's lines: the sections in order, those that do not apply to the study left out and
    listed, then the reproduction and the manifest."""
    md = [line for section in SECTIONS for line in section(r)]
    md = drop_sections(md, r.na) + not_applicable_lines(r.na)
    md += ["## Reproduction", "", *reproduction_lines(r.repro, r.study.name, r.ours["device_class"], r.table)]
    return md + manifest(r.records, r.data, r.evals)
