"""The query engine: latency questions answered exactly from a trained model.

A query is the token language read backwards: the caller's context measurements (optional), then
the query measurement with its known fields first in a fixed order (src, dst, [time]),
then the asked-for field, whose distribution the model gives token by token.

RTT (`Engine.rtt`, `Engine.rtt_many`). One KV-cached forward over `context MEASUREMENT_START src
dst [time]` gives the next field role; it is constrained to {RTT_START, FAILED} and renormalised
(the model must not wander into another field), which is P(failed). Feeding RTT_START gives byte1,
constrained to the 132 canonical byte1 values (a log-scale bin, 4 per octave) and renormalised.
The most probable bins that together carry >= 1 - 1e-4 of that mass (`BYTE2_MASS`) are refined:
one batched forward feeds all of a row's kept byte1 values as siblings of its next position
(`GPT.forward(..., siblings=True)`: each reads the row's cache, none copies it) and reads byte2
(256 codes per bin). The mass of the bins not refined (< 1e-4 of P(rtt | reply) in all) stays at the
centre code of its bin, so the byte1 histogram is exact and `coarse_mass` says how much sits
there. Nothing is sampled. (Tails matter for the mean: a model that spreads 1e-5 over bins of
hours moves the mean by seconds; median and quantiles are robust.)

`RTTDistribution`: `p_failed` plus a sparse pmf over 16-bit codes *conditional on a reply*
(`probs` sums to 1; the unconditional P(code) is (1 - p_failed) * probs). Quantiles, median,
mean and mode are of the RTT given a reply; `p_below(x)` is P(reply and RTT < x) unless
`given_reply=True`. Values are `tokens.RTT_GRID_MS[codes]` (the code's representative RTT).

Batching: the model has no attention mask, so `rtt_many` groups queries by token length (no
padding) and runs each group as one batch; a group first runs its longest common prefix once
(shared context, same source) and expands the cache. Every batch is cut so that its KV cache
stays under `kv_budget_bytes` (16 MiB on CPU, 1 GiB on CUDA by default).

Partial addresses (CIDR prefixes for src and/or dst). Known leading bits are fixed; each free byte
is a "hole" whose value is drawn from the model's own distribution, constrained to the allowed
range (a /20 leaves 16 values for its third byte) and renormalised. Because the src block comes
before the dst block and both before the result, this is exactly
P(rtt | prefixes) = sum over completions of P(completion | prefixes) P(rtt | full addresses).
Exact enumeration when the number of completions is <= `exact_limit` (1024 by default: up to
ten free bits, e.g. an IPv4 /22, or a /24 src with a /30 dst); Monte Carlo otherwise, over
`mc_samples` (512) ancestrally sampled completions (deduplicated, seeded, reported as `n_samples`)
with the RTT distribution of each completion still exact (Rao-Blackwellised). Both cost about one
full query per (distinct) completion, so the limit keeps exact answers within ~2x the Monte Carlo
cost.

Also: `rank` (candidates by predicted median or P(rtt < x)). `destinations` (top-k by beam
search or sampling, with exact P(dst | src)), `score` (log-probability per field: an anomaly
score) and `sample` (grammar-constrained synthetic streams) are Engine methods too, implemented
in `ping_llm.generate` (imported inside them: generate builds on this module, not the reverse).
Every query accepts the caller's recent measurements as context (`tokens.Measurement`, dicts,
tuples or RIPE Atlas ping results as downloaded). A run's calibration.json (`ping-llm calibrate`,
`ping_llm.calibration`) is applied to every distribution `rtt_many` returns, hence to `rtt`,
`rank`, partial addresses and the server; `Engine.load(..., calibrated=False)` gives the raw ones.
"""

from __future__ import annotations

import contextvars
import dataclasses
import math
import threading
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ping_llm import tokens as tk
from ping_llm.calibration import Calibration
from ping_llm.errors import InputError
from ping_llm.model import GPT, KVCache
from ping_llm.targets import (
    Query,
    as_context,
    as_query,
    parse_target,
    parse_time,
)

if TYPE_CHECKING:  # answer types of the methods implemented in ping_llm.generate
    from ping_llm.generate import Destination, Score

BYTE2_MASS = 1.0 - 1e-4  # byte1 bins refined to byte2: the most probable ones carrying this mass
EXACT_LIMIT = 1024  # partial addresses: enumerate exactly up to this many completions
MC_SAMPLES = 512  # ... and sample this many completions beyond it
# Cap on the KV cache of one batch (rows x positions x layers). Small on CPU: a fresh allocation
# of hundreds of MB page-faults, and copying prefixes into it then costs more than the forward.
KV_BUDGET_BYTES = {"cpu": 16 * 2**20, "cuda": 2**30}
# The result field's share of a query's cost, in token positions: the role, byte1 and the byte2
# rows of the refined bins (about 10-30 at BYTE2_MASS).
RESULT_COST = 32
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


# ----------------------------------------------------------------------------------------------
# the answer


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
    calibrated: bool = False  # the run's calibration map was applied (ping_llm.calibration)

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


@dataclass
class Ranked:
    dst: str
    rank: int  # 1 = best
    median_ms: float
    p_failed: float
    p_below: float | None  # P(reply and rtt < threshold) when a threshold was given
    dist: RTTDistribution

    def to_dict(self) -> dict:
        return {
            "dst": self.dst,
            "rank": self.rank,
            "median_ms": self.median_ms,
            "p_failed": self.p_failed,
            "p_below": self.p_below,
            "quantiles": {str(q): float(self.dist.quantile(q)) for q in (0.05, 0.5, 0.95)},
        }


@dataclass
class _Context:
    measurements: list
    tokens: list[int]
    last_time: int | None


@dataclass
class _Plan:
    prefix: np.ndarray  # int64 tokens up to the first hole (everything, for full addresses)
    rest: list  # tokens and (lo, hi) holes after it
    length: int  # total tokens before the result field
    n_completions: int
    seed: int = 0
    n_context: int = 0  # context measurements (which calibration map applies)
    src: str | None = None  # the source address (None: a prefix), for the calibration
    dst: str | None = None  # likewise the destination

    def cost(self, exact_limit: int, mc_samples: int) -> int:
        """Token positions the model computes for this query (an upper bound): the prefix once,
        then per completion (enumerated, or drawn beyond exact_limit) its tail and the result."""
        n = self.n_completions if self.n_completions <= exact_limit else mc_samples
        return len(self.prefix) + n * (len(self.rest) + RESULT_COST)


# ----------------------------------------------------------------------------------------------
# the engine


class Cancelled(Exception):
    """Raised inside a query whose CANCEL event was set (its asker went away)."""


# Set to a threading.Event around a call (in the thread that runs it) to make every model forward
# of that call check it: a long query stops within one forward of the event being set.
CANCEL: contextvars.ContextVar[threading.Event | None] = contextvars.ContextVar(
    "ping_llm_cancel", default=None
)


def softmax(logits: torch.Tensor) -> np.ndarray:
    """Probabilities in float64 on the CPU (sums that are exact enough to marginalise)."""
    return torch.softmax(logits.double(), dim=-1).cpu().numpy()


@dataclass
class _Rows:
    """RTT answers of R rows: P(failed), byte1 P(b1 | reply) over tk.CANON_B1, and byte2 of the
    refined (row, bin) pairs; unrefined bins put their mass on their centre code (byte2 0x80)."""

    p_failed: np.ndarray  # (R,)
    p1: np.ndarray  # (R, 132)
    keep: np.ndarray  # (R, 132) bool: refined
    rows: np.ndarray  # (K,) refined pairs, grouped by row
    bins: np.ndarray  # (K,)
    p2: np.ndarray  # (K, 256) P(b2 | b1, reply)

    def dense(self, weights: np.ndarray | None = None) -> np.ndarray:
        """(R, 132 * 256) P(code | reply) over tk.CANON_CODES, or, with weights (R,), their
        weighted sum (33792,)."""
        R = len(self.p1)
        coarse = self.p1 * ~self.keep
        if weights is None:
            out = np.zeros((R, len(tk.CANON_B1), 256))
            out[self.rows, self.bins] = self.p1[self.rows, self.bins][:, None] * self.p2
            out[:, :, 0x80] += coarse
            return out.reshape(R, -1)
        wk = weights[self.rows] * self.p1[self.rows, self.bins]
        idx = (self.bins[:, None] * 256 + np.arange(256)).ravel()
        out = np.bincount(idx, weights=(wk[:, None] * self.p2).ravel(), minlength=33792)
        out.reshape(-1, 256)[:, 0x80] += weights @ coarse
        return out

    def distributions(self) -> list[RTTDistribution]:
        out = []
        coarse = (self.p1 * ~self.keep).sum(1)
        for s in range(0, len(self.p1), 64):  # dense in slices of 64 rows (17 MB)
            part = _Rows(
                self.p_failed[s : s + 64],
                self.p1[s : s + 64],
                self.keep[s : s + 64],
                *self._pairs(s, s + 64),
            )
            for r, row in enumerate(part.dense()):
                nz = np.flatnonzero(row)
                pr = row[nz]
                out.append(
                    RTTDistribution(
                        float(part.p_failed[r]),
                        tk.CANON_CODES[nz].astype(np.uint16),
                        pr / pr.sum(),
                        coarse_mass=float(coarse[s + r]),
                    )
                )
        return out

    def _pairs(self, a: int, b: int):
        lo, hi = np.searchsorted(self.rows, [a, b])
        return self.rows[lo:hi] - a, self.bins[lo:hi], self.p2[lo:hi]


class Engine:
    """Exact latency answers from one GPT. Not thread-safe: serialise calls (the server does)."""

    def __init__(
        self,
        model: GPT,
        *,
        exact_limit: int = EXACT_LIMIT,
        mc_samples: int = MC_SAMPLES,
        kv_budget_bytes: int | None = None,
        byte2_mass: float = BYTE2_MASS,
        calibration: Calibration | None = None,
    ):
        self.model = model.eval()
        self.calibration = calibration
        self.config = model.config
        self.device = next(model.parameters()).device
        self.exact_limit = int(exact_limit)
        self.mc_samples = int(mc_samples)
        if kv_budget_bytes is None:
            kv_budget_bytes = KV_BUDGET_BYTES.get(self.device.type, KV_BUDGET_BYTES["cpu"])
        self.kv_budget_bytes = int(kv_budget_bytes)
        self.byte2_mass = float(byte2_mass)
        if not (self.exact_limit >= 1 and self.mc_samples >= 1 and 0 < self.byte2_mass <= 1):
            raise InputError("need exact_limit >= 1, mc_samples >= 1 and 0 < byte2_mass <= 1")
        c = self.config
        self._kv_bytes_per_token = c.n_layer * 2 * c.n_kv_head * c.head_dim * 4
        self.forwards = 0  # model forward calls so far (for stats and tests)

    @classmethod
    def load(cls, run_dir, device="cpu", calibrated: bool = True, geo_db=None, **kw) -> Engine:
        """An engine over the model of a run directory (`ping_llm.checkpoint.load_model`), with
        the run's calibration.json applied unless calibrated=False (none fitted: raw answers);
        geo_db: the address-knowledge database, for a run that reads one (default: its own)."""
        from ping_llm.checkpoint import find_checkpoint, load_model, read_meta

        model, _ = load_model(run_dir, device, geo_db=geo_db)
        cal = Calibration.load(run_dir) if calibrated else None
        if cal is not None:
            step = read_meta(find_checkpoint(run_dir) or Path(run_dir))["step"]
            if cal.fitted.get("step") != step:
                raise InputError(
                    f"{run_dir}: calibration.json was fitted at step {cal.fitted.get('step')}, "
                    f"the checkpoint is at step {step}; run `ping-llm calibrate` again (or "
                    "query without calibration)")
        return cls(model, calibration=cal, **kw)

    def _calibrate(self, d: RTTDistribution, plan: _Plan) -> RTTDistribution:
        c = self.calibration
        pop = c.population(plan.src, plan.dst)
        return dataclasses.replace(d, p_failed=c.p_failed(d.p_failed, pop),
                                   probs=c.probs(d.probs, plan.n_context, pop), calibrated=True)

    # -- plumbing ------------------------------------------------------------------------------

    def forward(self, idx, cache: KVCache | None, siblings: bool = False) -> torch.Tensor:
        """The model's logits (R, T, V) for token rows idx (R, T), extending cache; every query
        path (here and in `ping_llm.generate`) goes through it: it counts forwards and honours
        CANCEL."""
        stop = CANCEL.get()
        if stop is not None and stop.is_set():
            raise Cancelled("the query was cancelled")
        t = torch.as_tensor(np.asarray(idx, dtype=np.int64), device=self.device)
        self.forwards += 1
        with torch.inference_mode():
            logits, _ = self.model(t, kv_cache=cache, siblings=siblings)
        return logits  # (R, T, V) fp32

    def max_rows(self, max_len: int) -> int:
        """Rows of max_len tokens whose KV cache fits kv_budget_bytes."""
        return max(1, self.kv_budget_bytes // (max_len * self._kv_bytes_per_token))

    def context(self, context) -> _Context:
        """A context's tokens: measurements in any `targets.as_context` shape (our dicts or
        tuples, tokens.Measurement, RIPE Atlas ping results as downloaded)."""
        ms = as_context(context)
        toks = tk.encode_reference(ms)
        last = next((m.time for m in reversed(ms) if m.time is not None), None)
        return _Context(ms, toks, last)

    def check_len(self, n: int, what: str) -> None:
        """Refuse (InputError) a sequence of n tokens longer than the model's window."""
        if n > self.config.sequence_len:
            raise InputError(
                f"{what} needs {n} tokens, more than the model's sequence_len "
                f"{self.config.sequence_len}: shorten the context"
            )

    def _plan(self, q: Query, shared: _Context) -> _Plan:
        ctx = shared if q.context is None else self.context(q.context)
        src, dst = parse_target(q.src), parse_target(q.dst)
        if src.version != dst.version:
            raise InputError(f"mixed address families: {q.src} -> {q.dst}")
        time = parse_time(q.time)
        v4 = src.version == 4
        seq = ctx.tokens + [tk.MEASUREMENT_START, tk.SRC_IPV4 if v4 else tk.SRC_IPV6]
        seq += src.items() + [tk.DST_IPV4 if v4 else tk.DST_IPV6] + dst.items()
        if time is not None:
            seq += tk.time_tokens(time, ctx.last_time)
        self.check_len(len(seq) + 2, f"the query {q.src} -> {q.dst}")
        h = next((i for i, x in enumerate(seq) if isinstance(x, tuple)), len(seq))
        return _Plan(
            np.asarray(seq[:h], np.int64),
            seq[h:],
            len(seq),
            src.n_completions * dst.n_completions,
            int(q.seed),
            len(ctx.measurements),
            str(src) if src.is_full else None,
            str(dst) if dst.is_full else None,
        )

    def rtt_cost(self, queries, context=None) -> int:
        """What `rtt_many(queries, context)` would cost, in token positions the model computes
        (`_Plan.cost`), without running it; validates like rtt_many. The shared context is
        counted once (rtt_many runs a common prefix once), and so is a context object that
        several queries carry (the server gives each query the request's shared list)."""
        shared = self.context(context)
        total, seen = 0, {}
        for q in map(as_query, queries):
            total += self._plan(q, shared).cost(self.exact_limit, self.mc_samples)
            ctx = context if q.context is None else q.context
            if ctx is None:
                continue
            if id(ctx) in seen:  # its tokens are already counted
                total -= seen[id(ctx)]
            else:
                seen[id(ctx)] = len(self.context(ctx).tokens)
        return total

    def query_tokens(self, src, dst, time=None, context=None) -> list[int]:
        """The token prefix of an RTT query on full addresses (what the model reads)."""
        p = self._plan(Query(src, dst, time), self.context(context))
        if p.rest:
            raise InputError("query_tokens needs full addresses")
        return p.prefix.tolist()

    # -- RTT -------------------------------------------------------------------------------------

    def _finish(self, cache: KVCache, last: torch.Tensor) -> _Rows:
        """Rows after the known fields (cache at that position, their last logits) -> _Rows."""
        R = last.shape[0]
        role = softmax(last[:, [tk.RTT_START, tk.FAILED]])  # (R, 2)
        lg = self.forward(np.full((R, 1), tk.RTT_START), cache)[:, -1]
        p1 = softmax(lg[:, tk.BYTE0 + tk.CANON_B1])  # (R, 132)
        srt = -np.sort(-p1, axis=1)
        n_keep = np.minimum((np.cumsum(srt, axis=1) < self.byte2_mass).sum(1) + 1, len(tk.CANON_B1))
        keep = p1 >= srt[np.arange(R), n_keep - 1][:, None]
        rows, bins = np.nonzero(keep)  # row-major: grouped by row, bins ascending
        # Every kept bin of a row is one sibling of that row's next position (GPT.forward's
        # `siblings`): all of them read the row's cache in one forward, none copies it. Rows
        # keep different numbers of bins; the shorter ones are padded with bins not kept (their
        # answers are dropped). Rows per forward: its attention scores within the KV budget.
        n_kept = keep.sum(1)
        K = int(n_kept.max())
        order = np.argsort(~keep, axis=1, kind="stable")[:, :K]  # kept bins first, ascending
        b1 = tk.BYTE0 + tk.CANON_B1[order]  # (R, K)
        c = self.config
        step = max(1, self.kv_budget_bytes // (K * (cache.pos + K) * c.n_head * 8))
        p2 = np.empty((R, K, 256))
        for s in range(0, R, step):
            sub = cache.narrow(s, min(s + step, R))
            logits = self.forward(b1[s : s + step], sub, siblings=True)  # (rows, K, V)
            p2[s : s + step] = softmax(logits[..., tk.BYTE0 :])
        p2 = p2[np.arange(K)[None, :] < n_kept[:, None]]  # (kept pairs, 256), row-major
        return _Rows(role[:, 1], p1, keep, rows, bins, p2)

    def _rtt_bucket(self, prefixes: np.ndarray) -> _Rows:
        """Same-length full-address queries (B, L) -> `_finish` rows; shared prefix runs once."""
        B, L = prefixes.shape
        same = np.all(prefixes == prefixes[0], axis=0)
        lcp = min(int(np.argmin(same)) if not same.all() else L, L - 1)
        root = KVCache(self.config, 1, L + 2)
        self.forward(prefixes[:1, :lcp], root)
        cache = root.expand(B) if B > 1 else root
        last = self.forward(prefixes[:, lcp:], cache)[:, -1]
        return self._finish(cache, last)

    def _walk(self, cache, last, w, counts, rest, mix, rng, n_total) -> None:
        """Expand the holes of a partial-address query (exact or sampled), then finish each row."""
        while True:
            i = 0
            while i < len(rest) and not isinstance(rest[i], tuple):
                i += 1
            R = last.shape[0]
            if i:
                last = self.forward(np.tile(np.asarray(rest[:i], np.int64), (R, 1)), cache)[:, -1]
                rest = rest[i:]
            if not rest:
                mix.add(w, self._finish(cache, last))
                return
            lo, hi = rest[0]
            n = hi - lo + 1
            p = softmax(last[:, tk.BYTE0 + lo : tk.BYTE0 + hi + 1])  # (R, n)
            if counts is None:  # exact: every value, weighted
                parent, val = np.repeat(np.arange(R), n), np.tile(np.arange(n), R)
                cw, cc = w[parent] * p.ravel(), None
            else:  # Monte Carlo: each of a row's `counts` draws picks a value
                idx = np.repeat(np.arange(R), counts)
                cdf = np.cumsum(p, axis=1)
                v = np.minimum((rng.random(len(idx))[:, None] >= cdf[idx]).sum(1), n - 1)
                key, cc = np.unique(idx * n + v, return_counts=True)
                parent, val = key // n, key % n
                cw = cc / n_total
            toks = (tk.BYTE0 + lo + val)[:, None]
            step = self.max_rows(cache.max_len)
            if len(parent) <= step:  # one chunk: iterate, so the parent cache can be freed
                cache = cache.select(parent)
                last = self.forward(toks, cache)[:, -1]
                w, counts, rest = cw, cc, rest[1:]
                continue
            for s in range(0, len(parent), step):
                sub = cache.select(parent[s : s + step])
                lg = self.forward(toks[s : s + step], sub)[:, -1]
                c = None if cc is None else cc[s : s + step]
                self._walk(sub, lg, cw[s : s + step], c, rest[1:], mix, rng, n_total)
            return

    def _rtt_partial(self, plan: _Plan) -> RTTDistribution:
        mc = plan.n_completions > self.exact_limit
        cache = KVCache(self.config, 1, plan.length + 2)
        last = self.forward(plan.prefix[None], cache)[:, -1]
        mix = _Mixture()
        counts = np.array([self.mc_samples]) if mc else None
        rng = np.random.default_rng(plan.seed)
        self._walk(cache, last, np.ones(1), counts, plan.rest, mix, rng, self.mc_samples)
        return mix.result(exact=not mc, n_samples=self.mc_samples if mc else None)

    def rtt(self, src, dst, time=None, context=None, seed: int = 0) -> RTTDistribution:
        """P(failed) and the exact RTT distribution for src -> dst (addresses or CIDR prefixes)."""
        return self.rtt_many([Query(src, dst, time, None, seed)], context=context)[0]

    def rtt_many(self, queries, context=None) -> list[RTTDistribution]:
        """Many RTT questions at once, answers in order. Each query: Query, dict or (src, dst[,
        time]); `context` is shared by the queries that do not bring their own."""
        shared = self.context(context)
        plans = [self._plan(as_query(q), shared) for q in queries]  # validate everything first
        out: list[RTTDistribution | None] = [None] * len(plans)
        buckets = defaultdict(list)
        for i, p in enumerate(plans):
            if p.rest:
                out[i] = self._rtt_partial(p)
            else:
                buckets[len(p.prefix)].append(i)
        for L, idx in buckets.items():
            step = self.max_rows(L + 2)
            for s in range(0, len(idx), step):
                chunk = idx[s : s + step]
                rows = self._rtt_bucket(np.stack([plans[i].prefix for i in chunk]))
                for i, d in zip(chunk, rows.distributions(), strict=True):
                    out[i] = d
        if self.calibration is not None:
            out = [self._calibrate(d, p) for d, p in zip(out, plans, strict=True)]
        return out

    # -- rank --------------------------------------------------------------------------------------

    def rank(self, src, candidates, by="median", threshold_ms=None, time=None, context=None):
        """Candidates ordered best first: by predicted median (given a reply; ties keep input
        order) or by P(reply and rtt < threshold_ms) (by="p_below", descending)."""
        candidates = list(candidates) if not isinstance(candidates, str) else [candidates]
        if not candidates:
            raise InputError("rank needs at least one candidate destination")
        if by not in ("median", "p_below"):
            raise InputError(f"rank by 'median' or 'p_below', not {by!r}")
        if threshold_ms is not None:
            threshold_ms = float(threshold_ms)
            if not (math.isfinite(threshold_ms) and threshold_ms > 0):
                raise InputError(f"threshold_ms must be a positive number, got {threshold_ms}")
        if by == "p_below" and threshold_ms is None:
            raise InputError("rank by p_below needs threshold_ms")
        dists = self.rtt_many([Query(src, c, time) for c in candidates], context=context)
        below = [None if threshold_ms is None else d.p_below(threshold_ms) for d in dists]
        key = [d.median if by == "median" else -b for d, b in zip(dists, below, strict=True)]
        order = sorted(range(len(candidates)), key=lambda i: (key[i], i))
        return [
            Ranked(
                str(candidates[i]), r + 1, dists[i].median, dists[i].p_failed, below[i], dists[i]
            )
            for r, i in enumerate(order)
        ]

    # -- destinations, score, sample: implemented in ping_llm.generate ----------------------------

    def destinations(
        self,
        src,
        k: int = 10,
        *,
        rtt_below=None,
        within=None,
        time=None,
        context=None,
        method: str = "beam",
        beam: int | None = None,
        seed: int = 0,
        with_rtt: bool = True,
    ) -> list[Destination]:
        """Likely destinations for src: the top k by beam search over the dst bytes (method="beam",
        width `beam`, default max(4k, 64)), or k ancestral draws (method="sample": the distinct
        destinations drawn, with their counts). `p` is P(dst | src[, time, context][, dst in
        `within`]); `within` is a CIDR prefix the destination must lie in; rtt_below=x also
        conditions on a reply faster than x ms; with_rtt attaches `rtt(src, dst)`. How:
        `ping_llm.generate.destinations`."""
        from ping_llm import generate

        return generate.destinations(
            self,
            src,
            k,
            rtt_below=rtt_below,
            within=within,
            time=time,
            context=context,
            method=method,
            beam=beam,
            seed=seed,
            with_rtt=with_rtt,
        )

    def score(self, measurement, context=None, order=None) -> Score:
        """Log-probability per field of an observed measurement (an anomaly score)."""
        from ping_llm import generate

        return generate.score(self, measurement, context=context, order=order)

    def score_many(self, measurements, context=None, orders=None) -> list[Score]:
        """`score` for many measurements (each scored after the same context), in order."""
        from ping_llm import generate

        return generate.score_many(self, measurements, context=context, orders=orders)

    def sample(self, n: int, src=None, *, seed: int = 0, context=None, temperature: float = 1.0):
        """A synthetic stream of n measurements (list[tokens.Measurement]) continuing the context;
        with src, every measurement's source is src (a probe-centric stream), written first.
        Every measurement follows the grammar, so it decodes; a stream longer than the context
        window rolls over (`ping_llm.generate.sample`)."""
        from ping_llm import generate

        return generate.sample(self, n, src, seed=seed, context=context, temperature=temperature)


class _Mixture:
    """Weighted mixture of `_Rows` (the completions of a partial-address query)."""

    def __init__(self):
        self.pmf = np.zeros(len(tk.CANON_CODES))  # sum of w * (1 - p_failed) * P(code | reply)
        self.p_failed = self.coarse = self.total = 0.0
        self.rows = 0

    def add(self, w: np.ndarray, rows: _Rows) -> None:
        ok = w * (1 - rows.p_failed)
        self.pmf += rows.dense(ok)
        self.p_failed += float(w @ rows.p_failed)
        self.coarse += float(ok @ (rows.p1 * ~rows.keep).sum(1))
        self.total += float(w.sum())
        self.rows += len(w)

    def result(self, exact: bool, n_samples: int | None) -> RTTDistribution:
        nz = np.flatnonzero(self.pmf)
        ok = self.pmf[nz].sum()
        return RTTDistribution(
            self.p_failed / self.total,
            tk.CANON_CODES[nz].astype(np.uint16),
            self.pmf[nz] / ok,
            exact=exact,
            n_samples=n_samples,
            n_completions=self.rows,
            coarse_mass=self.coarse / ok,
        )
