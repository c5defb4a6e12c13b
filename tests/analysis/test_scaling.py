"""Scaling analysis on synthetic records drawn from known laws: each fit must give the law back."""

from __future__ import annotations

import math

import numpy as np
import pytest

from harness.analysis.fits import MAX_EXTRAPOLATION, Noise, fit_parabola, fit_power_law, invert
from harness.analysis.isoflop import isoflop
from harness.analysis.krajewski import DENSE, MOE, granularity_of, krajewski_check, krajewski_loss
from harness.analysis.scaling import dense_equivalents

E, A, ALPHA = 1.8, 40.0, 0.3
SIZES = np.geomspace(1e6, 1e9, 8)


def law(n):
    return E + A * np.asarray(n, dtype=float) ** -ALPHA


def rec(
    model: str,
    n_active: float,
    budget: float,
    loss: float,
    *,
    experts: int | None = None,
    top_k: int | None = None,
    n_total: float | None = None,
    seed: int = 0,
    flops_spent: float | None = None,
    tokens: int = 10**9,
    d_ff: int = 512,
    d_expert: int = 256,
) -> dict:
    """A record.json-shaped dict; an MoE run when ``experts`` is given."""
    moe = experts is not None
    return {
        "run_id": f"{model}_{budget:g}_s{seed}",
        "model": model,
        "arm": "moe" if moe else "dense",
        "experts": experts,
        "top_k": top_k,
        "seed": seed,
        "params": {
            "total": int((n_total or n_active) * 1.2),
            "active": int(n_active * 1.2),
            "total_non_embedding": n_total or n_active,
            "active_non_embedding": n_active,
        },
        "budget_flops": budget,
        "flops_spent": budget if flops_spent is None else flops_spent,
        "tokens": tokens,
        "final_val_loss": float(loss),
        "train_seconds": 1.0,
        "gpu_energy_j": None,
        "config": {"d_ff": d_ff, "moe": {"experts": experts, "top_k": top_k, "d_expert": d_expert} if moe else None},
    }


# --- power law ----------------------------------------------------------------------------------


def test_power_law_recovers_known_parameters():
    fit, reason = fit_power_law(SIZES, law(SIZES), bootstrap=0)
    assert reason == ""
    assert fit.E == pytest.approx(E, rel=1e-4)
    assert fit.A == pytest.approx(A, rel=1e-3)
    assert fit.alpha == pytest.approx(ALPHA, rel=1e-4)
    assert (fit.x_min, fit.x_max, fit.points) == (1e6, 1e9, 8)
    assert fit.rmse < 1e-6
    assert fit.alpha_ci is None and fit.draws == 0


def test_one_outlier_barely_moves_the_robust_exponent():
    clean, _ = fit_power_law(SIZES, law(SIZES), bootstrap=0)
    loss = law(SIZES)
    loss[3] += 0.3  # one diverged run
    robust, _ = fit_power_law(SIZES, loss, bootstrap=0)
    plain, _ = fit_power_law(SIZES, loss, bootstrap=0, robust_loss="linear")
    assert abs(robust.alpha - clean.alpha) < 0.05
    assert abs(plain.alpha - clean.alpha) > 0.1  # the non-robust fit is pulled away


def test_bootstrap_intervals_contain_the_true_values():
    n = np.geomspace(1e6, 1e9, 10)
    loss = law(n) + np.random.default_rng(1).normal(0, 0.01, n.size)
    fit, _ = fit_power_law(n, loss, bootstrap=300, seed=0)
    assert fit.draws + fit.skipped == 300 and fit.draws > 250
    for true, ci in ((E, fit.E_ci), (A, fit.A_ci), (ALPHA, fit.alpha_ci)):
        assert ci[0] < ci[1]
        assert ci[0] <= true <= ci[1]
    again, _ = fit_power_law(n, loss, bootstrap=300, seed=0)
    assert again.alpha_ci == fit.alpha_ci  # seeded


@pytest.mark.parametrize("sizes", [3, 4])
def test_no_interval_without_an_estimate_of_the_noise(sizes):
    """Three sizes fit a three-parameter law exactly and four leave one residual degree of freedom:
    resampling such points gave a zero-width interval (three) or covered 83% for a nominal 95%
    (four). Without replicate seeds there is no interval, and the fit says why."""
    n = SIZES[:sizes]
    fit, reason = fit_power_law(n, law(n) + np.random.default_rng(0).normal(0, 0.01, sizes), bootstrap=100)
    assert reason == "" and fit.alpha_ci is None and fit.samples is None
    assert "no interval" in fit.interval_reason and "degrees of freedom" in fit.interval_reason


def test_seed_noise_gives_three_sizes_an_interval_of_nonzero_width():
    n = SIZES[:3]
    fit, _ = fit_power_law(n, law(n), seeds=[2, 2, 2], noise=Noise(0.02, 3, "test"), bootstrap=100)
    assert fit.interval_reason == "" and fit.noise_dof == 3
    assert fit.alpha_ci[1] - fit.alpha_ci[0] > 0.01
    assert fit.alpha_ci[0] <= ALPHA <= fit.alpha_ci[1]


@pytest.mark.slow
def test_interval_coverage_on_synthetic_studies():
    """Three sizes x three seeds drawn from the law with seed noise 0.02 nats, the noise pooled
    from the seeds as the report does: the nominal 95% interval of alpha covers the true value
    in at least 85% of 40 studies (a zero-width interval covers none)."""
    rng = np.random.default_rng(123)
    n = np.array([1e6, 3e6, 1e7])
    covered = 0
    for study in range(40):
        runs = law(n)[:, None] + 0.02 * rng.standard_normal((3, 3))
        noise = Noise(float(np.sqrt(runs.var(axis=1, ddof=1).mean())), 6, "seeds")
        fit, _ = fit_power_law(n, runs.mean(1), seeds=[3, 3, 3], noise=noise, bootstrap=100, seed=study)
        covered += fit.alpha_ci[0] <= ALPHA <= fit.alpha_ci[1]
    assert covered >= 34


def test_losses_that_do_not_fall_with_size_give_no_fit():
    n = SIZES[:3]
    fit, reason = fit_power_law(n, [3.0, 3.05, 3.02])
    assert fit is None and "does not fall with size" in reason
    # falling, but as a straight line in ln N: the exponent runs to its bound, so no power law
    fit, reason = fit_power_law(n, 3.0 - 0.001 * np.log(n / n[0]), bootstrap=0)
    assert fit is None and "bound" in reason


def test_a_degenerate_dense_fit_derives_no_numbers():
    budget = 1e18
    dense = [rec(f"d{i}", x, budget, y) for i, (x, y) in enumerate(zip(SIZES[:3], [3.0, 3.05, 3.02], strict=True))]
    (row,) = dense_equivalents([*dense, rec("m", 2e6, budget, 2.9, experts=8, top_k=2)], bootstrap=0)
    assert row["dense_equivalent_n"] is None and row["ratio_active"] is None and row["dense_fit"] is None
    assert "does not fall" in row["reason"]


@pytest.mark.parametrize("n", [[1e6, 1e7], [1e6, 1e6, 1e7, 1e7], []])
def test_too_few_sizes_give_a_reason(n):
    fit, reason = fit_power_law(n, law(n), bootstrap=10)
    assert fit is None
    assert "3 or more distinct sizes" in reason


def test_invert_round_trips_and_flags_extrapolation():
    fit, _ = fit_power_law(SIZES, law(SIZES), bootstrap=0)
    for n in (3e6, 2e8):
        inv, reason = invert(fit, fit.predict(n))
        assert reason == ""
        assert inv.x == pytest.approx(n, rel=1e-10)
        assert not inv.extrapolated
    inv, _ = invert(fit, fit.predict(5e9))
    assert inv.x == pytest.approx(5e9, rel=1e-10) and inv.extrapolated
    none, reason = invert(fit, fit.E - 0.01)
    assert none is None and "asymptote" in reason
    far, reason = invert(fit, fit.predict(1e9 * MAX_EXTRAPOLATION * 2))
    assert far is None and "not extrapolated that far" in reason


def test_invert_interval_carries_the_noise_of_the_inverted_loss():
    n = SIZES[:3]
    fit, _ = fit_power_law(n, law(n), seeds=[3, 3, 3], noise=Noise(0.02, 6, "test"), bootstrap=200)
    target = float(fit.predict(1e7))
    fit_only, _ = invert(fit, target)
    both, _ = invert(fit, target, loss_seeds=1)
    assert both.x == fit_only.x
    assert both.ci[1] / both.ci[0] > fit_only.ci[1] / fit_only.ci[0]


def test_invert_interval_brackets_the_point_estimate():
    n = np.geomspace(1e6, 1e9, 10)
    loss = law(n) + np.random.default_rng(2).normal(0, 0.01, n.size)
    fit, _ = fit_power_law(n, loss, bootstrap=200)
    inv, _ = invert(fit, 2.0)
    assert inv.ci[0] < inv.x < inv.ci[1]


# --- Clark's effective parameters: dense L(N) at the MoE's tokens --------------------------------


def test_dense_equivalent_ratio_of_an_moe_as_good_as_twice_its_size():
    budget = 1e18
    dense = [rec(f"d{i}", n, budget, law(n)) for i, n in enumerate(np.geomspace(1e6, 1e9, 5))]
    n0 = 2e7
    moe = [rec("m", n0, budget, law(2 * n0), experts=8, top_k=2, n_total=8 * n0, seed=s) for s in (0, 1)]
    (row,) = dense_equivalents(dense + moe, bootstrap=0)
    assert row["reason"] == ""
    assert row["arm"] == "MoE E8 k2" and row["seeds"] == 2
    assert row["dense_equivalent_n"] == pytest.approx(2 * n0, rel=1e-5)
    assert row["ratio_active"] == pytest.approx(2.0, rel=1e-5)
    assert row["ratio_total"] == pytest.approx(0.25, rel=1e-5)
    assert row["extrapolated"] is False
    assert row["dense_monotone"] is True


def test_dense_equivalent_flags_dense_sizes_past_the_isoflop_optimum():
    budget = 1e18
    n = np.geomspace(1e6, 1e9, 5)
    loss = law(n)
    loss[-1] = loss[-2] + 0.05  # the largest model is under-trained at this budget
    runs = [rec(f"d{i}", x, budget, y) for i, (x, y) in enumerate(zip(n, loss, strict=True))]
    (row,) = dense_equivalents([*runs, rec("m", 2e7, budget, law(4e7), experts=8, top_k=2)], bootstrap=0)
    assert row["dense_monotone"] is False


def test_dense_equivalent_averages_seeds():
    budget = 1e18
    dense = [rec(f"d{i}", n, budget, law(n)) for i, n in enumerate(np.geomspace(1e6, 1e9, 5))]
    n0 = 2e7
    # seed losses straddle the loss of a dense model at 3 n0: their mean is exactly it
    moe = [rec("m", n0, budget, law(3 * n0) + d, experts=8, top_k=2, seed=s) for s, d in ((0, -0.01), (1, 0.01))]
    (row,) = dense_equivalents(dense + moe, bootstrap=0)
    assert row["ratio_active"] == pytest.approx(3.0, rel=1e-5)


def test_dense_equivalent_with_two_dense_sizes_gives_a_reason():
    budget = 1e18
    runs = [rec("d0", 1e6, budget, law(1e6)), rec("d1", 1e8, budget, law(1e8))]
    runs.append(rec("m", 1e7, budget, law(2e7), experts=8, top_k=2))
    (row,) = dense_equivalents(runs, bootstrap=0)
    assert row["dense_equivalent_n"] is None and row["ratio_active"] is None
    assert "3 or more sizes trained on" in row["reason"]


def test_dense_equivalent_below_the_asymptote_gives_a_reason():
    budget = 1e18
    dense = [rec(f"d{i}", n, budget, law(n)) for i, n in enumerate(np.geomspace(1e6, 1e9, 5))]
    (row,) = dense_equivalents([*dense, rec("m", 1e7, budget, E - 0.2, experts=8, top_k=2)], bootstrap=0)
    assert row["ratio_active"] is None and "asymptote" in row["reason"]


# --- IsoFLOP ------------------------------------------------------------------------------------

BUDGETS = [1e15, 3e15, 1e16, 3e16, 1e17]


def test_parabola_vertex_is_recovered():
    n = np.geomspace(1e6, 1e9, 7)
    n_star = 3e7
    par, reason = fit_parabola(n, 3.0 + 0.05 * (np.log(n) - math.log(n_star)) ** 2)
    assert reason == ""
    assert par.n_opt == pytest.approx(n_star, rel=1e-8)
    assert par.loss_opt == pytest.approx(3.0, abs=1e-10)
    assert par.bracketed


@pytest.mark.parametrize("sign", [-1.0, 0.0])
def test_concave_or_flat_profile_has_no_minimum(sign):
    n = np.geomspace(1e6, 1e9, 5)
    par, reason = fit_parabola(n, 3.0 + sign * 0.05 * (np.log(n) - math.log(3e7)) ** 2)
    assert par is None and reason == "no minimum: curvature <= 0"


def test_parabola_with_two_sizes_gives_a_reason():
    par, reason = fit_parabola([1e6, 1e7, 1e7], [3.0, 2.9, 2.95])
    assert par is None and "distinct sizes" in reason


def test_isoflop_optima_and_their_exponent_per_arm():
    records = []
    for c in (1e17, 1e18, 1e19):
        n_star = 1e7 * (c / 1e17) ** 0.5
        for n in n_star * np.geomspace(0.1, 10, 5):
            loss = 3.0 + 0.04 * math.log(n / n_star) ** 2
            records.append(rec(f"d{n:.3g}", n, c, loss))
            records.append(rec(f"m{n:.3g}", n, c, loss - 0.05, experts=8, top_k=2))
        records.append(rec("m-E4", 1e7, c, 3.0, experts=4, top_k=1, d_expert=512))  # one size: no profile
    iso = isoflop(records, draws=0)
    dense = [row for row in iso.curves if row["arm"] == "dense"]
    assert [row["budget_flops"] for row in dense] == [1e17, 1e18, 1e19]
    for row in dense:
        assert row["n_opt"] == pytest.approx(1e7 * (row["budget_flops"] / 1e17) ** 0.5, rel=1e-6)
        assert row["bracketed"] and row["reason"] == ""
    scaling = {row["arm"]: row for row in iso.scaling}
    assert scaling["dense"]["exponent"] == pytest.approx(0.5, abs=1e-6)
    assert scaling["MoE E8 k2"]["exponent"] == pytest.approx(0.5, abs=1e-6)
    assert scaling["MoE E4 k1"]["exponent"] is None and "2 or more budgets" in scaling["MoE E4 k1"]["reason"]
    assert all("4 or more sizes" in row["reason"] for row in iso.curves if row["arm"] == "MoE E4 k1")


# --- Krajewski et al. 2024 ----------------------------------------------------------------------


def test_krajewski_law_value_and_direction():
    # 0.47 + (2.1 + 18.1) / 1e8**0.115 + 30.8 / 1e10**0.147, worked by hand
    assert krajewski_loss(1e8, 1e10, 1) == pytest.approx(3.942, abs=1e-3)
    assert krajewski_loss(1e8, 1e10, 8) < krajewski_loss(1e8, 1e10, 2) < krajewski_loss(1e8, 1e10, 1)
    assert krajewski_loss(1e9, 1e10, 1) < krajewski_loss(1e8, 1e10, 1)
    assert krajewski_loss(1e8, 1e11, 1) < krajewski_loss(1e8, 1e10, 1)
    # the dense row has its own constants: 0.47 + 16.3 / 1e8**0.126 + 26.7 / 1e10**0.127
    assert krajewski_loss(1e8, 1e10, k=DENSE) == pytest.approx(0.47 + 16.3 / 1e8**0.126 + 26.7 / 1e10**0.127)
    assert krajewski_loss(np.array([1e8, 1e9]), 1e10, 1).shape == (2,)


def test_krajewski_uses_total_parameters_and_the_dense_row_inside_the_fitted_range():
    tokens = 2 * 10**10  # beyond the fits' 16B-token minimum
    dense = rec("d", 1e8, 1e20, 2.6, tokens=tokens)
    # expansion rate 64: 128 experts of d_ff / 2 (G = 2), top-2: same active count as the dense model
    moe = rec("m", 1e8, 1e20, 2.5, experts=128, top_k=2, n_total=3.3e9, tokens=tokens, d_ff=512, d_expert=256)
    assert granularity_of(dense) is None and granularity_of(moe) == 2.0
    rows = {row["run_id"]: row for row in krajewski_check([dense, moe])}
    d, m = rows[dense["run_id"]], rows[moe["run_id"]]
    assert d["predicted"] == pytest.approx(krajewski_loss(1e8, tokens, k=DENSE))
    assert m["predicted"] == pytest.approx(krajewski_loss(3.3e9, tokens, 2.0, k=MOE))  # total, not active N
    assert m["expansion_rate"] == 64 and m["reason"] == ""
    assert m["predicted_gap"] == pytest.approx(m["predicted"] - d["predicted"])
    assert m["observed_gap"] == pytest.approx(-0.1)


def test_krajewski_refuses_runs_outside_its_range():
    dense = rec("d", 1e7, 1e16, 3.2)
    moe = rec("m", 1e7, 1e16, 3.1, experts=8, top_k=2, d_ff=512, d_expert=256)  # expansion rate 4, 1e9 tokens
    rows = {row["run_id"]: row for row in krajewski_check([dense, moe])}
    m = rows[moe["run_id"]]
    assert m["predicted"] is None and m["predicted_gap"] is None
    assert "expansion rate 4" in m["reason"] and "tokens" in m["reason"]
    assert m["observed_gap"] == pytest.approx(-0.1)


# --- Clark's effective parameters (equal tokens) ------------------------------------------------


def test_effective_params_fits_dense_runs_at_the_moes_token_count():
    """Clark et al. 2022: dense sizes trained on the same tokens (here: budgets proportional to size)."""
    tokens = 10**9
    dense = [rec(f"d{i}", n, 6 * n * tokens, law(n), tokens=tokens) for i, n in enumerate(SIZES[:5])]
    moe = rec("m", 1e7, 6e7 * tokens, law(3e7), experts=8, top_k=2, tokens=tokens)
    (row,) = dense_equivalents([*dense, moe], bootstrap=0)
    assert row["reason"] == "" and row["ratio_active"] == pytest.approx(3.0, rel=1e-4)
    # the same runs at one FLOP budget: larger dense models see fewer tokens, none match the MoE's
    budget = 6e16
    flop_matched = [rec(f"d{i}", n, budget, law(n), tokens=int(budget / (6 * n))) for i, n in enumerate(SIZES[:5])]
    (row,) = dense_equivalents([*flop_matched, rec("m", 1e7, budget, 2.5, experts=8, top_k=2, tokens=10**9)])
    assert row["ratio_active"] is None and "trained on the MoE's" in row["reason"]
