"""The joint law, frontier multipliers and seed-adjusted IsoFLOP check on synthetic studies drawn
from a known law with shared seed effects: each must give the truth back."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.optimize import brentq, minimize_scalar
from synthetic_records import LAW_BUDGETS as BUDGETS
from synthetic_records import LAW_SIZES as SIZES
from synthetic_records import LAW_TRUE as TRUE
from synthetic_records import law_study as study
from synthetic_records import true_loss

from harness.analysis import law_report, scaling, scaling_report
from harness.analysis.isoflop import isoflop
from harness.analysis.law import fit_law


def test_the_law_returns_the_true_parameters():
    fit, reason = fit_law(study(np.random.default_rng(0), sd_seed=0.02, sd_resid=0.002), bootstrap=0)
    assert reason == ""
    assert fit.estimates["theta"] == pytest.approx(0.5, abs=0.05)
    assert fit.estimates["rho"] == pytest.approx(0.02, abs=0.005)
    assert fit.estimates["alpha"] == pytest.approx(0.3, abs=0.05)
    assert fit.estimates["beta"] == pytest.approx(0.3, abs=0.03)


@pytest.mark.slow
def test_theta_interval_covers_the_truth_near_nominally():
    covered = 0
    for i in range(24):
        fit, _ = fit_law(study(np.random.default_rng(100 + i)), bootstrap=40, seed=i)
        lo, hi = fit.intervals["theta"]
        covered += lo <= TRUE["theta"] <= hi
    assert covered >= 20  # 24 studies, 95% intervals: at least 83%


def test_theta_interval_excludes_zero_at_half_and_includes_it_at_zero():
    fit, _ = fit_law(study(np.random.default_rng(7)), bootstrap=60)
    assert fit.intervals["theta"][0] > 0
    includes = 0
    for i in range(5):
        fit, _ = fit_law(study(np.random.default_rng(20 + i), t=TRUE | {"theta": 0.0}), bootstrap=40, seed=i)
        includes += fit.intervals["theta"][0] <= 0 <= fit.intervals["theta"][1]
    assert includes >= 4


def test_a_shift_shared_by_every_run_of_a_seed_leaves_theta_unchanged():
    recs = study(np.random.default_rng(3))
    shifted = [r | {"final_val_loss": r["final_val_loss"] + (0.1 if r["seed"] == 1 else 0.0)} for r in recs]
    a, _ = fit_law(recs, bootstrap=0)
    b, _ = fit_law(shifted, bootstrap=0)
    assert b.estimates["theta"] == pytest.approx(a.estimates["theta"], abs=2e-3)
    assert b.estimates["rho"] == pytest.approx(a.estimates["rho"], abs=1e-3)


def _true_multiplier(nt: float, c: float) -> float:
    """Reference: the dense compute at which the true dense frontier reaches the MoE's true loss."""

    def frontier(ln_c):
        res = minimize_scalar(
            lambda ln_n: true_loss(math.exp(ln_n), math.exp(ln_n), math.exp(ln_c) / (6 * math.exp(ln_n)), 0),
            bounds=(math.log(1e4), math.log(1e10)),
            method="bounded",
            options={"xatol": 1e-8},
        )
        return res.fun

    target = true_loss(2e6, nt, c / (6 * 2e6), 1)
    return math.exp(brentq(lambda ln_c: frontier(ln_c) - target, math.log(c / 100), math.log(c * 100))) / c


def test_the_frontier_multiplier_equals_its_known_value():
    recs = study(np.random.default_rng(1), sd_seed=0.0, sd_resid=1e-5)
    a = scaling.analyse(recs, bootstrap=20)
    for row in a.multiplier_flops:
        nt = next(r["params"]["total_non_embedding"] for r in recs if r["model"] == row["model"])
        assert row["multiplier"] == pytest.approx(_true_multiplier(nt, row["budget_flops"]), rel=0.02), row["model"]
        assert row["dense_model"] == "dense frontier (joint law)"
    seconds = {(r["model"], r["budget_flops"]): r for r in a.multiplier_seconds}
    for row in a.multiplier_flops:  # the MoE runs 0.8x the dense FLOP/s
        assert seconds[(row["model"], row["budget_flops"])]["multiplier"] == pytest.approx(0.8 * row["multiplier"])


def _parabola_runs(rng, sizes, n_star=4e6, seeds=(0, 1, 2)):
    u = {s: 0.03 * rng.standard_normal() for s in seeds}
    study_ = study(rng, seeds=(0,), budgets=(1e15,), sizes=(1e6,), experts=())[:1]
    base = study_[0]
    out = []
    for n in sizes:
        for s in seeds if n != sizes[0] else seeds[:1]:  # the smallest model: one seed only
            y = 3.0 + 0.05 * math.log(n / n_star) ** 2 + u[s] + 0.005 * rng.standard_normal()
            out.append(
                base | {"model": f"d{n:g}", "seed": s, "final_val_loss": y, "params": {"active_non_embedding": n}}
            )
    return out


def test_isoflop_interval_covers_the_optimum_and_needs_four_sizes():
    covered = 0
    for i in range(10):
        iso = isoflop(_parabola_runs(np.random.default_rng(i), np.geomspace(1e6, 1.6e7, 5)), draws=200, seed=i)
        (curve,) = iso.curves
        lo, hi = curve["n_opt_ci"]
        covered += lo <= 4e6 <= hi
        assert curve["bracketed"]
    assert covered >= 8
    (curve,) = isoflop(_parabola_runs(np.random.default_rng(0), (1e6, 4e6, 1.6e7)), draws=10).curves
    assert curve["n_opt"] is None and "4 or more sizes" in curve["reason"]


def _section(a) -> str:
    tables = {
        "joint_law": law_report.law_table(a),
        "law_forms": law_report.forms_table(a),
        "compute_multiplier": scaling_report.multiplier_table(a),
        "isoflop": scaling_report.isoflop_table(a),
        "effective_params": scaling_report.effective_table(a),
        "published_laws": scaling_report.published_table(a),
        "krajewski": scaling_report.krajewski_table(a),
    }
    return "\n".join(scaling_report.markdown(a, lambda name: repr(tables[name][1]))), tables


def test_the_report_section_prints_theta_rho_elasticities_and_multipliers():
    a = scaling.analyse(study(np.random.default_rng(5)), bootstrap=30)
    text, tables = _section(a)
    law = {row[0]: row for row in tables["joint_law"][1]}
    for key in ("theta", "rho (nats)", "-dL/d ln N_active (nats)", "-dL/d ln N_total (nats)", "-dL/d ln D (nats)"):
        assert law[key][1] != "-" and "[" in law[key][1], key
    assert all(row[5] != "-" and "[" in row[5] for row in tables["compute_multiplier"][1])
    assert "Every parameter of the law is identified" not in text  # said per parameter instead
    assert "Identified by this fit" in text and "θ" in text.split("Identified by this fit")[1].split(".")[0]
    assert "Krajewski et al. 2024's" in text and "7x" in text and "not a FLOP multiplier" in text


def test_a_one_slice_study_gets_reasons_naming_the_runs():
    a = scaling.analyse(study(np.random.default_rng(5), budgets=(1e15,)), bootstrap=10)
    assert a.law is None and "2 or more budgets" in a.law_reason
    # FLOPs per token affine in N: ln D departs from a line in ln N by a few thousandths along the
    # slice, which an absolute rank test counted as a third dimension (and fitted theta at its bound).
    a = scaling.analyse(study(np.random.default_rng(5), budgets=(1e15,), fpt_intercept=3e6), bootstrap=10)
    assert a.law is None and "on one line" in a.law_reason and "at a budget other than 1e+15" in a.law_reason
    text, tables = _section(a)
    law = {row[0]: row for row in tables["joint_law"][1]}
    assert law["alpha"][1] == "-" and "off one IsoFLOP slice" in text
    assert repr(tables["joint_law"][1]) not in text  # no table of '-' under the reason
    assert "cannot fit this law" in text and all(r["multiplier"] is None for r in a.multiplier_flops)


def test_theta_and_rho_need_an_e_equals_k_run_or_two_sparse_values():
    a = scaling.analyse(study(np.random.default_rng(5), experts=(8,)), bootstrap=10)
    assert "E = k run" in a.identified["theta"] and "E = k run" in a.identified["rho"]
    a = scaling.analyse(study(np.random.default_rng(5), experts=(2,)), bootstrap=10)
    assert "E > k" in a.identified["theta"] and a.identified["rho"] == ""


def test_ablations_routed_otherwise_stay_out_of_the_law():
    """One law with one rho describes one way of routing: an MoE without balancing is left out and named."""
    recs = study(np.random.default_rng(5))
    for r in recs:
        if r["arm"] == "moe":
            r["config"] = {"moe": {"experts": r["experts"], "top_k": 2, "load_balance_coef": 0.01}}
    ablation = [
        r | {"model": "moe-e8k2-nobalance", "run_id": r["run_id"].replace("moe-e8k2", "moe-e8k2-nobalance")}
        for r in recs
        if r["model"] == "moe-e8k2"
    ]
    for r in ablation:
        r["config"] = {"moe": {"experts": 8, "top_k": 2, "load_balance_coef": 0.0}}
        r["final_val_loss"] += 0.5  # far off the law: would drag rho and theta if it were fitted
    fit, _ = fit_law(recs + ablation, bootstrap=0)
    base, _ = fit_law(recs, bootstrap=0)
    assert fit.data.left_out == ["moe-e8k2-nobalance"] and base.data.left_out == []
    assert fit.estimates["theta"] == pytest.approx(base.estimates["theta"], abs=1e-9)
    a = scaling.analyse(recs + ablation, bootstrap=10)
    text, _ = _section(a)
    assert "Left out of the law: moe-e8k2-nobalance" in text


@pytest.mark.slow
def test_a_parameter_whose_draws_reach_a_bound_is_printed_one_sided():
    """theta near its upper bound (1.5) with few, noisy runs: draws pile at the bound, so the
    table says 'theta >= lo' with the share at the bound, never a bracket ending at 1.5."""
    recs = study(np.random.default_rng(11), t=TRUE | {"theta": 1.35}, sd_resid=0.03, experts=(2, 16))
    a = scaling.analyse(recs, bootstrap=300)
    share = a.law.at_bound["theta"]
    assert share.share_upper >= 0.025 and a.law.intervals["theta"][1] == pytest.approx(1.5)
    row = next(r for r in law_report.law_table(a)[1] if r[0] == "theta")
    assert row[1].startswith("θ ≥ ") and "[" not in row[1] and "1.50]" not in row[1]
    assert f"{share.share_upper:.1%} of draws at the fit's bound 1.50" in row[2]
    text, _ = _section(a)
    assert "θ" in text.split("Not identified on at least one side")[1].split(".")[0]
    # A parameter away from its bounds keeps its two-sided interval, with the Monte-Carlo error of its ends.
    rho = next(r for r in law_report.law_table(a)[1] if r[0] == "rho (nats)")
    assert "[" in rho[1] and "(Monte Carlo)" in rho[2]


@pytest.mark.slow
def test_the_numbers_do_not_depend_on_the_order_of_the_records_and_ends_are_stable():
    recs = study(np.random.default_rng(4))
    a, _ = fit_law(recs, bootstrap=1000, seed=0)
    b, _ = fit_law(list(reversed(recs)), bootstrap=1000, seed=0)
    assert a.intervals == b.intervals and a.estimates == b.estimates
    c, _ = fit_law(recs, bootstrap=1000, seed=1)  # another bootstrap seed: ends move within their MC error
    for key in ("theta", "rho"):
        for end in (0, 1):
            assert abs(a.intervals[key][end] - c.intervals[key][end]) <= 4 * max(a.mc_error[key][end], 1e-4), key


def test_the_data_tell_where_total_parameters_act_when_moes_sit_at_two_points():
    """Truth with total parameters on the data term (phi), MoEs at two active sizes: the comparison
    prefers phi over theta, and theta is then not read as the share of total parameters."""
    t = TRUE | {"theta": 0.0, "phi": 0.8}
    recs = study(np.random.default_rng(8), t=t, sd_resid=0.002, sd_seed=0.005, moe_sizes=(1e6, 8e6))
    a = scaling.analyse(recs, bootstrap=20)
    assert set(a.forms.fitted) == {"theta", "phi", "both"}
    assert a.forms.preferred in ("phi", "both") and a.forms.fits["phi"].estimates["phi"] == pytest.approx(0.8, abs=0.1)
    delta = {r["form"]: r["delta"] for r in a.forms.rows}
    assert delta["theta"] >= 2
    theta_row = next(r for r in law_report.law_table(a)[1] if r[0] == "theta")
    assert "not read as the share of total parameters" in theta_row[2]
    # The same with the theta truth: theta is preferred over phi.
    recs = study(np.random.default_rng(8), sd_resid=0.002, sd_seed=0.005, moe_sizes=(1e6, 8e6))
    a = scaling.analyse(recs, bootstrap=20)
    assert {r["form"]: r["delta"] for r in a.forms.rows}["phi"] >= 2


def test_with_moes_at_one_point_both_forms_fit_and_the_data_cannot_tell():
    recs = study(np.random.default_rng(9), experts=(2, 8, 16), sd_resid=0.01)
    recs = [r for r in recs if r["arm"] == "dense" or r["budget_flops"] == BUDGETS[0]]  # MoEs at one (N, D)
    a = scaling.analyse(recs, bootstrap=20)
    assert a.forms.fits["both"] is None and "2 or more (active size, tokens) points" in a.forms.reasons["both"]
    assert a.forms.preferred is None and "cannot tell" in a.forms.verdict()


def _timed(recs, rate_of_size):
    """Dense runs whose training FLOP/s depends on their size; MoEs at 0.8x that of 2M."""
    for r in recs:
        n = r["params"]["active_non_embedding"]
        rate = rate_of_size(n) * (0.8 if r["arm"] == "moe" else 1.0)
        r["train_seconds"] = r["flops_spent"] / rate
        r["study"] = "s"
    return recs


def test_wall_clock_multipliers_use_real_dense_models():
    """(a) the frontier's dense size at its own measured FLOP/s; (b) the fastest dense run that reaches
    the MoE's loss. Dense rates rise with size here, so the old ratio to the MoE's base overstates."""
    rate = lambda n: 1e12 * (n / 2e6) ** 0.5  # noqa: E731
    recs = _timed(study(np.random.default_rng(1), sd_seed=0.0, sd_resid=1e-5), rate)
    a = scaling.analyse(recs, bootstrap=20)
    flops = {(r["model"], r["budget_flops"]): r for r in a.multiplier_flops}
    for row in a.multiplier_seconds:
        f = flops[(row["model"], row["budget_flops"])]
        n_opt = f["dense_n_opt"]
        ln_sizes = np.log(SIZES)
        dense_rate = math.exp(np.interp(math.log(n_opt), ln_sizes, np.log([rate(n) for n in SIZES])))
        moe_seconds = row["budget_flops"] / (0.8 * rate(2e6))
        assert row["multiplier"] == pytest.approx(f["dense_compute"] / dense_rate / moe_seconds, rel=1e-6)
    for row in a.fastest_seconds:
        if row["multiplier"] is None:
            assert "reaches the MoE's loss" in row["reason"]
            continue
        moe = [r for r in recs if r["model"] == row["model"] and r["budget_flops"] == row["budget_flops"]]
        reaching = [
            r
            for r in recs
            if r["arm"] == "dense" and r["final_val_loss"] <= np.mean([m["final_val_loss"] for m in moe]) + 1e-3
        ]
        fastest = min(r["train_seconds"] for r in reaching)
        assert row["multiplier"] == pytest.approx(fastest / np.mean([m["train_seconds"] for m in moe]), rel=1e-3)
    glance = {row["model"]: row for row in a.multiplier_seconds}
    assert glance  # the at-a-glance table reads (a)
