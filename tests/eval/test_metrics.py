"""Every metric against values worked out by hand (in the comments), plus brute-force checks."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ping_llm.errors import InputError
from ping_llm.eval import metrics as M

# ----------------------------------------------------------------------------- point error


def test_point_error_summary_matches_hand_computation():
    # abs errors [2, 0, 5, 40] -> MAE 47/4, median (2+5)/2
    # relative [2/12, 0, 5/25, 40/80] -> sorted [0, .1667, .2, .5]
    # p50 = (.1667 + .2)/2 ; p90 at position 2.7 -> .2 + .7 * (.5 - .2) = .41
    s = M.point_error_summary([10, 20, 30, 40], [12, 20, 25, 80])
    assert s["n"] == 4
    assert s["mae_ms"] == pytest.approx(11.75)
    assert s["median_ae_ms"] == pytest.approx(3.5)
    assert s["rel_p50"] == pytest.approx((2 / 12 + 0.2) / 2)
    assert s["rel_p90"] == pytest.approx(0.41)


def test_relative_error_of_a_zero_rtt_uses_the_one_microsecond_floor():
    assert M.relative_errors([0.5], [0.0])[0] == pytest.approx(0.5 / M.REL_ERROR_FLOOR_MS)


def test_point_errors_refuse_nan_predictions_and_failed_observations():
    with pytest.raises(InputError, match="non-finite"):
        M.point_error_summary([1.0, np.nan], [1.0, 2.0])
    with pytest.raises(InputError, match="successful"):
        M.point_error_summary([1.0], [-1.0])
    with pytest.raises(InputError):
        M.point_error_summary([1.0, 2.0], [1.0])


def test_empty_breakdown_cell_gives_nans_not_an_error():
    s = M.point_error_summary([], [])
    assert s["n"] == 0 and math.isnan(s["mae_ms"])


# ----------------------------------------------------------------------------- CRPS


def test_crps_of_a_two_point_pmf_matches_the_integral_by_hand():
    # X = 0 or 10 with prob 1/2. F = 1/2 on [0, 10), 1 after.
    # y = 10: integral_0^10 (1/2)^2 dx = 2.5
    # y = 4:  integral_0^4 (1/2)^2 + integral_4^10 (1/2 - 1)^2 = 1 + 1.5 = 2.5
    # y = 20: 2.5 + integral_10^20 1^2 = 12.5
    grid = np.array([0.0, 10.0])
    pmf = np.array([[0.5, 0.5]] * 3)
    np.testing.assert_allclose(M.crps_pmf(grid, pmf, [10.0, 4.0, 20.0]), [2.5, 2.5, 12.5])


def test_crps_of_a_point_mass_is_the_absolute_error():
    grid = np.array([1.0, 5.0, 10.0])
    assert M.crps_pmf(grid, [0, 0, 1], [7.0])[0] == pytest.approx(3.0)


def test_crps_pmf_ignores_nan_grid_points_without_mass_and_sorts_the_grid():
    grid = np.array([10.0, np.nan, 0.0])
    assert M.crps_pmf(grid, [[0.5, 0.0, 0.5]], [4.0])[0] == pytest.approx(2.5)
    with pytest.raises(InputError, match="non-finite grid"):
        M.crps_pmf(grid, [[0.4, 0.2, 0.4]], [4.0])


def test_crps_pmf_equals_a_brute_force_integral_of_the_squared_cdf_difference():
    rng = np.random.default_rng(3)
    grid = np.sort(rng.uniform(0, 100, 40))
    pmf = rng.dirichlet(np.ones(40), size=5)
    y = rng.uniform(-10, 110, 5)
    xs = np.linspace(-20, 120, 400_001)
    dx = xs[1] - xs[0]
    for k in range(5):
        cdf = np.cumsum(pmf[k])[np.searchsorted(grid, xs, side="right") - 1]
        cdf = np.where(xs < grid[0], 0.0, cdf)
        brute = np.sum((cdf - (xs >= y[k])) ** 2) * dx
        assert M.crps_pmf(grid, pmf[k:k + 1], y[k:k + 1])[0] == pytest.approx(brute, rel=1e-3)


def test_crps_of_samples_is_the_crps_of_their_empirical_distribution_with_nan_padding():
    # {0, 10} equally likely is the two-point pmf above: 2.5 at y = 4; a single sample 5 at y = 2: 3
    s = np.array([[0.0, 10.0, np.nan], [5.0, np.nan, np.nan]])
    np.testing.assert_allclose(M.crps_samples(s, [4.0, 2.0]), [2.5, 3.0])


def test_crps_from_quantiles_midpoint_rule_by_hand():
    # one level 0.5 at q = 10, y = 4: pinball = (1 - .5) * 6 = 3, times 2 * width 1 -> 6 = |10 - 4|
    assert M.crps_quantiles([0.5], [[10.0]], [4.0])[0] == pytest.approx(6.0)
    # levels .25/.75 at q = 0/10, y = 4: pinball .25*4 = 1 and .25*6 = 1.5, widths 1/2 each
    # -> 2 * (.5 + .75) = 2.5, the exact CRPS of the 50/50 two-point distribution
    assert M.crps_quantiles([0.25, 0.75], [[0.0, 10.0]], [4.0])[0] == pytest.approx(2.5)


def test_crps_from_many_quantiles_approaches_the_exact_value():
    rng = np.random.default_rng(0)
    x = rng.lognormal(4, 0.5, 2000)
    levels = (np.arange(200) + 0.5) / 200
    q = np.quantile(x, levels)[None, :]
    exact = M.crps_samples(x[None, :], [60.0])[0]
    assert M.crps_quantiles(levels, q, [60.0])[0] == pytest.approx(exact, rel=0.01)


# ------------------------------------------------------------------- quantiles, coverage, PIT


GRID = np.array([1.0, 2.0, 3.0, 4.0])
PMF = np.array([0.1, 0.4, 0.4, 0.1])  # CDF .1 .5 .9 1.0


def test_quantiles_from_pmf_take_the_smallest_value_reaching_the_level():
    q = M.quantiles_from_pmf(GRID, PMF, [0.05, 0.25, 0.5, 0.75, 0.95])
    np.testing.assert_array_equal(q[0], [1, 2, 2, 3, 4])


def test_central_interval_coverage_by_hand():
    # 50%: [q.25, q.75] = [2, 3]; 90%: [q.05, q.95] = [1, 4]; obs 2 (in both), 3.5, 4
    pmf = np.tile(PMF, (3, 1))
    cov = M.central_interval_coverage(GRID, pmf, [2.0, 3.5, 4.0])
    assert cov[0.5] == pytest.approx(1 / 3)
    assert cov[0.9] == pytest.approx(1.0)


def test_pit_by_hand_mid_and_randomised():
    pmf = np.tile(PMF, (4, 1))
    # y=2: F(y-)=.1, F(y)=.5 -> mid .3; y=2.5: .5; below the grid 0, above 1
    np.testing.assert_allclose(M.pit_pmf(GRID, pmf, [2.0, 2.5, 0.5, 5.0]), [0.3, 0.5, 0.0, 1.0])
    u = M.pit_pmf(GRID, np.tile(PMF, (1000, 1)), np.full(1000, 2.0), rng=np.random.default_rng(0))
    assert u.min() >= 0.1 and u.max() <= 0.5 and abs(u.mean() - 0.3) < 0.01
    # empirical samples {1, 2, 2, 3}: y = 2 -> below 1/4, at 1/2 -> mid 1/2
    assert M.pit_samples([[1.0, 2.0, 2.0, 3.0]], [2.0])[0] == pytest.approx(0.5)


def test_pit_of_a_calibrated_forecast_is_flat():
    rng = np.random.default_rng(1)
    grid = np.arange(100.0)
    pmf = np.full((1, 100), 0.01)
    y = rng.integers(0, 100, 20_000).astype(float)
    u = M.pit_pmf(grid, np.repeat(pmf, len(y), axis=0), y, rng=rng)
    density, edges = M.pit_histogram(u, bins=10)
    assert np.allclose(density, 1.0, atol=0.1) and edges[0] == 0 and edges[-1] == 1


def test_pit_histogram_by_hand():
    density, _ = M.pit_histogram([0.05, 0.15, 0.95, 0.95], bins=4)
    np.testing.assert_allclose(density, [2, 0, 0, 2])  # counts [2,0,0,2] / 4 values * 4 bins


# ----------------------------------------------------------------------------- failures


def test_roc_auc_and_average_precision_by_hand():
    # positives at .9 and .7, negatives at .8 and .6: 3 of 4 pairs ordered right -> AUC .75
    # thresholds: .9 -> P 1, R .5 ; .8 -> P .5, R .5 ; .7 -> P 2/3, R 1 ; .6 -> P .5, R 1
    # AP = .5*1 + 0*.5 + .5*(2/3) + 0 = 5/6
    s, y = [0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0]
    assert M.roc_auc(s, y) == pytest.approx(0.75)
    assert M.average_precision(s, y) == pytest.approx(5 / 6)


def test_ties_count_half_in_roc_and_enter_together_in_average_precision():
    # the positive ties a negative at .5 (1/2) and beats the one at .2 (1) -> AUC .75
    # the only threshold that reaches the positive takes both tied items: P .5 at R 1 -> AP .5
    s, y = [0.5, 0.5, 0.2], [True, False, False]
    assert M.roc_auc(s, y) == pytest.approx(0.75)
    assert M.average_precision(s, y) == pytest.approx(0.5)


def test_roc_auc_equals_the_pairwise_count_and_ap_the_mean_precision_at_each_positive():
    rng = np.random.default_rng(2)
    s = rng.random(300)
    y = rng.random(300) < 0.2 + 0.5 * s
    pos, neg = s[y], s[~y]
    pairwise = np.mean(pos[:, None] > neg[None, :])  # continuous scores: no ties
    assert M.roc_auc(s, y) == pytest.approx(pairwise)
    ranked = y[np.argsort(-s)]
    prec_at_pos = (np.cumsum(ranked) / np.arange(1, len(ranked) + 1))[ranked]
    assert M.average_precision(s, y) == pytest.approx(prec_at_pos.mean())


def test_failure_metrics_are_nan_without_both_classes():
    assert math.isnan(M.roc_auc([0.1, 0.2], [0, 0]))
    assert math.isnan(M.average_precision([0.1, 0.2], [0, 0]))
    with pytest.raises(InputError):
        M.roc_auc([0.1, 0.2], [0, 2])


# ----------------------------------------------------------------------------- KL and NLL


def test_kl_divergence_by_hand():
    # .5 ln(.5/.25) + .5 ln(.5/.75) = .5 ln 2 + .5 ln(2/3)
    assert M.kl_divergence([0.5, 0.5], [0.25, 0.75]) == pytest.approx(
        0.5 * math.log(2) + 0.5 * math.log(2 / 3))
    assert M.kl_divergence([0.2, 0.8], [0.2, 0.8]) == pytest.approx(0.0, abs=1e-12)


def test_kl_floors_a_model_that_rules_out_the_truth():
    # q = [0, 1] -> [1e-12, 1] / (1 + 1e-12): KL = ln((1 + 1e-12) / 1e-12) ~ 27.63 nats
    kl = M.kl_divergence(np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]]))
    assert kl[0] == pytest.approx(math.log((1 + 1e-12) / 1e-12))


def test_mean_by_group_averages_per_field():
    assert M.mean_by_group([1.0, 2.0, 3.0, 4.0], [0, 1, 0, 1]) == {0: 2.0, 1: 3.0}
