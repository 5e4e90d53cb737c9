"""The train split every baseline fits on: ping observations as parallel arrays, with a node index.

`Observations` holds src, dst (address strings), rtt (ms, < 0 = failed) and time (s); the node set
is the union of sources and destinations, sorted, so a node's id is its index in `nodes` and
`lookup` maps query addresses to ids (-1 = never seen in train). `require_success` is the check
every `fit` starts with. Its own module so that the history and factorisation baselines
(`baselines`) and Vivaldi (`vivaldi`) share one input type without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from ping_llm.errors import InputError


def as_str_array(x, name: str) -> np.ndarray:
    """`x` as a 1-D array of str; InputError (naming `name`) if it is not 1-D."""
    a = np.asarray(x)
    if a.dtype.kind != "U":
        a = a.astype(str)
    if a.ndim != 1:
        raise InputError(f"{name} must be 1-D, got shape {a.shape}")
    return a


@dataclass(frozen=True, eq=False)
class Observations:
    """A train split as parallel arrays: src, dst address strings; rtt ms (< 0 = failed);
    time in seconds (any epoch; only the order matters). Build with `from_table` for a canonical
    Arrow table or directly from arrays (time defaults to input order)."""

    src: np.ndarray
    dst: np.ndarray
    rtt: np.ndarray
    time: np.ndarray | None = None

    def __post_init__(self):
        src, dst = as_str_array(self.src, "src"), as_str_array(self.dst, "dst")
        rtt = np.asarray(self.rtt, dtype=np.float64)
        n = len(src)
        time = np.zeros(n) if self.time is None else np.asarray(self.time, dtype=np.float64)
        if not (len(dst) == rtt.shape[0] == time.shape[0] == n) or rtt.ndim != 1 or time.ndim != 1:
            raise InputError("src, dst, rtt, time must be 1-D arrays of the same length")
        if not (np.all(np.isfinite(rtt)) and np.all(np.isfinite(time))):
            raise InputError("rtt and time must be finite (use -1.0 for a failed ping)")
        for name, val in (("src", src), ("dst", dst), ("rtt", rtt), ("time", time)):
            object.__setattr__(self, name, val)

    @classmethod
    def from_table(cls, table) -> Observations:
        """From a pyarrow Table with src_addr, dst_addr, rtt, event_time (timestamp of any unit,
        or epoch seconds)."""
        import pyarrow as pa

        missing = {"src_addr", "dst_addr", "rtt", "event_time"} - set(table.column_names)
        if missing:
            raise InputError(f"table lacks columns {sorted(missing)}")
        t = table.column("event_time")
        if pa.types.is_timestamp(t.type):
            per_s = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}[t.type.unit]
            secs = t.cast(pa.int64()).to_numpy(zero_copy_only=False) / per_s
        else:
            secs = t.to_numpy(zero_copy_only=False)
        return cls(table.column("src_addr").to_numpy(zero_copy_only=False),
                   table.column("dst_addr").to_numpy(zero_copy_only=False),
                   table.column("rtt").to_numpy(zero_copy_only=False), secs)

    def __len__(self) -> int:
        return len(self.rtt)

    @cached_property
    def ok(self) -> np.ndarray:
        return self.rtt >= 0

    @cached_property
    def _node_index(self) -> tuple[np.ndarray, np.ndarray]:
        return np.unique(np.concatenate([self.src, self.dst]), return_inverse=True)

    @property
    def nodes(self) -> np.ndarray:
        """Sorted distinct addresses over sources and destinations."""
        return self._node_index[0]

    @property
    def src_id(self) -> np.ndarray:
        return self._node_index[1][: len(self)]

    @property
    def dst_id(self) -> np.ndarray:
        return self._node_index[1][len(self):]


@dataclass(frozen=True, eq=False)
class SourceContext:
    """The k measurements a query's source brings as context (the same k the model is given):
    dst address strings and rtt ms (< 0 = failed), oldest first. Baselines that can use them
    implement `predict_in_context(src, dst, contexts)` -> (N,) medians (NaN where they cannot
    answer) and may implement `p_failed_in_context(src, dst, contexts)` -> (N,) P(failed)."""

    dst: np.ndarray
    rtt: np.ndarray

    def __post_init__(self):
        object.__setattr__(self, "dst", as_str_array(self.dst, "dst"))
        object.__setattr__(self, "rtt", np.asarray(self.rtt, dtype=np.float64).reshape(-1))
        if len(self.dst) != len(self.rtt):
            raise InputError("context dst and rtt must have the same length")

    def __len__(self) -> int:
        return len(self.rtt)


def group_contexts(src, contexts) -> tuple[np.ndarray, np.ndarray, list]:
    """Check the `predict_in_context` arguments ((N,) sources, N SourceContexts) and group the
    queries that share a source and an identical context, so a baseline folds each in once.
    -> (src as str array, group id per query (N,), [(source, SourceContext)] per group)."""
    src = as_str_array(src, "src")
    contexts = list(contexts)
    if len(contexts) != len(src):
        raise InputError(f"need one SourceContext per query: {len(contexts)} for {len(src)}")
    index: dict = {}
    gid = np.empty(len(src), dtype=np.int64)
    reps: list = []
    for n, (s, c) in enumerate(zip(src.tolist(), contexts, strict=True)):
        if not isinstance(c, SourceContext):
            raise InputError(f"contexts must be SourceContext objects, got {type(c).__name__}")
        key = (s, c.dst.tobytes(), c.rtt.tobytes())
        g = index.get(key)
        if g is None:
            g = index[key] = len(reps)
            reps.append((s, c))
        gid[n] = g
    return src, gid, reps


def lookup(nodes: np.ndarray, query) -> np.ndarray:
    """Index of each query string in the sorted `nodes`, -1 where absent."""
    q = as_str_array(query, "query")
    if len(nodes) == 0:
        return np.full(len(q), -1, dtype=np.int64)
    pos = np.minimum(np.searchsorted(nodes, q), len(nodes) - 1)
    return np.where(nodes[pos] == q, pos, -1).astype(np.int64)


def require_success(train: Observations) -> None:
    """InputError unless `train` is an Observations with at least one successful ping."""
    if not isinstance(train, Observations):
        raise InputError("fit expects an Observations (use Observations.from_table/arrays)")
    if not train.ok.any():
        raise InputError("train split has no successful ping to fit on")
