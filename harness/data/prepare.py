"""Corpus -> train/validation/test split -> byte-level BPE tokenizer -> memory-mapped token shards.

Sources (``data.source`` of a study):
  python-stdlib  the installed standard library's ``.py`` files (offline; the default)
  python-site    the standard library plus site-packages (offline)
  files          local text, JSONL or Parquet files
  hf             a Hugging Face dataset (needs network unless it is a local folder)

Documents are read in a deterministic order (sorted paths) and assigned to a split by a hash
of their key, so adding a file never moves another one between splits. ``data.json`` records a
fingerprint of exactly what was read, and the keys of the held-out (validation and test)
documents in the order their shards hold them.

One policy for unreadable input, whatever the format: a document that cannot be read exactly
(bytes that are not valid UTF-8, or not valid in the encoding a ``.py`` file declares under
PEP 263; a JSONL line that is not JSON; a Parquet file that does not open) is skipped, never
repaired with replacement characters, and so is a file whose suffix is not a text, JSONL or
Parquet suffix. Each skip is counted by reason, with examples, in ``data.json`` (``skipped``)
and reported on stderr. A record without the configured text field is a configuration error.

Each shard's size and SHA-256 are recorded in ``data.json``; :func:`verify_shards` checks them,
and that every token id is inside the vocabulary, before a run trains on them.

Symbolic links in ``data.paths`` are read as what they point to (:mod:`harness.data.listing`).
The data folder itself (``results/<study>/data``, or a folder above it) may be a link to a folder
elsewhere, another disk say: the data is written in its target; a link there that leads nowhere
is refused. The step replaces no link: a file it writes (``tokenizer.json``, the shards,
``data.json``) that is a link is refused before anything is written; when the data is unchanged
nothing is written, and such a link is read as its target.

    harness data tiny            # writes results/tiny/data/
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import sysconfig
import tokenize
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from harness.core.errors import DamagedFile, HarnessError
from harness.core.io import atomic_write, read_json, sha256_file, write_json
from harness.data.listing import check_data_folder, check_no_links, expand_paths, python_files, site_dirs
from harness.study.spec import DataConfig, DataSource, Study
from models.config import ConfigError

SPLITS = ("train", "validation", "test")
EOS = "<|endoftext|>"
TEXT_SUFFIXES = {".py", ".txt", ".md", ".rst", ".c", ".h", ".js", ".ts", ".json", ".yaml", ".yml", ".toml"}
RECORD_SUFFIXES = {".jsonl", ".parquet"}
SKIP_EXAMPLES = 5


@dataclass
class Skipped:
    """What was skipped while reading a corpus, by reason: a count and the first few keys."""

    counts: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    examples: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))

    def add(self, reason: str, key: str) -> None:
        self.counts[reason] += 1
        if len(self.examples[reason]) < SKIP_EXAMPLES:
            self.examples[reason].append(key)

    def as_dict(self) -> dict[str, Any]:
        return {r: {"count": n, "examples": self.examples[r]} for r, n in sorted(self.counts.items())}

    def lines(self) -> list[str]:
        return [f"skipped {n} ({r}), e.g. {', '.join(self.examples[r])}" for r, n in sorted(self.counts.items())]


@dataclass(frozen=True)
class Document:
    key: str  # stable identity: relative path (plus record number for JSONL/Parquet/hf rows)
    text: str


def split_of(key: str, validation_fraction: float, test_fraction: float) -> str:
    """Hash of the key -> a uniform number in [0, 1) -> the split."""
    u = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64
    if u < validation_fraction:
        return "validation"
    if u < validation_fraction + test_fraction:
        return "test"
    return "train"


def _read_text(path: Path) -> str | None:
    """The file's text, decoded exactly: UTF-8, or for ``.py`` the encoding it declares
    (PEP 263); None when its bytes are not valid in that encoding."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        if path.suffix != ".py":
            return None
    try:
        encoding, _ = tokenize.detect_encoding(io.BytesIO(raw).readline)
        return raw.decode(encoding)
    except (UnicodeDecodeError, SyntaxError, LookupError):
        return None


def _jsonl_records(path: Path, text_field: str, source: str, skipped: Skipped) -> Iterator[tuple[int, str]]:
    for i, raw in enumerate(path.read_bytes().splitlines()):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            skipped.add("not UTF-8", f"{path}:{i + 1}")
            continue
        except json.JSONDecodeError:
            skipped.add("not JSON", f"{path}:{i + 1}")
            continue
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            raise ConfigError("data.text_field", f"{path}:{i + 1}: record has no string field '{text_field}'", source)
        yield i, record[text_field]


def _records(path: Path, text_field: str, source: str, skipped: Skipped) -> Iterator[tuple[int, str]]:
    if path.suffix == ".jsonl":
        yield from _jsonl_records(path, text_field, source, skipped)
    else:  # .parquet
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception:  # pyarrow raises ArrowInvalid, OSError and others for a damaged file
            skipped.add("not a readable Parquet file", str(path))
            return
        if text_field not in table.column_names:
            raise ConfigError(
                "data.text_field",
                f"{path}: no column '{text_field}'; columns: {', '.join(table.column_names)}",
                source,
            )
        for i, text in enumerate(table.column(text_field).to_pylist()):
            if text is not None:
                yield i, text


def _hf_documents(cfg: DataConfig, source: str) -> Iterator[Document]:
    import datasets

    name = cfg.hf_dataset
    if not name:
        raise ConfigError("data.hf_dataset", "required with source 'hf'", source)
    try:
        ds = datasets.load_dataset(name, cfg.hf_config, split=cfg.hf_split)
    except (ConnectionError, OSError) as e:
        raise ConfigError(
            "data.hf_dataset",
            f"could not load '{name}' (no network, or no such dataset; a local folder also works): {e}",
            source,
        ) from None
    except Exception as e:  # datasets raises many types for an unreachable hub
        raise ConfigError("data.hf_dataset", f"could not load '{name}': {type(e).__name__}: {e}", source) from None
    if cfg.text_field not in ds.column_names:
        raise ConfigError(
            "data.text_field", f"dataset has no column '{cfg.text_field}'; columns: {ds.column_names}", source
        )
    for i, text in enumerate(ds[cfg.text_field]):
        if text:
            yield Document(f"{name}/{cfg.hf_split}/{i}", text)


def _text_documents(files: list[tuple[str, Path]], skipped: Skipped) -> Iterator[Document]:
    for key, path in files:
        text = _read_text(path)
        if text is None:
            skipped.add("not valid in its encoding (UTF-8, or the PEP 263 declaration of a .py file)", key)
        else:
            yield Document(key, text)


def iter_documents(cfg: DataConfig, source: str = "", skipped: Skipped | None = None) -> Iterator[Document]:
    """Every document of the source in a deterministic order, up to ``max_bytes``; what cannot be
    read is counted in ``skipped``."""
    budget = cfg.max_bytes
    skipped = Skipped() if skipped is None else skipped

    def capped(docs: Iterator[Document]) -> Iterator[Document]:
        total = 0
        for doc in docs:
            if budget is not None and total >= budget:
                return
            total += len(doc.text.encode("utf-8"))
            yield doc

    if cfg.source in (DataSource.PYTHON_STDLIB, DataSource.PYTHON_SITE):
        files = list(python_files(Path(sysconfig.get_paths()["stdlib"]), "stdlib", skip_packages=True))
        if cfg.source is DataSource.PYTHON_SITE:
            for i, d in enumerate(site_dirs()):
                files.extend(python_files(d, f"site{i}", skip_packages=False))
        yield from capped(_text_documents(files, skipped))
    elif cfg.source is DataSource.FILES:
        if not cfg.paths:
            raise ConfigError("data.paths", "required with source 'files'", source)

        def docs() -> Iterator[Document]:
            for key, path in expand_paths(cfg.paths, source):
                if path.suffix in RECORD_SUFFIXES:
                    for i, text in _records(path, cfg.text_field, source, skipped):
                        yield Document(f"{key}#{i}", text)
                elif path.suffix in TEXT_SUFFIXES:
                    yield from _text_documents([(key, path)], skipped)
                else:
                    skipped.add(f"suffix '{path.suffix}' is not a text, JSONL or Parquet suffix", key)

        yield from capped(docs())
    else:
        yield from capped(_hf_documents(cfg, source))


def corpus_files(cfg: DataConfig, source: str = "") -> list[Path] | None:
    """Every file the data step may read, in reading order; None for an ``hf`` dataset (not a
    set of local files)."""
    if cfg.source in (DataSource.PYTHON_STDLIB, DataSource.PYTHON_SITE):
        files = [p for _, p in python_files(Path(sysconfig.get_paths()["stdlib"]), "stdlib", skip_packages=True)]
        if cfg.source is DataSource.PYTHON_SITE:
            for i, d in enumerate(site_dirs()):
                files.extend(p for _, p in python_files(d, f"site{i}", skip_packages=False))
        return files
    if cfg.source is DataSource.FILES:
        if not cfg.paths:
            raise ConfigError("data.paths", "required with source 'files'", source)
        return [p for _, p in expand_paths(cfg.paths, source)]
    return None


def fold(fingerprint, doc: Document) -> None:
    """Add a document to the data fingerprint: its key and the hash of its text, so that the
    fingerprint says what was read, not where it lay."""
    fingerprint.update(doc.key.encode() + b"\0" + hashlib.sha256(doc.text.encode()).digest())


def corpus_fingerprint(cfg: DataConfig, source: str = "") -> str:
    """The data fingerprint of the corpus as it is now (what ``prepare`` records), without
    tokenizing anything."""
    fingerprint = hashlib.sha256()
    for doc in iter_documents(cfg, source):
        fold(fingerprint, doc)
    return fingerprint.hexdigest()


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE (GPT-2 style) trained on the train split, with one end-of-text token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tok


WHERE = ("paths", "tokenizer_file")
"""Data settings that say where files are, not what they hold (the fingerprint and the
tokenizer file's hash say that)."""
TRAINING_SIDE = ("allow_repetition",)
"""Data settings that only training reads (how many epochs a run may take): they change no token.
Every other setting does: ``source``, ``text_field``, ``hf_*`` and ``max_bytes`` choose the
documents, the two fractions split them, ``vocab_size`` and the tokenizer file's content tokenize
them."""
NOT_TOKENS = WHERE + TRAINING_SIDE
"""The data settings left out of the data's identity: changing one prepares nothing again."""


def tokenizer_file_sha(cfg: DataConfig) -> str | None:
    path = Path(cfg.tokenizer_file) if cfg.tokenizer_file else None
    return sha256_file(path) if path is not None and path.is_file() else None


def _unchanged(out_dir: Path, config: dict[str, Any], fingerprint: str, tok_sha: str | None) -> dict[str, Any] | None:
    """The prepared data's data.json when it was made from this corpus with these settings and
    this tokenizers version, and its shards are whole: then nothing is written again."""
    import tokenizers

    try:
        meta = read_meta(out_dir, "harness data")
        verify_shards(out_dir, meta, "harness data")
    except (HarnessError, OSError):
        return None
    # Where the corpus was read from may differ (a copied project), and what only training
    # reads; what was read and how it is tokenized may not.
    wanted = data_identity(config, fingerprint, tok_sha, tokenizers.__version__)
    if meta_identity(meta) != wanted or not (out_dir / "tokenizer.json").is_file():
        return None
    return meta | {"unchanged": True}


def settings_of(cfg: DataConfig) -> dict[str, Any]:
    """The data settings as data.json records them (``config``)."""
    return {k: (v.value if hasattr(v, "value") else v) for k, v in cfg.__dict__.items()}


def data_identity(config: dict[str, Any], fingerprint: str | None, tok_sha: str | None, version: str | None) -> tuple:
    """What decides the tokens: the documents read (their fingerprint), the settings less
    ``NOT_TOKENS``, the tokenizer file's content and the tokenizers version."""
    settings = {k: v for k, v in config.items() if k not in NOT_TOKENS}
    return settings, fingerprint, tok_sha, version


def meta_identity(meta: dict[str, Any]) -> tuple:
    """:func:`data_identity` of prepared data, from its data.json."""
    tokenizer = meta.get("tokenizer") or {}
    return data_identity(
        meta.get("config") or {}, meta.get("fingerprint"), tokenizer.get("file_sha256"), meta.get("tokenizers")
    )


def _split_corpus(cfg: DataConfig, source: str) -> tuple[dict[str, list[Document]], Any, Skipped]:
    """The corpus's documents by split, the fingerprint of what was read (a hashlib object) and
    what was skipped (reported on stderr); refused when the train or validation split is empty."""
    docs: dict[str, list[Document]] = {s: [] for s in SPLITS}
    fingerprint = hashlib.sha256()
    skipped = Skipped()
    for doc in iter_documents(cfg, source, skipped):
        fold(fingerprint, doc)
        docs[split_of(doc.key, cfg.validation_fraction, cfg.test_fraction)].append(doc)
    if not docs["train"] or not docs["validation"]:
        raise ConfigError(
            "data",
            f"the corpus gave {len(docs['train'])} train and {len(docs['validation'])} validation documents; "
            "both must be non-empty (more data, or a larger validation_fraction)"
            + "".join(f"; {line}" for line in skipped.lines()),
            source,
        )
    for line in skipped.lines():
        print(f"harness data: {line}", file=sys.stderr)
    return docs, fingerprint, skipped


def _tokenizer(cfg: DataConfig, train_texts: list[str], source: str):
    """The study's tokenizer (its ``tokenizer_file``, or one trained on ``train_texts``) and its
    end-of-text id; refused when its vocabulary is not the study's or it has no end-of-text token."""
    from tokenizers import Tokenizer

    if cfg.tokenizer_file:
        path = Path(cfg.tokenizer_file)
        if not path.is_file():
            raise ConfigError("data.tokenizer_file", f"no such file: {path}", source)
        tokenizer = Tokenizer.from_file(str(path))
    else:
        tokenizer = train_tokenizer(train_texts, cfg.vocab_size)
    vocab = tokenizer.get_vocab_size()
    if vocab != cfg.vocab_size:
        raise ConfigError(
            "data.vocab_size",
            f"the tokenizer has {vocab} tokens, the study asks for {cfg.vocab_size}; the corpus is too small "
            "to learn that many merges, or the tokenizer file differs: make them agree",
            source,
        )
    eos = tokenizer.token_to_id(EOS)
    if eos is None:
        raise ConfigError("data.tokenizer_file", f"the tokenizer has no '{EOS}' token", source)
    return tokenizer, eos


def _write_shards(tokenizer, eos: int, dtype, docs: dict[str, list[Document]], out_dir: Path) -> dict[str, Any]:
    """Write each split's shard (its documents' token ids, each followed by ``eos``) to
    ``out_dir/<split>.bin``; returns data.json's ``splits``: per split its documents, bytes, tokens,
    bytes per token, file size and SHA-256."""
    splits: dict[str, Any] = {}
    for split in SPLITS:
        ids: list[int] = []
        texts = [d.text for d in docs[split]]
        for enc in tokenizer.encode_batch(texts) if texts else []:
            ids.extend(enc.ids)
            ids.append(eos)
        arr = np.asarray(ids, dtype=dtype)
        atomic_write(out_dir / f"{split}.bin", lambda p, arr=arr: arr.tofile(p), need_bytes=arr.nbytes, keep_same=True)
        n_bytes = sum(len(t.encode("utf-8")) for t in texts)
        splits[split] = {
            "documents": len(texts),
            "bytes": n_bytes,
            "tokens": int(arr.size),
            "bytes_per_token": n_bytes / arr.size if arr.size else None,
            "file_bytes": int(arr.nbytes),
            "sha256": hashlib.sha256(arr.tobytes()).hexdigest(),
        }
    return splits


WRITES = ("tokenizer.json", *(f"{split}.bin" for split in SPLITS), "data.json")
"""The files the data step writes in its folder."""


def prepare(study: Study, out_dir: Path, force: bool = False) -> dict[str, Any]:
    """Read the corpus, split it, build the tokenizer and write the shards and data.json. When
    the folder already holds the same data (same corpus, settings and tokenizers version), it is
    left untouched (``force``: write it again anyway) and the result says ``unchanged``. A data
    folder that is a link is written in its target; a file in it that is a link is refused."""
    import tokenizers

    cfg, source = study.data, study.path
    check_data_folder(out_dir)
    docs, fingerprint, skipped = _split_corpus(cfg, source)
    config = settings_of(cfg)
    tok_sha = tokenizer_file_sha(cfg)
    if not force and (same := _unchanged(out_dir, config, fingerprint.hexdigest(), tok_sha)) is not None:
        return same
    check_no_links(out_dir, WRITES)
    before = _times(out_dir)
    tokenizer, eos = _tokenizer(cfg, [d.text for d in docs["train"]], source)
    vocab = tokenizer.get_vocab_size()
    # Each file is replaced only when its bytes change: data prepared again the same keeps its
    # times, so Snakemake trains nothing again.
    atomic_write(out_dir / "tokenizer.json", lambda p: tokenizer.save(str(p)), keep_same=True)

    dtype = np.uint16 if vocab <= 2**16 else np.uint32
    splits = _write_shards(tokenizer, eos, dtype, docs, out_dir)
    meta = {
        "study": study.name,
        "source": cfg.source.value,
        "config": config,
        "fingerprint": fingerprint.hexdigest(),
        "tokenizers": tokenizers.__version__,
        "python": sys.version.split()[0],
        "tokenizer": {
            "vocab_size": vocab,
            "eos_id": eos,
            "trained": cfg.tokenizer_file is None,
            "file_sha256": tok_sha,
        },
        "dtype": np.dtype(dtype).name,
        "splits": splits,
        "skipped": skipped.as_dict(),
        # The held-out documents' keys in shard order, so analyses of the decoded documents
        # (harness.data.tasks.heldout_documents) know where each came from.
        "heldout_keys": {split: [d.key for d in docs[split]] for split in ("validation", "test")},
    }
    write_json(out_dir / "data.json", meta, keep_same=True)  # written last: its presence means the data is complete
    if before and _times(out_dir) == before:
        # The tokens are those already there, byte for byte (a damaged or deleted data.json written
        # again): data.json takes their time, so that nothing trained on them is trained again.
        when = max(before.values())
        os.utime(out_dir / "data.json", ns=(when, when))
    return meta


def _times(out_dir: Path) -> dict[str, int]:
    """The times of the tokenizer and the shards in ``out_dir`` (empty unless all are there)."""
    paths = [out_dir / name for name in WRITES if name != "data.json"]
    if not all(p.is_file() for p in paths):
        return {}
    return {p.name: p.stat().st_mtime_ns for p in paths}


META_FIELDS = ("fingerprint", "dtype", "tokenizer", "splits")


def load_tokenizer(data_dir: Path, made_by: str = "harness data STUDY"):
    """The prepared data's tokenizer.json: absent or unreadable, named with the command that writes
    it again (``made_by``; the shards stay as they are when the corpus and settings are unchanged)."""
    from tokenizers import Tokenizer

    path = data_dir / "tokenizer.json"
    again = f"`{made_by}` writes it again"
    if not path.is_file():
        raise HarnessError(f"{path}: missing from the prepared data; {again}")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for a file it cannot parse
        raise DamagedFile(
            path, f"not a tokenizer the tokenizers library can read ({' '.join(str(e).split())})", again
        ) from None


def read_meta(data_dir: Path, made_by: str) -> dict[str, Any]:
    """``data.json`` of a prepared data folder, checked for the fields every reader needs."""
    path = data_dir / "data.json"
    meta = read_json(path, made_by=made_by)
    remedy = f"run `{made_by}` again"
    if not isinstance(meta, dict) or any(k not in meta for k in META_FIELDS):
        raise DamagedFile(path, f"it lacks one of the fields {', '.join(META_FIELDS)}", remedy)
    for split in SPLITS:
        info = meta["splits"].get(split)
        if not isinstance(info, dict) or not {"tokens", "sha256", "file_bytes"} <= info.keys():
            raise DamagedFile(
                path, f"split '{split}' has no token count and checksum (written by an older harness?)", remedy
            )
    return meta


def verify_shards(data_dir: Path, meta: dict[str, Any], made_by: str) -> None:
    """Each shard's size and SHA-256 against data.json, and every token id inside the vocabulary."""
    remedy = f"run `{made_by}` again"
    vocab = meta["tokenizer"]["vocab_size"]
    for split in SPLITS:
        info, path = meta["splits"][split], data_dir / f"{split}.bin"
        if not path.is_file():
            raise DamagedFile(path, "missing, though data.json lists it", remedy)
        size = path.stat().st_size
        if size != info["file_bytes"]:
            raise DamagedFile(path, f"{size:,} bytes, data.json records {info['file_bytes']:,}", remedy)
        if sha256_file(path) != info["sha256"]:
            raise DamagedFile(path, "its SHA-256 does not match data.json (the tokens were changed)", remedy)
        tokens = np.memmap(path, dtype=meta["dtype"], mode="r") if size else np.zeros(0)
        top = int(tokens.max()) if tokens.size else -1
        if top >= vocab:
            raise DamagedFile(path, f"token id {top} is outside the vocabulary of {vocab}", remedy)


class TokenShard:
    """One split's tokens, memory-mapped, served as (input, target) windows of seq_len."""

    def __init__(self, data_dir: Path, split: str, seq_len: int):
        meta = read_json(data_dir / "data.json", made_by="harness data")
        self.tokens = np.memmap(data_dir / f"{split}.bin", dtype=meta["dtype"], mode="r")
        self.seq_len = seq_len
        self.windows = (len(self.tokens) - 1) // seq_len
        if self.windows < 1:
            raise HarnessError(
                f"{data_dir / (split + '.bin')}: {len(self.tokens)} tokens hold no window of recipe.seq_len "
                f"{seq_len}; lower recipe.seq_len or use more data"
            )

    def window_batch(self, indices: np.ndarray):
        import torch

        starts = indices * self.seq_len
        rows = np.stack([self.tokens[s : s + self.seq_len + 1] for s in starts]).astype(np.int64)
        batch = torch.from_numpy(rows)
        return batch[:, :-1], batch[:, 1:]

    def train_batch(self, step: int, batch_size: int, seed: int):
        """Batch ``step`` of the data order fixed by ``seed``: each epoch is a seeded permutation
        of the windows. Depends only on (seed, step), so a resumed run sees the same batches and
        runs with the same seed share one data order."""
        positions = np.arange(step * batch_size, (step + 1) * batch_size)
        epochs, offsets = np.divmod(positions, self.windows)
        indices = np.empty_like(positions)
        for epoch in np.unique(epochs):
            perm = np.random.default_rng([seed, int(epoch)]).permutation(self.windows)
            mask = epochs == epoch
            indices[mask] = perm[offsets[mask]]
        return self.window_batch(indices)

    def eval_indices(self, n_windows: int) -> np.ndarray:
        """``n_windows`` windows spaced evenly from the first to the last of the split (all of
        them when it holds fewer): a fixed sample, the same for every run, that sees every part
        of the split rather than its first documents only (which are few files of one kind)."""
        n = min(self.windows, n_windows)
        return np.unique(np.linspace(0, self.windows - 1, n).round().astype(np.int64))

    def eval_batches(self, n_batches: int, batch_size: int):
        """The fixed evaluation sample of ``eval_indices`` in batches of ``batch_size``."""
        indices = self.eval_indices(n_batches * batch_size)
        for start in range(0, len(indices), batch_size):
            yield self.window_batch(indices[start : start + batch_size])
