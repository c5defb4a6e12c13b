"""Faults of a user's own making, met through the CLI: each is one line naming the file or field
and what to do, with exit code 2 and no traceback, and no file of the user's is deleted.

Like tests/test_bad_inputs.py, each case is one command on a copy of the prepared pico study
after an optional change; a case may also inject a failure the tests cannot cause for real (they
run as root, which ignores permission bits, on a disk that is not full).
"""

from __future__ import annotations

import errno
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from pico_study import MODEL_FILE, RUN, RUNDIR, STUDY
from pico_study import cli as _cli
from test_bad_inputs import DATA, TRAIN, garble_line, remove, set_yaml, truncate, write

from harness.train import checkpoint, run_lock

# --- changes a case makes before its command --------------------------------------------------


def steps(*changes: Callable[[Path], None]) -> Callable[[Path], None]:
    def change(root: Path) -> None:
        for c in changes:
            c(root)

    return change


def exported_then(rel: str, content: bytes) -> Callable[[Path], None]:
    """An earlier export of the run, then a file of the user's put in its folder."""

    def change(root: Path) -> None:
        code, err = _cli("export", STUDY, "--run", RUN, "--results", "results")
        assert code == 0, err
        (root / rel).write_bytes(content)

    return change


def models_glob(pattern: str) -> Callable[[Path], None]:
    """``models:`` given as an absolute glob pattern under the study folder."""
    return lambda root: set_yaml(STUDY, "models", [{"config": str(root / pattern)}])(root)


def measured(content: bytes) -> Callable[[Path], None]:
    return write(f"{RUNDIR}/measure.json", content)


def no_previous(root: Path) -> None:
    for name in ("checkpoint.prev.pt", "checkpoint.prev.pt.sha256"):
        (root / RUNDIR / name).unlink(missing_ok=True)  # a finished run keeps none


# --- failures injected where the tests cannot cause them --------------------------------------


def mkstemp_fails(code: int, text: str) -> Callable[[pytest.MonkeyPatch], None]:
    """Every atomic write refused by the OS (a read-only or unwritable results folder)."""

    def patch(mp: pytest.MonkeyPatch) -> None:
        def refuse(*args, dir=None, **kwargs):
            raise OSError(code, text, str(dir))

        mp.setattr("harness.core.io.tempfile.mkstemp", refuse)

    return patch


def safetensors_full(mp: pytest.MonkeyPatch) -> None:
    """safetensors' own error for a full disk, as save_pretrained meets it."""
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
        )

    mp.setattr("transformers.modeling_utils.safe_save_file", full)


@dataclass
class Case:
    id: str
    change: Callable[[Path], None] | None
    argv: list[str]  # run in the study folder as given (no --results added)
    names: list[str]  # each must appear in the one line
    code: int = 2
    patch: Callable[[pytest.MonkeyPatch], None] | None = None
    created: set[str] = field(default_factory=set)  # paths a refusal may leave (none by default)
    unfinished: bool = False  # the run is still to finish: its record.json is removed first


R = ["--results", "results"]
EXPORT = ["export", STUDY, "--run", RUN, *R]
MEASURE = ["measure", STUDY, "--run", RUN, *R]
BIG = "dense-pico_6e12_s0"  # the pico model at a budget its corpus cannot feed once
MATCH = ["match", MODEL_FILE, "--experts", "4", "--top-k", "2"]

CASES = [
    # 3. A user's files are never deleted or overwritten.
    Case(
        "export-into-earlier-export-with-a-users-file",
        exported_then(f"results/pico/export/{RUN}/notes.txt", b"mine"),
        EXPORT,
        [f"export/{RUN}", "notes.txt", "no earlier export wrote", "--out"],
    ),
    Case("export-out-is-a-file", None, [*EXPORT, "--out", MODEL_FILE], [MODEL_FILE, "is a file", "--out"]),
    Case("match-out-is-a-folder", None, [*MATCH, "--out", "corpus"], ["--out", "corpus is a folder", "corpus/"]),
    Case(
        "match-out-is-a-users-file",
        write("mine.yaml", b"# my notes\n"),
        [*MATCH, "--out", "mine.yaml"],
        ["--out", "mine.yaml", "left as it is", "--force"],
    ),
    Case(
        "measure-out-is-a-users-file",
        write("mine.json", b"[1, 2]\n"),
        [*MEASURE, "--out", "mine.json"],
        ["--out", "mine.json", "not a harness measure result", "--force"],
    ),
    Case("evaluate-out-is-a-folder", None, ["evaluate", STUDY, "--run", RUN, *R, "--out", "corpus"], ["--out"]),
    # 6. Faults that were tracebacks.
    Case(
        "train-budget-past-the-corpus",
        set_yaml(STUDY, "budgets", [6e12]),
        ["train", STUDY, "--run", BIG, "--quiet", *R],
        [STUDY, "data.allow_repetition", "train split holds", "use more data"],
    ),
    Case(
        "train-seq-len-past-the-validation-split",
        steps(
            set_yaml(STUDY, "budgets", [6e12]),
            set_yaml(STUDY, "data.allow_repetition", True),
            set_yaml(STUDY, "recipe.seq_len", 4096),
        ),
        ["train", STUDY, "--run", BIG, "--quiet", *R],
        [STUDY, "recipe.seq_len", "validation split", "data.validation_fraction", "harness data"],
    ),
    Case(
        "train-vocab-changed-after-data",
        set_yaml(STUDY, "data.vocab_size", 600),
        [*TRAIN, *R],
        [STUDY, "data.vocab_size", "512 tokens", f"harness data {STUDY}"],
        unfinished=True,
    ),
    Case(
        "tasks-tokenizer-deleted",
        remove(f"{DATA}/tokenizer.json"),
        ["tasks", STUDY, "--force", *R],
        ["tokenizer.json", "missing", f"harness data {STUDY}"],
    ),
    Case(
        "tasks-tokenizer-damaged",
        truncate(f"{DATA}/tokenizer.json", 0.3),
        ["tasks", STUDY, "--force", *R],
        ["tokenizer.json", "damaged", f"harness data {STUDY}"],
    ),
    Case(
        "train-results-read-only",
        None,
        [*TRAIN, *R],
        [RUNDIR, "read-only", "--results"],
        patch=mkstemp_fails(errno.EROFS, "Read-only file system"),
        unfinished=True,
    ),
    Case(
        "data-force-results-unwritable",
        None,
        ["data", STUDY, "--force", *R],
        [DATA, "permission denied", "--results"],
        patch=mkstemp_fails(errno.EACCES, "Permission denied"),
    ),
    Case(
        "data-results-is-a-file",
        None,
        ["data", STUDY, "--results", MODEL_FILE],
        [MODEL_FILE, "a file is where a folder belongs", "move the file aside"],
    ),
    Case(
        "export-disk-full-in-safetensors",
        None,
        EXPORT,
        [f"export/{RUN}", "disk is full", "free some space"],
        patch=safetensors_full,
    ),
    Case(
        "train-tensorboard-is-a-file",
        steps(set_yaml(STUDY, "recipe.tensorboard", True), write(f"{RUNDIR}/tensorboard", b"")),
        [*TRAIN, "--restart", *R],
        [f"{RUNDIR}/tensorboard", "a file is where", "move the file aside", "recipe.tensorboard"],
    ),
    Case(
        "models-absolute-glob-matching-nothing",
        models_glob("nothing-*.yaml"),
        ["plan", STUDY, *R],
        [STUDY, "models[0].config", "nothing-*.yaml", "matches no file"],
    ),
    Case(
        "data-paths-with-python-stdlib",
        set_yaml(STUDY, "data.source", "python-stdlib"),
        ["plan", STUDY, *R],
        [STUDY, "data.paths", "'python-stdlib'", "remove data.paths"],
    ),
    Case(
        "data-hf-dataset-with-files",
        set_yaml(STUDY, "data.hf_dataset", "some/dataset"),
        ["plan", STUDY, *R],
        [STUDY, "data.hf_dataset", "'hf'"],
    ),
    # 7. Errors that name the remedy.
    Case(
        "from-previous-without-a-previous-checkpoint",
        no_previous,
        [*TRAIN, "--from-previous", *R],
        ["checkpoint.prev.pt", "no previous checkpoint", "checkpoint.pt verifies", "--restart"],
        unfinished=True,
    ),
    Case(
        "export-after-checkpoint-deleted",
        remove(f"{RUNDIR}/checkpoint.pt"),
        EXPORT,
        ["checkpoint.pt is gone", "record.json says the run finished", f"--run {RUN} --restart"],
    ),
    Case(
        "measure-after-checkpoint-deleted",
        remove(f"{RUNDIR}/checkpoint.pt"),
        MEASURE,
        ["checkpoint.pt is gone", "record.json says the run finished", f"--run {RUN} --restart"],
    ),
    Case(
        "evaluate-after-checkpoint-deleted",
        remove(f"{RUNDIR}/checkpoint.pt"),
        ["evaluate", STUDY, "--run", RUN, *R],
        ["checkpoint.pt is gone", "--restart"],
    ),
    Case(
        "report-finished-record-truncated",
        truncate(f"{RUNDIR}/record.json", 0.5),
        ["report", STUDY, *R],
        ["record.json", "not valid JSON", f"harness train {STUDY} --run {RUN}`", "without training"],
    ),
    Case(
        "train-metrics-garbage-line-mid-run",
        garble_line(f"{RUNDIR}/metrics.jsonl", 2),
        [*TRAIN, *R],
        ["metrics.jsonl", "line 3", "delete that line", "one point", "--restart"],
        unfinished=True,
    ),
    Case(
        "report-measure-truncated",
        measured(b'{"train": {"tokens_per_s_median": 1'),
        ["report", STUDY, *R],
        ["measure.json", "not valid JSON", f"harness measure {STUDY} --run {RUN} --force"],
    ),
]


def _snapshot(root: Path) -> dict[str, bytes | None]:
    """Every file and folder under ``root`` with its content, less the runs' lock files: each
    names who took the lock last (harness.train.run_lock), so every verb that reads a run rewrites it."""
    paths = [p for p in root.rglob("*") if p.name != run_lock.NAME]
    return {p.relative_to(root).as_posix(): p.read_bytes() if p.is_file() else None for p in paths}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_a_users_fault_is_one_line_with_the_remedy(case: Case, study: Path, monkeypatch):
    monkeypatch.chdir(study)
    threads = torch.get_num_threads()
    if case.unfinished:
        (study / RUNDIR / "record.json").unlink()
    if case.change is not None:
        case.change(study)
    if case.patch is not None:
        case.patch(monkeypatch)
    before = _snapshot(study)
    code, err = _cli(*case.argv)
    torch.set_num_threads(threads)
    assert code == case.code, err
    assert "Traceback" not in err, err
    # One error line, the last (a library's progress bar may come before it).
    lines = [line for line in err.splitlines() if line.strip()]
    assert [line for line in lines if ": error: " in line] == lines[-1:], err
    assert lines[-1].startswith(f"harness {case.argv[0]}: error: "), err
    for name in case.names:
        assert name in lines[-1], (name, err)
    after = _snapshot(study)
    assert not [p for p in after if p.endswith(".tmp")], after
    assert after.keys() - before.keys() <= case.created, sorted(after.keys() - before.keys())
    gone = [p for p in before if p not in after]
    changed = [p for p in before if p in after and before[p] is not None and after[p] != before[p]]
    assert not gone and not changed, (gone, changed)  # nothing of the user's deleted or rewritten


# --- the remedies work, and the wider rules hold ------------------------------------------------


def test_an_absolute_glob_in_models_takes_every_match(study: Path, monkeypatch):
    monkeypatch.chdir(study)
    models_glob("mod*.yaml")(study)
    code, out, err = _cli_output("plan", STUDY, "--json", *R)
    assert code == 0, err
    assert [row["run_id"] for row in json.loads(out)] == [RUN]


def test_a_metrics_line_deleted_as_told_lets_the_run_resume(study: Path, monkeypatch):
    monkeypatch.chdir(study)
    run_dir = study / RUNDIR
    final = json.loads((run_dir / "record.json").read_text())["final_val_loss"]
    (run_dir / "record.json").unlink()
    garble_line(f"{RUNDIR}/metrics.jsonl", 2)(study)
    code, err = _cli(*TRAIN, *R)
    assert code == 2 and "delete that line" in err, err
    lines = (run_dir / "metrics.jsonl").read_text().splitlines(keepends=True)
    (run_dir / "metrics.jsonl").write_text("".join(lines[:2] + lines[3:]))
    code, err = _cli(*TRAIN, *R)
    assert code == 0, err
    assert json.loads((run_dir / "record.json").read_text())["final_val_loss"] == pytest.approx(final, rel=1e-6)


def test_an_earlier_export_without_a_manifest_is_replaced_but_a_users_file_refused(study: Path, monkeypatch):
    """An export written before the manifest: the files such an export writes are replaced."""
    from harness.evaluate.export import MANIFEST

    monkeypatch.chdir(study)
    out = study / "results" / "pico" / "export" / RUN
    exported_then(f"results/pico/export/{RUN}/{MANIFEST}", b"")(study)
    (out / MANIFEST).unlink()
    code, err = _cli(*EXPORT)
    assert code == 0, err
    assert json.loads((out / MANIFEST).read_text())["files"]
    (out / MANIFEST).unlink()
    (out / "notes.txt").write_text("mine")
    code, err = _cli(*EXPORT)
    assert code == 2 and "notes.txt" in err and (out / "notes.txt").read_text() == "mine"


def test_the_reference_keeps_a_users_file_in_a_run_no_longer_planned(study: Path):
    from harness.analysis.reproduce import keep_reference

    dest = study / "results" / "reference" / "cpu" / "pico"
    old = dest / "runs" / "old-run_1e9_s0"
    old.mkdir(parents=True)
    (old / "record.json").write_text("{}")
    (old / "notes.txt").write_text("mine")
    keep_reference(study / "results" / "pico", [RUN], dest)
    assert not (old / "record.json").exists() and (old / "notes.txt").read_text() == "mine"
    (old / "notes.txt").unlink()
    keep_reference(study / "results" / "pico", [RUN], dest)
    assert not old.exists(), "a run folder left empty goes"


FAILURES = [
    ("permission", PermissionError(errno.EACCES, "Permission denied", "/r/x.json"), ["/r/x.json", "permission"]),
    ("read-only", OSError(errno.EROFS, "Read-only file system", "/r/x.json"), ["/r/x.json", "read-only"]),
    ("no-space", OSError(errno.ENOSPC, "No space left on device", "/"), ["disk is full", "free some space"]),
    ("quota", OSError(errno.EDQUOT, "Disk quota exceeded", "/"), ["quota", "free some space"]),
    ("is-a-folder", IsADirectoryError(errno.EISDIR, "Is a directory", "/r/x"), ["/r/x", "a folder is where"]),
    ("not-a-folder", NotADirectoryError(errno.ENOTDIR, "Not a directory", "/r/x"), ["/r/x", "a file is where"]),
    ("torch-no-space", RuntimeError("[enforce fail] No space left on device"), ["disk is full"]),
    ("library-read-only", Exception("Read-only file system (os error 30)"), ["read-only"]),
]


@pytest.mark.parametrize("failure,names", [(f, n) for _, f, n in FAILURES], ids=[i for i, _, _ in FAILURES])
def test_an_os_refusal_anywhere_is_one_line(failure, names, monkeypatch):
    import harness.cli.count as count

    def refuse(path):
        raise failure

    monkeypatch.setattr(count, "load_config", refuse)
    code, err = _cli("count", "x.yaml")
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for name in names:
        assert name in err, (name, err)


def test_a_checkpoint_write_over_quota_says_so(tmp_path, monkeypatch):
    def over_quota(obj, f, *a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:626] . Disk quota exceeded")

    monkeypatch.setattr(torch, "save", over_quota)
    with pytest.raises(Exception, match=r"checkpoint\.pt: the disk quota is used up"):
        checkpoint.save_checkpoint({"model": {"w": torch.zeros(10)}}, tmp_path / "checkpoint.pt")
    assert list(tmp_path.iterdir()) == []


def _cli_output(*argv: str):
    from pico_study import cli_output

    return cli_output(*argv)
