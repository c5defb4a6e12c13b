"""Our trained runs as an lm-eval model, ``moe-harness``, for lm-eval's own CLI and for us.

    lm_eval run --model moe-harness --model_args checkpoint=results/tiny/runs/RUN \\
        --include_path results/tiny/data/tasks --tasks heldout_ppl heldout_code_mc
    harness evaluate tiny --run RUN      # the same, writing runs/RUN/eval.json

``checkpoint`` is a run folder (config.yaml + checkpoint.pt) or a checkpoint.pt inside one; the
tokenizer defaults to the study's ``data/tokenizer.json`` two levels up. Other arguments:
``tokenizer`` (a tokenizer.json), ``device`` (default: CUDA when visible), ``dtype``
(``float32``, or ``bfloat16`` autocast as in training; default float32 on CPU, bfloat16 on
CUDA), ``batch_size``, ``max_length`` (default: the run's training context, so rolling
perplexity windows are as long as the ones it was trained on) and ``max_gen_toks``.

All three request types are batched: loglikelihood sorts requests by length and right-pads
(causal attention keeps padding out of earlier positions); generation left-pads prompts into
one KV cache and decodes greedily until a stop sequence, the end-of-text token or
``max_gen_toks``. With dropless routing a request's score does not depend on its batch; with
capacity dispatch it does, as it does for any capacity-factor MoE, since padding and other
requests take expert slots.

lm-eval discovers this class through a hook installed with the package (see
``harness/evaluate/lm_eval_plugin.py``); importing this module also registers it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lm_eval.models  # noqa: F401  (lm-eval's own models first: an empty registry is filled from it)
import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from harness.core.errors import HarnessError
from harness.core.remedy import run_file
from harness.data.prepare import EOS
from harness.study.records import read_record
from harness.train.checkpoint import gone, load_checkpoint
from models.config import ConfigError, load_config
from models.transformer import KVCache, Transformer

log = logging.getLogger(__name__)

NAME = "moe-harness"


def locate_run(checkpoint: str | Path) -> tuple[Path, Path]:
    """(run folder, checkpoint file) from a run folder or a checkpoint file inside one."""
    path = Path(checkpoint)
    run_dir, ckpt = (path, path / "checkpoint.pt") if path.is_dir() else (path.parent, path)
    if (why := gone(ckpt, f"harness train STUDY --run {run_dir.name}")) is not None:
        raise HarnessError(why)
    for needed in (ckpt, run_dir / "config.yaml"):
        if not needed.is_file():
            raise ConfigError(
                "checkpoint", f"{needed} does not exist; give a trained run's folder (config.yaml + checkpoint.pt)"
            )
    return run_dir, ckpt


def load_run_model(checkpoint: str | Path, device: torch.device):
    """The run's model with its trained weights (loaded with weights_only=True), in eval mode."""
    run_dir, ckpt = locate_run(checkpoint)
    cfg = load_config(run_dir / "config.yaml")
    weights = load_checkpoint(ckpt, "harness train", "train the run again (`harness train --restart`)")["model"]
    model = Transformer(cfg)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ConfigError(
            "checkpoint",
            f"weights do not fit {run_dir / 'config.yaml'}: missing {missing[:4]}, unexpected {unexpected[:4]}",
            str(ckpt),
        )
    return model.to(device).eval(), cfg, run_dir


@register_model(NAME)
class HarnessLM(TemplateLM):
    def __init__(
        self,
        checkpoint: str,
        tokenizer: str | None = None,
        device: str | None = None,
        dtype: str | None = None,
        batch_size: int | str | None = 16,
        max_batch_size: int | None = None,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        **unused: Any,
    ):
        super().__init__()
        from tokenizers import Tokenizer

        if unused:
            log.warning("moe-harness model: ignoring arguments %s", sorted(unused))
        if device and device.startswith("cuda") and not torch.cuda.is_available():
            log.warning("moe-harness model: %s requested (lm-eval's default) but not visible; using cpu", device)
            device = None
        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype or ("bfloat16" if self._device.type == "cuda" else "float32")
        if dtype not in ("float32", "bfloat16"):
            raise ConfigError("dtype", f"'{dtype}' is not one of float32, bfloat16")
        self.autocast = dtype == "bfloat16"
        self.model, self.cfg, self.run_dir = load_run_model(checkpoint, self._device)
        tok_path = Path(tokenizer) if tokenizer else self.run_dir.parent.parent / "data" / "tokenizer.json"
        if tokenizer:
            if not tok_path.is_file():
                raise ConfigError("tokenizer", f"{tok_path} does not exist; pass tokenizer=PATH/tokenizer.json")
            self._tok = Tokenizer.from_file(str(tok_path))
        else:  # the study's own, named with the step that writes it
            from harness.data.prepare import load_tokenizer

            self._tok = load_tokenizer(tok_path.parent)
        if self._tok.get_vocab_size() != self.cfg.vocab_size:
            raise ConfigError(
                "tokenizer",
                f"{tok_path} has {self._tok.get_vocab_size()} tokens, the model {self.cfg.vocab_size}",
            )
        eot = self._tok.token_to_id(EOS)
        if eot is None:
            raise ConfigError("tokenizer", f"{tok_path} has no '{EOS}' token")
        self._eot = eot
        record = self.run_dir / "record.json"
        if record.exists():  # whole and this run's (harness.study.records)
            trained_ctx = read_record(record, None, run_file(record, "STUDY"))["recipe"]["seq_len"]
        else:
            trained_ctx = self.cfg.max_seq_len
        self._max_length = int(max_length or trained_ctx)
        if self._max_length > self.cfg.max_seq_len:
            raise ConfigError(
                "max_length", f"{self._max_length} exceeds the model's max_seq_len {self.cfg.max_seq_len}"
            )
        if batch_size in (None, "auto") or str(batch_size).startswith("auto"):
            batch_size = 16
        self.batch_size = int(batch_size)
        self.max_gen_toks = int(max_gen_toks)
        self.checkpoint = str(checkpoint)
        self.tokenizer_file = str(tok_path)

    # identity ----------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self._eot

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def device(self) -> torch.device:
        return self._device

    def get_model_info(self) -> dict[str, Any]:
        return {
            "model_name": self.cfg.name,
            "checkpoint": self.checkpoint,
            "tokenizer": self.tokenizer_file,
            "max_length": self._max_length,
            "dtype": "bfloat16-autocast" if self.autocast else "float32",
        }

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self._tok.encode(string, add_special_tokens=False).ids

    def tok_decode(self, tokens: list[int]) -> str:
        return self._tok.decode(tokens, skip_special_tokens=False)

    # forward -----------------------------------------------------------------------------

    @torch.no_grad()
    def _logits(self, idx_BS: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        with torch.autocast(self._device.type, dtype=torch.bfloat16, enabled=self.autocast):
            return self.model(idx_BS, cache=cache).logits.float()

    def _loglikelihood_tokens(
        self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False, **kwargs
    ) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), whether it is the greedy continuation)."""

        def key(req):
            toks = req[1] + req[2]
            return -len(toks), tuple(toks)

        results: list[tuple[float, bool]] = []
        collator = Collator(requests, sort_fn=key)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="loglikelihood")
        for chunk in collator.get_batched(n=self.batch_size):
            rows, spans = [], []
            for _, context, continuation in chunk:
                if not 0 < len(continuation) <= self._max_length:
                    raise ValueError(
                        f"a continuation of {len(continuation)} tokens does not fit max_length {self._max_length}"
                    )
                inp = (context + continuation)[-(self._max_length + 1) :][:-1]
                rows.append(inp)
                spans.append((len(inp) - len(continuation), len(inp)))
            width = max(len(r) for r in rows)
            idx = torch.full((len(rows), width), self._eot, dtype=torch.long)
            for i, r in enumerate(rows):
                idx[i, : len(r)] = torch.tensor(r)
            logits = self._logits(idx.to(self._device))
            for i, ((request, _, continuation), (start, end)) in enumerate(zip(chunk, spans, strict=True)):
                target = torch.tensor(continuation, device=self._device)
                logp = F.log_softmax(logits[i, start:end], dim=-1)
                score = float(logp.gather(-1, target[:, None]).sum())
                greedy = bool((logp.argmax(-1) == target).all())
                results.append((score, greedy))
                if request is not None:  # None: a window of a rolling request
                    self.cache_hook.add_partial("loglikelihood", request, (score, greedy))
            bar.update(len(chunk))
        bar.close()
        return collator.get_original(results)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole documents in disjoint windows of ``max_length`` tokens, each
        conditioned only on its own tokens (the first on the end-of-text token)."""
        windows, owner = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            tokens = self.tok_encode(text)
            for context, continuation in map(
                make_disjoint_window,
                get_rolling_token_windows(tokens, self.prefix_token_id, self._max_length, context_len=1),
            ):
                windows.append((None, context, continuation))
                owner.append(i)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for i, (score, _) in zip(owner, scores, strict=True):
            totals[i] += score
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # generation --------------------------------------------------------------------------

    def greedy(self, prompts: list[list[int]], max_new: int, until: list[str]) -> list[str]:
        """Greedy continuations of token prompts, one batch through one KV cache, cut at the
        first stop sequence."""
        width = max(len(p) for p in prompts)
        pad = torch.tensor([width - len(p) for p in prompts])
        idx = torch.full((len(prompts), width), self._eot, dtype=torch.long)
        for i, p in enumerate(prompts):
            idx[i, width - len(p) :] = torch.tensor(p)
        max_new = min(max_new, self.cfg.max_seq_len - width)
        cache = KVCache(
            self.cfg,
            len(prompts),
            width + max_new,
            device=self._device,
            dtype=torch.bfloat16 if self.autocast else torch.float32,
            left_pad=pad,
        )
        logits = self._logits(idx.to(self._device), cache)[:, -1]
        out: list[list[int]] = [[] for _ in prompts]
        done = [False] * len(prompts)
        # a stop sequence ends within the last tokens: a token holds at least one byte, a char at most 4
        tail = 4 * max((len(s) for s in until), default=0) + 1
        for step in range(max_new):
            nxt = logits.argmax(-1)
            for i, t in enumerate(nxt.tolist()):
                if done[i]:
                    continue
                out[i].append(t)
                if t == self._eot or any(s in self.tok_decode(out[i][-tail:]) for s in until):
                    done[i] = True
            if all(done) or step == max_new - 1:
                break
            logits = self._logits(nxt[:, None], cache)[:, -1]
        texts = []
        for toks in out:
            text = self.tok_decode(toks)
            cut = min((text.find(s) for s in until if s in text), default=len(text))
            texts.append(text[:cut])
        return texts

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        args = [req.args for req in requests]
        encoded = {context: self.tok_encode(context) for context, _ in args}  # once per distinct prompt
        collator = Collator(
            args, sort_fn=lambda a: (-len(encoded[a[0]]), a[0]), group_fn=lambda a: a[1], group_by="gen_kwargs"
        )
        results: list[str] = []
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="generate_until")
        for chunk in collator.get_batched(n=self.batch_size):
            contexts, all_kwargs = zip(*chunk, strict=True)
            kwargs = normalize_gen_kwargs(all_kwargs[0], self.max_gen_toks)
            if kwargs.get("do_sample") or kwargs.get("temperature", 0.0) > 0:
                raise ValueError("moe-harness decodes greedily; this task asks for sampling")
            until = handle_stop_sequences(kwargs.pop("until", None), eos=EOS)
            max_new = min(kwargs.pop("max_gen_toks"), self._max_length - 1)
            keep = self._max_length - max_new
            prompts = [(encoded[c] or [self._eot])[-keep:] for c in contexts]
            for context, kw, text in zip(contexts, all_kwargs, self.greedy(prompts, max_new, until), strict=True):
                results.append(text)
                self.cache_hook.add_partial("generate_until", (context, kw), text)
            bar.update(len(chunk))
        bar.close()
        return collator.get_original(results)
