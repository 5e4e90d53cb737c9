"""The context sampler: which measurements of a probe's row make a training context (docs/data.md).

Context sampler (`sample_context`). Timestamp mode: full (time order, every measurement
timestamped), none (shuffled, no timestamps) or partial (a fraction U(0.1, 0.9) timestamped and in
time order, the rest shuffled in at random positions), with probabilities 0.4/0.3/0.3. A time
window of duration D, log-uniform between D_min (the span holding window_slack = 1.2 times the
needed measurements at the row's average rate) and the row's whole span, starts uniformly inside
the row (a stretch too sparse to fill the sequence is widened around its middle); a uniform random
subset of its measurements, kept in time order, is grown or shrunk until its exact token count is
as close to the budget as whole measurements allow (never above; a measurement is never cut).
Field order is drawn per measurement (tokens.random_orders). The whole batch is then encoded with
one `tokens.encode` call (contexts separated by `reset`, so each starts with an absolute
timestamp).

Identity augmentation (SamplerConfig.readdress_src / readdress_dst, `readdress`): in a fraction of
contexts the source's addresses (or the destinations') are replaced by new ones, the same real
address by the same new one throughout the context, so those contexts can only be predicted by
reading them. Its random stream is separate (salted by item), so with both fractions 0 every batch
is exactly what it was without the option.

`data.loader` calls `sample_context` for every context of a batch and `readdressed` for the
contexts drawn for identity augmentation; the row format is `data.rows`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ping_llm import tokens
from ping_llm.data.rows import Row, base_lengths, time_lengths
from ping_llm.errors import InputError

MODES = ("full", "none", "partial")
MIN_MEASUREMENT_TOKENS = 12  # IPv4, failed, no timestamp: START + 5 + 5 + FAILED
# Bits of the real address kept when a new address stays inside the real network: a random
# prefix length between a large allocation and a single customer network.
KEEP_BITS = {4: (8, 24), 6: (16, 48)}


@dataclass
class SamplerConfig:
    """How contexts are drawn. Probabilities are of the modes full / none / partial."""

    seq_len: int = 1024
    mode_probs: tuple[float, float, float] = (0.4, 0.3, 0.3)
    partial_range: tuple[float, float] = (0.1, 0.9)  # fraction timestamped in partial mode
    window_slack: float = 1.2  # smallest window holds this many times the needed measurements
    # Identity augmentation (see `readdress`): the fraction of contexts whose source addresses,
    # or whose destination addresses, are replaced by new ones, consistently within the context.
    readdress_src: float = 0.0
    readdress_dst: float = 0.0
    readdress_keep: float = 0.5  # of the new addresses, the fraction inside the real network
    # With address knowledge: a new address keeps its real address's features (the batch also
    # carries the tokens of the real addresses, which the features are computed from), so the
    # model learns that an unfamiliar address still sits where the database says -- as a new
    # probe's real address does -- instead of that the database is wrong a quarter of the time.
    readdress_knowledge: bool = False

    def __post_init__(self):
        if not (isinstance(self.seq_len, int) and self.seq_len >= 64):
            raise InputError(f"seq_len must be an integer >= 64, got {self.seq_len!r}")
        p = np.asarray(self.mode_probs, dtype=np.float64)
        if p.shape != (3,) or (p < 0).any() or not math.isclose(p.sum(), 1.0, abs_tol=1e-9):
            raise InputError(f"mode_probs must be 3 non-negative numbers summing to 1: {p}")
        lo, hi = self.partial_range
        if not 0 <= lo <= hi <= 1:
            raise InputError(f"partial_range must satisfy 0 <= lo <= hi <= 1: {self.partial_range}")
        self.mode_probs = tuple(float(x) for x in p)
        self.partial_range = (float(lo), float(hi))
        for name in ("readdress_src", "readdress_dst", "readdress_keep"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v <= 1:
                raise InputError(f"{name} must be a fraction in [0, 1], got {v!r}")
            setattr(self, name, float(v))
        if not isinstance(self.readdress_knowledge, bool):
            raise InputError(f"readdress_knowledge must be true or false, got "
                             f"{self.readdress_knowledge!r}")


@dataclass
class SampledContext:
    """One sampled context: row indices in sequence order and which carry a timestamp."""

    sel: np.ndarray  # (k,) int64 indices into the row
    has_time: np.ndarray  # (k,) bool
    order: np.ndarray  # (k, 4) int8 field orders
    mode: str
    n_tokens: int
    window: tuple[float, float, float] | None = None  # (D, D_min, D_max) seconds, None = whole row
    window_start: int | None = None  # epoch seconds
    info: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------
# the context sampler


def _distinct(rng: np.random.Generator, m: int, size: int) -> np.ndarray:
    """`size` distinct integers of [0, m) in random order: every prefix is a uniform subset."""
    if 4 * size >= m:
        return rng.permutation(m)[:size]
    x = rng.integers(0, m, size=size + size // 8 + 8)
    _, first = np.unique(x, return_index=True)
    out = x[np.sort(first)]
    while len(out) < size:  # rare: collisions ate more than the margin
        more = rng.integers(0, m, size=size)
        out = np.concatenate([out, more[~np.isin(more, out)]])
        _, first = np.unique(out, return_index=True)
        out = out[np.sort(first)]
    return out[:size]


def _time_flags(rng, mode: str, frac: float, n: int) -> np.ndarray:
    return rng.random(n) < frac if mode == "partial" else np.full(n, mode == "full")


def _longest_fit(row: Row, cand: np.ndarray, ht_c: np.ndarray, budget: int, est: float):
    """Largest k such that candidates cand[:k], encoded in time order, take <= budget tokens;
    returns (k, tokens). The count grows with k (a measurement adds >= 12 tokens and can shorten
    its successor's timestamp by at most 3), so a few exact evaluations stepping by the error
    find it."""
    prefix = np.concatenate([[0], np.cumsum(base_lengths(row.version[row.src[cand]],
                                                         row.failed[cand]))])
    t_c = row.toff[cand].astype(np.int64)

    def total(k: int) -> int:
        o = np.argsort(cand[:k], kind="stable")
        return int(prefix[k] + time_lengths(t_c[:k][o], ht_c[:k][o]).sum())

    n = len(cand)
    k = int(np.searchsorted(prefix + 2.0 * np.cumsum(np.r_[0, ht_c]), budget, "right")) - 1
    k = max(0, min(k, n))
    lo_ok, lo_tokens, hi_bad = 0, 0, n + 1  # largest k known to fit, smallest known to overflow
    while hi_bad > lo_ok + 1:
        tk = total(k)
        if tk > budget:
            hi_bad = k
            k = max(lo_ok + 1, min(k - 1, k - int((tk - budget) / est)))
            if k >= hi_bad:
                break
        else:
            lo_ok, lo_tokens = k, tk
            if k == n:
                break
            k = min(hi_bad - 1, max(k + 1, k + int((budget - tk) / (est + 9))))
    return lo_ok, lo_tokens


def sample_context(row: Row, budget: int, rng: np.random.Generator, cfg: SamplerConfig,
                   mean_base: float | None = None) -> SampledContext:
    """Draw one context of at most `budget` tokens from `row` (see the module docstring).

    Candidates are distinct random rows of the window in random priority order; the context is
    the longest prefix of them that fits (token count is monotone in the prefix length, so a few
    exact evaluations find it), re-sorted by time.
    """
    n = row.n
    mode = MODES[min(2, int(np.searchsorted(np.cumsum(cfg.mode_probs), rng.random(), "right")))]
    frac = {"full": 1.0, "none": 0.0}.get(mode)
    if frac is None:
        frac = float(rng.uniform(*cfg.partial_range))
    if mean_base is None:
        mean_base = float(base_lengths(row.version[row.src], row.failed).mean())
    span = float(row.t1 - row.t0)
    # Timestamp tokens of a subsample: DELTA1 (2) when the mean gap is < 256 s, else DELTA4 (5).
    gap = span / max(n, 1) * max(1.0, n * mean_base / budget)
    est = mean_base + frac * (2.0 if gap < tokens.DELTA1_LIMIT else 5.0)
    need = budget / est
    window = start = None
    widened = False
    if n <= 1.25 * need or span <= 0:
        a, b = 0, n
    else:
        d_max = span
        d_min = min(d_max, max(1.0, span * cfg.window_slack * need / n))
        d = min(d_max, float(np.exp(rng.uniform(np.log(d_min), np.log(d_max)))))
        start = row.t0 + float(rng.uniform(0.0, span - d))
        a = int(np.searchsorted(row.toff, start - row.t0, "left"))
        b = int(np.searchsorted(row.toff, start - row.t0 + d, "right"))
        window = (d, d_min, d_max)
        if b - a < 1.25 * need:  # a sparse stretch: widen around its middle to enough rows
            want = min(n, int(math.ceil(1.25 * need)))
            widened = True
            mid = (a + b) // 2
            a = max(0, min(mid - want // 2, n - want))
            b = a + want
    m = b - a
    cand = a + _distinct(rng, m, min(m, int(1.5 * need) + 16))
    ht_c = _time_flags(rng, mode, frac, len(cand))
    while True:
        k, n_tokens = _longest_fit(row, cand, ht_c, budget, est)
        if k < len(cand) or len(cand) == m:
            break
        # Every candidate fit (shorter measurements than estimated): add more of the window, in
        # random order after the current ones, so every prefix stays a uniform random subset.
        rest = rng.permutation(np.setdiff1d(np.arange(a, b), cand))[: len(cand)]
        cand = np.concatenate([cand, rest])
        ht_c = np.concatenate([ht_c, _time_flags(rng, mode, frac, len(rest))])
    o = np.argsort(cand[:k], kind="stable")
    sel, ht = cand[:k][o], ht_c[:k][o]
    if mode == "none":
        perm = rng.permutation(k)
    elif mode == "partial":  # timestamped ones keep time order in random slots, the rest fill in
        slots = rng.permutation(k)
        n_ts = int(ht.sum())
        perm = np.empty(k, np.int64)
        perm[np.sort(slots[:n_ts])] = np.flatnonzero(ht)
        perm[slots[n_ts:]] = rng.permutation(np.flatnonzero(~ht))
    else:
        perm = np.arange(k)
    return SampledContext(
        sel=sel[perm].astype(np.int64),
        has_time=ht[perm],
        order=tokens.random_orders(rng, k),
        mode=mode,
        n_tokens=n_tokens,
        window=window,
        window_start=None if start is None else int(start),
        info={"frac": frac, "window_rows": (a, b), "widened": widened},
    )



def readdress(addr: np.ndarray, version: np.ndarray, rng: np.random.Generator,
              keep: float) -> np.ndarray:
    """New addresses (m, 16) uint8 for m distinct addresses of one context (identity augmentation).

    Why: trained on a few hundred probes, the model can predict a context's RTTs from who the
    source is (memory) and never needs to read the context; a new probe then gets a memorised
    neighbour's latency with full confidence. Re-addressed contexts can only be predicted from
    what they contain, which is exactly the in-context skill a cold source needs.

    Each address independently becomes, with probability `keep`, the real address with only its
    first L bits kept (L uniform in KEEP_BITS: a new host inside its real network, so coarse
    address knowledge still applies), else a uniformly random global unicast address (IPv4 first
    byte 1-223, IPv6 in 2000::/3). Versions are kept, so token lengths do not change.
    """
    addr = np.asarray(addr, dtype=np.uint8)
    m = len(addr)
    v4 = np.asarray(version) == 4
    out = rng.integers(0, 256, size=(m, 16), dtype=np.uint8)
    out[v4, 4:] = 0
    out[v4, 0] = rng.integers(1, 224, size=int(v4.sum()), dtype=np.uint8)
    out[~v4, 0] = 0x20 | (out[~v4, 0] & 0x1F)
    lo = np.where(v4, KEEP_BITS[4][0], KEEP_BITS[6][0])
    hi = np.where(v4, KEEP_BITS[4][1], KEEP_BITS[6][1])
    bits = np.where(rng.random(m) < keep, rng.integers(lo, hi + 1), 0)  # (m,)
    kept = np.clip(bits[:, None] - 8 * np.arange(16)[None, :], 0, 8)  # (m, 16) bits per byte
    mask = ((0xFF00 >> kept) & 0xFF).astype(np.uint8)
    return (addr & mask) | (out & ~mask)


def readdressed(idx: np.ndarray, row: Row, rng: np.random.Generator, keep: float) -> np.ndarray:
    """Addresses (n, 16) for the row's address indices `idx`, re-addressed consistently: the
    same real address gets the same new one everywhere in the context."""
    uniq, inv = np.unique(idx, return_inverse=True)
    return readdress(row.addr[uniq], row.version[uniq], rng, keep)[inv]
