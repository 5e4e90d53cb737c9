"""prepare: leak-free deterministic splits, probe-centric rows that hold exactly their split, and a
card that describes it all."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from ping_llm import cli, tokens
from ping_llm.data import ingest, prepare, rows, schema, splits
from ping_llm.errors import InputError

REAL = ("ripe_atlas_menog_2019", "ripe_atlas_builtin_v4v6_2019")


@pytest.fixture(scope="module")
def canonical(shared_data, tmp_path_factory):
    """Real RIPE Atlas samples ingested to canonical Parquet (ingest.ingest)."""
    out = {}
    for name in REAL:
        d = tmp_path_factory.mktemp(f"canon_{name}")
        ingest.ingest([shared_data / name / "raw.jsonl.gz"], d, progress=False)
        out[name] = d
    return out


@pytest.fixture(scope="module")
def prepared(canonical, tmp_path_factory):
    """The same, prepared with the default config (seed 0)."""
    out = {}
    for name, d in canonical.items():
        out[name] = tmp_path_factory.mktemp(name) / "ds"
        prepare.prepare([d], out[name], progress=False)
    return out


def _split_table(ds, split) -> pa.Table:
    return schema.read_canonical(ds / "splits" / f"{split}.parquet")


def _keys(t: pa.Table, *cols) -> set:
    return set(zip(*(t[c].to_pylist() for c in cols), strict=True))


def _probe(t: pa.Table) -> list:
    """The probe identity prepare splits on: prb_id where present, else the source address."""
    return [s if p is None else f"prb:{p}"
            for p, s in zip(t["prb_id"].to_pylist(), t["src_addr"].to_pylist(), strict=True)]


def _units(t: pa.Table) -> dict:
    """probe -> its unit: probes linked by a shared source address, named by the smallest key."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    probes, p_ix = np.unique(np.array(_probe(t)), return_inverse=True)
    _, a_ix = np.unique(t["src_addr"].to_numpy(zero_copy_only=False), return_inverse=True)
    n = len(probes)
    graph = coo_matrix((np.ones(len(p_ix)), (p_ix, n + a_ix)), shape=(n + a_ix.max() + 1,) * 2)
    _, label = connected_components(graph, directed=False)
    first = {}
    for p, lab in zip(probes, label[:n], strict=True):  # probes sorted: first = smallest
        first.setdefault(lab, p)
    return {p: first[lab] for p, lab in zip(probes, label[:n], strict=True)}


def _probe_dst(t: pa.Table) -> set:
    return set(zip(_probe(t), t["dst_addr"].to_pylist(), strict=True))


@pytest.mark.parametrize("name", REAL)
def test_no_test_measurement_held_out_probe_or_pair_leaks_into_train(prepared, canonical, name):
    ds = prepared[name]
    card = prepare.load_card(ds)
    sp = card["split_params"]
    train = _split_table(ds, "train")
    tests = {s: _split_table(ds, s)
             for s in ("test_time", "test_probe", "test_pair", "val", "val_probe")}
    for s, t in tests.items():
        assert t.num_rows > 0, f"{name}: {s} is empty"
    # every input measurement is in exactly one split
    everything = schema.read_canonical(canonical[name])
    assert sum(t.num_rows for t in tests.values()) + train.num_rows == everything.num_rows
    cut, vcut = sp["time_cut_epoch_s"], sp["val_time_cut_epoch_s"]
    train_t = train["event_time"].cast(pa.int64())
    # no test measurement in train: their (time, src, dst) keys are disjoint
    train_keys = _keys(train, "event_time", "src_addr", "dst_addr")
    for s, t in tests.items():
        assert not train_keys & _keys(t, "event_time", "src_addr", "dst_addr"), s
    train_probes, train_dst = set(_probe(train)), set(train["dst_addr"].to_pylist())
    train_pairs = _probe_dst(train)
    # train ends before val's time slice, which ends before test_time
    assert pc.min(train_t).as_py() >= card["time_range"]["first_epoch_s"]
    assert pc.max(train_t).as_py() < vcut < cut
    # test_time: after the cut, probes seen in train (under whatever address they used then)
    tt = tests["test_time"]
    assert cut <= pc.min(tt["event_time"].cast(pa.int64())).as_py()
    assert set(_probe(tt)) <= train_probes
    # test_probe: whole probes never in train; each is hashed out or has no train-period row
    tp = tests["test_probe"]
    held_probes = set(_probe(tp))
    assert not held_probes & train_probes
    unit = _units(everything)
    hashed = {p for p in held_probes
              if splits.u01(card["seed"], "probe", unit[p]) < sp["probe_fraction"]}
    first = {}
    for p, t in zip(_probe(tp), tp["event_time"].cast(pa.int64()).to_pylist(), strict=True):
        first[p] = min(first.get(p, t), t)
    assert hashed | {p for p, t in first.items() if t >= vcut} == held_probes
    assert not {p for p in train_probes
                if splits.u01(card["seed"], "probe", unit[p]) < sp["probe_fraction"]}
    assert not set(tp["src_addr"].to_pylist()) & set(train["src_addr"].to_pylist())
    # val_probe: whole probes never in train nor in test_probe, from the next hash interval;
    # every drawn unit with a measurement before the cuts is there, under every address
    vp = tests["val_probe"]
    val_probes = set(_probe(vp))
    hi = sp["probe_fraction"] + sp["val_probe_fraction"]
    assert val_probes and not val_probes & (train_probes | held_probes)
    assert all(sp["probe_fraction"] <= splits.u01(card["seed"], "probe", unit[p]) < hi
               for p in val_probes)
    assert not {p for p in train_probes if splits.u01(card["seed"], "probe", unit[p]) < hi}
    assert not set(vp["src_addr"].to_pylist()) & set(train["src_addr"].to_pylist())
    assert not set(vp["src_addr"].to_pylist()) & set(tp["src_addr"].to_pylist())
    # test_pair: held-out (probe, dst) pairs never in train, both ends in train, hashed out
    pairs = _probe_dst(tests["test_pair"])
    assert pairs and not pairs & train_pairs
    assert {p for p, _ in pairs} <= train_probes and {d for _, d in pairs} <= train_dst
    assert all(splits.u01(card["seed"], "pair", unit[p], d) < sp["pair_fraction"]
               for p, d in pairs)
    # val: its own hash interval of pairs, or the time slice [vcut, cut); probes in train
    val = tests["val"]
    assert set(_probe(val)) <= train_probes
    vt = val["event_time"].cast(pa.int64()).to_pylist()
    for (p, d), t in zip(zip(_probe(val), val["dst_addr"].to_pylist(), strict=True), vt,
                         strict=True):
        u = splits.u01(card["seed"], "pair", unit[p], d)
        assert t < cut and (vcut <= t or sp["pair_fraction"] <= u < sp["pair_fraction"]
                            + sp["val_pair_fraction"])
    assert card["invariants"]["violations"] == {}


def test_a_renumbering_nat_probe_leaks_through_address_keyed_splits_but_not_probe_keyed(tmp_path):
    """The synthetic world renumbers NAT'd home probes every few days (public `from` changes,
    prb_id stays). Splitting by source address puts one probe on both sides; by probe, never."""
    from ping_llm.data import synth, synth_atlas
    from ping_llm.data.splits import split_invariants

    raw = tmp_path / "world.jsonl"
    synth_atlas.generate(synth.SynthConfig(seed=3, probes=40, days=4, renumber_frac=0.9), raw,
                         progress=False)
    ingest.ingest([raw], tmp_path / "canon", progress=False)
    table = schema.read_canonical(tmp_path / "canon")
    probes_per_addr = {}
    for p, s in zip(_probe(table), table["src_addr"].to_pylist(), strict=True):
        probes_per_addr.setdefault(p, set()).add(s)
    assert sum(len(a) > 1 for a in probes_per_addr.values()) >= 5  # probes that renumbered

    # the old rule: hold out source *addresses*
    src = table["src_addr"].to_pylist()
    held = np.array([splits.u01(0, "src", s) < 0.3 for s in src])
    old = {"train": table.filter(pa.array(~held)), "test_probe": table.filter(pa.array(held))}
    assert split_invariants(old)["violations"]["test_probe probes in train"] > 0

    card = prepare.prepare([tmp_path / "canon"], tmp_path / "ds",
                           prepare.PrepareConfig(probe_fraction=0.3, row_splits=("train",)),
                           progress=False)
    assert card["invariants"]["violations"] == {}
    assert card["invariants"]["checked"]["test_probe probes in train"] == 0
    new = {s: _split_table(tmp_path / "ds", s) for s in prepare.SPLITS}
    assert new["test_probe"].num_rows > 0 and new["test_pair"].num_rows > 0
    assert split_invariants(new)["violations"] == {}
    # every address a held-out probe used is outside train
    renumbered = {p for p in _probe(new["test_probe"]) if len(probes_per_addr[p]) > 1}
    assert renumbered, "no renumbering probe was held out: pick another seed"
    train_src = set(new["train"]["src_addr"].to_pylist())
    assert not set().union(*(probes_per_addr[p] for p in renumbered)) & train_src


def test_since_until_keep_a_time_window(canonical, tmp_path):
    src = canonical["ripe_atlas_builtin_v4v6_2019"]
    everything = schema.read_canonical(src)["event_time"].cast(pa.int64())
    lo, hi = (int(np.quantile(everything.to_numpy(), q)) for q in (0.2, 0.6))
    card = prepare.prepare([src], tmp_path / "w", prepare.PrepareConfig(since=lo, until=hi,
                           row_splits=("train",)), progress=False)
    inside = int(((everything.to_numpy() >= lo) & (everything.to_numpy() < hi)).sum())
    assert card["counts"]["measurements"] == inside
    assert card["time_range"]["first_epoch_s"] >= lo and card["time_range"]["last_epoch_s"] < hi
    with pytest.raises(InputError, match="since"):
        prepare.PrepareConfig(since=hi, until=lo)


def test_val_probe_takes_the_next_hash_interval_and_leaves_test_probe_as_it_was(
        canonical, prepared, tmp_path):
    name = "ripe_atlas_menog_2019"
    without = prepare.prepare([canonical[name]], tmp_path / "ds",
                              prepare.PrepareConfig(val_probe_fraction=0, row_splits=("train",)),
                              progress=False)
    card = prepare.load_card(prepared[name])
    assert card["splits"]["test_probe"]["fingerprint"] == without["splits"]["test_probe"][
        "fingerprint"]
    assert card["splits"]["val_probe"]["measurements"] > 0
    assert not without["splits"].get("val_probe", {}).get("measurements")
    # without val_probe its probes train: train is larger, test_probe is the same
    assert without["splits"]["train"]["probes"] == (card["splits"]["train"]["probes"]
                                                    + card["splits"]["val_probe"]["probes"])


def test_splits_are_deterministic_per_seed(canonical, tmp_path):
    src = canonical["ripe_atlas_builtin_v4v6_2019"]
    cfg = prepare.PrepareConfig(seed=7, limit=40_000, row_splits=("train",))
    a = prepare.prepare([src], tmp_path / "a", cfg, progress=False)
    b = prepare.prepare([src], tmp_path / "b", cfg, progress=False)
    c = prepare.prepare([src], tmp_path / "c", prepare.PrepareConfig(seed=8, limit=40_000),
                        progress=False)
    fp = {k: {s: v["splits"][s]["fingerprint"] for s in prepare.SPLITS} for k, v in
          {"a": a, "b": b, "c": c}.items()}
    assert fp["a"] == fp["b"]
    assert fp["a"]["train"] != fp["c"]["train"]
    assert (tmp_path / "a" / "splits" / "train.parquet").read_bytes() == (
        tmp_path / "b" / "splits" / "train.parquet"
    ).read_bytes()
    assert a["counts"]["measurements"] == 40_000


def _records(ds, split):
    card = prepare.load_card(ds)
    from array_record.python.array_record_module import ArrayRecordReader

    out = []
    for shard in card["rows"][split]["shards"]:
        r = ArrayRecordReader(str(ds / shard))
        out.extend(rows.decode_record(b) for b in r.read(list(range(r.num_records()))))
        r.close()
    return out, pq.read_table(ds / card["rows"][split]["index"])


def test_rows_hold_exactly_their_split_grouped_by_probe_and_time_sorted(prepared):
    ds = prepared["ripe_atlas_builtin_v4v6_2019"]
    rows, index = _records(ds, "train")
    assert len(rows) == index.num_rows
    got = []
    for row, n, t0, t1, src in zip(rows, index["n"].to_pylist(), index["t_first"].to_pylist(),
                                   index["t_last"].to_pylist(), index["source"].to_pylist(),
                                   strict=True):
        assert (row.n, row.t0, row.t1, row.source) == (n, t0, t1, src)
        assert np.all(np.diff(row.time) >= 0)
        names = [tokens.format_address(a, v) for a, v in zip(row.addr, row.version, strict=True)]
        codes = np.where(row.failed != 0, -1, row.code.astype(np.int64))
        got += list(zip([row.source] * row.n, row.time.tolist(), [names[i] for i in row.src],
                        [names[i] for i in row.dst], codes.tolist(), strict=True))
    t = _split_table(ds, "train")
    rtt = t["rtt"].to_numpy()
    codes = np.full(len(rtt), -1)
    codes[rtt >= 0] = tokens.rtt_to_code(rtt[rtt >= 0])
    probe = [f"prb:{p}" for p in t["prb_id"].to_pylist()]
    want = list(zip(probe, t["event_time"].cast(pa.int64()).to_pylist(),
                    t["src_addr"].to_pylist(), t["dst_addr"].to_pylist(), codes.tolist(),
                    strict=True))
    assert sorted(got) == sorted(want)
    assert len({r.source for r in rows}) == len(rows)  # one record per probe at the default cap


def test_row_token_counts_match_the_real_encoder(prepared):
    rows, index = _records(prepared["ripe_atlas_builtin_v4v6_2019"], "test_pair")
    for row, full, none in zip(rows[:6], index["tokens_full"].to_pylist(),
                               index["tokens_none"].to_pylist(), strict=False):
        src, dst, ver = row.addr[row.src], row.addr[row.dst], row.version[row.src]
        order = np.tile(np.arange(4, dtype=np.int8), (row.n, 1))
        for has_time, want in ((True, full), (False, none)):
            toks, _ = tokens.encode(src, dst, ver, row.rtt_ms(), row.time,
                                    np.full(row.n, has_time), order)
            assert len(toks) == want


def test_large_probes_are_split_into_consecutive_chunks_under_the_cap(canonical, tmp_path):
    cap = 4 << 10
    cfg = prepare.PrepareConfig(limit=60_000, max_record_bytes=cap, shard_bytes=64 << 10,
                                row_splits=("train",))
    card = prepare.prepare([canonical["ripe_atlas_builtin_v4v6_2019"]], tmp_path / "d", cfg,
                           progress=False)
    rows, index = _records(tmp_path / "d", "train")
    assert len(card["rows"]["train"]["shards"]) > 1
    assert max(index["bytes"].to_pylist()) <= cap
    assert sum(r.n for r in rows) == card["splits"]["train"]["measurements"]
    by_probe: dict[str, list] = {}
    for r in rows:
        by_probe.setdefault(r.source, []).append(r)
    assert max(len(v) for v in by_probe.values()) > 2
    for chunks in by_probe.values():
        assert [c.chunk for c in chunks] == list(range(len(chunks)))
        for a, b in zip(chunks, chunks[1:], strict=False):
            assert a.t1 <= b.t0  # consecutive in time


def test_card_counts_add_up(prepared):
    card = prepare.load_card(prepared["ripe_atlas_builtin_v4v6_2019"])
    sp = card["splits"]
    assert sum(sp[s]["measurements"] for s in prepare.SPLITS) == card["counts"]["measurements"]
    assert card["ip_versions"]["4"] + card["ip_versions"]["6"] == card["counts"]["measurements"]
    assert card["ip_versions"]["6"] > 0.3 * card["counts"]["measurements"]
    for s in prepare.SPLITS:
        assert sp[s]["fingerprint"].startswith("sha256:") and sp[s]["rule"]
        assert card["rows"][s]["measurements"] == sp[s]["measurements"]
        tok = card["tokens"][s]
        assert 12 <= tok["per_measurement_none"] < tok["per_measurement_full"] <= 47
    tr = card["time_range"]
    assert tr["first"] < card["split_params"]["time_cut"] < tr["last"]


def _authors_table(n=3000, epoch_int=False) -> pa.Table:
    rng = np.random.default_rng(1)
    t = 1_750_000_000 + np.sort(rng.integers(0, 86400 * 3, n))
    rtt = rng.lognormal(3, 1, n)
    return pa.table({
        "msm_id": rng.integers(1, 9, n),
        "event_time": pa.array(t) if epoch_int else pa.array(t * 1000).cast(
            pa.timestamp("ms", tz="Europe/Paris")),
        "src_addr": [f"193.0.{i % 40}.1" for i in range(n)],
        "dst_addr": [f"8.8.{i % 7}.8" for i in range(n)],
        "ip_version": pa.array(np.full(n, 4, np.int64)),
        "rtt": np.where(rng.random(n) < 0.1, -1.0, rtt),
        "rtt_avg": rtt * 2,
        "size": pa.array(np.full(n, 64, np.int64)),
        "packet_error_count": pa.array(np.zeros(n, np.int64)),
    })


@pytest.mark.parametrize("epoch_int", [False, True])
def test_reads_the_authors_files_and_selects_the_rtt_column(tmp_path, epoch_int):
    tbl = _authors_table(epoch_int=epoch_int)
    pq.write_table(tbl, tmp_path / "author.parquet")
    cfg = prepare.PrepareConfig(rtt_column="rtt_avg", row_splits=("train",))
    card = prepare.prepare([tmp_path / "author.parquet"], tmp_path / "ds", cfg, progress=False)
    assert card["counts"]["measurements"] == tbl.num_rows
    got = pa.concat_tables(_split_table(tmp_path / "ds", s) for s in prepare.SPLITS)
    assert got.schema.equals(schema.CANONICAL_SCHEMA, check_metadata=False)
    assert sorted(got["rtt"].to_pylist()) == sorted(tbl["rtt_avg"].to_pylist())
    first = int(tbl["event_time"].cast(pa.int64())[0].as_py()) // (1 if epoch_int else 1000)
    assert card["time_range"]["first_epoch_s"] == first


def test_a_small_memory_limit_and_another_spill_directory_give_the_same_dataset(canonical,
                                                                               tmp_path):
    src = canonical["ripe_atlas_builtin_v4v6_2019"]
    base = prepare.PrepareConfig(seed=7, limit=40_000, row_splits=("train",))
    tight = dataclasses.replace(base, memory_limit="64MB", temp_dir=str(tmp_path / "spill"))
    a = prepare.prepare([src], tmp_path / "a", base, progress=False)
    b = prepare.prepare([src], tmp_path / "b", tight, progress=False)
    assert {s: a["splits"][s]["fingerprint"] for s in prepare.SPLITS} == \
        {s: b["splits"][s]["fingerprint"] for s in prepare.SPLITS}
    assert b["config"]["memory_limit"] == "64MB"
    assert list((tmp_path / "spill").iterdir()) == []  # its spill files are gone
    with pytest.raises(InputError, match="memory_limit"):
        prepare.PrepareConfig(memory_limit="lots")
    with pytest.raises(InputError, match="spill directory"):
        prepare.prepare([src], tmp_path / "c", dataclasses.replace(
            base, temp_dir=str(tmp_path / "a" / "card.json")), progress=False)
    assert not (tmp_path / "c").exists()


def test_bad_input_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        prepare.prepare([tmp_path / "missing.parquet"], tmp_path / "ds", progress=False)
    pq.write_table(pa.table({"x": [1]}), tmp_path / "x.parquet")
    with pytest.raises(InputError, match="rtt"):
        prepare.prepare([tmp_path / "x.parquet"], tmp_path / "ds", progress=False)
    with pytest.raises(InputError):
        prepare.PrepareConfig(probe_fraction=1.5)
    with pytest.raises(InputError, match="probe_fraction \\+ val_probe_fraction"):
        prepare.PrepareConfig(probe_fraction=0.5, val_probe_fraction=0.5)
    pq.write_table(_authors_table(200), tmp_path / "a.parquet")
    with pytest.raises(InputError, match="rtt_nope"):
        prepare.prepare([tmp_path / "a.parquet"], tmp_path / "ds",
                        prepare.PrepareConfig(rtt_column="rtt_nope"), progress=False)
    prepare.prepare([tmp_path / "a.parquet"], tmp_path / "ds", progress=False)
    with pytest.raises(InputError, match="--force"):
        prepare.prepare([tmp_path / "a.parquet"], tmp_path / "ds", progress=False)
    prepare.prepare([tmp_path / "a.parquet"], tmp_path / "ds", overwrite=True, progress=False)


def test_cli_prepare_stats_reports_padding_below_5_percent_on_menog(canonical, tmp_path, capsys):
    src = canonical["ripe_atlas_menog_2019"]
    rc = cli.main(["prepare", str(src), "--out", str(tmp_path / "ds"), "--stats",
                   "--stats-batches", "40", "--no-progress", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["card"]["splits"]["train"]["measurements"] > 250_000
    for split, st in out["stats"].items():
        assert st["padding_fraction"] < 0.05, split
        assert st["sequences"] > 0
    rc = cli.main(["prepare", str(src), "--out", str(tmp_path / "ds")])
    assert rc == 2  # exists: refuses without --force


def test_addresses_are_canonicalised_so_one_address_is_one_source(tmp_path):
    n = 400
    src = ["2001:DB8:0::1", "2001:db8::1", "2001:0db8::0001", "2001:db8::2"] * (n // 4)
    tbl = pa.table({
        "event_time": pa.array(1_700_000_000 + np.arange(n)).cast(pa.timestamp("s", tz="UTC")),
        "src_addr": src, "dst_addr": ["2001:4860:4860::8888"] * n,
        "ip_version": pa.array(np.full(n, 6), pa.int8()), "rtt": np.full(n, 10.0),
    })
    pq.write_table(tbl, tmp_path / "x.parquet")
    cfg = prepare.PrepareConfig(time_fraction=0, probe_fraction=0, val_probe_fraction=0,
                                pair_fraction=0)
    card = prepare.prepare([tmp_path / "x.parquet"], tmp_path / "ds", cfg, progress=False)
    assert card["counts"]["sources"] == 2
    got = _split_table(tmp_path / "ds", "train")
    assert set(got["src_addr"].to_pylist()) == {"2001:db8::1", "2001:db8::2"}
    # no prb_id: rows are per source address
    assert card["rows"]["train"]["records"] == 2


@pytest.mark.slow
def test_synthetic_default_through_the_cli_has_padding_below_5_percent(tmp_path, capsys):
    assert cli.main(["synth", "--out", str(tmp_path / "s.jsonl.gz"), "--no-progress"]) == 0
    rc = cli.main(["ingest", str(tmp_path / "s.jsonl.gz"), "--out", str(tmp_path / "canon"),
                   "--no-progress"])
    assert rc == 0
    capsys.readouterr()
    rc = cli.main(["prepare", str(tmp_path / "canon"), "--out", str(tmp_path / "ds"), "--stats",
                   "--stats-batches", "60", "--no-progress", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["card"]["ip_versions"]["6"] > 0
    for split, st in out["stats"].items():
        assert st["padding_fraction"] < 0.05, (split, st)
