"""Baselines on small known inputs (hand-made series, prefixes, low-rank matrices, Serf's Vivaldi
checks) and on real data (Seattle all-pairs matrix, a slice of the MENOG RIPE Atlas pings)."""

from __future__ import annotations

import gzip
import json
import math

import numpy as np
import pyarrow as pa
import pytest

from ping_llm import metrics as M
from ping_llm.baselines import (
    DMFSGD,
    BiasedMF,
    DestinationMedian,
    GlobalMedian,
    Observations,
    PairHistory,
    PrefixNeighbour,
    Vivaldi,
    VivaldiConfig,
    make_baselines,
    with_fallback,
)
from ping_llm.errors import InputError

# ----------------------------------------------------------------------------- observations


def test_observations_from_a_canonical_table_converts_timestamps_to_seconds():
    t = pa.table({
        "event_time": pa.array([1_000_000, 2_000_000], pa.timestamp("ms", tz="UTC")),
        "src_addr": ["1.1.1.1", "1.1.1.1"], "dst_addr": ["2.2.2.2", "3.3.3.3"],
        "rtt": [5.0, -1.0], "extra": [1, 2]})
    obs = Observations.from_table(t)
    np.testing.assert_array_equal(obs.time, [1000.0, 2000.0])
    np.testing.assert_array_equal(obs.ok, [True, False])
    assert list(obs.nodes) == ["1.1.1.1", "2.2.2.2", "3.3.3.3"]
    with pytest.raises(InputError, match="lacks"):
        Observations.from_table(t.drop(["rtt"]))


def test_observations_reject_mismatched_lengths_and_nan_rtts():
    with pytest.raises(InputError):
        Observations(["a"], ["b", "c"], [1.0, 2.0])
    with pytest.raises(InputError):
        Observations(["a"], ["b"], [np.nan])


# ----------------------------------------------------------------------------- history


# pair a->b: times 3,1,2,5,4 with rtts 30,10,20,fail,40 -> in time order 10,20,30,40 (+ 1 failure)
# pair a->c: 100, 200. Global successes: 10 20 30 40 100 200 (median 35); 1 failure in 7 pings.
SERIES = Observations(["a"] * 7, ["b"] * 5 + ["c"] * 2,
                      [30.0, 10.0, 20.0, -1.0, 40.0, 100.0, 200.0],
                      [3, 1, 2, 5, 4, 6, 7])


def test_pair_history_statistics_by_hand():
    q = (["a", "a", "b"], ["b", "c", "a"])  # last pair never seen
    med = PairHistory("median").fit(SERIES).predict(*q)
    np.testing.assert_allclose(med[:2], [25.0, 150.0])
    assert math.isnan(med[2])
    # last by time: 40 (t=4; the failure at t=5 is not an RTT)
    assert PairHistory("last").fit(SERIES).predict(*q)[0] == 40.0
    # EMA alpha .5: 10 -> 15 -> 22.5 -> 31.25
    assert PairHistory("ema", alpha=0.5).fit(SERIES).predict(*q)[0] == pytest.approx(31.25)
    # window of the last 2: (30 + 40) / 2
    assert PairHistory("window_mean", window=2).fit(SERIES).predict(*q)[0] == pytest.approx(35.0)
    np.testing.assert_array_equal(PairHistory().fit(SERIES).coverage(*q), [True, True, False])


def test_pair_history_quantiles_and_smoothed_failure_rate_by_hand():
    m = PairHistory().fit(SERIES)
    # [10,20,30,40] at .25 -> position .75 -> 17.5
    assert m.predict_quantiles(["a"], ["b"], [0.25, 0.5])[0].tolist() == [17.5, 25.0]
    # global failure rate 1/7; a->b: (1 + 1/7) / (5 + 1); a->c: (0 + 1/7) / (2 + 1)
    p = m.predict_p_failed(["a", "a", "b"], ["b", "c", "a"])
    np.testing.assert_allclose(p[:2], [(8 / 7) / 6, (1 / 7) / 3])
    assert math.isnan(p[2])


def test_last_seen_breaks_time_ties_by_input_order():
    obs = Observations(["a", "a"], ["b", "b"], [5.0, 7.0], [1, 1])
    assert PairHistory("last").fit(obs).predict(["a"], ["b"])[0] == 7.0


def test_global_and_destination_medians_by_hand():
    g = GlobalMedian().fit(SERIES)
    assert g.median_ms == 35.0 and g.p_failed == pytest.approx(1 / 7)
    assert g.coverage(["x"], ["y"]).all() and g.predict(["x"], ["y"])[0] == 35.0
    d = DestinationMedian().fit(SERIES)
    np.testing.assert_allclose(d.predict(["zz", "q", "a"], ["b", "c", "a"]), [25, 150, np.nan])


def test_with_fallback_fills_only_the_gaps():
    np.testing.assert_array_equal(with_fallback([1.0, np.nan], 9.0), [1.0, 9.0])


def test_fit_refuses_a_train_split_without_any_successful_ping():
    with pytest.raises(InputError, match="no successful"):
        GlobalMedian().fit(Observations(["a"], ["b"], [-1.0]))


# ----------------------------------------------------------------------------- prefix neighbour


def test_prefix_ladder_on_hand_made_addresses():
    train = Observations(
        ["10.0.0.1", "10.0.0.2", "10.0.1.1", "10.9.9.9", "2001:db8::1"],
        ["192.168.1.1", "192.168.1.2", "192.168.2.1", "192.9.9.9", "2001:db8:1::1"],
        [10.0, 20.0, 50.0, 100.0, 7.0])
    m = PrefixNeighbour().fit(train)
    src = ["10.0.0.1", "10.0.0.3", "10.0.7.7", "10.200.0.1", "11.0.0.1",
           "2001:db8::5", "2001:db8:0:5::1", "not-an-ip"]
    dst = ["192.168.1.1", "192.168.1.9", "192.168.7.7", "192.1.1.1", "192.168.1.1",
           "2001:db8:1::7", "2001:db8:1:5::1", "192.168.1.1"]
    # exact pair; the two /24s hold {10, 20}; the /16s {10, 20, 50}; the /8s all four;
    # 11/8 was never a source; the /64s and then the /48s of the IPv6 pair; garbage
    np.testing.assert_allclose(m.predict(src, dst), [10, 15, 20, 35, np.nan, 7, 7, np.nan])
    np.testing.assert_array_equal(m.predict_level(src, dst), [32, 24, 16, 8, -1, 64, 48, -1])
    np.testing.assert_array_equal(m.coverage(src, dst), [1, 1, 1, 1, 0, 1, 1, 0])


def test_prefix_neighbour_needs_ip_addresses_to_fit():
    with pytest.raises(InputError, match="IP addresses"):
        PrefixNeighbour().fit(Observations(["n1"], ["n2"], [1.0]))


# ----------------------------------------------------------------------------- matrix factorisation


def _matrix_obs(X, mask):
    n = X.shape[0]
    names = np.array([f"h{k}" for k in range(n)])
    i, j = np.nonzero(mask)
    return Observations(names[i], names[j], X[i, j]), names


def test_biased_mf_recovers_a_noiseless_low_rank_matrix_with_biases_exactly():
    rng = np.random.default_rng(0)
    n = 30
    X = (100 + rng.normal(0, 5, n)[:, None] + rng.normal(0, 5, n)[None, :]
         + rng.normal(0, 1, (n, 3)) @ rng.normal(0, 1, (n, 3)).T)
    seen = np.random.default_rng(1).random((n, n)) < 0.7
    train, names = _matrix_obs(X, seen)
    m = BiasedMF(rank=3, lam=1e-9, iters=50, target="linear").fit(train)
    i, j = np.nonzero(~seen)
    np.testing.assert_allclose(m.predict(names[i], names[j]), X[i, j], atol=1e-4)


def test_log_target_makes_multiplicative_rtts_a_pure_bias_model():
    # x_ij = a_i * b_j is log-additive: rank 0 under the log target fits it exactly, while the
    # linear target's additive biases cannot
    rng = np.random.default_rng(2)
    n = 20
    X = rng.uniform(5, 50, n)[:, None] * rng.uniform(1, 10, n)[None, :]
    seen = np.random.default_rng(3).random((n, n)) < 0.6
    train, names = _matrix_obs(X, seen)
    i, j = np.nonzero(~seen)
    log_fit = BiasedMF(rank=0, lam=1e-9, iters=50, target="log").fit(train)
    lin_fit = BiasedMF(rank=0, lam=1e-9, iters=5, target="linear").fit(train)
    np.testing.assert_allclose(log_fit.predict(names[i], names[j]), X[i, j], rtol=1e-6)
    assert np.median(np.abs(lin_fit.predict(names[i], names[j]) / X[i, j] - 1)) > 0.05


def test_dmfsgd_recovers_a_noiseless_nonnegative_low_rank_matrix():
    rng = np.random.default_rng(4)
    n = 30
    X = 10 * rng.uniform(0.5, 1.5, (n, 3)) @ rng.uniform(0.5, 1.5, (n, 3)).T
    seen = np.random.default_rng(5).random((n, n)) < 0.5
    train, names = _matrix_obs(X, seen)
    m = DMFSGD(rank=3, loss="l2", lam=0.0, lr=0.01, epochs=2000, batch_size=64,
               target="linear").fit(train)
    i, j = np.nonzero(~seen)
    rel = np.abs(m.predict(names[i], names[j]) / X[i, j] - 1)
    assert rel.max() < 1e-3


def test_matrix_models_cover_only_seen_sources_and_destinations():
    obs = Observations(["a", "a", "b"], ["c", "d", "c"], [10.0, 20.0, 30.0])
    for m in (DMFSGD(rank=2, epochs=5), BiasedMF(rank=2, iters=2)):
        m.fit(obs)
        # b->d is a new pair of known nodes; c never probed; x is unknown
        cov = m.coverage(["b", "c", "x"], ["d", "a", "c"])
        np.testing.assert_array_equal(cov, [True, False, False])
        p = m.predict(["b", "c"], ["d", "a"])
        assert np.isfinite(p[0]) and p[0] > 0 and np.isnan(p[1])


# ----------------------------------------------------------------------------- Vivaldi


def test_one_vivaldi_update_matches_serf_formulas_by_hand():
    # a pings b once, 100 ms, both at the origin (height 1e-5 s, error 1.5, adjustment 0)
    # dist = 2e-5; wrongness = |2e-5 - .1| / .1; weight = 1.5 / 3 = .5
    # error = .25*.5*wrongness + 1.5*(1 - .125); force = .25*.5*(.1 - 2e-5), random direction
    # adjustment sample = .1 - (force + 2e-5), adjustment = sample / (2 * 20)
    # gravity: d0 = force + 2e-5 + adjustment, |v| shrinks by (d0 / 150)^2; height stays 1e-5
    m = Vivaldi(passive="none").fit(Observations(["a"], ["b"], [100.0]))
    a = list(m._nodes).index("a")
    force = 0.125 * (0.1 - 2e-5)
    adj = (0.1 - (force + 2e-5)) / 40
    assert m.error_[a] == pytest.approx(0.125 * abs(2e-5 - 0.1) / 0.1 + 1.5 * 0.875, rel=1e-12)
    assert m.adjustment_[a] == pytest.approx(adj, rel=1e-12)
    assert m.height_[a] == pytest.approx(1e-5, rel=1e-12)
    assert np.linalg.norm(m.vec_[a]) == pytest.approx(
        force - ((force + 2e-5 + adj) / 150) ** 2, abs=1e-15)
    # b is passive and "none" leaves it at the origin; distance = |v_a| + heights + adjustment
    expected = (np.linalg.norm(m.vec_[a]) + 2e-5 + adj) * 1000
    assert m.predict(["a"], ["b"])[0] == pytest.approx(expected, rel=1e-12)


def test_vivaldi_latency_filter_hides_a_single_spike_behind_the_median_of_three():
    # filtered samples for [100, 100, 9000, 100] ms: 100, upper median of [100, 100] = 100,
    # median [100, 100, 9000] = 100, median [100, 9000, 100] = 100: identical to no spike at all.
    # Without the filter (size 1) the 9 s sample moves the coordinate.
    def fit(rtts, size):
        cfg = VivaldiConfig(latency_filter_size=size)
        obs = Observations(["a"] * 4, ["b"] * 4, rtts, [0, 1, 2, 3])
        return Vivaldi(config=cfg, passive="none").fit(obs).predict(["a"], ["b"])[0]

    spike, flat = [100.0, 100.0, 9000.0, 100.0], [100.0] * 4
    assert fit(spike, 3) == fit(flat, 3)
    assert fit(spike, 1) > fit(flat, 1) + 100


def test_passive_destinations_get_a_coordinate_only_with_reciprocal_updates():
    obs = Observations(["a", "c"] * 50, ["b", "b"] * 50, [50.0, 80.0] * 50, np.arange(100))
    for mode, moved in (("reciprocal", True), ("none", False)):
        m = Vivaldi(passive=mode).fit(obs)
        b = list(m._nodes).index("b")
        assert (np.linalg.norm(m.vec_[b]) > 0) == moved


# Serf's coordinate/performance_test.go: 1000 cycles in which every node pings a random other
# node, then relative error |est - true| / true over all pairs. Serf's bounds were set just above
# what Go's seed-1 random stream gives; ours is a different stream, so each check runs 5 seeds and
# the median over seeds must meet Serf's bound (single seeds scatter around it: e.g. line avg
# 0.0006-0.0035 over 12 seeds against Serf's 0.0031).


def _simulate(truth, seed, cycles=1000, dims=8):
    n = len(truth)
    rng = np.random.default_rng(seed)
    j = rng.integers(0, n, size=(cycles, n))
    i = np.broadcast_to(np.arange(n), (cycles, n))
    keep = i != j
    i, j = i[keep], j[keep]
    names = np.array([f"node_{k}" for k in range(n)])
    obs = Observations(names[i], names[j], truth[i, j], np.arange(len(i)))
    m = Vivaldi(config=VivaldiConfig(dimensionality=dims), seed=seed).fit(obs)
    iu, ju = np.triu_indices(n, 1)
    err = np.abs(m.predict(names[iu], names[ju]) - truth[iu, ju]) / truth[iu, ju]
    return m, err.mean(), err.max()


def _median_over_seeds(truth, dims=8):
    stats = np.array([_simulate(truth, s, dims=dims)[1:] for s in range(5)])
    return np.median(stats, axis=0)


def test_vivaldi_line_matches_serf_tolerances():
    x = np.arange(10) * 10.0  # 10 nodes 10 ms apart on a line
    avg, mx = _median_over_seeds(np.abs(x[:, None] - x[None, :]))
    assert avg <= 0.0031 and mx <= 0.0130


def test_vivaldi_grid_matches_serf_tolerances():
    k = np.arange(25)
    xy = np.c_[k % 5, k // 5] * 10.0  # 5x5 grid, 10 ms spacing
    avg, mx = _median_over_seeds(np.linalg.norm(xy[:, None] - xy[None], axis=2))
    assert avg <= 0.0016 and mx <= 0.0230


def test_vivaldi_split_matches_serf_tolerances():
    side = np.arange(25) > 12  # two LANs (1 ms) joined by a 10 ms WAN, as Serf's GenerateSplit
    truth = 1.0 + 10.0 * (side[:, None] != side[None, :])
    avg, mx = _median_over_seeds(truth)
    assert avg <= 0.000060 and mx <= 0.00048


def test_vivaldi_random_matrix_matches_serf_tolerances():
    rng = np.random.default_rng(1)  # 25 nodes, symmetric N(100 ms, 10 ms) delays
    truth = np.zeros((25, 25))
    iu = np.triu_indices(25, 1)
    truth[iu] = rng.normal(100.0, 10.0, len(iu[0]))
    avg, mx = _median_over_seeds(truth + truth.T)
    assert avg <= 0.075 and mx <= 0.33


def test_vivaldi_height_puts_the_equidistant_node_above_the_circle():
    # Serf's Height check: 24 nodes on a circle of radius 100 ms in 2-D, node 0 at 200 ms from
    # all. Serf wants node 0's height >= .97 r, the others <= .03 r, avg err <= .0028, max <= .064.
    # Over our seeds the avg is .0023-.0036 (median .0031) and others' max height .022-.035 r, so
    # the error and flat-node bounds get 30% slack; the height separation itself is Serf's.
    th = 2 * np.pi * np.arange(25) / 25
    xy = np.c_[np.cos(th), np.sin(th)]
    truth = np.linalg.norm(xy[:, None] - xy[None], axis=2) * 100.0
    truth[0, :] = truth[:, 0] = 200.0
    results = [_simulate(truth, s, dims=2) for s in range(5)]
    h0, h_other = [], []
    for m, _, _ in results:
        names = list(m._nodes)
        h0.append(m.height_[names.index("node_0")])
        h_other.append(max(m.height_[k] for k, nm in enumerate(names) if nm != "node_0"))
    assert np.median(h0) >= 0.97 * 0.1 and np.median(h_other) <= 0.03 * 0.1 * 1.3
    avg, mx = np.median([r[1:] for r in results], axis=0)
    assert avg <= 0.0028 * 1.3 and mx <= 0.064 * 1.3


# ----------------------------------------------------------------------------- real data


def _seattle(shared_data):
    path = shared_data / "netlatency_seattle_planetlab" / "seattle_median_over_time.tsv.gz"
    with gzip.open(path, "rt") as f:
        rows = [[np.nan if v == "NA" else float(v) for v in line.split()]
                for line in f if not line.startswith("#")]
    X = np.array(rows) * 1000.0  # the file is in seconds
    np.fill_diagonal(X, np.nan)
    return X


def test_vivaldi_dmfsgd_and_biased_mf_beat_the_global_median_on_seattle_held_out_pairs(
        shared_data):
    X = _seattle(shared_data)
    n = len(X)
    names = np.array([f"s{k}" for k in range(n)])
    i, j = np.nonzero(np.isfinite(X) & (X > 0))
    test = np.random.default_rng(0).random(len(i)) < 0.2
    tr_i, tr_j = i[~test], j[~test]
    pairs = Observations(names[tr_i], names[tr_j], X[tr_i, tr_j])
    # Vivaldi learns from a stream: 300 Serf-style cycles, each node pings a random train peer
    rng = np.random.default_rng(0)
    peers = [tr_j[tr_i == k] for k in range(n)]
    src = np.tile(np.arange(n), 300)
    dst = np.array([peers[k][rng.integers(len(peers[k]))] for k in src])
    stream = Observations(names[src], names[dst], X[src, dst], np.arange(len(src)))
    y = X[i[test], j[test]]
    qs, qd = names[i[test]], names[j[test]]
    gm = GlobalMedian().fit(pairs)
    base = M.point_error_summary(gm.predict(qs, qd), y)
    for m, data in ((Vivaldi(), stream), (DMFSGD(), pairs), (BiasedMF(), pairs)):
        m.fit(data)
        assert m.coverage(qs, qd).all()
        s = M.point_error_summary(m.predict(qs, qd), y)
        # measured (seed 0): global 100 ms / rel .51; Vivaldi ~39 / .24; DMFSGD ~16 / .12;
        # BiasedMF ~19 / .14
        assert s["median_ae_ms"] < 0.5 * base["median_ae_ms"], type(m).__name__
        assert s["rel_p50"] < 0.5 * base["rel_p50"], type(m).__name__


def _menog_slice(shared_data, n_lines=4000):
    """A few thousand RIPE Atlas results parsed directly (public `from` address as source)."""
    src, dst, rtt, t = [], [], [], []
    with gzip.open(shared_data / "ripe_atlas_menog_2019" / "raw.jsonl.gz", "rt") as f:
        for k, line in enumerate(f):
            if k >= n_lines:
                break
            r = json.loads(line)
            if not r.get("dst_addr") or not r.get("from"):
                continue
            for e in r.get("result") or []:
                if "dup" in e:
                    continue
                x = float(e["rtt"]) if "rtt" in e else -1.0
                src.append(r["from"])
                dst.append(r["dst_addr"])
                rtt.append(x)
                t.append(r["timestamp"])
    return Observations(src, dst, rtt, t)


def test_all_baselines_fit_real_ripe_pings_and_history_beats_the_global_median(shared_data):
    obs = _menog_slice(shared_data)
    cut = np.quantile(obs.time, 0.8)
    tr = obs.time <= cut
    train = Observations(obs.src[tr], obs.dst[tr], obs.rtt[tr], obs.time[tr])
    te = ~tr & obs.ok
    qs, qd, y = obs.src[te], obs.dst[te], obs.rtt[te]
    models = {name: m.fit(train) for name, m in make_baselines().items()}
    fallback = models["global_median"].median_ms
    err = {}
    for name, m in models.items():
        cov = m.coverage(qs, qd)
        p = m.predict(qs, qd)
        assert np.array_equal(np.isfinite(p), cov), name
        err[name] = M.point_error_summary(with_fallback(p, fallback), y)["median_ae_ms"]
    assert err["pair_median"] < err["global_median"]
    assert err["prefix_nn"] < err["global_median"]
    # failure probabilities rank the held-out failures better than chance
    fail_q = ~tr
    p_fail = with_fallback(models["pair_median"].predict_p_failed(obs.src[fail_q],
                                                                  obs.dst[fail_q]),
                           models["global_median"].p_failed)
    assert M.roc_auc(p_fail, ~obs.ok[fail_q]) > 0.55
