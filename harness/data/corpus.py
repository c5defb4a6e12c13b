"""What a study's data is made from, by content: ``data/corpus.json``, an input of the data rule.

Snakemake decides by timestamps. A corpus file edited in place after the pipeline finished
would leave the data step (which had no input) alone, and the report would stand on the old
data; a corpus copied without its timestamps, or moved to another folder, would look changed
although it holds the same text. So the workflow writes ``corpus.json`` when it starts
(:func:`sync_corpus`): the data fingerprint of the corpus as it is now (``harness.data.prepare``: each
document's key and text, never where it lies) and the hash of the tokenizer file, if any. The
file gets a new time only when that content changes, and is made older than data.json whenever
data.json was made from that content: only a change of content reruns the data step.

Reading the whole corpus is skipped while the same files have the same sizes and times as when
it was last read (``signature``). An ``hf`` dataset is not read here (it may need the network):
its settings, parameters of the data rule, stand for it.

corpus.json is checked before it is believed: a file that is not a JSON object of these fields is
refused in one line, and so is one whose fingerprint is not that of the files its signature
stands for (read again whenever corpus.json would say the corpus changed since the data was
prepared): a hand-edited corpus.json is named as damaged, never taken for a new corpus that
would prepare the data and train every run again.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from harness.core.errors import DamagedFile
from harness.core.io import read_json, read_json_object
from harness.study.records import TEXT, fields_problem, optional, shown
from harness.study.runs import essential_fields
from harness.study.spec import Study
from models.config import ConfigError

CORPUS = "corpus.json"
CONTENT = ("fingerprint", "tokenizer_file_sha256")
"""What corpus.json says of the corpus; its other field, ``signature``, only saves rereading it."""
READ_SETTINGS = ("source", "paths", "text_field", "max_bytes")
"""The data settings that decide which documents are read (and so the fingerprint)."""


def _signature(study: Study) -> str | None:
    """A hash of the settings that decide what is read and of each file's path, size, time and
    identity (device and inode); None for a source that is not a set of local files. The files are
    those the data step reads (``corpus_files``): a symbolic link stands for its target, whose
    stat it gives, so a link turned to another file of the same size and time changes it too."""
    from harness.data.prepare import TRAINING_SIDE, corpus_files

    files = corpus_files(study.data, study.path)
    if files is None:
        return None
    digest = hashlib.sha256(json.dumps(essential_fields(study.data, TRAINING_SIDE), sort_keys=True).encode())
    for path in files:
        stat = path.stat()
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\0{stat.st_dev}:{stat.st_ino}\n".encode())
    return digest.hexdigest()


def corpus_content(study: Study, results: Path) -> dict[str, Any]:
    """``fingerprint`` (None for an hf dataset) and ``tokenizer_file_sha256`` of the corpus as it
    is now, with its ``signature``; read from corpus.json when no file changed since it was written."""
    from harness.data.prepare import corpus_fingerprint, tokenizer_file_sha

    try:
        signature = _signature(study)
        old = read_corpus(results / "data" / CORPUS)
        if signature is not None and old and old.get("signature") == signature and set(CONTENT) <= old.keys():
            cached = {k: old[k] for k in CONTENT} | {"signature": signature}
            return _checked(study, results, cached)
        fingerprint = None if signature is None else corpus_fingerprint(study.data, study.path)
        tokenizer = tokenizer_file_sha(study.data)
    except OSError as e:
        raise ConfigError("data.paths", f"cannot read {e.filename}: {e.strerror}", study.path) from None
    return {"fingerprint": fingerprint, "tokenizer_file_sha256": tokenizer, "signature": signature}


AGAIN = "the workflow (`snakemake`) reads the corpus again and writes it anew when it next starts"
REWRITE = f"delete it: it only records what the corpus holds, and {AGAIN}"
"""The remedy for a damaged corpus.json."""


def read_corpus(path: Path) -> dict[str, Any] | None:
    """data/corpus.json (None where there is none), refused when it is not a JSON object whose
    fields are those :func:`sync_corpus` writes, of their kinds (a missing one: read the corpus)."""
    if path.is_symlink():  # the workflow writes this file: it replaces no link
        raise DamagedFile(path, "a symbolic link is where corpus.json belongs", f"move it aside: {AGAIN}")
    if not path.exists():
        return None
    if not path.is_file():
        raise DamagedFile(path, "a folder is where corpus.json belongs", f"move it aside: {AGAIN}")
    content = read_json(path, remedy=REWRITE)
    if not isinstance(content, dict):
        raise DamagedFile(path, f"it holds {shown(content)}, not a JSON object", REWRITE)
    if why := fields_problem(content, {}, {k: optional(TEXT) for k in (*CONTENT, "signature")}):
        raise DamagedFile(path, why, REWRITE)
    return content


def _checked(study: Study, results: Path, cached: dict[str, Any]) -> dict[str, Any]:
    """``cached`` (corpus.json's content, its signature that of the files now) as it is, once it
    is believed: at once when the prepared data was made from it (or none is prepared), else only
    after the corpus is read again and gives its fingerprint. Refused when it does not (the file
    was edited); the tokenizer file, which the signature does not cover, is hashed anew."""
    from harness.data.prepare import corpus_fingerprint, tokenizer_file_sha

    meta = read_json_object(results / "data" / "data.json")
    if meta is None or made_from(meta, cached):
        return cached
    fingerprint = corpus_fingerprint(study.data, study.path)
    if fingerprint != cached["fingerprint"]:
        path = results / "data" / CORPUS
        raise DamagedFile(
            path,
            f"its fingerprint {str(cached['fingerprint'])[:16]} is not that of the corpus files its signature "
            f"stands for, unchanged since it was written, which hold {fingerprint[:16]} (edited by hand?)",
            REWRITE,
        )
    return cached | {"tokenizer_file_sha256": tokenizer_file_sha(study.data)}


def made_from(meta: dict[str, Any] | None, content: dict[str, Any]) -> bool:
    """Whether the prepared data (its data.json) was made from this content."""
    if not meta or content["fingerprint"] is None:
        return False
    tokenizer = (meta.get("tokenizer") or {}).get("file_sha256")
    return meta.get("fingerprint") == content["fingerprint"] and tokenizer == content["tokenizer_file_sha256"]


def corpus_update(results: Path, content: dict[str, Any]) -> tuple[str, float | None] | None:
    """What :func:`sync_corpus` does to data/corpus.json for ``content``: the text it holds then
    and the time it gets (None: now), or None when it leaves the file as it is. Its time is kept
    when only the signature changed, and made older than the prepared data when that was made
    from this content, so that only a change of content reruns the data step."""
    path, data_json = results / "data" / CORPUS, results / "data" / "data.json"
    old = read_corpus(path)
    same = old is not None and all(old.get(k) == content[k] for k in CONTENT)
    when = path.stat().st_mtime if same else None
    if made_from(read_json_object(data_json), content):
        # Older than every output of the data rule: Snakemake compares an input with the oldest.
        outputs = [data_json, *(results / "data").glob("*.bin"), results / "data" / "tokenizer.json"]
        made = min(p.stat().st_mtime for p in outputs if p.is_file())
        if when is None or when >= made:
            when = made - 1
    if old == content and when == path.stat().st_mtime:
        return None
    return json.dumps(content, sort_keys=True, indent=1) + "\n", when


def sync_corpus(
    study: Study, results: Path, write: bool = True, content: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Write data/corpus.json where it is missing or its content changed, with the time
    :func:`corpus_update` gives it. Returns the content (``content``: already read). ``write``
    False (a dry run): only read."""
    from harness.core.io import write_text

    path = results / "data" / CORPUS
    content = content or corpus_content(study, results)
    if not write or (update := corpus_update(results, content)) is None:
        return content
    text, when = update
    if read_corpus(path) != content:
        write_text(path, text)
    if when is not None:
        os.utime(path, (when, when))
    return content


def corpus_changes(study: Study, results: Path, content: dict[str, Any] | None = None) -> list[str]:
    """How the corpus differs in content from the one the prepared data was made from (empty when
    it does not, when no data is prepared, or for an hf dataset)."""
    meta = read_json_object(results / "data" / "data.json")
    if not meta or "fingerprint" not in meta:
        return []
    content = content or corpus_content(study, results)
    if content["fingerprint"] is None or made_from(meta, content):
        return []
    changes = []
    if meta["fingerprint"] != content["fingerprint"]:
        where = "the standard library" if study.data.source.value.startswith("python") else "data.paths"
        changes.append(
            f"the corpus ({where}) changed in content since the data was prepared: "
            f"fingerprint {meta['fingerprint'][:16]} -> {content['fingerprint'][:16]}"
        )
    tokenizer = (meta.get("tokenizer") or {}).get("file_sha256")
    if tokenizer != content["tokenizer_file_sha256"]:
        changes.append("data.tokenizer_file changed in content since the data was prepared")
    return changes
