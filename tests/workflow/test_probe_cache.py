"""The probe cache of ``harness plan`` says when, where and under what load each probe was taken,
takes a probe again where it no longer stands for this host (busy, old, another CPU, cores or
torch, or ``--reprobe``), and shows each probe's age and load; an older cache is stale, a damaged
one a warning, never a traceback; ``--probes FILE`` reads another host's as it is."""

from __future__ import annotations

import dataclasses
import datetime
import inspect
import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from pico_study import STUDY, cli_output

from harness.core.provenance import cpu_name
from harness.study.runs import plan
from harness.study.spec import load_study
from harness.workflow import probe

R = ("--results", "results")
STEP_S = 0.05


@pytest.fixture
def fresh(study, monkeypatch):
    """The pico study with a run not trained yet (so the plan probes it), on a quiet host whose
    probes take STEP_S, counted in ``calls``."""
    path = study / STUDY
    data = yaml.safe_load(path.read_text())
    data["seeds"] = [1]
    path.write_text(yaml.safe_dump(data))
    monkeypatch.chdir(study)
    calls = []

    def timed(run, threads, dtype):
        calls.append(run.model.name)
        return STEP_S

    monkeypatch.setattr(probe, "probe_step_seconds", timed)
    quiet(monkeypatch, 0.25)
    return calls


def quiet(monkeypatch, load: float) -> None:
    monkeypatch.setattr(probe.host_load, "sample", lambda: {"host_load_1m": load})


def _entry(**changes) -> dict:
    now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    entry = dict(model="dense-pico", step_s=STEP_S, taken_utc=now, load_1m=0.1, steal=0.0, threads=1)
    entry |= dict(cores=os.cpu_count(), cpu=cpu_name(), torch=torch.__version__)
    return entry | changes


def _cache(probe_cache: Path) -> dict:
    return json.loads((probe_cache / "probes.json").read_text())


def _key(study: Path) -> str:
    run = plan(load_study(study / STUDY))[0]
    return probe.cache_key(run, run.recipe.train_threads or os.cpu_count(), torch.float32)


def test_a_probe_records_when_where_and_under_what_load(fresh, probe_cache):
    code, out, err = cli_output("plan", STUDY, *R)
    assert code == 0, err
    assert fresh == ["dense-pico"]
    (entry,) = _cache(probe_cache)["probes"].values()
    assert _cache(probe_cache)["format"] == probe.CACHE_FORMAT
    assert entry["step_s"] == STEP_S and entry["load_1m"] == 0.25 and entry["model"] == "dense-pico"
    assert entry["torch"] == torch.__version__ and entry["cpu"] == cpu_name() and entry["cores"] == os.cpu_count()
    taken = datetime.datetime.fromisoformat(entry["taken_utc"])
    assert abs((datetime.datetime.now(datetime.UTC) - taken).total_seconds()) < 60
    # the plan says each probe's age and load
    line = next(line for line in out.splitlines() if line.strip().startswith("dense-pico "))
    assert f"50 ms a step, probed just now, load 0.25 on {os.cpu_count()} cores" in line, out
    code, out, err = cli_output("plan", STUDY, *R)
    assert fresh == ["dense-pico"], "a fresh probe on a quiet host is reused"
    assert "cached just now, load 0.25" in out


@pytest.mark.parametrize(
    "change, why",
    [
        ({"load_1m": 9.0}, "taken on a busy host (load 9.00"),
        ({"steal": 0.2}, "taken on a busy host (20% of the CPU time stolen)"),
        ({"taken_utc": "2020-01-01T00:00:00+00:00"}, "days ago, over 14 days"),
        ({"torch": "1.0.0"}, "taken with torch 1.0.0"),
        ({"cpu": "another CPU"}, "taken on another CPU (another CPU,"),
        ({"cores": 1000}, "1000 cores"),
    ],
    ids=["busy", "steal", "old", "torch", "cpu", "cores"],
)
def test_a_cached_probe_that_no_longer_stands_is_taken_again(fresh, probe_cache, study, change, why):
    (probe_cache / "probes.json").write_text(json.dumps({"format": 2, "probes": {_key(study): _entry(**change)}}))
    code, out, err = cli_output("plan", STUDY, *R)
    assert code == 0, err
    assert fresh == ["dense-pico"], "the stale probe was used"
    assert "replaces one taken" in out and why in out, out
    (entry,) = _cache(probe_cache)["probes"].values()
    assert entry == entry | {"step_s": STEP_S, "load_1m": 0.25}


def test_a_cached_probe_that_stands_is_used_and_reprobe_takes_it_again(fresh, probe_cache, study):
    (probe_cache / "probes.json").write_text(
        json.dumps({"format": 2, "probes": {_key(study): _entry(step_s=0.07, load_1m=0.5)}})
    )
    code, out, err = cli_output("plan", STUDY, *R)
    assert code == 0, err
    assert fresh == [] and "70 ms a step, cached just now, load 0.50" in out
    code, out, err = cli_output("plan", STUDY, *R, "--reprobe")
    assert code == 0, err
    assert fresh == ["dense-pico"] and "50 ms a step, probed just now" in out


def test_the_age_limit_is_a_named_constant_and_busy_follows_the_measure_rules():
    said = inspect.getsource(probe).split("PROBE_MAX_AGE_DAYS = ")[1].split('"""')[1]
    assert probe.PROBE_MAX_AGE_DAYS == 14 and "bounds\nhow long" in said  # why that age
    cores = 2
    assert probe.busy(0.3, 0.0, 2, cores) is None  # a quiet host, the probe on every core
    assert probe.busy(0.6, 0.0, 2, cores) is not None  # another job on half a core or more
    assert probe.busy(1.4, 0.0, 1, cores) is None  # one thread: a core is still free
    assert probe.busy(1.6, 0.0, 1, cores) is not None
    assert probe.busy(None, None, 2, cores) is None  # nothing measured: nothing said
    assert "stolen" in probe.busy(0.0, 0.06, 1, cores)


def test_a_probe_on_a_busy_host_is_used_with_a_warning_and_taken_again_next_time(fresh, probe_cache, monkeypatch):
    quiet(monkeypatch, 5.0)
    code, out, err = cli_output("plan", STUDY, *R)
    assert code == 0, err
    assert "warning: dense-pico probed on a busy host (load 5.00" in out and "--reprobe" in out
    assert "a busy host, so the next plan probes it again" in out
    quiet(monkeypatch, 0.1)
    assert cli_output("plan", STUDY, *R)[0] == 0
    assert fresh == ["dense-pico", "dense-pico"]


def test_a_cache_of_an_older_harness_is_stale_not_an_error(fresh, probe_cache, study):
    (probe_cache / "probes.json").write_text(json.dumps({"0123456789abcdef01234567": 0.01, _key(study): 0.01}))
    code, out, err = cli_output("plan", STUDY, *R)
    assert code == 0, err
    assert fresh == ["dense-pico"] and "warning" not in out
    cache = _cache(probe_cache)
    assert cache["format"] == probe.CACHE_FORMAT and len(cache["probes"]) == 1  # the old entries are gone


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"[1, 2]", b"\xff\xfe\x00garbage", b'{"format": 2, "probes": []}', b'{"format": 9}'],
    ids=["not-json", "a-list", "not-utf8", "probes-not-an-object", "another-format"],
)
def test_a_damaged_cache_is_named_in_a_warning_and_ignored(fresh, probe_cache, content):
    path = probe_cache / "probes.json"
    path.write_bytes(content)
    code, out, err = cli_output("plan", STUDY, *R)
    assert code == 0, err
    assert "Traceback" not in out + err
    assert f"warning: the probe cache {path} is damaged (" in out, out
    assert fresh == ["dense-pico"]
    assert _cache(probe_cache)["format"] == probe.CACHE_FORMAT  # replaced by this plan's probes


def test_a_cache_folder_in_place_of_the_file_is_a_warning(fresh, probe_cache):
    (probe_cache / "probes.json").mkdir()
    code, out, err = cli_output("plan", STUDY, *R)
    assert code == 0, err
    assert "warning: the probe cache" in out and "Traceback" not in out + err


def test_another_hosts_probes_are_read_as_they_are(fresh, study, tmp_path, monkeypatch):
    other = _entry(cpu="the reference CPU", cores=2, taken_utc="2020-01-01T00:00:00+00:00", load_1m=0.05)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    key = _key(study)  # threads: the study's train_threads, else the cores
    run = plan(load_study(study / STUDY))[0]
    if run.recipe.train_threads is None:
        key = probe.cache_key(run, 2, torch.float32)
    path = tmp_path / "reference.json"
    path.write_text(json.dumps({"format": 2, "probes": {key: other | {"step_s": 0.2}}}))
    code, out, err = cli_output("plan", STUDY, *R, "--probes", str(path))
    assert code == 0, err
    assert fresh == [], "nothing is probed"
    assert "another host's, read from" in out and "200 ms a step, taken" in out, out
    assert "load 0.05 on 2 cores" in out
    assert json.loads(path.read_text())["probes"][key]["step_s"] == 0.2  # never written
    code, out, err = cli_output("plan", STUDY, *R, "--probes", str(tmp_path / "none.json"))
    assert code == 2 and "--probes" in err and "no such file" in err and "Traceback" not in err
    code, out, err = cli_output("plan", STUDY, *R, "--probes", str(path), "--reprobe")
    assert code == 2 and "not allowed with" in err


def test_the_json_rows_carry_the_probe(fresh):
    code, out, err = cli_output("plan", STUDY, *R, "--json")
    assert code == 0, err
    (row,) = json.loads(out)
    assert row["probe"]["step_s"] == STEP_S and row["probe"]["load_1m"] == 0.25


def test_probe_fields_round_trip():
    p = probe.Probe.from_json(_entry())
    assert p is not None and probe.Probe.from_json(p.to_json()) == p
    assert probe.Probe.from_json(0.05) is None  # format 1
    assert probe.Probe.from_json(_entry(step_s=-1)) is None
    assert probe.Probe.from_json(_entry(step_s=float("inf"))) is None
    assert probe.Probe.from_json(_entry(load_1m=float("nan"))) is None
    assert probe.Probe.from_json(_entry(taken_utc="yesterday")) is None
    assert probe.Probe.from_json({k: v for k, v in _entry().items() if k != "load_1m"}) is None
    assert dataclasses.replace(p, load_1m=None).busy() is None
