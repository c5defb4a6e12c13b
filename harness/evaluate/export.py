"""Export a trained model to a Hugging Face directory that ``transformers`` loads as is.

    harness export tiny --run dense-d64_7e12_s0 --out exported/dense-d64

The target class is the one whose computation equals ours, a variant with no faithful equivalent
refused with the reason rather than exported approximately (harness.evaluate.export_families):
Llama or Qwen3 for a dense model; Mixtral, Qwen3-MoE, OLMoE or Qwen2-MoE for softmax-topk routing;
GLM-4.5 (Glm4MoeForCausalLM) for sigmoid-bias routing, DeepSeek-V3's auxiliary-loss-free balancing
that the shipped studies train. The tokenizer is exported as a fast tokenizer whose
``model_max_length`` is the training context, and the folder's README.md shows how to continue a
prompt with transformers as ``harness sample`` does (harness.evaluate.export_readme).

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
class's ``router_aux_loss_coef`` (rescaled to transformers' form of the loss) where it has one, a
coefficient with a field of its own in the class fills it, and every coefficient the run used that
the class has no field for (GLM-4.5 computes no balancing loss, nor updates its selection bias) is
named in the folder's README.md and under ``moe_harness`` in config.json, with the run's whole model
config, rather than dropped.
"""

from __future__ import annotations

import errno
import fnmatch
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from harness.core.errors import DiskFull, HarnessError, os_failure
from harness.core.io import NO_SPACE, follow_umask, free_bytes
from harness.evaluate.export_families import (
    CLASSES,
    LOSSES,
    NotExportable,
    hf_balancing,
    hf_config,
    hf_family,
    hf_state_dict,
)
from harness.evaluate.export_readme import new_tokens, readme
from models.config import ModelConfig

__all__ = [
    "CLASSES",
    "LOSSES",
    "MANIFEST",
    "NotExportable",
    "check_destination",
    "export",
    "hf_balancing",
    "hf_config",
    "hf_family",
    "hf_model",
    "hf_state_dict",
    "readme",
]


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
        # model_max_length: the training context, where transformers would otherwise say 1e30.
        tokenizer = transformers.PreTrainedTokenizerFast(
            tokenizer_file=str(tokenizer_file), eos_token="<|endoftext|>", model_max_length=cfg.max_seq_len
        )
        eos_id = tokenizer.eos_token_id
    model = hf_model(cfg, state, family, eos_id, source)
    tmp = old = None
    # The folders this export makes above out_dir, innermost first: removed again on failure.
    made = [p for p in (out_dir.parent, *out_dir.parent.parents) if not os.path.lexists(p)]
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
        model.save_pretrained(tmp)
        if tokenizer is None:
            text = readme(cfg, type(model).__name__, model.config)
        else:
            text = readme(cfg, type(model).__name__, model.config, out_dir.absolute(), new_tokens(cfg, tokenizer))
        (tmp / "README.md").write_text(text)
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
