"""What a finished run records about how it was trained: the registration block it trained under."""

from __future__ import annotations

import pytest
import yaml
from pico_study import MODEL, study_dict, write_corpus

from harness.data.prepare import prepare
from harness.study.runs import find_run
from harness.study.spec import load_study, registration_hash
from harness.train.run import train

pytestmark = pytest.mark.usefixtures("one_thread")
REGISTRATION = {"primary": {"moe": "dense-pico-e4k2", "dense": "dense-pico", "budget": 6e9}}


def test_a_run_records_the_hash_of_the_registration_block_it_trained_under(tmp_path):
    write_corpus(tmp_path)
    (tmp_path / "model.yaml").write_text(yaml.safe_dump(MODEL))
    spec = study_dict(tmp_path)
    spec["models"].append({"base": str(tmp_path / "model.yaml"), "experts": 4, "top_k": 2})
    spec["registration"] = REGISTRATION
    spec["seeds"] = [0, 1]  # a registered paired test needs two shared seeds
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(spec))
    study = load_study(tmp_path / "study.yaml")
    assert study.registration_sha256 == registration_hash(spec) != ""
    prepare(study, tmp_path / "data")
    run = find_run(study, "dense-pico_6e9_s0")  # one of them is enough here
    record = train(run, study, tmp_path / "data", tmp_path / "runs" / run.run_id)
    assert record["registration_sha256"] == study.registration_sha256
    # The hash is of the block as written: an edit to it changes the hash, one elsewhere does not.
    edited = spec | {"registration": {"primary": REGISTRATION["primary"] | {"delta_min": 0.02}}}
    assert registration_hash(edited) != registration_hash(spec)
    assert registration_hash(spec | {"description": "another"}) == registration_hash(spec)
    assert registration_hash({"name": "no registration"}) == ""
