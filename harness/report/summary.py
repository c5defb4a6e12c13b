"""The report's at-a-glance table, claims and reproduction as Markdown: what a CI run shows of a study.

    python -m harness.report.summary results/tiny/report.md   # the three sections
    python -m harness.report.summary results/tiny/report.md --check-reproduction   # `make summary STUDY=tiny`
    make summary STUDY=tiny >> "$GITHUB_STEP_SUMMARY"          # a GitHub job's summary page

The sections are cut from report.md as ``harness.report.build`` wrote them, each from its ``## ``
heading up to the next heading of level 1 or 2, so that the CI page shows the report's own text
and not a second rendering of it. A report that lacks one of them is an error naming the file and
the section: a summary that silently lost its table would read like a pass. Needs only the
standard library, so it runs with any Python >= 3.11, without the project's environment.

``--check-reproduction`` reads the Reproduction section's table (``harness.analysis.reproduce``)
and adds its verdict: exit status 1 when a loss, bits-per-byte or accuracy number (or a per-seed
MoE - dense difference) did not reproduce within its tolerance. Throughput is annotated only:
shared runners are noisy, and a host of the same class may run at another speed. A report with
nothing to compare (no committed reference, or the reference itself) passes and says so.

A report.md that is not the whole report harness.report.build wrote (cut short: it ends before its
last section, ``## Manifest``, or inside a table row; not UTF-8 text; a folder in its place) is
refused in one line naming it and the command that writes it again, exit status 2.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from harness.core.errors import DamagedFile, HarnessError

SECTIONS = ("At a glance", "Claims", "Reproduction")
"""The headings (level 2) of report.md that make the summary, in this order."""
LAST = "Manifest"
"""The last section of every report harness.report.build writes: a report without it was cut short."""

_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_FENCE = re.compile(r"^\s*(```|~~~)")


def _headings(lines: Sequence[str]) -> list[tuple[int, int, str]]:
    """(line index, level, title) of each ATX heading outside fenced code blocks."""
    out, in_fence = [], False
    for i, line in enumerate(lines):
        if _FENCE.match(line):
            in_fence = not in_fence
        elif not in_fence and (m := _HEADING.match(line)):
            out.append((i, len(m.group(1)), m.group(2)))
    return out


def sections(text: str, titles: Sequence[str] = SECTIONS, source: str | Path = "report.md") -> str:
    """The ``## TITLE`` sections of the Markdown ``text``, in the order of ``titles``, joined by
    a blank line; the first of each title counts. Raises HarnessError naming ``source`` and every
    missing title."""
    lines = text.splitlines()
    top = [h for h in _headings(lines) if h[1] <= 2]  # a section ends at the next of these
    found: dict[str, str] = {}
    for (start, level, title), (end, _, _) in zip(top, [*top[1:], (len(lines), 0, "")], strict=True):
        if level == 2 and title in titles and title not in found:
            found[title] = "\n".join(lines[start:end]).strip()
    missing = [t for t in titles if t not in found]
    if missing:
        have = ", ".join(title for _, level, title in top if level == 2) or "none"
        raise HarnessError(
            f"{source}: no section {', '.join(f'`## {t}`' for t in missing)} (its level-2 headings: {have}); "
            f"{rewrite(Path(source))}"
        )
    return "\n\n".join(found[t] for t in titles) + "\n"


def _project() -> tuple[Path, list[str]]:
    """The studies folder (relative to the working folder) of the project around it, and the
    names of the studies shipped there."""
    here = Path.cwd().resolve()
    root = next((d for d in (here, *here.parents) if (d / "workflows" / "studies").is_dir()), here)
    studies = Path(os.path.relpath(root / "workflows" / "studies"))
    return studies, sorted(p.stem for p in studies.glob("*.yaml"))


def rewrite(report: Path) -> str:
    """What writes ``report`` (RESULTS/<study>/report.md) again: ``harness report`` of its study,
    named as the project ships it (else STUDY, its file), with --results where not the default."""
    study, root = report.parent.name, report.parent.parent
    if not study:
        return "`harness report STUDY` writes it again"
    named = study if study in _project()[1] else "STUDY"
    results = "" if os.path.normpath(root) == "results" else f" --results {root}"
    which = "" if named == study else f" (STUDY: the file of study '{study}')"
    return f"`harness report {named}{results}` writes it again{which}"


def read_report(report: Path) -> str:
    """The text of ``report``, refused in one line when it is absent, not a file, not UTF-8 or not
    the whole report (it lacks its last section, ``LAST``)."""
    if report.exists() and not report.is_file():
        raise HarnessError(f"{report}: a folder is where the report belongs: move it aside; {rewrite(report)}")
    if not report.exists():
        raise HarnessError(missing(report))
    try:
        text = report.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        where = f"byte 0x{e.object[e.start]:02x} at offset {e.start:,}"
        raise DamagedFile(report, f"it is not UTF-8 text ({where})", rewrite(report)) from None
    except OSError as e:
        raise HarnessError(f"{report}: cannot read it ({e.strerror}); check its permissions and disk") from None
    if not any(level == 2 and title == LAST for _, level, title in _headings(text.splitlines())):
        raise DamagedFile(
            report,
            f"it ends before its last section, `## {LAST}`, which every report ends with (cut short?)",
            rewrite(report),
        )
    return text


def missing(report: Path) -> str:
    """Why ``report`` (results/<study>/report.md) is absent, in one line: the study has not run,
    or there is no such study; then which studies there are and which have a report."""
    study = report.parent.name
    studies, shipped = _project()
    reported = sorted(p.parent.name for p in report.parent.parent.glob("*/report.md"))
    if study in shipped:
        return f"{report} does not exist: study '{study}' has no report yet; `make study STUDY={study}` runs it"
    return (
        f"{report} does not exist: there is no study '{study}' in {studies}/ "
        f"(studies: {', '.join(shipped) or 'none'}; with a report in {report.parent.parent}: "
        f"{', '.join(reported) or 'none'})"
    )


THROUGHPUT = "tokens_per_s"
"""A reproduction metric whose name holds this is throughput: annotated, never failed."""


def reproduction_rows(text: str, source: str | Path = "report.md") -> list[dict[str, str]] | None:
    """The rows of the Reproduction section's table (a dict per row, by header), or None when the
    section has no table (nothing was compared)."""
    section = sections(text, ("Reproduction",), source)
    lines = [line.strip() for line in section.splitlines() if line.strip().startswith("|")]
    if len(lines) < 2:
        return None
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    headers = cells[0]
    if "metric" not in headers or "reproduced" not in headers:
        raise DamagedFile(
            source, f"the Reproduction table has no 'metric' or 'reproduced' column: {headers}", rewrite(Path(source))
        )
    for n, row in enumerate(cells[2:], 1):
        if len(row) != len(headers) or not row[headers.index("reproduced")]:
            raise DamagedFile(
                source,
                f"row {n} of the Reproduction table has {len(row)} of its {len(headers)} cells, or no "
                "'reproduced' value (cut short or edited)",
                rewrite(Path(source)),
            )
    return [dict(zip(headers, row, strict=True)) for row in cells[2:]]


def _named(row: dict[str, str]) -> str:
    return (
        f"`{row.get('run', '?')}` {row['metric']}: {row.get('this run', '?')} against {row.get('reference', '?')} "
        f"({row.get('tolerance', '?')})"
    )


def check_reproduction(text: str, source: str | Path = "report.md") -> tuple[bool, str]:
    """(passed, the verdict as Markdown) of the Reproduction table: failed when a number other
    than throughput did not reproduce."""
    rows = reproduction_rows(text, source)
    if rows is None:
        return True, "**Reproduction check: nothing to compare** (no reproduction table: see the section above)."
    unchecked = [r for r in rows if r["reproduced"].startswith("not checked")]
    judged = [r for r in rows if THROUGHPUT not in r["metric"] and r not in unchecked]
    speed = [r for r in rows if THROUGHPUT in r["metric"]]
    failed = [r for r in judged if r["reproduced"] != "yes"]
    slow = [r for r in speed if r["reproduced"] != "yes"]
    if failed:
        out = (
            f"**Reproduction check: FAILED.** {len(failed)} of {len(judged)} loss, bits-per-byte and accuracy "
            "numbers did not reproduce within tolerance: " + "; ".join(map(_named, failed)) + "."
        )
    else:
        out = (
            f"**Reproduction check: passed.** {len(judged)} of {len(judged)} loss, bits-per-byte and accuracy "
            "numbers reproduced within tolerance."
        )
    if unchecked:
        out += f" Not checked: {'; '.join(map(_named, unchecked))} ({unchecked[0]['reproduced']})."
    if speed:
        out += (
            f" Throughput is annotated only (shared runners are noisy): {len(speed) - len(slow)} of {len(speed)} "
            "within its band" + ("; outside: " + "; ".join(map(_named, slow)) if slow else "") + "."
        )
    return not failed, out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m harness.report.summary", description=__doc__.split("\n\n")[0])
    p.add_argument("report", type=Path, help="the study's report.md, e.g. results/tiny/report.md")
    p.add_argument(
        "--section", action="append", metavar="TITLE", help=f"a level-2 heading to print (default: {SECTIONS})"
    )
    p.add_argument(
        "--check-reproduction",
        action="store_true",
        help="add the reproduction verdict; exit 1 when a loss, bits-per-byte or accuracy number did not reproduce",
    )
    args = p.parse_args(argv)
    try:
        text = read_report(args.report)
        out = sections(text, args.section or SECTIONS, args.report)
        passed, verdict = check_reproduction(text, args.report) if args.check_reproduction else (True, "")
    except HarnessError as e:  # nothing printed: a job summary gets no half of a damaged report
        print(f"report_summary: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    sys.stdout.write(out)
    if verdict:
        sys.stdout.write(f"\n{verdict}\n")
    if not passed:
        print(f"report_summary: {args.report}: {verdict.replace('**', '')}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
