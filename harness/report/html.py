"""report.md as pages to read in a browser: results/<study>/report.html and its sections.

    harness report tiny    # writes report.md, then (this module) report.html next to it

The whole of report.md is rendered by markdown-it-py (CommonMark with GFM tables, raw HTML
off) into one self-contained file: figures are inlined as data URIs, so the page can be
mailed or kept as a CI artifact. Cells are shown exactly as report.md writes them (``+0.3311``
keeps its sign, ``2e12`` stays ``2e12``): nothing is re-parsed. Tables may be wider than the
reading column, up to the window; one wider still sits in a frame that scrolls sideways instead
of widening the page, with a scrollbar the page draws (Chromium and Safari show it always, where
overlay scrollbars would hide that columns lie past the edge). Columns of numbers are right-aligned.

``snakemake --report`` shows the same text (workflows/rules/report.smk): its opening page
(workflows/report/workflow.rst) takes ``report_sections/front.html`` (the study, "At a glance"
and "Claims" as an HTML fragment), and every ``##`` section of report.md is one page
``report_sections/NN-slug.html``, listed there in report.md's order.
"""

from __future__ import annotations

import base64
import html
import mimetypes
import re
from pathlib import Path

from markdown_it import MarkdownIt
from markdown_it.token import Token

from harness.core.io import write_text

SECTIONS = "report_sections"
FRONT = "front.html"
FRONT_ID = "moe-report-front"
FRONT_SECTIONS = ("At a glance", "Claims")
"""The sections the opening page of ``snakemake --report`` shows, after the study's title."""

# One number as report.md writes them: -0.034, +0.3311, 2e12, 12,345, 3.2x, 45%, 1.07*.
_NUMBER = re.compile(r"[-+−]?(?:\d[\d,]*(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?(?:%|x|×)?\*?")
# Signs and brackets around numbers: 0.12 ± 0.03, [0.10, 0.31], (p 0.04), a flag (1.9 †).
_NUMBER_GLUE = re.compile(r"[±†‡\[\]();,]|\bp\b|=|<|>")
_PLACEHOLDER = {"", "-", "–", "—", "n/a"}

_COLOURS = "--ink: #1f2328; --muted: #59636e; --rule: #d1d9e0; --band: #f6f8fa; --link: #0969da;"
_FONT = '16px/1.55 system-ui, -apple-system, "Segoe UI", "Noto Sans", "DejaVu Sans", sans-serif'
_MONO = 'ui-monospace, "SFMono-Regular", "DejaVu Sans Mono", Menlo, monospace'

PAGE_CSS = f"""
:root {{ {_COLOURS} }}
* {{ box-sizing: border-box; }}
body {{ margin: 0; color: var(--ink); background: #fff; font: {_FONT}; }}
main {{ max-width: 96rem; margin: 0 auto; padding: 1.5rem 1.5rem 4rem; }}
"""
ELEMENT_CSS = f"""
h1 {{ font-size: 1.9rem; line-height: 1.25; margin: 0.5rem 0 1rem; }}
h2 {{ font-size: 1.4rem; margin: 2.6rem 0 0.8rem; padding-bottom: 0.3rem; border-bottom: 1px solid var(--rule); }}
h3 {{ font-size: 1.1rem; margin: 1.8rem 0 0.6rem; }}
p, li {{ max-width: 52rem; }}
a {{ color: var(--link); }}
code {{ font: 0.88em/1.4 {_MONO}; background: var(--band); padding: 0.1em 0.3em; border-radius: 4px; }}
img {{ display: block; max-width: 100%; height: auto; margin: 1.2rem 0; }}
nav.toc {{ font-size: 0.92rem; background: var(--band); border: 1px solid var(--rule); border-radius: 6px;
  padding: 0.6rem 1rem; margin: 1rem 0 1.5rem; }}
nav.toc ol {{ margin: 0.3rem 0; padding-left: 1.4rem; columns: 2 18rem; }}
nav.toc li {{ margin: 0.1rem 0; }}
.crumb {{ font-size: 0.9rem; color: var(--muted); margin: 0; }}
.table-wrap {{ overflow-x: auto; width: fit-content; max-width: 100%; margin: 1rem 0 1.4rem;
  border: 1px solid var(--rule); border-radius: 6px; }}
.table-wrap::-webkit-scrollbar {{ height: 0.8rem; }}
.table-wrap::-webkit-scrollbar-track {{ background: var(--band); border-top: 1px solid var(--rule); }}
.table-wrap::-webkit-scrollbar-thumb {{ background: #8c959f; border: 2px solid var(--band); border-radius: 0.4rem; }}
table {{ border-collapse: collapse; margin: 0; font-size: 0.84rem; line-height: 1.4; }}
th, td {{ padding: 0.3rem 0.45rem; text-align: left; vertical-align: top; border: 0;
  border-bottom: 1px solid var(--rule); }}
th {{ background: var(--band); font-weight: 600; vertical-align: bottom; min-width: 3.5rem; max-width: 10rem; }}
td {{ max-width: 34rem; }}
td.word {{ white-space: nowrap; }}
tbody tr:last-child td {{ border-bottom: 0; }}
tbody tr:nth-child(even) td {{ background: #fbfcfd; }}
th.num, td.num {{ text-align: right; }}
td.num {{ white-space: nowrap; font-family: {_MONO}; font-size: 0.8rem; font-variant-numeric: tabular-nums; }}
"""
CSS = PAGE_CSS + ELEMENT_CSS
"""Short and self-contained: a reading column, tables framed and scrolled sideways when wide."""


def scoped(css: str, scope: str) -> str:
    """``css`` with every selector put under ``scope`` (a fragment inside another page)."""

    def one(rule: re.Match) -> str:
        selectors = ", ".join(f"{scope} {s.strip()}" for s in rule[1].strip().split(","))
        return f"{selectors} {{{rule[2]}}}"

    return "\n".join(one(rule) for rule in re.finditer(r"([^{}]+?)\s*\{([^{}]*)\}", css))


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "section"


def _plain(inline: str) -> str:
    """A heading's text without its Markdown marks (backticks, emphasis)."""
    return re.sub(r"[`*_]", "", inline).strip()


def is_number(cell: str) -> bool:
    """Whether a table cell holds numbers only (with ±, brackets, a p or a trailing * around them)."""
    parts = _NUMBER_GLUE.sub(" ", cell).split()
    return bool(parts) and all(_NUMBER.fullmatch(p) for p in parts)


def _number_columns(state) -> None:
    """Mark every column whose cells are all numbers (or placeholders such as -) with class num,
    and every other cell of one word (a run id such as moe-d64-e8k2_7e12_s0) with class word,
    which the style sheet keeps from breaking at its hyphens."""
    tokens = state.tokens
    i = 0
    while i < len(tokens):
        if tokens[i].type != "table_open":
            i += 1
            continue
        cells: dict[int, list[Token]] = {}
        values: dict[int, list[str]] = {}
        col = 0
        j = i + 1
        while tokens[j].type != "table_close":
            t = tokens[j]
            if t.type == "tr_open":
                col = 0
            elif t.type in ("th_open", "td_open"):
                cells.setdefault(col, []).append(t)
                if t.type == "td_open":
                    value = tokens[j + 1].content.strip()
                    values.setdefault(col, []).append(value)
                    if value not in _PLACEHOLDER and " " not in value and not is_number(value):
                        t.attrJoin("class", "word")
                col += 1
            j += 1
        for c, vals in values.items():
            shown = [v for v in vals if v not in _PLACEHOLDER]
            if shown and all(is_number(v) for v in shown):
                for t in cells[c]:
                    t.attrJoin("class", "num")
        i = j + 1


def _heading_ids(state) -> None:
    """An id on every heading, from its text; unique over every render that shares ``env``."""
    seen: set[str] = state.env.setdefault("heading_ids", set())
    tokens = state.tokens
    for i, t in enumerate(tokens):
        if t.type == "heading_open":
            slug = base = _slug(_plain(tokens[i + 1].content))
            n = 1
            while slug in seen:
                n += 1
                slug = f"{base}-{n}"
            seen.add(slug)
            t.attrSet("id", slug)


def renderer(base: Path) -> MarkdownIt:
    """CommonMark with GFM tables, raw HTML off; images under ``base`` inlined as data URIs."""
    md = MarkdownIt("commonmark", {"html": False}).enable("table")
    md.core.ruler.push("number_columns", _number_columns)
    md.core.ruler.push("heading_ids", _heading_ids)
    image = md.renderer.rules["image"]

    def inline_image(self, tokens, idx, options, env):
        token = tokens[idx]
        src = token.attrGet("src") or ""
        path = base / src
        if src and "://" not in src and not src.startswith("data:") and path.is_file():
            mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
            token.attrSet("src", f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}")
        # A figure that is absent keeps its path: the browser check reports it as broken.
        return image(tokens, idx, options, env)

    def table_open(self, tokens, idx, options, env):
        return '<div class="table-wrap">\n' + self.renderToken(tokens, idx, options, env)

    def table_close(self, tokens, idx, options, env):
        return self.renderToken(tokens, idx, options, env) + "</div>\n"

    md.add_render_rule("image", inline_image)
    md.add_render_rule("table_open", table_open)
    md.add_render_rule("table_close", table_close)
    return md


def split_sections(text: str) -> tuple[str, list[tuple[str, str]]]:
    """report.md as (the part before the first ``##`` heading, [(heading, section text), ...])."""
    preamble: list[str] = []
    sections: list[tuple[str, list[str]]] = []
    fenced = False
    for line in text.splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
        if not fenced and line.startswith("## "):
            sections.append((_plain(line[3:]), [line]))
        elif sections:
            sections[-1][1].append(line)
        else:
            preamble.append(line)
    return "\n".join(preamble), [(title, "\n".join(lines)) for title, lines in sections]


def page(title: str, body: str) -> str:
    """A whole HTML document around ``body``, with the report's style sheet."""
    return (
        "<!doctype html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(title)}</title>\n<style>{CSS}</style>\n</head>\n"
        f"<body>\n<main>\n{body}</main>\n</body>\n</html>\n"
    )


def _toc(rendered: str) -> str:
    """A list of links to the ``<h2>`` sections of ``rendered``."""
    items = "".join(
        f'<li><a href="#{slug}">{text}</a></li>' for slug, text in re.findall(r'<h2 id="([^"]+)">(.*?)</h2>', rendered)
    )
    return f'<nav class="toc" aria-label="Sections"><strong>Sections</strong><ol>{items}</ol></nav>\n'


def _study_title(preamble: str) -> str:
    first = next((line for line in preamble.splitlines() if line.startswith("# ")), "# Study report")
    return _plain(first[2:])


def front_fragment(md: MarkdownIt, preamble: str, sections: list[tuple[str, str]]) -> str:
    """The study, "At a glance" and "Claims" as an HTML fragment for the opening page of
    ``snakemake --report``, its style scoped to the fragment. That page keeps its text to a
    32rem column beside the workflow graph, centred in a scrolling box (a tall text's top would
    be out of reach) and marks code with backticks; the first rules (:has) undo that here."""
    wanted = [text for title, text in sections if title in FRONT_SECTIONS]
    body = md.render("\n\n".join([preamble, *wanted]))
    here = f"#{FRONT_ID}"
    return (
        f'<div id="{FRONT_ID}">\n<style>\n'
        f".prose:has({here}) {{ max-width: min(76rem, calc(100vw - 22rem)); }}\n"
        f"div:has(> div > div > .prose {here}) {{ align-items: flex-start; justify-content: flex-start; }}\n"
        f"{here} code::before, {here} code::after {{ content: none; }}\n"
        f"{here} {{ {_COLOURS} color: var(--ink); font: {_FONT}; }}\n"
        f"{scoped(ELEMENT_CSS, here)}\n</style>\n{body}</div>\n"
    )


def write_html(results: Path) -> Path:
    """Render ``results/report.md`` to report.html (figures inline) and to the pages under
    report_sections/ that ``snakemake --report`` shows; returns report.html's path."""
    results = Path(results)
    text = (results / "report.md").read_text(encoding="utf-8")
    md = renderer(results)
    preamble, sections = split_sections(text)
    title = _study_title(preamble)

    env: dict = {}  # one set of heading ids over the whole page
    head, rest = md.render(preamble, env), md.render("\n".join(section for _, section in sections), env)
    out = write_text(results / "report.html", page(title, head + _toc(rest) + rest))

    folder = results / SECTIONS
    keep = {FRONT}
    for n, (heading, section) in enumerate(sections, 1):
        name = f"{n:02d}-{_slug(heading)}.html"
        keep.add(name)
        crumb = f'<p class="crumb">{html.escape(title)} · section {n} of {len(sections)}</p>\n'
        write_text(folder / name, page(heading, crumb + md.render(section)))
    write_text(folder / FRONT, front_fragment(md, preamble, sections))
    for stale in folder.glob("[0-9][0-9]-*.html"):  # section pages of an earlier report; nothing else
        if stale.name not in keep:
            stale.unlink()
    return out


def section_labels(folder: str | Path, wildcards) -> dict[str, str]:
    """Labels of one section page for ``snakemake --report``: its number and its heading (the
    page's title), so the report lists the sections in report.md's order."""
    text = (Path(folder) / f"{wildcards.no}-{wildcards.section}.html").read_text(encoding="utf-8")
    found = re.search(r"<title>(.*?)</title>", text, re.S)
    return {"#": wildcards.no, "section": html.unescape(found[1]) if found else wildcards.section}
