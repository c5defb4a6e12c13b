"""What the training loss is, and why validation can sit below it: the logged loss is the
cross-entropy alone (no auxiliary or z-loss) and the models have no dropout nor train-only noise
in the shipped studies' configurations, so a gap between training and validation loss comes from
the text of the splits; a record gives the final weights' loss on the training split under the
validation protocol to show it, and its training loss smoothed over the final tenth."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import ROOT
from pico_study import MODEL, study_dict, write_corpus

from harness.data.prepare import TokenShard, prepare
from harness.evaluate.lm_eval_model import load_run_model
from harness.study.runs import find_run, plan
from harness.study.spec import load_study
from harness.train.loop import evaluate
from harness.train.precision import resolve
from harness.train.run import train
from harness.train.train_loss import SMOOTHING, train_loss_smoothed
from models.transformer import Transformer

pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny_models():
    """The tiny study's two models, as its file resolves them."""
    return {run.model.name: run.model for run in plan(load_study(ROOT / "workflows" / "studies" / "tiny.yaml"))}


@pytest.mark.parametrize("name", ["dense-d64", "moe-d64-e16k2"])
def test_the_logged_loss_is_cross_entropy_alone_and_training_mode_changes_nothing(name):
    cfg = _tiny_models()[name]
    torch.manual_seed(0)
    model = Transformer(cfg)
    x = torch.randint(0, cfg.vocab_size, (4, 64))
    y = torch.randint(0, cfg.vocab_size, (4, 64))
    model.train()
    out = model(x, y)
    ce = F.cross_entropy(out.logits.reshape(-1, cfg.vocab_size).float(), y.reshape(-1))
    assert float(out.loss.detach()) == pytest.approx(float(ce.detach()), rel=1e-5)  # what metrics.jsonl logs as loss
    if cfg.moe is not None:
        assert float(out.aux_loss.detach()) > 0  # the z-loss is there, and kept out of the logged loss
    model.eval()
    with torch.no_grad():
        assert float(model(x, y).loss) == pytest.approx(float(out.loss.detach()), rel=1e-6)  # no dropout, no noise


def test_no_model_has_dropout():
    for path in sorted((ROOT / "models").glob("*.py")):
        assert "dropout" not in path.read_text().lower(), path
    for path in sorted((ROOT / "models" / "configs").glob("*.yaml")):
        assert "dropout" not in path.read_text().lower(), path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("trainloss")
    write_corpus(root)
    (root / "model.yaml").write_text(yaml.safe_dump(MODEL))
    (root / "study.yaml").write_text(yaml.safe_dump(study_dict(root)))
    study = load_study(root / "study.yaml")
    prepare(study, root / "data")
    run = find_run(study, "dense-pico_6e9_s0")
    record = train(run, study, root / "data", root / "run", progress=False)
    return root, study, record


@pytest.mark.slow
def test_the_record_smooths_the_training_loss_and_scores_the_final_weights_on_the_training_split(trained):
    root, study, record = trained
    rows = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    assert record["train_loss_smoothed"] == train_loss_smoothed(rows) and record["train_loss_smoothing"] == SMOOTHING
    assert record["final_train_loss"] == rows[-1]["loss"]  # one batch, kept for what it is
    model, _, _ = load_run_model(root / "run", torch.device("cpu"))
    r = study.recipe
    shards = {split: TokenShard(root / "data", split, r.seq_len) for split in ("train", "validation")}
    precision = resolve(r, torch.device("cpu"))
    again = {s: evaluate(model, shard, r, torch.device("cpu"), precision) for s, shard in shards.items()}
    assert record["final_train_split_loss"] == pytest.approx(again["train"], rel=1e-6)
    assert record["final_val_loss"] == pytest.approx(again["validation"], rel=1e-6)
