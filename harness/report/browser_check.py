"""Look at a report page in a real headless browser: every image loads, no table overflows or hides columns.

    python -m harness.report.browser_check results/tiny/report.html   # also writes results/tiny/report.png
    make report-check STUDY=tiny                               # the same, installing Chromium if it can

Chromium (Debian's ``chromium`` package, or the browser named by $CHROMIUM) opens a copy of
the page with a short script added that, once the page has loaded, writes what it found into
the DOM, which ``--dump-dom`` returns. A table overflows when it is wider than the box that
holds it (with no frame that scrolls it sideways) or when its frame is wider than the page
column, or when anything makes the page itself scroll sideways. A table wider than its frame
(at 1280 px, the width of a laptop screen) must say so: its frame needs a scrollbar the page
styles (``::-webkit-scrollbar`` with a coloured thumb), which Chromium and Safari draw always,
where the platform's own overlay scrollbars (macOS, phones) are drawn only while scrolling and
leave the columns past the edge out of sight with nothing to tell. The browser runs with
``--hide-scrollbars``, as such a platform lays out the page. A second run takes a screenshot of
the whole page (``report.png`` next to it, scrollbars drawn) to look at. Exit status 1 names each image that did
not load, each table that overflows and each that hides columns (naming them); 2 means no
Chromium.
"""

from __future__ import annotations

import argparse
import html
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from harness.core.errors import HarnessError
from harness.core.io import atomic_write

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
INSTALL_HINT = (
    "install Debian's chromium package (`apt-get install chromium`, or `make report-check`, which does so "
    "where apt-get can) or set CHROMIUM to a Chromium or Chrome executable"
)
WIDTH = 1280
MAX_HEIGHT = 16000
"""Longest screenshot, in CSS pixels (the tiny study's report is about 9000)."""
RESULT_ID = "report-check-result"

# Runs once the page (images included) has loaded; writes its findings as JSON into the DOM.
PROBE = """
<script>
(function () {
  function label(el) {
    var h = null, n = el;
    while (n && !h) {
      var p = n.previousElementSibling;
      while (p && !/^H[1-4]$/.test(p.tagName)) { p = p.previousElementSibling; }
      h = p; n = n.parentElement;
    }
    var head = Array.from(el.querySelectorAll('th')).slice(0, 3).map(function (c) { return c.textContent.trim(); });
    return (h ? 'under "' + h.textContent.trim() + '"' : 'at the top') + ' (' + head.join(', ') + ')';
  }
  function scroller(el) {
    for (var n = el.parentElement; n && n !== document.body; n = n.parentElement) {
      var ox = getComputedStyle(n).overflowX;
      if (ox === 'auto' || ox === 'scroll') { return n; }
    }
    return null;
  }
  // Whether the page styles the frame's scrollbar (a size and a thumb with a colour): drawn always.
  function styledBar(frame) {
    var bar = false, thumb = false;
    Array.from(document.styleSheets).forEach(function (sheet) {
      var rules;
      try { rules = sheet.cssRules; } catch (e) { return; }
      Array.from(rules || []).forEach(function (r) {
        (r.selectorText || '').split(',').forEach(function (sel) {
          var m = sel.trim().match(/^(.*?)::-webkit-scrollbar(-thumb)?$/);
          if (!m) { return; }
          try { if (m[1].trim() && !frame.matches(m[1].trim())) { return; } } catch (e) { return; }
          if (m[2]) { thumb = thumb || !!(r.style.backgroundColor || r.style.backgroundImage); }
          else { bar = bar || parseFloat(r.style.height) > 0; }
        });
      });
    });
    return bar && thumb;
  }
  function hiddenColumns(t, frame) {
    var right = frame.getBoundingClientRect().right - parseFloat(getComputedStyle(frame).borderRightWidth);
    var first = t.querySelector('tr');
    return first ? Array.from(first.children).filter(function (c) {
      return c.getBoundingClientRect().right > right + 1;
    }).map(function (c) { return c.textContent.trim(); }) : [];
  }
  function check() {
    var out = {images: [], tables: [], overflowing: [], page_overflow: false};
    var root = document.documentElement;
    Array.from(document.images).forEach(function (im, i) {
      var ok = im.complete && im.naturalWidth > 0;
      var src = im.getAttribute('src') || '';
      out.images.push({index: i + 1, alt: im.alt, ok: ok,
                       src: src.startsWith('data:') ? src.slice(0, 30) + '...' : src});
    });
    var viewport = root.clientWidth;
    Array.from(document.querySelectorAll('table')).forEach(function (t, i) {
      var frame = scroller(t);
      var box = frame ? frame.parentElement : t.parentElement;
      var outer = frame || t;
      var limit = box.getBoundingClientRect().right - parseFloat(getComputedStyle(box).paddingRight) + 1;
      var r = outer.getBoundingClientRect();
      var scrolls = !!frame && frame.scrollWidth > frame.clientWidth + 1;
      var row = {index: i + 1, label: label(t), width: Math.round(t.getBoundingClientRect().width),
                 box: Math.round(box.clientWidth), scrolls: scrolls,
                 overflows: r.right > limit || r.right > viewport + 1,
                 hidden_columns: scrolls ? hiddenColumns(t, frame) : [],
                 visible_scrollbar: scrolls && styledBar(frame)};
      out.tables.push(row);
    });
    out.page_overflow = root.scrollWidth > root.clientWidth + 1;
    out.width = root.clientWidth;
    out.height = Math.max(root.scrollHeight, document.body.scrollHeight);
    var pre = document.createElement('pre');
    pre.id = '%s';
    pre.style.display = 'none';
    pre.textContent = JSON.stringify(out);
    document.body.appendChild(pre);
  }
  if (document.readyState === 'complete') { check(); } else { window.addEventListener('load', check); }
})();
</script>
""".replace("%s", RESULT_ID)


@dataclass
class Findings:
    """What the browser saw on one page."""

    images: list[dict] = field(default_factory=list)
    tables: list[dict] = field(default_factory=list)
    page_overflow: bool = False
    width: int = 0
    height: int = 0

    def problems(self) -> list[str]:
        bad = [
            f"image {im['index']} did not load: {im['alt'] or 'no alt text'} ({im['src']})"
            for im in self.images
            if not im["ok"]
        ]
        bad += [
            f"table {t['index']} {t['label']} overflows: {t['width']} px wide in a {t['box']} px column"
            for t in self.tables
            if t["overflows"]
        ]
        bad += [
            f"table {t['index']} {t['label']} hides columns at {self.width} px: it scrolls sideways in its frame "
            "with no scrollbar the page draws (overlay scrollbars show none until scrolled), and nothing says "
            "these are past its edge: " + ", ".join(f"'{c}'" for c in t["hidden_columns"])
            for t in self.tables
            if t.get("scrolls") and t.get("hidden_columns") and not t.get("visible_scrollbar")
        ]
        if self.page_overflow:
            bad.append(f"the page scrolls sideways at {self.width} px")
        return bad


def find_browser() -> str:
    """The Chromium to use: $CHROMIUM, else the first of BROWSERS on PATH."""
    named = os.environ.get("CHROMIUM")
    if named:
        found = shutil.which(named)
        if not found:
            raise HarnessError(f"CHROMIUM={named} is not an executable; {INSTALL_HINT}")
        return found
    for name in BROWSERS:
        if found := shutil.which(name):
            return found
    raise HarnessError(f"no Chromium found (looked for {', '.join(BROWSERS)} on PATH); {INSTALL_HINT}")


def _chromium(browser: str, args: list[str], timeout: float, hide_scrollbars: bool = True) -> str:
    """Run headless Chromium; ``hide_scrollbars``: lay out as overlay scrollbars do (no room taken,
    nothing drawn but what the page styles itself)."""
    with tempfile.TemporaryDirectory(prefix="report-check-profile-") as profile:
        cmd = [
            browser,
            "--headless",
            "--no-sandbox",  # root in a container has no usable sandbox; the page is our own file
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            *(["--hide-scrollbars"] if hide_scrollbars else []),
            "--force-device-scale-factor=1",
            f"--user-data-dir={profile}",
            *args,
        ]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            raise HarnessError(f"{browser} did not finish within {timeout:.0f} s: {' '.join(cmd)}") from None
    if done.returncode != 0:
        raise HarnessError(f"{browser} failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    return done.stdout


def inspect(page: Path, browser: str, width: int = WIDTH, timeout: float = 120) -> Findings:
    """Open ``page`` with the probe added and return what it found."""
    page = Path(page).resolve()
    text = page.read_text(encoding="utf-8")
    probed = re.sub(r"</body>", lambda _: PROBE + "</body>", text, count=1) if "</body>" in text else text + PROBE
    # The copy lies next to the page, so relative image paths resolve as they do for the page.
    fd, copy = tempfile.mkstemp(prefix=".report-check-", suffix=".html", dir=page.parent)
    os.close(fd)
    try:
        Path(copy).write_text(probed, encoding="utf-8")
        dom = _chromium(
            browser,
            [f"--window-size={width},900", "--virtual-time-budget=15000", "--dump-dom", Path(copy).as_uri()],
            timeout,
        )
    finally:
        Path(copy).unlink(missing_ok=True)
    found = re.search(rf'<pre id="{RESULT_ID}"[^>]*>(.*?)</pre>', dom, re.S)
    if not found:
        raise HarnessError(f"{page}: the page did not finish loading in the browser (no check result in its DOM)")
    data = json.loads(html.unescape(found[1]))
    return Findings(**{k: data[k] for k in ("images", "tables", "page_overflow", "width", "height")})


def screenshot(page: Path, png: Path, browser: str, height: int, width: int = WIDTH, timeout: float = 120) -> Path:
    """The whole page (up to MAX_HEIGHT pixels tall) as a PNG, written atomically."""
    height = max(600, min(height, MAX_HEIGHT))

    # Chromium picks the image format from the file's extension, so it writes shot.png in a
    # folder of its own; the PNG is then moved into place atomically.
    with tempfile.TemporaryDirectory(prefix="report-check-shot-") as folder:
        shot = Path(folder) / "shot.png"
        _chromium(
            browser,
            [
                f"--window-size={width},{height}",
                "--virtual-time-budget=15000",
                f"--screenshot={shot}",
                Path(page).resolve().as_uri(),
            ],
            timeout,
            hide_scrollbars=False,  # the scrollbars the page draws, as a reader sees them
        )
        if not shot.is_file() or shot.stat().st_size == 0:
            raise HarnessError(f"{browser} wrote no screenshot of {page}")
        return atomic_write(png, lambda tmp: shutil.copyfile(shot, tmp))


def check(page: Path, png: Path | None = None, width: int = WIDTH) -> tuple[Findings, Path | None]:
    """Inspect ``page`` and, unless ``png`` is None, take its screenshot."""
    browser = find_browser()
    findings = inspect(page, browser, width)
    shot = screenshot(page, png, browser, findings.height, width) if png is not None else None
    return findings, shot


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m harness.report.browser_check", description=__doc__.split("\n\n")[0])
    p.add_argument("page", nargs="?", type=Path, help="the HTML page, e.g. results/tiny/report.html")
    p.add_argument("--png", type=Path, help="screenshot path (default: the page's, with .png)")
    p.add_argument("--no-screenshot", action="store_true", help="check only")
    p.add_argument("--width", type=int, default=WIDTH, help=f"window width in CSS pixels (default {WIDTH})")
    p.add_argument("--which", action="store_true", help="print the Chromium that would be used and stop")
    args = p.parse_args(argv)
    try:
        if args.which:
            print(find_browser())
            return 0
        if args.page is None:
            p.error("give the page to check")
        if not args.page.is_file():
            raise HarnessError(f"{args.page} does not exist; write it with `harness report STUDY`")
        png = None if args.no_screenshot else (args.png or args.page.with_suffix(".png"))
        findings, shot = check(args.page, png, args.width)
    except HarnessError as e:
        print(f"report_check: error: {e}", file=sys.stderr)
        return 2
    problems = findings.problems()
    for problem in problems:
        print(f"{args.page}: {problem}", file=sys.stderr)
    framed = sum(t["scrolls"] for t in findings.tables)
    fitting = sum(
        not t["overflows"] and not (t["hidden_columns"] and not t["visible_scrollbar"]) for t in findings.tables
    )
    print(
        f"{args.page}: {sum(im['ok'] for im in findings.images)} of {len(findings.images)} images loaded, "
        f"{fitting} of {len(findings.tables)} tables fit at {findings.width} px or scroll visibly ({framed} scroll "
        "sideways in their frame)" + (f"; screenshot {shot}" if shot else "")
    )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
