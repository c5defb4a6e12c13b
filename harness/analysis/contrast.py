"""The study's primary contrast (R1): the one a report tested, kept in its results folder, and the
one the study's models give now, so that a change of models cannot move it silently.

    c, rule = report_contrast(study, seed_rows)     # what the report tests: registered or the default
    write_contrast(results, study, c, rule)         # results/<study>/contrast.json, atomically
    line = contrast_warning(study, results)         # None, or the warning `harness plan` prints

Without a registration (``registration.primary`` in the study file) R1 rests on a stated default
(``harness.analysis.stats.default_contrast``), chosen from the arms the study holds: adding or
removing a model can move it to another arm. The report records the contrast it tested in
``contrast.json``; ``harness plan`` and the workflow's start compare that record with the
default the study's planned runs give (the same rule, on the seeds each arm is planned with) and
warn, naming both and how to pin one, before anything runs.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any, TextIO

from harness.analysis.stats import DEFAULT_RULE, default_contrast, seed_comparison
from harness.core.errors import HarnessError
from harness.core.io import read_json_object, write_json
from harness.study.runs import plan
from harness.study.spec import PrimaryContrast, Study, budget_label, load_study
from models.accounting import count_params
from models.config import ConfigError

FILE = "contrast.json"
"""The contrast the last report tested, in the study's results folder."""
REGISTERED, PINNED, DEFAULT = "registered", "pinned", "default"


def report_contrast(study: Study, seed_rows: list[dict[str, Any]]) -> tuple[PrimaryContrast | None, str]:
    """The contrast R1 tests (``harness.analysis.claims.iso_flop_gain``) and how it was chosen:
    the study's registered one, else the stated default over the report's ``seed_rows``."""
    primary = study.registration.primary if study.registration else None
    if primary:
        return primary, REGISTERED
    if study.contrast is not None:
        return study.contrast, PINNED
    return default_contrast(seed_rows), DEFAULT


def planned_contrast(study: Study) -> PrimaryContrast | None:
    """The stated default the study's planned runs give: each run stands for the record it will
    write (arm, E, k, budget, seed, active non-embedding parameters), and the report's own rule
    chooses among them, every planned seed counted."""
    active = {}
    planned = []
    for run in plan(study):
        cfg = run.model
        if cfg.name not in active:
            active[cfg.name] = count_params(cfg).active_non_embedding
        planned.append(
            {
                "run_id": run.run_id,
                "model": cfg.name,
                "arm": "dense" if cfg.moe is None else "moe",
                "experts": None if cfg.moe is None else cfg.moe.experts,
                "top_k": None if cfg.moe is None else cfg.moe.top_k,
                "budget_flops": run.budget,
                "seed": run.seed,
                "params": {"active_non_embedding": active[cfg.name]},
                "final_val_loss": 0.0,  # not trained yet: a stand-in, the rule reads no loss
            }
        )
    return default_contrast(seed_comparison(planned))


def describe(c: dict[str, Any] | PrimaryContrast) -> str:
    """'moe-x against dense-y at 7e12 FLOPs'."""
    moe, dense, budget = (c.moe, c.dense, c.budget) if isinstance(c, PrimaryContrast) else _fields(c)
    return f"`{moe}` against `{dense}` at {budget_label(budget)} FLOPs"


def _fields(record: dict[str, Any]) -> tuple[str, str, float]:
    return record["moe"], record["dense"], record["budget_flops"]


def write_contrast(results: Path, study: Study, c: PrimaryContrast | None, rule: str) -> Path:
    """Record the contrast a report tested (None: it had none) in ``results``/contrast.json."""
    chosen = None if c is None else {"moe": c.moe, "dense": c.dense, "budget_flops": c.budget}
    return write_json(results / FILE, {"study": study.name, "rule": rule, "contrast": chosen})


def recorded_contrast(results: Path) -> dict[str, Any] | None:
    """What the last report of ``results`` recorded (``rule`` and ``contrast``), or None where no
    report recorded one (or its record cannot be read)."""
    record = read_json_object(results / FILE)
    if record is None or record.get("rule") not in (REGISTERED, DEFAULT):
        return None
    chosen = record.get("contrast")
    if chosen is not None and not (
        isinstance(chosen, dict)
        and isinstance(chosen.get("moe"), str)
        and isinstance(chosen.get("dense"), str)
        and isinstance(chosen.get("budget_flops"), (int, float))
    ):
        return None
    return record


def same(old: dict[str, Any] | None, new: PrimaryContrast | None) -> bool:
    """Whether a recorded contrast (``contrast.json``'s ``contrast``) names ``new``."""
    if old is None or new is None:
        return old is None and new is None
    moe, dense, budget = _fields(old)
    return (moe, dense) == (new.moe, new.dense) and math.isclose(budget, new.budget, rel_tol=1e-9)


def _pin(c: PrimaryContrast, study: Study) -> str:
    """How to keep ``c`` whatever models the study holds: pin it with the study's ``contrast`` (or, for
    a confirmatory study, register it: that needs two shared seeds and a registration made before
    the runs)."""
    runs = plan(study)
    gone = [name for name in c.pair if not any(r.model.name == name and r.budget == c.budget for r in runs)]
    if gone:
        named = " and ".join(f"`{g}`" for g in gone)
        return f"to keep it, put {named} back in the study at {budget_label(c.budget)} FLOPs"
    block = f"contrast: {{moe: {c.moe}, dense: {c.dense}, budget: {budget_label(c.budget)}}}"
    return (
        f"to keep it, pin it in {study.path or 'the study file'}: `{block}` (or remove the model that moved it; "
        "to take the new one, run the report again)"
    )


def contrast_warning(study: Study, results: Path) -> str | None:
    """One line when the primary contrast the study's models give now differs from the one the last
    report of ``results`` tested, naming both and how to pin one; None when it is the same, when no
    report recorded one, or when the study registers its contrast (nothing can move it)."""
    if study.contrast is not None or (study.registration is not None and study.registration.primary is not None):
        return None
    record = recorded_contrast(results)
    if record is None or record["contrast"] is None:
        return None
    new = planned_contrast(study)
    if same(record["contrast"], new):
        return None
    old = describe(record["contrast"])
    how = {REGISTERED: "registered", PINNED: "pinned by the study's `contrast`"}.get(
        record["rule"], "the stated default"
    )
    now = (
        f"with the models the study holds now, the stated default, {DEFAULT_RULE}, is {describe(new)}"
        if new is not None
        else "the study holds no sparse MoE arm with a dense peer now: R1 would have no contrast"
    )
    keep = _pin(PrimaryContrast(*_fields(record["contrast"])), study) if record["rule"] == DEFAULT else ""
    if record["rule"] == PINNED:
        keep = f"to keep it, restore its `contrast` in {study.path or 'the study file'}"
    keep = keep or f"to keep it, restore its `registration.primary` in {study.path or 'the study file'}"
    return (
        f"the primary contrast (R1) of study '{study.name}' would change: the last report "
        f"({results / FILE}) tested {old} ({how}); {now}; {keep}"
    )


def print_contrast_warning(
    study: Study | str, results_root: str | Path, prefix: str = "warning", file: TextIO | None = None
) -> None:
    """Print ``contrast_warning`` of ``study`` (a Study, or its name or file) and its folder under
    ``results_root``, if any. A study or record that cannot be read prints nothing: the commands
    that need them refuse with their own message."""
    try:
        study = load_study(study) if isinstance(study, str) else study
        line = contrast_warning(study, Path(results_root) / study.name)
    except (ConfigError, HarnessError, OSError):
        return
    if line:
        print(f"{prefix}: {line}", file=file or sys.stderr)
