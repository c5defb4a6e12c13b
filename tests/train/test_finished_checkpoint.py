"""A finished run keeps what the later steps read: its final checkpoint.pt holds the weights and
counters (the AdamW state only where the study sets keep_optimizer_state), and the previous
checkpoint goes once record.json is written. A run in training keeps both checkpoints, whole, and
resumes bit for bit; a finished run's record is written again from its final weights."""

from __future__ import annotations

import pytest
import torch
import yaml
from pico_study import RUN, RUNDIR, STUDY, cli_output

from harness.core.errors import DamagedFile
from harness.study.runs import find_run
from harness.study.spec import load_study
from harness.train import checkpoint
from harness.train.loop import Stopped
from harness.train.run import train
from models.accounting import count_params
from models.config import ConfigError


def _state(path):
    return torch.load(path, weights_only=True)


def _train(study, out, **kwargs):
    s = load_study(study / STUDY)
    return train(find_run(s, RUN), s, study / "results" / "pico" / "data", out, progress=False, **kwargs)


def test_a_finished_run_keeps_its_weights_alone(study):
    run_dir = study / RUNDIR
    state = _state(run_dir / checkpoint.NAME)
    assert checkpoint.OPTIMIZER not in state and set(state["model"]) and state["step"] > 0
    assert not (run_dir / checkpoint.PREVIOUS).exists()
    assert not checkpoint.checksum_path(run_dir / checkpoint.PREVIOUS).exists()
    assert checkpoint.problem(run_dir / checkpoint.NAME) is None, "its recorded SHA-256 is the slim file's"
    weights = 4 * count_params(find_run(load_study(study / STUDY), RUN).model).total
    assert (run_dir / checkpoint.NAME).stat().st_size < 1.2 * weights + 50_000
    record = yaml.safe_load((run_dir / "record.json").read_text())
    assert record["checkpoint_optimizer_state"] is False


def test_a_run_in_training_keeps_both_checkpoints_whole_and_resumes_bit_for_bit(study, one_thread):
    whole = _train(study, study / "whole" / RUN)
    out = study / "split" / RUN
    with pytest.raises(Stopped):
        _train(study, out, stop_after=15)
    for name in (checkpoint.NAME, checkpoint.PREVIOUS):
        assert checkpoint.OPTIMIZER in _state(out / name), name
        assert checkpoint.problem(out / name) is None
    resumed = _train(study, out)
    assert resumed["final_val_loss"] == whole["final_val_loss"]
    assert resumed["final_train_loss"] == whole["final_train_loss"]
    final, reference = _state(out / checkpoint.NAME)["model"], _state(study / "whole" / RUN / checkpoint.NAME)["model"]
    assert all(torch.equal(final[k], reference[k]) for k in reference)
    assert not (out / checkpoint.PREVIOUS).exists()


def test_a_lost_record_is_written_again_from_the_final_weights(study, one_thread):
    run_dir = study / RUNDIR
    before = yaml.safe_load((run_dir / "record.json").read_text())
    (run_dir / "record.json").unlink()  # killed after its final checkpoint, before its record
    again = _train(study, run_dir)
    assert again["final_val_loss"] == before["final_val_loss"]
    assert again["final_train_split_loss"] == before["final_train_split_loss"]
    assert checkpoint.OPTIMIZER not in _state(run_dir / checkpoint.NAME)
    assert not (run_dir / checkpoint.PREVIOUS).exists()


def test_a_study_may_keep_the_optimizer_state(study, one_thread):
    data = yaml.safe_load((study / STUDY).read_text()) | {"keep_optimizer_state": True}
    (study / STUDY).write_text(yaml.safe_dump(data))
    out = study / "kept" / RUN
    record = _train(study, out)
    state = _state(out / checkpoint.NAME)
    assert checkpoint.OPTIMIZER in state and state["optimizer"]["state"], "AdamW's moments are kept"
    assert record["checkpoint_optimizer_state"] is True
    assert not (out / checkpoint.PREVIOUS).exists(), "the previous checkpoint goes either way"


def test_keep_optimizer_state_is_validated_and_retrains_nothing(study):
    data = yaml.safe_load((study / STUDY).read_text())
    (study / "bad.yaml").write_text(yaml.safe_dump(data | {"keep_optimizer_state": "yes"}))
    with pytest.raises(ConfigError) as e:
        load_study(study / "bad.yaml")
    assert e.value.field == "keep_optimizer_state" and "boolean" in str(e.value)
    (study / STUDY).write_text(yaml.safe_dump(data | {"keep_optimizer_state": True}))
    mtime = (study / RUNDIR / "record.json").stat().st_mtime_ns
    code, out, err = cli_output("train", str(study / STUDY), "--run", RUN, "--results", str(study / "results"))
    assert code == 0 and "nothing to do, already trained" in out, err
    assert (study / RUNDIR / "record.json").stat().st_mtime_ns == mtime


def test_weights_without_optimizer_state_are_no_checkpoint_to_train_on(study, one_thread):
    out = study / "slim" / RUN
    with pytest.raises(Stopped):
        _train(study, out, stop_after=10)
    state = _state(out / checkpoint.NAME)
    del state[checkpoint.OPTIMIZER]
    checkpoint.save_checkpoint(state, out / checkpoint.NAME)
    with pytest.raises(DamagedFile, match="no optimizer state at step 10"):
        _train(study, out)


def test_readers_take_a_full_checkpoint_written_before_as_they_take_a_slim_one(study):
    """A run finished before finished runs were slimmed: its checkpoint still has the AdamW state."""
    from harness.cli.common import trained_state

    s = load_study(study / STUDY)
    run = find_run(s, RUN)
    run_dir = study / RUNDIR
    slim = trained_state(s, run, run_dir)
    state = _state(run_dir / checkpoint.NAME) | {checkpoint.OPTIMIZER: {"state": {}, "param_groups": []}}
    checkpoint.save_checkpoint(state, run_dir / checkpoint.NAME)
    loaded = trained_state(s, run, run_dir)
    assert all(torch.equal(loaded["model"][k], slim["model"][k]) for k in slim["model"])
