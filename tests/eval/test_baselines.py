"""Baselines on small known inputs (hand-made series, prefixes, low-rank matrices, in-context
fold-in, source offset and failure rates) and on real data (Seattle all-pairs matrix, a slice of
the MENOG RIPE Atlas pings). Serf's Vivaldi checks (in context too) are in test_vivaldi.py, the
Observations input in test_observations.py."""

from __future__ import annotations

import gzip
import json
import math

import numpy as np
import pytest

from ping_llm.data.observations import Observations, SourceContext
from ping_llm.errors import InputError
from ping_llm.eval import metrics as M
from ping_llm.eval.baselines import (
    ContextMedian,
    DestinationMedian,
    GlobalMedian,
    PairHistory,
    PrefixNeighbour,
    SourceFailureRate,
    SourceOffset,
    make_baselines,
    with_fallback,
)
from ping_llm.eval.factorise import DMFSGD, BiasedMF
from ping_llm.eval.vivaldi import Vivaldi

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


def test_dmfsgd_predicts_a_sub_millisecond_pair_below_1_ms():
    # two LANs (0.3 ms inside, 40 ms across); two intra-LAN pairs held out. Non-negative factors
    # of log(rtt) cannot go below exp(0) = 1 ms; of log1p(rtt) (the default) they can
    rng = np.random.default_rng(0)
    n = 20
    site = np.arange(n) >= 10
    X = np.where(site[:, None] == site[None], 0.3, 40.0) * rng.uniform(0.9, 1.1, (n, n))
    np.fill_diagonal(X, np.nan)
    held = np.zeros((n, n), dtype=bool)
    held[0, 1] = held[12, 15] = True
    train, names = _matrix_obs(X, np.isfinite(X) & ~held)
    q = names[[0, 12, 0]], names[[1, 15, 12]]
    p = DMFSGD().fit(train).predict(*q)
    assert (p[:2] < 1.0).all() and (p[:2] > 0).all() and 30 < p[2] < 50, p
    assert (DMFSGD(target="log").fit(train).predict(*q)[:2] >= 1.0 - 1e-12).all()


def _fold_in_queries(X, names, cold, n_warm, k):
    """Each cold row: k context entries to random warm columns, queries to 8 other ones."""
    qs, qd, ctxs, y = [], [], [], []
    for c in cold:
        perm = np.random.default_rng(int(c)).permutation(n_warm)
        ctx = SourceContext(names[perm[:k]], X[c, perm[:k]])
        for q in perm[-8:]:
            qs.append(names[c])
            qd.append(names[q])
            ctxs.append(ctx)
            y.append(X[c, q])
    return qs, qd, ctxs, np.array(y)


FOLD_MODELS = {  # planted matrix kind, model; both recover their noiseless matrix when fitted
    "dmfsgd": ("nonneg", lambda: DMFSGD(rank=3, loss="l2", lam=1e-3, lr=0.01, epochs=2000,
                                        batch_size=64, target="linear")),
    "biased_mf": ("biased", lambda: BiasedMF(rank=3, lam=1e-6, iters=50, target="linear")),
}


def _planted(kind, n=40):
    rng = np.random.default_rng(0)
    if kind == "nonneg":
        return 10 * rng.uniform(0.5, 1.5, (n, 3)) @ rng.uniform(0.5, 1.5, (n, 3)).T
    return (100 + rng.normal(0, 5, n)[:, None] + rng.normal(0, 5, n)[None, :]
            + rng.normal(0, 1, (n, 3)) @ rng.normal(0, 1, (n, 3)).T)


@pytest.mark.parametrize("name", sorted(FOLD_MODELS))
def test_mf_fold_in_error_shrinks_with_k_and_matches_a_fit_with_the_row(name):
    kind, make = FOLD_MODELS[name]
    X = _planted(kind)
    n, cold = len(X), np.arange(32, 40)
    seen = np.random.default_rng(1).random((n, n)) < 0.6
    seen[cold] = False
    train, names = _matrix_obs(X, seen)
    m = make().fit(train)
    err = {}
    for k in (0, 1, 2, 8):
        qs, qd, ctxs, y = _fold_in_queries(X, names, cold, 32, k)
        p = m.predict_in_context(qs, qd, ctxs)
        if k == 0:  # a cold source without context cannot be answered
            assert np.isnan(p).all()
            continue
        err[k] = np.median(np.abs(p / y - 1))
    # measured (k = 1, 2, 8): dmfsgd 6.8e-2, 2.3e-2, 7e-5; biased_mf 1.8e-2, 1.5e-2, 6e-6
    assert err[8] < err[2] < err[1] and err[8] < 1e-3, err
    # the same k = 8 entries given to the fit instead: predictions of the row's other entries
    # agree (the fit also moves the destination side a little; measured max 3e-4 / 2e-5)
    qs, qd, ctxs, y = _fold_in_queries(X, names, cold, 32, 8)
    with_row = seen.copy()
    for c, ctx in zip(qs[::8], ctxs[::8], strict=True):
        with_row[int(c[1:]), [int(d[1:]) for d in ctx.dst]] = True
    full = make().fit(_matrix_obs(X, with_row)[0]).predict(qs, qd)
    fold = m.predict_in_context(qs, qd, ctxs)
    assert np.max(np.abs(fold / full - 1)) < 5e-3


@pytest.mark.parametrize("make", [DMFSGD, BiasedMF])
def test_mf_in_context_keeps_a_train_source_and_refits_it_with_context(make):
    X = _planted("nonneg", 20)
    train, names = _matrix_obs(X, np.random.default_rng(2).random((20, 20)) < 0.5)
    m = make(rank=3).fit(train)
    empty = SourceContext([], [])
    np.testing.assert_array_equal(m.predict_in_context(names[:5], names[5:10], [empty] * 5),
                                  m.predict(names[:5], names[5:10]))
    # failed pings, unknown destinations and an unseen query destination: not used / NaN
    junk = SourceContext(["nowhere", "h3"], [10.0, -1.0])
    p = m.predict_in_context(["h0", "cold", "h0"], ["h1", "h1", "nowhere"], [junk] * 3)
    assert p[0] == m.predict(["h0"], ["h1"])[0] and np.isnan(p[1:]).all()
    ctx = SourceContext(names[10:16], X[0, 10:16])
    p = m.predict_in_context(["h0"], ["h1"], [ctx])[0]
    assert np.isfinite(p) and p != m.predict(["h0"], ["h1"])[0]
    again = make(rank=3).fit(train).predict_in_context(["h0"], ["h1"], [ctx])[0]
    assert p == again


def test_in_context_needs_one_source_context_per_query():
    m = SourceOffset().fit(SERIES)
    with pytest.raises(InputError, match="one SourceContext per query"):
        m.predict_in_context(["a", "a"], ["b", "c"], [SourceContext(["b"], [1.0])])
    with pytest.raises(InputError, match="SourceContext"):
        m.predict_in_context(["a"], ["b"], [(["b"], [1.0])])


# ----------------------------------------------------------------------------- source context


def test_source_offset_scales_the_destination_median_by_the_context_ratio_by_hand():
    # dst medians: b 25, c 150. Context of x: b at 50 (ratio 2), c at 600 (4), a failure, and an
    # unknown destination: exp(median(log 2, log 4)) = sqrt(8)
    m = SourceOffset().fit(SERIES)
    ctx = SourceContext(["b", "c", "b", "nowhere"], [50.0, 600.0, -1.0, 5.0])
    empty = SourceContext([], [])
    p = m.predict_in_context(["x", "x", "x", "y"], ["b", "c", "a", "c"], [ctx] * 3 + [empty])
    np.testing.assert_allclose(p, [25 * 8 ** 0.5, 150 * 8 ** 0.5, np.nan, 150])
    d = DestinationMedian().fit(SERIES)
    q = (["x", "x", "a"], ["b", "c", "a"])
    np.testing.assert_array_equal(m.predict(*q), d.predict(*q))
    np.testing.assert_array_equal(m.coverage(*q), d.coverage(*q))


def test_context_median_is_the_median_reply_of_the_context_whatever_the_destination():
    m = ContextMedian().fit(SERIES)
    ctx = SourceContext(["b", "c", "b", "z"], [50.0, 600.0, -1.0, 5.0])
    p = m.predict_in_context(["x", "x", "y", "w"], ["b", "q", "c", "c"],
                             [ctx, ctx, SourceContext([], []), SourceContext(["b"], [-1.0])])
    np.testing.assert_allclose(p, [50.0, 50.0, np.nan, np.nan])
    np.testing.assert_array_equal(m.predict(["x"], ["b"]), GlobalMedian().fit(SERIES).predict(
        ["x"], ["b"]))


def test_source_failure_rate_from_train_and_from_context_by_hand():
    # train: source a 1 failure in 7 (global 1/7), prior 1; b was never a source
    m = SourceFailureRate().fit(SERIES)
    g = 1 / 7
    assert m.p_failed_only
    np.testing.assert_array_equal(m.coverage(["a", "b"], ["b", "a"]), [True, False])
    np.testing.assert_allclose(m.predict(["a", "b"], ["b", "a"]), [35.0, np.nan])
    np.testing.assert_allclose(m.predict_p_failed(["a", "b"], ["b", "a"]),
                               [(1 + g) / 8, np.nan])
    ctx = SourceContext(["b", "c", "d"], [-1.0, 5.0, -1.0])
    p = m.p_failed_in_context(["x", "x", "a", "y"], ["b"] * 4,
                              [ctx, ctx, ctx, SourceContext([], [])])
    np.testing.assert_allclose(p, [(2 + g) / 4, (2 + g) / 4, (3 + g) / 11, g])


def test_make_baselines_registers_the_source_context_baselines():
    b = make_baselines()
    assert isinstance(b["source_offset"], SourceOffset)
    assert isinstance(b["source_failure_rate"], SourceFailureRate)
    using_context = {k for k, v in b.items() if hasattr(v, "predict_in_context")}
    assert using_context == {"vivaldi", "dmfsgd", "biased_mf", "source_offset", "context_median",
                             "geo"}
    assert {k for k, v in b.items() if getattr(v, "context_only", False)} == {"context_median"}
    assert {k for k, v in b.items() if getattr(v, "p_failed_only", False)} == {
        "source_failure_rate"}


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
