"""The two CIs run one recipe, the GitHub artifact holds the results but no checkpoints or token
data, and the job summary is the report's at-a-glance table, claims and reproduction
(harness.report.summary), failing when a loss, bits-per-byte or accuracy number does not reproduce.

The workflow itself is linted by actionlint in `make test`; here, what actionlint cannot know.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from harness.core.errors import HarnessError
from harness.report.summary import main as summary_main
from harness.report.summary import sections

ROOT = Path(__file__).resolve().parents[1]
CI_RUN = ROOT / ".ci" / "run"
WORKFLOW = ROOT / ".github" / "workflows" / "ci.yml"
RUN = "moe-d64-e16k2_7e12_s0"


def make_commands(script: str) -> list[str]:
    """Each `make TARGET [VAR=VALUE ...]` of a shell script, one per line, options and whatever
    follows a redirection or another command left out: `make summary STUDY=tiny >> FILE` gives
    "summary STUDY=tiny"."""
    out = []
    for line in script.splitlines():
        words = shlex.split(line, comments=True)
        if not words or words[0] != "make":
            continue
        args = []
        for word in words[1:]:
            if re.match(r"\d*[<>|&;]", word):
                break
            if not word.startswith("-"):
                args.append(word)
        out.append(" ".join(args))
    return out


def workflow() -> dict:
    return yaml.safe_load(WORKFLOW.read_text())


def steps() -> list[dict]:
    (job,) = workflow()["jobs"].values()
    return job["steps"]


def upload_step() -> dict:
    (step,) = [s for s in steps() if s.get("uses", "").startswith("actions/upload-artifact@")]
    return step


# --- one recipe -----------------------------------------------------------------------------


def test_workflow_runs_the_make_targets_of_ci_run_in_the_same_order():
    local = make_commands(CI_RUN.read_text())
    github = [cmd for step in steps() if "run" in step for cmd in make_commands(step["run"])]
    assert local[:2] == ["test", "test-slow"], local
    assert "study STUDY=tiny" in local and "test-cluster" in local, local
    assert local.index("bench-smoke") == local.index("study STUDY=tiny") + 1, local
    assert github == local


def test_every_target_ci_calls_is_in_the_makefile():
    makefile = (ROOT / "Makefile").read_text()
    defined = set(re.findall(r"^([A-Za-z][\w-]*):", makefile, flags=re.M))
    called = {cmd.split()[0] for cmd in make_commands(CI_RUN.read_text())}
    assert called <= defined, f"not in the Makefile: {sorted(called - defined)}"


def test_summary_step_appends_to_the_job_summary():
    (step,) = [s for s in steps() if "run" in s and "summary STUDY=tiny" in make_commands(s["run"])]
    assert re.search(r'make summary STUDY=tiny >> "\$GITHUB_STEP_SUMMARY"', step["run"])


# --- the artifact ---------------------------------------------------------------------------
# upload-artifact reads `path:` with @actions/glob, and so does this matcher, within what the
# workflow uses: one pattern a line, `#` lines are comments, `!` excludes; the patterns apply in
# order, the last one that matches a file decides; a pattern also matches everything below what
# it names (implicit descendants), and one with a trailing `/` names a directory only. Within a
# pattern (minimatch with dot: true), `**` as a whole segment matches any number of segments,
# none included, `*` any run of characters but `/`, and `?` one such character. Anything else
# special to minimatch (brackets, braces, extglobs) is refused rather than guessed. Hidden files
# and folders are left out, as upload-artifact does unless include-hidden-files is set.


def glob_regex(pattern: str) -> re.Pattern:
    segments = pattern.split("/")
    rx = ""
    for i, seg in enumerate(segments):
        last = i == len(segments) - 1
        if seg == "**":
            rx += ".*" if last else "(?:[^/]+/)*"
            continue
        if re.search(r"[\[\]{}()+@!]", seg):
            raise ValueError(f"{pattern!r}: this matcher knows only *, ? and **")
        rx += "".join("[^/]*" if c == "*" else "[^/]" if c == "?" else re.escape(c) for c in seg)
        rx += "" if last else "/"
    return re.compile(rx + r"\Z")


def uploaded(path_input: str, files: list[str]) -> set[str]:
    """The files (paths relative to the workspace) that `path: path_input` uploads."""
    rules = []
    for line in path_input.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.removeprefix("!")
        directory_only = pattern.endswith("/")
        pattern = pattern.rstrip("/")
        itself = [] if directory_only else [glob_regex(pattern)]
        below = [] if pattern.endswith("/**") else [glob_regex(pattern + "/**")]
        rules.append((negate, itself + below))
    kept = set()
    for f in files:
        if any(part.startswith(".") for part in f.split("/")):
            continue
        state = False
        for negate, regexes in rules:
            if any(rx.match(f) for rx in regexes):
                state = not negate
        if state:
            kept.add(f)
    return kept


@pytest.mark.parametrize(
    ("pattern", "path", "matches"),
    [
        ("a/**/*.pt", "a/x.pt", True),
        ("a/**/*.pt", "a/b/c/x.pt", True),
        ("a/**/*.pt", "a/x.pth", False),
        ("a/**/*.pt", "b/a/x.pt", False),
        ("a/*.json", "a/b/x.json", False),
        ("a/?.md", "a/r.md", True),
        ("a/*", "a/.hidden", True),
    ],
)
def test_glob_matcher(pattern, path, matches):
    assert bool(glob_regex(pattern).match(path)) is matches


# The names of a results/<study> folder after `make study` and `make snakemake-report`, as in
# results/tiny.
KEEP = [
    "report.md",
    "report.html",
    "report.png",
    "snakemake_report.html",
    "summary.json",
    "tables/main.csv",
    "tables/main.html",
    "tables/claims.csv",
    "figures/isoflop.png",
    "figures/loss_vs_params.png",
    "report_sections/01-at-a-glance.html",
    "report_sections/front.html",
    "microbench/moe_ffn.json",
    "benchmarks/report.tsv",
    f"benchmarks/train/{RUN}.tsv",
    f"logs/train/{RUN}.log",
    "logs/report.log",
    *(f"runs/{RUN}/{name}" for name in ("record.json", "measure.json", "eval.json", "metrics.jsonl")),
    *(f"runs/{RUN}/{name}" for name in ("routing.json", "identity.json", "config.yaml")),
]
LEAVE = [
    f"runs/{RUN}/checkpoint.pt",
    f"runs/{RUN}/checkpoint.pt.sha256",
    f"runs/{RUN}/checkpoint.prev.pt",
    f"runs/{RUN}/checkpoint.prev.pt.sha256",
    "data/train.bin",
    "data/validation.bin",
    "data/test.bin",
    "data/tokenizer.json",
    "data/data.json",
    "data/tasks/heldout_ppl.jsonl",
    "data/tasks/tasks.json",
]


def test_artifact_holds_the_results_but_no_checkpoints_or_data(tmp_path):
    results = tmp_path / "results"
    for name in KEEP + LEAVE:
        (results / "tiny" / name).parent.mkdir(parents=True, exist_ok=True)
        (results / "tiny" / name).write_text("x")
    elsewhere = ["results/cpu/report.md", "results/reference/cpu/tiny/report.md"]
    for name in elsewhere:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    files = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())

    got = uploaded(upload_step()["with"]["path"], files)
    assert got == {f"results/tiny/{name}" for name in KEEP}
    assert not any(f.endswith((".pt", ".sha256")) or "/data/" in f for f in got)


def test_artifact_settings_and_readme():
    step = upload_step()
    assert step["with"]["if-no-files-found"] == "error"
    assert int(step["with"]["retention-days"]) > 0
    assert "steps.study.outcome" in step["if"] and "!cancelled()" in step["if"]
    assert f"`{step['with']['name']}`" in (ROOT / "README.md").read_text(), "the README names the artifact"


# --- the job summary ------------------------------------------------------------------------

REPORT = """# Study `tiny`

A study.

## At a glance

Each MoE against its dense run.

| MoE | vs dense |
|---|---|
| moe-d64-e8k2 | dense-d64 |

```
## Runs (in a code block: not a heading)
```

## Claims

### Protocol

| expectation | verdict |
|---|---|
| MoE is better | supported |

## Runs

| run |
|---|

## Reproduction

Against `results/reference/cpu/tiny/summary.json`: 3 of 4 numbers reproduced within tolerance.

| run   | metric                | this run   | reference   | tolerance     | reproduced   |
|-------|-----------------------|------------|-------------|---------------|--------------|
| moe-a | val loss MoE - dense (vs dense-a) | -0.0488 | -0.0488 | 0.005 absolute | yes |
| dense-a | final_val_loss      | 2.761      | 2.761       | 1% relative   | yes          |
| dense-a | bits_per_byte       | 1.854      | 1.854       | 1% relative   | yes          |
| dense-a | train_tokens_per_s  | 2.1e+04    | 3.459e+04   | 30% relative  | NO           |

## Manifest
"""


def test_summary_is_glance_claims_and_reproduction():
    got = sections(REPORT)
    assert got.startswith("## At a glance\n\nEach MoE")
    assert re.findall(r"^##? .*", got, flags=re.M) == [
        "## At a glance",
        "## Runs (in a code block: not a heading)",
        "## Claims",
        "## Reproduction",
    ]
    assert "\n\n## Claims\n\n### Protocol\n" in got
    assert "| moe-d64-e8k2 | dense-d64 |" in got and "| MoE is better | supported |" in got
    assert "## Runs (in a code block" in got, "a fenced block is part of its section"
    assert "| run |" not in got and "# Study" not in got and "A study." not in got
    assert "| dense-a | train_tokens_per_s  | 2.1e+04" in got and "## Manifest" not in got
    assert got.endswith("| 30% relative  | NO           |\n")


def test_summary_names_the_file_and_the_missing_section(tmp_path, capsys):
    report = tmp_path / "results" / "tiny" / "report.md"
    report.parent.mkdir(parents=True)
    report.write_text(REPORT.replace("## Claims", "## Verdicts"))
    with pytest.raises(HarnessError, match=r"report\.md: no section `## Claims` .*: At a glance, Verdicts, Runs, Repr"):
        sections(report.read_text(), source=report)

    assert summary_main([str(report)]) == 2
    err = capsys.readouterr().err
    assert str(report) in err and "`## Claims`" in err

    assert summary_main([str(tmp_path / "nowhere.md")]) == 2
    assert "nowhere.md does not exist" in capsys.readouterr().err


def test_summary_command_prints_markdown(tmp_path, capsys):
    report = tmp_path / "report.md"
    report.write_text(REPORT)
    assert summary_main([str(report)]) == 0
    assert capsys.readouterr().out == sections(REPORT)


def test_summary_of_a_missing_study_names_it_and_the_studies_there_are(tmp_path, monkeypatch, capsys):
    (tmp_path / "workflows" / "studies").mkdir(parents=True)
    for name in ("alpha", "beta"):
        (tmp_path / "workflows" / "studies" / f"{name}.yaml").write_text("name: x\n")
    (tmp_path / "results" / "beta").mkdir(parents=True)
    (tmp_path / "results" / "beta" / "report.md").write_text(REPORT)
    monkeypatch.chdir(tmp_path)
    assert summary_main(["results/nope/report.md"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "report_summary: error: results/nope/report.md does not exist: there is no study 'nope' in "
        "workflows/studies/ (studies: alpha, beta; with a report in results: beta)\n"
    )
    assert summary_main(["results/alpha/report.md"]) == 2
    assert "study 'alpha' has no report yet; `make study STUDY=alpha` runs it\n" in capsys.readouterr().err


def test_make_summary_of_a_missing_study_fills_in_its_name():
    done = subprocess.run(
        ["make", "--no-print-directory", "summary", "STUDY=nope"], cwd=ROOT, capture_output=True, text=True
    )
    said = done.stderr.splitlines()
    assert done.returncode != 0 and "STUDY=..." not in done.stderr
    assert said[0].startswith("report_summary: error: results/nope/report.md does not exist: there is no study 'nope'")
    assert "studies: cpu, " in said[0] and "tiny" in said[0]


# --- the reproduction check -----------------------------------------------------------------


def test_reproduction_check_passes_with_throughput_annotated_only(tmp_path, capsys):
    report = tmp_path / "report.md"
    report.write_text(REPORT)
    assert summary_main([str(report), "--check-reproduction"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(sections(REPORT))
    assert "**Reproduction check: passed.** 3 of 3 loss, bits-per-byte and accuracy numbers reproduced" in out
    assert (
        "annotated only (shared runners are noisy): 0 of 1 within its band; outside: `dense-a` train_tokens_per_s"
        in out
    )


@pytest.mark.parametrize(
    ("metric", "row"),
    [
        (
            "final_val_loss",
            "| dense-a | final_val_loss      | 2.861      | 2.761       | 1% relative   | NO           |",
        ),
        (
            "bits_per_byte",
            "| dense-a | bits_per_byte       | 1.954      | 1.854       | 1% relative   | NO           |",
        ),
        ("code_mc_acc_norm", "| dense-a | code_mc_acc_norm | 0.2 | 0.33 | 0.05 absolute | NO |"),
        (
            "val loss MoE - dense",
            "| moe-a | val loss MoE - dense (vs dense-a) | -0.01 | -0.0488 | 0.005 absolute | NO |",
        ),
    ],
)
def test_reproduction_check_fails_on_a_loss_bpb_or_accuracy_row(tmp_path, capsys, metric, row):
    lines = REPORT.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("| dense-a | final_val_loss"))
    report = tmp_path / "report.md"
    report.write_text("\n".join([*lines[:at], row, *lines[at:]]) + "\n")
    assert summary_main([str(report)]) == 0, "without the flag it only prints"
    capsys.readouterr()
    assert summary_main([str(report), "--check-reproduction"]) == 1
    captured = capsys.readouterr()
    assert "**Reproduction check: FAILED.** 1 of 4 loss, bits-per-byte and accuracy numbers did not reproduce" in (
        captured.out
    )
    assert metric in captured.err and str(report) in captured.err and "FAILED" in captured.err


def test_reproduction_check_without_a_reference_passes(tmp_path, capsys):
    report = tmp_path / "report.md"
    lines = REPORT.split("## Reproduction")
    report.write_text(lines[0] + "## Reproduction\n\nNo committed reference for `tiny` on `cpu`.\n\n## Manifest\n")
    assert summary_main([str(report), "--check-reproduction"]) == 0
    assert "**Reproduction check: nothing to compare**" in capsys.readouterr().out


def test_summary_target_checks_reproduction_and_ci_goes_on_after_it():
    makefile = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^summary:\n((?:\t.*\n)+)", makefile, flags=re.M)[1]
    assert "--check-reproduction" in recipe
    script = CI_RUN.read_text()
    assert re.search(r"^make summary STUDY=tiny \|\| reproduced=no$", script, flags=re.M)
    assert script.rstrip().endswith("exit 1\nfi") and 'if [ "$reproduced" != yes ]' in script
    names = [s.get("name", "") for s in steps()]
    after = steps()[next(i for i, n in enumerate(names) if n.startswith("at-a-glance")) + 1 :]
    for step in after:
        assert "!cancelled()" in step.get("if", ""), f"{step.get('name')}: must run after a failed reproduction"


@pytest.mark.slow
def test_make_summary_passes_on_the_reference_and_fails_with_one_loss_perturbed(tmp_path):
    """A tmp copy of the committed tiny reference as a study's results beside that reference:
    its report reproduces; with one run's validation loss moved by 2%, `make summary` exits 1."""
    import json
    import os
    import subprocess
    import sys

    from harness.cli import main as harness

    reference = ROOT / "results" / "reference" / "cpu" / "tiny"
    results = tmp_path / "results"
    shutil.copytree(reference, results / "reference" / "cpu" / "tiny")
    shutil.copytree(reference, results / "tiny")

    def make_summary() -> subprocess.CompletedProcess:
        assert harness(["report", "tiny", "--results", str(results)]) == 0
        env = os.environ | {"PYTHONPATH": str(ROOT)}
        return subprocess.run(
            ["make", "-s", "-f", str(ROOT / "Makefile"), "summary", "STUDY=tiny", f"PYTHON={sys.executable}"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )

    done = make_summary()
    assert done.returncode == 0, done.stderr
    assert "## Reproduction" in done.stdout and "**Reproduction check: passed.**" in done.stdout

    record = results / "tiny" / "runs" / "dense-d64_7e12_s0" / "record.json"
    data = json.loads(record.read_text())
    data["final_val_loss"] *= 1.02
    record.write_text(json.dumps(data))
    done = make_summary()
    assert done.returncode != 0
    assert "**Reproduction check: FAILED.**" in done.stdout
    assert "`dense-d64_7e12_s0` final_val_loss" in done.stdout and "final_val_loss" in done.stderr
    assert "val loss MoE - dense" in done.stdout.split("FAILED")[1], "the per-seed difference moved too"
