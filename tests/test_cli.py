"""The harness command as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import CONFIGS, ROOT

from models.config import load_config


def harness(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "harness", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_count_prints_published_totals():
    r = harness("count", str(CONFIGS / "reference" / "mixtral-8x7b.yaml"), str(CONFIGS / "dense-s.yaml"))
    assert r.returncode == 0, r.stderr
    row = next(line for line in r.stdout.splitlines() if line.startswith("mixtral-8x7b"))
    assert "46.70B" in row and "12.88B" in row
    assert "dense-s" in r.stdout


def test_count_json_is_exact():
    r = harness("count", str(CONFIGS / "reference" / "olmoe-1b-7b.yaml"), "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["params"]["total"] == 6_919_161_856
    assert data["params"]["active"] == 1_282_017_280
    assert set(data["training_flops_per_token"]) == {"6N_active", "detailed"}


def test_bad_config_exits_2_with_one_message(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((CONFIGS / "dense-s.yaml").read_text() + "dropout: 0.1\n")
    r = harness("count", str(bad))
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0
    assert str(bad) in r.stderr and "'dropout'" in r.stderr and "allowed keys" in r.stderr


def test_match_writes_a_loadable_config(tmp_path):
    out = tmp_path / "moe.yaml"
    r = harness("match", str(CONFIGS / "dense-s.yaml"), "--experts", "16", "--top-k", "4", "--out", str(out))
    assert r.returncode == 0, r.stderr
    cfg = load_config(out)
    assert cfg.name == "dense-s-e16k4" and cfg.moe.d_expert == 256
    assert "router" in r.stderr
    assert not list(tmp_path.glob(".*.tmp"))


def test_match_refusal_names_the_field():
    r = harness("match", str(CONFIGS / "dense-s.yaml"), "--experts", "8", "--top-k", "3")
    assert r.returncode == 2
    assert "'top_k'" in r.stderr and "split evenly" in r.stderr
