"""Other studies' runs join a study's joint law and frontier only when comparable, each refusal one
line naming the field; a reused run is counted once; the law's tables name each run's study."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from synthetic_records import _rec, written

from harness.core.errors import DamagedFile
from harness.study.pool import folder_records, pooled_records
from harness.study.spec import load_study

SPLIT = {"documents": 10, "tokens": 1000, "file_bytes": 2000, "sha256": "0" * 64}
DATA = {
    "fingerprint": "f" * 64,
    "source": "python-stdlib",
    "config": {"source": "python-stdlib", "vocab_size": 2048, "validation_fraction": 0.02, "test_fraction": 0.01},
    "tokenizer": {"vocab_size": 2048, "eos_id": 0, "trained": True, "file_sha256": None},
    "dtype": "uint16",
    "splits": {"train": SPLIT, "validation": SPLIT, "test": SPLIT},
}
RECIPE = {"batch_size": 16, "seq_len": 128, "lr": 3e-3, "eval_batches": 48, "train_threads": 1}


def _source(root: Path, name: str, data: dict = DATA, recipe: dict = RECIPE, runs=("dense-d48_7e12_s200",)) -> str:
    folder = root / "results" / name
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "data.json").write_text(json.dumps(data))
    for run in runs:
        (folder / "runs" / run).mkdir(parents=True)
        (folder / "runs" / run / "record.json").write_text(json.dumps(_record(run, name, data, recipe)))
    return f"results/{name}"


def _record(run: str, study: str, data: dict = DATA, recipe: dict = RECIPE) -> dict:
    """record.json of the dense run ``run`` of ``study``, as training writes it."""
    model, budget, seed = run.split("_")
    rec = _rec(model, "dense", float(budget), 1e5, 1e5, 3.3, seed=int(seed.removeprefix("s")))
    rec = written(rec, study, data_fingerprint=data["fingerprint"], recipe=recipe)
    return rec | {"identity": {"model": model, "seed": rec["seed"]}}


def _study(root: Path, monkeypatch, pool: list[dict], recipe: dict | None = None):
    (root / "workflows" / "studies").mkdir(parents=True)
    spec = {
        "name": "frontier",
        "data": {"source": "python-stdlib"},
        "models": [{"config": "dense-d64.yaml"}],
        "budgets": [7e12],
        "recipe": recipe or {k: v for k, v in RECIPE.items()},
        "pool": pool,
    }
    (root / "workflows" / "studies" / "frontier.yaml").write_text(yaml.safe_dump(spec))
    monkeypatch.chdir(root)
    return load_study("frontier")


def test_comparable_runs_join_and_a_reused_run_counts_once(tmp_path, monkeypatch):
    src = _source(tmp_path, "cpu", runs=("dense-d48_7e12_s200", "dense-d64_7e12_s200"))
    study = _study(tmp_path, monkeypatch, [{"results": src}])
    own = [{"run_id": "dense-d64_7e12_s200", "identity": {"model": "dense-d64", "seed": 200}}]  # reused from cpu
    pooled, refusals = pooled_records(study, own, DATA)
    assert refusals == [] and [r["run_id"] for r in pooled] == ["dense-d48_7e12_s200"]
    assert pooled[0]["study"] == "cpu"


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"data": DATA | {"fingerprint": "e" * 64}}, "data fingerprint eeeeeeeeeeeeeeee against this study's ffff"),
        ({"data": DATA | {"config": DATA["config"] | {"vocab_size": 4096}}}, "data.vocab_size 4096"),
        ({"recipe": RECIPE | {"lr": 1e-3}}, "recipe.lr 0.001 (run dense-d48_7e12_s200) against this study's 0.003"),
        ({"recipe": RECIPE | {"eval_batches": 8}}, "recipe.eval_batches 8"),
    ],
)
def test_an_incomparable_source_is_refused_in_one_line_naming_the_field(tmp_path, monkeypatch, change, named):
    src = _source(tmp_path, "cpu", **change)
    study = _study(tmp_path, monkeypatch, [{"results": src}])
    pooled, refusals = pooled_records(study, [], DATA)
    assert pooled == [] and len(refusals) == 1
    assert refusals[0].startswith("pool[0] (results/cpu): ") and named in refusals[0] and "\n" not in refusals[0]


def test_fields_the_study_names_may_differ_and_bookkeeping_never_matters(tmp_path, monkeypatch):
    src = _source(tmp_path, "cpu", recipe=RECIPE | {"lr": 1e-3, "train_threads": 2})
    study = _study(tmp_path, monkeypatch, [{"results": src, "differs": ["lr"]}])
    pooled, refusals = pooled_records(study, [], DATA)
    assert refusals == [] and len(pooled) == 1


def test_a_missing_or_damaged_source_is_named(tmp_path, monkeypatch):
    study = _study(tmp_path, monkeypatch, [{"results": "results/nowhere"}])
    _, refusals = pooled_records(study, [], DATA)
    assert refusals == [
        "pool[0] (results/nowhere): no data/data.json there, so its data cannot be compared: not pooled"
    ]
    src = _source(tmp_path, "cpu")
    record = tmp_path / src / "runs" / "dense-d48_7e12_s200" / "record.json"
    record.write_text(json.dumps(_record("dense-d64_7e12_s200", "cpu")))  # another run's record
    with pytest.raises(DamagedFile, match="record of run dense-d64_7e12_s200, not of dense-d48_7e12_s200"):
        folder_records(tmp_path / src)
    record.write_text(json.dumps(_record("dense-d48_7e12_s200", "tiny")))  # another study's
    with pytest.raises(DamagedFile, match=r"record of study 'tiny', not of 'cpu'.*`git restore`"):
        folder_records(tmp_path / src)
    record.write_text('{"run_id": "another"}')
    with pytest.raises(DamagedFile, match=r"record\.json: damaged: it has no field"):
        folder_records(tmp_path / src)


def test_the_pooled_law_names_each_runs_study(tmp_path):
    """Runs of two studies in one law: the analysis says how many runs each gave, the multiplier
    table which study each MoE came from, and the IsoFLOP sizes which study gave them."""
    from synthetic_records import law_study as synthetic

    from harness.analysis import scaling, scaling_report

    recs = synthetic(np.random.default_rng(3))
    for r in recs:
        r["study"] = "first" if r["budget_flops"] == 1e15 else "second"
    a = scaling.analyse(recs, bootstrap=10, refusals=["pool[1] (results/x): data.vocab_size 4096: not pooled"])
    assert a.pooled and a.studies == {"first": len(recs) // 2, "second": len(recs) // 2}
    text = "\n".join(scaling_report.markdown(a, lambda name: name))
    assert f"first ({len(recs) // 2} runs), second ({len(recs) // 2} runs)" in text
    assert "Not pooled: pool[1] (results/x): data.vocab_size 4096: not pooled." in text
    studies = {row[2] for row in scaling_report.multiplier_table(a)[1]}
    assert studies == {"first", "second"}


def test_every_table_of_a_pooled_law_names_the_study_of_each_model():
    from synthetic_records import law_study as synthetic

    from harness.analysis import scaling, scaling_report

    recs = synthetic(np.random.default_rng(3), experts=(2, 8))
    for r in recs:
        r["study"] = "later" if r["model"] == "moe-e8k2" else "first"
    a = scaling.analyse(recs, bootstrap=10)
    for table in (scaling_report.effective_table(a), scaling_report.published_table(a)):
        headers, rows = table
        at = headers.index("study")
        assert {(row[at - 1], row[at]) for row in rows} >= {("moe-e8k2", "later"), ("moe-e2k2", "first")}
    one = scaling.analyse([r | {"study": "first"} for r in recs], bootstrap=10)
    assert "study" not in scaling_report.published_table(one)[0]
