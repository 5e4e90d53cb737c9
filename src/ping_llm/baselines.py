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

This module holds the history, prefix and matrix-factorisation baselines and `make_baselines` (the
whole comparison under its report names). The train split they fit on, `Observations`, lives in
`ping_llm.observations`; Vivaldi, whose Serf update rule is long, in `ping_llm.vivaldi`.

Node identity is the address string (the canonical table's src_addr / dst_addr); the node set is
the union of sources and destinations. Failed pings (rtt < 0, canonically -1.0) never enter an RTT
fit; they only feed the failure rates. What each method cannot predict (its coverage):
- GlobalMedian: everything (it is the fallback).
- PairHistory (median / last / EMA / window mean): pairs with >= 1 successful train ping.
- DestinationMedian: destinations with >= 1 successful train ping.
- PrefixNeighbour: pairs whose addresses share at least the shortest ladder prefix (/8 IPv4,
  /32 IPv6) with a train pair on both ends.
- Vivaldi (`ping_llm.vivaldi`): pairs whose two nodes both appear in a valid successful train
  ping.
- DMFSGD, BiasedMF: source seen as a source and destination seen as a destination in train.
"""

from __future__ import annotations

import ipaddress
import math

import numpy as np

from ping_llm.errors import InputError
from ping_llm.observations import Observations, as_str_array, lookup, require_success
from ping_llm.vivaldi import Vivaldi


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
# matrix factorisation
# ---------------------------------------------------------------------------------------------

def _pair_medians(train: Observations):
    """(src id, dst id, median successful RTT ms) per train pair: both factorisations fit the
    matrix of pair medians (one entry per pair, robust to jitter and to heavy pairs dominating)."""
    ok = train.ok
    n = len(train.nodes)
    g = _Groups(train.src_id[ok] * n + train.dst_id[ok], train.rtt[ok])
    med = g.medians(np.arange(len(g.keys)))
    return g.keys // n, g.keys % n, med


class _MatrixModel:
    """Shared plumbing: node index over the union of addresses, seen-as-source/destination
    masks, the RTT <-> target transform. target "log" fits log(max(rtt, 0.01 ms)) so errors are
    relative (a 10 ms miss matters more at 20 ms than at 300 ms) and heavy tails do not dominate
    the squared loss; "linear" fits ms directly (predictions clipped at 0). On Seattle held-out
    pairs the log target wins for both models (BiasedMF median abs error 18.9 ms vs 24.8)."""

    LOG_FLOOR_MS = 0.01

    def _to_target(self, x: np.ndarray) -> np.ndarray:
        return np.log(np.maximum(x, self.LOG_FLOOR_MS)) if self.target == "log" else x

    def _from_target(self, t: np.ndarray) -> np.ndarray:
        return np.exp(t) if self.target == "log" else np.maximum(t, 0.0)

    def _prepare(self, train: Observations):
        require_success(train)
        if self.target not in ("log", "linear"):
            raise InputError("target must be 'log' or 'linear'")
        self._nodes = train.nodes
        i, j, med = _pair_medians(train)
        n = len(self._nodes)
        self._src_seen = np.bincount(i, minlength=n) > 0
        self._dst_seen = np.bincount(j, minlength=n) > 0
        return i, j, self._to_target(med), n

    def coverage(self, src, dst) -> np.ndarray:
        i, j = lookup(self._nodes, src), lookup(self._nodes, dst)
        return ((i >= 0) & (j >= 0) & self._src_seen[np.maximum(i, 0)]
                & self._dst_seen[np.maximum(j, 0)])

    def predict(self, src, dst) -> np.ndarray:
        i, j = lookup(self._nodes, src), lookup(self._nodes, dst)
        t = self._predict_target(np.maximum(i, 0), np.maximum(j, 0))
        return np.where(self.coverage(src, dst), self._from_target(t), np.nan)


class DMFSGD(_MatrixModel):
    """DMFSGD (Liao, Du, Geurts, Leduc, IEEE/ACM ToN 2013): every node i holds an outgoing
    vector u_i and an incoming vector v_i (rank `rank`), the predicted distance is u_i . v_j,
    and each measurement x_ij drives a regularised SGD step on u_i and v_j:
        u_i -= lr * (dloss(u_i.v_j - x_ij) * v_j + lam * u_i), v_j likewise,
    followed (`nonneg`, default on) by a projection onto u, v >= 0 so predictions stay >= 0.
    Loss: "l2" (squared), "l1" (absolute) or "huber" (quadratic within `huber_delta` of the
    target, linear beyond: robust to outlier pair medians). The model, the per-node vectors and
    the regularised SGD rule follow the paper; loss, target and step sizes are our choices.

    Centralised simulation of the decentralised rounds: an epoch shuffles the train pair medians
    into batches of `batch_size`; within a batch every node takes one step with the average of
    its gradients (a node's round with the neighbours it measured), so the step size does not
    depend on how many of the node's pairs landed in the batch. Defaults: rank 10, log target,
    Huber loss (delta 0.2 in log units, i.e. ~20% relative error), lam 0.01, lr 0.1, 300 epochs
    of batches of 1024. Chosen on Seattle held-out pairs (median abs error, ms): Huber 16.1 vs
    l2 21.7 vs l1 32.3 (l1's sign steps converge slowly); linear target 32 vs log 21 (l2).
    """

    def __init__(self, rank: int = 10, loss: str = "huber", lam: float = 0.01, lr: float = 0.1,
                 epochs: int = 300, batch_size: int = 1024, huber_delta: float = 0.2,
                 nonneg: bool = True, target: str = "log", seed: int = 0):
        if rank < 1 or epochs < 1 or batch_size < 1 or lr <= 0 or lam < 0 or huber_delta <= 0:
            raise InputError("need rank, epochs, batch_size >= 1, lr > 0, lam >= 0, delta > 0")
        if loss not in ("l2", "l1", "huber"):
            raise InputError("loss must be 'l2', 'l1' or 'huber'")
        self.rank, self.loss, self.lam, self.lr = rank, loss, lam, lr
        self.epochs, self.batch_size, self.huber_delta = epochs, batch_size, huber_delta
        self.nonneg, self.target, self.seed = nonneg, target, seed

    def _dloss(self, r: np.ndarray) -> np.ndarray:
        if self.loss == "l2":
            return r
        if self.loss == "l1":
            return np.sign(r)
        return np.clip(r, -self.huber_delta, self.huber_delta)

    def fit(self, train: Observations) -> DMFSGD:
        i, j, t, n = self._prepare(train)
        rng = np.random.default_rng(self.seed)
        # start near the right scale: E[u.v] = rank * s^2 / 4 ~ mean target for U(0, s) entries
        s = 2.0 * math.sqrt(max(float(np.mean(t)), 1e-3) / self.rank)
        U = rng.uniform(0, s, (n, self.rank))
        V = rng.uniform(0, s, (n, self.rank))
        m, r = len(t), self.rank
        cols = np.arange(r)

        def per_node_mean(nodes, grads):  # average gradient per node over the batch, (n, r)
            total = np.bincount((nodes[:, None] * r + cols).ravel(), weights=grads.ravel(),
                                minlength=n * r).reshape(n, r)
            return total / np.maximum(np.bincount(nodes, minlength=n), 1)[:, None]

        for _ in range(self.epochs):
            perm = rng.permutation(m)
            for b in range(0, m, self.batch_size):
                idx = perm[b:b + self.batch_size]
                bi, bj, bt = i[idx], j[idx], t[idx]
                ui, vj = U[bi], V[bj]
                g = self._dloss(np.sum(ui * vj, axis=1) - bt)[:, None]
                U -= self.lr * per_node_mean(bi, g * vj + self.lam * ui)
                V -= self.lr * per_node_mean(bj, g * ui + self.lam * vj)
                if self.nonneg:
                    np.maximum(U, 0.0, out=U)
                    np.maximum(V, 0.0, out=V)
        self.U_, self.V_ = U, V
        return self

    def _predict_target(self, i, j):
        return np.sum(self.U_[i] * self.V_[j], axis=1)


class BiasedMF(_MatrixModel):
    """Biased matrix factorisation: target(x_ij) ~ mu + b_i + c_j + p_i . q_j, with mu the mean
    train target, b/p the source side and c/q the destination side of each node.

    Fitted by alternating least squares with weighted-lambda ridge (ALS-WR, Zhou et al. 2008):
    with the destination side fixed, each source's (b_i, p_i) is the exact ridge solution over
    its observed pairs with penalty lam * n_i, and vice versa; `iters` alternations (each solve
    is exact, so ~20 suffice). Defaults: rank 10, lam 0.05, 20 iterations, log target. rank 0
    is the pure bias model mu + b_i + c_j (x = a_i * b_j multiplicatively under the log target).
    """

    def __init__(self, rank: int = 10, lam: float = 0.05, iters: int = 20, target: str = "log",
                 seed: int = 0):
        if rank < 0 or iters < 1 or lam < 0:
            raise InputError("need rank >= 0, iters >= 1, lam >= 0")
        self.rank, self.lam, self.iters, self.target, self.seed = rank, lam, iters, target, seed

    @staticmethod
    def _solve_side(own, other, t, X_other, n, lam):
        """Ridge-solve [bias, factors] for every node on one side given the other side's
        [1, factors] features: rows grouped by node, one (r+1)x(r+1) system per node."""
        order = np.argsort(own, kind="stable")
        own_s = own[order]
        F = X_other[other[order]]  # (m, r+1): [1, q_j]
        y = t[order]
        k = F.shape[1]
        out = np.zeros((n, k))
        starts = np.flatnonzero(np.r_[True, own_s[1:] != own_s[:-1]])
        ends = np.r_[starts[1:], len(own_s)]
        for s, e in zip(starts, ends, strict=True):
            Fi = F[s:e]
            A = Fi.T @ Fi + lam * (e - s) * np.eye(k)
            out[own_s[s]] = np.linalg.solve(A, Fi.T @ y[s:e])
        return out

    def fit(self, train: Observations) -> BiasedMF:
        i, j, t, n = self._prepare(train)
        rng = np.random.default_rng(self.seed)
        self.mu_ = float(np.mean(t))
        resid = t - self.mu_
        # P, Q hold [bias, factors] per node; the features used against them are [1, factors]
        P = np.zeros((n, self.rank + 1))
        Q = np.zeros((n, self.rank + 1))
        Q[:, 1:] = rng.normal(0, 0.1, (n, self.rank))
        for _ in range(self.iters):
            Xq = np.c_[np.ones(n), Q[:, 1:]]
            P = self._solve_side(i, j, resid - Q[j, 0], Xq, n, self.lam)
            Xp = np.c_[np.ones(n), P[:, 1:]]
            Q = self._solve_side(j, i, resid - P[i, 0], Xp, n, self.lam)
        self.b_, self.c_ = P[:, 0], Q[:, 0]
        self.P_, self.Q_ = P[:, 1:], Q[:, 1:]
        return self

    def _predict_target(self, i, j):
        return self.mu_ + self.b_[i] + self.c_[j] + np.sum(self.P_[i] * self.Q_[j], axis=1)


def make_baselines() -> dict[str, object]:
    """Every baseline of the comparison, unfitted, under its report name."""
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
    }
