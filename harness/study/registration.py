"""A confirmatory study's registration, as the report prints it beside the result.

    lines = registration_lines(study, records)

The registration is the study file's ``registration:`` block (``harness.study.spec.Registration``):
the primary contrast, its test and smallest gain of interest, the secondary estimands and what
is exploratory (SCIENCE.md, "Statistics and design"). What makes it a registration is that it was
committed before the runs it judges. So the report names the commit that first added the block
to the study file (``git log -S``) and checks that this commit is an ancestor of every commit
the runs were trained from (``git merge-base --is-ancestor``); a block that is uncommitted, or
committed after a run, is said to be so.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from harness.study.spec import Study, budget_label, project_root


def _git(root: Path, *args: str) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None


def registering_commit(study_file: Path, root: Path) -> str | None:
    """The first commit whose study file holds a ``registration:`` block; None when none does."""
    out = _git(root, "log", "--reverse", "--format=%H", "-S", "registration:", "--", str(study_file))
    if out is None or out.returncode != 0 or not out.stdout.strip():
        return None
    return out.stdout.split()[0]


def registered_before(commit: str, run_commits: set[str], root: Path) -> tuple[bool, list[str]]:
    """Whether ``commit`` is an ancestor of (or equal to) every run's commit; the commits it is not."""
    later = []
    for run_commit in sorted(run_commits):
        out = _git(root, "merge-base", "--is-ancestor", commit, run_commit)
        if out is None or out.returncode != 0:
            later.append(run_commit)
    return not later, later


def _contrast_lines(study: Study) -> list[str]:
    primary = study.registration.primary if study.registration else None
    if primary is None:
        return ["- primary contrast: none registered; R1 uses the stated default (see its evidence)"]
    return [
        f"- primary contrast: `{primary.moe}` against `{primary.dense}` at {budget_label(primary.budget)} FLOPs, "
        f"gain = dense - MoE validation loss paired by seed; one-sided paired t at alpha {primary.alpha:g} "
        f"(exact Wilcoxon signed-rank beside it); smallest gain of interest {primary.delta_min:g} nats: "
        "'supported' when p < alpha, 'not supported' when the one-sided upper confidence bound of the gain "
        "lies below it, otherwise 'inconclusive'",
    ]


def _commit_line(study: Study, records: list[dict[str, Any]]) -> str:
    root = project_root()
    commit = registering_commit(Path(study.path).resolve(), root) if study.path else None
    if commit is None:
        return "- committed: no commit of the study file holds this registration, so it does not predate the runs"
    runs = {c for r in records if (c := r["provenance"]["git"].get("commit"))}
    before, later = registered_before(commit, runs, root)
    if before and runs:
        return (
            f"- committed: {commit[:10]}, an ancestor of every commit the runs were trained from "
            f"({', '.join(c[:10] for c in sorted(runs))}): registered before the runs"
        )
    if not runs:
        return f"- committed: {commit[:10]}; the runs record no commit to check it against"
    return (
        f"- committed: {commit[:10]}, which is NOT an ancestor of the runs' commits "
        f"{', '.join(c[:10] for c in later)}: the registration may postdate those runs"
    )


def registration_lines(study: Study, records: list[dict[str, Any]]) -> list[str]:
    """The report's registration paragraph ([] for a study without a registration)."""
    reg = study.registration
    if reg is None:
        return []
    lines = ["**Registration** (the study file's `registration:`, fixed before the runs):", ""]
    lines += _contrast_lines(study)
    lines += [f"- secondary: {s}" for s in reg.secondary]
    lines += [f"- exploratory: {s}" for s in reg.exploratory]
    if reg.diverged_runs:
        lines.append(f"- a diverged run: {reg.diverged_runs}")
    lines += [_commit_line(study, records), ""]
    return lines
