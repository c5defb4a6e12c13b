"""Study -> data -> train -> report on a corpus of local files, small enough for seconds."""

from __future__ import annotations

import dataclasses
import itertools
import json
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import PICO_MODEL, ROOT

from harness.core.errors import DamagedFile, HarnessError
from harness.core.io import read_json
from harness.data.listing import python_files, site_dirs
from harness.data.prepare import TokenShard, iter_documents, prepare, split_of
from harness.report.build import write_report
from harness.study.runs import analysed, find_run, plan
from harness.study.spec import DataConfig, DataSource, budget_label, load_study
from harness.train.loop import NonFiniteLoss, Stopped, lr_at
from harness.train.run import train
from models.config import ConfigError

STUDIES = sorted((ROOT / "workflows" / "studies").glob("*.yaml"))

MODEL = PICO_MODEL


def _corpus(root: Path) -> Path:
    """Python-like text files, a JSONL file and a Parquet file: every local format."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = root / "corpus"
    src.mkdir()
    rng = np.random.default_rng(0)
    letters = list("abcdefghijklmnopqrstuvwxyz_")
    names = ["".join(rng.choice(letters, size=rng.integers(2, 9))) for _ in range(400)]
    words = ["def", "return", "self", "(", ")", ":", "=", "+", "1", "0", "if", "else", "for", "in", *names]
    for i in range(60):
        lines = [" ".join(rng.choice(words, size=12)) for _ in range(20)]
        (src / f"mod_{i:03d}.py").write_text("\n".join(lines) + "\n")
    records = [{"text": " ".join(rng.choice(words, size=30)), "id": i} for i in range(20)]
    (src / "extra.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    pq.write_table(pa.table({"text": [r["text"] for r in records]}), src / "extra.parquet")
    return src


def _study(root: Path, **overrides) -> Path:
    model_file = root / "dense-pico.yaml"
    model_file.write_text(yaml.safe_dump(MODEL))
    study = {
        "name": "pico",
        "description": "test study",
        "device": "cpu",
        "data": {
            "source": "files",
            "paths": [str(root / "corpus")],
            "validation_fraction": 0.1,
            "test_fraction": 0.05,
            "vocab_size": 512,
        },
        "models": [
            {"config": str(model_file)},
            {"base": str(model_file), "experts": 4, "top_k": 2, "moe": {"z_loss_coef": 0.001}},
        ],
        "budgets": [6e9],
        "seeds": [0],
        "recipe": {
            "batch_size": 4,
            "seq_len": 32,
            "lr": 3e-3,
            "eval_every": 20,
            "eval_batches": 2,
            "checkpoint_every": 25,
            "min_steps": 20,
        },
    }
    for key, value in overrides.items():
        study[key] = value
    path = root / "pico.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("pico")
    _corpus(root)
    study = load_study(_study(root))
    data_dir = root / "results" / "data"
    meta = prepare(study, data_dir)
    return root, study, data_dir, meta


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.stem)
def test_shipped_studies_load_and_plan(path):
    study = load_study(path)
    runs = plan(study)
    assert runs and len({r.run_id for r in runs}) == len(runs)
    arms = {r.model.moe is None for r in runs}
    assert arms == {True, False}, "every study compares dense with MoE"
    for run in runs:
        assert abs(run.flops / run.budget - 1) < 0.01
        assert run.model.vocab_size == study.data.vocab_size
        assert run.model.max_seq_len == study.recipe.seq_len


def test_run_ids_are_readable():
    assert budget_label(1e15) == "1e15"
    assert budget_label(3e12) == "3e12"
    assert budget_label(2.5e13) == "2.5e13"
    study = load_study("tiny")
    assert "dense-d64_7e12_s0" in {r.run_id for r in plan(study)}


BAD_STUDIES = [
    ({"recipe": {"batch_size": 4, "sequence_length": 32}}, "recipe", "sequence_length"),
    ({"budgets": [0]}, "budgets.0", "less than or equal to the minimum"),
    ({"budgets": [-1.0]}, "budgets.0", "minimum"),
    ({"device": "tpu"}, "device", "'cuda'"),
    ({"models": [{"base": "MISSING", "experts": 4, "top_k": 2}]}, "models[0].base", "no model config"),
    ({"models": [{"config": "nope.yaml"}]}, "models[0].config", "no model config"),
    ({"models": [{"experts": 4, "top_k": 2}]}, "models[0]", "exactly one of"),
    ({"recipe": {"dtype": "float16"}}, "recipe.dtype", "'bfloat16'"),
    ({"recipe": {"train_threads": 0}}, "recipe.train_threads", "minimum"),
    ({"analysed_runs": {"budgets": "smallest"}}, "analysed_runs.budgets", "'largest'"),
    ({"models": [{"config": "dense-xs.yaml", "seeds": []}]}, "models.0.seeds", "should be non-empty"),
]


@pytest.mark.parametrize(("override", "field", "fragment"), BAD_STUDIES, ids=lambda v: str(v)[:30])
def test_bad_study_names_file_and_field(tmp_path, override, field, fragment):
    path = _study(tmp_path, **override)
    with pytest.raises(ConfigError) as err:
        plan(load_study(path))
    message = str(err.value)
    assert str(path) in message or path.name in message
    assert f"'{field}'" in message
    assert fragment in message


def test_models_may_narrow_seeds_and_budgets_and_analysed_runs_select(tmp_path):
    model_file = tmp_path / "dense-pico.yaml"
    models = [
        {"config": str(model_file), "budgets": [6e9, 1.2e10], "seeds": [0, 1, 2]},
        {"base": str(model_file), "experts": 4, "top_k": 2, "seeds": [0]},
    ]
    study = load_study(
        _study(tmp_path, models=models, budgets=[1.2e10], analysed_runs={"seeds": [0], "budgets": "largest"})
    )
    runs = plan(study)
    ids = sorted(r.run_id for r in runs)
    assert ids == sorted(
        [f"dense-pico_{b}_s{s}" for b in ("6e9", "1.2e10") for s in (0, 1, 2)] + ["dense-pico-e4k2_1.2e10_s0"]
    )
    assert sorted(r.run_id for r in analysed(study, runs)) == ["dense-pico-e4k2_1.2e10_s0", "dense-pico_1.2e10_s0"]
    everything = load_study(_study(tmp_path, models=models, budgets=[1.2e10]))
    assert len(analysed(everything, plan(everything))) == len(runs)


def test_matched_variant_with_k_above_e_is_refused_with_the_field(tmp_path):
    model_file = tmp_path / "dense-pico.yaml"
    path = _study(tmp_path, models=[{"base": str(model_file), "experts": 2, "top_k": 4}])
    with pytest.raises(ConfigError, match=r"'models\[0\]\..*top_k'"):
        plan(load_study(path))


def test_small_budget_and_repetition_are_refused(prepared, tmp_path):
    _, study, _, meta = prepared
    with pytest.raises(ConfigError, match="min_steps"):
        plan(load_study(_study(tmp_path, budgets=[1e6])))
    with pytest.raises(ConfigError, match="allow_repetition"):
        plan(study, train_tokens=10)
    assert plan(study, train_tokens=meta["splits"]["train"]["tokens"] * 100)


def test_split_is_by_hash_of_the_key():
    keys = [f"pkg/mod_{i}.py" for i in range(4000)]
    splits = [split_of(k, 0.1, 0.05) for k in keys]
    assert splits == [split_of(k, 0.1, 0.05) for k in keys]
    assert 0.08 < splits.count("validation") / len(keys) < 0.12
    assert 0.035 < splits.count("test") / len(keys) < 0.065


def test_data_reads_every_local_format_and_fingerprints(prepared, tmp_path):
    _root, study, data_dir, meta = prepared
    docs = list(iter_documents(study.data, study.path))
    keys = [d.key for d in docs]
    assert any(k.endswith(".py") for k in keys)
    assert any(".jsonl#" in k for k in keys) and any(".parquet#" in k for k in keys)
    assert sum(s["documents"] for s in meta["splits"].values()) == len(docs)
    assert meta["tokenizer"]["vocab_size"] == 512
    # The same corpus gives the same fingerprint and shards; a changed file changes it.
    again = prepare(study, tmp_path / "again")
    assert again["fingerprint"] == meta["fingerprint"]
    assert (tmp_path / "again" / "train.bin").read_bytes() == (data_dir / "train.bin").read_bytes()
    _corpus(tmp_path)
    (tmp_path / "corpus" / "mod_000.py").write_text("changed = 1\n")
    changed = load_study(_study(tmp_path))
    assert prepare(changed, tmp_path / "changed")["fingerprint"] != meta["fingerprint"]


def test_shards_decode_to_the_corpus_text(prepared):
    from tokenizers import Tokenizer

    _, _, data_dir, meta = prepared
    tok = Tokenizer.from_file(str(data_dir / "tokenizer.json"))
    ids = np.fromfile(data_dir / "validation.bin", dtype=meta["dtype"])
    text = tok.decode(ids.tolist(), skip_special_tokens=False)
    assert "def" in text and "<|endoftext|>" in text
    first_doc = text.split("<|endoftext|>")[0]
    assert len(first_doc) > 20


def test_data_json_lists_the_heldout_keys_in_shard_order(prepared):
    from tokenizers import Tokenizer

    from harness.data.tasks import heldout_documents

    _, study, data_dir, meta = prepared
    cfg = study.data
    keys = [d.key for d in iter_documents(cfg, study.path)]
    assert read_json(data_dir / "data.json")["heldout_keys"] == meta["heldout_keys"]
    for split in ("validation", "test"):
        expected = [k for k in keys if split_of(k, cfg.validation_fraction, cfg.test_fraction) == split]
        assert meta["heldout_keys"][split] == expected and expected
        assert len(expected) == meta["splits"][split]["documents"]
    split, docs = heldout_documents(data_dir, Tokenizer.from_file(str(data_dir / "tokenizer.json")))
    texts = {d.key: d.text for d in iter_documents(cfg, study.path)}
    assert docs == [texts[k] for k in meta["heldout_keys"][split]]


def test_train_batches_depend_only_on_seed_and_step(prepared):
    _, _, data_dir, _ = prepared
    shard = TokenShard(data_dir, "train", 32)
    a, b = shard.train_batch(3, 4, seed=0), shard.train_batch(3, 4, seed=0)
    assert torch.equal(a[0], b[0]) and torch.equal(a[0][:, 1:], a[1][:, :-1])
    assert not torch.equal(shard.train_batch(3, 4, seed=1)[0], a[0])
    far = shard.train_batch(shard.windows // 4 + 1, 4, seed=0)  # past one epoch
    assert far[0].shape == (4, 32)


def test_document_keys_and_splits_do_not_depend_on_where_the_corpus_lies(tmp_path):
    """A key decides its document's split and enters the fingerprint: the same corpus in two places
    gives the same keys (relative to the folder named in data.paths, its name included)."""
    from harness.study.spec import DataConfig, DataSource

    first, second = tmp_path / "a", tmp_path / "deeper" / "b"
    second.parent.mkdir()
    keys = []
    for root in (first, second):
        root.mkdir()
        _corpus(root)
        cfg = DataConfig(source=DataSource.FILES, paths=[str(root / "corpus")])
        keys.append([d.key for d in iter_documents(cfg)])
    assert keys[0] == keys[1] and keys[0][0] == "corpus/extra.jsonl#0" and "corpus/mod_000.py" in keys[0]


def test_validation_sample_spans_the_whole_split(prepared):
    """The evaluation windows reach from the first to the last window of the split, evenly
    spaced (the first windows only would be the first few documents), and are the whole split
    when it holds fewer than asked."""
    _, _, data_dir, _ = prepared
    shard = TokenShard(data_dir, "validation", 8)
    assert shard.windows > 8
    idx = shard.eval_indices(4)
    assert idx[0] == 0 and idx[-1] == shard.windows - 1 and len(idx) == 4
    assert np.ptp(np.diff(idx)) <= 1  # evenly spaced
    assert list(shard.eval_indices(10**6)) == list(range(shard.windows))
    batches = list(shard.eval_batches(2, 2))
    assert torch.equal(batches[-1][0][-1], shard.window_batch(np.array([shard.windows - 1]))[0][0])


def test_stdlib_source_is_offline_and_ordered():
    cfg = DataConfig(source=DataSource.PYTHON_STDLIB, max_bytes=200_000)
    docs = list(iter_documents(cfg))
    assert docs and all(d.key.startswith("stdlib/") for d in docs)
    assert [d.key for d in docs] == sorted(d.key for d in docs)
    assert sum(len(d.text.encode()) for d in docs[:-1]) < 200_000
    keys = [key for key, _ in python_files(Path(sysconfig.get_paths()["stdlib"]), "stdlib", skip_packages=True)]
    assert not any("site-packages" in k for k in keys)
    # python-site adds the installed packages, e.g. the one that holds PyYAML.
    assert Path(yaml.__file__).parents[1] in site_dirs()


def test_hf_source_through_datasets_on_a_local_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    folder = tmp_path / "hfdata"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps({"text": f"line {i} of text"}) + "\n" for i in range(30)))
    cfg = DataConfig(source=DataSource.HF, hf_dataset=str(folder))
    docs = list(iter_documents(cfg, "s.yaml"))
    assert len(docs) == 30 and docs[3].text == "line 3 of text"
    remote = DataConfig(source=DataSource.HF, hf_dataset="someone/not-downloadable-offline")
    with pytest.raises(ConfigError, match="could not load 'someone/not-downloadable-offline'"):
        list(iter_documents(remote, "s.yaml"))


def test_lr_schedules():
    from harness.study.spec import Recipe, Schedule

    r = Recipe(lr=1.0, min_lr_ratio=0.1, warmup_fraction=0.1)
    lrs = [lr_at(s, 100, r) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[-1] == pytest.approx(0.1) and all(a >= b for a, b in itertools.pairwise(lrs[9:]))
    w = Recipe(lr=1.0, min_lr_ratio=0.0, warmup_fraction=0.1, schedule=Schedule.WSD, decay_fraction=0.2)
    lrs = [lr_at(s, 100, w) for s in range(100)]
    assert lrs[50] == 1.0 and lrs[79] == 1.0 and lrs[80] < 1.0 and lrs[-1] == pytest.approx(0.0)


def test_train_reaches_the_budget_and_records_provenance(prepared):
    root, study, data_dir, _ = prepared
    run = find_run(study, "dense-pico-e4k2_6e9_s0")
    out = root / "results" / "runs" / run.run_id
    record = train(run, study, data_dir, out, progress=False)
    assert abs(record["flops_spent"] / record["budget_flops"] - 1) < 0.01
    assert record["tokens"] == run.steps * 4 * 32
    assert record["final_val_loss"] < np.log(512)
    for key in ("commit", "dirty"):
        assert key in record["provenance"]["git"]
    assert record["provenance"]["packages"]["torch"] == torch.__version__.split("+")[0] or record["provenance"][
        "packages"
    ]["torch"].startswith(torch.__version__.split("+")[0])
    assert record["data_fingerprint"] == read_json(data_dir / "data.json")["fingerprint"]
    assert record["provenance"]["host"]["cpu_heap"].startswith("freed memory kept")  # harness.core.cpu_heap
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == run.steps and "val_loss" in rows[-1]
    assert len(rows[-1]["routing"]) == 2 and sum(rows[-1]["routing"][0]["tokens_per_expert"]) == 4 * 32 * 2
    assert (out / "config.yaml").exists() and (out / "checkpoint.pt").exists()
    assert record["gpu_energy_j"] is None and "CPU" in record["gpu_energy_absent"]
    assert record["precision"] == {**record["precision"], "dtype": "float32", "autocast": False, "compile": False}


def test_run_energy_adds_up_over_resumed_segments(prepared, monkeypatch):
    from fake_nvml import FakeNvml

    import harness.train.loop
    from harness.train.energy import open_meter

    nvml = FakeNvml(power_w=100.0)
    monkeypatch.setattr(
        harness.train.loop, "open_meter", lambda device: open_meter(torch.device("cuda", 0), nvml, nvml.uuid, 0.01)
    )
    root, study, data_dir, _ = prepared
    run = find_run(study, "dense-pico_6e9_s0")
    out = root / "energy" / run.run_id
    start = time.perf_counter()
    with pytest.raises(Stopped):
        train(run, study, data_dir, out, stop_after=20, progress=False)
    first = torch.load(out / "checkpoint.pt", weights_only=True)["gpu_energy_j"]
    record = train(run, study, data_dir, out, progress=False)
    wall = time.perf_counter() - start
    assert 0 < first < record["gpu_energy_j"] <= 100.0 * wall * 1.05
    assert record["gpu_energy_j_per_token"] == pytest.approx(record["gpu_energy_j"] / record["tokens"])


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_final_numbers(prepared):
    root, study, data_dir, _ = prepared
    run = find_run(study, "dense-pico_6e9_s0")
    whole = train(run, study, data_dir, root / "whole" / run.run_id, progress=False)
    out = root / "split" / run.run_id
    with pytest.raises(Stopped):
        train(run, study, data_dir, out, stop_after=30, progress=False)
    assert not (out / "record.json").exists()
    assert (out / "checkpoint.pt").exists()
    resumed = train(run, study, data_dir, out, progress=False)
    assert resumed["final_val_loss"] == whole["final_val_loss"]
    assert resumed["final_train_loss"] == whole["final_train_loss"]
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)), "no step is logged twice after resuming"
    # Killed after the final checkpoint but before its record: rerunning only writes the record.
    (out / "record.json").unlink()
    again = train(run, study, data_dir, out, progress=False)
    assert again["final_val_loss"] == whole["final_val_loss"]


def test_checkpoint_of_another_configuration_is_refused(prepared):
    root, study, data_dir, _ = prepared
    run = find_run(study, "dense-pico_6e9_s0")
    out = root / "mismatch" / run.run_id
    with pytest.raises(Stopped):
        train(run, study, data_dir, out, stop_after=5, progress=False)
    changed = dataclasses.replace(study, recipe=dataclasses.replace(study.recipe, lr=1e-2))
    with pytest.raises(HarnessError, match=r"another configuration.*--restart"):
        train(find_run(changed, run.run_id), changed, data_dir, out, progress=False)


def test_non_finite_loss_stops_the_run_and_leaves_no_record(prepared, monkeypatch):
    root, study, data_dir, _ = prepared
    run = find_run(study, "dense-pico_6e9_s0")
    real = torch.nn.functional.cross_entropy
    monkeypatch.setattr(torch.nn.functional, "cross_entropy", lambda *a, **k: real(*a, **k) * float("nan"))
    out = root / "nan" / run.run_id
    with pytest.raises(NonFiniteLoss, match="loss is nan"):
        train(run, study, data_dir, out, progress=False)
    assert not (out / "record.json").exists()


@pytest.mark.slow
def test_report_tables(prepared):
    root, study, data_dir, _ = prepared
    results = root / "results"
    for run in plan(study):
        if not (results / "runs" / run.run_id / "record.json").exists():
            train(run, study, data_dir, results / "runs" / run.run_id, progress=False)
    from harness.core.io import write_json
    from harness.measure.throughput import MeasureSettings, measure

    fast = MeasureSettings(
        batch_size=2, seq_len=32, steps_per_window=1, warmup_steps=1, decode_tokens=4, decode_batch=2
    )
    for run in plan(study):
        write_json(results / "runs" / run.run_id / "measure.json", measure(run.model, torch.device("cpu"), fast))
    bench = results / "moe_ffn.json"
    info = {"case": "cpu-x", "device": "cpu", "ratio_moe_to_dense": 0.98, "ratio_moe_to_mixtral": 0.85}
    info |= {"ratio_moe_to_mixtral_grouped_mm": 0.8, "ratio_mixtral_to_dense": 1.15}
    info |= {"target_moe_to_mixtral": 0.8, "meets_target_moe_to_mixtral": False}
    overhead = {"case": "meter-overhead", "overhead_fraction": 0.0008}
    write_json(bench, {"benchmarks": [{"extra_info": info}, {"extra_info": overhead}]})
    md = write_report(study, results, bench).read_text()
    assert "## Cost per run" in md and "absent (no NVML)" in md and "absent (no spec peak)" in md
    assert "moe/mixtral <= 0.8: not met" in md and "sampling overhead: +0.08%" in md
    claims = md[md.index("## Claims") : md.index("## Runs")]
    assert "One seed shows the direction only" in claims and "`cpu` study" in claims
    import csv

    rows = list(csv.DictReader((results / "tables" / "cost.csv").open()))
    versus = next(r for r in rows if r["arm"].startswith("MoE"))[
        "vs dense: total params, training memory, train tokens/s (harness measure)"
    ]
    params_ratio, memory_ratio, _ = (float(v.strip().lstrip("x")) for v in versus.split(","))
    assert params_ratio > 1.2 and memory_ratio > 1  # measured: the MoE's extra experts take memory
    assert (results / "tables" / "cost.csv").read_text().count("\n") == 1 + len(plan(study))
    assert "## Dense versus MoE, run by run" in md and "## At a glance" in md and "## Claims" in md
    from harness.report.build import FIGURES

    na = md[md.index("## Not applicable to this study") : md.index("## Reproduction")]
    listed = {"isoflop": "IsoFLOP figure (needs", "specialisation": "Expert specialisation table and figure (need"}
    listed |= {"downstream_vs_loss": "Downstream evaluation table and figure (need"}
    for name, figure in FIGURES.items():  # every figure drawn; shown, or listed as not applicable
        assert (results / figure).read_bytes()[:4] == b"\x89PNG"
        assert figure in md or listed.get(name, figure) in na, name
    claims = list(csv.DictReader((results / "tables" / "claims.csv").open()))
    verdicts = {"supported", "not supported", "inconclusive", "not enough data"}
    assert len(claims) == 7 and {c["verdict"] for c in claims} <= verdicts
    assert "No committed reference for `pico`" in md
    reference = results.parent / "reference" / "cpu" / "pico" / "summary.json"
    reference.parent.mkdir(parents=True)
    reference.write_text((results / "summary.json").read_text())
    md = write_report(study, results, bench).read_text()
    reproduced = list(csv.DictReader((results / "tables" / "reproduction.csv").open()))
    assert reproduced and all(r["reproduced"] == "yes" for r in reproduced)
    assert f"{len(reproduced)} of {len(reproduced)} numbers reproduced" in md
    assert "dense-pico-e4k2_6e9_s0" in md and "no claim of significance" in md
    assert (results / "tables" / "dense_vs_moe.html").read_text().startswith("<table>")
    lines = (results / "tables" / "runs.csv").read_text().splitlines()
    assert len(lines) == 1 + len(plan(study))
    # Records name their study: another study's, in this study's folder, are refused (a reused
    # run's record is rewritten under the study that reuses it).
    copied = dataclasses.replace(study, name="pico-copy")
    with pytest.raises(DamagedFile, match="the record of study 'pico', not of 'pico-copy', whose results hold it"):
        write_report(copied, results, bench)


def test_cli_routing_of_a_trained_moe_run(prepared, tmp_path, capsys):
    from harness.cli import main

    root, study, data_dir, _ = prepared
    run = find_run(study, "dense-pico-e4k2_6e9_s0")
    run_dir = root / "results" / "runs" / run.run_id
    if not (run_dir / "record.json").exists():
        train(run, study, data_dir, run_dir, progress=False)
    # The CLI reads <results>/<study>/{data,runs}: point one at the fixture's folders.
    results = tmp_path / "results"
    (results / "pico" / "runs").mkdir(parents=True)
    (results / "pico" / "data").symlink_to(data_dir)
    (results / "pico" / "runs" / run.run_id).symlink_to(run_dir)
    out = tmp_path / "routing.json"
    args = ["routing", str(study.path), "--run", run.run_id, "--results", str(results), "--device", "cpu"]
    assert main([*args, "--max-tokens", "600", "--out", str(out)]) == 0
    line = capsys.readouterr().out.strip()
    assert line.count("\n") == 0 and "excess NMI" in line and str(out) in line
    result = read_json(out)
    assert result["run_id"] == run.run_id and result["moe"] is True and result["split"] == "test"
    assert result["tokens_with_eos"] == 600 and result["topics_known"] and result["note"] is None
    assert len(result["layers"]) == 2 and result["summary"]["specialises_by"] in ("category", "topic", "neither")
    assert main(["routing", str(study.path), "--run", "dense-pico_6e9_s0", "--results", str(tmp_path)]) == 2
    assert "run `harness train" in capsys.readouterr().err


@pytest.mark.slow
def test_snakemake_refuses_a_bad_study_before_running(tmp_path):
    bad = _study(tmp_path, budgets=[-5])
    r = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "--config", f"study={bad}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2, r.stderr
    assert "'budgets.0'" in r.stderr
    # The message alone: none of Snakemake's traceback frames after it.
    assert "Traceback" not in r.stderr and 'File "' not in r.stderr, r.stderr
    (said,) = [line for line in r.stderr.splitlines() if "error" in line.lower()]
    assert said.startswith(f"moe-harness: error: {bad}: field 'budgets.0'"), said


def test_a_given_tokenizer_file_is_used(prepared, tmp_path):
    _, study, data_dir, _ = prepared
    given = dataclasses.replace(
        study, data=dataclasses.replace(study.data, tokenizer_file=str(data_dir / "tokenizer.json"))
    )
    again = prepare(given, tmp_path / "given")
    assert again["tokenizer"]["trained"] is False
    assert (tmp_path / "given" / "validation.bin").read_bytes() == (data_dir / "validation.bin").read_bytes()
    wrong = dataclasses.replace(given, data=dataclasses.replace(given.data, vocab_size=1024))
    with pytest.raises(ConfigError, match=r"'data\.vocab_size'"):
        prepare(wrong, tmp_path / "wrong")


@pytest.mark.slow
def test_cli_plan_and_stop_resume(prepared):
    root, study, _, _ = prepared

    def harness(*args):
        return subprocess.run(
            [sys.executable, "-m", "harness", *args, "--results", str(root)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )

    # The fixture's data lives in <root>/results/data; the CLI expects <results>/<study>/data.
    (root / "pico").mkdir(exist_ok=True)
    if not (root / "pico" / "data").exists():
        (root / "pico" / "data").symlink_to(root / "results" / "data")
    r = harness("plan", study.path)
    assert r.returncode == 0, r.stderr
    assert "dense-pico_6e9_s0" in r.stdout and "epochs" in r.stdout
    # Earlier tests of this module may have finished the same run under <root>/results, on the
    # same data: then the plan offers to reuse it rather than train it.
    row = next(line for line in r.stdout.splitlines() if line.startswith("dense-pico_6e9_s0"))
    assert ("to run" in row or "reuse" in row.split()) and "disk:" in r.stdout, row
    r = harness("train", study.path, "--run", "dense-pico_6e9_s0", "--stop-after", "10", "--quiet")
    assert r.returncode == 3 and "run again to resume" in r.stderr
    r = harness("train", study.path, "--run", "dense-pico_6e9_s0", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "FLOPs spent / budget" in r.stdout
