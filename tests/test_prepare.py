"""prepare: leak-free deterministic splits, probe-centric rows that hold exactly their split, and a
card that describes it all (SPEC §2.3)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from ping_llm import cli, ingest, prepare, rows, schema, tokens
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


@pytest.mark.parametrize("name", REAL)
def test_no_test_measurement_held_out_probe_or_pair_leaks_into_train(prepared, canonical, name):
    ds = prepared[name]
    card = prepare.load_card(ds)
    sp = card["split_params"]
    train = _split_table(ds, "train")
    tests = {s: _split_table(ds, s) for s in ("test_time", "test_probe", "test_pair")}
    for s, t in tests.items():
        assert t.num_rows > 0, f"{name}: {s} is empty"
    # every input measurement is in exactly one split
    everything = schema.read_canonical(canonical[name])
    assert sum(t.num_rows for t in tests.values()) + train.num_rows == everything.num_rows
    cut = sp["time_cut_epoch_s"]
    train_t = train["event_time"].cast(pa.int64())
    # no test measurement in train: their (time, src, dst) keys are disjoint
    train_keys = _keys(train, "event_time", "src_addr", "dst_addr")
    for s, t in tests.items():
        assert not train_keys & _keys(t, "event_time", "src_addr", "dst_addr"), s
    train_src, train_dst = set(train["src_addr"].to_pylist()), set(train["dst_addr"].to_pylist())
    train_pairs = _keys(train, "src_addr", "dst_addr")
    # test_time: after the cut, sources seen in train; train ends before the cut
    tt = tests["test_time"]
    assert pc.min(train_t).as_py() >= card["time_range"]["first_epoch_s"]
    assert pc.max(train_t).as_py() < cut <= pc.min(tt["event_time"].cast(pa.int64())).as_py()
    assert set(tt["src_addr"].to_pylist()) <= train_src
    # test_probe: held-out sources never in train; each is hashed out or appears only late
    tp = tests["test_probe"]
    probe_src = set(tp["src_addr"].to_pylist())
    assert not probe_src & train_src
    held = {s for s in probe_src if prepare.u01(card["seed"], "src", s) < sp["probe_fraction"]}
    first = tp.group_by("src_addr").aggregate([("event_time", "min")])
    late = {
        s
        for s, t in zip(first["src_addr"].to_pylist(), first["event_time_min"].cast(pa.int64())
                        .to_pylist(), strict=True)
        if t >= cut
    }
    assert held | late == probe_src
    assert not {s for s in train_src if prepare.u01(card["seed"], "src", s) < sp["probe_fraction"]}
    # test_pair: held-out pairs never in train, both endpoints seen in train, hashed out
    pairs = _keys(tests["test_pair"], "src_addr", "dst_addr")
    assert not pairs & train_pairs
    assert {s for s, _ in pairs} <= train_src and {d for _, d in pairs} <= train_dst
    assert all(prepare.u01(card["seed"], "pair", s, d) < sp["pair_fraction"] for s, d in pairs)


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


def test_bad_input_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        prepare.prepare([tmp_path / "missing.parquet"], tmp_path / "ds", progress=False)
    pq.write_table(pa.table({"x": [1]}), tmp_path / "x.parquet")
    with pytest.raises(InputError, match="rtt"):
        prepare.prepare([tmp_path / "x.parquet"], tmp_path / "ds", progress=False)
    with pytest.raises(InputError):
        prepare.PrepareConfig(probe_fraction=1.5)
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
    assert out["card"]["splits"]["train"]["measurements"] > 300_000
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
    cfg = prepare.PrepareConfig(time_fraction=0, probe_fraction=0, pair_fraction=0)
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
