"""What an evaluation asks: the queries of a set and the context each one is given.

`Queries.of(table, max_queries, seed, name)` is a set's seeded uniform subsample (without
replacement, kept in row order); `ContextPool` gives a query its source's k most recent
measurements before the query time (from train, or for a cold source its own earlier ones to
other destinations); `new_sources` / `with_source` / `real_knowledge` re-address sources for
the cold-start protocol on known probes. `eval.evaluate` and `eval.calibrate` draw exactly the
same queries and contexts from here, so calibration is fitted on what the report scores.
"""

from __future__ import annotations

import contextlib
import zlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from ping_llm import tokens as tk
from ping_llm.data.splits import TEST_SPLITS

EVAL_SPLITS = TEST_SPLITS  # what `eval` scores by default
CONTEXTS = (0, 1, 4, 16, 64)  # 64 is cut to what fits the model's window (context_mean says)
MAX_QUERIES = 500  # per evaluated set, by default


def table_arrays(table: pa.Table) -> dict:
    t = table.column("event_time").cast(pa.int64()).to_numpy()
    return dict(src=np.asarray(table.column("src_addr").to_pylist(), dtype=object),
                dst=np.asarray(table.column("dst_addr").to_pylist(), dtype=object),
                rtt=table.column("rtt").to_numpy(), time=t,
                version=table.column("ip_version").to_numpy().astype(np.int64))


def subsample(n: int, max_queries: int | None, seed: int, name: str) -> np.ndarray:
    """Deterministic uniform subsample of range(n) (sorted): default_rng([seed, crc32(name)])."""
    if not max_queries or n <= max_queries:
        return np.arange(n)
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    return np.sort(rng.choice(n, size=max_queries, replace=False))


class ContextPool:
    """Measurements to draw in-context examples from, sorted by (source, time).

    other_destinations: a query's context skips the query's own destination, so the context is
    what a new node knows about itself (its pings elsewhere), never the pair's own history; used
    for pools of the evaluated set itself (test_probe, val_probe, `context_from="test"`)."""

    def __init__(self, table: pa.Table, other_destinations: bool = False):
        a = table_arrays(table)
        order = np.lexsort((a["time"], a["src"].astype(str)))
        self.src = a["src"][order].astype(str)
        self.dst, self.rtt, self.time = a["dst"][order], a["rtt"][order], a["time"][order]
        self.sources, self.first = np.unique(self.src, return_index=True)
        self.last = np.r_[self.first[1:], len(self.src)]
        self.other_destinations = other_destinations

    def before(self, src: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per query: (lo, p) with rows [lo, p) the source's measurements strictly before t."""
        n = len(self.sources)
        i = np.minimum(np.searchsorted(self.sources, src.astype(str)), max(n - 1, 0))
        hit = (self.sources[i] == src.astype(str)) if n else np.zeros(len(src), bool)
        lo = np.where(hit, self.first[i] if n else 0, 0)
        hi = np.where(hit, self.last[i] if n else 0, 0)
        p = np.array([lo_ + np.searchsorted(self.time[lo_:hi_], tq, "left")
                      for lo_, hi_, tq in zip(lo, hi, t, strict=True)], dtype=np.int64)
        return lo, np.where(hit, p, lo)

    def context(self, lo: int, p: int, k: int, budget: int, dst: str | None = None) -> list:
        """The k most recent measurements in [lo, p) (to destinations other than `dst` when the
        pool is `other_destinations`), time-ordered, cut to `budget` tokens."""
        if k == 0:
            return []
        if self.other_destinations and dst is not None:
            rows = np.arange(lo, p)[self.dst[lo:p] != dst][-k:]
        else:
            rows = np.arange(max(lo, p - k), p)
        ms = [tk.Measurement(self.src[r], self.dst[r], float(self.rtt[r]), int(self.time[r]))
              for r in rows]
        while ms and len(tk.encode_reference(ms)) > budget:
            ms = ms[1:]
        return ms


@dataclass
class Queries:
    src: np.ndarray  # object (N,)
    dst: np.ndarray
    rtt: np.ndarray  # ms, -1 = failed
    time: np.ndarray  # epoch s
    version: np.ndarray

    @property
    def failed(self) -> np.ndarray:
        return self.rtt < 0

    @property
    def obs(self) -> np.ndarray:
        return np.where(self.rtt < 0, np.nan, self.rtt)

    def __len__(self) -> int:
        return len(self.rtt)

    def measurement(self, i: int, with_time: bool = True) -> tk.Measurement:
        t = int(self.time[i]) if with_time else None
        return tk.Measurement(str(self.src[i]), str(self.dst[i]), float(self.rtt[i]), t)

    @classmethod
    def of(cls, table: pa.Table, max_queries: int | None = None, seed: int = 0,
           name: str = "") -> Queries:
        """The rows of a canonical table (`subsample`d to max_queries by (seed, name))."""
        if max_queries:
            table = table.take(pa.array(subsample(table.num_rows, max_queries, seed, name),
                                        pa.int64()))
        a = table_arrays(table)
        return cls(a["src"], a["dst"], a["rtt"], a["time"], a["version"])


def new_sources(src: np.ndarray, seed: int, name: str) -> np.ndarray:
    """Each distinct source address -> a fresh uniformly random global unicast address of its
    family (contexts.readdress with nothing of the real network kept): a probe never seen. Seeded
    by (seed, set name), so `calibrate` re-addresses val exactly as `eval --readdress-sources`."""
    from ping_llm.data.contexts import readdress

    uniq, inv = np.unique(src.astype(str), return_inverse=True)
    addr, version = tk.parse_addresses(uniq)
    rng = np.random.default_rng([seed, zlib.crc32(name.encode()), 2])
    new = readdress(addr, version, rng, keep=0.0)
    names = np.array([tk.format_address(a, v) for a, v in zip(new, version, strict=True)],
                     dtype=object)
    return names[inv]


def real_knowledge(engine, new, real):
    """While open, the re-addressed sources `new` read the address knowledge of their real
    addresses `real` (index by index): a probe never seen still has its true location, as in
    training (`readdress_knowledge`) and as a real new probe has. Nothing for a model without
    knowledge, or when the sources are their real ones (the same array)."""
    known = engine.model.knowledge
    if known is None or new is real:
        return contextlib.nullcontext()
    return known.aliases(new, real)


def with_source(context: list, src: str) -> list:
    """The same measurements under another source address (a re-addressed source's context)."""
    return [tk.Measurement(src, m.dst, m.rtt_ms, m.time) for m in context]
