"""The README.md of an exported folder (``harness.evaluate.export``): where the model comes from, how
to load it and continue a prompt with transformers as ``harness sample`` does, what of its training
losses the transformers config holds, and the run's whole model config.

The snippet reproduces ``harness sample --temperature 0`` (harness.evaluate.sample): the prompt
follows an end-of-text token, as every training document does (harness.data.prepare writes one
before each), new tokens are each the likeliest one, and generation stops at the end-of-text token,
which is not printed. The prompt and its continuation are decoded together, as harness sample
prints them.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from models.config import ModelConfig

PROMPT = "def "
"""The snippet's prompt: the shipped studies train on Python source."""
NEW_TOKENS = 64
"""The snippet's new tokens at most; fewer where the context leaves less room."""


def new_tokens(cfg: ModelConfig, tokenizer) -> int:
    """New tokens for the snippet: what the end-of-text token and the prompt leave of the context."""
    room = cfg.max_seq_len - 1 - len(tokenizer.encode(PROMPT, add_special_tokens=False))
    return max(1, min(NEW_TOKENS, room))


def usage(folder: Path, tokens: int, hf_cfg) -> list[str]:
    """The README's section that loads the folder and continues a prompt greedily."""
    code = f"""\
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

folder = {str(folder)!r}  # this folder
tokenizer = AutoTokenizer.from_pretrained(folder)
model = AutoModelForCausalLM.from_pretrained(folder).eval()
prompt, new_tokens = {PROMPT!r}, {tokens}
# Every training document followed an end-of-text token, so the model reads a text as one that
# starts after it: harness sample puts one before the prompt, and so does this.
eos = tokenizer.eos_token_id
prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
input_ids = torch.tensor([[eos, *prompt_ids]])
with torch.no_grad():
    output = model.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=new_tokens,
        do_sample=False,  # greedy: harness sample --temperature 0
        eos_token_id=eos,
        pad_token_id=eos,
    )
new = output[0, input_ids.shape[1] :].tolist()
if new and new[-1] == eos:  # the model ended the text: the end-of-text token is not printed
    new.pop()
print(tokenizer.decode(prompt_ids + new))"""
    lines = [
        "## Use",
        "",
        "Loaded with transformers alone (AutoModelForCausalLM and the tokenizer in this folder), it continues",
        f"a prompt as `harness sample` does for the run with `--prompt {PROMPT!r} --tokens {tokens} --temperature 0`,",
        "and prints the same text:",
        "",
        "```python",
        code,
        "```",
        "",
        "Keep the end-of-text token, the prompt and the new tokens within the training context,",
        "`tokenizer.model_max_length` (max_position_embeddings in config.json): harness sample refuses",
        "more, and the model never saw a position beyond it. lm-eval reads the folder as it is:",
        f"`lm_eval --model hf --model_args pretrained={folder},dtype=float32`.",
    ]
    if getattr(hf_cfg, "n_shared_experts", None) == 0:
        lines += [
            "",
            f"{type(hf_cfg).__name__.replace('Config', 'ForCausalLM')}'s MoE blocks always have shared experts:",
            "this model's are zero wide and add nothing, and transformers warns \"Initializing zero-element",
            'tensors is a no-op" as it builds them.',
        ]
    return lines


def readme(cfg: ModelConfig, class_name: str, hf_cfg, folder: Path | None = None, tokens: int | None = None) -> str:
    """The exported folder's README.md; ``folder`` (where the export is going) and ``tokens`` (new
    tokens in the snippet) where a tokenizer is exported with it, else no snippet."""
    import transformers

    meta = hf_cfg.moe_harness
    source = meta["source"] or "a harness model"
    lines = [
        f"# {cfg.name}",
        "",
        f"Exported by harness export from {source} as {class_name} (transformers {transformers.__version__}),",
        "whose logits equal the harness model's.",
        "",
    ]
    if folder is not None and tokens is not None:
        lines += [*usage(folder, tokens, hf_cfg), ""]
    else:
        lines += ["No tokenizer was exported with it: its input is token ids.", ""]
    if cfg.moe is not None:
        lines += ["## Balancing losses of the training run", ""]
        lines += [f"- {field}: {how}" for field, how in meta["carried"].items()]
        lines += [f"- not carried: {note}" for note in meta["not_carried"].values()]
        if not meta["not_carried"]:
            lines.append(f"- every balancing loss the run used has a field in {type(hf_cfg).__name__}")
        lines.append("")
    config = yaml.safe_dump(meta["config"], sort_keys=False)
    lines += ["## Model config (moe_harness.config in config.json)", "", "```yaml", config.rstrip(), "```", ""]
    return "\n".join(lines)
