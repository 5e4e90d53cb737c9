"""rows: one probe's measurements as one compact binary record; exact token lengths; a writer
that caps records and rotates ArrayRecord shards."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from ping_llm import tokens
from ping_llm.data import rows
from ping_llm.errors import InputError


def test_record_codec_roundtrips_ipv6_and_wide_address_tables():
    rng = np.random.default_rng(0)
    for k in (3, 70_000):  # u2 and u4 address indices
        n = 1000
        addr = rng.integers(0, 256, (k, 16), dtype=np.uint8)
        version = np.full(k, 6, np.uint8)
        time = np.sort(rng.integers(1_500_000_000, 1_600_000_000, n))
        src, dst = rng.integers(0, k, n), rng.integers(0, k, n)
        code = rng.integers(0, 65536, n).astype(np.uint16)
        failed = rng.random(n) < 0.1
        buf = rows.encode_record("prb:1", 1, 3, time, src, dst, addr, version, code, failed)
        row = rows.decode_record(buf)
        assert (row.source, row.prb_id, row.chunk, row.n) == ("prb:1", 1, 3, n)
        np.testing.assert_array_equal(row.time, time)
        np.testing.assert_array_equal(row.addr[row.src], addr[src])
        np.testing.assert_array_equal(row.addr[row.dst], addr[dst])
        np.testing.assert_array_equal(row.code, code)
        np.testing.assert_array_equal(row.failed.astype(bool), failed)
    with pytest.raises(InputError):
        rows.decode_record(b"XXXX" + bytes(60))


def test_token_lengths_match_the_real_encoder_for_mixed_families_failures_and_gaps():
    rng = np.random.default_rng(1)
    n = 400
    version = rng.choice([4, 6], n)
    addr = rng.integers(0, 256, (n, 16), dtype=np.uint8)
    addr[version == 4, 4:] = 0
    rtt = np.where(rng.random(n) < 0.2, -1.0, rng.uniform(0.1, 900.0, n))
    # gaps that hit DELTA1 (< 256 s), DELTA4 and back-in-time (ABS) encodings
    time = 1_600_000_000 + np.cumsum(rng.choice([0, 5, 255, 256, 70_000, -10], n))
    has_time = rng.random(n) < 0.7
    order = np.tile(np.arange(4, dtype=np.int8), (n, 1))
    dst = addr.copy()
    dst[:, 0] ^= 1
    toks, _ = tokens.encode(addr, dst, version, rtt, time, has_time, order)
    want = rows.base_lengths(version, rtt < 0) + rows.time_lengths(time, has_time)
    assert len(toks) == int(want.sum())
    assert rows.time_lengths(time, np.zeros(n, bool)).sum() == 0


def test_writer_caps_records_numbers_chunks_and_indexes_every_measurement(tmp_path):
    rng = np.random.default_rng(2)
    k, n = 40, 5000
    addr = np.zeros((k, 16), np.uint8)
    addr[:, :4] = rng.integers(1, 255, (k, 4))
    version = np.full(k, 4, np.uint8)
    w = rows.RowWriter(tmp_path, addr, version, max_record_bytes=8 << 10, shard_bytes=20 << 10)
    t = np.sort(rng.integers(1_500_000_000, 1_500_100_000, n))
    rtt = np.where(rng.random(n) < 0.1, -1.0, rng.uniform(1, 300, n))
    w.write_probe("prb:7", 7, t[:3000], np.zeros(3000, int), rng.integers(1, k, 3000), rtt[:3000])
    w.write_probe("prb:7", 7, t[3000:], np.zeros(2000, int), rng.integers(1, k, 2000), rtt[3000:])
    w.close()
    index = pq.read_table(tmp_path / "index.parquet").to_pydict()
    assert len(w.shards) > 1
    assert max(index["bytes"]) <= 8 << 10
    assert sum(index["n"]) == n
    assert index["chunk"] == list(range(len(index["chunk"])))  # numbered on across calls

    from array_record.python.array_record_module import ArrayRecordReader

    got = []
    for shard in w.shards:
        r = ArrayRecordReader(str(tmp_path / shard))
        got += [rows.decode_record(b) for b in r.read(list(range(r.num_records())))]
        r.close()
    assert [g.n for g in got] == index["n"]
    np.testing.assert_array_equal(np.concatenate([g.time for g in got]), t)
    np.testing.assert_allclose(np.concatenate([g.rtt_ms() for g in got]),
                               np.where(rtt < 0, -1.0, tokens.code_to_rtt(tokens.rtt_to_code(
                                   np.maximum(rtt, 0)))))
    for g, full in zip(got, index["tokens_full"], strict=True):
        base = rows.base_lengths(g.version[g.src], g.failed)
        assert full == int((base + rows.time_lengths(g.time, np.ones(g.n, bool))).sum())
