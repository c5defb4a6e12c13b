"""A law's forecast of a registered contrast, before the runs, and its score after."""

from __future__ import annotations

import numpy as np
import pytest
from synthetic_records import LAW_TRUE, law_study, true_loss

from harness.analysis.forecast import ArmPoint, forecast_gains, score_forecast, seeds_for_power
from harness.analysis.stats import one_sided_power
from harness.study.spec import Forecast, LawForecast, PrimaryContrast, Registration, load_study


def test_the_forecast_is_the_laws_gain_with_a_prediction_interval_for_the_mean():
    """From runs drawn from a known law: the point forecast is the true gain of two unseen arms,
    and the interval carries the sampling noise of a mean over n seeds at the planning sd."""
    records = law_study(np.random.default_rng(2), sd_resid=0.002, sd_seed=0.005)
    dense = ArmPoint("dense-3e6", 3e6, 3e6, 2e9, False)
    moe = ArmPoint("moe-3e6-e16k2", 3e6, 3e6 * 11, 2e9, True)
    truth = true_loss(3e6, 3e6, 2e9, 0) - true_loss(3e6, 3e6 * 11, 2e9, 1)
    rows = {r["law"]: r for r in forecast_gains(records, dense, moe, 10, 0.05, 0.03, bootstrap=200)}
    assert rows["theta"]["gain"] == pytest.approx(truth, abs=0.01)
    lo, hi = rows["theta"]["interval"]
    assert lo < truth < hi and hi - lo >= 2 * 1.645 * 0.03 / np.sqrt(10) * 0.9
    assert rows["theta"]["power"] == pytest.approx(one_sided_power(0.03, 10, 0.05, rows["theta"]["gain"]))
    assert rows["both"]["gain"] is not None  # MoEs at two budgets: both terms are identified
    assert LAW_TRUE["theta"] == 0.5


def test_seeds_for_power_is_the_smallest_n_that_reaches_it():
    n = seeds_for_power(0.0306, 0.05, 0.0299)
    assert one_sided_power(0.0306, n, 0.05, 0.0299) >= 0.8 > one_sided_power(0.0306, n - 1, 0.05, 0.0299)


def _registration(*laws: tuple[str, float, float, float]) -> Registration:
    primary = PrimaryContrast("moe", "dense", 7e12, seeds=4)
    forecast = Forecast("earlier runs", [LawForecast(law, g, [lo, hi]) for law, g, lo, hi in laws])
    return Registration(primary=primary, forecast=forecast)


def test_a_forecast_is_scored_inside_or_not_with_its_error_in_standard_errors():
    reg = _registration(("theta", 0.07, 0.03, 0.14), ("phi", 0.03, 0.001, 0.057))
    observed = {"mean": 0.08, "sd": 0.02, "n": 4}
    theta, phi = score_forecast(reg, observed)
    assert theta["inside"] is True and theta["error"] == pytest.approx(0.01)
    assert theta["error_se"] == pytest.approx(0.01 / (0.02 / 2))
    assert phi["inside"] is False and phi["error_se"] == pytest.approx(0.05 / 0.01)
    assert score_forecast(Registration(primary=reg.primary), observed) == []
    assert score_forecast(reg, None)[0]["observed"] is None  # no runs yet: nothing to score


def test_the_registered_forecast_is_what_its_command_prints(capsys):
    """cpu-frontier's registration holds the point forecasts `harness forecast` gives from the cpu
    reference (the intervals come from 2000 refits; the points do not depend on them)."""
    from harness.cli import main

    study = load_study("cpu-frontier")
    registered = {f.law: f.gain for f in study.registration.forecast.laws}
    assert (
        main(
            [
                "forecast",
                "cpu-frontier",
                "--law-from",
                "results/reference/cpu/cpu",
                "--sd",
                "0.0306",
                "--bootstrap",
                "20",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    for law, gain in registered.items():
        assert f"{law:6} " in out and f"gain {gain:+.4f} nats" in out
