"""Malformed inputs and damaged files, through the CLI as a user meets them.

Each case is one command on a copy of a prepared study (data, one trained run, tasks), after an
optional change to a file. Every case must exit with the stated code, print one line naming the
file and the field (or the step to run), print no traceback, and leave nothing half-written.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from pico_study import MODEL_FILE, RUN, RUNDIR, STUDY
from pico_study import cli as _cli

from harness.train import checkpoint

# --- changes a case makes before its command --------------------------------------------------


def set_yaml(name: str, dotted: str, value) -> Callable[[Path], None]:
    def change(root: Path) -> None:
        path = root / name
        data = yaml.safe_load(path.read_text())
        *parents, last = dotted.split(".")
        node = data
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
        path.write_text(yaml.safe_dump(data))

    return change


def raw_yaml(name: str, old: str, new: str) -> Callable[[Path], None]:
    """Edit the YAML text itself (for .inf/.nan, which safe_dump writes in its own way)."""

    def change(root: Path) -> None:
        path = root / name
        text = path.read_text()
        assert old in text, (old, text)
        path.write_text(text.replace(old, new, 1))

    return change


def write(rel: str, content: bytes) -> Callable[[Path], None]:
    return lambda root: (root / rel).write_bytes(content)


def truncate(rel: str, fraction: float) -> Callable[[Path], None]:
    def change(root: Path) -> None:
        path = root / rel
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * fraction)])

    return change


def scramble(rel: str) -> Callable[[Path], None]:
    def change(root: Path) -> None:
        path = root / rel
        size = path.stat().st_size
        path.write_bytes(np.random.default_rng(1).integers(0, 256, size, dtype=np.uint8).tobytes())

    return change


def remove(rel: str) -> Callable[[Path], None]:
    return lambda root: (root / rel).unlink()


def drop_key(rel: str, *keys: str) -> Callable[[Path], None]:
    def change(root: Path) -> None:
        path = root / rel
        data = json.loads(path.read_text())
        node = data
        for k in keys[:-1]:
            node = node[k]
        del node[keys[-1]]
        path.write_text(json.dumps(data))

    return change


def token_outside_vocab(root: Path) -> None:
    """A token id past the vocabulary, with data.json's checksum updated to match."""
    data = root / "results" / "pico" / "data"
    meta = json.loads((data / "data.json").read_text())
    tokens = np.fromfile(data / "train.bin", dtype=meta["dtype"])
    tokens[5] = 60000
    tokens.tofile(data / "train.bin")
    import hashlib

    meta["splits"]["train"]["sha256"] = hashlib.sha256(tokens.tobytes()).hexdigest()
    (data / "data.json").write_text(json.dumps(meta))


def garble_line(rel: str, index: int) -> Callable[[Path], None]:
    def change(root: Path) -> None:
        path = root / rel
        lines = path.read_text().splitlines(keepends=True)
        lines[index] = lines[index][: len(lines[index]) // 2] + "\n"
        path.write_text("".join(lines))

    return change


def fresh_results(root: Path) -> None:
    shutil.rmtree(root / "results")


def untrained(root: Path) -> None:
    shutil.rmtree(root / "results" / "pico" / "runs")


def in_corpus(name: str, content: bytes) -> Callable[[Path], None]:
    return lambda root: (root / "corpus" / name).write_bytes(content)


@dataclass
class Case:
    id: str
    change: Callable[[Path], None] | None
    argv: list[str]
    names: list[str]  # each must appear in stderr
    code: int = 2
    created: set[str] = field(default_factory=set)  # paths a refusal may leave (none by default)


DATA = "results/pico/data"
TRAIN = ["train", STUDY, "--run", RUN, "--quiet"]
COUNT = ["count", MODEL_FILE]
PLAN = ["plan", STUDY, "--json"]

CASES = [
    # Non-finite and out-of-range numbers in a model config (named by file and field).
    Case(
        "model-norm-eps-nan",
        raw_yaml(MODEL_FILE, "d_ff: 64", "d_ff: 64\nnorm_eps: .nan"),
        COUNT,
        ["norm_eps", "finite"],
    ),
    Case(
        "model-rope-inf",
        raw_yaml(MODEL_FILE, "d_ff: 64", "d_ff: 64\nrope_theta: .inf"),
        COUNT,
        ["rope_theta", "finite"],
    ),
    Case("model-init-std-neg-inf", raw_yaml(MODEL_FILE, "d_ff: 64", "d_ff: 64\ninit_std: -.inf"), COUNT, ["init_std"]),
    Case("model-d-model-inf", raw_yaml(MODEL_FILE, "d_model: 32", "d_model: .inf"), COUNT, ["d_model", "integer"]),
    Case("model-d-model-zero", set_yaml(MODEL_FILE, "d_model", 0), COUNT, ["d_model"]),
    Case("model-heads-string", set_yaml(MODEL_FILE, "n_heads", "two"), COUNT, ["n_heads", "integer"]),
    Case("model-unknown-key", set_yaml(MODEL_FILE, "hidden", 3), COUNT, ["hidden", "unknown key"]),
    Case(
        "model-capacity-inf",
        set_yaml(MODEL_FILE, "moe", {"experts": 4, "top_k": 2, "d_expert": 32, "capacity_factor": float("inf")}),
        COUNT,
        ["moe.capacity_factor", "finite"],
    ),
    Case(
        "model-lb-coef-nan",
        set_yaml(MODEL_FILE, "moe", {"experts": 4, "top_k": 2, "d_expert": 32, "load_balance_coef": float("nan")}),
        COUNT,
        ["moe.load_balance_coef", "finite"],
    ),
    Case(
        "model-topk-over-experts",
        set_yaml(MODEL_FILE, "moe", {"experts": 2, "top_k": 4, "d_expert": 32}),
        COUNT,
        ["top_k"],
    ),
    Case("model-not-mapping", write(MODEL_FILE, b"- 1\n- 2\n"), COUNT, [MODEL_FILE, "mapping"]),
    Case("model-bad-yaml", write(MODEL_FILE, b"d_model: [32\n"), COUNT, [MODEL_FILE, "not valid YAML"]),
    Case("model-empty", write(MODEL_FILE, b""), COUNT, [MODEL_FILE]),
    Case("model-missing", remove(MODEL_FILE), COUNT, [MODEL_FILE, "no such"]),
    Case("model-name-slash", set_yaml(MODEL_FILE, "name", "a/b"), COUNT, ["name"]),
    # Non-finite numbers and bad values in a study.
    Case("study-budget-inf", raw_yaml(STUDY, "- 6000000000.0", "- .inf"), PLAN, [STUDY, "budgets", "finite"]),
    Case("study-budget-nan", raw_yaml(STUDY, "- 6000000000.0", "- .nan"), PLAN, [STUDY, "budgets"]),
    Case("study-lr-nan", raw_yaml(STUDY, "batch_size: 4", "batch_size: 4\n  lr: .nan"), PLAN, ["recipe.lr", "finite"]),
    Case("study-lr-inf", raw_yaml(STUDY, "batch_size: 4", "batch_size: 4\n  lr: .inf"), PLAN, ["recipe.lr", "finite"]),
    Case(
        "study-warmup-nan",
        raw_yaml(STUDY, "batch_size: 4", "batch_size: 4\n  warmup_fraction: .nan"),
        PLAN,
        ["recipe.warmup_fraction"],
    ),
    Case("study-vocab-5e9", set_yaml(STUDY, "data.vocab_size", 5_000_000_000), PLAN, [STUDY, "data.vocab_size"]),
    Case(
        "study-valfrac-nan",
        raw_yaml(STUDY, "validation_fraction: 0.1", "validation_fraction: .nan"),
        PLAN,
        ["data.validation_fraction"],
    ),
    Case(
        "study-moe-capacity-inf",
        set_yaml(
            STUDY,
            "models",
            [{"base": MODEL_FILE, "experts": 4, "top_k": 2, "moe": {"capacity_factor": float("inf")}}],
        ),
        PLAN,
        ["capacity_factor", "finite"],
    ),
    Case("study-device-tpu", set_yaml(STUDY, "device", "tpu"), PLAN, [STUDY, "device"]),
    Case("study-batch-zero", set_yaml(STUDY, "recipe.batch_size", 0), PLAN, [STUDY, "recipe.batch_size"]),
    Case("study-unknown-key", set_yaml(STUDY, "recipes", {}), PLAN, [STUDY, "recipes"]),
    Case("study-missing", remove(STUDY), PLAN, [STUDY, "no such study"]),
    Case("study-not-mapping", write(STUDY, b"just text\n"), PLAN, [STUDY, "mapping"]),
    Case("study-no-models", set_yaml(STUDY, "models", []), PLAN, [STUDY, "models"]),
    # Flags outside their range: argparse names the flag.
    Case("flag-threads-negative", None, [*TRAIN, "--threads", "-1"], ["--threads", ">= 1"]),
    Case("flag-threads-zero", None, [*TRAIN, "--threads", "0"], ["--threads", ">= 1"]),
    Case("flag-stop-after-zero", None, [*TRAIN, "--stop-after", "0"], ["--stop-after"]),
    Case("flag-restart-and-previous", None, [*TRAIN, "--restart", "--from-previous"], ["--from-previous"]),
    Case("flag-windows-2", None, ["measure", STUDY, "--run", RUN, "--windows", "2"], ["--windows", ">= 5"]),
    Case("flag-batch-zero", None, ["measure", STUDY, "--run", RUN, "--batch-size", "0"], ["--batch-size"]),
    Case("flag-seq-len-text", None, [*COUNT, "--seq-len", "long"], ["--seq-len", "integer"]),
    Case("flag-experts-zero", None, ["match", MODEL_FILE, "--experts", "0", "--top-k", "1"], ["--experts"]),
    Case("flag-mfu-2", None, ["plan", STUDY, "--mfu", "2"], ["--mfu", "(0, 1]"]),
    Case("flag-max-tokens-zero", None, ["routing", STUDY, "--run", RUN, "--max-tokens", "0"], ["--max-tokens"]),
    Case("flag-eval-threads-text", None, ["evaluate", STUDY, "--run", RUN, "--threads", "x"], ["--threads"]),
    Case("flag-cuda-measure", None, ["measure", "--config", MODEL_FILE, "--device", "cuda"], ["--device", "CUDA"]),
    # Steps run before the step that makes their input: name the command to run.
    Case("train-before-data", fresh_results, TRAIN, ["data.json", "harness data"]),
    Case("tasks-before-data", fresh_results, ["tasks", STUDY], ["data.json", "harness data"]),
    Case("routing-before-train", untrained, ["routing", STUDY, "--run", RUN], ["record.json", "harness train"]),
    Case("measure-before-train", untrained, ["measure", STUDY, "--run", RUN], ["record.json", "harness train"]),
    Case("evaluate-before-train", untrained, ["evaluate", STUDY, "--run", RUN], ["record.json", "harness train"]),
    Case("export-before-train", untrained, ["export", STUDY, "--run", RUN], ["record.json", "harness train"]),
    Case("report-before-train", untrained, ["report", STUDY], ["no record.json", RUN, "harness train"]),
    Case(
        "evaluate-before-tasks",
        lambda r: shutil.rmtree(r / DATA / "tasks"),
        ["evaluate", STUDY, "--run", RUN],
        ["tasks.json", "harness tasks"],
    ),
    Case("unknown-run", None, ["measure", STUDY, "--run", "nope_1e9_s0"], ["run", "nope_1e9_s0", RUN]),
    # Damaged data: detected before a step trains on it.
    Case("data-json-truncated", truncate(f"{DATA}/data.json", 0.5), TRAIN, ["data.json", "not valid JSON"]),
    Case("data-json-empty", write(f"{DATA}/data.json", b""), PLAN, ["data.json", "damaged"]),
    Case("data-json-no-splits", drop_key(f"{DATA}/data.json", "splits"), TRAIN, ["data.json", "splits"]),
    Case(
        "data-json-no-checksum",
        drop_key(f"{DATA}/data.json", "splits", "train", "sha256"),
        TRAIN,
        ["data.json", "checksum"],
    ),
    Case("shard-truncated-60pct", truncate(f"{DATA}/train.bin", 0.6), TRAIN, ["train.bin", "bytes"]),
    Case("shard-random-bytes", scramble(f"{DATA}/train.bin"), TRAIN, ["train.bin", "SHA-256"]),
    Case("shard-token-outside-vocab", token_outside_vocab, TRAIN, ["train.bin", "outside the vocabulary"]),
    Case("shard-missing", remove(f"{DATA}/validation.bin"), TRAIN, ["validation.bin", "missing"]),
    Case("test-shard-damaged", scramble(f"{DATA}/test.bin"), ["tasks", STUDY], ["test.bin", "SHA-256"]),
    # Damaged run files: named, with what to do.
    Case(
        "checkpoint-truncated",
        truncate(f"{RUNDIR}/checkpoint.pt", 0.5),
        ["measure", STUDY, "--run", RUN],
        ["checkpoint.pt", "truncated", "--restart"],
    ),
    Case(
        "checkpoint-empty",
        write(f"{RUNDIR}/checkpoint.pt", b""),
        ["export", STUDY, "--run", RUN],
        ["checkpoint.pt", "damaged"],
    ),
    Case(
        "checkpoint-random",
        scramble(f"{RUNDIR}/checkpoint.pt"),
        ["evaluate", STUDY, "--run", RUN],
        ["checkpoint.pt", "damaged"],
    ),
    Case(
        "checkpoint-no-checksum",
        remove(f"{RUNDIR}/checkpoint.pt.sha256"),
        TRAIN,
        ["checkpoint.pt", "cannot be verified", "--restart"],
    ),
    Case(
        "checkpoint-damaged-resume",
        truncate(f"{RUNDIR}/checkpoint.pt", 0.3),
        TRAIN,
        ["checkpoint.pt", "--restart"],
    ),
    Case("metrics-damaged-line", garble_line(f"{RUNDIR}/metrics.jsonl", 2), TRAIN, ["metrics.jsonl", "line 3"]),
    Case(
        "record-truncated", truncate(f"{RUNDIR}/record.json", 0.5), ["report", STUDY], ["record.json", "not valid JSON"]
    ),
    Case(
        "config-yaml-damaged",
        write(f"{RUNDIR}/config.yaml", b"::\n"),
        ["evaluate", STUDY, "--run", RUN],
        ["config.yaml"],
    ),
    Case(
        "tasks-json-damaged",
        truncate(f"{DATA}/tasks/tasks.json", 0.5),
        ["evaluate", STUDY, "--run", RUN],
        ["tasks.json"],
    ),
    # A device the machine lacks, and a model the machine cannot hold: refused before any work.
    Case(
        "study-cuda-without-cuda",
        set_yaml(STUDY, "device", "cuda"),
        ["train", STUDY, "--run", RUN, "--restart"],
        ["device", "CUDA"],
    ),
    Case(
        "model-too-large",
        set_yaml(MODEL_FILE, "d_model", 2**17),
        ["measure", "--config", MODEL_FILE],
        ["dense-pico", "GiB", "free"],
    ),
]


def _snapshot(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input_is_one_clear_error(case: Case, study: Path, monkeypatch):
    if "cuda" in case.id and torch.cuda.is_available():
        pytest.skip("CUDA is visible here")
    monkeypatch.chdir(study)
    if case.argv[0] == "train":  # a run still to finish: a finished one has nothing to train
        (study / RUNDIR / "record.json").unlink()
    if case.change is not None:
        case.change(study)
    before = _snapshot(study)
    argv = [*case.argv]
    if argv[0] not in ("count", "match") and not (argv[0] == "measure" and "--config" in argv):
        argv += ["--results", "results"]
    code, err = _cli(*argv)
    assert code == case.code, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and "error" in lines[-1], err
    for name in case.names:
        assert name in err, (name, err)
    after = _snapshot(study)
    assert not [p for p in after if p.endswith(".tmp")], after
    assert after - before <= case.created, sorted(after - before)


@pytest.mark.slow
def test_a_damaged_checkpoint_resumes_from_the_previous_one(study: Path, monkeypatch):
    """A run in training keeps its previous checkpoint (a finished one keeps its weights alone):
    stopped after 25 steps, its checkpoint of step 20 damaged, it resumes from step 10's."""
    monkeypatch.chdir(study)
    run_dir = study / RUNDIR
    final = json.loads((run_dir / "record.json").read_text())["final_val_loss"]
    code, err = _cli(*TRAIN, "--restart", "--stop-after", "25", "--results", "results")
    assert code == 3, err
    assert (run_dir / "checkpoint.prev.pt").is_file()
    truncate(f"{RUNDIR}/checkpoint.pt", 0.3)(study)
    code, err = _cli(*TRAIN, "--from-previous", "--results", "results")
    assert code == 0, err
    assert checkpoint.problem(run_dir / "checkpoint.pt") is None
    assert json.loads((run_dir / "record.json").read_text())["final_val_loss"] == pytest.approx(final, rel=1e-6)


@pytest.mark.slow
def test_restart_discards_a_damaged_checkpoint(study: Path, monkeypatch):
    monkeypatch.chdir(study)
    scramble(f"{RUNDIR}/checkpoint.pt")(study)
    code, err = _cli(*TRAIN, "--restart", "--results", "results")
    assert code == 0, err
    assert checkpoint.problem(study / RUNDIR / "checkpoint.pt") is None


def test_interrupted_writes_are_cleaned_up_when_training_starts(study: Path, monkeypatch):
    monkeypatch.chdir(study)
    leftover = study / RUNDIR / ".checkpoint.pt.abc123.tmp"
    leftover.write_bytes(b"partial")
    (study / RUNDIR / "record.json").unlink()  # killed after its last checkpoint
    code, err = _cli(*TRAIN, "--results", "results")
    assert code == 0, err
    assert not leftover.exists()


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o027, 0o640)], ids=["022", "027"])
def test_outputs_follow_the_umask(umask, mode, tmp_path):
    from harness.core.io import write_json

    old = os.umask(umask)
    try:
        path = write_json(tmp_path / "x.json", {"a": 1})
        checkpoint.save_checkpoint({"model": {"w": torch.zeros(2)}}, tmp_path / "run" / "checkpoint.pt")
        checkpoint.save_checkpoint({"model": {"w": torch.ones(2)}}, tmp_path / "run" / "checkpoint.pt")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == mode
    run = sorted((tmp_path / "run").iterdir())
    assert [p.name for p in run] == [
        "checkpoint.prev.pt",
        "checkpoint.prev.pt.sha256",
        "checkpoint.pt",
        "checkpoint.pt.sha256",
    ]
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in run} == {p.name: oct(mode) for p in run}


def test_a_full_disk_says_so_with_the_size_needed(tmp_path, monkeypatch):
    from harness.core import io as hio
    from harness.core.errors import DiskFull

    def no_space(obj, f, *a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", no_space)
    monkeypatch.setattr(checkpoint, "free_bytes", lambda p: 1000)
    monkeypatch.setattr(hio, "free_bytes", lambda p: 1000)
    with pytest.raises(DiskFull, match=r"disk is full: it needs about 0\.4 MiB"):
        checkpoint.save_checkpoint({"model": {"w": torch.zeros(100_000)}}, tmp_path / "checkpoint.pt")
    assert list(tmp_path.iterdir()) == []


def test_an_unexpected_failure_shows_its_traceback_and_asks_for_a_report(monkeypatch):
    import harness.cli.count as count

    def boom(path):
        raise KeyError("internal")

    monkeypatch.setattr(count, "load_config", boom)
    code, err = _cli("count", "x.yaml")
    assert code == 70 and "Traceback" in err and "please report it" in err


def test_every_unreadable_document_is_skipped_and_counted(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from harness.data.prepare import Skipped, iter_documents
    from harness.study.spec import DataConfig, DataSource

    src = tmp_path / "c"
    src.mkdir()
    bad = "caf\xe9".encode("latin-1")
    (src / "good.txt").write_text("fine text")
    (src / "bad.txt").write_bytes(b"x = '" + bad + b"'\n")
    (src / "latin.py").write_bytes(b"# -*- coding: latin-1 -*-\nx = '" + bad + b"'\n")
    (src / "undeclared.py").write_bytes(b"x = '" + bad + b"'\n")
    (src / "rows.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "' + bad + b'"}\nnot json\n')
    pq.write_table(pa.table({"text": ["parquet row"]}), src / "rows.parquet")
    (src / "broken.parquet").write_bytes(b"PAR1 not really")
    (src / "image.png").write_bytes(b"\x89PNG")
    skipped = Skipped()
    docs = list(iter_documents(DataConfig(source=DataSource.FILES, paths=[str(src)]), "s.yaml", skipped))
    texts = {d.key.split("/")[-1]: d.text for d in docs}
    assert texts["good.txt"] == "fine text" and texts["latin.py"].endswith("x = 'café'\n")
    assert texts["rows.jsonl#0"] == "ok" and texts["rows.parquet#0"] == "parquet row"
    assert "\ufffd" not in "".join(texts.values())
    counts = skipped.as_dict()
    assert sum(v["count"] for k, v in counts.items() if k.startswith("not valid in its encoding")) == 2
    assert counts["not UTF-8"]["count"] == 1 and counts["not JSON"]["count"] == 1
    assert counts["not a readable Parquet file"]["count"] == 1
    assert counts["suffix '.png' is not a text, JSONL or Parquet suffix"]["count"] == 1


@pytest.mark.parametrize("renamed", [False, True], ids=["killed-before-rename", "killed-after-rename"])
def test_a_save_killed_between_its_renames_still_verifies(tmp_path, renamed):
    path = tmp_path / "checkpoint.pt"
    checkpoint.save_checkpoint({"model": {"w": torch.zeros(3)}}, path)
    new = tmp_path / "new.pt"
    torch.save({"model": {"w": torch.ones(3)}}, new)
    digest = checkpoint.sha256_file(new)
    (tmp_path / "checkpoint.pt.sha256.new").write_text(f"{digest}  checkpoint.pt\n")
    if renamed:
        os.replace(new, path)
    assert checkpoint.problem(path) is None
    want = torch.ones(3) if renamed else torch.zeros(3)
    assert torch.equal(checkpoint.load_checkpoint(path, "harness train")["model"]["w"], want)
    assert not (tmp_path / "checkpoint.pt.sha256.new").exists()


def test_each_save_keeps_the_one_before(tmp_path):
    path = tmp_path / "checkpoint.pt"
    for value in (1.0, 2.0):
        checkpoint.save_checkpoint({"model": {"w": torch.full((3,), value)}}, path)
    prev = tmp_path / checkpoint.PREVIOUS
    assert checkpoint.problem(prev) is None and checkpoint.problem(path) is None
    assert checkpoint.load_checkpoint(prev, "x")["model"]["w"][0] == 1.0
    assert (tmp_path / "checkpoint.pt.sha256").read_text().endswith("  checkpoint.pt\n")


@pytest.mark.slow
def test_snakemake_redoes_a_run_whose_record_was_deleted(study: Path):
    """Snakemake reruns a job only for outputs it can see missing: the report needs every record."""
    import subprocess
    import sys

    from conftest import ROOT

    def planned() -> str:
        cmd = [sys.executable, "-m", "snakemake", "-n", "-s", str(ROOT / "Snakefile"), "--directory", str(study)]
        cmd += ["--config", f"study={study / STUDY}"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    assert "rule train:" not in planned()
    (study / RUNDIR / "record.json").unlink()
    out = planned()
    assert "rule train:" in out and f"Missing output files: results/pico/runs/{RUN}/record.json" in out
