"""Every file the project's documents and code cite exists in the project.

A cite is a path under one of the project's folders (``docs/METHODS.md``,
``harness/analysis/law.py``, ``tests/analysis/test_scaling.py``, ``workflows/studies/``,
``results/reference/cpu/cpu/``) or the bare name of a Markdown document (``README.md``), in the
README, the documents, the workflow files and every module of ``harness/`` and ``models/``
(strings and comments alike). Each must name a file or folder of the checkout, except:

- a placeholder ends what is checked: ``results/<study>/runs/<run-id>/`` and
  ``{out}/summary.md`` are checked up to the placeholder (``results/``), never past it;
- a glob (``models/configs/reference/*.yaml``) must match at least one path;
- ``results/`` holds generated outputs, which are not committed: only ``results/README.md`` and
  the committed references under ``results/reference/`` are held to exist;
- a path given to ``--out`` names what a command will write, not a file that is there;
- a bare document name that the project writes (the last part of a templated or generated
  path, ``report.md``) is an output, not a document to cite.

A failure lists each dangling cite as ``file:line: path``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

ROOTS = (".ci", ".github", "docs", "harness", "models", "profiles", "results", "tests", "workflows")
"""The project's top-level folders: a path starting with one of them is a cite of the checkout."""

SOURCES = (
    "README.md",
    "Snakefile",
    "docs/**/*.md",
    "results/README.md",
    "results/reference/*/*/README.md",
    "workflows/**/*.md",
    "workflows/**/*.rst",
    "workflows/**/*.yaml",
    "workflows/**/*.yml",
    "workflows/**/*.smk",
    "harness/**/*.py",
    "models/**/*.py",
)
"""The files whose cites are checked (globs relative to the project's root)."""

_PART = r"(?:[\w.*+-]|<[^<>\n]{1,40}>|\{[^{}\n]{1,40}\})+"
"""One segment of a path: name characters, a glob, or a <placeholder> / {placeholder}."""
ROOTED = re.compile(rf"(?<![\w./<>{{}}$-])(?:{'|'.join(re.escape(r) for r in ROOTS)})/(?:{_PART}(?:/{_PART})*/?)?")
"""A path under one of ``ROOTS``, not the tail of a longer path or URL (``lm-evaluation-harness/``)."""
DOCUMENT = re.compile(r"(?<![\w./<>{}$-])[\w-]+\.md\b(?![\w/-])")
"""The bare name of a Markdown document (``README.md``, ``METHODS.md``)."""
OUT_FLAG = re.compile(r"--out[= ]\s*$")
"""What precedes a path that a command is told to write."""
CONTINUED = re.compile(r"^[\s#*>]*([\w.*<>{}/-]+)")
"""A path's tail on the next line, after a comment's or a docstring's indentation."""
PLACEHOLDER = re.compile(r"[<>{}$]|^(?:VERB|NAME|STUDY|RUN|MODEL|FOLDER|DIR|FILE|PATH|OUT|DEVICE|RESULTS)(?:\.\w+)?$")
"""A segment that stands for something else (<study>, {run}, $VAR, STUDY, VERB.py)."""
ENTRY = re.compile(r"^\s*((?:\.?[\w-]+/)+)\s")
"""A line of a layout tree that starts with a folder (``.github/   workflows/ci.yml: ...``): the
paths after it may be relative to that folder."""


def sources() -> list[Path]:
    found = {p for pattern in SOURCES for p in ROOT.glob(pattern) if p.is_file()}
    return sorted(p for p in found if "__pycache__" not in p.parts)


def _clean(path: str) -> str:
    return path.rstrip(".,:;")


def _joined(path: str, tail: re.Match | None) -> str:
    """``path``, which ends a line with '/', joined with the next line's first word where that
    continues it: the joined path exists, or the word names a file (``tiny/README.md``) that is
    not itself a path of the checkout (a layout tree's next entry, ``profiles/``, is not)."""
    if tail is None:
        return path
    word = _clean(tail.group(1))
    if exists(path + word):
        return path + word
    looks_like_file = "." in word.rsplit("/", 1)[-1].lstrip(".")
    return path + word if looks_like_file and not exists(word) else path


def cites(text: str) -> Iterator[tuple[int, str, str]]:
    """(line number, path, kind) of every cite in ``text``: kind is 'rooted' or 'document'; a
    rooted path broken after a '/' at the end of a line is joined with its tail on the next
    (``_joined``); a path a layout tree's line gives relative to its folder, and that is there, is
    not a cite of the root."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        for m in ROOTED.finditer(line):
            if OUT_FLAG.search(line[: m.start()].rstrip("`'\" ") + " "):
                continue
            path = m.group(0)
            if path.endswith("/") and not line[m.end() :].strip() and i + 1 < len(lines):
                path = _joined(path, CONTINUED.match(lines[i + 1]))
            entry = ENTRY.match(line)
            if entry and entry.start(1) < m.start() and exists(entry.group(1) + _clean(path)):
                continue
            yield i + 1, _clean(path), "rooted"
        for m in DOCUMENT.finditer(line):
            yield i + 1, m.group(0), "document"


def checked_part(path: str) -> str:
    """The part of ``path`` before its first placeholder segment ('' when that is all of it)."""
    kept = []
    for part in path.split("/"):
        if PLACEHOLDER.search(part):
            return "/".join(kept) + "/" if kept else ""
        kept.append(part)
    return path


def generated(path: str) -> bool:
    """Under results/ and neither its README nor a committed reference: an output of a study."""
    return path.startswith("results/") and not (
        path.startswith("results/reference/") or path.rstrip("/") in ("results", "results/README.md")
    )


def exists(path: str) -> bool:
    path = path.rstrip("/")
    if any(c in path for c in "*?["):
        return any(ROOT.glob(path))
    return (ROOT / path).exists()


def output_documents(found: list[tuple[Path, int, str, str]]) -> set[str]:
    """Document names the project writes: the last part of a cited path that is templated or
    generated (``{out}/summary.md``, ``results/<study>/report.md``)."""
    out = set()
    for _, _, path, kind in found:
        name = path.rsplit("/", 1)[-1]
        if kind == "rooted" and name.endswith(".md") and (checked_part(path) != path or generated(path)):
            out.add(name)
    for source in sources():  # {RESULTS}/report.md: a template whose first part is a placeholder
        out |= set(re.findall(r"[}>]/(?:[\w.-]+/)*([\w-]+\.md)\b", source.read_text(errors="replace")))
    return out


def documents() -> set[str]:
    """Names of the Markdown documents the checkout holds."""
    skip = {".git", ".venv", "node_modules"}
    return {p.name for p in ROOT.rglob("*.md") if not skip & set(p.relative_to(ROOT).parts)}


def dangling() -> list[str]:
    found = [
        (source, line, path, kind)
        for source in sources()
        for line, path, kind in cites(source.read_text(errors="replace"))
    ]
    written, held = output_documents(found), documents()
    out = []
    for source, line, path, kind in found:
        where = f"{source.relative_to(ROOT)}:{line}: {path}"
        if kind == "document":
            if path not in held and path not in written:
                out.append(f"{where} (no document of that name in the project)")
            continue
        part = checked_part(path)
        if not part or generated(part) or exists(part):
            continue
        out.append(f"{where}" + ("" if part == path else f" (checked up to {part})"))
    return sorted(set(out))


def test_every_cited_path_exists():
    missing = dangling()
    assert not missing, f"{len(missing)} cite(s) of paths the project does not contain:\n" + "\n".join(missing)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("see SCIENCE.md for the rules", [(1, "SCIENCE.md", "document")]),
        ("# as docs/DESIGN.md says", [(1, "docs/DESIGN.md", "rooted")]),
        ("(`harness/analysis/law.py`).", [(1, "harness/analysis/law.py", "rooted")]),
        ("from results/reference/cpu/\n    tiny/README.md)", [(1, "results/reference/cpu/tiny/README.md", "rooted")]),
        ("https://github.com/EleutherAI/lm-evaluation-harness/x", []),
        ("from harness.analysis.stats import holm", []),
        ("harness match x.yaml --out models/configs/my-moe.yaml", []),
    ],
)
def test_cites_are_found_where_the_project_names_them(text, expected):
    assert list(cites(text)) == expected


@pytest.mark.parametrize(
    ("path", "ok"),
    [
        ("docs/SCIENCE.md", False),
        ("harness/analysis/law.py", True),
        ("harness/analysis/no_such_module.py", False),
        ("results/<study>/report.md", True),  # checked up to results/
        ("results/reference/<device class>/<study>/summary.json", True),
        ("results/reference/cpu/no-such-study/report.md", False),
        ("results/tiny/report.md", True),  # a generated output
        ("models/configs/reference/*.yaml", True),
        ("models/configs/reference/*.nothing", False),
    ],
)
def test_a_cite_is_judged_by_its_placeholders_globs_and_generated_outputs(path, ok):
    part = checked_part(path)
    assert (not part or generated(part) or exists(part)) is ok
