"""What do a trained MoE's experts specialise in: the kind of token, or the topic of the document?

    harness routing tiny --run moe-d64-e16k2_7e12_s0      # writes runs/<run>/routing.json

    result = routing_analysis(run_dir, data_dir, device="cpu", max_tokens=65_536)
    result["summary"]["verdict"]

The held-out documents (the split ``harness.data.tasks`` uses) run through the model as in training:
concatenated, each followed by the end-of-text token, cut into windows of the training context.
Forward hooks on every router record each token's k chosen experts. Every token gets two labels:

  category  what kind of source text it is, from Python's own ``tokenize``: keyword, identifier,
            number, punctuation (operators and brackets), string/comment, whitespace
            (indentation, spaces, newlines). A BPE token takes the category of its first
            non-whitespace character. Text that does not tokenize as Python is classified by
            regular expressions into the same categories.
  topic     the package its document comes from (``topic_of``: ``stdlib/asyncio``).

Per MoE layer the report holds the expert x category and expert x topic assignment counts (each
of a token's k choices counts once), each expert's category shares and their lift over the
overall shares, and the normalised mutual information (NMI, arithmetic-mean normalisation;
Vinh, Epps & Bailey 2010) between the chosen expert and each label. MI estimated from counts is
biased upwards, the more so the more values a label takes, so each NMI is set against a
permutation baseline drawn with a seeded generator. Categories are shuffled across tokens. A topic
is fixed for a whole document, so topics are shuffled among documents instead: each document keeps
one topic and all its tokens move together (whole-block permutation; Winkler et al. 2014,
NeuroImage 92). Shuffling topics across tokens would break up that clustering, and any routing that
differs from document to document would then count as topic. The excess (NMI minus the mean
shuffled NMI) is what the verdict compares; the permutation p-value is
(1 + #shuffled >= observed) / (1 + permutations) (Phipson & Smyth 2010). Each association records
its null.

Published analyses find experts that specialise by token kind rather than by topic: ST-MoE
(Zoph et al. 2022, sec. 7) sees encoder experts for punctuation, verbs, proper nouns, numbers
and none by language; Mixtral (Jiang et al. 2024, sec. 5) sees no topic pattern but syntactic
ones (``self`` in Python, indentation); OLMoE (Muennighoff et al. 2024, sec. 5) reports strong
vocabulary specialisation alongside some by domain. The summary says which of the two this run
shows more of.

A token's category can depend on context (``def`` in a comment is string/comment), so perfect
category routing by token identity alone does not reach NMI 1; nor does k > 1, where a token's
k experts share its label. Routing by category or by token raises topic MI where packages differ
in their mix of tokens. Much of that difference is each document's own mix (one is mostly
docstring, another a table of numbers): a token-level shuffle of topics counted it as topic, which
made the comparison lean towards topic; the document-level shuffle reproduces it in the baseline,
so it no longer does. Within-document clustering of token categories can still contribute: a mix
that a package's documents share is counted as topic (the expert choice does say something about
the package then), and with few documents per topic the observed topic NMI is one noisy draw, off
by about ``shuffled_nmi_std`` either way. The other way round, categories keep a token-level
shuffle, so routing that follows the document rather than the token can raise category MI where
documents cluster by category.
"""

from __future__ import annotations

import io
import keyword
import re
import tokenize
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from harness.core.io import read_json
from harness.data.prepare import EOS

CATEGORIES = ("keyword", "identifier", "number", "punctuation", "string/comment", "whitespace")
KEYWORD, IDENTIFIER, NUMBER, PUNCTUATION, STRING_COMMENT, WHITESPACE = range(len(CATEGORIES))
NO_LABEL = -1  # the end-of-text tokens: run through the model, counted under no label
UNKNOWN_TOPIC = "unknown"

DEFAULT_MAX_TOKENS = 65_536
DEFAULT_PERMUTATIONS = 199  # smallest p 1/200: Holm over up to 9 layers can still reach 0.05
DEFAULT_SEED = 20240101
MIN_EXCESS_NMI = 0.01  # below this excess over the shuffled baseline a label counts as no specialisation
TOKEN_NULL = "labels shuffled across tokens"  # the category baseline
DOCUMENT_NULL = "labels shuffled across documents"  # the topic baseline: each document keeps one topic

_WHITESPACE_RE = re.compile(r"\s+")
_FALLBACK_RE = re.compile(
    r"""(?P<comment>\#[^\n]*)
      | (?P<string>(?:\b[rRbBuUfF]{1,2})?(?:'[^'\n]*'|"[^"\n]*"))
      | (?P<name>[^\W\d]\w*)
      | (?P<number>\.?\d(?:[eE][+-]|[\w.])*)
      | (?P<space>\s+)
      | (?P<other>.)""",
    re.VERBOSE | re.DOTALL,
)
_STRING_TOKENS = {"STRING", "COMMENT", "FSTRING_START", "FSTRING_MIDDLE", "FSTRING_END"}
_STRING_TOKENS |= {"TSTRING_START", "TSTRING_MIDDLE", "TSTRING_END"}


def _whitespace_mask(text: str) -> np.ndarray:
    mask = np.zeros(len(text), dtype=bool)
    for m in _WHITESPACE_RE.finditer(text):
        mask[m.start() : m.end()] = True
    return mask


def _name_category(name: str) -> int:
    # Hard keywords only: the soft ones (match, case, _, type) are mostly ordinary names.
    return KEYWORD if keyword.iskeyword(name) else IDENTIFIER


def regex_char_categories(text: str) -> np.ndarray:
    """Per character, an index into CATEGORIES, by regular expressions: the fallback for text
    that Python cannot tokenize. Strings are quoted runs on one line, comments run from ``#``
    to the end of the line."""
    cats = np.full(len(text), PUNCTUATION, dtype=np.int8)
    for m in _FALLBACK_RE.finditer(text):
        kind, (start, end) = m.lastgroup, m.span()
        if kind in ("comment", "string"):
            cats[start:end] = STRING_COMMENT
        elif kind == "name":
            cats[start:end] = _name_category(m.group())
        elif kind == "number":
            cats[start:end] = NUMBER
        elif kind == "space":
            cats[start:end] = WHITESPACE
    cats[_whitespace_mask(text)] = WHITESPACE
    return cats


class _Untokenizable(Exception):
    pass


def _tokenize_char_categories(text: str) -> np.ndarray:
    line_starts: list[int] = []
    reader = io.StringIO(text)
    position = 0

    def readline() -> str:
        nonlocal position
        line = reader.readline()
        line_starts.append(position)
        position += len(line)
        return line

    cats = np.full(len(text), PUNCTUATION, dtype=np.int8)  # e.g. a line-continuation backslash
    for tok in tokenize.generate_tokens(readline):
        name = tokenize.tok_name[tok.type]
        if name in ("NAME", "NUMBER", "OP", "ERRORTOKEN") or name in _STRING_TOKENS:
            start = line_starts[tok.start[0] - 1] + tok.start[1]
            end = min(line_starts[tok.end[0] - 1] + tok.end[1], len(text))
            if name == "NAME":
                cats[start:end] = _name_category(tok.string)
            elif name == "NUMBER":
                cats[start:end] = NUMBER
            elif name == "OP":
                cats[start:end] = PUNCTUATION
            elif name == "ERRORTOKEN":
                if tok.string.strip():  # Python 3.11 reports a stray quote or `$` this way; 3.12+ raises
                    raise _Untokenizable(tok.string)
            else:
                cats[start:end] = STRING_COMMENT
    cats[_whitespace_mask(text)] = WHITESPACE
    return cats


def char_categories(text: str) -> np.ndarray:
    """Per character of ``text``, an index into CATEGORIES (int8), from Python's ``tokenize``;
    by regular expressions (``regex_char_categories``) when the text does not tokenize.
    Whitespace characters are always WHITESPACE, inside strings and comments too."""
    try:
        return _tokenize_char_categories(text)
    except (tokenize.TokenError, SyntaxError, _Untokenizable):
        return regex_char_categories(text)


def token_categories(tok, text: str) -> tuple[np.ndarray, np.ndarray]:
    """``text`` encoded with the ``tokenizers`` Tokenizer ``tok``: (ids int64, categories int8).
    A token's category is that of its first non-whitespace character (byte-level BPE offsets
    are character offsets into ``text``), WHITESPACE when it holds none."""
    enc = tok.encode(text)
    ids = np.asarray(enc.ids, dtype=np.int64)
    if not len(ids):
        return ids, np.zeros(0, dtype=np.int8)
    chars = char_categories(text)
    spans = np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2)
    solid = np.flatnonzero(chars != WHITESPACE)
    if not len(solid):
        return ids, np.full(len(ids), WHITESPACE, dtype=np.int8)
    j = np.searchsorted(solid, spans[:, 0])
    first = solid[np.minimum(j, len(solid) - 1)]
    inside = (j < len(solid)) & (first < spans[:, 1])
    return ids, np.where(inside, chars[first], WHITESPACE).astype(np.int8)


def topic_of(key: str) -> str:
    """The package a document comes from: the first two components of its key
    (``stdlib/asyncio/transports.py`` -> ``stdlib/asyncio``), or for a top-level module its
    name under the first (``stdlib/os.py`` -> ``stdlib/os``). A record number (``file.jsonl#3``)
    and a leading ``/`` are ignored."""
    parts = [p for p in PurePosixPath(key.split("#", 1)[0]).parts if p != "/"]
    if not parts:
        return UNKNOWN_TOPIC
    if len(parts) >= 3:
        return "/".join(parts[:2])
    return "/".join([*parts[:-1], PurePosixPath(parts[-1]).stem])


@dataclass
class TokenStream:
    """Held-out tokens as the model reads them, with a category and a topic per token."""

    ids: np.ndarray  # (N,) int64, each document followed by the end-of-text id
    categories: np.ndarray  # (N,) int8 index into CATEGORIES, NO_LABEL at end-of-text
    topics: np.ndarray  # (N,) int64 index into topic_names, NO_LABEL at end-of-text
    documents_N: np.ndarray  # (N,) int64 index into the documents given, NO_LABEL at end-of-text
    topic_names: list[str]
    documents: int  # documents (wholly or partly) in the stream


def token_stream(tok, docs: list[str], keys: list[str] | None, max_tokens: int) -> TokenStream:
    """The documents concatenated as in the shards (each followed by end-of-text), cut at
    ``max_tokens``. Without keys every document's topic is UNKNOWN_TOPIC. Each token also keeps
    the index of its document, so that a baseline can shuffle topics between whole documents."""
    if keys is not None and len(keys) != len(docs):
        raise ValueError(f"{len(keys)} keys for {len(docs)} documents")
    eos = tok.token_to_id(EOS)
    if eos is None:
        raise ValueError(f"the tokenizer has no '{EOS}' token")
    topic_index: dict[str, int] = {}
    ids, cats, topics, documents = [], [], [], []
    total = used = 0
    for i, doc in enumerate(docs):
        if total >= max_tokens:
            break
        topic = topic_index.setdefault(topic_of(keys[i]) if keys is not None else UNKNOWN_TOPIC, len(topic_index))
        doc_ids, doc_cats = token_categories(tok, doc)
        ids += [doc_ids, np.array([eos])]
        cats += [doc_cats, np.array([NO_LABEL], dtype=np.int8)]
        topics += [np.full(len(doc_ids), topic), np.array([NO_LABEL])]
        documents += [np.full(len(doc_ids), i), np.array([NO_LABEL])]
        total += len(doc_ids) + 1
        used += 1
    if not used:
        raise ValueError("no held-out documents to analyse")
    return TokenStream(
        ids=np.concatenate(ids)[:max_tokens],
        categories=np.concatenate(cats)[:max_tokens],
        topics=np.concatenate(topics).astype(np.int64)[:max_tokens],
        documents_N=np.concatenate(documents).astype(np.int64)[:max_tokens],
        topic_names=list(topic_index),
        documents=used,
    )


def expert_choices(model, ids: np.ndarray, seq_len: int, batch_size: int = 8) -> list[np.ndarray]:
    """Run ``ids`` through the model in consecutive windows of ``seq_len`` (the last may be
    shorter); per MoE layer, the (N, k) experts each token chose. Eval mode, no gradients."""
    import torch

    layers = model.moe_layers
    device = next(model.parameters()).device
    chosen: list[list[torch.Tensor]] = [[] for _ in layers]

    def recorder(i: int):
        def hook(module, args, output) -> None:
            chosen[i].append(output.experts_TK.detach().to("cpu"))

        return hook

    handles = [layer.router.register_forward_hook(recorder(i)) for i, layer in enumerate(layers)]
    was_training = model.training
    model.eval()
    try:
        n_full = len(ids) // seq_len
        windows = torch.from_numpy(ids[: n_full * seq_len].reshape(n_full, seq_len))
        with torch.no_grad():
            for start in range(0, n_full, batch_size):
                model(windows[start : start + batch_size].to(device))
            if len(ids) % seq_len:
                model(torch.from_numpy(ids[n_full * seq_len :])[None].to(device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return [torch.cat(c).numpy().astype(np.int64) for c in chosen]


def _entropy(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def _contingency(experts_NK: np.ndarray, labels_N: np.ndarray, n_experts: int, n_labels: int) -> np.ndarray:
    """(E, L) counts of assignments: each of a token's k choices counts once under its label."""
    cells = experts_NK * n_labels + labels_N[:, None]
    return np.bincount(cells.ravel(), minlength=n_experts * n_labels).reshape(n_experts, n_labels)


def _nmi(table: np.ndarray) -> tuple[float, float]:
    """(MI in nats, MI / mean of the two marginal entropies; 0 when both are 0)."""
    p = table / max(table.sum(), 1)
    h_e, h_l = _entropy(p.sum(1)), _entropy(p.sum(0))
    mi = max(h_e + h_l - _entropy(p.ravel()), 0.0)
    return mi, (2 * mi / (h_e + h_l) if h_e + h_l > 0 else 0.0)


def shuffle_labels(labels_N: np.ndarray, rng: np.random.Generator, documents_N: np.ndarray | None = None) -> np.ndarray:
    """``labels_N`` permuted across tokens; with ``documents_N`` (each token's document) the
    documents' labels permuted among the documents instead, so that every document's tokens
    keep sharing one label, as a topic does. A label that varies within a document cannot move
    with it, hence the error."""
    if documents_N is None:
        return rng.permutation(labels_N)
    if documents_N.shape != labels_N.shape:
        raise ValueError(f"{documents_N.shape} document indices for {labels_N.shape} labels")
    _, first_D, document_N = np.unique(documents_N, return_index=True, return_inverse=True)
    labels_D = labels_N[first_D]
    if not np.array_equal(labels_D[document_N], labels_N):
        raise ValueError("a document's tokens carry different labels: shuffle across tokens instead")
    return rng.permutation(labels_D)[document_N]


def association(
    experts_NK: np.ndarray,
    labels_N: np.ndarray,
    n_experts: int,
    n_labels: int,
    permutations: int,
    seed: Any,
    documents_N: np.ndarray | None = None,
) -> dict[str, Any]:
    """Mutual information between expert choice and a token label, against ``permutations``
    shuffles of the labels (``shuffle_labels``): across tokens, or with ``documents_N`` across
    documents, for a label that is fixed per document and whose clustering the null must keep."""
    mi, nmi = _nmi(_contingency(experts_NK, labels_N, n_experts, n_labels))
    rng = np.random.default_rng(seed)
    shuffled = np.array(
        [
            _nmi(_contingency(experts_NK, shuffle_labels(labels_N, rng, documents_N), n_experts, n_labels))[1]
            for _ in range(permutations)
        ]
    )
    mean = float(shuffled.mean()) if permutations else 0.0
    return {
        "null": TOKEN_NULL if documents_N is None else DOCUMENT_NULL,
        "mi_bits": float(mi / np.log(2)),
        "nmi": nmi,
        "shuffled_nmi_mean": mean,
        "shuffled_nmi_std": float(shuffled.std()) if permutations else 0.0,
        "nmi_excess": nmi - mean,
        "nmi_ratio": nmi / mean if mean > 0 else None,
        "p_value": (1 + int((shuffled >= nmi).sum())) / (1 + permutations),
    }


def _shares(counts: np.ndarray) -> list[float | None]:
    total = counts.sum()
    return [float(c / total) if total else None for c in counts]


def _verdict(category: float, topic: float | None) -> tuple[str, str]:
    cites = "ST-MoE (Zoph et al. 2022, sec. 7) and OLMoE (Muennighoff et al. 2024) report"
    if topic is None:
        by = "category" if category >= MIN_EXCESS_NMI else "neither"
        what = "specialise by token category" if by == "category" else "show no specialisation by token category"
        return by, (
            f"experts {what} (excess NMI {category:.3f} over shuffled labels); "
            "topics unknown, so no comparison with topic"
        )
    if max(category, topic) < MIN_EXCESS_NMI:
        return "neither", (
            f"no specialisation beyond chance: excess NMI over shuffled labels {category:.3f} by token category, "
            f"{topic:.3f} by topic (both below {MIN_EXCESS_NMI})"
        )
    if category > topic:
        return "category", (
            f"experts specialise more by token category (syntax/identity) than by topic: excess NMI "
            f"{category:.3f} vs {topic:.3f}, as {cites}"
        )
    return "topic", (
        f"experts specialise more by topic than by token category (syntax/identity): excess NMI "
        f"{topic:.3f} vs {category:.3f}, unlike what {cites}"
    )


def _layer_row(
    li: int,
    block: int,
    experts_NK: np.ndarray,
    labels: tuple[np.ndarray, np.ndarray, np.ndarray],
    overall: list[float | None],
    n_experts: int,
    n_topics: int,
    topics_known: bool,
    permutations: int,
    seed: int,
) -> dict[str, Any]:
    """One MoE layer's entry in routing.json: the expert x category and expert x topic counts, each
    expert's category shares and lift over the ``overall`` shares, and the association of the experts
    with category and with topic (None unless ``topics_known``). ``labels`` are the tokens'
    categories, topics and documents."""
    cats, topics, documents_N = labels
    n_cats = len(CATEGORIES)
    cat_counts = _contingency(experts_NK, cats, n_experts, n_cats)
    topic_counts = _contingency(experts_NK, topics, n_experts, n_topics)
    per_expert = cat_counts.sum(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = cat_counts / per_expert
        lift = share / np.array([s or np.nan for s in overall])
    return {
        "layer": li,
        "block": block,
        "category_counts": cat_counts.tolist(),
        "topic_counts": topic_counts.tolist(),
        "category_share": overall,
        "expert_category_share": [[_finite(v) for v in row] for row in share],
        "expert_category_lift": [[_finite(v) for v in row] for row in lift],
        "category": association(experts_NK, cats, n_experts, n_cats, permutations, [seed, li, 0]),
        "topic": association(
            experts_NK, topics, n_experts, n_topics, permutations, [seed, li, 1], documents_N=documents_N
        )
        if topics_known
        else None,
    }


def _summary(rows: list[dict[str, Any]], topics_known: bool) -> dict[str, Any]:
    """The summary over layers: mean NMI and excess NMI by category and by topic (None when the
    topics are unknown), the label the experts specialise by and the verdict."""
    cat_excess = float(np.mean([r["category"]["nmi_excess"] for r in rows]))
    topic_excess = float(np.mean([r["topic"]["nmi_excess"] for r in rows])) if topics_known else None
    by, verdict = _verdict(cat_excess, topic_excess)
    return {
        "category_nmi": float(np.mean([r["category"]["nmi"] for r in rows])),
        "category_nmi_excess": cat_excess,
        "topic_nmi": float(np.mean([r["topic"]["nmi"] for r in rows])) if topics_known else None,
        "topic_nmi_excess": topic_excess,
        "min_excess_nmi": MIN_EXCESS_NMI,
        "specialises_by": by,
        "verdict": verdict,
    }


def expert_specialisation(
    model,
    tok,
    docs: list[str],
    keys: list[str] | None,
    seq_len: int,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    batch_size: int = 8,
    permutations: int = DEFAULT_PERMUTATIONS,
    seed: int = DEFAULT_SEED,
) -> dict[str, Any]:
    """Routing of ``docs`` (their ``keys`` give the topics; None: unknown) through an MoE
    ``model``: per MoE layer the expert x category and expert x topic counts, category shares
    and lift, and NMI against a permutation baseline; a summary over layers with a verdict."""
    from models.moe import MoE

    layers = model.moe_layers
    if not layers:
        raise ValueError("the model has no MoE layer")
    blocks = [i for i, block in enumerate(model.blocks) if isinstance(block.ffn, MoE)]
    n_experts = layers[0].cfg.experts
    stream = token_stream(tok, docs, keys, max_tokens)
    choices = expert_choices(model, stream.ids, seq_len, batch_size)
    keep = stream.categories != NO_LABEL
    cats, topics = stream.categories[keep].astype(np.int64), stream.topics[keep]
    documents_N = stream.documents_N[keep]
    topics_known = keys is not None
    labels = (cats, topics, documents_N)
    n_cats, n_topics = len(CATEGORIES), len(stream.topic_names)
    overall = _shares(np.bincount(cats, minlength=n_cats))
    rows = [
        _layer_row(li, block, experts_NK[keep], labels, overall, n_experts, n_topics, topics_known, permutations, seed)
        for li, (block, experts_NK) in enumerate(zip(blocks, choices, strict=True))
    ]
    return {
        "experts": n_experts,
        "top_k": layers[0].cfg.top_k,
        "seq_len": seq_len,
        "documents": stream.documents,
        "tokens": int(keep.sum()),
        "tokens_with_eos": len(stream.ids),
        "categories": list(CATEGORIES),
        "topics": stream.topic_names,
        "topics_known": topics_known,
        "permutations": permutations,
        "seed": seed,
        "nulls": {"category": TOKEN_NULL, "topic": DOCUMENT_NULL if topics_known else None},
        "category_share": overall,
        "layers": rows,
        "summary": _summary(rows, topics_known),
    }


def _finite(v: float) -> float | None:
    return float(v) if np.isfinite(v) else None


def routing_analysis(
    run_dir: str | Path,
    data_dir: str | Path,
    device: str | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    permutations: int = DEFAULT_PERMUTATIONS,
    seed: int = DEFAULT_SEED,
) -> dict[str, Any]:
    """``expert_specialisation`` of a trained run on its study's held-out split, windows of its
    training context. ``{"moe": False}`` for a dense run, without loading it."""
    from models.config import ConfigError, load_config

    run_dir, data_dir = Path(run_dir), Path(data_dir)
    if load_config(run_dir / "config.yaml").moe is None:
        return {"moe": False}
    import torch

    from harness.data.tasks import heldout_documents
    from harness.evaluate.lm_eval_model import load_run_model

    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device", "cuda requested but no CUDA device is visible")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, cfg, run_dir = load_run_model(run_dir, dev)
    from harness.data.prepare import load_tokenizer

    tok = load_tokenizer(data_dir)
    split, docs = heldout_documents(data_dir, tok)
    keys = read_json(data_dir / "data.json").get("heldout_keys", {}).get(split)
    note = None
    if keys is None or len(keys) != len(docs):
        note = (
            f"{data_dir / 'data.json'} has no held-out keys for the {split} split (prepared before they were "
            f"recorded): topics are '{UNKNOWN_TOPIC}'; run `harness data` again to compare with topic"
        )
        keys = None
    result = expert_specialisation(
        model, tok, docs, keys, cfg.max_seq_len, max_tokens, permutations=permutations, seed=seed
    )
    return {"moe": True, "run_dir": str(run_dir), "split": split, "device": str(dev), "note": note} | result


__all__ = [
    "CATEGORIES",
    "DOCUMENT_NULL",
    "TOKEN_NULL",
    "TokenStream",
    "association",
    "char_categories",
    "expert_choices",
    "expert_specialisation",
    "regex_char_categories",
    "routing_analysis",
    "shuffle_labels",
    "token_categories",
    "token_stream",
    "topic_of",
]
