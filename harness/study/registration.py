"""A confirmatory study's registration, as the report prints it beside the result.

    lines = registration_lines(study, records)

The registration is the study file's ``registration:`` block (``harness.study.spec.Registration``):
the primary contrast, its test and smallest gain of interest, the secondary estimands and what
is exploratory. What makes it a registration is that it was
committed before the runs it judges, and that the runs were trained under the block the report
prints. So the report names the commit that first added the block to the study file (``git log
-S``), checks that this commit is an ancestor of every commit the runs were trained from (``git
merge-base --is-ancestor``), and that each run's recorded registration hash (``record.json``'s
``registration_sha256``; for a run trained before runs recorded it, the block in the study file
at its clean commit) equals the hash of the block now. A block that is uncommitted, committed
after a run, or edited after a run is said to be so, naming the runs.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import yaml

from harness.study.spec import Study, budget_label, project_root, registration_hash
from models.config import parse_yaml


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
        f"- seeds: both arms share at least {primary.seeds}",
        *_forecast_lines(study),
    ]


def _forecast_lines(study: Study) -> list[str]:
    f = study.registration.forecast if study.registration else None
    if f is None:
        return []
    laws = "; ".join(
        f"{law.law} law {law.gain:+.4f} nats [{law.interval[0]:+.4f}, {law.interval[1]:+.4f}]" for law in f.laws
    )
    command = f" (`{f.command}`)" if f.command else ""
    return [
        f"- forecast of the mean gain, {f.confidence:.0%} prediction intervals, by the law fitted to "
        f"{f.source}{command}: {laws}"
    ]


def block_hash_at(commit: str, study_file: Path, root: Path) -> str | None:
    """The registration hash of ``study_file`` as committed at ``commit`` (None: not readable there)."""
    try:
        rel = study_file.resolve().relative_to(root.resolve())
    except ValueError:
        return None
    out = _git(root, "show", f"{commit}:{rel.as_posix()}")
    if out is None or out.returncode != 0:
        return None
    try:
        return registration_hash(parse_yaml(out.stdout) or {})
    except yaml.YAMLError:
        return None


def trained_under(rec: dict[str, Any], study_file: Path, root: Path) -> tuple[str | None, str]:
    """The registration hash a run was trained under and how it is known: recorded by training, or
    (a run trained before runs recorded it, from a clean tree) the block at the run's commit."""
    if rec.get("registration_sha256"):
        return rec["registration_sha256"], "recorded"
    git = rec.get("provenance", {}).get("git", {})
    if git.get("commit") and git.get("dirty") is False:
        return block_hash_at(git["commit"], study_file, root), f"the study file at {git['commit'][:10]}"
    return None, "not recorded, and the run's tree had uncommitted changes"


def integrity(study: Study, records: list[dict[str, Any]]) -> dict[str, Any]:
    """Whether every run was trained under the block the report prints, after the commit that
    first held a block: ``registered`` (bool), ``commit`` (that commit or None), ``later`` (run
    commits it is not an ancestor of), ``changed`` (runs trained under another block),
    ``unknown`` (runs whose block cannot be told), ``legacy`` (runs known from git, not recorded)."""
    root = project_root()
    path = Path(study.path).resolve() if study.path else None
    commit = registering_commit(path, root) if path else None
    runs = {c for r in records if (c := r.get("provenance", {}).get("git", {}).get("commit"))}
    before, later = registered_before(commit, runs, root) if commit else (False, [])
    changed, unknown, legacy = [], [], []
    for rec in records:
        block, how = trained_under(rec, path, root) if path else (None, "no study file")
        if block is None:
            unknown.append(rec.get("run_id", "?"))
        elif block != study.registration_sha256:
            changed.append(rec.get("run_id", "?"))
        if how != "recorded":
            legacy.append(rec.get("run_id", "?"))
    registered = bool(commit and runs and before and not changed and not unknown)
    return {
        "registered": registered,
        "commit": commit,
        "run_commits": sorted(runs),
        "later": later,
        "changed": changed,
        "unknown": unknown,
        "legacy": legacy,
    }


def _listed(runs: list[str]) -> str:
    return ", ".join(runs[:6]) + (f" and {len(runs) - 6} more" if len(runs) > 6 else "")


def _commit_line(study: Study, records: list[dict[str, Any]]) -> str:
    check = integrity(study, records)
    commit = check["commit"]
    if commit is None:
        return "- committed: no commit of the study file holds this registration, so it does not predate the runs"
    shown = f"{commit[:10]}"
    problems = []
    if check["later"]:
        problems.append(f"it is NOT an ancestor of the runs' commits {', '.join(c[:10] for c in check['later'])}")
    if check["changed"]:
        problems.append(
            f"the block was edited after runs {_listed(check['changed'])} were trained (they were trained under "
            f"another block than this one, sha256 {study.registration_sha256[:12]})"
        )
    if check["unknown"]:
        problems.append(f"runs {_listed(check['unknown'])} record no block and their tree cannot tell which")
    if not check["run_commits"]:
        return f"- committed: {shown}; the runs record no commit to check it against"
    if problems:
        return f"- committed: {shown}, but {'; '.join(problems)}: not registered before every run"
    how = (
        "each run recorded it"
        if not check["legacy"]
        else f"{len(check['legacy'])} run(s) trained before runs recorded it match the block at their clean commit"
    )
    return (
        f"- committed: {shown}, an ancestor of every commit the runs were trained from "
        f"({', '.join(c[:10] for c in check['run_commits'])}), and every run was trained under this block "
        f"(sha256 {study.registration_sha256[:12]}; {how}): registered before the runs"
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
