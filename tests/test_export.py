"""Exported Hugging Face models compute our logits; variants without an equivalent are refused."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config

from harness.export import NotExportable, export, hf_family
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
