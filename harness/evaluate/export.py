"""Export a trained model to a Hugging Face directory that ``transformers`` loads as is.

    harness export tiny --run dense-d64_7e12_s0 --out exported/dense-d64

The target class is the one whose computation equals ours; a variant with no faithful
equivalent is refused with the reason rather than exported approximately:

  dense, no QK-norm                         -> LlamaForCausalLM
  dense, per-head QK-norm                   -> Qwen3ForCausalLM
  MoE softmax-topk + renorm, every block    -> MixtralForCausalLM   (no QK-norm, no shared experts)
  MoE softmax-topk, per-head QK-norm        -> Qwen3MoeForCausalLM  (norm_topk_prob = renormalize)
  MoE softmax-topk, full QK-norm            -> OlmoeForCausalLM     (every block MoE, n_heads * head_dim = d_model)
  MoE softmax-topk, gated shared experts    -> Qwen2MoeForCausalLM  (no QK-norm)

Every class takes head_dim, num_key_value_heads (grouped-query attention), the RoPE base
(rope_parameters), rms_norm_eps and tie_word_embeddings from its config, so those fields map one
to one, head_dim given explicitly (Qwen3-MoE, OLMoE and Qwen2-MoE read it through
``getattr(config, "head_dim", ...)``). The exception is OLMoE's full-width QK-norm: OlmoeAttention
sizes q_norm from hidden_size and k_norm from hidden_size // n_heads * n_kv_heads, which are our
n_heads * head_dim and n_kv_heads * head_dim only when head_dim = d_model / n_heads; any other
head_dim is refused. Qwen's MoE classes place sparse layers as we do ((i + 1) % decoder_sparse_step
== 0, with ``mlp_only_layers`` for leading dense blocks); Mixtral and OLMoE have an MoE in every
block, so a model with dense blocks is refused there. Also refused: a dense model with full QK-norm
(OLMo 2 has one, but normalises after attention and FFN, Olmo2DecoderLayer), routing other than
softmax over E then top-k, capacity dispatch, route_scale other than 1, forced-balanced routing,
and shared experts other than Qwen2-MoE's (gated, no QK-norm). The tokenizer is exported as a fast
tokenizer.

Should transformers still build something other than the mapping expects, the export stops with
the tensors that do not fit, naming the run, before anything is written; the folder is written
under a temporary name and moved into place, so it is either absent or complete: every failure
removes what it wrote (the temporary folder, folders made for the export) and puts an earlier
export it had set aside back in place.

Symbolic links are never followed to delete or write anything, nor replaced. ``--out`` that is
a link (to a folder, to a file, or to nothing) is refused, naming the link and, where its target
can be one, the path to give as ``--out`` instead: the export writes a folder of its own at
``--out``. A link in a folder above it is the user's way to put exports elsewhere, so the export is
written in its target; one that leads nowhere is refused. Exporting again into an earlier export
refuses, naming them, the links in it, whatever their names: an export writes no link, so every
link there is a user's (moving a link out of the folder leaves its target as it is).

The run's balancing losses travel with the weights: the load-balance coefficient becomes the
class's ``router_aux_loss_coef`` (rescaled to transformers' form of the loss), a coefficient
with a field of its own in the class fills it, and every coefficient the run used that the
class has no field for is named in the folder's README.md and under ``moe_harness`` in
config.json, with the run's whole model config, rather than dropped.
"""

from __future__ import annotations

import errno
import fnmatch
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml

from harness.core.errors import DiskFull, HarnessError, os_failure
from harness.core.io import NO_SPACE, follow_umask, free_bytes
from models.config import Dispatch, ModelConfig, MoEConfig, QKNorm, Routing


class NotExportable(ValueError):
    pass


def hf_family(cfg: ModelConfig) -> str:
    """The transformers architecture that computes exactly what ``cfg`` does, or NotExportable."""
    m = cfg.moe
    if m is None:
        if cfg.qk_norm is QKNorm.NONE:
            return "llama"
        if cfg.qk_norm is QKNorm.PER_HEAD:
            return "qwen3"
        raise NotExportable(
            f"{cfg.name}: qk_norm '{cfg.qk_norm.value}' on a dense model has no transformers class "
            "(OLMo 2's full-width QK-norm comes with norms after attention and FFN, not before)"
        )
    problems = []
    if m.routing is not Routing.SOFTMAX_TOPK:
        problems.append(f"routing '{m.routing.value}' (transformers' MoE classes use softmax over E, then top-k)")
    if m.dispatch is not Dispatch.DROPLESS:
        problems.append("capacity dispatch drops tokens; transformers' MoE blocks are dropless")
    if m.route_scale != 1.0:
        problems.append(f"route_scale {m.route_scale}")
    if m.force_balanced:
        problems.append("force_balanced routing")
    dense_blocks = cfg.n_dense_layers > 0
    if m.shared_experts:
        if not m.shared_gate or cfg.qk_norm is not QKNorm.NONE:
            problems.append("shared experts export only as Qwen2-MoE: with shared_gate and without QK-norm")
        family = "qwen2_moe"
    elif cfg.qk_norm is QKNorm.PER_HEAD:
        family = "qwen3_moe"
    elif cfg.qk_norm is QKNorm.FULL:
        family = "olmoe"
        if dense_blocks:
            problems.append("OLMoE has an MoE in every block")
        # OlmoeAttention sizes q_norm from hidden_size and k_norm from hidden_size // n_heads *
        # n_kv_heads: ours span n_heads * head_dim and n_kv_heads * head_dim, equal only here.
        if cfg.n_heads * cfg.head_dim != cfg.d_model:
            problems.append(
                f"head_dim {cfg.head_dim} with qk_norm 'full': the norms span n_heads * head_dim = "
                f"{cfg.n_heads * cfg.head_dim}, but OLMoE sizes them from hidden_size (d_model {cfg.d_model})"
            )
    else:
        family = "mixtral" if m.renormalize and not dense_blocks else "qwen3_moe"
        if family == "qwen3_moe":
            problems.append(
                "without QK-norm only Mixtral matches (renormalised gates, MoE in every block); "
                "Qwen3-MoE would add a QK-norm"
            )
    if problems:
        raise NotExportable(f"{cfg.name} has no faithful transformers equivalent: " + "; ".join(problems))
    return family


LOSSES = {
    "z_loss_coef": ("router z-loss (ST-MoE)", "router_z_loss_coef"),
    "importance_coef": ("CV(importance)^2 loss (Shazeer et al. 2017)", None),
    "load_coef": ("smooth CV(load)^2 loss (Shazeer et al. 2017)", None),
    "seq_balance_coef": ("sequence-wise balance loss (DeepSeek-V3)", None),
}
"""Our balancing coefficients besides load_balance_coef: what each weights, and the transformers
config field that holds it where some class has one (Switch Transformers' router_z_loss_coef)."""

CLASSES = {
    "llama": "LlamaConfig",
    "qwen3": "Qwen3Config",
    "mixtral": "MixtralConfig",
    "olmoe": "OlmoeConfig",
    "qwen3_moe": "Qwen3MoeConfig",
    "qwen2_moe": "Qwen2MoeConfig",
}


def hf_balancing(m: MoEConfig, config_class: type) -> tuple[dict[str, Any], dict[str, str], dict[str, str]]:
    """The run's balancing losses for ``config_class``: (its config fields, how each was derived,
    a note per coefficient the run used that it has no field for)."""
    name = config_class.__name__
    # transformers' load_balancing_loss_func counts all T*k assignments, so sum_i f_i = k, where
    # ours normalises sum_i f_i = 1 (models/moe.py switch_balance_loss, Fedus et al. 2021 eq. 4):
    # its loss is k times ours, and alpha / k applies the run's penalty.
    fields: dict[str, Any] = {"router_aux_loss_coef": m.load_balance_coef / m.top_k}
    carried = {
        "router_aux_loss_coef": (
            f"load_balance_coef {m.load_balance_coef} / top_k {m.top_k}: transformers' load-balancing "
            "loss counts all k choices per token, so it is k times ours. It pools the counts and "
            "probabilities over layers before the product where we average per-layer losses: the "
            "two agree for one MoE layer and for uniform routing"
        ),
        # On, transformers cannot generate from a padded batch (the new token's router logits
        # meet the whole attention mask), so the export is for inference as trained.
        "output_router_logits": (
            "false, so batched generation works; set it to true to fine-tune with the load-balance loss"
        ),
    }
    fields["output_router_logits"] = False
    defaults = config_class()
    missing = {}
    for coef, (what, field) in LOSSES.items():
        value = getattr(m, coef)
        if field is not None and hasattr(defaults, field):
            fields[field] = value
            carried[field] = f"{coef} {value}"
        elif value:
            missing[coef] = (
                f"{coef} {value}: the run trained with the {what}; {name} has no field for it, so "
                "transformers computes no such loss when training this model further"
            )
    return fields, carried, missing


def hf_config(cfg: ModelConfig, family: str, eos_id: int | None, source: str | None = None):
    """The transformers config of ``family`` for ``cfg``; ``moe_harness`` in it records the run's
    model config, how its balancing losses were carried and which have no field."""
    import transformers

    common: dict[str, Any] = {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "torch_dtype": "float32",
    }
    cls = getattr(transformers, CLASSES[family])
    common["moe_harness"] = {"source": source, "config": cfg.to_dict()}
    m = cfg.moe
    if m is None:
        return cls(**common, intermediate_size=cfg.d_ff, attention_bias=False)
    balancing, carried, missing = hf_balancing(m, cls)
    common["moe_harness"] |= {"carried": carried, "not_carried": missing}
    moe = {"num_experts_per_tok": m.top_k, **balancing}
    if family == "mixtral":
        return cls(**common, **moe, intermediate_size=m.d_expert, num_local_experts=m.experts, router_jitter_noise=0.0)
    if family == "olmoe":
        return cls(**common, **moe, intermediate_size=m.d_expert, num_experts=m.experts, norm_topk_prob=m.renormalize)
    sparse = {
        "num_experts": m.experts,
        "moe_intermediate_size": m.d_expert,
        "intermediate_size": cfg.d_ff or m.d_expert,
        "norm_topk_prob": m.renormalize,
        "decoder_sparse_step": m.every,
        "mlp_only_layers": list(range(m.first_dense)),
    }
    if family == "qwen3_moe":
        return cls(**common, **moe, **sparse)
    return cls(**common, **moe, **sparse, shared_expert_intermediate_size=m.shared_experts * m.d_expert)


def hf_state_dict(cfg: ModelConfig, state: dict[str, torch.Tensor], family: str) -> dict[str, torch.Tensor]:
    out = {"model.embed_tokens.weight": state["tok_emb.weight"], "model.norm.weight": state["norm.weight"]}
    out["lm_head.weight"] = state["tok_emb.weight" if cfg.tie_embeddings else "lm_head.weight"]
    for i in range(cfg.n_layers):
        src, dst = f"blocks.{i}.", f"model.layers.{i}."
        out[dst + "input_layernorm.weight"] = state[src + "attn_norm.weight"]
        out[dst + "post_attention_layernorm.weight"] = state[src + "ffn_norm.weight"]
        for ours, theirs in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj"), ("wo", "o_proj")):
            out[f"{dst}self_attn.{theirs}.weight"] = state[f"{src}attn.{ours}.weight"]
        if family == "qwen2_moe":  # its attention has q/k/v biases: ours are zero
            for name in ("q_proj", "k_proj", "v_proj"):
                w = out[f"{dst}self_attn.{name}.weight"]
                out[f"{dst}self_attn.{name}.bias"] = torch.zeros(w.shape[0], dtype=w.dtype)
        if cfg.qk_norm is not QKNorm.NONE:
            out[dst + "self_attn.q_norm.weight"] = state[src + "attn.q_norm.weight"]
            out[dst + "self_attn.k_norm.weight"] = state[src + "attn.k_norm.weight"]
        if not cfg.is_moe_layer(i):
            for ours, theirs in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
                out[f"{dst}mlp.{theirs}.weight"] = state[f"{src}ffn.{ours}.weight"]
            continue
        out[dst + "mlp.gate.weight"] = state[src + "ffn.router.weight"]
        out[dst + "mlp.experts.gate_up_proj"] = torch.cat(
            [state[src + "ffn.experts.w1"], state[src + "ffn.experts.w3"]], dim=1
        )
        out[dst + "mlp.experts.down_proj"] = state[src + "ffn.experts.w2"]
        if cfg.moe.shared_experts:
            for ours, theirs in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
                out[f"{dst}mlp.shared_expert.{theirs}.weight"] = state[f"{src}ffn.shared.{ours}.weight"]
            out[dst + "mlp.shared_expert_gate.weight"] = state[src + "ffn.shared_gate.weight"]
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def readme(cfg: ModelConfig, class_name: str, hf_cfg) -> str:
    """The exported folder's README.md: where the model comes from and what of its training
    losses the transformers config holds."""
    import transformers

    meta = hf_cfg.moe_harness
    source = meta["source"] or "a harness model"
    lines = [
        f"# {cfg.name}",
        "",
        f"Exported by harness export from {source} as {class_name} (transformers {transformers.__version__}),",
        "whose logits equal the harness model's.",
    ]
    if cfg.moe is not None:
        lines += ["", "## Balancing losses of the training run", ""]
        lines += [f"- {field}: {how}" for field, how in meta["carried"].items()]
        lines += [f"- not carried: {note}" for note in meta["not_carried"].values()]
        if not meta["not_carried"]:
            lines.append(f"- every balancing loss the run used has a field in {type(hf_cfg).__name__}")
    config = yaml.safe_dump(meta["config"], sort_keys=False)
    lines += ["", "## Model config (moe_harness.config in config.json)", "", "```yaml", config.rstrip(), "```", ""]
    return "\n".join(lines)


def hf_model(
    cfg: ModelConfig,
    state: dict[str, torch.Tensor],
    family: str,
    eos_id: int | None = None,
    source: str | None = None,
):
    """The transformers model of ``family`` holding ``state``. Should transformers build something
    other than the mapping expects, NotExportable names the run (``source``) and what does not fit,
    rather than a RuntimeError from load_state_dict."""
    import transformers

    who, name = source or cfg.name, CLASSES[family].replace("Config", "ForCausalLM")
    try:
        weights = hf_state_dict(cfg, state, family)
    except KeyError as e:
        raise NotExportable(f"{who}: the checkpoint has no tensor {e.args[0]}, which {cfg.name} needs") from None
    try:
        hf_cfg = hf_config(cfg, family, eos_id, source)
        model = transformers.AutoModelForCausalLM.from_config(hf_cfg)
    except Exception as e:
        raise NotExportable(f"{who}: transformers cannot build {name}: {_one_line(e)}") from e
    theirs = model.state_dict()
    wrong = [
        f"{k} is {tuple(w.shape)} in the run, {tuple(theirs[k].shape)} in {name}"
        for k, w in weights.items()
        if k in theirs and theirs[k].shape != w.shape
    ]
    if wrong:
        raise NotExportable(f"{who}: the weights do not fit {name}: {_some(wrong)}")
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except Exception as e:
        raise NotExportable(f"{who}: the weights do not load into {name}: {_one_line(e)}") from e
    missing = [k for k in missing if not (cfg.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        which = f"{name} has no {_some(unexpected)}" if unexpected else f"nothing fills {_some(missing)}"
        raise NotExportable(f"{who}: the weight mapping to {name} is incomplete: {which}")
    return model


def _one_line(e: BaseException, limit: int = 400) -> str:
    text = " ".join(f"{type(e).__name__}: {e}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _some(items: list[str], shown: int = 3) -> str:
    more = f" (and {len(items) - shown} more)" if len(items) > shown else ""
    return "; ".join(items[:shown]) + more


MANIFEST = ".moe-harness-export.json"
"""In each export folder: the files the export wrote, so that exporting again replaces those and
refuses to touch anything else a user put there."""
WRITTEN_BEFORE_MANIFESTS = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "model-*.safetensors",
    "README.md",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)
"""What an export wrote before it kept a manifest (its config.json says ``moe_harness``)."""


def _files(folder: Path) -> list[str]:
    """Every file under ``folder``, relative to it; a symbolic link is listed as itself (to a file,
    a folder or nothing) and never followed."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_symlink() or not p.is_dir())


def _not_ours(out_dir: Path) -> list[str]:
    """The files in ``out_dir`` that no earlier export wrote (all of them when it is no export):
    every symbolic link among them, since an export writes none."""
    present = _files(out_dir)
    links = {f for f in present if (out_dir / f).is_symlink()}
    try:
        written = set(json.loads((out_dir / MANIFEST).read_text())["files"]) | {MANIFEST}
    except (OSError, ValueError, TypeError, KeyError):
        try:
            earlier = "moe_harness" in json.loads((out_dir / "config.json").read_text())
        except (OSError, ValueError, TypeError):
            earlier = False
        if not earlier:
            return present
        return [
            f for f in present if f in links or not any(fnmatch.fnmatchcase(f, w) for w in WRITTEN_BEFORE_MANIFESTS)
        ]
    return [f for f in present if f in links or f not in written]


def _leads_nowhere(link: Path) -> str | None:
    """Why the symbolic link ``link`` reaches nothing ("does not exist", "loops"), or None."""
    try:
        link.stat()
    except OSError as e:
        return "loops" if e.errno == errno.ELOOP else "does not exist"
    return None


def _link_refusal(out_dir: Path) -> str | None:
    """What is wrong with ``out_dir`` being, or lying below, a symbolic link, and what to do."""
    if out_dir.is_symlink():
        target, real = os.readlink(out_dir), Path(os.path.realpath(out_dir))
        it = f"{out_dir} is a symbolic link to {target}"
        if (why := _leads_nowhere(out_dir)) == "loops":
            return f"{it}, which loops; an export replaces no link: give --out another path"
        if real.is_file():
            return f"{it}, a file; an export replaces no link: give --out a folder to export into"
        there = "to export there" if why else "to export into its target"
        return f"{it}{', which does not exist' if why else ''}; an export replaces no link: give --out {real} {there}"
    for above in out_dir.parents:
        if above.is_symlink() and (why := _leads_nowhere(above)):
            return (
                f"{above} is a symbolic link to {os.readlink(above)}, which {why}: make it lead to a folder, "
                "or give --out another path"
            )
    return None


def _named(folder: Path, name: str) -> str:
    link = folder / name
    return f"{name} (a symbolic link to {os.readlink(link)})" if link.is_symlink() else name


def check_destination(out_dir: Path) -> None:
    """Refuse, in one line naming it and what to do, an ``out_dir`` an export may not replace: a
    symbolic link, one below a link that leads nowhere, a file, or a folder holding anything an
    earlier export did not write (a link in it included)."""
    out_dir = Path(out_dir)
    if (refusal := _link_refusal(out_dir)) is not None:
        raise HarnessError(refusal)
    if out_dir.exists() and not out_dir.is_dir():
        raise HarnessError(f"{out_dir} is a file: give --out a folder to export into (absent, empty or an export)")
    if not out_dir.is_dir():
        return
    if foreign := _not_ours(out_dir):
        named = [_named(out_dir, f) for f in foreign[:5]]
        shown = ", ".join(named) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise HarnessError(
            f"{out_dir} holds files that no earlier export wrote ({shown}); they are left as they are: move them "
            "out of the folder, or choose another --out"
        )


def _remove(path: Path) -> str:
    """Delete a folder the export wrote; what is left, for the error that follows, if that fails."""
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        return f"; {path} is left behind ({e.strerror}): delete it"
    return ""


def export(
    cfg: ModelConfig,
    state: dict[str, torch.Tensor],
    tokenizer_file: Path | None,
    out_dir: Path,
    source: str | None = None,
) -> str:
    """Write ``out_dir`` (config, safetensors weights, fast tokenizer, README.md); returns the
    class name. ``source`` names the run, for the README, config.json and errors. An earlier
    export in ``out_dir`` is replaced; a folder holding anything else is refused."""
    import transformers

    family = hf_family(cfg)
    out_dir = Path(out_dir)
    check_destination(out_dir)
    eos_id = None
    tokenizer = None
    if tokenizer_file is not None:
        tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file), eos_token="<|endoftext|>")
        eos_id = tokenizer.eos_token_id
    model = hf_model(cfg, state, family, eos_id, source)
    tmp = old = None
    # The folders this export makes above out_dir, innermost first: removed again on failure.
    made = [p for p in (out_dir.parent, *out_dir.parent.parents) if not os.path.lexists(p)]
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
        model.save_pretrained(tmp)
        (tmp / "README.md").write_text(readme(cfg, type(model).__name__, model.config))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / MANIFEST).write_text(json.dumps({"files": _files(tmp)}, indent=2) + "\n")
        follow_umask(tmp)  # mkdtemp's folder is 0700, the weights file 0600
        if (refusal := _link_refusal(out_dir)) is not None:  # a link made there since the check
            raise HarnessError(refusal)
        if out_dir.exists():  # aside, not deleted, until the new folder is in place
            old = out_dir.rename(tmp.with_name(tmp.name + ".old"))
        tmp.rename(out_dir)
    except BaseException as e:
        left = _remove(tmp) if tmp is not None and tmp.exists() else ""
        if old is not None and not os.path.lexists(out_dir):
            try:
                old.rename(out_dir)  # the earlier export stays as it was
            except OSError as again:
                left += f"; the earlier export is left at {old} ({again.strerror}): move it back to {out_dir}"
        for folder in made:  # folders made for this export only, left empty
            try:
                folder.rmdir()
            except OSError:
                break
        if isinstance(e, OSError) and e.errno in NO_SPACE:
            full = DiskFull(out_dir, None, free_bytes(out_dir.parent))
            raise (HarnessError(f"{full}{left}") if left else full) from None
        if isinstance(e, HarnessError):
            if left:
                raise HarnessError(f"{e}{left}") from None
            raise
        # safetensors and tokenizers report a failed write in their own errors, with the OS's text.
        if isinstance(e, Exception) and (failure := os_failure(e, out_dir)) is not None:
            raise HarnessError(f"cannot write the export: {failure}{left}") from None
        raise
    if old is not None and (left := _remove(old)):
        raise HarnessError(f"{out_dir} is exported, but the earlier export set aside could not be deleted{left}")
    return type(model).__name__
