"""Vivaldi coordinates against Serf: one update by hand, the latency filter, passive destinations,
and Serf's own accuracy checks (line, grid, split LANs, random matrix, height)."""

from __future__ import annotations

import numpy as np
import pytest

from ping_llm.data.observations import Observations, SourceContext
from ping_llm.eval.vivaldi import Vivaldi, VivaldiConfig


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


# ----------------------------------------------------------------------------- in context


def _plane(seed=0, n=40, n_cold=10, cycles=300):
    """A planted 2-D world (RTT = Euclidean distance + 5 ms) and a Vivaldi fitted on Serf-style
    cycles among the first n - n_cold nodes; the last n_cold are cold sources."""
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 100, (n, 2))
    truth = np.linalg.norm(xy[:, None] - xy[None], axis=2) + 5.0
    names = np.array([f"n{k}" for k in range(n)])
    warm = np.arange(n - n_cold)
    src = np.tile(warm, cycles)
    dst = rng.choice(warm, len(src))
    keep = src != dst
    src, dst = src[keep], dst[keep]
    obs = Observations(names[src], names[dst], truth[src, dst], np.arange(len(src)))
    return Vivaldi().fit(obs), obs, truth, names, warm


def _cold_queries(truth, names, warm, cold, k):
    """Each cold source: k context pings to random warm nodes, queries to 14 other warm ones."""
    qs, qd, ctxs, y = [], [], [], []
    for c in cold:
        perm = np.random.default_rng(int(c)).permutation(warm)
        ctx = SourceContext(names[perm[:k]], truth[c, perm[:k]])
        for q in perm[16:]:
            qs.append(names[c])
            qd.append(names[q])
            ctxs.append(ctx)
            y.append(truth[c, q])
    return qs, qd, ctxs, np.array(y)


def test_vivaldi_new_node_error_shrinks_with_its_context_updates():
    m, _, truth, names, warm = _plane()
    cold = np.arange(30, 40)
    before = m.predict(names[warm], names[warm[::-1]]).copy()
    err = {}
    for k in (0, 4, 16):
        qs, qd, ctxs, y = _cold_queries(truth, names, warm, cold, k)
        p = m.predict_in_context(qs, qd, ctxs)
        err[k] = np.median(np.abs(p - y))
        if k == 0:  # Serf's NewCoordinate: origin, height HeightMin, no adjustment
            j = [list(m._nodes).index(d) for d in qd]
            raw = np.linalg.norm(m.vec_[j], axis=1) + 1e-5 + m.height_[j]
            adj = raw + m.adjustment_[j]
            np.testing.assert_allclose(p, np.where(adj > 0, adj, raw) * 1000, rtol=1e-12)
    # measured (seed 0): 26.4 ms at k=0, 16.8 at k=4, 2.5 at k=16
    assert err[16] < err[4] < err[0] and err[16] < 0.2 * err[0]
    # only the new node moved: the fitted model is untouched
    np.testing.assert_array_equal(m.predict(names[warm], names[warm[::-1]]), before)


def test_vivaldi_in_context_is_deterministic_and_independent_of_the_batch():
    m, _, truth, names, warm = _plane()
    qs, qd, ctxs, _ = _cold_queries(truth, names, warm, np.arange(30, 40), 8)
    p = m.predict_in_context(qs, qd, ctxs)
    np.testing.assert_array_equal(p, m.predict_in_context(qs, qd, ctxs))
    np.testing.assert_array_equal(p, _plane()[0].predict_in_context(qs, qd, ctxs))
    rev = m.predict_in_context(qs[::-1], qd[::-1], ctxs[::-1])[::-1]
    np.testing.assert_array_equal(p, rev)
    one = [m.predict_in_context([qs[n]], [qd[n]], [ctxs[n]])[0] for n in (0, 17, 60)]
    np.testing.assert_array_equal(one, p[[0, 17, 60]])


def test_vivaldi_context_updates_are_serf_updates_appended_to_the_train_stream():
    # every train node is a source, so no reciprocal updates: a source's context pings, replayed
    # after the train pings, are exactly what the fit does with them appended at the end --
    # for a cold node (from Serf's NewClient) and for a train node (its fitted state, latency
    # filter included: it pinged n3 before)
    m, obs, truth, names, _ = _plane()
    for s, cd in ((35, [3, 7, 3, 12]), (2, [3, 9, 5])):
        cd = np.array(cd)
        rtt = truth[s, cd] * np.array([1.0, 1.3, 0.8, 1.1][:len(cd)])
        t_end = obs.time.max() + 1 + np.arange(len(cd))
        more = Observations(np.r_[obs.src, [names[s]] * len(cd)], np.r_[obs.dst, names[cd]],
                            np.r_[obs.rtt, rtt], np.r_[obs.time, t_end])
        ref = Vivaldi().fit(more)
        q = names[[0, 1, 20, 29]]
        got = m.predict_in_context([names[s]] * 4, q, [SourceContext(names[cd], rtt)] * 4)
        np.testing.assert_allclose(got, ref.predict([names[s]] * 4, q), rtol=1e-12)


def test_vivaldi_in_context_skips_unusable_measurements_and_unknown_destinations():
    m, _, truth, names, _ = _plane()
    ctx = SourceContext(names[[3, 7]], truth[35, [3, 7]])
    noisy = SourceContext(["n3", "nowhere", "n9", "n7", "n31"],
                          [truth[35, 3], 20.0, -1.0, truth[35, 7], 30.0])  # n31: cold, no coord
    p = m.predict_in_context(["n35", "n35"], ["n0", "nowhere"], [noisy, noisy])
    assert p[0] == m.predict_in_context(["n35"], ["n0"], [ctx])[0] and np.isnan(p[1])
    # a known source without context answers exactly as predict
    np.testing.assert_array_equal(
        m.predict_in_context(["n2"], ["n0"], [SourceContext([], [])]), m.predict(["n2"], ["n0"]))
