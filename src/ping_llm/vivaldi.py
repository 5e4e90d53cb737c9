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

from ping_llm.errors import InputError
from ping_llm.observations import Observations, lookup, require_success


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
