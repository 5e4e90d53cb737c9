"""The geolocation-distance latency baseline: the RTT that pings over a similar distance take.

The first thing network people reach for when asked "how long from A to B?": look both addresses
up in a geolocation database (`data.geo.GeoDB`), take the great-circle distance, and read the RTT
off what the train split says pings over that distance take. It needs no measurement of either
end, so it covers cold sources and unseen pairs alike -- wherever both addresses are in the
database. `GeoDistance` has the interface of `eval.baselines` (fit / coverage / predict /
predict_quantiles / predict_p_failed, ms) plus `predict_in_context`, which rescales the distance
prediction by the source's own median residual over its context measurements.
"""

from __future__ import annotations

import numpy as np

from ping_llm.data.geo import GeoDB, great_circle_km
from ping_llm.data.observations import Observations, SourceContext, as_str_array, require_success
from ping_llm.errors import InputError

LOG_FLOOR_MS = 0.01  # an RTT of 0 ms (clock granularity) must not make log(ratio) infinite


# Distance bins, km: 0-50, then doubling 50-100, ..., 6400-12800, and 12800 up to the antipode
# (pi R ~ 20015 km). Below ~50 km propagation is < 0.5 ms of RTT (fibre ~ 100 km per ms RTT),
# smaller than access delay and than a city-level geolocation error, so finer bins fit noise.
# Doubling keeps each bin's relative width constant: within a bin the propagation delay varies by
# at most 2x, whether the bin is regional (where most pings are) or intercontinental.
DEFAULT_EDGES_KM = (0.0, 50.0, 100.0, 200.0, 400.0, 800.0, 1600.0, 3200.0, 6400.0, 12800.0)


class GeoDistance:
    """Median train RTT of pings over a similar great-circle distance.

    fit: every train ping whose two ends are both located goes to its distance bin; bins with
    fewer than `min_count` successful pings are merged with the next farther bin (a sparse last
    bin with the previous one; if all located pings together are fewer, one bin holds them all).
    Per merged bin: the sorted successful RTTs (median, quantiles by linear interpolation, as
    np.quantile's default and baselines._Groups) and the failure rate over all its pings shrunk
    toward the train failure rate with `prior` pseudo-pings (as baselines._FailureRates).
    coverage: both addresses located (and at least one located successful train ping).
    """

    def __init__(self, db: GeoDB | None = None, edges_km=DEFAULT_EDGES_KM, min_count: int = 50,
                 prior: float = 1.0):
        e = np.asarray(edges_km, np.float64)
        if e.ndim != 1 or len(e) < 1 or e[0] != 0 or np.any(np.diff(e) <= 0):
            raise InputError("edges_km must start at 0 and increase strictly")
        if min_count < 1 or prior < 0:
            raise InputError("need min_count >= 1, prior >= 0")
        self.db, self.edges_km, self.min_count, self.prior = db, e, min_count, prior

    def _distance(self, src, dst) -> np.ndarray:
        """Great-circle km per pair, NaN where either end is not located."""
        s, d = self.db.locate(src), self.db.locate(dst)
        if len(s["lat"]) != len(d["lat"]):
            raise InputError("src and dst must have the same length")
        return great_circle_km(s["lat"], s["lon"], d["lat"], d["lon"])

    def _group(self, km: np.ndarray) -> np.ndarray:
        """Merged-bin index per distance, -1 where the distance is unknown or nothing was fit."""
        if len(self._values) == 0:
            return np.full(len(km), -1)
        raw = np.searchsorted(self.edges_km, np.nan_to_num(km, nan=0.0), side="right") - 1
        return np.where(np.isfinite(km), self._bin_group[raw], -1)

    def fit(self, train: Observations) -> GeoDistance:
        require_success(train)
        if self.db is None:
            self.db = GeoDB.open()
        node = self.db.locate(train.nodes)
        i, j = train.src_id, train.dst_id
        km = great_circle_km(node["lat"][i], node["lon"][i], node["lat"][j], node["lon"][j])
        located, ok = np.isfinite(km), train.ok
        raw = np.searchsorted(self.edges_km, km[located], side="right") - 1
        counts = np.bincount(raw[ok[located]], minlength=len(self.edges_km))
        # walk outward, closing a group once it holds min_count successful pings
        self._bin_group, g, acc = np.zeros(len(self.edges_km), np.int64), 0, 0
        for b, c in enumerate(counts):
            self._bin_group[b], acc = g, acc + c
            if acc >= self.min_count:
                g, acc = g + 1, 0
        if acc < self.min_count and g > 0:  # a sparse (or empty) tail joins the previous group
            self._bin_group[self._bin_group == g] = g - 1
        n_groups = int(self._bin_group.max()) + 1 if counts.sum() else 0
        grp = self._bin_group[raw]
        rtt = train.rtt[located]
        self._values = [np.sort(rtt[ok[located] & (grp == k)]) for k in range(n_groups)]
        n = np.bincount(grp, minlength=n_groups)[:n_groups]
        f = np.bincount(grp, weights=(~ok[located]).astype(np.float64), minlength=n_groups)
        glob = float(1 - ok.mean())
        self._p_failed = (f[:n_groups] + self.prior * glob) / (n + self.prior)
        upper = np.r_[self.edges_km[1:], np.inf]
        self.group_edges_km = [(float(self.edges_km[self._bin_group == k].min()),
                                float(upper[self._bin_group == k].max())) for k in range(n_groups)]
        return self

    def coverage(self, src, dst) -> np.ndarray:
        return self._group(self._distance(src, dst)) >= 0

    def predict_quantiles(self, src, dst, levels) -> np.ndarray:
        t = np.asarray(levels, dtype=np.float64)
        if t.ndim != 1 or np.any((t < 0) | (t > 1)):
            raise InputError("levels must be a 1-D array in [0, 1]")
        g = self._group(self._distance(src, dst))
        out = np.full((len(g), len(t)), np.nan)
        for k, vals in enumerate(self._values):
            if (g == k).any():
                out[g == k] = np.quantile(vals, t)
        return out

    def predict(self, src, dst) -> np.ndarray:
        return self.predict_quantiles(src, dst, [0.5])[:, 0]

    def predict_p_failed(self, src, dst) -> np.ndarray:
        g = self._group(self._distance(src, dst))
        return np.where(g >= 0, self._p_failed[np.maximum(g, 0)], np.nan)

    def predict_in_context(self, src, dst, contexts: list[SourceContext]) -> np.ndarray:
        """Geo prediction x exp(median over the context's successful, covered measurements of
        log(observed rtt / geo prediction for (src, context dst))).

        Multiplicative, because what a distance bin misses about one source mostly scales: a slow
        access link or a detouring upstream inflates every path by a similar factor (routes are
        ~1.5-3x the great-circle path), so a ratio learnt on one destination transfers to another
        at a different distance where an additive ms offset would not. The median of the logs is
        robust to one congested context ping (with an even count: the geometric mean of the
        middle two ratios). NaN where the query pair is not covered or no context ping is usable.
        """
        src, dst = as_str_array(src, "src"), as_str_array(dst, "dst")
        if len(contexts) != len(src) or not all(isinstance(c, SourceContext) for c in contexts):
            raise InputError("contexts must be a list of one SourceContext per query")
        q = np.repeat(np.arange(len(src)), [len(c) for c in contexts])
        c_dst = np.concatenate([c.dst for c in contexts] + [np.zeros(0, dtype=str)])
        c_rtt = np.concatenate([c.rtt for c in contexts] + [np.zeros(0)])
        ok = c_rtt >= 0
        q, c_dst, c_rtt = q[ok], c_dst[ok], c_rtt[ok]
        ref = self.predict(src[q], c_dst) if len(q) else np.zeros(0)
        use = np.isfinite(ref)
        q = q[use]
        r = np.log(np.maximum(c_rtt[use], LOG_FLOOR_MS) / np.maximum(ref[use], LOG_FLOOR_MS))
        log_resid = np.full(len(src), np.nan)
        order = np.lexsort((r, q))
        q, r = q[order], r[order]
        starts = np.flatnonzero(np.r_[True, q[1:] != q[:-1]]) if len(q) else np.zeros(0, int)
        counts = np.diff(np.r_[starts, len(q)])
        lo, hi = starts + (counts - 1) // 2, starts + counts // 2
        log_resid[q[starts]] = (r[lo] + r[hi]) / 2
        return self.predict(src, dst) * np.exp(log_resid)
