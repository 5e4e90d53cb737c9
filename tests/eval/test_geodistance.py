"""eval.geodistance: the geolocation-distance baseline, on hand-made pings and on real ones."""

from __future__ import annotations

import gzip
import json
import math

import numpy as np
import pytest

from ping_llm.data.geo import GeoDB
from ping_llm.data.observations import Observations, SourceContext
from ping_llm.errors import InputError
from ping_llm.eval.baselines import GlobalMedian
from ping_llm.eval.geodistance import GeoDistance

AMS = "193.0.14.129"  # k-root, RIPE NCC Amsterdam (5 km radius)
NL = "195.20.44.123"  # Netherlands, ~3 km from AMS
DE = "188.40.131.135"  # Germany, ~340 km from AMS
DXB = "94.204.244.170"  # Dubai, ~5160 km from AMS, ~4820 km from DE
KWI = "212.43.17.251"  # Kuwait City, ~4000 km from DE, ~10650 km from US
US = "67.227.226.240"  # Lansing, Michigan, ~11400 km from DXB
PRIVATE = ["10.0.0.1", "192.168.1.1", "fd00::1"]


@pytest.fixture(scope="module")
def db():
    return GeoDB.open()


# ----------------------------------------------------------------------------- the baseline

# rtt grows with distance: ~3 km -> 1..3 ms, 340 km -> 8..10 (+ 1 failure), 5160 km -> 110..130,
# 11400 km -> 230..250; the 500 ms ping to a private address is never located and never fitted.
TRAIN = Observations(
    [AMS] * 3 + [AMS] * 4 + [AMS] * 3 + [DXB] * 3 + [AMS],
    [NL] * 3 + [DE] * 4 + [DXB] * 3 + [US] * 3 + ["10.0.0.1"],
    [1, 2, 3, 8, 9, 10, -1, 110, 120, 130, 230, 240, 250, 500],
)


def test_farther_pairs_get_larger_rtt_even_for_pairs_never_seen(db):
    m = GeoDistance(db, min_count=1).fit(TRAIN)
    # unseen pairs: NL-AMS 3 km, DE-KWI 4000 km, KWI-US 10650 km
    p = m.predict([NL, DE, KWI], [AMS, KWI, US])
    np.testing.assert_allclose(p, [2.0, 120.0, 240.0])
    assert np.all(np.diff(p) > 0)


def test_coverage_needs_both_ends_located(db):
    m = GeoDistance(db, min_count=1).fit(TRAIN)
    src, dst = [AMS, AMS, "10.0.0.1", "fd00::1", "bogus"], [DXB, "192.168.1.1", DXB, AMS, AMS]
    np.testing.assert_array_equal(m.coverage(src, dst), [True, False, False, False, False])
    assert np.array_equal(np.isfinite(m.predict(src, dst)), m.coverage(src, dst))
    assert np.isnan(m.predict_quantiles(src, dst, [0.1, 0.9])[1:]).all()
    assert np.isnan(m.predict_p_failed(src, dst)[1:]).all()


def test_quantiles_and_failure_rates_per_distance_bin_by_hand(db):
    m = GeoDistance(db, min_count=1).fit(TRAIN)
    # [1, 2, 3] at .25 -> position .5 -> 1.5, like np.quantile (and baselines._Groups)
    np.testing.assert_allclose(m.predict_quantiles([NL], [AMS], [0.0, 0.25, 0.5, 1.0]),
                               [[1.0, 1.5, 2.0, 3.0]])
    # global failure rate 1/14 (the unlocated ping counts there); the 200-400 km bin has 1 of 4
    p = m.predict_p_failed([AMS, AMS], [DE, NL])
    np.testing.assert_allclose(p, [(1 + 1 / 14) / (4 + 1), (0 + 1 / 14) / (3 + 1)])
    with pytest.raises(InputError):
        m.predict_quantiles([AMS], [DE], [0.5, 1.5])


def test_sparse_bins_merge_outward_and_too_few_fall_back_to_all_located_pings(db):
    m = GeoDistance(db, min_count=4).fit(TRAIN)  # 3 per bin: pairs of bins merge
    assert m.group_edges_km == [(0.0, 400.0), (400.0, math.inf)]
    np.testing.assert_allclose(m.predict([NL, DE], [AMS, KWI]), [5.5, 180.0])
    one = GeoDistance(db, min_count=100).fit(TRAIN)
    assert one.group_edges_km == [(0.0, math.inf)]
    # median of the 12 located successes: (10 + 110) / 2; the 500 ms private ping is not in it
    np.testing.assert_allclose(one.predict([NL, KWI], [AMS, US]), [60.0, 60.0])


def test_nothing_located_in_train_covers_nothing(db):
    m = GeoDistance(db).fit(Observations(PRIVATE, PRIVATE[::-1], [5.0, 6.0, -1.0]))
    assert not m.coverage([AMS], [DXB]).any() and np.isnan(m.predict([AMS], [DXB])).all()


def test_fit_opens_the_packaged_database_lazily():
    m = GeoDistance()
    assert m.db is None
    m.fit(TRAIN)
    assert m.db.name == "GeoLite2-City"


# ----------------------------------------------------------------------------- in context


def test_context_residual_scales_the_prediction(db):
    m = GeoDistance(db, min_count=1).fit(TRAIN)
    base = m.predict([DE], [KWI])[0]  # 120 ms from the 3200-6400 km bin
    # DE -> DXB is predicted 120 ms; observed 240 (2x): the source is twice as slow as distance says
    # -- and that factor carries to a near destination (DE -> NL, 9 ms), where +120 ms would not
    ctx = [SourceContext([DXB], [240.0])] * 2
    np.testing.assert_allclose(m.predict_in_context([DE, DE], [KWI, NL], ctx), [2 * base, 18.0])
    # the median ratio ignores one congested ping; failures and unlocated dsts are not usable
    ctx = [SourceContext([DXB, DXB, DXB, "10.0.0.1", DXB], [240.0, 240.0, 6000.0, 1.0, -1.0])]
    assert m.predict_in_context([DE], [KWI], ctx)[0] == pytest.approx(2 * base)
    # an even count: geometric mean of the middle two ratios (2x via NL at 9 ms, 8x via DXB)
    ctx = [SourceContext([NL, DXB], [18.0, 960.0])]
    assert m.predict_in_context([DE], [KWI], ctx)[0] == pytest.approx(4 * base)


def test_in_context_is_nan_where_the_caller_must_fall_back(db):
    m = GeoDistance(db, min_count=1).fit(TRAIN)
    ctx = [SourceContext([DXB], [240.0]),  # query pair not covered
           SourceContext(["10.0.0.1", DXB], [5.0, -1.0]),  # no usable context ping
           SourceContext([], []),  # no context at all
           SourceContext([AMS], [4.0])]  # usable: 3 km bin says 2 -> 2x
    out = m.predict_in_context([DE, DE, DE, NL], ["10.0.0.1", KWI, KWI, AMS], ctx)
    assert np.isnan(out[:3]).all() and out[3] == pytest.approx(4.0)
    with pytest.raises(InputError):
        m.predict_in_context([DE, DE], [KWI, KWI], ctx[:1])


# ----------------------------------------------------------------------------- real data


def test_on_real_ripe_atlas_pings_distance_beats_the_global_median(shared_data, db):
    src, dst, rtt, t = [], [], [], []
    with gzip.open(shared_data / "ripe_atlas_menog_2019" / "raw.jsonl.gz", "rt") as f:
        for k, line in enumerate(f):
            if k >= 20000:
                break
            r = json.loads(line)
            if r.get("from") and r.get("dst_addr") and r.get("min", -1) >= 0:
                src.append(r["from"])
                dst.append(r["dst_addr"])
                rtt.append(r["min"])
                t.append(r["timestamp"])
    obs = Observations(src, dst, rtt, t)
    tr = obs.time <= np.quantile(obs.time, 0.8)
    train = Observations(obs.src[tr], obs.dst[tr], obs.rtt[tr], obs.time[tr])
    qs, qd, y = obs.src[~tr], obs.dst[~tr], obs.rtt[~tr]
    m = GeoDistance(db).fit(train)
    cov = m.coverage(qs, qd)
    assert cov.mean() > 0.8
    q = m.predict_quantiles(qs[cov], qd[cov], [0.05, 0.5, 0.95])
    assert np.all(np.diff(q, axis=1) >= 0)
    geo_err = np.median(np.abs(q[:, 1] - y[cov]))
    glob_err = np.median(np.abs(GlobalMedian().fit(train).predict(qs[cov], qd[cov]) - y[cov]))
    assert geo_err < 0.6 * glob_err, (geo_err, glob_err)  # 28 vs 74 ms on this slice
