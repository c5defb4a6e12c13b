"""The report's tables say where each figure comes from and when it was taken, flag a training
time taken on a disturbed host as `harness measure`'s figures are, print the commands that take
the flagged figures again, and list what does not apply to a study instead of printing it empty."""

from __future__ import annotations

import copy
import json
import shlex
from pathlib import Path

import pytest
from pico_study import RUN, RUNDIR, STUDY, cli
from synthetic_records import DISTURBED, _measure, tiny_records

from harness.analysis import scaling
from harness.core.host_load import sample, summary, taken_at
from harness.measure.plausibility import LOAD_LIMIT, MARK, SPREAD_LIMIT, check_training, training_windows
from harness.report.glance import glance_table
from harness.report.notes import (
    drop_sections,
    not_applicable,
    not_applicable_lines,
    remeasure_lines,
    training_notes,
)
from harness.report.tables import (
    MEASURED_TOKENS_PER_S,
    TRAINING_TOKENS_PER_S,
    cost_table,
    run_table,
)

STEPS = 200


def _records() -> list[dict]:
    """tiny_records with what the run table reads of a training record."""
    out = []
    for r in tiny_records():
        steps = STEPS
        r |= {
            "steps": steps,
            "epochs": 0.7,
            "flops_spent_over_budget": 1.0,
            "final_train_loss": r["final_val_loss"] + 0.5,
            "tokens_per_s": r["tokens"] / r["train_seconds"],
            "provenance": {
                "host": {"device": "cpu", "cpu_count": 2},
                "time_utc": "2026-12-01T09:15:02+00:00",
            },
        }
        out.append(r)
    return out


def _log(rec: dict, slow: tuple[int, int] | None = None, load: float | None = None, steal: float = 0.0) -> list[dict]:
    """A training log of ``rec``: a row every step, at a steady rate except 3x slower over the
    steps ``slow`` covers; with a load-average sample and CPU ticks on each row when ``load``."""
    per_step = rec["train_seconds"] / STEPS
    rows, elapsed = [], 0.0
    for step in range(1, STEPS + 1):
        elapsed += per_step * (3 if slow and slow[0] <= step < slow[1] else 1)
        row = {"step": step, "elapsed_s": elapsed, "loss": 3.0}
        if load is not None:
            row |= {"host_load_1m": load, "host_cpu_ticks": [1000 * step, int(1000 * step * steal)]}
        rows.append(row)
    return rows


# --- 1. two training speeds, each named by its source; a disturbed training time is flagged ---


def test_each_training_speed_header_names_its_source():
    records = _records()
    measures = {r["run_id"]: _measure(r) for r in records}
    runs, _ = run_table(records)
    cost, _ = cost_table(records, measures)
    glance, _ = glance_table(records, {}, measures, scaling.analyse(records, bootstrap=10))
    assert (
        TRAINING_TOKENS_PER_S == "train tokens/s (training run, over the whole run)" and TRAINING_TOKENS_PER_S in runs
    )
    assert MEASURED_TOKENS_PER_S == "train tokens/s (harness measure, median window)" and MEASURED_TOKENS_PER_S in cost
    speeds = [h for h in runs + cost + glance if "train tokens/s" in h]
    assert all("training run" in h or "harness measure" in h for h in speeds), speeds
    assert any(h.startswith("training FLOP/s x (training runs, over the whole run") for h in glance)


def test_training_stretches_read_from_the_log_leave_out_warm_up_and_keep_the_resumed_rows():
    rec = _records()[0]
    rows = _log(rec)
    rates = training_windows(rows, rec["tokens"] / STEPS)
    assert len(rates) == 10 and max(rates) / min(rates) == pytest.approx(1.0)
    # a run killed at step 150 and resumed from its checkpoint at 100 logged 101-150 twice: the later counts
    resumed = rows[:150] + [r | {"elapsed_s": r["elapsed_s"]} for r in rows[100:]]
    assert training_windows(resumed, rec["tokens"] / STEPS) == pytest.approx(rates)
    slow_start = _log(rec, slow=(1, 15))  # the first stretch (warm-up) is left out, as measure's warm-up is
    assert check_training(rec, slow_start) == []


def test_a_training_time_on_a_disturbed_host_is_flagged_as_measure_flags_its_figures():
    rec = _records()[0]
    (spread,) = check_training(rec, _log(rec, slow=(60, 100)))
    assert spread["rule"] == "window_spread" and spread["figure"] == "training"
    assert spread["values"]["ratio"] == pytest.approx(3.0) and spread["values"]["limit"] == SPREAD_LIMIT
    assert "stretches of training" in spread["reason"] and "x3.0" in spread["reason"]

    (busy,) = check_training(rec, _log(rec, load=2 * LOAD_LIMIT * 2 + 0.5))
    assert busy["rule"] == "host_busy" and "load average was 4.50" in busy["reason"] and "on 2 cores" in busy["reason"]
    assert check_training(rec, _log(rec, load=1.9)) == []  # two jobs on two cores: each had its core
    (steal,) = check_training(rec, _log(rec, load=1.0, steal=0.2))
    assert steal["rule"] == "cpu_steal" and "20.0%" in steal["reason"]
    assert check_training(rec, []) == [] and check_training(rec, _log(rec)) == []  # no samples: no host rule


def test_the_run_table_and_the_glance_table_mark_a_flagged_training_time():
    records = _records()
    dense, moe = records
    flags = {dense["run_id"]: check_training(dense, _log(dense, load=6.0)), moe["run_id"]: []}
    headers, rows = run_table(records, {}, flags)
    by_run = {row[0]: dict(zip(headers, row, strict=True)) for row in rows}
    assert by_run[dense["run_id"]][TRAINING_TOKENS_PER_S].endswith(MARK)
    assert by_run[dense["run_id"]]["train s (training run, wall clock)"].endswith(MARK)
    assert not any(MARK in str(v) for v in by_run[moe["run_id"]].values())
    headers, (row,) = glance_table(records, {}, {}, scaling.analyse(records, bootstrap=10), flags)
    glance = dict(zip(headers, row, strict=True))  # no number: a pointer to the note that holds it
    rate = glance["training FLOP/s x (training runs, over the whole run, 95% t over seeds)"]
    assert rate == f"disturbed: see {MARK}1 below"
    notes = training_notes(flags)
    assert notes[0].startswith(f"{MARK} Training time taken on a disturbed host")
    assert notes[2].startswith(f"- {MARK} `{dense['run_id']}` training time and tokens/s (training run): disturbed")
    assert training_notes({moe["run_id"]: []}) == []


def test_host_samples_and_their_summary():
    row = sample()
    assert isinstance(row["host_load_1m"], float) and len(row["host_cpu_ticks"]) == 2
    rows = [{"host_load_1m": 1.0, "host_cpu_ticks": [100, 0]}, {"host_load_1m": 3.0, "host_cpu_ticks": [300, 20]}]
    assert summary(rows, 2) == {
        "samples": 2,
        "load_1m_median": 2.0,
        "load_1m_max": 3.0,
        "cpu_count": 2,
        "steal_fraction": 0.1,
    }
    assert summary([{"step": 1}], 2) is None


def test_a_training_run_logs_host_load_and_its_record_says_when(study):
    rows = [json.loads(line) for line in (study / RUNDIR / "metrics.jsonl").read_text().splitlines()]
    assert all("host_load_1m" in r and len(r["host_cpu_ticks"]) == 2 for r in rows)
    record = json.loads((study / RUNDIR / "record.json").read_text())
    assert taken_at(record)[:2] == "20" and len(taken_at(record)) == len("2026-12-03 01:23")


# --- 2. when each figure was taken; the commands that take the flagged ones again -----------


def test_tables_say_when_each_figure_was_taken():
    records = _records()
    dense, moe = records
    measures = {r["run_id"]: _measure(r) for r in records}
    measures[dense["run_id"]]["provenance"] = {"time_utc": "2026-11-28T17:40:59+00:00"}
    headers, rows = cost_table(records, measures)
    when = {row[1]: row[headers.index("measured (UTC)")] for row in rows}
    assert when == {dense["run_id"]: "2026-11-28 17:40", moe["run_id"]: "not recorded"}
    headers, rows = run_table(records)
    assert {row[headers.index("trained (UTC)")] for row in rows} == {"2026-12-01 09:15"}


def test_remeasure_lines_name_exactly_the_flagged_runs():
    lines = remeasure_lines("tiny", Path("results/tiny"), ["moe-a_7e12_s0"], ["dense-a_7e12_s0"])
    block = lines[lines.index("```bash") + 1 : lines.index("```", lines.index("```bash") + 1)]
    assert block == [
        "harness measure tiny --run moe-a_7e12_s0 --force",
        "harness train tiny --run dense-a_7e12_s0 --restart",
    ]
    elsewhere = remeasure_lines("my study.yaml", Path("/data/out/tiny"), ["moe-a_7e12_s0"], [])
    assert "harness measure my study.yaml --run moe-a_7e12_s0 --force --results /data/out" in elsewhere
    assert "--restart" not in " ".join(elsewhere)
    assert remeasure_lines("tiny", Path("results/tiny"), [], []) == []
    (reference, _) = remeasure_lines("tiny", Path("results/reference/cpu/tiny"), ["a"], [], is_reference=True)
    assert "a reference keeps none" in reference


@pytest.mark.slow
def test_the_printed_remeasure_command_measures_the_flagged_run_again(study, monkeypatch):
    """A run whose measure.json is disturbed: the report prints a command for it, and that command,
    run as printed, replaces the measurement."""
    from harness.report.build import write_report
    from harness.study.spec import load_study

    monkeypatch.chdir(study)
    code, err = cli("measure", STUDY, "--run", RUN, "--windows", "5", "--threads", "1")
    assert code == 0, err
    path = study / RUNDIR / "measure.json"
    measured = json.loads(path.read_text())
    disturbed = copy.deepcopy(measured)
    disturbed["decode_batch1"]["tokens_per_s_windows"] = DISTURBED
    path.write_text(json.dumps(disturbed))

    md = write_report(load_study(STUDY), Path("results/pico")).read_text()
    (command,) = {line for line in md.splitlines() if line.startswith("harness measure")}
    assert command == f"harness measure {STUDY} --run {RUN} --force"
    words = shlex.split(command)
    code, err = cli(*words[1:], "--windows", "5", "--threads", "1")
    assert code == 0, err
    again = json.loads(path.read_text())
    assert again["decode_batch1"]["tokens_per_s_windows"] != DISTURBED
    assert again["provenance"]["time_utc"] >= measured["provenance"]["time_utc"]


def test_a_flagged_measurement_gets_its_command_in_the_report_lines():
    from harness.report.sections import _remeasure
    from harness.study.spec import load_study

    records = tiny_records()
    measures = {
        records[0]["run_id"]: _measure(records[0], decode=DISTURBED),
        records[1]["run_id"]: _measure(records[1]),
    }
    lines = _remeasure(load_study("tiny"), Path("results/tiny"), measures, {}, {"is_reference": False})
    assert f"harness measure tiny --run {records[0]['run_id']} --force" in lines
    assert not any(records[1]["run_id"] in line for line in lines)


def test_an_moe_measured_days_after_its_dense_peer_is_noted_and_both_offered_again():
    """A model added to a study later is measured in another session than the dense figure it is
    compared with: the report says so under the cost table and prints the commands for both."""
    from harness.report.notes import apart_notes, measured_apart
    from harness.report.sections import _remeasure
    from harness.study.spec import load_study

    records = tiny_records()
    dense, moe = (r["run_id"] for r in records)
    measures = {r["run_id"]: _measure(r) for r in records}
    measures[dense]["provenance"] = {"time_utc": "2026-11-28T17:40:59+00:00"}
    measures[moe]["provenance"] = {"time_utc": "2026-12-01T09:10:00+00:00"}
    apart = measured_apart(records, measures)
    assert [(a, b, round(h)) for a, b, h in apart] == [(moe, dense, 63)]
    (note, _) = apart_notes(apart)
    assert note.startswith(f"- `{moe}` and its dense peer `{dense}` were measured 2.6 days apart")
    lines = _remeasure(
        load_study("tiny"),
        Path("results/tiny"),
        measures,
        {},
        {"is_reference": False},
        measured_apart(records, measures),
    )
    assert (
        f"harness measure tiny --run {moe} --force" in lines and f"harness measure tiny --run {dense} --force" in lines
    )
    assert "both runs of each pair measured apart, in one session" in lines[0]
    measures[moe]["provenance"] = {"time_utc": "2026-11-28T20:00:00+00:00"}  # the same session: 2.3 hours
    assert measured_apart(records, measures) == []
    assert (
        _remeasure(
            load_study("tiny"),
            Path("results/tiny"),
            measures,
            {},
            {"is_reference": False},
            measured_apart(records, measures),
        )
        == []
    )


# --- 3. what does not apply to the study: one short list --------------------------------------


def _tables(isoflop_note: str = "-", effective: str = "-") -> dict:
    return {
        "isoflop": (
            ["arm", "budget FLOPs", "sizes", "N_opt (active non-embedding) [95%]"],
            [["dense", "7e12", 1, isoflop_note]],
        ),
        "effective_params": (["budget FLOPs", "MoE", "effective N"], [["7e12", "moe", effective]]),
        "specialisation": (["run"], []),
        "eval": (["run"], []),
        "cost": (["run"], [["x"]]),
    }


def test_what_a_small_study_cannot_show_is_one_short_list():
    records = _records()

    class NoLaw:
        law = None

    na = not_applicable(_tables(), records, NoLaw(), curves=[])
    assert list(na) == [
        "compute_multiplier",
        "isoflop",
        "figure:isoflop",
        "effective_params",
        "section:Expert specialisation",
        "section:Downstream evaluation (lm-eval)",
    ]
    assert "IsoFLOP table (needs 4 or more model sizes of one arm at one budget; here at most 1" in na["isoflop"]
    lines = not_applicable_lines(na)
    assert lines[0] == "## Not applicable to this study" and len(lines) == 2 + len(na) + 1
    assert all(line.startswith("- ") for line in lines[2:-1])

    class Law:
        law = object()

    fitted = not_applicable(_tables("1.2e6 [1e6, 1.4e6]", "2.1e6"), records, Law(), curves=[{}])
    assert "isoflop" not in fitted and "figure:isoflop" not in fitted and "compute_multiplier" not in fitted


def test_sections_that_do_not_apply_are_left_out():
    md = ["## Runs", "", "table", "", "## Expert specialisation", "", "(no rows)", "", "## Manifest", "- x"]
    assert drop_sections(md, {"section:Expert specialisation": "why"}) == [
        "## Runs",
        "",
        "table",
        "",
        "## Manifest",
        "- x",
    ]
    assert drop_sections(md, {"isoflop": "why"}) == md


@pytest.mark.slow
def test_the_tiny_reference_report_lists_what_does_not_apply_instead_of_empty_tables(tmp_path):
    """The committed tiny reference, its report rebuilt: no row of dashes that says 'needs N sizes'."""
    import shutil

    from harness.cli import main

    reference = Path(__file__).resolve().parents[2] / "results" / "reference" / "cpu" / "tiny"
    shutil.copytree(reference, tmp_path / "tiny")
    assert main(["report", "tiny", "--results", str(tmp_path)]) == 0
    md = (tmp_path / "tiny" / "report.md").read_text()
    section = md[md.index("## Not applicable to this study") : md.index("## Reproduction")]
    for what in ("compute and wall-clock multipliers", "IsoFLOP table", "IsoFLOP figure", "effective parameter count"):
        assert what in section
    assert "an optimum needs 4 or more sizes" not in md and "figures/isoflop.png" not in md
    assert "| moe-d64-e16k2 | 1       | -   " not in md
    assert "## Cost per run" in md and "figures/cost_scaling.png" in md  # what applies stays


def test_a_claim_resting_on_a_flagged_training_time_gets_no_verdict():
    from harness.analysis.claims import evaluate_claims
    from harness.analysis.stats import seed_comparison
    from harness.report.tables import claim_flags, claims_table

    records = _records()
    dense = records[0]
    measures = {r["run_id"]: _measure(r) for r in records}
    trained = {dense["run_id"]: check_training(dense, _log(dense, slow=(60, 100)))}
    flagged = claim_flags(records, measures, trained)
    assert flagged == {"R10": [f"{dense['run_id']} training time and tokens/s (training run) (window_spread)"]}
    claims = evaluate_claims(records, measures, seed_comparison(records), {}, {})
    headers, rows = claims_table(claims, flagged)
    r10 = next(dict(zip(headers, row, strict=True)) for c, row in zip(claims, rows, strict=True) if c.key == "R10")
    assert r10["verdict"] == "not enough data" and r10["caveat"].startswith(f"{MARK} rests on measurements flagged")
    assert claim_flags(records, measures, {dense["run_id"]: []}) == {}
