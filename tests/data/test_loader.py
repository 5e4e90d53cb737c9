"""loader: contexts (docs/tokens.md) that always parse, configured mode and window distributions,
exact resume in a fresh process, disjoint data-parallel ranks, little padding."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import numpy as np
import pyarrow as pa
import pytest
import torch
from scipy import stats

from ping_llm import tokens
from ping_llm.data import contexts, loader, prepare, schema
from ping_llm.errors import InputError

T0 = 1_700_000_000
ALL_TRAIN = prepare.PrepareConfig(time_fraction=0, probe_fraction=0, val_probe_fraction=0,
                                  pair_fraction=0,
                                  val_time_fraction=0, val_pair_fraction=0,
                                  row_splits=("train",))


def _write(path, probes: int, per_probe: int, step: int, v6_every: int = 0, seed: int = 0):
    """A canonical table: `probes` probes, each `per_probe` pings every ~step s to 50 targets;
    with v6_every = k, every k-th ping of a probe is IPv6 (a dual-stack probe)."""
    rng = np.random.default_rng(seed)
    p = np.repeat(np.arange(probes), per_probe)
    i = np.tile(np.arange(per_probe), probes)
    t = T0 + i * step + rng.integers(0, max(step // 2, 1), len(i)) + p * 7
    v6 = (i % v6_every == 0) if v6_every else np.zeros(len(i), bool)
    d = rng.integers(0, 50, len(i))
    src = [f"2001:db8:{a:x}::1" if six else f"20.{a // 200}.{a % 200}.1"
           for a, six in zip(p, v6, strict=True)]
    dst = [f"2001:db8:ff:{b:x}::1" if six else f"9.9.{b}.9" for b, six in zip(d, v6, strict=True)]
    rtt = np.where(rng.random(len(i)) < 0.05, -1.0, rng.lognormal(3.5, 0.7, len(i)))
    tbl = pa.table({
        "event_time": pa.array(t).cast(pa.timestamp("s", tz="UTC")),
        "src_addr": src, "dst_addr": dst,
        "ip_version": pa.array(np.where(v6, 6, 4), pa.int8()),
        "rtt": rtt, "prb_id": p, "msm_id": np.ones(len(i), np.int64),
        "size": pa.array(np.full(len(i), 64), pa.int32()),
    })
    schema.write_canonical(schema.normalize(tbl), path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """big: 5 dual-stack probes x 4000 pings; small: 600 probes x 4 pings (packed);
    medium: 24 probes of ~1.2 sequences each (one work item per row)."""
    root = tmp_path_factory.mktemp("loader")
    specs = {"big": (5, 4000, 60, 5), "small": (600, 4, 300, 0), "medium": (24, 80, 120, 0)}
    out = {}
    for name, (probes, per, step, v6) in specs.items():
        _write(root / f"{name}.parquet", probes, per, step, v6)
        prepare.prepare([root / f"{name}.parquet"], root / name, ALL_TRAIN, progress=False)
        out[name] = root / name
    return out


def _meas_keys(ds) -> tuple[set, set]:
    """(src, dst, rtt code or -1, time) and (src, dst, code) of every measurement."""
    t = schema.read_canonical(ds / "splits" / "train.parquet")
    rtt = t["rtt"].to_numpy()
    code = np.full(len(rtt), -1)
    code[rtt >= 0] = tokens.rtt_to_code(rtt[rtt >= 0])
    rows = list(zip(t["src_addr"].to_pylist(), t["dst_addr"].to_pylist(), code.tolist(),
                    t["event_time"].cast(pa.int64()).to_pylist(), strict=True))
    return set(rows), {r[:3] for r in rows}


def _key(m: tokens.Measurement):
    code = -1 if m.rtt_ms < 0 else int(tokens.rtt_to_code(m.rtt_ms))
    return (m.src, m.dst, code, m.time)


@pytest.mark.parametrize("name", ["big", "small"])
def test_batches_equal_the_reference_encoder_and_decode_to_real_measurements(data, name):
    ds = data[name]
    sampler = loader.BatchSampler(ds, "train", contexts.SamplerConfig(seq_len=512), seed=3)
    n = sampler.plan.n_items
    pairs = np.array([[g, g % n] for g in range(0, 3 * n, max(1, n // 5))][:12])
    out = sampler(pairs)
    with_time, without_time = _meas_keys(ds)
    for (g, item), seq in zip(pairs, out, strict=True):
        real = seq[seq >= 0]
        assert len(real) > 0 and (seq[len(real):] == -1).all()
        ref = []
        for row, c in sampler.contexts(g, item):
            names = [tokens.format_address(a, v) for a, v in zip(row.addr, row.version,
                                                                 strict=True)]
            ms = [tokens.Measurement(names[row.src[i]], names[row.dst[i]], row.rtt_ms()[i],
                                     int(row.time[i]) if h else None)
                  for i, h in zip(c.sel, c.has_time, strict=True)]
            ref += tokens.encode_reference(ms, c.order)
        assert real.tolist() == ref
        for m in tokens.decode(real):
            k = _key(m)
            assert (k in with_time) if m.time is not None else (k[:3] in without_time)


def test_loader_yields_shifted_int64_inputs_and_targets_with_minus_one_padding(data):
    ld = loader.build_loader(data["small"], "train", 4, 256, 0, 0, 1)
    for _ in range(3):
        x, y = next(ld)
        assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (4, 256)
        assert x.min() >= 0 and x.max() < tokens.VOCAB_SIZE and y.max() < tokens.VOCAB_SIZE
        for xi, yi in zip(x, y, strict=True):
            n = int((yi >= 0).sum())
            assert (yi[:n] >= 0).all() and (yi[n:] == -1).all()  # padding only at the end
            assert torch.equal(xi[1 : n + 1][: n - 1], yi[: n - 1])  # targets = next inputs
            assert xi[0] == tokens.MEASUREMENT_START
            tokens.decode(torch.cat([xi[:1], yi[:n]]).numpy())


def _contexts(ds, cfg, n, seed=0):
    sampler = loader.BatchSampler(ds, "train", cfg, seed)
    rng = np.random.default_rng(seed)
    row = sampler.store.row(0)
    return row, [contexts.sample_context(row, cfg.seq_len + 1, rng, cfg) for _ in range(n)]


@pytest.mark.parametrize("probs", [(0.4, 0.3, 0.3), (0.1, 0.6, 0.3)])
def test_timestamp_modes_follow_their_configured_frequencies(data, probs):
    cfg = contexts.SamplerConfig(seq_len=256, mode_probs=probs)
    row, ctxs = _contexts(data["big"], cfg, 900)
    kind = Counter()
    none_sorted = 0
    for c in ctxs:
        t = row.time[c.sel]
        ts = t[c.has_time]
        assert (np.diff(ts) >= 0).all()  # timestamped ones are always in time order
        k = "full" if c.has_time.all() else "none" if not c.has_time.any() else "partial"
        kind[k] += 1
        none_sorted += k == "none" and bool((np.diff(t) >= 0).all())
    observed = [kind[m] for m in contexts.MODES]
    assert stats.chisquare(observed, np.array(probs) * len(ctxs)).pvalue > 1e-3
    assert none_sorted < 0.05 * max(kind["none"], 1)  # "none" contexts are shuffled
    fracs = [c.info["frac"] for c in ctxs if c.mode == "partial"]
    assert stats.kstest(fracs, stats.uniform(0.1, 0.8).cdf).pvalue > 1e-3


def test_windows_are_log_uniform_and_contexts_stay_inside_them(data):
    cfg = contexts.SamplerConfig(seq_len=1024, mode_probs=(1.0, 0.0, 0.0))
    row, ctxs = _contexts(data["big"], cfg, 600, seed=1)
    u, inside = [], 0
    for c in ctxs:
        d, d_min, d_max = c.window
        assert d_min <= d <= d_max
        u.append(np.log(d / d_min) / np.log(d_max / d_min))
        t = row.time[c.sel]
        if not c.info["widened"]:
            inside += 1
            assert c.window_start <= t.min() and t.max() <= c.window_start + d + 1
    assert stats.kstest(u, "uniform").pvalue > 0.01
    assert inside > 0.9 * len(ctxs)
    fill = np.array([c.n_tokens for c in ctxs]) / (cfg.seq_len + 1)
    assert fill.max() <= 1 and fill.min() > 0.95 and fill.mean() > 0.98  # never cut, nearly full


def test_rows_get_contexts_in_proportion_to_size_and_small_rows_are_packed(data):
    cfg = contexts.SamplerConfig(seq_len=512)
    big = loader.Plan(loader.RowStore(data["big"], "train"), cfg, seed=0)
    counts = np.bincount(big.item_row, minlength=len(big.expected))
    np.testing.assert_array_equal(counts, np.rint(big.expected / 513).astype(int))
    assert big.n_bins == 0 and counts.min() > 10
    small = loader.Plan(loader.RowStore(data["small"], "train"), cfg, seed=0)
    assert len(small.item_row) == 0 and small.n_bins > 5
    seen = []
    for epoch in (0, 1):
        order, off = small.bins(epoch)
        assert sorted(order.tolist()) == list(range(600))  # each small row in one bin
        seen.append([tuple(sorted(order[off[j]:off[j + 1]])) for j in range(small.n_bins)])
    assert seen[0] != seen[1]  # re-packed every epoch


def _sources(seq) -> set:
    return {m.src for m in tokens.decode(seq[seq >= 0])}


def _epoch(ds, world_size, rank, batch_size=2):
    ld = loader.build_loader(ds, "train", batch_size, 1024, 5, rank, world_size, num_epochs=1)
    out = []
    while True:
        try:
            out.append(ld.next_numpy())
        except StopIteration:
            return out


@pytest.mark.parametrize("name", ["medium", "small"])
def test_two_ranks_see_disjoint_rows_and_together_cover_the_epoch(data, name):
    one = _epoch(data[name], 1, 0)
    ranks = [_epoch(data[name], 2, r) for r in (0, 1)]
    for r in (0, 1):  # rank r of 2 yields the global micro-batches r, r + 2, ...
        assert len(ranks[r]) == len(one[r::2])
        for a, b in zip(ranks[r], one[r::2], strict=True):
            np.testing.assert_array_equal(a, b)
    src = [set().union(*(_sources(s) for b in rb for s in b)) for rb in ranks]
    assert not src[0] & src[1]
    everyone = set(schema.read_canonical(data[name] / "splits" / "train.parquet")["src_addr"]
                   .to_pylist())
    if name == "medium":  # one item per row: every row is seen, each in exactly one sequence
        assert src[0] | src[1] == everyone
        assert all(len(_sources(s)) == 1 for rb in ranks for b in rb for s in b)
    else:  # packed: a row whose bin filled up before it waits for the next epoch
        assert len(src[0] | src[1]) > 0.9 * len(everyone)


@pytest.mark.parametrize("name", ["big", "small", "medium"])
def test_padding_is_below_5_percent(data, name):
    st = loader.measure(data[name], "train", seq_len=1024, max_batches=30)
    assert st["padding_fraction"] < 0.05, st


_RESUME = """
import json, sys
import numpy as np
from ping_llm.data import loader
args = json.loads(sys.argv[1])
out = []
for workers in args["workers"]:
    ld = loader.build_loader(args["ds"], "train", 3, 256, 11, 0, 1, worker_count=workers)
    ld.set_state(args["state"])
    out.append([ld.next_numpy().tolist() for _ in range(args["m"])])
    ld.close()
print(json.dumps(out))
"""


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_in_a_fresh_process_continues_with_the_exact_next_batches(data, workers):
    ds, n, m = str(data["big"]), 4, 3
    ref = loader.build_loader(ds, "train", 3, 256, 11, 0, 1, worker_count=0)
    want = [ref.next_numpy().tolist() for _ in range(n + m)]
    ref.close()
    ld = loader.build_loader(ds, "train", 3, 256, 11, 0, 1, worker_count=workers)
    got = [ld.next_numpy().tolist() for _ in range(n)]
    state = json.loads(json.dumps(ld.get_state()))
    ld.close()
    assert got == want[:n]  # worker count does not change the batches
    other = 2 if workers == 0 else 0
    arg = json.dumps({"ds": ds, "state": state, "m": m, "workers": [workers, other]})
    res = subprocess.run([sys.executable, "-c", _RESUME, arg], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    same, switched = json.loads(res.stdout.strip().splitlines()[-1])
    assert same == want[n:]
    assert switched == want[n:]  # also with another worker count


class _Counting:
    """A stand-in dataset loader (loader contract): yields (its name, its batch number)."""

    def __init__(self, name):
        self.name, self.i = name, 0

    def __next__(self):
        self.i += 1
        return self.name, self.i - 1

    def get_state(self):
        return {"i": self.i}

    def set_state(self, state):
        self.i = state["i"]


def test_a_mixture_draws_datasets_by_weight_deterministically_and_resumes_exactly():
    def make(seed=3, rank=0):
        return loader.MixtureLoader([_Counting("a"), _Counting("b"), _Counting("c")],
                                    [0.6, 0.3, 0.1], seed, rank)

    m = make()
    first = [next(m) for _ in range(3000)]
    shares = Counter(name for name, _ in first)
    assert stats.chisquare([shares[k] for k in "abc"], [1800, 900, 300]).pvalue > 1e-3
    for k in "abc":  # each dataset's own batches in order, none skipped
        assert [i for name, i in first if name == k] == list(range(shares[k]))
    assert [next(make()) for _ in range(1)] == first[:1]  # same seed, same draws
    other = make(rank=1)
    assert [next(other) for _ in range(50)] != first[:50]  # ranks draw their own sequences
    resumed = make()
    resumed.set_state(json.loads(json.dumps(m.get_state())))
    again = make()
    for _ in range(3000):
        next(again)
    assert [next(resumed) for _ in range(200)] == [next(again) for _ in range(200)]
    with pytest.raises(InputError, match="mixture of 3 datasets"):
        make().set_state({"format": "ping-llm-mixture/1", "n": 0, "states": [{}]})
    with pytest.raises(InputError, match="non-negative weight"):
        loader.MixtureLoader([_Counting("a")], [0.5, 0.5], 0)


def test_curriculum_serves_short_contexts_first_then_full_ones_and_resumes_in_either_phase(
        data):
    ds = str(data["big"])

    def make():
        return loader.CurriculumLoader(
            loader.build_loader(ds, "train", 4, 128, 5, 0, 1, worker_count=0),
            lambda: loader.build_loader(ds, "train", 2, 256, 5, 0, 1, worker_count=0), 3)

    ref = make()
    want = [next(ref) for _ in range(6)]
    assert [tuple(x.shape) for x, _ in want] == [(4, 128)] * 3 + [(2, 256)] * 3
    full = loader.build_loader(ds, "train", 2, 256, 5, 0, 1, worker_count=0)
    assert all(torch.equal(next(full)[0], x) for x, _ in want[3:])  # the full loader from batch 0
    for n in (1, 3, 4):
        ld = make()
        for _ in range(n):
            next(ld)
        state = json.loads(json.dumps(ld.get_state()))
        ld.close()
        resumed = make()
        resumed.set_state(state)
        for x, y in want[n:]:
            x2, y2 = next(resumed)
            assert torch.equal(x, x2) and torch.equal(y, y2)
    with pytest.raises(InputError, match="curriculum"):
        make().set_state(full.get_state())


def _decoded(seq):
    return tokens.decode(seq[seq >= 0])


def test_readdressing_fractions_zero_leave_every_batch_unchanged(data):
    pairs = np.array([[g, g] for g in range(6)])
    plain = loader.BatchSampler(data["big"], "train", contexts.SamplerConfig(seq_len=256), 3)
    off = contexts.SamplerConfig(seq_len=256, readdress_src=0.0, readdress_dst=0.0,
                               readdress_keep=0.9)
    assert np.array_equal(plain(pairs), loader.BatchSampler(data["big"], "train", off, 3)(pairs))


@pytest.mark.parametrize("name", ["big", "small"])
def test_readdressed_contexts_keep_everything_but_the_source_and_map_it_consistently(data, name):
    cfg = contexts.SamplerConfig(seq_len=512, readdress_src=1.0)
    pairs = np.array([[g, g % 7] for g in range(8)])
    plain = loader.BatchSampler(data[name], "train", contexts.SamplerConfig(seq_len=512), 3)
    aug = loader.BatchSampler(data[name], "train", cfg, 3)
    a, b = plain(pairs), aug(pairs)
    assert np.array_equal(a < 0, b < 0)  # same lengths: versions are kept
    assert np.array_equal(aug(pairs), b)  # a pure function of (seed, index, item)
    real_sources = set(schema.read_canonical(data[name] / "splits/train.parquet")["src_addr"]
                       .to_pylist())
    for (g, item), sa, sb in zip(pairs, a, b, strict=True):
        ma, mb = _decoded(sa), _decoded(sb)
        assert [(m.dst, m.rtt_ms, m.time) for m in ma] == [(m.dst, m.rtt_ms, m.time) for m in mb]
        # one context per row: within it, the real -> new source mapping is a bijection
        start = 0
        for _, c in plain.contexts(g, item):
            seg = slice(start, start + len(c.sel))
            start += len(c.sel)
            mapping = {}
            for x, y in zip(ma[seg], mb[seg], strict=True):
                assert mapping.setdefault(x.src, y.src) == y.src
                assert (":" in x.src) == (":" in y.src)
            assert len(set(mapping.values())) == len(mapping)
            assert not set(mapping.values()) & real_sources


def test_readdress_knowledge_adds_the_same_rows_under_the_real_addresses(data):
    pairs = np.array([[g, g % 7] for g in range(8)])
    aug = contexts.SamplerConfig(seq_len=512, readdress_src=1.0, readdress_dst=0.5)
    both = loader.BatchSampler(data["big"], "train", contexts.SamplerConfig(
        seq_len=512, readdress_src=1.0, readdress_dst=0.5, readdress_knowledge=True), 3)(pairs)
    plain = loader.BatchSampler(data["big"], "train", contexts.SamplerConfig(seq_len=512), 3)
    assert both.shape == (8, 2, 512 + 1)
    # the rows are the re-addressed ones, unchanged; the second copy is the plain batch
    assert np.array_equal(both[:, 0], loader.BatchSampler(data["big"], "train", aug, 3)(pairs))
    assert np.array_equal(both[:, 1], plain(pairs))
    knows = contexts.SamplerConfig(seq_len=512, readdress_src=1.0, readdress_knowledge=True)
    x, y, real = next(loader.build_loader(data["big"], "train", 2, 512, 0, 0, 1, config=knows))
    assert x.shape == y.shape == real.shape == (2, 512) and not torch.equal(x, real)
    roles = x < tokens.BYTE0  # role tokens (and padding) sit at the same places in both
    assert torch.equal(roles, real < tokens.BYTE0) and torch.equal(x[roles], real[roles])


def test_readdress_draws_global_unicast_addresses_some_inside_the_real_network():
    rng = np.random.default_rng(0)
    n = 4000
    addr = np.zeros((n, 16), np.uint8)
    addr[: n // 2, :4] = [20, 1, 2, 3]
    addr[n // 2 :] = np.frombuffer(bytes.fromhex("20010db8000100020003000400050006"), np.uint8)
    version = np.r_[np.full(n // 2, 4), np.full(n // 2, 6)]
    new = contexts.readdress(addr, version, rng, keep=0.5)
    v4, v6 = new[: n // 2], new[n // 2 :]
    assert (v4[:, 4:] == 0).all() and (v4[:, 0] >= 1).all() and (v4[:, 0] <= 223).all()
    assert ((v6[:, 0] & 0xE0) == 0x20).all()  # 2000::/3
    # kept prefixes: the first byte always survives a keep (L >= 8 / 16 bits) ...
    # (half kept, plus the random first bytes that happen to match; 4 sigma of binomial noise)
    assert (v4[:, 0] == 20).mean() == pytest.approx(0.5 + 0.5 / 223, abs=0.045)
    assert ((v6[:, 0] == 0x20) & (v6[:, 1] == 0x01)).mean() == pytest.approx(0.5, abs=0.045)
    # ... and never more than /24 (IPv4) or /48 (IPv6): the host part is always drawn anew
    assert (v4[:, 3] == 3).mean() < 0.02  # chance: 1/256
    assert (v6[:, 6:] != addr[n // 2 :, 6:]).any(axis=1).all()


def test_bad_arguments_and_foreign_states_are_input_errors(data):
    with pytest.raises(InputError):
        loader.build_loader(data["small"], "train", 2, 256, 0, 2, 2)
    with pytest.raises(InputError, match="no rows"):
        loader.build_loader(data["small"], "test_time", 2, 256, 0, 0, 1)
    with pytest.raises(InputError):
        contexts.SamplerConfig(mode_probs=(0.5, 0.5, 0.5))
    with pytest.raises(InputError, match="readdress_src"):
        contexts.SamplerConfig(readdress_src=1.5)
    a = loader.build_loader(data["small"], "train", 2, 256, 0, 0, 1)
    b = loader.build_loader(data["small"], "train", 2, 256, 1, 0, 1)
    with pytest.raises(InputError, match="seed"):
        b.set_state(a.get_state())
