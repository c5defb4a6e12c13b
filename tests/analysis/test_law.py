"""The joint law, frontier multipliers and seed-adjusted IsoFLOP check on synthetic studies drawn
from a known law with shared seed effects: each must give the truth back."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.optimize import brentq, minimize_scalar

from harness.analysis import scaling, scaling_report
from harness.analysis.isoflop import isoflop
from harness.analysis.law import fit_law

TRUE = {"E0": 1.8, "A": 78.0, "alpha": 0.3, "B": 240.0, "beta": 0.3, "theta": 0.5, "rho": 0.02}
SIZES = (1e6, 2e6, 4e6, 8e6)
BUDGETS = (1e15, 4e15)


def true_loss(na, nt, d, routed, t=TRUE):
    m = na ** (1 - t["theta"]) * nt ** t["theta"]
    return t["E0"] + t["A"] * m ** -t["alpha"] + t["B"] * d ** -t["beta"] + t["rho"] * routed


def study(
    rng, t=TRUE, seeds=(0, 1, 2), sd_seed=0.02, sd_resid=0.01, budgets=BUDGETS, sizes=SIZES, experts=(2, 4, 8, 16)
):
    """Dense sizes at each budget, MoEs of 2M active parameters at E = 2 (= k), 4, 8, 16 with k = 2."""
    u = {s: sd_seed * rng.standard_normal() for s in seeds}
    recs = []

    def add(model, arm, na, nt, c, e, k, s):
        d = c / (6 * na)
        y = true_loss(na, nt, d, arm == "moe", t) + u[s] + sd_resid * rng.standard_normal()
        recs.append(
            {
                "run_id": f"{model}_{c:g}_s{s}",
                "model": model,
                "arm": arm,
                "experts": e,
                "top_k": k,
                "seed": s,
                "params": {"active_non_embedding": na, "total_non_embedding": nt, "active": na, "total": nt},
                "budget_flops": c,
                "flops_spent": c,
                "tokens": d,
                "final_val_loss": float(y),
                "flops_per_token": {"6N_active": 6 * na},
                "flop_convention": "6N_active",
                "train_seconds": c / (1e12 if arm == "dense" else 0.8e12),
                "gpu_energy_j": None,
                "config": {},
            }
        )

    for c in budgets:
        for s in seeds:
            for n in sizes:
                add(f"dense-{n:g}", "dense", n, n, c, None, None, s)
            for e in experts:
                add(f"moe-e{e}k2", "moe", 2e6, 2e6 * (1 + (e / 2 - 1) * 2 / 3), c, e, 2, s)
    return recs


def test_the_law_returns_the_true_parameters():
    fit, reason = fit_law(study(np.random.default_rng(0), sd_seed=0.02, sd_resid=0.002), bootstrap=0)
    assert reason == ""
    assert fit.estimates["theta"] == pytest.approx(0.5, abs=0.05)
    assert fit.estimates["rho"] == pytest.approx(0.02, abs=0.005)
    assert fit.estimates["alpha"] == pytest.approx(0.3, abs=0.05)
    assert fit.estimates["beta"] == pytest.approx(0.3, abs=0.03)


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
        "joint_law": scaling_report.law_table(a),
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
    assert all(row[4] != "-" and "[" in row[4] for row in tables["compute_multiplier"][1])
    assert "Every parameter of the law is identified" in text and "Krajewski et al. 2024's" in text
    assert "7x" in text and "not a FLOP multiplier" in text


def test_a_one_slice_study_gets_reasons_naming_the_runs():
    a = scaling.analyse(study(np.random.default_rng(5), budgets=(1e15,)), bootstrap=10)
    assert a.law is None and "2 or more budgets" in a.law_reason
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
