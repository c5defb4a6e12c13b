"""Config loading: every shipped file validates; bad input gets one message naming file and field."""

from __future__ import annotations

import pytest
from conftest import CONFIGS

from models.config import ConfigError, Dispatch, ModelConfig, Routing, dump_config, load_config

SHIPPED = sorted(CONFIGS.rglob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_configs_load_and_round_trip(path, tmp_path):
    cfg = load_config(path)
    assert isinstance(cfg, ModelConfig)
    again = tmp_path / "again.yaml"
    again.write_text(dump_config(cfg))
    assert load_config(again) == cfg


def test_defaults_resolve():
    cfg = load_config(CONFIGS / "dense-s.yaml")
    assert cfg.head_dim == cfg.d_model // cfg.n_heads
    moe = load_config(CONFIGS / "moe-s-e8k2.yaml")
    assert moe.moe.routing is Routing.SOFTMAX_TOPK and moe.moe.dispatch is Dispatch.DROPLESS
    assert moe.granularity == 2.0


BAD = [
    ("unknown key", "n_layer: 4\n", "n_layer", "unknown key; allowed keys:"),
    ("nested unknown key", "moe: {experts: 4, top_k: 2, d_expert: 8, topk: 1}\n", "moe.topk", "unknown key"),
    ("wrong type", "n_layers: four\n", "n_layers", "must be an integer"),
    ("bool is not an int", "n_layers: true\n", "n_layers", "must be an integer"),
    ("k above E", "moe: {experts: 4, top_k: 5, d_expert: 8}\n", "moe.top_k", "must be <= experts (4)"),
    ("bad enum", "moe: {experts: 4, top_k: 2, d_expert: 8, routing: top2}\n", "moe.routing", "'softmax-topk'"),
    ("missing nested", "moe: {experts: 4, d_expert: 8}\n", "moe.top_k", "required but missing"),
    ("gqa", "n_kv_heads: 3\n", "n_kv_heads", "must divide n_heads"),
    ("negative coef", "moe: {experts: 4, top_k: 2, d_expert: 8, z_loss_coef: -1}\n", "moe.z_loss_coef", ">= 0"),
    (
        "load loss needs noise",
        "moe: {experts: 4, top_k: 2, d_expert: 8, load_coef: 0.1}\n",
        "moe.load_coef",
        "noisy-topk",
    ),
    ("qk norm", "qk_norm: yes\n", "qk_norm", "'per-head'"),
    ("d_ff needed", "d_ff: null\n", "d_ff", "required"),
]

BASE = "name: t\nvocab_size: 64\nd_model: 16\nn_layers: 2\nn_heads: 4\nd_ff: 32\nmax_seq_len: 8\n"


@pytest.mark.parametrize("case", BAD, ids=lambda c: c[0])
def test_bad_config_names_file_field_and_allowed(case, tmp_path):
    _, patch, field, fragment = case
    lines = {line.split(":")[0]: line for line in BASE.splitlines()}
    key = patch.split(":")[0]
    lines[key] = patch.rstrip("\n")
    path = tmp_path / "bad.yaml"
    path.write_text("\n".join(lines.values()) + "\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert str(path) in message
    assert f"'{field}'" in message
    assert fragment in message


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="no such model config file"):
        load_config(tmp_path / "absent.yaml")
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(path)
