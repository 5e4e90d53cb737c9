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

The answer is a `query.distribution.RTTDistribution` (P(failed) and the pmf given a reply).

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
in `ping_llm.query.generate`. Both modules run the model through `query.runner.Runner` (the
forward, the KV budget, the window), so generate needs nothing of this module.
Every query accepts the caller's recent measurements as context (`tokens.Measurement`, dicts,
tuples or RIPE Atlas ping results as downloaded). A run's calibration.json (`ping-llm calibrate`,
`ping_llm.query.calibration`) is applied to every distribution `rtt_many` returns, hence to `rtt`,
`rank`, partial addresses and the server; `Engine.load(..., calibrated=False)` gives the raw ones.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ping_llm import tokens as tk
from ping_llm.checkpoint import find_checkpoint, load_model, read_meta
from ping_llm.errors import InputError
from ping_llm.model import GPT, KVCache
from ping_llm.query import generate
from ping_llm.query.calibration import Calibration
from ping_llm.query.distribution import RTTDistribution
from ping_llm.query.generate import Destination, Score
from ping_llm.query.runner import ContextTokens, Runner, softmax
from ping_llm.query.targets import Query, as_query, parse_target, parse_time

BYTE2_MASS = 1.0 - 1e-4  # byte1 bins refined to byte2: the most probable ones carrying this mass
EXACT_LIMIT = 1024  # partial addresses: enumerate exactly up to this many completions
MC_SAMPLES = 512  # ... and sample this many completions beyond it
# The result field's share of a query's cost, in token positions: the role, byte1 and the byte2
# rows of the refined bins (about 10-30 at BYTE2_MASS).
RESULT_COST = 32


# ----------------------------------------------------------------------------------------------
# the answer


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
        self.runner = Runner(model, kv_budget_bytes)
        self.model, self.config, self.device = model, self.runner.config, self.runner.device
        self.calibration = calibration
        self.exact_limit = int(exact_limit)
        self.mc_samples = int(mc_samples)
        self.byte2_mass = float(byte2_mass)
        if not (self.exact_limit >= 1 and self.mc_samples >= 1 and 0 < self.byte2_mass <= 1):
            raise InputError("need exact_limit >= 1, mc_samples >= 1 and 0 < byte2_mass <= 1")

    @classmethod
    def load(cls, run_dir, device="cpu", calibrated: bool = True, geo_db=None, **kw) -> Engine:
        """An engine over the model of a run directory (`ping_llm.checkpoint.load_model`), with
        the run's calibration.json applied unless calibrated=False (none fitted: raw answers);
        geo_db: the address-knowledge database, for a run that reads one (default: its own)."""
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

    # -- planning ------------------------------------------------------------------------------

    def _plan(self, q: Query, shared: ContextTokens) -> _Plan:
        ctx = shared if q.context is None else self.runner.context(q.context)
        src, dst = parse_target(q.src), parse_target(q.dst)
        if src.version != dst.version:
            raise InputError(f"mixed address families: {q.src} -> {q.dst}")
        time = parse_time(q.time)
        seq = ctx.tokens + tk.query_prefix(src.version, src.items(), dst.items(), time,
                                           ctx.last_time)
        self.runner.check_len(len(seq) + 2, f"the query {q.src} -> {q.dst}")
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
        shared = self.runner.context(context)
        total, seen = 0, {}
        for q in map(as_query, queries):
            total += self._plan(q, shared).cost(self.exact_limit, self.mc_samples)
            ctx = context if q.context is None else q.context
            if ctx is None:
                continue
            if id(ctx) in seen:  # its tokens are already counted
                total -= seen[id(ctx)]
            else:
                seen[id(ctx)] = len(self.runner.context(ctx).tokens)
        return total

    def query_tokens(self, src, dst, time=None, context=None) -> list[int]:
        """The token prefix of an RTT query on full addresses (what the model reads)."""
        p = self._plan(Query(src, dst, time), self.runner.context(context))
        if p.rest:
            raise InputError("query_tokens needs full addresses")
        return p.prefix.tolist()

    # -- RTT -------------------------------------------------------------------------------------

    def _finish(self, cache: KVCache, last: torch.Tensor) -> _Rows:
        """Rows after the known fields (cache at that position, their last logits) -> _Rows."""
        R = last.shape[0]
        role = softmax(last[:, [tk.RTT_START, tk.FAILED]])  # (R, 2)
        lg = self.runner.forward(np.full((R, 1), tk.RTT_START), cache)[:, -1]
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
        step = max(1, self.runner.kv_budget_bytes // (K * (cache.pos + K) * c.n_head * 8))
        p2 = np.empty((R, K, 256))
        for s in range(0, R, step):
            sub = cache.narrow(s, min(s + step, R))
            logits = self.runner.forward(b1[s : s + step], sub, siblings=True)  # (rows, K, V)
            p2[s : s + step] = softmax(logits[..., tk.BYTE0 :])
        p2 = p2[np.arange(K)[None, :] < n_kept[:, None]]  # (kept pairs, 256), row-major
        return _Rows(role[:, 1], p1, keep, rows, bins, p2)

    def _rtt_bucket(self, prefixes: np.ndarray) -> _Rows:
        """Same-length full-address queries (B, L) -> `_finish` rows; shared prefix runs once."""
        B, L = prefixes.shape
        same = np.all(prefixes == prefixes[0], axis=0)
        lcp = min(int(np.argmin(same)) if not same.all() else L, L - 1)
        root = KVCache(self.config, 1, L + 2)
        self.runner.forward(prefixes[:1, :lcp], root)
        cache = root.expand(B) if B > 1 else root
        last = self.runner.forward(prefixes[:, lcp:], cache)[:, -1]
        return self._finish(cache, last)

    def _walk(self, cache, last, w, counts, rest, mix, rng, n_total) -> None:
        """Expand the holes of a partial-address query (exact or sampled), then finish each row."""
        while True:
            i = 0
            while i < len(rest) and not isinstance(rest[i], tuple):
                i += 1
            R = last.shape[0]
            if i:
                toks = np.tile(np.asarray(rest[:i], np.int64), (R, 1))
                last = self.runner.forward(toks, cache)[:, -1]
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
            step = self.runner.max_rows(cache.max_len)
            if len(parent) <= step:  # one chunk: iterate, so the parent cache can be freed
                cache = cache.select(parent)
                last = self.runner.forward(toks, cache)[:, -1]
                w, counts, rest = cw, cc, rest[1:]
                continue
            for s in range(0, len(parent), step):
                sub = cache.select(parent[s : s + step])
                lg = self.runner.forward(toks[s : s + step], sub)[:, -1]
                c = None if cc is None else cc[s : s + step]
                self._walk(sub, lg, cw[s : s + step], c, rest[1:], mix, rng, n_total)
            return

    def _rtt_partial(self, plan: _Plan) -> RTTDistribution:
        mc = plan.n_completions > self.exact_limit
        cache = KVCache(self.config, 1, plan.length + 2)
        last = self.runner.forward(plan.prefix[None], cache)[:, -1]
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
        shared = self.runner.context(context)
        plans = [self._plan(as_query(q), shared) for q in queries]  # validate everything first
        out: list[RTTDistribution | None] = [None] * len(plans)
        buckets = defaultdict(list)
        for i, p in enumerate(plans):
            if p.rest:
                out[i] = self._rtt_partial(p)
            else:
                buckets[len(p.prefix)].append(i)
        for L, idx in buckets.items():
            step = self.runner.max_rows(L + 2)
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

    # -- destinations, score, sample: implemented in ping_llm.query.generate --------------------

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
        `ping_llm.query.generate.destinations`."""
        out = generate.destinations(self.runner, src, k, rtt_below=rtt_below, within=within,
                                    time=time, context=context, method=method, beam=beam,
                                    seed=seed)
        if with_rtt and out:
            dists = self.rtt_many([Query(src, d.dst, time) for d in out], context=context)
            for d, r in zip(out, dists, strict=True):
                d.rtt = r
        return out

    def score(self, measurement, context=None, order=None) -> Score:
        """Log-probability per field of an observed measurement (an anomaly score)."""
        return generate.score(self.runner, measurement, context=context, order=order)

    def score_many(self, measurements, context=None, orders=None) -> list[Score]:
        """`score` for many measurements (each scored after the same context), in order."""
        return generate.score_many(self.runner, measurements, context=context, orders=orders)

    def sample(self, n: int, src=None, *, seed: int = 0, context=None, temperature: float = 1.0):
        """A synthetic stream of n measurements (list[tokens.Measurement]) continuing the context;
        with src, every measurement's source is src (a probe-centric stream), written first.
        Every measurement follows the grammar, so it decodes; a stream longer than the context
        window rolls over (`query.generate.sample`)."""
        return generate.sample(self.runner, n, src, seed=seed, context=context,
                               temperature=temperature)


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
