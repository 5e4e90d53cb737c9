"""Classic latency predictors fitted on exactly a train split, for the leak-free comparison.

Every baseline is a plain class with the same duck-typed methods (no base class):
  fit(train: Observations) -> self
  predict(src, dst) -> (N,) float64 predicted median RTT in ms, NaN where it cannot predict
  coverage(src, dst) -> (N,) bool, True where `predict` is defined
and, where the method has them, `predict_quantiles(src, dst, levels) -> (N, Q)` (empirical
quantiles of the train RTTs it would take the median of; NaN where uncovered) and
`predict_p_failed(src, dst) -> (N,)` (smoothed train failure rate; NaN where never seen).
Results are reported both "covered only" and "with fallback": `with_fallback` fills the gaps with
the train global median (`GlobalMedian`), so every method answers every query.

In-context protocol (`ping_llm.data.observations.SourceContext`): when a query's source brings k
context measurements (its own pings to other destinations, oldest first; the same k the model is
given), every baseline that can use them has `predict_in_context(src, dst, contexts)` -> (N,)
medians (NaN where it cannot answer), and where meaningful `p_failed_in_context(src, dst,
contexts)` -> (N,): Vivaldi (Serf updates of the new node), DMFSGD and BiasedMF (fold-in of the
source side), SourceOffset (destination median times the source's context ratio) and
SourceFailureRate (P(failed) from train + context counts). The others (history, prefix, global)
do not depend on the source's other destinations and answer as without context.

This module holds the history, prefix and source-context baselines and `make_baselines` (the
whole comparison under its report names). The train split they fit on, `Observations`, lives in
`data.observations`; Vivaldi, whose Serf update rule is long, in `eval.vivaldi`; DMFSGD
and BiasedMF in `eval.factorise` (re-exported here).

Node identity is the address string (the canonical table's src_addr / dst_addr); the node set is
the union of sources and destinations. Failed pings (rtt < 0, canonically -1.0) never enter an RTT
fit; they only feed the failure rates. What each method cannot predict (its coverage):
- GlobalMedian: everything (it is the fallback).
- PairHistory (median / last / EMA / window mean): pairs with >= 1 successful train ping.
- DestinationMedian, SourceOffset: destinations with >= 1 successful train ping.
- PrefixNeighbour: pairs whose addresses share at least the shortest ladder prefix (/8 IPv4,
  /32 IPv6) with a train pair on both ends.
- Vivaldi (`ping_llm.eval.vivaldi`): pairs whose two nodes both appear in a valid successful train
  ping.
- DMFSGD, BiasedMF (`ping_llm.eval.factorise`): source seen as a source and destination seen as a
  destination in train.
- SourceFailureRate: sources seen as a train source. It predicts P(failed) only
  (`p_failed_only = True`); its RTT "prediction" is the global median, so hide its RTT columns.
"""

from __future__ import annotations

import ipaddress

import numpy as np

from ping_llm.data.geo import GeoDB
from ping_llm.data.observations import (
    Observations,
    as_str_array,
    group_contexts,
    lookup,
    require_success,
)
from ping_llm.errors import InputError
from ping_llm.eval.factorise import DMFSGD, BiasedMF
from ping_llm.eval.geodistance import GeoDistance
from ping_llm.eval.vivaldi import Vivaldi


def _pair_keys(i: np.ndarray, j: np.ndarray, n: int) -> np.ndarray:
    return np.where((i >= 0) & (j >= 0), i * n + j, -1)


def with_fallback(pred, fallback) -> np.ndarray:
    """`pred` with NaNs replaced by `fallback` (a scalar such as GlobalMedian().median_ms, or an
    array of the same length)."""
    p = np.asarray(pred, dtype=np.float64)
    return np.where(np.isnan(p), fallback, p)


class _Groups:
    """Values grouped by non-negative integer key, sorted by (key, value), for exact medians and
    quantiles per group (linear interpolation, the same as np.quantile's default)."""

    def __init__(self, keys: np.ndarray, values: np.ndarray):
        order = np.lexsort((values, keys))
        k = keys[order]
        self.values = values[order]
        self.starts = np.flatnonzero(np.r_[True, k[1:] != k[:-1]]) if len(k) else np.zeros(0, int)
        self.keys = k[self.starts]
        self.counts = np.diff(np.r_[self.starts, len(k)])

    def find(self, keys: np.ndarray) -> np.ndarray:
        """Group index of each key, -1 where absent."""
        if len(self.keys) == 0:
            return np.full(len(keys), -1)
        pos = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        return np.where((self.keys[pos] == keys) & (keys >= 0), pos, -1)

    def quantiles(self, g: np.ndarray, levels) -> np.ndarray:
        t = np.asarray(levels, dtype=np.float64)
        if t.ndim != 1 or np.any((t < 0) | (t > 1)):
            raise InputError("levels must be a 1-D array in [0, 1]")
        out = np.full((len(g), len(t)), np.nan)
        ok = g >= 0
        s, n = self.starts[g[ok]][:, None], self.counts[g[ok]][:, None]
        pos = t[None, :] * (n - 1)
        lo = np.floor(pos).astype(np.int64)
        hi = np.minimum(lo + 1, n - 1)
        frac = pos - lo
        out[ok] = self.values[s + lo] * (1 - frac) + self.values[s + hi] * frac
        return out

    def medians(self, g: np.ndarray) -> np.ndarray:
        return self.quantiles(g, [0.5])[:, 0]


class _FailureRates:
    """Per-key failure rate, shrunk toward the global rate with `prior` pseudo-observations:
    (failures + prior * global) / (n + prior), so one lost packet is not "always fails"."""

    def __init__(self, keys: np.ndarray, failed: np.ndarray, global_rate: float, prior: float):
        self.keys, inv = np.unique(keys, return_inverse=True)
        n = np.bincount(inv, minlength=len(self.keys))
        f = np.bincount(inv, weights=failed.astype(np.float64), minlength=len(self.keys))
        self.rate = (f + prior * global_rate) / (n + prior)

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        out = np.full(len(keys), np.nan)
        if len(self.keys):
            pos = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
            hit = (self.keys[pos] == keys) & (keys >= 0)
            out[hit] = self.rate[pos[hit]]
        return out


# ---------------------------------------------------------------------------------------------
# history baselines
# ---------------------------------------------------------------------------------------------

class GlobalMedian:
    """The median train RTT for every query; P(failed) = train failure fraction. Covers all."""

    def fit(self, train: Observations) -> GlobalMedian:
        require_success(train)
        ok = train.ok
        self._groups = _Groups(np.zeros(int(ok.sum()), dtype=np.int64), train.rtt[ok])
        self.median_ms = float(self._groups.medians(np.zeros(1, dtype=np.int64))[0])
        self.p_failed = float(1.0 - ok.mean())
        return self

    def coverage(self, src, dst) -> np.ndarray:
        return np.ones(len(as_str_array(src, "src")), dtype=bool)

    def predict(self, src, dst) -> np.ndarray:
        return np.full(len(as_str_array(src, "src")), self.median_ms)

    def predict_quantiles(self, src, dst, levels) -> np.ndarray:
        n = len(as_str_array(src, "src"))
        return self._groups.quantiles(np.zeros(n, dtype=np.int64), levels)

    def predict_p_failed(self, src, dst) -> np.ndarray:
        return np.full(len(as_str_array(src, "src")), self.p_failed)


class PairHistory:
    """What this (src, dst) pair did in train. `stat` picks the point prediction:
    - "median": median of the pair's successful RTTs (also gives `predict_quantiles`);
    - "last": the most recent successful RTT (by event_time; ties keep input order);
    - "ema": exponential moving average in time order, e_k = alpha x_k + (1 - alpha) e_{k-1},
      started at the first value; alpha = 0.2 weighs the last ~5 pings most;
    - "window_mean": mean of the last `window` (10) successful RTTs.
    P(failed) = the pair's failure rate shrunk toward the global rate (`prior` pseudo-pings).
    """

    STATS = ("median", "last", "ema", "window_mean")

    def __init__(self, stat: str = "median", alpha: float = 0.2, window: int = 10,
                 prior: float = 1.0):
        if stat not in self.STATS:
            raise InputError(f"stat must be one of {self.STATS}, got {stat!r}")
        if not 0 < alpha <= 1 or window < 1 or prior < 0:
            raise InputError("need 0 < alpha <= 1, window >= 1, prior >= 0")
        self.stat, self.alpha, self.window, self.prior = stat, alpha, window, prior

    def _keys(self, src, dst) -> np.ndarray:
        return _pair_keys(lookup(self._nodes, src), lookup(self._nodes, dst), len(self._nodes))

    def fit(self, train: Observations) -> PairHistory:
        require_success(train)
        self._nodes, n = train.nodes, len(train.nodes)
        keys_all = train.src_id * n + train.dst_id
        ok = train.ok
        k, x, t = keys_all[ok], train.rtt[ok], train.time[ok]
        self._groups = _Groups(k, x)
        # time-ordered pass for last / EMA / window mean; groups come out in the same key order
        order = np.lexsort((np.arange(len(k)), t, k))
        xs, ks = x[order], k[order]
        starts, counts = self._groups.starts, self._groups.counts
        pos = np.arange(len(ks)) - np.repeat(starts, counts)
        from_end = np.repeat(counts, counts) - 1 - pos
        self._stat = {"median": self._groups.medians(np.arange(len(starts)))}
        self._stat["last"] = xs[starts + counts - 1]
        a = self.alpha
        w = a * (1 - a) ** from_end
        w[pos == 0] = (1 - a) ** (counts - 1)
        self._stat["ema"] = np.add.reduceat(w * xs, starts) if len(xs) else np.zeros(0)
        in_win = from_end < self.window
        wsum = np.add.reduceat(np.where(in_win, xs, 0.0), starts) if len(xs) else np.zeros(0)
        self._stat["window_mean"] = wsum / np.minimum(counts, self.window)
        self._fail = _FailureRates(keys_all, ~ok, float(1 - ok.mean()), self.prior)
        return self

    def coverage(self, src, dst) -> np.ndarray:
        return self._groups.find(self._keys(src, dst)) >= 0

    def predict(self, src, dst) -> np.ndarray:
        g = self._groups.find(self._keys(src, dst))
        return np.where(g >= 0, self._stat[self.stat][np.maximum(g, 0)], np.nan)

    def predict_quantiles(self, src, dst, levels) -> np.ndarray:
        return self._groups.quantiles(self._groups.find(self._keys(src, dst)), levels)

    def predict_p_failed(self, src, dst) -> np.ndarray:
        return self._fail.lookup(self._keys(src, dst))


class DestinationMedian:
    """Median train RTT to the destination from any source; P(failed) per destination (shrunk
    toward the global rate like PairHistory)."""

    def __init__(self, prior: float = 1.0):
        self.prior = prior

    def fit(self, train: Observations) -> DestinationMedian:
        require_success(train)
        self._nodes = train.nodes
        ok = train.ok
        self._groups = _Groups(train.dst_id[ok], train.rtt[ok])
        self._fail = _FailureRates(train.dst_id, ~ok, float(1 - ok.mean()), self.prior)
        return self

    def coverage(self, src, dst) -> np.ndarray:
        return self._groups.find(lookup(self._nodes, dst)) >= 0

    def predict(self, src, dst) -> np.ndarray:
        return self._groups.medians(self._groups.find(lookup(self._nodes, dst)))

    def predict_quantiles(self, src, dst, levels) -> np.ndarray:
        return self._groups.quantiles(self._groups.find(lookup(self._nodes, dst)), levels)

    def predict_p_failed(self, src, dst) -> np.ndarray:
        return self._fail.lookup(lookup(self._nodes, dst))


def _parse_ip(s: str) -> tuple[int, int] | None:
    """(version, integer value) of an address string, None if it does not parse."""
    try:
        a = ipaddress.ip_address(s)
    except ValueError:
        return None
    return a.version, int(a)


class PrefixNeighbour:
    """Longest-prefix neighbour: the median train RTT between the most specific pair of prefixes
    containing the query's source and destination.

    Ladder (both ends at the same length, most specific first): IPv4 /32, /24, /16, /8 and IPv6
    /128, /64, /48, /32 -- level 0 is the exact pair (= PairHistory median), then the two /24s
    (/64s), and so on. The medians pool every successful train ping between the two prefixes.
    `predict_level` says which prefix length answered (-1 = none: not covered).
    P(failed) is the failure rate at the most specific level with any train ping (successful or
    not), shrunk toward the global rate.
    """

    def __init__(self, ladder_v4=(32, 24, 16, 8), ladder_v6=(128, 64, 48, 32),
                 prior: float = 1.0):
        if len(ladder_v4) != len(ladder_v6) or not ladder_v4:
            raise InputError("the IPv4 and IPv6 ladders need the same, non-zero number of levels")
        for ladder, bits in ((ladder_v4, 32), (ladder_v6, 128)):
            if list(ladder) != sorted(set(ladder), reverse=True) or min(ladder) < 1 \
                    or max(ladder) > bits:
                raise InputError("ladders must be strictly decreasing prefix lengths in 1..32 / "
                                 "1..128")
        self.ladder = {4: tuple(ladder_v4), 6: tuple(ladder_v6)}
        self.prior = prior

    def _prefix_ids(self, addrs: np.ndarray, level: int, grow: bool) -> np.ndarray:
        table = self._prefixes[level]
        out = np.full(len(addrs), -1, dtype=np.int64)
        for n, s in enumerate(addrs):
            p = _parse_ip(s)
            if p is None:
                if grow:
                    raise InputError(f"PrefixNeighbour needs IP addresses, got {s!r}")
                continue
            bits = 32 if p[0] == 4 else 128
            key = (p[0], p[1] >> (bits - self.ladder[p[0]][level]))
            if grow:
                out[n] = table.setdefault(key, len(table))
            else:
                out[n] = table.get(key, -1)
        return out

    def fit(self, train: Observations) -> PrefixNeighbour:
        require_success(train)
        ok = train.ok
        glob = float(1 - ok.mean())
        n_levels = len(self.ladder[4])
        self._prefixes = [dict() for _ in range(n_levels)]
        self._groups, self._fail = [], []
        for lv in range(n_levels):
            pid = self._prefix_ids(train.nodes, lv, grow=True)
            keys = _pair_keys(pid[train.src_id], pid[train.dst_id], len(self._prefixes[lv]))
            self._groups.append(_Groups(keys[ok], train.rtt[ok]))
            self._fail.append(_FailureRates(keys, ~ok, glob, self.prior))
        return self

    def _query(self, src, dst):
        src, dst = as_str_array(src, "src"), as_str_array(dst, "dst")
        us, inv_s = np.unique(src, return_inverse=True)
        ud, inv_d = np.unique(dst, return_inverse=True)
        for lv in range(len(self._prefixes)):
            n = len(self._prefixes[lv])
            keys = _pair_keys(self._prefix_ids(us, lv, False)[inv_s],
                              self._prefix_ids(ud, lv, False)[inv_d], n)
            yield lv, keys

    def _match(self, src, dst):
        """(level index, group index) of the most specific matching level; -1 where none."""
        n = len(as_str_array(src, "src"))
        level, group = np.full(n, -1), np.full(n, -1)
        for lv, keys in self._query(src, dst):
            g = self._groups[lv].find(keys)
            new = (level < 0) & (g >= 0)
            level[new], group[new] = lv, g[new]
        return level, group

    def predict_level(self, src, dst) -> np.ndarray:
        """Prefix length of the level that answered each query (-1 where none did)."""
        level, _ = self._match(src, dst)
        src = as_str_array(src, "src")
        v6 = np.array([":" in s for s in src], dtype=bool)
        lengths4, lengths6 = np.array(self.ladder[4]), np.array(self.ladder[6])
        lm = np.maximum(level, 0)
        return np.where(level < 0, -1, np.where(v6, lengths6[lm], lengths4[lm]))

    def coverage(self, src, dst) -> np.ndarray:
        return self._match(src, dst)[0] >= 0

    def predict_quantiles(self, src, dst, levels) -> np.ndarray:
        level, group = self._match(src, dst)
        out = np.full((len(level), len(np.atleast_1d(levels))), np.nan)
        for lv in range(len(self._groups)):
            sel = level == lv
            if sel.any():
                out[sel] = self._groups[lv].quantiles(group[sel], levels)
        return out

    def predict(self, src, dst) -> np.ndarray:
        return self.predict_quantiles(src, dst, [0.5])[:, 0]

    def predict_p_failed(self, src, dst) -> np.ndarray:
        out = None
        for lv, keys in self._query(src, dst):
            p = self._fail[lv].lookup(keys)
            out = p if out is None else np.where(np.isnan(out), p, out)
        return out


# ---------------------------------------------------------------------------------------------
# source context: offset and failure rate
# ---------------------------------------------------------------------------------------------

class SourceOffset(DestinationMedian):
    """Destination median scaled by how slow the source is: with context measurements of the
    source, the prediction is dst_median(dst) * exp(median over the successful context
    measurements c of log(rtt_c / dst_median(dst_c))), context destinations without a train
    median skipped. Without context (`predict`, `coverage`, quantiles and P(failed)) it is
    exactly DestinationMedian; a context with no usable measurement gives the same.

    The residual is multiplicative (a median of log ratios) rather than additive: RTT errors
    are relative -- a source that is 20% slower than average to a 200 ms destination is not
    40 ms slower to a 5 ms one, and an additive offset learnt on far destinations would send
    near ones below zero -- and the log-ratio median is robust to a few congested context
    pings. Ratios use max(x, 0.01 ms) on both sides.
    """

    FLOOR_MS = 0.01

    def predict_in_context(self, src, dst, contexts) -> np.ndarray:
        """(N,) destination medians times each source's context ratio; NaN where the
        destination has no successful train ping."""
        src, gid, reps = group_contexts(src, contexts)
        log_ratio = np.zeros(len(reps))
        for g, (_, c) in enumerate(reps):
            ok = c.rtt >= 0
            ref = self.predict(c.dst[ok], c.dst[ok])
            use = np.isfinite(ref)
            if use.any():
                log_ratio[g] = np.median(np.log(np.maximum(c.rtt[ok][use], self.FLOOR_MS))
                                         - np.log(np.maximum(ref[use], self.FLOOR_MS)))
        return self.predict(src, dst) * np.exp(log_ratio[gid])


class ContextMedian(GlobalMedian):
    """The naive reading of a context: the median of the source's successful context RTTs, for
    whatever destination is asked (what a user with a few of a new node's pings would guess
    first). It exists only with a context (`context_only`: no row of its own without one, where
    it would be the global median); a context without a reply falls back to that.
    """

    context_only = True

    def predict_in_context(self, src, dst, contexts) -> np.ndarray:
        """(N,) the median successful RTT of each query's context; NaN where there is none."""
        src, gid, reps = group_contexts(src, contexts)
        med = np.full(len(reps), np.nan)
        for g, (_, c) in enumerate(reps):
            ok = c.rtt >= 0
            if ok.any():
                med[g] = float(np.median(c.rtt[ok]))
        return med[gid]


class SourceFailureRate:
    """P(failed) of the source: its train failure rate shrunk toward the global rate with
    `prior` pseudo-pings, (failed + prior * global) / (n + prior), as _FailureRates; with k
    context measurements the context counts are added, so a cold source gets
    (failed in context + prior * global) / (k + prior).

    A P(failed) baseline only (`p_failed_only = True`): `predict` is the train global median
    wherever the source was seen as a train source (its coverage; NaN elsewhere, as every
    baseline), so its RTT metrics are the global median's and carry no information.
    """

    p_failed_only = True

    def __init__(self, prior: float = 1.0):
        if prior < 0:
            raise InputError("prior must be >= 0")
        self.prior = prior

    def fit(self, train: Observations) -> SourceFailureRate:
        require_success(train)
        self._nodes = train.nodes
        n = len(train.nodes)
        self._n = np.bincount(train.src_id, minlength=n).astype(np.float64)
        self._f = np.bincount(train.src_id, weights=(~train.ok).astype(np.float64), minlength=n)
        self.global_rate = float(1 - train.ok.mean())
        self.median_ms = GlobalMedian().fit(train).median_ms
        return self

    def _counts(self, src) -> tuple[np.ndarray, np.ndarray]:
        """(train failures, train pings) of each source as a source (0, 0 if never one)."""
        i = lookup(self._nodes, src)
        ii = np.maximum(i, 0)
        return np.where(i >= 0, self._f[ii], 0.0), np.where(i >= 0, self._n[ii], 0.0)

    def coverage(self, src, dst) -> np.ndarray:
        return self._counts(src)[1] > 0

    def predict(self, src, dst) -> np.ndarray:
        return np.where(self.coverage(src, dst), self.median_ms, np.nan)

    def predict_p_failed(self, src, dst) -> np.ndarray:
        f, n = self._counts(src)
        p = (f + self.prior * self.global_rate) / np.maximum(n + self.prior, 1e-300)
        return np.where(n > 0, p, np.nan)

    def p_failed_in_context(self, src, dst, contexts) -> np.ndarray:
        """(N,) smoothed failure rate over the source's train pings (if any) and its context;
        with neither (a cold source, k = 0) the global rate (NaN only if prior = 0)."""
        src, gid, reps = group_contexts(src, contexts)
        kf = np.array([float(np.sum(c.rtt < 0)) for _, c in reps])[gid] if reps else 0.0
        kn = np.array([float(len(c)) for _, c in reps])[gid] if reps else 0.0
        f, n = self._counts(src)
        total = n + kn + self.prior
        p = (f + kf + self.prior * self.global_rate) / np.where(total > 0, total, 1.0)
        return np.where(total > 0, p, np.nan)


def make_baselines(geo_db=None) -> dict[str, object]:
    """Every baseline of the comparison, unfitted, under its report name. geo_db: the MaxMind
    database file of the geolocation baseline (None: the packaged GeoLite2-City)."""
    return {
        "global_median": GlobalMedian(),
        "pair_median": PairHistory("median"),
        "pair_last": PairHistory("last"),
        "pair_ema": PairHistory("ema"),
        "pair_window_mean": PairHistory("window_mean"),
        "dst_median": DestinationMedian(),
        "prefix_nn": PrefixNeighbour(),
        "vivaldi": Vivaldi(),
        "dmfsgd": DMFSGD(),
        "biased_mf": BiasedMF(),
        "source_offset": SourceOffset(),
        "context_median": ContextMedian(),
        "source_failure_rate": SourceFailureRate(),
        "geo": GeoDistance(GeoDB.open(geo_db)),
    }
