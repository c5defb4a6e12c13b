"""Following a run while it trains: progress lines for a log file, TensorBoard event files."""

from __future__ import annotations

import dataclasses
import io
import json
import sys
from pathlib import Path

import pytest
import yaml
from pico_study import MODEL, study_dict, write_corpus

from harness.data.prepare import prepare
from harness.study.runs import find_run, plan, run_identity
from harness.study.spec import load_study
from harness.train.loop import Stopped
from harness.train.progress import Bar, Lines, Silent, backfill_events, duration, open_progress
from harness.train.run import train
from models.config import ConfigError

DENSE, MOE = "dense-pico_6e9_s0", "dense-pico-e4k2_6e9_s0"


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(scope="module")
def pico(tmp_path_factory):
    """The pico study (a dense run and its 4-expert variant) with its data prepared."""
    root = tmp_path_factory.mktemp("logs")
    write_corpus(root)
    (root / "model.yaml").write_text(yaml.safe_dump(MODEL))
    spec = study_dict(root)
    spec["models"].append({"base": str(root / "model.yaml"), "experts": 4, "top_k": 2})
    (root / "study.yaml").write_text(yaml.safe_dump(spec))
    study = load_study(root / "study.yaml")
    prepare(study, root / "data")
    return root, study


pytestmark = pytest.mark.usefixtures("one_thread")


def with_tensorboard(study, on: bool = True):
    return dataclasses.replace(study, recipe=dataclasses.replace(study.recipe, tensorboard=on))


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})  # 0: keep all
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


# Progress lines ------------------------------------------------------------------------------


def test_duration_reads_at_a_glance():
    assert [duration(s) for s in (0, 42.4, 62, 3599, 7500)] == ["0s", "42s", "1m02s", "59m59s", "2h05m"]


def test_lines_every_interval_and_at_each_evaluation():
    clock, out = Clock(), io.StringIO()
    lines = Lines("run", 1288, 0, out, every_s=30, clock=clock)
    clock.now = 4
    lines.update(1)  # the first step: its time (compilation, warm-up) is not the pace
    clock.now = 10
    lines.update(100, {"step": 100, "loss": 3.5, "tokens_per_s": 9000.0})
    assert len(out.getvalue().splitlines()) == 1, "only the opening line before 30 s"
    clock.now = 31
    lines.update(101)  # no log at this step: the last logged loss is shown
    clock.now = 40
    lines.update(120, {"step": 120, "loss": 3.412, "val_loss": 3.51, "tokens_per_s": 12345.0})
    first, timed, evaluated = out.getvalue().splitlines()
    assert first == "run step 0/1288 (0%) started | elapsed 0s"
    # 27 s for the 100 steps after the first: 0.27 s a step, 1187 steps to go
    assert timed == "run step 101/1288 (7%) loss 3.500 | 9,000 tok/s | elapsed 31s, eta 5m20s"
    assert evaluated.startswith("run step 120/1288 (9%) loss 3.412 val 3.510 | 12,345 tok/s | elapsed 40s, eta ")


def test_eta_leaves_out_the_first_steps_compilation():
    """A first step of 60 s (torch.compile) and 0.01 s a step after it: the eta is minutes, not days."""
    clock, out = Clock(), io.StringIO()
    lines = Lines("run", 100_000, 0, out, every_s=30, clock=clock)
    clock.now = 60.0
    lines.update(1)
    assert "eta" not in lines.line(), "no pace yet: one step, and it held the compilation"
    clock.now = 61.0
    lines.update(101)
    assert lines.line().endswith("elapsed 1m01s, eta 16m39s")


def test_resumed_lines_say_so_and_time_this_process():
    clock, out = Clock(), io.StringIO()
    lines = Lines("run", 200, 100, out, every_s=30, clock=clock)
    clock.now = 5
    lines.update(101)
    clock.now = 50
    lines.update(150, {"step": 150, "loss": 2.0, "tokens_per_s": 1.0, "val_loss": 2.1})
    assert out.getvalue().splitlines() == [
        "run step 100/200 (50%) resumed | elapsed 0s",
        "run step 150/200 (75%) loss 2.000 val 2.100 | 1 tok/s | elapsed 50s, eta 46s",
    ]


def test_a_terminal_gets_a_bar_a_log_file_lines_and_quiet_nothing():
    assert isinstance(open_progress("run", 10, 0, stream=io.StringIO()), Lines)
    tty = Tty()
    bar = open_progress("run", 10, 0, stream=tty)
    assert isinstance(bar, Bar)
    bar.close()
    quiet = io.StringIO()
    assert isinstance(open_progress("run", 10, 0, enabled=False, stream=quiet), Silent)
    assert quiet.getvalue() == ""


def test_training_to_a_log_file_writes_lines_with_step_and_loss(pico, capsys):
    root, study = pico
    run = find_run(study, DENSE)
    with pytest.raises(Stopped):
        train(run, study, root / "data", root / "lines" / run.run_id, stop_after=40)
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert lines[0].startswith(f"{DENSE} step 0/{run.steps} (0%) started")
    # eval_every 20: a line at each evaluation, with the step's loss and validation loss
    for step in (20, 40):
        loss = next(row for row in metrics(root / "lines" / DENSE) if row["step"] == step)["loss"]
        assert any(
            line.startswith(f"{DENSE} step {step}/{run.steps} ") and f"loss {loss:.3f} val " in line for line in lines
        )


def test_quiet_training_writes_nothing(pico, capsys):
    root, study = pico
    run = find_run(study, DENSE)
    with pytest.raises(Stopped):
        train(run, study, root / "data", root / "quiet" / run.run_id, progress=False, stop_after=20)
    assert capsys.readouterr().err == ""


# TensorBoard ---------------------------------------------------------------------------------


def test_tensorboard_is_bookkeeping_and_in_the_schema(pico, tmp_path):
    root, study = pico
    spec = yaml.safe_load((root / "study.yaml").read_text())
    spec["recipe"]["tensorboard"] = True
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(spec))
    on = load_study(tmp_path / "study.yaml")
    assert on.recipe.tensorboard and not study.recipe.tensorboard
    assert run_identity(find_run(on, MOE)) == run_identity(find_run(study, MOE))
    spec["recipe"]["tensorboard"] = "yes"
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match="tensorboard"):
        load_study(tmp_path / "study.yaml")


def test_missing_tensorboard_is_refused_before_training(pico, monkeypatch):
    root, study = pico
    study = with_tensorboard(study)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if absent
    out = root / "absent" / DENSE
    with pytest.raises(ConfigError, match=r"recipe\.tensorboard.*pip install 'moe-harness\[tensorboard\]'"):
        train(find_run(study, DENSE), study, root / "data", out, progress=False)
    assert not out.exists(), "refused before any work"


@pytest.mark.slow
def test_tensorboard_holds_every_logged_step_and_changes_no_number(pico):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed: pip install 'moe-harness[tensorboard]'")
    root, study = pico
    plain = train(find_run(study, MOE), study, root / "data", root / "plain" / MOE, progress=False)
    on = with_tensorboard(study)
    curves = train(find_run(on, MOE), on, root / "data", root / "curves" / MOE, progress=False)
    for key in ("final_train_loss", "final_val_loss", "spec_hash"):
        assert curves[key] == plain[key]
    numbers = ("step", "loss", "aux_loss", "grad_norm", "lr", "val_loss", "routing")
    rows = metrics(root / "curves" / MOE)
    assert [{k: r.get(k) for k in numbers} for r in rows] == [
        {k: r.get(k) for k in numbers} for r in metrics(root / "plain" / MOE)
    ]
    assert not (root / "plain" / MOE / "tensorboard").exists()

    events = scalars(root / "curves" / MOE)
    assert [step for step, _ in events["train/loss"]] == [r["step"] for r in rows]
    assert [v for _, v in events["train/loss"]] == pytest.approx([r["loss"] for r in rows], rel=1e-6)
    assert [step for step, _ in events["val/loss"]] == [r["step"] for r in rows if "val_loss" in r]
    for tag in ("train/aux_loss", "train/lr", "train/grad_norm", "train/tokens_per_s"):
        assert len(events[tag]) == len(rows)
    for layer in (0, 1):  # both blocks of the pico model hold an MoE layer
        for key in ("load_max_over_mean", "router_entropy", "dropped_fraction"):
            expected = [r["routing"][layer][key] for r in rows]
            assert [v for _, v in events[f"routing/layer{layer}/{key}"]] == pytest.approx(expected, rel=1e-6)


def test_resumed_tensorboard_shows_no_step_twice(pico):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed: pip install 'moe-harness[tensorboard]'")
    root, study = pico
    on = with_tensorboard(study)
    run, out = find_run(on, DENSE), root / "resumed" / DENSE
    with pytest.raises(Stopped):
        train(run, on, root / "data", out, stop_after=35, progress=False)
    # Resume from the checkpoint before (step 30), as after a kill: steps 31-35 are logged again.
    train(run, on, root / "data", out, progress=False, resume="previous")
    rows = metrics(out)
    assert len(list((out / "tensorboard").iterdir())) == 2, "one event file per process"
    events = scalars(out)["train/loss"]
    assert [step for step, _ in events] == [r["step"] for r in rows] == list(range(1, run.steps + 1))
    assert [v for _, v in events] == pytest.approx([r["loss"] for r in rows], rel=1e-6)


def test_tensorboard_switched_on_after_training_writes_events_from_the_log(pico):
    """recipe.tensorboard is bookkeeping, so switching it on trains nothing again: the workflow's
    start writes a finished run's events from its metrics.jsonl (a dry run only says so)."""
    pytest.importorskip("tensorboard", reason="tensorboard is not installed: pip install 'moe-harness[tensorboard]'")
    root, study = pico
    results = root / "late"
    run_dir = results / "runs" / DENSE
    train(find_run(study, DENSE), study, root / "data", run_dir, progress=False)
    assert not (run_dir / "tensorboard").exists()
    on = with_tensorboard(study)
    said = io.StringIO()
    assert backfill_events(plan(on), results, "pico", write=False, stream=said) == [DENSE]
    assert "a real run writes its events" in said.getvalue() and not (run_dir / "tensorboard").exists()
    assert backfill_events(plan(study), results, "pico", write=True, stream=said) == [], "switched off: nothing"
    assert backfill_events(plan(on), results, "pico", write=True, stream=said) == [DENSE]
    rows = metrics(run_dir)
    events = scalars(run_dir)
    assert [step for step, _ in events["train/loss"]] == [r["step"] for r in rows]
    assert [v for _, v in events["train/loss"]] == pytest.approx([r["loss"] for r in rows], rel=1e-6)
    assert [step for step, _ in events["val/loss"]] == [r["step"] for r in rows if "val_loss" in r]
    assert not list(run_dir.glob(".tensorboard*")), "no temporary folder left"
    assert backfill_events(plan(on), results, "pico", write=True, stream=said) == [], "written once"
