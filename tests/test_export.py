"""Exported Hugging Face models compute our logits; variants without an equivalent are refused."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import tiny_config, with_moe

from harness.export import NotExportable, export, hf_balancing, hf_family
from models.config import Dispatch, QKNorm, Routing

CASES = {
    "llama": (tiny_config(), "LlamaForCausalLM"),
    "llama-untied": (tiny_config(tie_embeddings=False), "LlamaForCausalLM"),
    "qwen3": (tiny_config(qk_norm=QKNorm.PER_HEAD), "Qwen3ForCausalLM"),
    "mixtral": (tiny_config(moe={"experts": 4, "top_k": 2}, d_ff=None), "MixtralForCausalLM"),
    "qwen3-moe": (tiny_config(moe={"renormalize": False}, qk_norm=QKNorm.PER_HEAD), "Qwen3MoeForCausalLM"),
    "qwen3-moe-interleaved": (
        tiny_config(moe={"every": 2, "first_dense": 1}, qk_norm=QKNorm.PER_HEAD, n_layers=4),
        "Qwen3MoeForCausalLM",
    ),
    "olmoe": (tiny_config(moe={"renormalize": False}, qk_norm=QKNorm.FULL), "OlmoeForCausalLM"),
    "qwen2-moe": (tiny_config(moe={"shared_experts": 1, "shared_gate": True}), "Qwen2MoeForCausalLM"),
}


@pytest.mark.parametrize("name", CASES)
def test_exported_logits_equal_ours(name, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg, expected_class = CASES[name]
    model = cfg.build().eval()
    with torch.no_grad():  # give routers enough spread that top-k choices are not ties
        for m in model.moe_layers:
            m.router.weight.normal_(std=0.5)
    cls = export(cfg, model.state_dict(), None, tmp_path / "hf")
    assert cls == expected_class
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(theirs).__name__ == expected_class
    idx = torch.randint(0, cfg.vocab_size, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(theirs(idx).logits, model(idx).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("moe", "overrides", "fragment"),
    [
        ({"routing": Routing.SIGMOID_BIAS}, {}, "routing 'sigmoid-bias'"),
        ({"routing": Routing.TOPK_SOFTMAX}, {}, "routing 'topk-softmax'"),
        ({"dispatch": Dispatch.CAPACITY}, {}, "capacity dispatch"),
        ({"shared_experts": 1}, {}, "shared_gate"),
        ({"renormalize": False}, {}, "only Mixtral matches"),
        ({"every": 2}, {"n_layers": 4}, "only Mixtral matches"),
    ],
)
def test_variants_without_an_equivalent_are_refused(moe, overrides, fragment):
    with pytest.raises(NotExportable, match=fragment):
        hf_family(tiny_config(moe=moe, **overrides))


def test_export_writes_a_fast_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(["def f(x):\n    return x + 1\n"] * 50, trainer=trainer)
    tok.save(str(tmp_path / "tokenizer.json"))
    cfg = tiny_config(vocab_size=tok.get_vocab_size())
    export(cfg, cfg.build().state_dict(), tmp_path / "tokenizer.json", tmp_path / "hf")
    loaded = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert loaded.is_fast and loaded.eos_token == "<|endoftext|>"
    assert loaded("return x")["input_ids"] == tok.encode("return x").ids
    assert not list(tmp_path.glob(".hf.*")), "no temporary directory left behind"


MOE_FAMILIES = ["mixtral", "qwen3-moe", "olmoe", "qwen2-moe"]


@pytest.mark.parametrize("name", MOE_FAMILIES)
def test_exported_config_carries_the_runs_balancing_losses(name, tmp_path):
    """transformers' load-balance loss times the exported router_aux_loss_coef is the run's
    weighted loss; the z-loss, which no such class has a field for, is named, not dropped."""
    from transformers import AutoModelForCausalLM

    cfg, expected_class = CASES[name]
    # One block: transformers pools the loss over layers where we average per-layer losses.
    cfg = with_moe(dataclasses.replace(cfg, n_layers=1), load_balance_coef=0.02, z_loss_coef=0.001)
    model = cfg.build().eval()
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
        router_z_loss_coef = 0.0

    fields, carried, missing = hf_balancing(moe, WithZLoss)
    assert fields["router_z_loss_coef"] == 0.001 and "z_loss_coef" in carried["router_z_loss_coef"]
    assert set(missing) == {"seq_balance_coef"} and "WithZLoss has no field" in missing["seq_balance_coef"]

    class NoField:
        pass

    _, _, missing = hf_balancing(tiny_config(moe={}).moe, NoField)
    assert missing == {}, "coefficients left at 0 were not used by the run"
