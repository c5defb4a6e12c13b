"""Whether finished results were made on the data now prepared: each record carries the
fingerprint of the data its run trained on (``data_fingerprint``), and data.json the fingerprint
of the data prepared now. A report, or a step reading the data, refuses to mix the two."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from harness.study.spec import Study


def other_data(trained_on: str | None, prepared: str | None) -> list[str]:
    """The change of a run trained on data ``trained_on`` when data.json now says ``prepared``."""
    if prepared is None or trained_on == prepared:
        return []
    return [f"data fingerprint {str(trained_on)[:16]} -> {prepared[:16]} (data.json was prepared again since)"]


def trained_on_other_data(records: list[dict[str, Any]], data_json: Path, study: Study | None = None) -> str | None:
    """The refusal when some records were trained on other data than ``data_json`` now describes
    (a report, or a step that reads the data, would mix the two); None when all agree or no data
    is prepared. A damaged data.json, or another study's (``study``: whose results hold it), is
    refused (harness.study.records)."""
    from harness.study.records import read_data_meta

    if not Path(data_json).exists():
        return None
    made_by = f"harness data {study.path if study is not None else 'STUDY'}"
    prepared = read_data_meta(data_json, made_by, None if study is None else study.name)["fingerprint"]
    other = [r for r in records if r.get("data_fingerprint") != prepared]
    if not other:
        return None
    shown = ", ".join(r["run_id"] for r in other[:5]) + (f" and {len(other) - 5} more" if len(other) > 5 else "")
    trained_on = ", ".join(sorted({str(r.get("data_fingerprint"))[:16] for r in other}))
    return (
        f"{data_json}: {len(other)} of {len(records)} runs were trained on other data (fingerprint {trained_on}) "
        f"than data.json describes ({prepared[:16]}): {shown}; train them again on this data "
        "(`snakemake --config retrain=stale`, or `harness train STUDY --run RUN --restart`), or prepare the data "
        "they were trained on again"
    )
