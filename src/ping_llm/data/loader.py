"""Training batches from a prepared dataset: a grain pipeline over the probe-centric rows and the
context sampler (`data.contexts`; docs/data.md, "Training contexts").

    loader = build_loader("data/prepared", "train", batch_size=8, seq_len=1024, seed=0,
                          rank=0, world_size=1)
    inputs, targets = next(loader)          # int64 (B, T); targets -1 where nothing to predict
    state = loader.get_state()              # JSON; loader.set_state(state) resumes exactly

Work items. One epoch of a split is a fixed list of items: every row whose whole content cannot
fill a sequence is "small", the others "big". A big row gives max(1, round(E / (T + 1))) items
(E = its expected token count under the timestamp-mode mix), so rows are sampled in proportion to
their size; each item is one context drawn from the row. Small rows are packed: each epoch they
are shuffled (seeded by (seed, epoch)) and cut into bins of about T + 1 expected tokens; a bin item
is the concatenation of one context per row until the sequence is full.

Contexts are drawn by `data.contexts.sample_context` (timestamp modes, time windows, field orders,
identity augmentation); this module decides which rows and how many contexts fill each batch.

Packing and attention: packed contexts are NOT masked from each other. The model is plain causal
attention without document masking; each packed context starts with MEASUREMENT_START and an
absolute timestamp (the `reset` of tokens.encode), so the grammar never links it to the previous
one, and attending to an unrelated earlier probe's measurements is only extra context. Packing
only concerns rows smaller than a sequence; big rows fill whole sequences on their own.

Sequences: T + 1 tokens per row of the batch, padded with -1; inputs = seq[:, :-1] (padding shown
as MEASUREMENT_START), targets = seq[:, 1:] (padding and the token after the last real one are -1).

Pipeline (grain): MapDataset.range(items).shuffle(seed) (a new permutation each epoch) .repeat()
-> (global index, item) -> batch(B) -> [rank::world_size] -> sampler -> to_iter_dataset ->
mp_prefetch(worker_count). Every batch is a pure function of (seed, split, global batch index):
what rank r sees does not depend on worker_count, and world sizes 1 and W see the same multiset of
global micro-batches (train.py's contract). Randomness: numpy Generators from
SeedSequence([seed, epoch, item]), so a context does not depend on its batch neighbours either.
The iterator state is grain's (the position after the last batch returned, not what the workers
read ahead), wrapped with the batch count so a resume with another worker_count also works.

Cost: each context reads and decodes its whole record (about 1 ms per MB, zstd included); every
process keeps recently read records (cache_bytes, 256 MB), so a dataset that fits is read once.
With far more data than that and rows at the 8 MB cap, record reads dominate: add workers or
prepare with a smaller --max-record-mb.
"""

from __future__ import annotations

import contextlib
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from ping_llm import tokens
from ping_llm.data.contexts import (
    MIN_MEASUREMENT_TOKENS,
    SampledContext,
    SamplerConfig,
    readdressed,
    sample_context,
)
from ping_llm.data.prepare import load_card
from ping_llm.data.rows import Row, decode_record
from ping_llm.errors import InputError

STATE_FORMAT = "ping-llm-loader/1"
_PACK_TAG = 0x9AC5  # SeedSequence salt of the per-epoch packing permutation
_READDRESS_TAG = 0xAD2E  # SeedSequence salt of identity augmentation (so 0 changes nothing)


# ----------------------------------------------------------------------------------------------
# the epoch plan and the batch sampler (what each grain worker runs)


class RowStore:
    """The records of one split (grain ArrayRecordDataSource) and their index."""

    def __init__(self, data_dir, split: str, cache_bytes: int = 256 << 20):
        import grain

        card = load_card(data_dir)
        rows = card.get("rows", {})
        if split not in rows:
            have = sorted(rows)
            raise InputError(f"{data_dir}: split {split!r} has no rows (rows exist for {have})")
        r = rows[split]
        self.paths = [str(Path(data_dir) / s) for s in r["shards"]]
        self.source = grain.sources.ArrayRecordDataSource(self.paths)
        ix = pq.read_table(Path(data_dir) / r["index"])
        self.n = ix["n"].to_numpy()
        self.tokens_none = ix["tokens_none"].to_numpy()
        self.tokens_full = ix["tokens_full"].to_numpy()
        if len(self.source) != len(self.n):
            raise InputError(f"{data_dir}: {split} index and shards disagree; prepare it again")
        # Recently used records, per process: a dataset smaller than this is read once.
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._cached = 0

    def __len__(self) -> int:
        return len(self.n)

    def __getstate__(self):  # workers start with an empty cache
        return {**self.__dict__, "_cache": OrderedDict(), "_cached": 0}

    def row(self, i: int) -> Row:
        i = int(i)
        buf = self._cache.get(i)
        if buf is None:
            buf = self.source[i]
            self._cache[i] = buf
            self._cached += len(buf)
            while self._cached > self.cache_bytes and self._cache:
                self._cached -= len(self._cache.popitem(last=False)[1])
        else:
            self._cache.move_to_end(i)
        return decode_record(buf)


class Plan:
    """The work items of one epoch: contexts of big rows, then bins of packed small rows."""

    def __init__(self, store: RowStore, cfg: SamplerConfig, seed: int):
        self.budget = cfg.seq_len + 1
        self.seed = seed
        p_full, _, p_partial = cfg.mode_probs
        extra = (p_full + 0.5 * p_partial) * (store.tokens_full - store.tokens_none)
        self.expected = store.tokens_none + extra  # expected tokens of the whole row
        big = store.tokens_none >= self.budget
        self.big_rows = np.flatnonzero(big)
        reps = np.maximum(1, np.rint(self.expected[big] / self.budget)).astype(np.int64)
        self.item_row = np.repeat(self.big_rows, reps)  # item id -> row, for big items
        self.small_rows = np.flatnonzero(~big)
        small_total = float(self.expected[self.small_rows].sum())
        self.n_bins = int(small_total // self.budget) if len(self.small_rows) else 0
        if len(self.small_rows) and self.n_bins == 0:
            self.n_bins = 1
        self.n_items = len(self.item_row) + self.n_bins
        self._bins: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def bins(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows in packing order, bin start offsets (n_bins + 1,)) of this epoch."""
        if epoch in self._bins:
            return self._bins[epoch]
        if len(self._bins) >= 2:  # an iterator is in one epoch, at most two around a boundary
            self._bins.pop(min(self._bins))
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, _PACK_TAG, epoch]))
        order = rng.permutation(self.small_rows)
        est = self.expected[order]
        start = np.cumsum(est) - est
        per_bin = est.sum() / self.n_bins
        which = np.minimum((start / per_bin).astype(np.int64), self.n_bins - 1)
        offsets = np.searchsorted(which, np.arange(self.n_bins + 1), "left")
        self._bins[epoch] = (order, offsets)
        return order, offsets

    def rows_of(self, item: int, epoch: int) -> np.ndarray:
        if item < len(self.item_row):
            return self.item_row[item : item + 1]
        order, off = self.bins(epoch)
        j = item - len(self.item_row)
        return order[off[j] : off[j + 1]]


class BatchSampler:
    """(B, 2) array of (global index, item) -> (B, T + 1) int16 token rows, -1 = padding; with
    `readdress_knowledge`, (B, 2, T + 1): the rows, then the same rows under the real addresses
    (what address knowledge is computed from)."""

    def __init__(self, data_dir, split: str, cfg: SamplerConfig, seed: int,
                 cache_bytes: int = 256 << 20):
        self.data_dir, self.split, self.cfg, self.seed = str(data_dir), split, cfg, seed
        self.store = RowStore(data_dir, split, cache_bytes)
        self.plan = Plan(self.store, cfg, seed)
        self.mean_base = self.store.tokens_none / np.maximum(self.store.n, 1)

    def contexts(self, g: int, item: int) -> list[tuple[Row, SampledContext]]:
        """The contexts of one work item, in order (one for a big row, several for a bin)."""
        epoch = int(g) // self.plan.n_items
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch, int(item)]))
        left = self.plan.budget
        out = []
        for r in self.plan.rows_of(int(item), epoch):
            if left < MIN_MEASUREMENT_TOKENS:
                break
            row = self.store.row(r)
            ctx = sample_context(row, left, rng, self.cfg, float(self.mean_base[r]))
            if len(ctx.sel):
                out.append((row, ctx))
                left -= ctx.n_tokens
        return out

    def addresses(self, g: int, item: int, ctxs) -> list[tuple[np.ndarray, np.ndarray]]:
        """(src, dst) address arrays (n, 16) of each context of a work item, re-addressed in
        the configured fractions of contexts (its own seed stream: fractions 0 change nothing)."""
        cfg = self.cfg
        out = [(row.addr[row.src[c.sel]], row.addr[row.dst[c.sel]]) for row, c in ctxs]
        if not (cfg.readdress_src or cfg.readdress_dst):
            return out
        epoch = int(g) // self.plan.n_items
        rng = np.random.default_rng(
            np.random.SeedSequence([self.seed, epoch, int(item), _READDRESS_TAG]))
        for i, (row, c) in enumerate(ctxs):
            src, dst = out[i]
            if rng.random() < cfg.readdress_src:
                src = readdressed(row.src[c.sel], row, rng, cfg.readdress_keep)
            if rng.random() < cfg.readdress_dst:
                dst = readdressed(row.dst[c.sel], row, rng, cfg.readdress_keep)
            out[i] = (src, dst)
        return out

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        budget = self.plan.budget
        pairs = np.asarray(batch).reshape(-1, 2)
        per_seq = [self.contexts(g, item) for g, item in pairs]
        # Gather every context's measurements (a few fancy-indexing calls per context), then
        # encode the whole batch at once; `reset` restarts the timestamp chain per context.
        real = self.cfg.readdress_knowledge
        names = ("src", "dst", "ver", "rtt", "t", "ht", "ord") + (("src_real", "dst_real")
                                                                  if real else ())
        cols: dict[str, list] = {k: [] for k in names}
        n_meas = []
        for (g, item), ctxs in zip(pairs, per_seq, strict=True):
            n_meas.append(sum(len(c.sel) for _, c in ctxs))
            for (row, c), (src, dst) in zip(ctxs, self.addresses(g, item, ctxs), strict=True):
                s = row.src[c.sel]
                cols["src"].append(src)
                cols["dst"].append(dst)
                if real:  # the addresses as they are, for the knowledge features
                    cols["src_real"].append(row.addr[s])
                    cols["dst_real"].append(row.addr[row.dst[c.sel]])
                cols["ver"].append(row.version[s])
                rtt = tokens.code_to_rtt(row.code[c.sel])
                cols["rtt"].append(np.where(row.failed[c.sel] != 0, -1.0, rtt))
                cols["t"].append(row.t0 + row.toff[c.sel].astype(np.int64))
                cols["ht"].append(c.has_time)
                cols["ord"].append(c.order)
        out = np.full((len(per_seq), 2, budget) if real else (len(per_seq), budget), -1, np.int16)
        if sum(n_meas) == 0:
            return out
        sizes = [len(c.sel) for ctxs in per_seq for _, c in ctxs]
        reset = np.zeros(sum(sizes), bool)
        reset[np.cumsum(sizes) - sizes] = True
        cat = {k: np.concatenate(v) for k, v in cols.items()}
        rest = (cat["ver"], cat["rtt"], cat["t"], cat["ht"], cat["ord"])
        toks, offs = tokens.encode(cat["src"], cat["dst"], *rest, reset=reset)
        if real:  # the same measurements and field orders: the same token positions
            toks_real, _ = tokens.encode(cat["src_real"], cat["dst_real"], *rest, reset=reset)
        bounds = np.concatenate([[0], np.cumsum(n_meas)])
        for i in range(len(per_seq)):
            lo, hi = offs[bounds[i]], offs[bounds[i + 1]]
            if hi - lo > budget:
                raise AssertionError(f"sampler overfilled a sequence: {hi - lo} > {budget}")
            if real:
                out[i, 0, : hi - lo] = toks[lo:hi]
                out[i, 1, : hi - lo] = toks_real[lo:hi]
            else:
                out[i, : hi - lo] = toks[lo:hi]
        return out


def _with_index(index, item):
    return np.array([index, item], dtype=np.int64)


# ----------------------------------------------------------------------------------------------
# the loader


def _default_workers() -> int:
    return int(os.environ.get("PING_LLM_LOADER_WORKERS", "0"))


class Loader:
    """Iterator of (inputs, targets) int64 tensors (B, T); see build_loader. With the sampler's
    `readdress_knowledge`, (inputs, targets, real inputs): the inputs under the real addresses,
    for the address-knowledge features."""

    def __init__(self, data_dir, split, batch_size, seq_len, seed, rank, world_size, *,
                 worker_count=None, num_epochs=None, config: SamplerConfig | None = None,
                 prefetch: int = 2, cache_bytes: int = 256 << 20):
        if not 0 <= rank < world_size:
            raise InputError(f"rank {rank} out of range for world_size {world_size}")
        if batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {batch_size}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise InputError(f"seed must be an integer >= 0, got {seed!r}")
        self.cfg = config or SamplerConfig(seq_len=seq_len)
        if self.cfg.seq_len != seq_len:
            raise InputError(f"seq_len {seq_len} disagrees with config.seq_len {self.cfg.seq_len}")
        self.data_dir, self.split = str(data_dir), split
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.rank, self.world_size = rank, world_size
        self.worker_count = _default_workers() if worker_count is None else int(worker_count)
        self.num_epochs, self.prefetch = num_epochs, prefetch
        self.sampler = BatchSampler(data_dir, split, self.cfg, seed, cache_bytes)
        self.card = load_card(data_dir)
        self.n_items = self.sampler.plan.n_items
        if self.n_items == 0:
            raise InputError(f"{data_dir}: split {split!r} is empty")
        self.batches = 0  # batches returned so far
        self._it = None

    def dataset(self, start: int = 0):
        """The grain IterDataset of this rank's batches (int16 (B, T + 1)), from local batch
        `start` on."""
        import grain

        shuffle_seed = int(np.random.SeedSequence([self.seed, 0x5EED]).generate_state(1)[0])
        ds = grain.MapDataset.range(self.n_items).shuffle(seed=shuffle_seed)
        ds = ds.repeat(self.num_epochs).map_with_index(_with_index)
        ds = ds.batch(self.batch_size, drop_remainder=self.num_epochs is None)
        ds = ds[self.rank :: self.world_size]
        ds = ds[start:].map(self.sampler)
        # One read-ahead thread per process overlaps sampling with the caller's compute.
        threads = int(self.prefetch > 0)
        it = ds.to_iter_dataset(
            grain.ReadOptions(num_threads=threads, prefetch_buffer_size=self.prefetch)
        )
        if self.worker_count > 0:
            it = it.mp_prefetch(
                grain.MultiprocessingOptions(
                    num_workers=self.worker_count, per_worker_buffer_size=max(1, self.prefetch)
                )
            )
        return it

    def _iterator(self):
        if self._it is None:
            self._it = iter(self.dataset(0))
            self._start = 0
        return self._it

    def __iter__(self):
        return self

    def __next__(self):
        import torch

        seq = next(self._iterator())
        self.batches += 1
        seq = torch.from_numpy(np.asarray(seq, dtype=np.int64))
        real = seq[:, 1, :-1].clamp(min=0) if seq.ndim == 3 else None  # readdress_knowledge
        seq = seq[:, 0] if seq.ndim == 3 else seq
        inputs = seq[:, :-1].clamp(min=0)  # padding shows as MEASUREMENT_START; never a target
        targets = seq[:, 1:].contiguous()
        return (inputs, targets) if real is None else (inputs, targets, real)

    def next_numpy(self) -> np.ndarray:
        """The next batch as the raw int16 (B, T + 1) token rows (-1 = padding; with
        `readdress_knowledge` (B, 2, T + 1): BatchSampler)."""
        seq = next(self._iterator())
        self.batches += 1
        return np.asarray(seq)

    def get_state(self) -> dict:
        it = self._iterator()
        return {
            "format": STATE_FORMAT,
            "split": self.split,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "rank": self.rank,
            "world_size": self.world_size,
            "n_items": self.n_items,
            "batches": self.batches,
            "worker_count": self.worker_count,
            "grain": it.get_state(),
            "grain_start": self._start,  # the grain state counts from this local batch
        }

    def set_state(self, state: dict) -> None:
        keys = ("split", "seed", "batch_size", "seq_len", "rank", "world_size", "n_items")
        if state.get("format") != STATE_FORMAT:
            raise InputError(f"not a loader state of {STATE_FORMAT}: {state.get('format')!r}")
        mine = {k: getattr(self, k) for k in keys}
        theirs = {k: state.get(k) for k in keys}
        if mine != theirs:
            raise InputError(f"loader state is for {theirs}, this loader is {mine}")
        self.close()
        self.batches = int(state["batches"])
        if state.get("grain") is not None and state.get("worker_count") == self.worker_count:
            self._start = int(state.get("grain_start", 0))
            self._it = iter(self.dataset(self._start))
            self._it.set_state(state["grain"])
        else:  # another worker count: grain's state is per worker; start at the batch instead
            self._it = iter(self.dataset(self.batches))
            self._start = self.batches

    def close(self) -> None:
        if self._it is not None and hasattr(self._it, "close"):
            self._it.close()
        self._it = None

    def __del__(self, _suppress=contextlib.suppress):  # bound early: at interpreter shutdown
        with _suppress(Exception):  # module globals may already be gone
            self.close()


class CurriculumLoader:
    """Sequence-length warmup: `switch_after` batches from `short`, then batches of `make_full()`.

    Why: trained from scratch on full 1024-token contexts, a small model is slow to learn to read
    the current measurement's own addresses (attention starts spread over ~T keys, so the signal
    towards the few tokens that matter is ~T times weaker) and settles for the source's context
    statistics. A quarter-length context first (same tokens per batch: 4x the rows) learns the
    address -> RTT structure several times faster; the full contexts then add in-context use.
    Measured on the menog sample, 4 CPU minutes: test_time median abs error 11.7 ms at 256
    tokens vs 39 ms at 1024 (docs/results.md).

    Follows the loader contract; its state records which phase it is in. The full-length loader
    starts at its own batch 0 at the switch, in an uninterrupted run and after a resume alike.
    """

    def __init__(self, short, make_full, switch_after: int):
        if switch_after < 0:
            raise InputError(f"switch_after must be >= 0, got {switch_after}")
        self.short, self._make_full, self.switch_after = short, make_full, int(switch_after)
        self.full = None
        self.served = 0  # batches returned so far, both phases

    def _active(self):
        if self.served < self.switch_after:
            return self.short
        if self.full is None:
            self.full = self._make_full()
            if self.short is not None and hasattr(self.short, "close"):
                self.short.close()
            self.short = None
        return self.full

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self._active())
        self.served += 1
        return batch

    def get_state(self) -> dict:
        phase = "short" if self.served < self.switch_after else "full"
        return {"format": "ping-llm-curriculum/1", "served": self.served,
                "switch_after": self.switch_after, "phase": phase,
                "state": self._active().get_state()}

    def set_state(self, state: dict) -> None:
        if state.get("format") != "ping-llm-curriculum/1":
            raise InputError("loader state is not a sequence-length curriculum state (was the "
                             "run started with another seq_len_warmup?)")
        if state["switch_after"] != self.switch_after:
            raise InputError(f"curriculum switches after {state['switch_after']} batches in the "
                             f"state, {self.switch_after} here")
        self.served = int(state["served"])
        self._active().set_state(state["state"])

    def close(self) -> None:
        for ld in (self.short, self.full):
            if ld is not None and hasattr(ld, "close"):
                ld.close()


class MixtureLoader:
    """Batches from several loaders (one per prepared dataset) drawn with fixed weights: batch n
    of this rank comes from loader i with probability weights[i], decided by (seed, rank, n)
    alone, so the sequence is the same in every run and after a resume. Each batch is wholly
    one dataset's (a context is one source's measurements). Follows the loader contract; its
    state is the batch count and every loader's own state."""

    def __init__(self, loaders: list, weights, seed: int, rank: int = 0):
        w = np.asarray(weights, dtype=np.float64)
        if len(loaders) != len(w) or len(w) < 1 or not (np.all(w >= 0) and w.sum() > 0):
            raise InputError(f"a mixture needs one non-negative weight per dataset, got {weights}")
        self.loaders, self.cdf = loaders, np.cumsum(w / w.sum())
        self.seed, self.rank, self.n = int(seed), int(rank), 0

    def which(self, n: int) -> int:
        """The loader that batch n comes from."""
        u = np.random.default_rng([self.seed, 0x6D6978, self.rank, n]).random()
        return int(min(np.searchsorted(self.cdf, u, side="right"), len(self.cdf) - 1))

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.loaders[self.which(self.n)])
        self.n += 1
        return batch

    def get_state(self) -> dict:
        return {"format": "ping-llm-mixture/1", "n": self.n,
                "states": [ld.get_state() for ld in self.loaders]}

    def set_state(self, state: dict) -> None:
        if state.get("format") != "ping-llm-mixture/1" or len(state["states"]) != len(self.loaders):
            raise InputError(f"the loader state is not a mixture of {len(self.loaders)} datasets "
                             "(resume with the same --data list)")
        self.n = int(state["n"])
        for ld, st in zip(self.loaders, state["states"], strict=True):
            ld.set_state(st)

    def close(self) -> None:
        for ld in self.loaders:
            if hasattr(ld, "close"):
                ld.close()


def build_loader(data_dir, split, batch_size, seq_len, seed, rank, world_size, **kwargs) -> Loader:
    """A never-ending (unless num_epochs=) iterator of (inputs, targets) int64 (B, T) tensors
    over one split of a prepared dataset; get_state()/set_state() resume at the exact next batch.

    kwargs: worker_count (processes; 0 = in-process; default $PING_LLM_LOADER_WORKERS or 0),
    num_epochs (None = cycle forever; a finite run ends with a possibly smaller last batch),
    config (SamplerConfig), prefetch (batches buffered per worker / in-process thread),
    cache_bytes (recently read records kept per process; 0 = read every time).
    """
    return Loader(data_dir, split, batch_size, seq_len, seed, rank, world_size, **kwargs)


def measure(data_dir, split: str = "train", *, seq_len: int = 1024, batch_size: int = 16,
            seed: int = 0, max_batches: int | None = 200, config: SamplerConfig | None = None,
            worker_count: int = 0) -> dict:
    """Run the real pipeline over one epoch of `split` (or its first max_batches batches) and
    count what a training run would see: padding (target -1 positions), measurements and tokens
    per sequence."""
    ld = Loader(data_dir, split, batch_size, seq_len, seed, 0, 1, worker_count=worker_count,
                num_epochs=1, config=config)
    seqs = targets = padding = meas = 0
    try:
        while max_batches is None or ld.batches < max_batches:
            try:
                s = ld.next_numpy()
            except StopIteration:
                break
            tgt = s[:, 1:]
            seqs += len(s)
            targets += tgt.size
            padding += int((tgt < 0).sum())
            meas += int((s == tokens.MEASUREMENT_START).sum())
    finally:
        ld.close()
    real = targets - padding
    return {
        "split": split,
        "seq_len": seq_len,
        "items_per_epoch": ld.n_items,
        "packed_bins_per_epoch": ld.sampler.plan.n_bins,
        "batches": ld.batches,
        "sequences": seqs,
        "padding_fraction": round(padding / max(targets, 1), 5),
        "measurements_per_sequence": round(meas / max(seqs, 1), 2),
        "tokens_per_measurement": round((real + seqs) / max(meas, 1), 3),
    }
