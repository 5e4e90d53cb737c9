"""The canonical measurement table: its Arrow schema, readers and a validator.

Everything downstream of ingest (prepare, baselines, evaluation) reads measurements through this
module, so that one place decides what a valid table is. One row per ping packet:

    event_time  timestamp[s, tz=UTC]   when the ping result was produced (all packets of one RIPE
                                       result share its `timestamp`)
    src_addr    string                 source identity (the public address, see ripe.py)
    dst_addr    string
    ip_version  int8                   4 or 6
    rtt         float64                milliseconds; FAILED_RTT (-1.0) = no reply
    prb_id      int64  (nullable)      passthrough
    msm_id      int64  (nullable)      passthrough
    size        int32  (nullable)      passthrough (payload bytes)

`read_canonical` also accepts the original author's Parquet files: extra columns
(`packet_error_count`, `rtt_min/avg/max`, ...) are dropped, `ip_version`/`size` of any integer width
are cast, and `event_time` may be a timestamp of any unit and time zone (tz-naive = UTC) or epoch
seconds as integers or floats (floored to the second). Integers that only make sense as
milliseconds or finer (> 1e11, i.e. after the year 5000 as seconds) are refused rather than
guessed. Any negative RTT is a failure and is normalised to FAILED_RTT; a missing (null) or NaN RTT
is an error, because "no data" and "no reply" are different things.
"""

from __future__ import annotations

import glob
import ipaddress
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ping_llm.errors import InputError

FAILED_RTT = -1.0

CANONICAL_SCHEMA = pa.schema(
    [
        pa.field("event_time", pa.timestamp("s", tz="UTC"), nullable=False),
        pa.field("src_addr", pa.string(), nullable=False),
        pa.field("dst_addr", pa.string(), nullable=False),
        pa.field("ip_version", pa.int8(), nullable=False),
        pa.field("rtt", pa.float64(), nullable=False),
        pa.field("prb_id", pa.int64()),
        pa.field("msm_id", pa.int64()),
        pa.field("size", pa.int32()),
    ]
)
REQUIRED_COLUMNS = ("event_time", "src_addr", "dst_addr", "ip_version", "rtt")
OPTIONAL_COLUMNS = ("prb_id", "msm_id", "size")

# Epoch seconds above this are the year 5138+: the column is in ms/us/ns, not seconds.
_MAX_EPOCH_SECONDS = 100_000_000_000


def empty_table() -> pa.Table:
    return CANONICAL_SCHEMA.empty_table()


def _expand(paths_or_dirs) -> list[Path]:
    """Files, directories (all *.parquet below them, sorted) or glob patterns -> Parquet files."""
    if isinstance(paths_or_dirs, str | os.PathLike):
        paths_or_dirs = [paths_or_dirs]
    files: list[Path] = []
    for item in paths_or_dirs:
        p = Path(item)
        if p.is_dir():
            found = sorted(q for q in p.rglob("*.parquet") if not q.name.startswith("."))
            files.extend(found)
        elif p.is_file():
            files.append(p)
        elif glob.has_magic(str(item)):
            matches = sorted(Path(m) for m in glob.glob(str(item), recursive=True))
            if not matches:
                raise InputError(f"no file matches {str(item)!r}")
            files.extend(m for m in matches if m.is_file())
        else:
            raise InputError(f"no such file or directory: {str(item)!r}")
    return files


def _event_time(col: pa.ChunkedArray, name: str) -> pa.ChunkedArray:
    target = pa.timestamp("s", tz="UTC")
    t = col.type
    if pa.types.is_timestamp(t):
        # Arrow stores instants as UTC whatever the tz; tz-naive values are taken as UTC.
        col = col.cast(pa.timestamp(t.unit, tz="UTC"))
        if t.unit != "s":
            col = pc.floor_temporal(col, unit="second")
        return col.cast(target, safe=False)
    if pa.types.is_date(t):
        return col.cast(pa.timestamp("s")).cast(target)
    if pa.types.is_integer(t) or pa.types.is_floating(t):
        if pa.types.is_floating(t):
            if pc.any(pc.is_nan(col)).as_py():
                raise InputError(f"{name}: event_time has NaN values")
            col = pc.floor(col)
        mx = pc.max(pc.abs(col)).as_py()
        if mx is not None and mx > _MAX_EPOCH_SECONDS:
            raise InputError(
                f"{name}: event_time values up to {mx} are not epoch seconds (milliseconds?); "
                "convert them to seconds"
            )
        return col.cast(pa.int64()).cast(target)
    raise InputError(f"{name}: event_time has unsupported type {t}")


def normalize(table: pa.Table, name: str = "table") -> pa.Table:
    """Any accepted table -> exactly CANONICAL_SCHEMA (column order, types); raises InputError."""
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise InputError(
            f"{name}: missing required column(s) {missing}; a canonical table needs "
            f"{list(REQUIRED_COLUMNS)} (has {table.column_names})"
        )
    cols = []
    for field in CANONICAL_SCHEMA:
        if field.name not in table.column_names:
            cols.append(pa.nulls(table.num_rows, field.type))
            continue
        col = table.column(field.name)
        if field.name == "event_time":
            col = _event_time(col, name)
        elif col.type != field.type:
            try:
                col = col.cast(field.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                raise InputError(f"{name}: column {field.name} ({col.type}): {e}") from None
        cols.append(col)
    out = pa.Table.from_arrays(cols, schema=CANONICAL_SCHEMA.remove_metadata())
    for c in REQUIRED_COLUMNS:
        if out.column(c).null_count:
            raise InputError(f"{name}: column {c} has {out.column(c).null_count} null value(s)")
    rtt = out.column("rtt")
    if pc.any(pc.is_nan(rtt)).as_py():
        raise InputError(f"{name}: rtt has NaN values (use {FAILED_RTT} for no reply)")
    if pc.any(pc.less(rtt, 0.0)).as_py():
        fixed = pc.if_else(pc.less(rtt, 0.0), FAILED_RTT, rtt)
        i = out.schema.get_field_index("rtt")
        out = out.set_column(i, CANONICAL_SCHEMA.field("rtt"), fixed)
    ver = out.column("ip_version")
    bad = pc.sum(pc.invert(pc.is_in(ver, pa.array([4, 6], pa.int8())))).as_py()
    if bad:
        raise InputError(f"{name}: {bad} row(s) have ip_version other than 4 or 6")
    return out.cast(CANONICAL_SCHEMA)


def iter_canonical(paths_or_dirs, batch_rows: int = 1 << 20) -> Iterator[pa.Table]:
    """Stream normalised tables of at most ~batch_rows rows, file by file (flat memory)."""
    for path in _expand(paths_or_dirs):
        try:
            pf = pq.ParquetFile(path)
        except (pa.ArrowInvalid, OSError) as e:
            raise InputError(f"{path}: not a readable Parquet file ({e})") from None
        if pf.metadata.num_rows == 0:
            continue
        for batch in pf.iter_batches(batch_size=batch_rows):
            yield normalize(pa.Table.from_batches([batch]), str(path))


def read_canonical(paths_or_dirs) -> pa.Table:
    """Read Parquet file(s) / directories / globs into one table with CANONICAL_SCHEMA.

    Accepts our files and the original author's (see module docstring); raises InputError with a
    clear message when a required column is missing or a value cannot be a measurement.
    """
    files = _expand(paths_or_dirs)
    tables = []
    for path in files:
        try:
            t = pq.read_table(path)
        except (pa.ArrowInvalid, OSError) as e:
            raise InputError(f"{path}: not a readable Parquet file ({e})") from None
        tables.append(normalize(t, str(path)))
    if not tables:
        return empty_table()
    return pa.concat_tables(tables)  # chunked (one chunk per row group): no 2 GiB string limit


def _bad_addresses(values: pa.ChunkedArray, versions: pa.ChunkedArray) -> tuple[int, list]:
    """Rows whose address does not parse or not match ip_version (each distinct pair once)."""
    pairs = pa.table({"a": values, "v": versions}).group_by(["a", "v"]).aggregate([])
    bad = []
    for a, v in zip(pairs.column("a").to_pylist(), pairs.column("v").to_pylist(), strict=True):
        try:
            ip = ipaddress.ip_address(a)
        except ValueError:
            bad.append((a, v))
            continue
        if ip.version != v or (ip.version == 6 and ip.ipv4_mapped is not None):
            bad.append((a, v))
    if not bad:
        return 0, []
    mask = np.zeros(len(values), dtype=bool)
    a_np = np.asarray(values.to_pylist(), dtype=object)
    v_np = versions.to_numpy()
    for a, v in bad:
        mask |= (a_np == a) & (v_np == v)
    return int(mask.sum()), bad[:5]


def validate(table: pa.Table, *, check_addresses: bool = True, name: str = "table") -> None:
    """Raise InputError unless `table` is a valid canonical table.

    Checks the exact schema (use `normalize` first for foreign files), no nulls in required
    columns, ip_version in {4, 6}, rtt finite and either >= 0 or FAILED_RTT, and (optionally, one
    parse per distinct address) that every address parses and matches its row's ip_version.
    """
    if not table.schema.remove_metadata().equals(CANONICAL_SCHEMA, check_metadata=False):
        raise InputError(f"{name}: schema is not canonical:\n{table.schema}")
    problems = []
    for c in REQUIRED_COLUMNS:
        if table.column(c).null_count:
            problems.append(f"{table.column(c).null_count} null {c}")
    ver = table.column("ip_version")
    n_bad_ver = pc.sum(pc.invert(pc.is_in(ver, pa.array([4, 6], pa.int8())))).as_py() or 0
    if n_bad_ver:
        problems.append(f"{n_bad_ver} ip_version not in (4, 6)")
    rtt = table.column("rtt")
    n_nonfinite = pc.sum(pc.invert(pc.is_finite(rtt))).as_py() or 0
    if n_nonfinite:
        problems.append(f"{n_nonfinite} non-finite rtt")
    n_neg = pc.sum(pc.and_(pc.less(rtt, 0.0), pc.not_equal(rtt, FAILED_RTT))).as_py() or 0
    if n_neg:
        problems.append(f"{n_neg} negative rtt other than {FAILED_RTT}")
    if check_addresses and not problems and table.num_rows:
        for c in ("src_addr", "dst_addr"):
            n, examples = _bad_addresses(table.column(c), ver)
            if n:
                problems.append(f"{n} {c} not an address of the row's ip_version, e.g. {examples}")
    if problems:
        raise InputError(f"{name}: invalid canonical table: " + "; ".join(problems))


def write_canonical(table: pa.Table, path: str | os.PathLike) -> None:
    """Write a canonical table atomically (temp file + rename), zstd-compressed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        pq.write_table(table.cast(CANONICAL_SCHEMA), tmp, compression="zstd")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


__all__ = [
    "CANONICAL_SCHEMA",
    "FAILED_RTT",
    "REQUIRED_COLUMNS",
    "empty_table",
    "iter_canonical",
    "normalize",
    "read_canonical",
    "validate",
    "write_canonical",
]
