"""Extending and rerunning a study never damages finished work.

A run's identity is its model, budget, seed and the recipe less its bookkeeping fields; only a
change to it (or to the data) trains a finished run again, and the workflow names such runs and
stops before deleting them. Steps run by hand leave up-to-date outputs alone.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT
from pico_study import RUN, RUNDIR, STUDY, cli_output
from pico_study import cli as _cli

from harness.core.errors import HarnessError
from harness.study.runs import identity_changes, plan, recorded_identity, run_identity
from harness.study.spec import BOOKKEEPING, Recipe, load_study, project_root
from harness.workflow.snakefile import RetrainRefused, refusals
from models.config import ConfigError


def _edit(root: Path, change) -> None:
    path = root / STUDY
    data = yaml.safe_load(path.read_text())
    change(data)
    path.write_text(yaml.safe_dump(data))


def _snakemake_cmd(root: Path, *config: str, dry: bool = True) -> list[str]:
    """Snakemake on the study folder, asked only for what training makes: the runs' records."""
    records = sorted((root / "results" / "pico" / "runs").glob("*/record.json"))
    cmd = [sys.executable, "-m", "snakemake", *(["-n"] if dry else []), *(str(p.relative_to(root)) for p in records)]
    cmd += ["-s", str(ROOT / "Snakefile"), "--directory", str(root), "--cores", "1"]
    return [*cmd, "--config", f"study={root / STUDY}", *config]


def _snakemake(root: Path, *config: str, dry: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(_snakemake_cmd(root, *config, dry=dry), capture_output=True, text=True, timeout=600)


def _second_model(root: Path, name: str) -> str:
    """Another model file (the pico model renamed) for the study to add."""
    data = yaml.safe_load((root / "model.yaml").read_text()) | {"name": name}
    (root / f"{name}.yaml").write_text(yaml.safe_dump(data))
    return str(root / f"{name}.yaml")


def _mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in (root / "results").rglob("*") if p.is_file()}


# --- identity -------------------------------------------------------------------------------


def test_bookkeeping_fields_leave_the_identity_alone(study):
    runs = plan(load_study(study / STUDY))
    run = runs[0]
    changed = {"eval_every": 7, "eval_batches": 3, "checkpoint_every": 5, "train_threads": 2, "min_steps": 1}
    changed |= {"tensorboard": True}
    assert set(changed) == set(BOOKKEEPING)
    other = dataclasses.replace(run, recipe=dataclasses.replace(run.recipe, **changed))
    assert run_identity(other) == run_identity(run)
    tuned = dataclasses.replace(run, recipe=dataclasses.replace(run.recipe, lr=1e-3))
    assert identity_changes(run_identity(run), run_identity(tuned)) == ["recipe.lr 0.003 -> 0.001"]


def test_fields_at_their_default_are_not_part_of_the_identity(study):
    (run,) = plan(load_study(study / STUDY))
    assert "weight_decay" not in run_identity(run)["recipe"]  # the study leaves it at its default
    assert "moe" not in run_identity(run)["model"]  # a dense model
    assert run.recipe.weight_decay == Recipe().weight_decay


def test_an_older_record_compares_field_by_field(study):
    import json

    record = json.loads((study / RUNDIR / "record.json").read_text())
    (run,) = plan(load_study(study / STUDY))
    del record["identity"]  # as an earlier version wrote it: full config and recipe only
    assert recorded_identity(record) == run_identity(run)


def test_a_model_entry_tunes_its_own_recipe(study):
    def tune(data):
        data["models"].append({"config": _second_model(study, "dense-pico-b8")})
        data["models"][1]["recipe"] = {"lr": 1e-3, "batch_size": 8}

    _edit(study, tune)
    s = load_study(study / STUDY)
    base, tuned = plan(s)
    assert (tuned.recipe.lr, tuned.recipe.batch_size, tuned.tokens_per_step) == (1e-3, 8, 8 * 32)
    assert base.recipe == s.recipe and tuned.steps == pytest.approx(base.steps / 2, abs=1)
    assert run_identity(tuned)["recipe"]["lr"] == 1e-3


def test_a_model_entry_may_give_each_budget_its_own_seeds(study):
    def replicate(data):
        data["budgets"] = [6e9, 1.2e10]
        data["models"][0]["seeds"] = [200]
        data["models"][0]["seeds_per_budget"] = {1.2e10: [200, 201, 202]}

    _edit(study, replicate)
    runs = plan(load_study(study / STUDY))
    by_budget = {b: sorted(r.seed for r in runs if r.budget == b) for b in (6e9, 1.2e10)}
    assert by_budget == {6e9: [200], 1.2e10: [200, 201, 202]}


@pytest.mark.parametrize(
    ("seeds", "message"),
    [
        ({3e9: [1]}, r"'models\[0\]\.seeds_per_budget': budget 3e9 is not one of this model's budgets \(6e9\)"),
        ({6e9: [1, 1]}, r"seeds repeat"),
        ({6e9: []}, r"seeds_per_budget"),
    ],
)
def test_seeds_per_budget_name_a_budget_of_the_model(study, seeds, message):
    def bad(data):
        data["models"][0]["seeds_per_budget"] = seeds

    _edit(study, bad)
    with pytest.raises(ConfigError, match=message):
        load_study(study / STUDY)


@pytest.mark.parametrize("field", ["seq_len", "dtype", "eval_every"])
def test_a_model_entry_may_not_set_the_studys_own_fields(study, field):
    def bad(data):
        data["models"][0]["recipe"] = {field: 64 if field != "dtype" else "float32"}

    _edit(study, bad)
    with pytest.raises(ConfigError, match=rf"models\.0\.recipe.*{field}|models\[0\]\.recipe\.{field}"):
        load_study(study / STUDY)


def test_studies_and_configs_resolve_from_the_project(tmp_path, monkeypatch):
    (tmp_path / "workflows" / "studies").mkdir(parents=True)
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    assert project_root() == tmp_path


# --- the workflow -----------------------------------------------------------------------------


@pytest.mark.slow
def test_a_bookkeeping_change_retrains_nothing_and_a_real_one_is_refused(study):
    _edit(study, lambda d: d["recipe"].update(min_steps=5, eval_every=7, checkpoint_every=3, eval_batches=1))
    quiet = _snakemake(study)
    assert quiet.returncode == 0, quiet.stderr
    assert "rule train:" not in quiet.stdout and "would train again" not in quiet.stderr

    _edit(study, lambda d: d["recipe"].update(lr=1e-3))
    before = _mtimes(study)
    dry = _snakemake(study)
    assert f"{RUN}: recipe.lr 0.003 -> 0.001" in dry.stdout + dry.stderr
    real = _snakemake(study, dry=False)
    assert real.returncode != 0
    said = real.stdout + real.stderr
    assert "--config retrain=stale" in said and f"{RUN}: recipe.lr" in said
    assert _mtimes(study) == before, "a refused change must leave every file as it was"


@pytest.mark.parametrize(
    ("error", "said"),
    [
        (
            ConfigError("retrain", "all is not allowed", "--config"),
            "moe-harness: error: --config: field 'retrain': all is not allowed\n",
        ),
        (HarnessError("a\nb"), "moe-harness: error: a b\n"),
        (RetrainRefused("moe-harness: with s, 1 run:\n  r: x"), "moe-harness: with s, 1 run:\n  r: x\n"),
        (
            OSError(errno.EROFS, "Read-only file system", "results/x"),
            "moe-harness: error: results/x: the file system is read-only",
        ),
    ],
    ids=["config", "harness", "retrain", "os"],
)
def test_the_workflows_refusals_are_their_message_and_exit_code_2(error, said, capsys):
    with pytest.raises(SystemExit) as stopped, refusals():
        raise error
    assert stopped.value.code == 2
    assert capsys.readouterr().err.startswith(said)
    with pytest.raises(KeyError), refusals():  # a defect still reaches Snakemake with its traceback
        raise KeyError("x")


@pytest.mark.slow
def test_a_refused_retraining_prints_its_message_and_no_traceback(study):
    _edit(study, lambda d: d["recipe"].update(lr=1e-3))
    for refused in (_snakemake(study), _snakemake(study, dry=False)):
        assert refused.returncode == 2, refused.stderr
        said = refused.stderr[refused.stderr.index("moe-harness: with") :]
        assert said.splitlines()[1] == f"  {RUN}: recipe.lr 0.003 -> 0.001", said
        assert "Traceback" not in said and 'File "' not in said and "RetrainRefused" not in said, said
        assert said.rstrip().endswith("never retrains anything."), said


@pytest.mark.slow
def test_retrain_stale_replaces_the_changed_run(study):
    _edit(study, lambda d: d["recipe"].update(lr=1e-3))
    done = _snakemake(study, "retrain=stale", dry=False)
    assert done.returncode == 0, done.stderr
    import json

    record = json.loads((study / RUNDIR / "record.json").read_text())
    assert record["recipe"]["lr"] == 1e-3 and record["identity"]["recipe"]["lr"] == 1e-3
    again = _snakemake(study)
    assert "rule train:" not in again.stdout, "a plain run after retrain=stale retrains nothing"


@pytest.mark.slow
def test_a_copied_study_is_not_retrained_and_lost_timestamps_are_named(study, tmp_path):
    """Train on one machine, report on another: copy results/ with its timestamps (cp -a,
    rsync -a, tar); Snakemake's own metadata (.snakemake/) need not travel. A copy that lost its
    timestamps would retrain from the 'newer' data: the workflow stops naming Snakemake's
    reason, and `snakemake --touch` retrains nothing."""
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(study, elsewhere, copy_function=shutil.copy2)
    text = (elsewhere / STUDY).read_text().replace(str(study), str(elsewhere))
    (elsewhere / STUDY).write_text(text)
    os.utime(elsewhere / STUDY)
    out = _snakemake(elsewhere)
    assert out.returncode == 0, out.stderr
    assert "rule train:" not in out.stdout and "rule data:" not in out.stdout

    for shard in (elsewhere / "results" / "pico" / "data").iterdir():
        os.utime(shard) if shard.is_file() else None
    refused = _snakemake(elsewhere, dry=False)
    said = refused.stdout + refused.stderr
    assert refused.returncode == 2 and f"{RUN}: Snakemake: Updated input files" in said
    assert "Traceback" not in said and 'File "' not in said, said  # refused in onstart: the message alone
    touched = subprocess.run(
        [*_snakemake_cmd(elsewhere, dry=False), "--touch"], capture_output=True, text=True, timeout=600
    )
    assert touched.returncode == 0, touched.stderr
    assert "rule train:" not in _snakemake(elsewhere).stdout


def test_the_end_of_the_workflow_prints_the_first_numbers(tmp_path):
    from harness.workflow.snakefile import at_a_glance

    (tmp_path / "report.md").write_text("# r\n\n## At a glance\n\n| a |\n|---|\n| -0.0343 |\n\n## Claims\n\nx\n")
    shown = at_a_glance(tmp_path)
    assert "| -0.0343 |" in shown and "Claims" not in shown and str(tmp_path / "report.md") in shown
    assert at_a_glance(tmp_path / "missing") == ""


# --- steps run by hand ------------------------------------------------------------------------


def test_hand_run_steps_leave_up_to_date_outputs_alone(study, monkeypatch):
    monkeypatch.chdir(study)
    before = _mtimes(study)
    for argv in (["data", STUDY], ["train", STUDY, "--run", RUN, "--quiet"], ["tasks", STUDY]):
        code, err = _cli(*argv, "--results", "results")
        assert code == 0, err
    assert _mtimes(study) == before
    (study / RUNDIR / "measure.json").write_text("{}")
    code, err = _cli("measure", STUDY, "--run", RUN, "--results", "results")
    assert code == 0 and (study / RUNDIR / "measure.json").read_text() == "{}", err


def test_hand_run_train_says_there_is_nothing_to_do(study):
    out = subprocess.run(
        [sys.executable, "-m", "harness", "train", STUDY, "--run", RUN, "--results", "results", "--quiet"],
        cwd=study,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "nothing to do" in out.stdout and "--restart" in out.stdout


def test_hand_run_train_refuses_a_run_finished_with_another_configuration(study, monkeypatch):
    monkeypatch.chdir(study)
    _edit(study, lambda d: d["recipe"].update(lr=1e-3))
    code, err = _cli("train", STUDY, "--run", RUN, "--quiet", "--results", "results")
    assert code == 2 and "recipe.lr 0.003 -> 0.001" in err and "--restart" in err


def test_plan_lists_states_totals_and_stale_runs(study, monkeypatch):
    monkeypatch.chdir(study)
    _edit(study, lambda d: d["models"].append({"config": _second_model(study, "dense-pico-b")}))
    code, out, err = cli_output("plan", STUDY, "--results", "results")
    assert code == 0, err
    assert "done" in out and "to run" in out and "1 of 2 runs done. To do: 1 run," in out
    assert "disk:" in out and "training FLOPs" in out
    _edit(study, lambda d: d["recipe"].update(lr=1e-3))
    out = cli_output("plan", STUDY, "--results", "results")[1]
    assert f"stale: {RUN} would be trained again: recipe.lr 0.003 -> 0.001" in out


def test_plan_warns_when_a_gpu_study_is_planned_without_a_gpu(study, monkeypatch):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    monkeypatch.chdir(study)
    code, out, err = cli_output("plan", STUDY, "--results", "results", "--device", "cuda", "--gpu", "H100")
    assert code == 0, err
    assert "no CUDA device is visible" in out and "H100" in out


@pytest.mark.parametrize(
    ("primary", "message"),
    [
        ({"moe": "moe-nope", "dense": "dense-pico", "budget": 6e9}, r"registration\.primary\.moe.*'moe-nope'"),
        ({"moe": "dense-pico", "dense": "dense-pico", "budget": 6e9}, r"registration\.primary\.moe.*not an MoE"),
        ({"moe": "dense-pico-e4k2", "dense": "dense-pico", "budget": 3e9}, r"registration\.primary\.budget.*3e9"),
    ],
)
def test_a_registered_contrast_names_models_and_a_budget_of_the_study(study, primary, message):
    def register(data):
        data["models"].append({"base": data["models"][0]["config"], "experts": 4, "top_k": 2})
        data["registration"] = {"primary": primary}

    _edit(study, register)
    with pytest.raises(ConfigError, match=message):
        plan(load_study(study / STUDY))


# --- data settings: only what changes the tokens changes the data -------------------------------


def _data_files(root: Path) -> dict[str, int]:
    return {k: v for k, v in _mtimes(root).items() if "/data/" in k or k.endswith("record.json")}


def test_a_training_side_data_field_leaves_the_data_alone(study, monkeypatch):
    from harness.workflow.snakefile import data_changes, data_params, run_states

    monkeypatch.chdir(study)
    before, params = _mtimes(study), data_params(load_study(STUDY))
    _edit(study, lambda d: d["data"].update(allow_repetition=True))
    changed = load_study(STUDY)
    assert data_params(changed) == params and data_changes(changed, Path("results/pico")) == []
    assert [s.state for s in run_states(changed, plan(changed), Path("results/pico"))] == ["done"]
    code, err = _cli("data", STUDY, "--results", "results")
    assert code == 0, err
    assert _mtimes(study) == before, "`harness data` rewrote data whose tokens did not change"


def test_data_prepared_again_the_same_keeps_its_files_times(study, monkeypatch):
    monkeypatch.chdir(study)
    shards = {k: v for k, v in _data_files(study).items() if not k.endswith("data.json")}
    code, err = _cli("data", STUDY, "--results", "results", "--force")  # data.json now names this copy's paths
    assert code == 0, err
    before = _data_files(study)
    assert {k: v for k, v in before.items() if not k.endswith("data.json")} == shards
    code, err = _cli("data", STUDY, "--results", "results", "--force")
    assert code == 0, err
    assert _data_files(study) == before, "identical data was replaced: Snakemake would retrain every run"


@pytest.mark.parametrize(
    ("field", "value"), [("validation_fraction", 0.15), ("vocab_size", 600), ("max_bytes", 50_000)]
)
def test_a_token_changing_data_field_is_still_a_change(study, field, value):
    from harness.workflow.snakefile import data_changes, data_params

    params = data_params(load_study(study / STUDY))
    _edit(study, lambda d: d["data"].update({field: value}))
    changed = load_study(study / STUDY)
    assert data_params(changed) != params
    assert data_changes(changed, study / "results" / "pico")[0].split()[0] == f"data.{field}"


@pytest.mark.slow
def test_allow_repetition_retrains_nothing_and_a_token_change_is_refused(study):
    _edit(study, lambda d: d["data"].update(allow_repetition=True))
    shards = _data_files(study)
    dry = _snakemake(study)
    assert dry.returncode == 0, dry.stderr
    assert "rule train:" not in dry.stdout and "rule data:" not in dry.stdout
    real = _snakemake(study, dry=False)
    assert real.returncode == 0, real.stderr
    assert "rule train:" not in real.stdout + real.stderr
    assert {k: v for k, v in _data_files(study).items() if k in shards} == shards

    _edit(study, lambda d: d["data"].update(validation_fraction=0.15))
    refused = _snakemake(study)
    said = refused.stdout + refused.stderr
    assert refused.returncode != 0 and f"{RUN}: data.validation_fraction 0.1 -> 0.15" in said


# --- a variant of a model file under a name of its own --------------------------------------


def test_a_named_config_entry_is_a_variant_of_its_own(study):
    from harness.workflow.snakefile import run_states

    def variant(data):
        data["models"].append({"config": data["models"][0]["config"], "name": "dense-pico-lr1", "recipe": {"lr": 1e-3}})

    _edit(study, variant)
    s = load_study(study / STUDY)
    base, tuned = plan(s)
    assert (base.run_id, tuned.run_id) == (RUN, "dense-pico-lr1_6e9_s0")
    assert tuned.model.name == "dense-pico-lr1" and tuned.recipe.lr == 1e-3 and base.recipe.lr == 3e-3
    assert run_identity(tuned)["model"]["name"] == "dense-pico-lr1"
    assert [r.state for r in run_states(s, [base, tuned], study / "results" / "pico")] == ["done", "to run"]


def test_a_name_on_a_pattern_of_several_files_is_refused(study):
    _second_model(study, "model-b")

    def named(data):
        data["models"][0] = {"config": str(study / "model*.yaml"), "name": "one"}

    _edit(study, named)
    with pytest.raises(ConfigError, match=r"'models\[0\]\.name': names one model, but config .* matches 2 files"):
        plan(load_study(study / STUDY))


# --- a dry run is read-only -----------------------------------------------------------------------


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_size) for p in root.rglob("*")}


@pytest.mark.slow
def test_a_dry_run_writes_nothing(study, tmp_path):
    from pico_study import MODEL, study_dict, write_corpus

    fresh = tmp_path / "fresh"
    write_corpus(fresh)
    (fresh / "model.yaml").write_text(yaml.safe_dump(MODEL))
    (fresh / STUDY).write_text(yaml.safe_dump(study_dict(fresh)))
    (fresh / "results").mkdir()
    cmd = [sys.executable, "-m", "snakemake", "-n", "-s", str(ROOT / "Snakefile"), "--directory", str(fresh)]
    out = subprocess.run(
        [*cmd, "--cores", "1", "--config", f"study={fresh / STUDY}"], capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr
    assert "rule train:" in out.stdout and "rule data:" in out.stdout
    assert list((fresh / "results").iterdir()) == [], "a dry run on a fresh study wrote into results/"

    _edit(study, lambda d: d["models"].append({"config": _second_model(study, "dense-pico-b")}))
    before = _tree(study / "results")
    out = _snakemake(study)
    assert out.returncode == 0, out.stderr
    assert _tree(study / "results") == before, "a dry run on a prepared study wrote into results/"
    _edit(study, lambda d: d["recipe"].update(lr=1e-3))
    out = _snakemake(study, "retrain=stale")
    assert out.returncode == 0 and "rule train:" in out.stdout, out.stdout + out.stderr
    assert _tree(study / "results") == before, "a dry run that retrains wrote into results/"
