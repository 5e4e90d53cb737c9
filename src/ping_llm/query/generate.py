"""Beyond RTT: likely destinations, anomaly scores and synthetic streams from the model.

These are the queries that walk other fields than the result, so they live apart from the RTT
core (`query.engine`): `Engine.destinations`, `Engine.score`/`score_many` and `Engine.sample`
call the functions here with the engine's `query.runner.Runner`, which provides the model
forward, the KV budget (`max_rows`), the context encoding and the window check (`check_len`).

- `destinations`: top-k destinations of a source by beam search over the dst bytes (or ancestral
  sampling), with exact P(dst | src[, time, context][, dst in `within`]). With `rtt_below` the
  result field comes first and the search runs over the mixture, weighted exactly, of one
  component per RTT byte1 bin below the bound.
- `teacher_forced` / `score`/`score_many`: the log-probability (nats) of each field of observed
  measurements given what precedes them (an anomaly score; eval's token NLL), plus log P(result |
  preceding fields) constrained to the result grammar as in `Engine.rtt`. Sequences of similar
  length run as one batch.
- `sample`: synthetic measurement streams drawn token by token under the grammar (roles not yet
  used, one address family, canonical RTT byte1, deltas only after a timestamp), so every
  measurement decodes; a stream longer than the context window rolls over.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ping_llm import tokens as tk
from ping_llm.errors import InputError
from ping_llm.model import KVCache
from ping_llm.query.distribution import RTTDistribution
from ping_llm.query.runner import Runner, softmax
from ping_llm.query.targets import Target, as_measurement, parse_target, parse_time

_MAX_MEAS_TOKENS = 1 + 17 + 17 + 9 + 3  # MEASUREMENT_START + IPv6 src + dst + ABS time + RTT


@dataclass
class Destination:
    dst: str
    p: float  # P(dst | src[, time, context][, rtt < bound][, dst in `within`])
    log_p: float
    count: int | None = None  # draws that hit it (method="sample")
    rtt: RTTDistribution | None = None

    def to_dict(self) -> dict:
        out = {"dst": self.dst, "p": self.p, "log_p": self.log_p, "count": self.count}
        if self.rtt is not None:
            out.update(median_ms=self.rtt.median, p_failed=self.rtt.p_failed)
        return out


@dataclass
class Score:
    """Log-probabilities (nats) of one measurement's tokens, per field, given what precedes."""

    fields: dict[str, float]  # "src", "dst", "result", and "time" when present: role + bytes
    start: float | None  # MEASUREMENT_START (None without context: position 0 is not predicted)
    total: float  # sum of the above
    result_conditional: float  # log P(result | preceding fields), constrained as in `rtt`
    n_tokens: int

    def to_dict(self) -> dict:
        return dict(
            fields=self.fields,
            start=self.start,
            total=self.total,
            result_conditional=self.result_conditional,
            n_tokens=self.n_tokens,
        )


# ----------------------------------------------------------------------------------------------
# destinations: beam search / sampling over the dst bytes


def destinations(
    runner: Runner,
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
) -> list[Destination]:
    """Likely destinations for src: the top k by beam search over the dst bytes (method="beam",
    width `beam`, default max(4k, 64)), or k ancestral draws (method="sample": the distinct
    destinations drawn, with their counts). `p` is P(dst | src[, time, context][, dst in
    `within`]). `within` is a CIDR prefix the destination must lie in.

    rtt_below=x puts the result field first (src, [time], result, dst) and conditions on a
    reply faster than x: P(dst | src, rtt < x) = sum over byte1 bins b below x of
    P(b, rtt < x | ...) P(dst | ..., b, b2_b) / P(rtt < x), where each bin is represented by
    its most probable byte2 below x (within a quarter octave the RTT hardly tells destinations
    apart), and bins with < 1e-4 of the mass below x are dropped. The weights are exact; the
    beam (or the sampler) runs over this mixture. with_rtt attaches `rtt(src, dst)`.
    """
    s = parse_target(src)
    if not s.is_full:
        raise InputError(f"destinations needs a full source address, got {src!r}")
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 1 <= k <= 10000:
        raise InputError(f"k must be an integer in 1..10000, got {k!r}")
    if method not in ("beam", "sample"):
        raise InputError(f"method must be 'beam' or 'sample', not {method!r}")
    box = parse_target(within) if within is not None else Target(bytes(16), s.version, 0)
    if box.version != s.version:
        raise InputError(f"mixed address families: {src} and within={within}")
    width = int(beam) if beam is not None else max(4 * int(k), 64)
    if width < 1:
        raise InputError(f"beam width must be >= 1, got {beam}")
    x = None
    if rtt_below is not None:
        x = float(rtt_below)
        if not (math.isfinite(x) and x > 0):
            raise InputError(f"rtt_below must be a positive number of ms, got {rtt_below}")
    ctx = runner.context(context)
    t = parse_time(time)
    seq = ctx.tokens + tk.query_prefix(s.version, s.items(), None, t, ctx.last_time)
    max_len = len(seq) + (3 if x is not None else 0) + 1 + s.nbytes
    runner.check_len(max_len, "the destinations query")
    cache = KVCache(runner.config, 1, max_len)
    last = runner.forward(np.asarray(seq)[None], cache)[:, -1]
    log_pi = np.zeros(1)  # mixture components: one per RTT bin (one without a bound)
    if x is not None:
        last = runner.forward([[tk.RTT_START]], cache)[:, -1]
        p1 = softmax(last[0, tk.BYTE0 + tk.CANON_B1])
        ok = tk.RTT_GRID_MS[tk.CANON_B1 << 8] < x  # bins with at least one code below x
        bins, p1 = tk.CANON_B1[ok], p1[ok]
        cache = cache.select(np.zeros(len(bins), np.int64))
        p2 = softmax(runner.forward((tk.BYTE0 + bins)[:, None], cache)[:, -1, tk.BYTE0 :])
        below = tk.RTT_GRID_MS[(bins[:, None] << 8) | np.arange(256)] < x  # (nb, 256)
        w = p1 * (p2 * below).sum(1)  # P(byte1 = b, rtt < x | reply)
        b2 = np.argmax(np.where(below, p2, -1.0), axis=1)
        use = np.flatnonzero(w >= 1e-4 * w.sum())
        cache = cache.select(use)
        runner.forward((tk.BYTE0 + b2[use])[:, None], cache)
        log_pi = np.log(w[use] / w[use].sum())
    M = len(log_pi)
    last = runner.forward(np.full((M, 1), tk.address_role(tk.FIELD_DST, s.version)), cache)
    last = last[:, -1]
    masks = []
    for it in box.items():
        m = np.zeros(256, bool)
        if isinstance(it, tuple):
            m[it[0] : it[1] + 1] = True
        else:
            m[it] = True
        masks.append(m)

    if method == "beam":
        paths, lp = _search(runner, cache, last, log_pi, masks, width, max_len, None)
    else:  # k independent draws, in chunks that fit the KV budget
        gen = np.random.default_rng(seed)
        paths, lp = [], []
        step = max(1, runner.max_rows(max_len) // M)
        for c in range(0, int(k), step):
            rows = np.tile(np.arange(M), min(step, int(k) - c))
            pc, lc = _search(
                runner, cache.select(rows), last[rows], log_pi, masks, 0, max_len, gen
            )
            paths.append(pc)
            lp.append(lc)
        paths, lp = np.concatenate(paths), np.concatenate(lp)

    uniq, first, counts = np.unique(paths, axis=0, return_index=True, return_counts=True)
    order = np.lexsort((-counts, -lp[first]))[: int(k)]
    out = [
        Destination(
            tk.format_address(bytes(uniq[i].astype(np.uint8)).ljust(16, b"\0"), s.version),
            math.exp(lp[first[i]]),
            float(lp[first[i]]),
            int(counts[i]) if method == "sample" else None,
        )
        for i in order
    ]
    return out


def _search(runner: Runner, cache, last, log_pi, masks, width, max_len, gen):
    """Beam search (gen None: keep the `width` most probable dst prefixes) or ancestral
    sampling (gen: one draw per group) over the dst bytes of a mixture of M components
    (log weights log_pi; rows come in groups of M, one per component). Each step's bytes are
    restricted to its mask; returns (paths (G, steps), log P(dst | dst in the masks))."""
    M = len(log_pi)
    G = last.shape[0] // M
    lp = np.zeros((G, M))  # log P(dst prefix | component), unnormalised by the masks
    log_box = np.zeros(M)  # log P(masks | component): the same on every path for CIDR boxes
    paths = np.zeros((G, 0), np.int64)
    score = np.zeros(G)
    for j, allowed in enumerate(masks):
        logp = torch.log_softmax(last[:, tk.BYTE0 :].double(), -1).cpu().numpy()
        logp = np.where(allowed, logp, -np.inf).reshape(G, M, 256)
        log_box += np.logaddexp.reduce(logp[0], axis=1) if not allowed.all() else 0.0
        cand = lp[:, :, None] + logp  # (G, M, 256)
        mix = np.logaddexp.reduce(log_pi[None, :, None] + cand, axis=1)  # (G, 256)
        if gen is None:
            flat = mix.ravel()
            n_ok = int(np.isfinite(flat).sum())
            cap = max(1, runner.max_rows(max_len) // M)
            top = np.argsort(-flat, kind="stable")[: min(width, n_ok, cap)]
            parent, val = top // 256, top % 256
        else:
            pr = np.exp(mix - mix.max(1, keepdims=True))
            cdf = np.cumsum(pr / pr.sum(1, keepdims=True), axis=1)
            val = np.minimum((gen.random(G)[:, None] >= cdf).sum(1), 255)
            parent = np.arange(G)
        lp = cand[parent, :, val]
        score = mix[parent, val]
        paths = np.concatenate([paths[parent], val[:, None]], axis=1)
        G = len(parent)
        if j < len(masks) - 1:  # the last byte needs no forward
            rows = (parent[:, None] * M + np.arange(M)).ravel()
            cache = cache.select(rows)
            last = runner.forward(np.repeat(tk.BYTE0 + val, M)[:, None], cache)[:, -1]
    return paths, score - np.logaddexp.reduce(log_pi + log_box)


# ----------------------------------------------------------------------------------------------
# score: teacher-forced log-probabilities of observed measurements (Engine.score, eval's NLL)

SCORE_BATCH_TOKENS = 16384  # tokens per teacher-forced forward (cache-friendly on CPU)


def field_blocks(toks, start: int) -> list[tuple[str, int, int]]:
    """(field, first token, end) of each field of the measurement whose MEASUREMENT_START is at
    `start` (the last measurement of `toks`), in the order its role tokens come."""
    out, pos = [], start + 1
    while pos < len(toks):
        n = 1 + tk.ROLE_BYTES[toks[pos]]
        out.append((tk.FIELD_NAMES[tk.ROLE_FIELD[toks[pos]]], pos, pos + n))
        pos += n
    return out


def teacher_forced(runner: Runner, seqs: list, starts: list[int]) -> list[dict]:
    """Teacher-forced log-probabilities of the last measurement of each token sequence, whose
    MEASUREMENT_START is at starts[i].

    Per sequence: `tokens` {"start" (when not at position 0), "src.0", "src.1", ... } -> log P
    (nats) of each token given all before it; `fields` field -> summed log P; `result` the
    engine's constrained log P(result | preceding fields), as `Engine.rtt` answers it."""
    b1_index = np.full(256, -1)
    b1_index[tk.CANON_B1] = np.arange(len(tk.CANON_B1))
    out: list[dict | None] = [None] * len(seqs)
    # Right-padding is exact here: attention is causal, so tokens after a sequence's end never
    # reach its positions, and RoPE positions start at 0 in every row. Sorting by length keeps
    # the padding small and the batches large.
    lens = np.array([len(x) for x in seqs])
    order = np.argsort(lens, kind="stable")
    s0 = 0
    while s0 < len(order):
        # a batch: <= SCORE_BATCH_TOKENS, <= 25% longer than its shortest row
        s1 = s0 + 1
        while (s1 < len(order) and lens[order[s1]] <= 1.25 * lens[order[s0]]
               and (s1 + 1 - s0) * lens[order[s1]] <= SCORE_BATCH_TOKENS):
            s1 += 1
        chunk, s0 = order[s0:s1], s1
        arr = np.zeros((len(chunk), max(len(seqs[i]) for i in chunk)), dtype=np.int64)
        for j, i in enumerate(chunk):
            arr[j, : len(seqs[i])] = seqs[i]  # the rest: MEASUREMENT_START padding, never read
        logits = runner.forward(arr, None).double()  # (B, L, V)
        tok = torch.log_softmax(logits[:, :-1], -1).gather(
            -1, torch.as_tensor(arr[:, 1:, None], device=logits.device))
        tok = tok.squeeze(-1).cpu().numpy()  # (B, L-1): log P(token t+1 | <= t)
        for j, i in enumerate(chunk):
            out[i] = _score_one(tok[j], logits[j], arr[j], seqs[i], starts[i], b1_index)
    return out


def _score_one(tok, lg, arr, seq, st, b1_index) -> dict:
    blocks = field_blocks(seq, st)
    toks = {} if st == 0 else {"start": float(tok[st - 1])}
    fields = {}
    for name, a, b in blocks:
        vals = tok[a - 1 : b - 1]
        fields[name] = float(vals.sum())
        toks.update({f"{name}.{o}": float(v) for o, v in enumerate(vals)})
    _, a, _ = next(x for x in blocks if x[0] == "result")
    role = torch.log_softmax(lg[a - 1, [tk.RTT_START, tk.FAILED]], -1)
    res = float(role[0 if arr[a] == tk.RTT_START else 1])
    if arr[a] == tk.RTT_START:  # byte1 constrained to canonical values, as the engine does
        b1 = torch.log_softmax(lg[a, tk.BYTE0 + tk.CANON_B1], -1)
        res += float(b1[b1_index[arr[a + 1] - tk.BYTE0]])
        res += float(torch.log_softmax(lg[a + 1, tk.BYTE0 :], -1)[arr[a + 2] - tk.BYTE0])
    return {"tokens": toks, "fields": fields, "result": res}


def score(runner: Runner, measurement, context=None, order=None) -> Score:
    """Log-probability per field of an observed measurement (an anomaly score)."""
    return score_many(
        runner, [measurement], context=context, orders=None if order is None else [order]
    )[0]


def score_many(runner: Runner, measurements, context=None, orders=None) -> list[Score]:
    """`score` for many measurements (each scored after the same context), in order."""
    ctx = runner.context(context)
    ms = [as_measurement(m) for m in measurements]
    orders = [tk.QUERY_ORDER] * len(ms) if orders is None else [tuple(o) for o in orders]
    if len(orders) != len(ms):
        raise InputError("score_many: one field order per measurement")
    seqs = []
    for m, o in zip(ms, orders, strict=True):
        ctx_orders = [tk.QUERY_ORDER] * len(ctx.measurements)
        toks = tk.encode_reference(ctx.measurements + [m], ctx_orders + [o])
        runner.check_len(len(toks), f"scoring {m.src} -> {m.dst}")
        seqs.append(toks)
    start = len(ctx.tokens)
    out = []
    for sq, r in zip(seqs, teacher_forced(runner, seqs, [start] * len(seqs)), strict=True):
        first = r["tokens"].get("start")
        out.append(Score(r["fields"], first, sum(r["fields"].values()) + (first or 0.0),
                         r["result"], len(sq) - start))
    return out


# ----------------------------------------------------------------------------------------------
# sample: grammar-constrained synthetic measurement streams


def sample(
    runner: Runner, n: int, src=None, *, seed: int = 0, context=None, temperature: float = 1.0
) -> list[tk.Measurement]:
    """A synthetic stream of n measurements (list[tokens.Measurement]) continuing the context;
    with src, every measurement's source is src (a probe-centric stream), written first.
    Generation follows the grammar (roles not yet used, one address family, canonical RTT
    byte1, deltas only after a timestamp), so every measurement decodes. A stream longer than
    the context window rolls over, keeping the most recent measurements (half a window)."""
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or not 1 <= n <= 100000:
        raise InputError(f"n must be an integer in 1..100000, got {n!r}")
    if not (isinstance(temperature, int | float) and temperature > 0):
        raise InputError(f"temperature must be > 0, got {temperature!r}")
    s = None
    if src is not None:
        s = parse_target(src)
        if not s.is_full:
            raise InputError(f"sample needs a full source address, got {src!r}")
    ctx = runner.context(context)
    gen = torch.Generator().manual_seed(int(seed))
    history = [(m, tk.QUERY_ORDER) for m in ctx.measurements]
    T = runner.config.sequence_len
    if len(ctx.tokens) + _MAX_MEAS_TOKENS + 1 > T:
        raise InputError(f"context of {len(ctx.tokens)} tokens leaves no room to sample")
    cache, last, prev_time = _window(runner, history, keep_all=True)
    out: list[tk.Measurement] = []

    def feed(tok: int):
        nonlocal last
        last = runner.forward([[tok]], cache)[0, -1]

    def draw(allowed) -> int:
        lg = last[torch.as_tensor(allowed)].double().cpu() / temperature
        return int(allowed[int(torch.multinomial(torch.softmax(lg, -1), 1, generator=gen))])

    canon_b1 = tk.BYTE0 + tk.CANON_B1
    all_bytes = np.arange(tk.BYTE0, tk.VOCAB_SIZE)
    while len(out) < n:
        if cache.pos + _MAX_MEAS_TOKENS + 1 > T:
            cache, last, prev_time = _window(runner, history)
        toks = [tk.MEASUREMENT_START]
        feed(tk.MEASUREMENT_START)
        have: set[int] = set()
        family = None
        if s is not None:
            for tok in tk.query_prefix(s.version, s.items())[1:]:  # after MEASUREMENT_START
                feed(tok)
                toks.append(tok)
            have, family = {tk.FIELD_SRC}, s.version
        while True:
            role = draw(_allowed_roles(have, family, prev_time is not None))
            if role == tk.MEASUREMENT_START:
                break
            feed(role)
            toks.append(role)
            if role in (tk.SRC_IPV4, tk.SRC_IPV6, tk.DST_IPV4, tk.DST_IPV6):
                family = 4 if role in (tk.SRC_IPV4, tk.DST_IPV4) else 6
                field = tk.FIELD_SRC if role in (tk.SRC_IPV4, tk.SRC_IPV6) else tk.FIELD_DST
                nb = 4 if family == 4 else 16
            elif role in (tk.RTT_START, tk.FAILED):
                field, nb = tk.FIELD_RESULT, 2 if role == tk.RTT_START else 0
            else:
                field = tk.FIELD_TIME
                nb = {tk.TIMESTAMP_ABS: 8, tk.TIMESTAMP_DELTA1: 1, tk.TIMESTAMP_DELTA4: 4}[role]
            for j in range(nb):
                b = draw(canon_b1 if role == tk.RTT_START and j == 0 else all_bytes)
                toks.append(b)
                feed(b)
            have.add(field)
            if len(have) == 4:  # all fields present: the measurement is over
                break
        if prev_time is not None:  # decode deltas against the previous timestamp
            anchor = tk.encode_reference([tk.Measurement("0.0.0.0", "0.0.0.0", 0.0, prev_time)])
            ms, orders = tk.decode(anchor + toks, with_orders=True)
            m, order = ms[1], orders[1]
        else:
            ms, orders = tk.decode(toks, with_orders=True)
            m, order = ms[0], orders[0]
        out.append(m)
        history.append((m, tuple(order) + tuple(f for f in range(4) if f not in order)))
        prev_time = m.time if m.time is not None else prev_time
    return out


def _window(runner: Runner, history, keep_all: bool = False):
    """(cache, last logits, last timestamp) after re-encoding the recent history."""
    T = runner.config.sequence_len
    keep = len(history)
    if not keep_all:  # the most recent measurements that surely fit in half a window
        keep = min(keep, (T // 2) // _MAX_MEAS_TOKENS)
    kept = history[len(history) - keep :]
    toks = tk.encode_reference([m for m, _ in kept], [o for _, o in kept])
    cache = KVCache(runner.config, 1, T)
    last = runner.forward([toks], cache)[0, -1] if toks else None
    prev = next((m.time for m, _ in reversed(kept) if m.time is not None), None)
    return cache, last, prev


def _allowed_roles(have: set[int], family: int | None, has_time: bool) -> np.ndarray:
    """Role tokens the grammar allows after the fields in `have` (family: the one already used)."""
    out = []
    if tk.FIELD_SRC not in have:
        out += [tk.SRC_IPV4] if family == 4 else [tk.SRC_IPV6] if family == 6 else [1, 2]
    if tk.FIELD_DST not in have:
        out += [tk.DST_IPV4] if family == 4 else [tk.DST_IPV6] if family == 6 else [3, 4]
    if tk.FIELD_RESULT not in have:
        out += [tk.RTT_START, tk.FAILED]
    if tk.FIELD_TIME not in have:
        out += [tk.TIMESTAMP_ABS] + ([tk.TIMESTAMP_DELTA1, tk.TIMESTAMP_DELTA4] if has_time else [])
    if {tk.FIELD_SRC, tk.FIELD_DST, tk.FIELD_RESULT} <= have:
        out.append(tk.MEASUREMENT_START)
    return np.asarray(out, np.int64)
