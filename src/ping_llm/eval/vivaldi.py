"""Vivaldi network coordinates as in Serf/Consul (hashicorp/serf/coordinate), re-implemented.

The classic decentralised latency predictor of the baseline comparison: every node gets a
Euclidean coordinate plus a height, learned by replaying the train pings in time order through
Serf's Client.Update (latency filter, Vivaldi step, adjustment term, gravity), and a pair's
predicted RTT is Serf's DistanceTo. `VivaldiConfig` is Serf's DefaultConfig. Its own module
because the update rule is long and self-contained; `baselines.make_baselines` includes it under
the name "vivaldi", with the same duck-typed fit / predict / coverage as the other baselines.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np

from ping_llm.data.observations import Observations, group_contexts, lookup, require_success
from ping_llm.errors import InputError


@dataclass(frozen=True)
class VivaldiConfig:
    """Serf's DefaultConfig. Units are Serf's: seconds (inputs are converted from ms)."""

    dimensionality: int = 8
    error_max: float = 1.5  # VivaldiErrorMax: initial and maximum node error
    ce: float = 0.25  # VivaldiCE: max impact of one observation on the error estimate
    cc: float = 0.25  # VivaldiCC: max impact of one observation on the coordinate
    adjustment_window: int = 20  # AdjustmentWindowSize (0 disables the adjustment term)
    height_min: float = 10e-6  # HeightMin, s
    latency_filter_size: int = 3  # LatencyFilterSize: moving median over the last samples/peer
    gravity_rho: float = 150.0  # GravityRho, s
    zero_threshold: float = 1e-6  # zeroThreshold, s
    max_rtt: float = 10.0  # Serf's Update rejects RTTs outside [0, 10 s]

    def __post_init__(self):
        if self.dimensionality < 1 or self.latency_filter_size < 1 or self.adjustment_window < 0:
            raise InputError("dimensionality and latency_filter_size must be >= 1, window >= 0")
        if min(self.error_max, self.ce, self.cc, self.gravity_rho) <= 0 or self.height_min < 0:
            raise InputError("error_max, ce, cc, gravity_rho must be > 0 and height_min >= 0")


class Vivaldi:
    """Vivaldi network coordinates with Serf's refinements: D-dimensional Euclidean part plus a
    height (access-link delay), per-node error weighting (ce, cc), a per-peer moving-median
    latency filter, the adjustment term (mean residual over the last 20 observations / 2) and
    gravity toward the origin (rho = 150 s). Prediction = Serf's Coordinate.DistanceTo in ms.

    Training replays the successful train pings in time order (stable; ties keep input order),
    `passes` times. Each ping (src i, dst j, rtt) is what Serf's Client.Update does when i pings
    j: i's coordinate moves against j's current coordinate. Destinations that never probe in the
    train split are passive: left alone they would sit at the origin with maximal error forever,
    so by default (`passive="reciprocal"`) such a node also updates from the same ping against
    the source's pre-update coordinate, as if it had pinged back (RTT is symmetric); "all" does
    that for every destination, "none" is strictly one-sided. Differences from Serf: our own RNG
    for the random direction when two coordinates coincide; distances are not truncated to whole
    nanoseconds. RTTs above 10 s are skipped (Serf rejects them).

    In context (`predict_in_context`): the query's source runs Serf's Client.Update once per
    successful context measurement (oldest first, RTT <= 10 s, to a destination with a fitted
    coordinate; the others are skipped as Serf would never hear of them) against the fitted
    coordinates of the context destinations, which stay fixed (as in a deployment, only the new
    node updates), then predicts DistanceTo the query destination with its updated coordinate
    and adjustment. A cold source starts from Serf's NewClient state: origin, height HeightMin,
    error VivaldiErrorMax, adjustment 0, empty adjustment window and latency filters (so k = 0
    gives the distance from the origin). A train source starts from its whole fitted client
    state (coordinate, error, adjustment window, latency filters), as the running Serf agent
    would keep it: dropping it would waste its train pings, which every other baseline keeps.
    Ties to the random direction (node on top of a destination) use an RNG seeded by `seed`
    and the source address, so the answer is deterministic and independent of the batch.

    Departures from Dabek et al. (SIGCOMM 2004): the error-weighted adaptive step (cc, ce) and
    the height are the paper's; the latency filter, adjustment term and gravity are Serf's
    additions from follow-on work (filter and gravity after Ledlie et al., NSDI 2007). Ours:
    nodes are updated by a centralised replay of the train pings rather than by live,
    concurrent probing, with passive destinations updated reciprocally (see `passive`).
    """

    def __init__(self, config: VivaldiConfig | None = None, passive: str = "reciprocal",
                 passes: int = 1, seed: int = 0):
        if passive not in ("reciprocal", "all", "none"):
            raise InputError("passive must be 'reciprocal', 'all' or 'none'")
        if passes < 1:
            raise InputError("passes must be >= 1")
        self.config = config or VivaldiConfig()
        self.passive, self.passes, self.seed = passive, passes, seed

    # -- Serf's Client.Update on plain Python floats (D ~ 8: lists beat numpy per call) --------
    def _random_unit(self) -> list[float]:
        v = [self._rng.random() - 0.5 for _ in range(self.config.dimensionality)]
        m = math.hypot(*v)
        if m > self.config.zero_threshold:
            return [a / m for a in v]
        return [1.0] + [0.0] * (self.config.dimensionality - 1)

    def _update(self, i: int, j: int, rtt: float, ov, oh: float, oerr: float, oadj: float):
        """Serf's Client.Update for node i after a ping to j (coordinate ov, height oh, error
        oerr, adjustment oadj): latency filter, Vivaldi step, adjustment, gravity, validity."""
        ce, cc, emax, w, hmin, lfs, rho, zt = self._k
        # latency filter: median of the last `lfs` raw samples from this peer
        key = i * self._n + j
        s = self._filt.get(key)
        if s is None:
            s = self._filt[key] = []
        s.append(rtt)
        if len(s) > lfs:
            del s[0]
        rtt = sorted(s)[len(s) // 2]
        # Vivaldi step: distance includes the adjustments unless that makes it non-positive
        v, h, e, adj = self._vec[i], self._h[i], self._err[i], self._adj[i]
        mag = math.dist(v, ov)
        raw = mag + h + oh
        dist = raw + adj + oadj
        if dist <= 0.0:
            dist = raw
        if rtt < zt:
            rtt = zt
        wrongness = abs(dist - rtt) / rtt
        total = e + oerr
        if total < zt:
            total = zt
        weight = e / total
        e = ce * weight * wrongness + e * (1.0 - ce * weight)
        if e > emax:
            e = emax
        force = cc * weight * (rtt - dist)
        if mag > zt:  # push along the unit vector from the other node to this one
            f = force / mag
            v = [a + (a - b) * f for a, b in zip(v, ov, strict=False)]
            h = max((h + oh) * force / mag + h, hmin)
        else:  # on top of each other: a random direction, height unchanged (as Serf)
            v = [a + u * force for a, u in zip(v, self._random_unit(), strict=False)]
        # adjustment: mean residual (raw distance, after the move) over the window, halved
        if w > 0:
            samples = self._adj_samples[i]
            samples[self._adj_idx[i]] = rtt - (math.dist(v, ov) + h + oh)
            self._adj_idx[i] = (self._adj_idx[i] + 1) % w
            adj = sum(samples) / (2.0 * w)
        # gravity toward the origin (origin: zero vector, height hmin, no adjustment)
        norm = math.hypot(*v)
        d0 = norm + hmin + h
        if d0 + adj > 0.0:
            d0 = d0 + adj
        g = -((d0 / rho) ** 2)
        if norm > zt:
            k = 1.0 + g / norm
            v = [a * k for a in v]
            h = max((h + hmin) * g / norm + h, hmin)
        else:
            v = [a + u * g for a, u in zip(v, self._random_unit(), strict=False)]
        if not math.isfinite(sum(v) + h + e + adj):  # Serf resets an invalid coordinate
            v, h, e, adj = [0.0] * len(v), hmin, emax, 0.0
            self.resets += 1
        self._vec[i], self._h[i], self._err[i], self._adj[i] = v, h, e, adj

    def fit(self, train: Observations) -> Vivaldi:
        require_success(train)
        c = self.config
        self._nodes, self._n = train.nodes, len(train.nodes)
        n = self._n
        self._rng = random.Random(self.seed)
        self._vec = [[0.0] * c.dimensionality for _ in range(n)]
        self._h, self._err, self._adj = [c.height_min] * n, [c.error_max] * n, [0.0] * n
        self._adj_samples = [[0.0] * c.adjustment_window for _ in range(n)]
        self._adj_idx = [0] * n
        self._filt: dict[int, list[float]] = {}
        self._k = (c.ce, c.cc, c.error_max, c.adjustment_window, c.height_min,
                   c.latency_filter_size, c.gravity_rho, c.zero_threshold)
        self.resets = 0
        rtt_s = train.rtt / 1000.0
        keep = train.ok & (rtt_s <= c.max_rtt) & (train.src_id != train.dst_id)
        order = np.flatnonzero(keep)[np.argsort(train.time[keep], kind="stable")]
        a, b, r = train.src_id[order], train.dst_id[order], rtt_s[order]
        if self.passive == "all":
            back = np.ones(len(order), dtype=bool)
        elif self.passive == "reciprocal":
            back = ~np.isin(b, np.unique(a))
        else:
            back = np.zeros(len(order), dtype=bool)
        a, b, r, back = a.tolist(), b.tolist(), r.tolist(), back.tolist()
        vec, hh, err, adj, upd = self._vec, self._h, self._err, self._adj, self._update
        for _ in range(self.passes):
            for i, j, rtt, bk in zip(a, b, r, back, strict=True):
                vi, hi, ei, ai = vec[i], hh[i], err[i], adj[i]  # i's state before the ping
                upd(i, j, rtt, vec[j], hh[j], err[j], adj[j])
                if bk:
                    upd(j, i, rtt, vi, hi, ei, ai)
        self.vec_ = np.array(self._vec, dtype=np.float64).reshape(n, c.dimensionality)
        self.height_ = np.array(self._h)
        self.error_ = np.array(self._err)
        self.adjustment_ = np.array(self._adj)
        self._known = np.zeros(n, dtype=bool)
        self._known[a] = True
        self._known[b] = True
        return self

    def coverage(self, src, dst) -> np.ndarray:
        i, j = lookup(self._nodes, src), lookup(self._nodes, dst)
        return (i >= 0) & (j >= 0) & self._known[np.maximum(i, 0)] & self._known[np.maximum(j, 0)]

    def predict(self, src, dst) -> np.ndarray:
        i, j = lookup(self._nodes, src), lookup(self._nodes, dst)
        ok = self.coverage(src, dst)
        ii, jj = np.maximum(i, 0), np.maximum(j, 0)
        raw = (np.linalg.norm(self.vec_[ii] - self.vec_[jj], axis=1)
               + self.height_[ii] + self.height_[jj])
        adjusted = raw + self.adjustment_[ii] + self.adjustment_[jj]
        dist = np.where(adjusted > 0, adjusted, raw)
        return np.where(ok, dist * 1000.0, np.nan)

    def _client(self, s: str, i: int, peers) -> Vivaldi:
        """A one-node Vivaldi holding Serf's client state for source `s` (id `i`, -1 if cold)
        at index 0, sharing this model's config; its latency filters (those of `peers`, the
        only ones its updates touch) are keyed by peer id."""
        c = self.config
        sim = Vivaldi.__new__(Vivaldi)
        sim.config, sim._k, sim._n, sim.resets = c, self._k, 0, 0
        sim._rng = random.Random(f"{self.seed}:{s}")
        if i >= 0:
            sim._vec, sim._h = [list(self._vec[i])], [self._h[i]]
            sim._err, sim._adj = [self._err[i]], [self._adj[i]]
            sim._adj_samples, sim._adj_idx = [list(self._adj_samples[i])], [self._adj_idx[i]]
            base = i * self._n
            sim._filt = {b: list(self._filt[base + b]) for b in peers
                         if base + b in self._filt}
        else:
            sim._vec, sim._h = [[0.0] * c.dimensionality], [c.height_min]
            sim._err, sim._adj = [c.error_max], [0.0]
            sim._adj_samples, sim._adj_idx = [[0.0] * c.adjustment_window], [0]
            sim._filt = {}
        return sim

    def predict_in_context(self, src, dst, contexts) -> np.ndarray:
        """(N,) RTT ms from each source's coordinate after Serf updates on its context (see the
        class docstring) to the query destination; NaN where the destination has no fitted
        coordinate."""
        src, gid, reps = group_contexts(src, contexts)
        j = lookup(self._nodes, dst)
        if len(j) != len(src):
            raise InputError("src and dst must have the same length")
        sid = lookup(self._nodes, [s for s, _ in reps])
        vec = np.zeros((len(reps), self.config.dimensionality))
        h, adj = np.zeros(len(reps)), np.zeros(len(reps))
        for g, (s, ctx) in enumerate(reps):
            i = int(sid[g])
            cj = lookup(self._nodes, ctx.dst)
            rtt_s = ctx.rtt / 1000.0
            use = ((ctx.rtt >= 0) & (rtt_s <= self.config.max_rtt) & (cj >= 0) & (cj != i)
                   & self._known[np.maximum(cj, 0)])
            peers = cj[use].tolist()
            sim = self._client(s, i, set(peers))
            for b, r in zip(peers, rtt_s[use].tolist(), strict=True):
                sim._update(0, b, r, self._vec[b], self._h[b], self._err[b], self._adj[b])
            vec[g], h[g], adj[g] = sim._vec[0], sim._h[0], sim._adj[0]
        jj = np.maximum(j, 0)
        raw = np.linalg.norm(vec[gid] - self.vec_[jj], axis=1) + h[gid] + self.height_[jj]
        adjusted = raw + adj[gid] + self.adjustment_[jj]
        dist = np.where(adjusted > 0, adjusted, raw)
        return np.where((j >= 0) & self._known[jj], dist * 1000.0, np.nan)
