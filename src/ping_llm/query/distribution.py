"""The answer to an RTT question: P(failed) and a distribution over the model's RTT code grid.

`RTTDistribution` holds `p_failed` plus a sparse pmf over 16-bit codes *conditional on a reply*
(`probs` sums to 1; the unconditional P(code) is (1 - p_failed) * probs). Quantiles, median,
mean and mode are of the RTT given a reply; `p_below(x)` is P(reply and RTT < x) unless
`given_reply=True`. Values are `tokens.RTT_GRID_MS[codes]` (the code's representative RTT).
Every query path returns it (`query.engine`, `query.generate`, the server's JSON via `to_dict`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ping_llm import tokens as tk
from ping_llm.errors import InputError

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)  # the quantiles `to_dict` reports


@dataclass(eq=False)
class RTTDistribution:
    """P(failed) and the RTT distribution given a reply, on the model's 16-bit code grid."""

    p_failed: float
    codes: np.ndarray  # uint16 (K,), ascending (= ascending RTT), every code with mass
    probs: np.ndarray  # float64 (K,), P(code | reply), sums to 1
    exact: bool = True  # False: Monte Carlo over address completions (partial addresses)
    n_samples: int | None = None  # completions drawn when not exact
    n_completions: int = 1  # address completions enumerated (exact) or distinct ones drawn (MC)
    coarse_mass: float = 0.0  # share of `probs` left at byte1-bin centres (bins not refined)
    calibrated: bool = False  # the run's calibration map was applied (ping_llm.query.calibration)

    @property
    def values_ms(self) -> np.ndarray:
        return tk.RTT_GRID_MS[self.codes]

    def quantile(self, q):
        """Smallest RTT (ms) whose P(rtt <= value | reply) >= q; q scalar or array in [0, 1]."""
        qa = np.asarray(q, dtype=np.float64)
        if np.isnan(qa).any() or (qa < 0).any() or (qa > 1).any():
            raise InputError(f"quantile levels must lie in [0, 1], got {q!r}")
        cdf = np.cumsum(self.probs)
        i = np.minimum(np.searchsorted(cdf, qa - 1e-12, side="left"), len(cdf) - 1)
        v = self.values_ms[i]
        return float(v) if v.ndim == 0 else v

    @property
    def median(self) -> float:
        return self.quantile(0.5)

    @property
    def mean(self) -> float:
        return float(np.dot(self.probs, self.values_ms))

    @property
    def mode(self) -> float:
        """The most probable code's RTT (above 2 ms codes are log-spaced: the log-scale mode).
        A bin's lone centre code (mass of a bin not refined) does not count."""
        b1 = self.codes.astype(np.int64) >> 8
        refined = np.bincount(b1, minlength=256)[b1] > 1
        p = np.where(refined, self.probs, -1.0) if refined.any() else self.probs
        return float(self.values_ms[int(np.argmax(p))])

    def cdf(self, x_ms: float) -> float:
        """P(rtt <= x | reply)."""
        return float(self.probs[self.values_ms <= x_ms].sum())

    def p_below(self, x_ms: float, given_reply: bool = False) -> float:
        """P(reply and rtt < x), or P(rtt < x | reply) with given_reply=True."""
        p = float(self.probs[self.values_ms < x_ms].sum())
        return p if given_reply else (1.0 - self.p_failed) * p

    def pmf(self) -> np.ndarray:
        """Dense (65536,) P(code | reply)."""
        out = np.zeros(65536)
        out[self.codes] = self.probs
        return out

    def histogram(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(lo_ms, hi_ms, p) over the byte1 bins with mass: P(lo <= rtt < hi | reply)."""
        p = np.bincount(self.codes.astype(np.int64) >> 8, weights=self.probs, minlength=256)
        b = np.flatnonzero(p > 0)
        edges = _byte1_edges()
        return edges[b, 0], edges[b, 1], p[b]

    def to_dict(self, quantiles=QUANTILES, histogram: bool = True) -> dict:
        out = {
            "p_failed": self.p_failed,
            "median_ms": self.median,
            "mean_ms": self.mean,
            "mode_ms": self.mode,
            "quantiles": {str(q): float(self.quantile(q)) for q in quantiles},
            "exact": self.exact,
            "n_samples": self.n_samples,
            "n_completions": self.n_completions,
            "coarse_mass": float(self.coarse_mass),
            "calibrated": self.calibrated,
        }
        if histogram:
            lo, hi, p = self.histogram()
            out["histogram"] = [
                {"lo_ms": float(a), "hi_ms": float(b), "p": float(c)}
                for a, b, c in zip(lo, hi, p, strict=True)
            ]
        return out


_EDGES: list[np.ndarray] = []


def _byte1_edges() -> np.ndarray:
    if not _EDGES:
        _EDGES.append(tk.byte1_bin_edges_ms())
    return _EDGES[0]
