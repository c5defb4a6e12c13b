"""report.html: report.md rendered for a browser, and the headless-Chromium check of such a page.

The rendering tests need no browser. The browser tests run Chromium (Debian's ``chromium``)
when it is installed and are skipped, saying so, when it is not; they show that the check
passes a good page and fails, naming them, a broken image and a table wider than the page.
"""

from __future__ import annotations

import re
import struct
import zlib
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import ROOT

from harness.core.errors import HarnessError
from harness.report.browser_check import check, find_browser, main
from harness.report.html import FRONT, SECTIONS, is_number, section_labels, split_sections, write_html


def _png(path: Path, width: int = 40, height: int = 20) -> Path:
    """A valid grey PNG, written without an imaging library."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + b"\x80" * width for _ in range(height))
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png)
    return path


WIDE_COLUMNS = 28

REPORT_MD = f"""# Study `pico`

A test study.

## At a glance

Each MoE against its dense run.

| budget FLOPs | MoE | val loss MoE - dense | compute multiplier | train tokens/s x |
|---|---|---|---|---|
| 2e12 | moe-e8k2 | +0.3311 | 1.07* | 0.41 † |
| 7e12 | moe-e4k1 | -0.0340 | - | 0.52 |

## Claims

| claim | verdict | evidence |
|---|---|---|
| R1 a MoE reaches a lower loss | not enough data | {"one seed gives the direction only; " * 20} |

## Runs

| {" | ".join(f"column {i}" for i in range(WIDE_COLUMNS))} |
|{"---|" * WIDE_COLUMNS}
| {" | ".join(f"{i}e12" for i in range(WIDE_COLUMNS))} |

![loss against parameters](figures/loss.png)

## Manifest

- seeds: 0
"""


@pytest.fixture
def report(tmp_path: Path) -> Path:
    """A results folder with report.md and its figure."""
    _png(tmp_path / "figures" / "loss.png")
    (tmp_path / "report.md").write_text(REPORT_MD)
    return tmp_path


def _cells(page: str, cls: str) -> list[str]:
    """The text of every table cell whose class is ``cls``."""
    return [text for found, text in re.findall(r'<td(?: class="([^"]*)")?>(.*?)</td>', page) if found == cls]


def test_numbers_are_shown_as_report_md_writes_them(report):
    page = write_html(report).read_text()
    numbers = _cells(page, "num")
    assert "+0.3311" in numbers and "2e12" in numbers and "1.07*" in numbers and "0.41 †" in numbers
    assert "2e+12" not in page and ">0.3311<" not in page
    # Columns of numbers (with - for none) are marked num; one-word text is kept from breaking.
    assert "moe-e8k2" in _cells(page, "word") and "-" in numbers and "not enough data" in _cells(page, "")
    assert '<th class="num">val loss MoE - dense</th>' in page and "<th>MoE</th>" in page


def test_figures_are_inline_and_headings_present(report):
    page = write_html(report).read_text()
    assert 'src="data:image/png;base64,' in page and "figures/loss.png" not in page
    for heading in ("At a glance", "Claims", "Runs", "Manifest"):
        assert f">{heading}</h2>" in page and f'<a href="#{heading.lower().replace(" ", "-")}">' in page
    assert "<h1" in page and "<code>pico</code>" in page
    assert page.count('<div class="table-wrap">') == 3  # every table in a frame that scrolls sideways
    assert "<script" not in page  # a plain document: nothing to run


def test_raw_html_in_report_md_is_shown_as_text(tmp_path):
    (tmp_path / "report.md").write_text("# Study `x`\n\n## A\n\np < 0.05 <b>bold</b>\n")
    page = write_html(tmp_path).read_text()
    assert "p &lt; 0.05 &lt;b&gt;bold&lt;/b&gt;" in page


def test_sections_for_snakemake_report_in_report_md_order(report):
    write_html(report)
    folder = report / SECTIONS
    pages = sorted(p.name for p in folder.glob("[0-9]*.html"))
    assert pages == ["01-at-a-glance.html", "02-claims.html", "03-runs.html", "04-manifest.html"]
    labels = section_labels(folder, SimpleNamespace(no="02", section="claims"))
    assert labels == {"#": "02", "section": "Claims"}
    runs = (folder / "03-runs.html").read_text()
    assert "data:image/png;base64," in runs and "2e12" in runs and "At a glance" not in runs
    front = (folder / FRONT).read_text()
    assert "+0.3311" in front and "R1 a MoE reaches" in front and "column 1" not in front
    assert "<html" not in front and "#moe-report-front table" in front  # a fragment, its style scoped
    # A section that is gone from report.md leaves no page behind.
    (report / "report.md").write_text(REPORT_MD.replace("## Runs", "Runs:"))
    write_html(report)
    assert not (folder / "03-runs.html").exists() and (folder / "03-manifest.html").exists()


def test_snakemake_report_opens_on_the_glance_table_and_the_claims(report, monkeypatch):
    """workflows/report/workflow.rst rendered as `snakemake --report` renders it (jinja2, then
    docutils from the working directory), with report.html as the one result."""
    from docutils.core import publish_parts
    from jinja2 import Environment

    write_html(report)
    monkeypatch.chdir(report.parent)
    whole = SimpleNamespace(target="report.html", path=Path(report.name) / "report.html")
    text = (ROOT / "workflows" / "report" / "workflow.rst").read_text()
    rst = Environment(trim_blocks=True, lstrip_blocks=True).from_string(text).render(files=[whole])
    page = publish_parts(rst, writer="html")["html_body"]
    assert "Read\nthe whole report" in page and f"results['{whole.path}'].data_uri" in page
    assert page.index("At a glance") < page.index("+0.3311") < page.index("Claims") < page.index("R1 a MoE")
    assert "2e12" in page and "2e+12" not in page and "column 1" not in page and "System Message" not in page


def test_split_sections_ignores_headings_in_code():
    preamble, sections = split_sections("# T\n\nintro\n\n## A\n\n```\n## not a section\n```\n\n## `B` c\n")
    assert preamble.startswith("# T") and [title for title, _ in sections] == ["A", "B c"]


@pytest.mark.parametrize(
    ("cell", "number"),
    [
        ("+0.3311", True),
        ("2e12", True),
        ("-0.034 ± 0.010", True),
        ("[0.10, 0.31]", True),
        ("12,345", True),
        ("3.2x", True),
        ("45%", True),
        ("1.9 †", True),
        ("moe-d64-e8k2", False),
        ("e8", False),
        ("not enough data", False),
    ],
)
def test_number_cells(cell, number):
    assert is_number(cell) is number


def _browser() -> str:
    try:
        return find_browser()
    except HarnessError as e:
        pytest.skip(f"needs Chromium (Debian package chromium): {e}")


@pytest.mark.slow
def test_browser_passes_the_rendered_report_and_takes_a_screenshot(report):
    _browser()
    page = write_html(report)
    findings, shot = check(page, report / "report.png")
    assert findings.problems() == []
    assert [im["ok"] for im in findings.images] == [True]
    assert len(findings.tables) == 3 and [t["scrolls"] for t in findings.tables] == [False, False, True]
    wide = findings.tables[2]
    assert wide["visible_scrollbar"] and f"column {WIDE_COLUMNS - 1}" in wide["hidden_columns"]
    assert findings.width == 1280
    assert shot.read_bytes()[:4] == b"\x89PNG" and findings.height > 900


@pytest.mark.slow
def test_browser_check_names_columns_a_table_hides_without_a_drawn_scrollbar(report, capsys):
    """At 1280 px the wide table scrolls in its frame; without the page's own scrollbar style
    (as overlay scrollbars draw nothing until scrolled) its last columns are out of sight."""
    _browser()
    page = write_html(report)
    page.write_text(page.read_text().replace("::-webkit-scrollbar", "::-webkit-scrollbar-unused"))
    assert main([str(page), "--no-screenshot", "--width", "1280"]) == 1
    err = capsys.readouterr().err
    assert 'table 3 under "Runs" (column 0, column 1, column 2) hides columns at 1280 px' in err
    assert f"'column {WIDE_COLUMNS - 1}'" in err and "'column 0'" not in err


def test_browser_check_fails_on_a_broken_image_and_overflowing_tables(tmp_path, capsys):
    _browser()
    wide = "".join(f"<td>{i}e12</td>" for i in range(60))
    page = tmp_path / "bad.html"
    page.write_text(
        "<!doctype html><html><body><main style='max-width: 40rem'>"
        "<h2>Figures</h2><img src='figures/missing.png' alt='loss curve'>"
        f"<h2>Runs</h2><table><tr><th>run</th><th>loss</th></tr><tr>{wide}</tr></table>"
        # clipped: this one never makes the page scroll, but still runs out of its column
        "<div style='width: 30rem; overflow-x: hidden'>"
        f"<h2>Cost</h2><table><tr><th>run</th></tr><tr>{wide}</tr></table></div>"
        "</main></body></html>"
    )
    assert main([str(page), "--no-screenshot"]) == 1
    err = capsys.readouterr().err
    assert "image 1 did not load: loss curve (figures/missing.png)" in err
    assert 'table 1 under "Runs" (run, loss) overflows' in err and "the page scrolls sideways" in err
    assert 'table 2 under "Cost" (run) overflows' in err
    assert not list(tmp_path.glob(".report-check-*"))  # the probed copy is removed
