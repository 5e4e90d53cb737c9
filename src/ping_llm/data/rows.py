"""The probe-centric row record: binary layout, codec, exact token lengths, writer.

A row holds the measurements of one probe, time-sorted, as one ArrayRecord record, so that the
loader decodes a whole row with a handful of `np.frombuffer` calls and no per-measurement Python.
`ping_llm.data.prepare` decides what goes into rows; `ping_llm.data.loader` reads them back. Layout
(little-endian, 8-byte aligned sections):

    header   HEADER_DTYPE (48 bytes): magic b"PLR1", format version, index width (2|4 bytes),
             n measurements, k addresses, chunk number, source length, t0 / t1 (first / last
             epoch second), prb_id (-1 = none)
    source   utf-8 probe key ("prb:6012" or the source address)
    addr     (k, 16) uint8 address table (IPv4 in bytes 0-3), then (k,) uint8 ip versions
    toff     (n,) uint32 seconds since t0        src, dst  (n,) uint16|uint32 indices into addr
    code     (n,) uint16 RTT code (tokens.rtt_to_code; meaningless when failed)
    failed   (n,) uint8 1 = no reply

About 11 bytes per measurement with 2-byte indices (vs ~60 for a JSON line).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ping_llm import tokens
from ping_llm.errors import InputError

RECORD_MAGIC = b"PLR1"
RECORD_VERSION = 1
ARRAY_RECORD_OPTIONS = "group_size:1,zstd:1"  # one record per chunk: random access, no group reads

HEADER_DTYPE = np.dtype([
    ("magic", "S4"), ("version", "<u2"), ("idx_bytes", "u1"), ("_pad", "u1"), ("n", "<u4"),
    ("k", "<u4"), ("chunk", "<u4"), ("source_len", "<u4"), ("t0", "<i8"), ("t1", "<i8"),
    ("prb_id", "<i8"),
])  # 48 bytes


# ----------------------------------------------------------------------------------------------
# token lengths (exact; the loader uses the same functions to fill sequences)


def base_lengths(version, failed) -> np.ndarray:
    """Tokens of each measurement without its timestamp: START + src + dst + result."""
    addr = np.where(np.asarray(version) == 4, 5, 17)
    return 1 + 2 * addr + np.where(np.asarray(failed, dtype=bool), 1, 3)


def time_lengths(time, has_time) -> np.ndarray:
    """Tokens of each timestamp field for measurements encoded in this order, as one context
    (0 where has_time is False); same rules as tokens.encode (ABS 9, DELTA1 2, DELTA4 5)."""
    time = np.asarray(time, dtype=np.int64)
    has_time = np.asarray(has_time, dtype=bool)
    out = np.zeros(len(time), np.int64)
    idx = np.flatnonzero(has_time)
    if len(idx) == 0:
        return out
    t = time[idx]
    d = np.empty(len(idx), np.int64)
    d[0] = -1
    d[1:] = t[1:] - t[:-1]
    d1 = (d >= 0) & (d < tokens.DELTA1_LIMIT)
    out[idx] = np.where(d1, 2, np.where((d >= 0) & (d < tokens.DELTA4_LIMIT), 5, 9))
    return out


# ----------------------------------------------------------------------------------------------
# record codec


@dataclass(frozen=True)
class Row:
    """One decoded record; the arrays are read-only views into the record's bytes."""

    source: str
    prb_id: int | None
    chunk: int
    t0: int
    t1: int
    toff: np.ndarray  # (n,) uint32 seconds since t0, non-decreasing
    src: np.ndarray  # (n,) indices into addr
    dst: np.ndarray
    code: np.ndarray  # (n,) uint16
    failed: np.ndarray  # (n,) uint8
    addr: np.ndarray  # (k, 16) uint8
    version: np.ndarray  # (k,) uint8

    @property
    def n(self) -> int:
        return len(self.toff)

    @property
    def time(self) -> np.ndarray:
        return self.t0 + self.toff.astype(np.int64)

    def rtt_ms(self) -> np.ndarray:
        return np.where(self.failed.astype(bool), -1.0, tokens.code_to_rtt(self.code))


def _pad8(n: int) -> int:
    return (n + 7) & ~7


def encode_record(source: str, prb_id, chunk: int, time, src, dst, addr, version, code, failed):
    """Measurements of one row (time-sorted) -> record bytes. src/dst index addr (k, 16)."""
    time = np.asarray(time, dtype=np.int64)
    n, k = len(time), len(addr)
    if n == 0:
        raise ValueError("a record needs at least one measurement")
    if np.any(np.diff(time) < 0):
        raise ValueError("record measurements must be time-sorted")
    idx_dtype = np.dtype("<u2") if k <= 0xFFFF else np.dtype("<u4")
    src_b = source.encode()
    head = np.zeros((), HEADER_DTYPE)
    head["magic"], head["version"] = RECORD_MAGIC, RECORD_VERSION
    head["idx_bytes"] = idx_dtype.itemsize
    head["n"], head["k"], head["chunk"], head["source_len"] = n, k, chunk, len(src_b)
    head["t0"], head["t1"] = time[0], time[-1]
    head["prb_id"] = -1 if prb_id is None else int(prb_id)
    parts = [
        head.tobytes(),
        src_b.ljust(_pad8(len(src_b)), b"\0"),
        (np.asarray(addr, np.uint8).tobytes() + np.asarray(version, np.uint8).tobytes()).ljust(
            _pad8(17 * k), b"\0"
        ),
    ]
    cols = [
        (time - time[0]).astype("<u4"),
        np.asarray(src).astype(idx_dtype),
        np.asarray(dst).astype(idx_dtype),
        np.asarray(code).astype("<u2"),
        np.asarray(failed).astype(np.uint8),
    ]
    for c in cols:
        b = c.tobytes()
        parts.append(b.ljust(_pad8(len(b)), b"\0"))
    return b"".join(parts)


def decode_record(buf: bytes) -> Row:
    """Record bytes -> Row (zero-copy views)."""
    head = np.frombuffer(buf, HEADER_DTYPE, count=1)[0]
    if head["magic"] != RECORD_MAGIC or head["version"] != RECORD_VERSION:
        raise InputError(f"not a ping-llm row record (magic {head['magic']!r})")
    n, k, sl = int(head["n"]), int(head["k"]), int(head["source_len"])
    idx = np.dtype("<u2") if head["idx_bytes"] == 2 else np.dtype("<u4")
    off = HEADER_DTYPE.itemsize
    source = bytes(buf[off : off + sl]).decode()
    off += _pad8(sl)
    addr = np.frombuffer(buf, np.uint8, count=16 * k, offset=off).reshape(k, 16)
    version = np.frombuffer(buf, np.uint8, count=k, offset=off + 16 * k)
    off += _pad8(17 * k)
    out = []
    for dt in (np.dtype("<u4"), idx, idx, np.dtype("<u2"), np.dtype(np.uint8)):
        out.append(np.frombuffer(buf, dt, count=n, offset=off))
        off += _pad8(n * dt.itemsize)
    prb = int(head["prb_id"])
    return Row(
        source=source,
        prb_id=None if prb < 0 else prb,
        chunk=int(head["chunk"]),
        t0=int(head["t0"]),
        t1=int(head["t1"]),
        toff=out[0],
        src=out[1],
        dst=out[2],
        code=out[3],
        failed=out[4],
        addr=addr,
        version=version,
    )


# ----------------------------------------------------------------------------------------------
# writing rows into ArrayRecord shards


class RowWriter:
    """Collects one probe's time-sorted measurements and writes records into rotating shards."""

    def __init__(self, out_dir: Path, addr: np.ndarray, version: np.ndarray,
                 max_record_bytes: int = 8 << 20, shard_bytes: int = 256 << 20):
        from array_record.python.array_record_module import ArrayRecordWriter

        self._writer_cls = ArrayRecordWriter
        self.out_dir, self.addr, self.version = Path(out_dir), addr, version
        self.max_record_bytes, self.shard_bytes = max_record_bytes, shard_bytes
        self.shards: list[str] = []
        self.index: dict[str, list] = {k: [] for k in _INDEX_COLUMNS}
        self._w = None
        self._shard_size = 0
        self._probe, self._next_chunk = None, 0
        # 11 bytes per measurement with u2 indices; a record that comes out larger (many
        # addresses, u4 indices) is cut shorter in proportion until it fits.
        self.max_n = max(1, (max_record_bytes - min(4096, max_record_bytes // 4)) // 11)

    def _open(self):
        name = f"rows-{len(self.shards):05d}.array_record"
        self._w = self._writer_cls(str(self.out_dir / name), ARRAY_RECORD_OPTIONS)
        self.shards.append(name)
        self._shard_size = 0

    def write_probe(self, probe: str, prb_id, t, src_id, dst_id, rtt) -> None:
        """Measurements of one probe (time-sorted) -> records; a probe may come in several calls
        (consecutive pieces), its chunks are numbered on."""
        start = 0
        chunk = self._next_chunk if probe == self._probe else 0
        self._probe = probe
        while start < len(t):
            stop = min(len(t), start + self.max_n)
            while True:
                rec, meta = self._record(probe, prb_id, chunk, t, src_id, dst_id, rtt, start, stop)
                if len(rec) <= self.max_record_bytes or stop - start == 1:
                    break
                shrink = 0.97 * self.max_record_bytes / len(rec)
                stop = start + max(1, min(stop - start - 1, int((stop - start) * shrink)))
            if self._w is None or self._shard_size + len(rec) > self.shard_bytes:
                if self._w is not None:
                    self._w.close()
                self._open()
            self._w.write(rec)
            self._shard_size += len(rec)
            meta["shard"] = len(self.shards) - 1
            for key, value in meta.items():
                self.index[key].append(value)
            start, chunk = stop, chunk + 1
        self._next_chunk = chunk

    def _record(self, probe, prb_id, chunk, t, src_id, dst_id, rtt, a, b):
        ids, inv = np.unique(np.concatenate([src_id[a:b], dst_id[a:b]]), return_inverse=True)
        m = b - a
        failed = rtt[a:b] < 0
        code = np.zeros(m, np.uint16)
        code[~failed] = tokens.rtt_to_code(rtt[a:b][~failed])
        ver = self.version[ids]
        rec = encode_record(
            probe, prb_id, chunk, t[a:b], inv[:m], inv[m:], self.addr[ids], ver, code, failed
        )
        base = base_lengths(ver[inv[:m]], failed)
        full = time_lengths(t[a:b], np.ones(m, bool))
        meta = {"source": probe, "prb_id": prb_id, "chunk": chunk, "n": m, "t_first": int(t[a]),
                "t_last": int(t[b - 1]), "tokens_none": int(base.sum()),
                "tokens_full": int(base.sum() + full.sum()), "n_v6": int((ver[inv[:m]] == 6).sum()),
                "n_failed": int(failed.sum()), "bytes": len(rec)}
        return rec, meta

    def close(self) -> None:
        if self._w is not None:
            self._w.close()
            self._w = None
        idx = {"record": pa.array(np.arange(len(self.index["n"]), dtype=np.int64))}
        idx.update({k: pa.array(v, type=_INDEX_COLUMNS[k]) for k, v in self.index.items()})
        pq.write_table(pa.table(idx), self.out_dir / "index.parquet")


_INDEX_COLUMNS = {"shard": pa.int32(), "source": pa.string(), "prb_id": pa.int64(),
                  "chunk": pa.int32(), **{k: pa.int64() for k in (
                      "n", "t_first", "t_last", "tokens_none", "tokens_full", "n_v6", "n_failed",
                      "bytes")}}
