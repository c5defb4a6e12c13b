"""A damaged or misplaced result file, met by the command a user runs: one line naming the file
(and the field) and what to do, exit code 2, no traceback, nothing changed.

Each case is one change to a copy of the prepared pico study (data, one trained run) and one
command run as a user runs it, in a subprocess: a run's record.json (a field renamed, of another
type, a list for an object, another run's or another study's record in its folder), its
metrics.jsonl, data/data.json, data/corpus.json and a report.md read by `make summary`. The
remedies the messages offer are then run as typed, and the command that refused works again.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pico_study import RUN, RUNDIR, STUDY, cli
from verb_subprocess import assert_one_line, assert_unchanged, run_verb, snapshot

pytestmark = pytest.mark.slow  # each case runs a verb as a subprocess on a trained study

RESULTS = ["--results", "results"]
RECORD, METRICS = f"{RUNDIR}/record.json", f"{RUNDIR}/metrics.jsonl"
DATA, CORPUS, REPORT = "results/pico/data/data.json", "results/pico/data/corpus.json", "results/pico/report.md"
MOE = "dense-pico-e4k2_6e9_s0"
"""Another run of a pico study: an MoE of the dense model's size, as harness match names it."""
SUMMARY = ["harness.report.summary", REPORT, "--check-reproduction"]
"""`make summary STUDY=pico`'s command (the Makefile's summary target)."""
TRAIN = f"harness train {STUDY} --run {RUN}"

# --- changes a case makes before its command --------------------------------------------------


def edit_json(rel: str, edit: Callable[[dict], object]) -> Callable[[Path], None]:
    """Change the JSON object in ``rel`` with ``edit`` (which may return a new content)."""

    def change(root: Path) -> None:
        path = root / rel
        content = json.loads(path.read_text())
        new = edit(content)
        path.write_text(json.dumps(content if new is None else new, indent=2))

    return change


def edit_line(rel: str, index: int, edit: Callable[[dict], object]) -> Callable[[Path], None]:
    """Replace line ``index`` (from 0) of a JSON-lines file with ``edit(row)`` as JSON."""

    def change(root: Path) -> None:
        path = root / rel
        lines = path.read_text().splitlines(keepends=True)
        lines[index] = json.dumps(edit(json.loads(lines[index]))) + "\n"
        path.write_text("".join(lines))

    return change


def renamed(old: str, new: str) -> Callable[[dict], None]:
    return lambda d: d.update({new: d.pop(old)})


def the_moes(record: dict) -> None:
    """The record of the MoE of the dense run's size, as its own training writes it."""
    model = MOE.split("_")[0]
    record.update(run_id=MOE, model=model, arm="moe", experts=4, top_k=2, final_val_loss=record["final_val_loss"] - 0.1)
    record["config"] = record["config"] | {"name": model, "moe": {"experts": 4, "top_k": 2}}


def with_corpus_json(edit: Callable[[dict], object]) -> Callable[[Path], None]:
    """Write data/corpus.json as the workflow does when it starts, then change it with ``edit``."""

    def change(root: Path) -> None:
        from harness.data.corpus import sync_corpus
        from harness.study.spec import load_study

        sync_corpus(load_study(root / STUDY), root / "results" / "pico")
        edit_json(CORPUS, edit)(root)

    return change


@pytest.fixture(scope="module")
def reported(pristine, tmp_path_factory) -> str:
    """The pico study's report.md, with a Reproduction table (its own summary as the reference)."""
    from pico_study import copy_study

    root = copy_study(pristine, tmp_path_factory.mktemp("reported"))
    results = root / "results"
    args = ["report", str(root / STUDY), "--results", str(results)]
    assert cli(*args) == (0, "")
    reference = results / "reference" / "cpu" / "pico" / "summary.json"
    reference.parent.mkdir(parents=True)
    shutil.copyfile(results / "pico" / "summary.json", reference)
    assert cli(*args) == (0, "")
    text = (results / "pico" / "report.md").read_text()
    assert re.search(r"^\| dense-pico_6e9_s0 \| final_val_loss .*\| yes +\|$", text, flags=re.M)
    return text


def report_md(edit: Callable[[str], bytes]) -> Callable[[Path, str], None]:
    """Write report.md as harness report wrote it (``reported``), changed by ``edit``."""

    def change(root: Path, text: str) -> None:
        (root / REPORT).write_bytes(edit(text))

    return change


def cut_in_table(text: str) -> bytes:
    row = text.index(f"| {RUN} | final_val_loss")
    return text[: row + 40].encode()


def not_utf8(text: str) -> bytes:
    data = text.encode()
    return data[:200] + b"\xff\xfe" + data[202:]


def a_folder(root: Path, text: str) -> None:
    (root / REPORT).mkdir()


def row_without_verdict(text: str) -> bytes:
    return re.sub(r"^(\| dense-pico_6e9_s0 \| final_val_loss .*\|) yes +\|$", r"\1", text, flags=re.M).encode()


# --- the cases ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    id: str
    change: Callable
    argv: list[str]  # a module and its arguments, run as `python -m ...` in the study folder
    names: list[str]  # what the one line names: the file, the field, the remedy
    reported: bool = False  # change(root, report text): a case of report.md
    may_write: frozenset[str] = field(default_factory=frozenset)

    @property
    def prefix(self) -> str:
        return "report_summary: error: " if self.argv[0] == "harness.report.summary" else f"harness {self.argv[1]}: "


REMEDY = f"delete it and run `{TRAIN}`"
DATA_AGAIN = f"`harness data {STUDY} --force` prepares it again"
REPORT_AGAIN = "`harness report STUDY` writes it again (STUDY: the file of study 'pico')"
CASES = [
    Case(
        "record-field-renamed",
        edit_json(RECORD, renamed("final_val_loss", "final_loss")),
        ["harness", "report", STUDY, *RESULTS],
        [RECORD, "no field 'final_val_loss'", "'final_loss'", REMEDY, "--restart"],
    ),
    Case(
        "record-holds-a-list",
        edit_json(RECORD, lambda d: []),
        ["harness", "report", STUDY, *RESULTS],
        [RECORD, "a list, not the JSON object", REMEDY],
    ),
    Case(
        "moe-record-in-the-dense-folder",
        edit_json(RECORD, the_moes),
        ["harness", "report", STUDY, *RESULTS],
        [RECORD, f"the record of run {MOE}, not of {RUN}", REMEDY],
    ),
    Case(
        "record-of-another-study",
        edit_json(RECORD, lambda d: d.update(study="cpu")),
        ["harness", "plan", STUDY, *RESULTS],
        [RECORD, "the record of study 'cpu', not of 'pico'", REMEDY],
    ),
    Case(
        "record-loss-a-string",
        edit_json(RECORD, lambda d: d.update(final_val_loss="4.79")),
        ["harness", "plan", STUDY, *RESULTS],
        [RECORD, "field 'final_val_loss' is a string '4.79', not a finite number", REMEDY],
    ),
    Case(
        "record-run-id-edited",
        edit_json(RECORD, lambda d: d.update(run_id=MOE)),
        ["harness", "measure", STUDY, "--run", RUN, *RESULTS],
        [RECORD, f"run_id '{MOE}' does not agree with its model, budget_flops and seed ('{RUN}')", REMEDY],
    ),
    Case(
        "evaluate-record-field-renamed",
        edit_json(RECORD, renamed("recipe", "settings")),
        ["harness", "evaluate", STUDY, "--run", RUN, *RESULTS],
        [RECORD, "no field 'recipe'", REMEDY],
    ),
    Case(
        "metrics-line-not-an-object",
        edit_line(METRICS, 3, lambda row: [row["step"], row["loss"]]),
        ["harness", "report", STUDY, *RESULTS],
        [METRICS, "line 4: it holds a list, not a JSON object", "delete that line", f"{TRAIN} --restart"],
    ),
    Case(
        "metrics-loss-a-string",
        edit_line(METRICS, 5, lambda row: row | {"loss": "high"}),
        ["harness", "report", STUDY, *RESULTS],
        [METRICS, "line 6: field 'loss' is a string 'high', not a finite number", f"{TRAIN} --restart"],
    ),
    Case(
        "metrics-of-a-finished-run-emptied",
        lambda root: (root / METRICS).write_text(""),
        ["harness", "report", STUDY, *RESULTS],
        [METRICS, "holds no rows, though record.json says the run finished", f"{TRAIN} --restart"],
    ),
    Case(
        "metrics-line-not-an-object-on-resume",
        lambda root: (edit_line(METRICS, 3, lambda row: 7)(root), (root / RECORD).unlink()),
        ["harness", "train", STUDY, "--run", RUN, "--threads", "1", *RESULTS],
        [METRICS, "line 4: it holds 7, not a JSON object", "delete that line"],
    ),
    Case(
        "data-json-holds-a-list",
        edit_json(DATA, lambda d: []),
        ["harness", "report", STUDY, *RESULTS],
        [DATA, "a list, not the JSON object data.json is", DATA_AGAIN],
    ),
    Case(
        "data-json-of-another-study",
        edit_json(DATA, lambda d: d.update(study="cpu")),
        ["harness", "plan", STUDY, *RESULTS],
        [DATA, "the data of study 'cpu', not of 'pico'", DATA_AGAIN],
    ),
    Case(
        "data-json-token-count-a-string",
        edit_json(DATA, lambda d: d["splits"]["train"].update(tokens="many")),
        ["harness", "measure", STUDY, "--run", RUN, *RESULTS],
        [DATA, "field 'splits.train.tokens' is a string 'many', not a whole number", DATA_AGAIN],
    ),
    Case(
        "corpus-json-fingerprint-edited",
        with_corpus_json(lambda d: d.update(fingerprint="0" * 64)),
        ["harness", "plan", STUDY, *RESULTS],
        [CORPUS, "its fingerprint 0000000000000000 is not that of the corpus files", "delete it", "snakemake"],
    ),
    Case(
        "report-cut-in-its-reproduction-table",
        report_md(cut_in_table),
        SUMMARY,
        [REPORT, "ends before its last section, `## Manifest`", REPORT_AGAIN],
        reported=True,
    ),
    Case(
        "report-reproduction-row-without-its-verdict",
        report_md(row_without_verdict),
        SUMMARY,
        [REPORT, "row 1 of the Reproduction table has 5 of its 6 cells", REPORT_AGAIN],
        reported=True,
    ),
    Case("report-not-utf8", report_md(not_utf8), SUMMARY, [REPORT, "not UTF-8 text (byte 0xff", REPORT_AGAIN], True),
    Case("report-a-folder", a_folder, SUMMARY, [REPORT, "a folder is where the report belongs", REPORT_AGAIN], True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_a_damaged_or_misplaced_file_is_one_line_naming_it_and_the_remedy(case: Case, study: Path, request):
    if case.reported:
        case.change(study, request.getfixturevalue("reported"))
    else:
        case.change(study)
    before = snapshot(study)
    done = run_verb(case.argv, study)
    line = assert_one_line(done, case.prefix, case.names)
    assert "does not exist" not in line and "nothing to do" not in line, line
    assert_unchanged(before, snapshot(study), case.may_write)


# --- the remedies, run as typed -------------------------------------------------------------------


def remedy(line: str) -> list[str]:
    """The first harness command the message offers, as words (STUDY: the study file)."""
    command = next(c for c in re.findall(r"`([^`]+)`", line) if c.startswith("harness "))
    return [STUDY if w == "STUDY" else w for w in shlex.split(command)]


def ok(argv: list[str], root: Path) -> str:
    done = run_verb(argv, root)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_a_damaged_record_deleted_as_told_is_written_again_without_training(study: Path):
    final = json.loads((study / RECORD).read_text())["final_val_loss"]
    edit_json(RECORD, renamed("final_val_loss", "final_loss"))(study)
    line = assert_one_line(run_verb(["harness", "report", STUDY, *RESULTS], study), "harness report: ", [RECORD])
    assert "delete it and run" in line
    (study / RECORD).unlink()
    ok([*remedy(line), "--threads", "1", *RESULTS], study)
    assert json.loads((study / RECORD).read_text())["final_val_loss"] == pytest.approx(final, rel=1e-6)
    ok(["harness", "report", STUDY, *RESULTS], study)


def test_a_finished_runs_deleted_log_is_written_again_by_the_remedy(study: Path):
    (study / METRICS).unlink()
    line = assert_one_line(
        run_verb(["harness", "report", STUDY, *RESULTS], study),
        "harness report: ",
        [METRICS, "is missing, though record.json says the run finished", "training curve", f"`{TRAIN} --restart`"],
    )
    command = remedy(line)
    assert command[-1] == "--restart", line
    ok([*command, "--threads", "1", *RESULTS], study)
    assert (study / METRICS).is_file() and (study / RECORD).is_file()
    ok(["harness", "report", STUDY, *RESULTS], study)


def test_another_studys_data_json_is_prepared_again_by_the_remedy(study: Path):
    edit_json(DATA, lambda d: d.update(study="cpu"))(study)
    line = assert_one_line(run_verb(["harness", "plan", STUDY, *RESULTS], study), "harness plan: ", [DATA])
    ok([*remedy(line), *RESULTS], study)
    assert json.loads((study / DATA).read_text())["study"] == "pico"
    out = ok(["harness", "plan", STUDY, *RESULTS], study)
    assert "1 of 1 run done" in out and "stale" not in out, out


def test_an_edited_corpus_json_deleted_as_told_is_no_corpus_change(study: Path):
    from harness.data.corpus import sync_corpus
    from harness.study.spec import load_study

    with_corpus_json(lambda d: d.update(fingerprint="0" * 64))(study)
    written = json.loads((study / CORPUS).read_text()) | {"fingerprint": None}
    line = assert_one_line(run_verb(["harness", "plan", STUDY, *RESULTS], study), "harness plan: ", [CORPUS])
    assert line.split("; ", 1)[1].startswith("delete it"), line
    (study / CORPUS).unlink()
    out = ok(["harness", "plan", STUDY, *RESULTS], study)
    assert "1 of 1 run done" in out and "not current" not in out and "stale" not in out, out
    again = sync_corpus(load_study(study / STUDY), study / "results" / "pico")  # what the workflow writes
    assert again["fingerprint"] != "0" * 64 and again | {"fingerprint": None} == written


def test_a_damaged_report_is_written_again_by_the_remedy(study: Path, reported: str):
    (study / REPORT).parent.mkdir(parents=True, exist_ok=True)
    (study / REPORT).write_bytes(not_utf8(reported))
    line = assert_one_line(run_verb(SUMMARY, study), "report_summary: error: ", [REPORT])
    ok([*remedy(line), *RESULTS], study)
    assert "Reproduction check" in ok(SUMMARY, study)
