"""Exported Hugging Face models compute our logits; variants without an equivalent are refused."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import io
import json
import os
import re

import pytest
import torch
import yaml
from conftest import PICO_MODEL, tiny_config, with_moe
from pico_study import cli_output, study_dict
from synthetic_records import _rec, written

from harness.evaluate.export import NotExportable, export, hf_balancing, hf_family
from harness.study.runs import plan
from harness.study.spec import load_study
from harness.train.checkpoint import save_checkpoint
from models.config import Dispatch, QKNorm, Routing
from models.transformer import Transformer


def sensitive(moe: dict | None = None, **overrides):
    """tiny_config: 4 query heads over 2 key/value heads (GQA), d_model 32, untied embeddings; a
    RoPE base, RMSNorm epsilon and init spread far enough from the defaults that a field the
    export dropped moves the logits beyond the tolerance."""
    return tiny_config(moe, **{"rope_theta": 100.0, "norm_eps": 0.01, "init_std": 0.1, **overrides})


FAMILIES = {
    "llama": (sensitive(), "LlamaForCausalLM"),
    "qwen3": (sensitive(qk_norm=QKNorm.PER_HEAD), "Qwen3ForCausalLM"),
    "mixtral": (sensitive(moe={}, d_ff=None), "MixtralForCausalLM"),
    "qwen3-moe": (sensitive(moe={"renormalize": False}, qk_norm=QKNorm.PER_HEAD), "Qwen3MoeForCausalLM"),
    "olmoe": (sensitive(moe={"renormalize": False}, qk_norm=QKNorm.FULL), "OlmoeForCausalLM"),
    "qwen2-moe": (sensitive(moe={"shared_experts": 1, "shared_gate": True}), "Qwen2MoeForCausalLM"),
    "glm4-moe": (sensitive(moe={"routing": Routing.SIGMOID_BIAS}), "Glm4MoeForCausalLM"),
}
"""One model per target class, each with grouped-query attention."""


def variant(family: str, moe: dict | None = None, **changes):
    cfg, cls = FAMILIES[family]
    cfg = dataclasses.replace(cfg, **changes)
    return (cfg if moe is None else with_moe(cfg, **moe)), cls


HEAD_DIM = {"head_dim": 12}  # n_heads * head_dim = 48, not d_model = 32
# Blocks 0-2 dense, block 3 MoE: without mlp_only_layers block 1 would be an MoE, without
# decoder_sparse_step block 2.
INTERLEAVED = {"n_layers": 4, "d_ff": 48, "moe": {"every": 2, "first_dense": 2}}

CASES = {
    **FAMILIES,
    **{f"{f}-head-dim": variant(f, **HEAD_DIM) for f in FAMILIES if f != "olmoe"},  # olmoe: refused
    **{f"{f}-tied": variant(f, tie_embeddings=True) for f in FAMILIES},
    # Mixtral and OLMoE have an MoE in every block: refused below.
    **{f"{f}-interleaved": variant(f, **INTERLEAVED) for f in ("qwen3-moe", "qwen2-moe")},
    # Sigmoid-bias routing: the bias picks experts, the unbiased scores weigh them.
    "glm4-moe-shared": variant("glm4-moe", moe={"shared_experts": 2}),
    "glm4-moe-no-renorm": variant("glm4-moe", moe={"renormalize": False}),
    "glm4-moe-route-scale": variant("glm4-moe", moe={"route_scale": 2.5}),
    "glm4-moe-qk-norm": variant("glm4-moe", qk_norm=QKNorm.PER_HEAD),
    # Blocks 0-1 dense, 2-3 MoE: first_k_dense_replace 2.
    "glm4-moe-first-dense": variant("glm4-moe", moe={"first_dense": 2}, n_layers=4, d_ff=48),
    "glm4-moe-all-at-once": variant(
        "glm4-moe",
        moe={"first_dense": 1, "shared_experts": 1, "renormalize": False, "route_scale": 1.5},
        n_layers=3,
        d_ff=40,
        qk_norm=QKNorm.PER_HEAD,
        tie_embeddings=True,
        head_dim=12,
    ),
}


def spread(model: Transformer) -> Transformer:
    """Routers with enough spread that top-k choices are not ties, selection biases that change
    some choices (test_export_sigmoid_bias.py shows they do), and norms that differ, so each
    must land in its place."""
    for m in model.moe_layers:
        m.router.weight.normal_(std=0.5)
        if m.router.bias is not None:
            m.router.bias.normal_(std=0.3)
    for key, w in model.named_parameters():
        if "norm" in key:
            w.normal_(1.0, 0.3)
    return model


@pytest.mark.parametrize("name", CASES)
def test_exported_logits_equal_ours(name, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg, expected_class = CASES[name]
    model = Transformer(cfg).eval()
    with torch.no_grad():
        spread(model)
    cls = export(cfg, model.state_dict(), None, tmp_path / "hf")
    assert cls == expected_class
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(theirs).__name__ == expected_class
    tied = theirs.lm_head.weight is theirs.model.embed_tokens.weight
    assert tied == cfg.tie_embeddings, "fine-tuning the export keeps the embeddings tied, or untied, as ours"
    idx = torch.randint(0, cfg.vocab_size, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(theirs(idx).logits, model(idx).logits, rtol=1e-4, atol=1e-4)


SB = {"routing": Routing.SIGMOID_BIAS}


@pytest.mark.parametrize(
    ("moe", "overrides", "fragment"),
    [
        ({"routing": Routing.TOPK_SOFTMAX}, {}, "routing 'topk-softmax'"),
        ({"routing": Routing.NOISY_TOPK}, {}, "routing 'noisy-topk'"),
        ({"dispatch": Dispatch.CAPACITY}, {}, "capacity dispatch"),
        ({"route_scale": 2.5}, {}, "route_scale 2.5"),
        ({"force_balanced": True}, {}, "force_balanced"),
        ({"shared_experts": 1}, {}, "shared_gate"),
        ({"shared_experts": 1, "shared_gate": True}, {"qk_norm": QKNorm.PER_HEAD}, "without QK-norm"),
        ({"renormalize": False}, {}, "only Mixtral matches"),
        ({"every": 2}, {"n_layers": 4}, "only Mixtral matches"),
        ({"first_dense": 1}, {"d_ff": 48}, "only Mixtral matches"),
        ({"first_dense": 1}, {"qk_norm": QKNorm.FULL, "d_ff": 48}, "OLMoE has an MoE in every block"),
        ({}, {"qk_norm": QKNorm.FULL, "head_dim": 12}, "head_dim 12 with qk_norm 'full'.* = 48.*d_model 32"),
        ({}, {"qk_norm": QKNorm.FULL, "head_dim": 4}, "head_dim 4 with qk_norm 'full'.* = 16.*d_model 32"),
        (None, {"qk_norm": QKNorm.FULL}, "qk_norm 'full' on a dense model"),
        ({**SB, "shared_experts": 1, "shared_gate": True}, {}, "shared_gate: no transformers class"),
        (SB, {"qk_norm": QKNorm.FULL}, "qk_norm 'full' with sigmoid-bias routing"),
        ({**SB, "every": 2}, {"n_layers": 4, "d_ff": 48}, r"moe.every 2 leaves block\(s\) \[2\] dense after"),
        ({**SB, "experts": 1, "top_k": 1}, {}, "experts 1"),
        ({**SB, "dispatch": Dispatch.CAPACITY}, {}, "capacity dispatch"),
        ({**SB, "force_balanced": True}, {}, "force_balanced"),
    ],
    ids=[
        "sigmoid-bias",
        "topk-softmax",
        "capacity",
        "route-scale",
        "force-balanced",
        "ungated-shared",
        "qwen2-moe-qk-norm",
        "mixtral-no-renorm",
        "mixtral-interleaved",
        "mixtral-first-dense",
        "olmoe-interleaved",
        "olmoe-head-dim-wider",
        "olmoe-head-dim-narrower",
        "dense-full-qk-norm",
        "sigmoid-bias-shared-gate",
        "sigmoid-bias-full-qk-norm",
        "sigmoid-bias-interleaved",
        "sigmoid-bias-one-expert",
        "sigmoid-bias-capacity",
        "sigmoid-bias-force-balanced",
    ],
)
def test_variants_without_an_equivalent_are_refused(moe, overrides, fragment):
    with pytest.raises(NotExportable, match=fragment):
        hf_family(tiny_config(moe=moe, **overrides))


def write_tokenizer(path):
    """The project's byte-level BPE (harness.data.prepare), trained on a line of Python."""
    from harness.data.prepare import train_tokenizer

    tok = train_tokenizer(["def f(x):\n    return x + 1\n"] * 50, 300)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return tok


def test_export_writes_a_fast_tokenizer_that_knows_the_context(tmp_path):
    from transformers import AutoTokenizer

    tok = write_tokenizer(tmp_path / "tokenizer.json")
    cfg = tiny_config(vocab_size=tok.get_vocab_size())
    export(cfg, Transformer(cfg).state_dict(), tmp_path / "tokenizer.json", tmp_path / "hf")
    loaded = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert loaded.is_fast and loaded.eos_token == "<|endoftext|>"
    assert loaded("return x")["input_ids"] == tok.encode("return x").ids
    assert loaded.model_max_length == cfg.max_seq_len == 16, "the training context, not transformers' 1e30"
    assert not list(tmp_path.glob(".hf.*")), "no temporary directory left behind"


@pytest.mark.parametrize(
    ("umask", "folder", "file"), [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)], ids=["022", "027"]
)
def test_an_export_follows_the_umask(umask, folder, file, tmp_path):
    write_tokenizer(tmp_path / "tokenizer.json")
    cfg = tiny_config(vocab_size=97)
    old = os.umask(umask)
    try:
        export(cfg, Transformer(cfg).state_dict(), tmp_path / "tokenizer.json", tmp_path / "hf")
    finally:
        os.umask(old)
    written = [tmp_path / "hf", *(tmp_path / "hf").rglob("*")]
    modes = {p.relative_to(tmp_path).as_posix(): oct(p.stat().st_mode & 0o777) for p in written}
    assert "hf/model.safetensors" in modes
    assert modes == {name: oct(folder if (tmp_path / name).is_dir() else file) for name in modes}


def test_an_earlier_export_is_replaced_and_any_other_file_kept(tmp_path):
    from harness.core.errors import HarnessError

    cfg = tiny_config()
    state = Transformer(cfg).state_dict()
    export(cfg, state, None, tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors").write_bytes(b"an older export's weights")
    export(cfg, state, None, tmp_path / "hf")
    assert (tmp_path / "hf" / "model.safetensors").read_bytes() != b"an older export's weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"], "nothing set aside is left behind"
    (tmp_path / "hf" / "notes.txt").write_text("the user's")
    with pytest.raises(HarnessError, match=r"hf holds files that no earlier export wrote \(notes.txt\)"):
        export(cfg, state, None, tmp_path / "hf")
    assert (tmp_path / "hf" / "notes.txt").read_text() == "the user's"
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("not an export")
    with pytest.raises(HarnessError, match="no earlier export wrote"):
        export(cfg, state, None, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "not an export"


def test_a_failed_write_leaves_the_earlier_export_and_no_temporary_folder(tmp_path, monkeypatch):
    from harness.core.errors import DiskFull

    cfg = tiny_config()
    state = Transformer(cfg).state_dict()
    export(cfg, state, None, tmp_path / "hf", source="first")
    before = {p.name: p.read_bytes() for p in (tmp_path / "hf").iterdir()}

    def full(*_):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("harness.evaluate.export.readme", full)  # fails after the weights are written
    with pytest.raises(DiskFull, match="disk is full"):
        export(cfg, state, None, tmp_path / "hf", source="second")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
    assert {p.name: p.read_bytes() for p in (tmp_path / "hf").iterdir()} == before


def trained_study(
    root, model_fields: dict, tokenizer: bool = True, weights=None, vocab_size: int | None = None
) -> tuple[str, str, str]:
    """A study folder whose one run of ``model_fields`` has finished: record.json, a checkpoint
    of freshly initialised weights (changed in place by ``weights``, given the model) and
    (``tokenizer``) the tokenizer; ``vocab_size``, the study's vocabulary and so its models', where
    given. (study file, results root, run id)."""
    (root / "model.yaml").write_text(yaml.safe_dump(model_fields))
    spec = study_dict(root)
    if vocab_size is not None:
        spec["data"]["vocab_size"] = vocab_size
    (root / "study.yaml").write_text(yaml.safe_dump(spec))
    (run,) = plan(load_study(root / "study.yaml"))
    results = root / "results" / "pico"
    run_dir = results / "runs" / run.run_id
    run_dir.mkdir(parents=True)
    moe = run.model.moe
    arm = {"arm": "dense"} if moe is None else {"arm": "moe", "experts": moe.experts, "top_k": moe.top_k}
    record = _rec(run.model.name, budget=run.budget, active=1e5, total=1e5, loss=3.0, seed=run.seed, **arm)
    (run_dir / "record.json").write_text(json.dumps(written(record, "pico")))
    model = Transformer(run.model)
    if weights is not None:
        with torch.no_grad():
            weights(model)
    save_checkpoint({"model": model.state_dict()}, run_dir / "checkpoint.pt")
    if tokenizer:
        write_tokenizer(results / "data" / "tokenizer.json")
    return str(root / "study.yaml"), str(root / "results"), run.run_id


FULL_QK_NORM_HEAD_DIM = {
    "name": "moe-hd",
    "vocab_size": 97,
    "d_model": 32,
    "n_layers": 2,
    "n_heads": 4,
    "head_dim": 12,
    "max_seq_len": 16,
    "qk_norm": "full",
    "moe": {"experts": 4, "top_k": 2, "d_expert": 24},
}
"""MoE with full QK-norm and head_dim 12 != d_model / n_heads = 8."""


def assert_one_line_error(code: int, out: str, err: str, *fragments: str) -> None:
    assert code == 2, err
    assert out == "" and "Traceback" not in err and "internal error" not in err
    assert err.startswith("harness export: error: ") and err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment in err, err


def test_cli_refuses_full_qk_norm_with_another_head_dim_in_one_line(tmp_path):
    study, results, run_id = trained_study(tmp_path, FULL_QK_NORM_HEAD_DIM)
    code, out, err = cli_output("export", study, "--results", results, "--run", run_id)
    assert_one_line_error(code, out, err, "moe-hd", "head_dim 12", "qk_norm 'full'", "OLMoE", "d_model 32")
    assert not (tmp_path / "results" / "pico" / "export").exists(), "nothing written"


def test_cli_names_the_run_and_the_tensors_when_transformers_builds_another_shape(tmp_path, monkeypatch):
    """Should a mapping miss an assumption of its class, the export stops with the tensors that
    differ, not a RuntimeError from load_state_dict, and writes nothing."""
    study, results, run_id = trained_study(tmp_path, FULL_QK_NORM_HEAD_DIM)
    monkeypatch.setattr("harness.evaluate.export.hf_family", lambda cfg: "olmoe")  # as before the refusal
    code, out, err = cli_output("export", study, "--results", results, "--run", run_id)
    assert_one_line_error(
        code, out, err, f"run {run_id}", "OlmoeForCausalLM", "q_norm.weight is (48,) in the run, (32,) in"
    )
    assert not (tmp_path / "results" / "pico" / "export").exists(), "nothing written"


def test_cli_asks_for_the_tokenizer_when_the_data_folder_is_gone(tmp_path):
    study, results, run_id = trained_study(tmp_path, PICO_MODEL, tokenizer=False)
    code, out, err = cli_output("export", study, "--results", results, "--run", run_id)
    assert_one_line_error(code, out, err, "tokenizer.json does not exist", "harness data")
    assert not (tmp_path / "results" / "pico" / "export").exists(), "nothing written"


MOE_FAMILIES = ["mixtral", "qwen3-moe", "olmoe", "qwen2-moe"]


@pytest.mark.parametrize("name", MOE_FAMILIES)
def test_exported_config_carries_the_runs_balancing_losses(name, tmp_path):
    """transformers' load-balance loss times the exported router_aux_loss_coef is the run's
    weighted loss; the z-loss, which no such class has a field for, is named, not dropped."""
    from transformers import AutoModelForCausalLM

    cfg, expected_class = CASES[name]
    # One block: transformers pools the loss over layers where we average per-layer losses.
    cfg = with_moe(dataclasses.replace(cfg, n_layers=1), load_balance_coef=0.02, z_loss_coef=0.001)
    model = Transformer(cfg).eval()
    with torch.no_grad():  # uneven routing, so the loss is not its uniform value
        model.moe_layers[0].router.weight.normal_(std=0.5)
    export(cfg, model.state_dict(), None, tmp_path / "hf", source="study t, run r")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    idx = torch.randint(0, cfg.vocab_size, (2, 16))
    with torch.no_grad():
        model(idx)
        aux = theirs(idx, output_router_logits=True).aux_loss
    lb = model.moe_layers[0].stats.load_balance_loss
    assert not torch.isclose(lb, torch.tensor(1.0), atol=1e-3), "routing too even to tell the losses apart"
    torch.testing.assert_close(aux, cfg.moe.top_k * lb, rtol=1e-4, atol=1e-6)  # k assignments per token
    torch.testing.assert_close(theirs.config.router_aux_loss_coef * aux, cfg.moe.load_balance_coef * lb)
    assert theirs.config.output_router_logits is False
    meta = json.loads((tmp_path / "hf" / "config.json").read_text())["moe_harness"]
    assert meta["config"] == cfg.to_dict() and meta["source"] == "study t, run r"
    assert set(meta["not_carried"]) == {"z_loss_coef"}
    assert expected_class.replace("ForCausalLM", "Config") in meta["not_carried"]["z_loss_coef"]
    readme = (tmp_path / "hf" / "README.md").read_text()
    assert "not carried: z_loss_coef 0.001" in readme and "study t, run r" in readme
    # output_router_logits stays off because, on, a padded batch cannot generate.
    mask = torch.ones_like(idx)
    mask[0, :3] = 0
    generated = theirs.generate(idx, attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert generated.shape == (2, 18)


def test_a_class_field_is_filled_and_only_used_coefficients_get_a_note():
    moe = tiny_config(moe={"z_loss_coef": 0.001, "seq_balance_coef": 1e-4}).moe

    class WithZLoss:  # as Switch Transformers' config has
        router_aux_loss_coef = 0.001
        router_z_loss_coef = 0.0

    fields, carried, missing = hf_balancing(moe, WithZLoss)
    assert fields["router_z_loss_coef"] == 0.001 and "z_loss_coef" in carried["router_z_loss_coef"]
    assert set(missing) == {"seq_balance_coef"} and "WithZLoss has no field" in missing["seq_balance_coef"]

    class NoField:
        router_aux_loss_coef = 0.001

    _, _, missing = hf_balancing(tiny_config(moe={}).moe, NoField)
    assert missing == {}, "coefficients left at 0 were not used by the run"


SIGMOID_BIAS_MODEL = {
    "name": "moe-sb",
    "vocab_size": 512,  # the study's: the tokenizer's
    "d_model": 32,
    "n_layers": 2,
    "n_heads": 4,
    "n_kv_heads": 2,
    "max_seq_len": 32,
    "tie_embeddings": True,
    "init_std": 0.3,  # logits far enough apart that no greedy step is a near tie
    "moe": {"experts": 4, "top_k": 2, "d_expert": 24, "routing": "sigmoid-bias", "load_balance_coef": 0.0},
}
"""The shipped studies' MoE in small: sigmoid-bias routing, tied embeddings, grouped-query attention."""


def readme_snippet(readme: str) -> str:
    (code,) = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    return code


def test_the_readmes_snippet_prints_what_harness_sample_prints(tmp_path, monkeypatch):
    """The exported folder's README.md loads it with transformers alone and continues the prompt
    greedily after an end-of-text token, printing the text harness sample prints at temperature 0."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok = write_tokenizer(tmp_path / "results" / "pico" / "data" / "tokenizer.json")
    vocab = tok.get_vocab_size()
    study, results, run_id = trained_study(tmp_path, SIGMOID_BIAS_MODEL, False, spread, vocab_size=vocab)
    out = tmp_path / "hf"
    code, printed, err = cli_output("export", study, "--results", results, "--run", run_id, "--out", str(out))
    assert code == 0 and "Glm4MoeForCausalLM" in printed, err
    readme = (out / "README.md").read_text()
    snippet = readme_snippet(readme)
    tokens = 32 - 1 - len(tok.encode("def ").ids)  # what the end-of-text token and the prompt leave
    assert f"folder = {str(out)!r}" in snippet and f"prompt, new_tokens = 'def ', {tokens}" in snippet
    assert f"--prompt 'def ' --tokens {tokens} --temperature 0" in readme
    argv = ("sample", study, "--results", results, "--run", run_id, "--prompt", "def ", "--tokens", str(tokens))
    code, sampled, err = cli_output(*argv, "--temperature", "0")
    assert code == 0, err
    assert sampled.startswith("def ") and len(tok.encode(sampled.removesuffix("\n")).ids) > 10, sampled
    with contextlib.redirect_stdout(io.StringIO()) as generated:
        exec(compile(snippet, str(out / "README.md"), "exec"), {})
    assert generated.getvalue() == sampled
    # Without the end-of-text token first, the continuation is another one: the snippet needs it.
    without = snippet.replace("[[eos, *prompt_ids]]", "[prompt_ids]")
    with contextlib.redirect_stdout(io.StringIO()) as other:
        exec(compile(without, "without-eos", "exec"), {})
    assert other.getvalue() != sampled
