"""scoring: how per-query predictions become the report's numbers, on hand-made cases; the
teacher-forced scorer against the query engine on a random (far from uniform) model.

The metric formulas themselves are tested in test_metrics.py."""

from __future__ import annotations

import numpy as np
import pytest

from ping_llm import tokens as tk
from ping_llm.eval import metrics as M
from ping_llm.eval import scoring as S

MODEL = dict(n_layer=2, n_embd=64, n_head=2, sequence_len=256)


def test_summarize_scores_rtt_on_replies_and_failure_on_all_rows():
    obs = np.array([10.0, 20.0, np.nan, 40.0])
    failed = np.array([False, False, True, False])
    rows = dict(median=np.array([12.0, 20.0, 99.0, 30.0]),
                crps=np.array([1.0, 2.0, 1000.0, 3.0]),  # the failed row's value must not count
                in50=np.array([1.0, 0.0, np.nan, 1.0]),
                p_failed=np.array([0.1, 0.2, 0.9, 0.3]),
                logp=np.array([-1.0, -2.0, -3.0, -6.0]))
    s = S.summarize(obs, failed, rows)
    assert (s["n"], s["n_success"], s["n_failed"]) == (4, 3, 1)
    # absolute errors 2, 0, 10; relative 0.2, 0, 0.25
    assert s["mae_ms"] == pytest.approx(4.0)
    assert s["median_ae_ms"] == pytest.approx(2.0)
    assert s["rel_p50"] == pytest.approx(0.2)
    assert s["rel_p90"] == pytest.approx(0.2 + 0.8 * 0.05)  # linear interpolation
    assert s["crps_ms"] == pytest.approx(2.0)
    assert s["coverage_50"] == pytest.approx(2 / 3)
    assert s["roc_auc"] == pytest.approx(1.0)  # the failed row has the highest P(failed)
    assert s["pr_auc"] == pytest.approx(1.0)
    assert s["brier"] == pytest.approx((0.01 + 0.04 + 0.01 + 0.09) / 4)
    assert s["logp_result"] == pytest.approx(-3.0)
    # a selection, and rows without an answer (NaN median: e.g. no truth) are left out
    rows["median"][0] = np.nan
    s2 = S.summarize(obs, failed, rows, np.array([True, True, True, False]))
    assert (s2["n"], s2["n_success"]) == (2, 1)
    assert s2["mae_ms"] == pytest.approx(0.0)


def test_distribution_metrics_on_a_four_point_grid():
    grid = np.array([10.0, 20.0, 30.0, 40.0])  # exact RTT codes, so snapping keeps them
    pmf = np.array([[0.1, 0.4, 0.4, 0.1], [0.1, 0.4, 0.4, 0.1]])
    obs = np.array([20.0, np.nan])
    m = S.distribution_metrics(grid, pmf, obs, np.random.default_rng(0))
    np.testing.assert_allclose(m["q"][0], [10, 20, 20, 30, 40])  # levels .05 .25 .5 .75 .95
    # E|X - 20| = 7, E|X - X'| / 2 = 4.3 by hand
    assert m["crps"][0] == pytest.approx(2.7)
    assert m["crps_cens"][0] == pytest.approx(2.7)
    assert 0.1 <= m["pit"][0] <= 0.5  # P(X < 20) = 0.1, P(X <= 20) = 0.5
    assert m["in50"][0] == 1 and m["in90"][0] == 1
    assert np.isnan(m["crps"][1]) and np.isnan(m["pit"][1])
    assert m["p_tail"][0] == 0


def test_censored_crps_caps_far_tail_mass_at_10_s():
    grid = np.array([10.0, 1e6])
    pmf = np.array([[0.5, 0.5]])
    m = S.distribution_metrics(grid, pmf, np.array([10.0]), np.random.default_rng(0))
    # CRPS = E|X - y| - E|X - X'| / 2 = 0.5 d - 0.25 d with d the distance of the two atoms
    assert m["crps"][0] == pytest.approx(0.25 * (1e6 - 10))
    assert m["crps_cens"][0] == pytest.approx(0.25 * (S.CENSOR_MS - 10))
    assert m["p_tail"][0] == pytest.approx(0.5)


def test_spread_coarse_spreads_only_unrefined_bins():
    pmf = np.zeros((1, len(tk.CANON_CODES)))
    pmf[0, 5 * 256 + 0x80] = 0.25  # a coarse bin: all its mass on the centre code
    pmf[0, 7 * 256:8 * 256] = 0.75 / 256  # a refined bin
    out = S.spread_coarse(pmf)
    np.testing.assert_allclose(out[0, 5 * 256:6 * 256], 0.25 / 256)
    np.testing.assert_allclose(out[0, 7 * 256:8 * 256], 0.75 / 256)
    assert out.sum() == pytest.approx(1.0)


def test_breakdowns_split_rows_by_label():
    obs = np.array([10.0, 20.0, 30.0, 40.0])
    failed = np.zeros(4, bool)
    methods = {"m": {"median": np.array([11.0, 22.0, 33.0, 44.0])}}
    groups = {"ip_version": np.array(["IPv4", "IPv6", "IPv4", "IPv6"], dtype=object)}
    b = S.breakdowns(groups, obs, failed, methods)["ip_version"]
    assert b["IPv4"]["m"]["mae_ms"] == pytest.approx(2.0)  # errors 1, 3
    assert b["IPv6"]["m"]["mae_ms"] == pytest.approx(3.0)  # errors 2, 4


def test_baselines_are_reported_covered_only_and_with_fallback():
    from ping_llm.eval.baselines import GlobalMedian, Observations, PairHistory

    train = Observations(["a", "a", "a", "c"], ["b", "b", "b", "d"], [10.0, 12.0, 14.0, 100.0])
    fitted = {"global_median": GlobalMedian().fit(train), "pair_median": PairHistory().fit(train)}
    src, dst = np.array(["a", "e"]), np.array(["b", "f"])
    obs, failed = np.array([11.0, 50.0]), np.zeros(2, bool)
    rows = S.baseline_predictions(fitted, src, dst, obs, failed)
    s = S.baseline_summary(rows["pair_median"], obs, failed)
    assert s["coverage"] == 0.5
    assert s["covered"]["n"] == 1 and s["covered"]["mae_ms"] == pytest.approx(1.0)  # 12 vs 11
    # the uncovered pair falls back to the global median of 10, 12, 14, 100 = 13
    assert s["fallback"]["mae_ms"] == pytest.approx((1.0 + 37.0) / 2)
    assert rows["pair_median"]["crps"][0] == pytest.approx(
        M.crps_quantiles(S.BASELINE_LADDER,
                            fitted["pair_median"].predict_quantiles(["a"], ["b"],
                                                                    S.BASELINE_LADDER), [11.0])[0])


def test_kl_of_the_truth_against_itself_is_zero():
    pmf = np.zeros((2, len(tk.CANON_CODES)))
    pmf[0, 300:556] = 1 / 256
    pmf[1, 1000:1512] = 1 / 512
    pf = np.array([0.1, 0.0])
    for v in S.kl_to_truth(pf, pmf, pf, pmf).values():
        np.testing.assert_allclose(v, 0.0, atol=1e-6)  # the 1e-12 floor, renormalised
    shifted = np.roll(pmf, 256, axis=1)
    assert np.all(S.kl_to_truth(pf, pmf, pf, shifted)["kl_rtt"] > 1.0)
