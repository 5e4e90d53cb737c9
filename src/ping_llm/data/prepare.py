"""Prepared datasets: canonical Parquet -> leak-free splits + probe-centric rows + card.

`prepare(inputs, out_dir, PrepareConfig(...))` stages the measurements in DuckDB (on disk, so the
input may be far larger than memory), assigns every measurement to exactly one split, writes each
split as canonical Parquet, groups the measurements of each split by probe into compact binary
records (ArrayRecord shards, read by `ping_llm.data.loader` through grain) and describes it all in
`card.json`.

Splits: the rules in `data.splits` (every rule keyed on the probe, never on its address), checked
on the written splits and recorded in the card. `since`/`until` keep only the measurements inside
a time window (e.g. the first weeks of a campaign, for the drift protocol).

Rows: the measurements of one probe (prb_id when present, else the source address), in time
order, capped at `max_record_bytes` (8 MB) with larger probes split into consecutive chunks; one
row = one ArrayRecord record in the binary layout of `ping_llm.data.rows`.

Dataset directory:
    card.json                       format, inputs, seed, counts, time range, v4/v6 mix, splits
                                    (rules, counts, fingerprints), rows and shards, token stats
    splits/<split>.parquet          canonical table of each split, sorted (deterministic bytes)
    rows/<split>/rows-NNNNN.array_record   the records, sharded (~shard_bytes each)
    rows/<split>/index.parquet      one line per record: record, shard, source, prb_id, chunk,
                                    n, n_v6, n_failed, t_first, t_last, tokens_none /
                                    tokens_full (exact token counts of the whole row without /
                                    with timestamps), bytes (docs/data.md)
A split's fingerprint is a sha256 over its sorted content (column by column); a training run
copies the train fingerprint so that evaluation can refuse a mismatched dataset.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ping_llm import tokens
from ping_llm.data import schema
from ping_llm.data.rows import RECORD_MAGIC, RECORD_VERSION, RowWriter
from ping_llm.data.splits import SPLIT_RULES, SPLITS, assign, split_invariants
from ping_llm.errors import InputError
from ping_llm.options import option

FORMAT = "ping-llm-dataset"
FORMAT_VERSION = 2  # 2: splits keyed on the probe, a val split, invariants in the card
@dataclass
class PrepareConfig:
    """How to split and pack. Fractions: of the time range, of sources, of (src, dst) pairs.

    The fields made with `option` are `ping-llm prepare` flags, their help the field's doc;
    since / until take any time on the command line (`query.targets.parse_time`), so the CLI
    spells those two itself."""

    seed: int = option(0, "split hash seed")
    time_fraction: float = option(0.1, "last fraction of the time range -> test_time",
                                  metavar="FRAC")
    probe_fraction: float = option(0.1, "fraction of probes held out -> test_probe",
                                   metavar="FRAC")
    val_probe_fraction: float = option(0.1, "fraction of probes held out -> val_probe (the "
                                       "cold start that defaults are chosen on)",
                                       metavar="FRAC")
    pair_fraction: float = option(0.05, "fraction of (probe, dst) pairs held out -> test_pair",
                                  metavar="FRAC")
    val_time_fraction: float = option(0.05, "fraction of the time range just before test_time "
                                      "-> val", metavar="FRAC")
    val_pair_fraction: float = option(0.05, "fraction of (probe, dst) pairs held out -> val",
                                      metavar="FRAC")
    since: int | None = None  # epoch s: keep only measurements at or after it
    until: int | None = None  # epoch s: keep only measurements before it
    max_record_bytes: int = option(8 << 20, "cap of one probe row; larger probes are split",
                                   flag="--max-record-mb", unit="MB")
    shard_bytes: int = 256 << 20
    rtt_column: str = option("rtt", "column holding the RTT in ms, e.g. rtt_avg for the "
                             "author's files with several RTT columns")
    limit: int | None = option(None, "use at most this many measurements (in input order)")
    row_splits: tuple[str, ...] = SPLITS  # splits that get ArrayRecord rows
    # Where DuckDB spills: a directory on a disk with room for about the canonical input's size.
    # Python's own share is ~0.7 GB on top of memory_limit (measured to 72M packets).
    memory_limit: str = option("2GB", "DuckDB's memory; it spills to disk beyond it (Python "
                               "adds ~0.7 GB)", metavar="SIZE")
    temp_dir: str | None = option(None, "where DuckDB spills (default: inside the dataset's "
                                  "work directory)", metavar="DIR")

    def __post_init__(self):
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise InputError(f"seed must be an integer >= 0, got {self.seed!r}")
        for name in ("time_fraction", "probe_fraction", "val_probe_fraction", "pair_fraction",
                     "val_time_fraction", "val_pair_fraction"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and 0 <= v < 1):
                raise InputError(f"{name} must be in [0, 1), got {v!r}")
        if self.time_fraction + self.val_time_fraction >= 1:
            raise InputError("time_fraction + val_time_fraction must be < 1")
        if self.probe_fraction + self.val_probe_fraction >= 1:
            raise InputError("probe_fraction + val_probe_fraction must be < 1")
        if self.pair_fraction + self.val_pair_fraction >= 1:
            raise InputError("pair_fraction + val_pair_fraction must be < 1")
        for name in ("since", "until"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int | np.integer)):
                raise InputError(f"{name} must be epoch seconds (an integer), got {v!r}")
        if None not in (self.since, self.until) and self.since >= self.until:
            raise InputError(f"since ({self.since}) must be before until ({self.until})")
        if self.max_record_bytes < 4096:
            raise InputError(f"max_record_bytes must be >= 4096, got {self.max_record_bytes}")
        if self.shard_bytes < self.max_record_bytes:
            raise InputError("shard_bytes must be >= max_record_bytes")
        if self.limit is not None and self.limit < 1:
            raise InputError(f"limit must be >= 1, got {self.limit}")
        self.row_splits = tuple(self.row_splits)
        bad = [s for s in self.row_splits if s not in SPLITS]
        if bad:
            raise InputError(f"unknown split(s) {bad}; splits are {list(SPLITS)}")
        if not re.fullmatch(r"\s*\d+(\.\d+)?\s*([KMGT]i?B|B)\s*", str(self.memory_limit), re.I):
            raise InputError(f"memory_limit must be a size such as 2GB or 512MiB, got "
                             f"{self.memory_limit!r}")
        if not self.rtt_column.isidentifier():
            raise InputError(f"rtt_column must be a column name, got {self.rtt_column!r}")


# ----------------------------------------------------------------------------------------------
# staging: canonical Parquet -> DuckDB


def _expand(inputs) -> list[Path]:
    if isinstance(inputs, str | os.PathLike):
        inputs = [inputs]
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files.extend(sorted(q for q in p.rglob("*.parquet") if not q.name.startswith(".")))
        elif p.is_file():
            files.append(p)
        else:
            raise InputError(f"no such file or directory: {str(item)!r}")
    if not files:
        raise InputError(f"no Parquet files in {[str(i) for i in inputs]}")
    return files


# DuckDB's columns for the canonical ones, in CANONICAL_SCHEMA order (t = epoch seconds).
_STAGED = ("t", "src", "dst", "v", "rtt", "prb_id", "msm_id", "size")


def _stage(con, files: list[Path], cfg: PrepareConfig, progress: bool) -> int:
    """Normalise every input batch with schema.normalize and append it to DuckDB table `raw`."""
    from tqdm import tqdm

    con.execute(
        "CREATE TABLE raw (t BIGINT, src VARCHAR, dst VARCHAR, v TINYINT, rtt DOUBLE, "
        "prb_id BIGINT, msm_id BIGINT, size INTEGER)"
    )
    total = 0
    bar = tqdm(files, desc="prepare: staging", unit="file", disable=not progress, file=sys.stderr)
    for path in bar:
        try:
            pf = pq.ParquetFile(path)
        except (pa.ArrowInvalid, OSError) as e:
            raise InputError(f"{path}: not a readable Parquet file ({e})") from None
        names = pf.schema_arrow.names
        if cfg.rtt_column not in names:
            raise InputError(f"{path}: no column {cfg.rtt_column!r} (columns: {names})")
        for batch in pf.iter_batches(batch_size=1 << 20):
            tbl = pa.Table.from_batches([batch])
            if cfg.rtt_column != "rtt":  # e.g. rtt_avg: it becomes the rtt column
                tbl = tbl.drop_columns([c for c in tbl.column_names if c == "rtt"])
                tbl = tbl.rename_columns(
                    ["rtt" if c == cfg.rtt_column else c for c in tbl.column_names]
                )
            if cfg.limit is not None:
                tbl = tbl.slice(0, cfg.limit - total)
            tbl = schema.normalize(tbl, str(path))
            cols = [tbl["event_time"].cast(pa.int64())] + tbl.columns[1:]
            staged = pa.Table.from_arrays(cols, names=list(_STAGED))
            con.register("staged", staged)
            con.execute("INSERT INTO raw SELECT * FROM staged")
            con.unregister("staged")
            total += tbl.num_rows
            if cfg.limit is not None and total >= cfg.limit:
                return total
    return total


def _addresses(con) -> tuple[np.ndarray, np.ndarray, dict]:
    """Parse every distinct (address, version) once. Valid ones map to their canonical text
    (so "2001:DB8:0::1" and "2001:db8::1" are one source for the splits, as for the model) and
    an id per canonical address, in DuckDB table `addr` (a, v, canon, id)."""
    t = con.sql(
        "SELECT a, v FROM (SELECT src AS a, v FROM raw UNION SELECT dst AS a, v FROM raw) "
        "ORDER BY a, v"
    ).to_arrow_table()
    names, vers = t["a"].to_pylist(), t["v"].to_numpy()
    canon: dict[str, tuple[bytes, int]] = {}
    raw_canon: list[str | None] = []
    for a, v in zip(names, vers, strict=True):
        try:
            packed, ver = tokens.parse_address(a)
        except InputError:
            ver = None
        if ver != v:
            raw_canon.append(None)
            continue
        c = tokens.format_address(packed, ver)
        canon[c] = (packed, ver)
        raw_canon.append(c)
    order = sorted(canon)
    ids = {c: i for i, c in enumerate(order)}
    ok = [i for i, c in enumerate(raw_canon) if c is not None]
    table = pa.table(
        {
            "a": pa.array([names[i] for i in ok], pa.string()),
            "v": pa.array(vers[ok], pa.int8()),
            "canon": pa.array([raw_canon[i] for i in ok], pa.string()),
            "id": pa.array([ids[raw_canon[i]] for i in ok], pa.int32()),
        }
    )
    con.register("addr_in", table)
    con.execute("CREATE TABLE addr AS SELECT * FROM addr_in")
    con.unregister("addr_in")
    bad = [names[i] for i, c in enumerate(raw_canon) if c is None]
    packed = np.frombuffer(b"".join(canon[c][0] for c in order), np.uint8).reshape(-1, 16)
    version = np.array([canon[c][1] for c in order], np.uint8)
    return packed, version, {"bad_addresses": len(bad), "examples": bad[:5]}


# ----------------------------------------------------------------------------------------------
# writers


def _write_split_parquet(con, split_id: int, path: Path) -> dict:
    """Sorted canonical Parquet of one split + its content fingerprint."""
    q = """SELECT t, src, dst, v, rtt, prb_id, msm_id, size FROM m WHERE split = $s
           ORDER BY t, src, dst, rtt, prb_id NULLS FIRST, msm_id NULLS FIRST, size NULLS FIRST"""
    reader = con.sql(q, params={"s": split_id}).to_arrow_reader(1 << 18)
    digests = {c: hashlib.sha256() for c in schema.CANONICAL_SCHEMA.names}
    n = 0
    with pq.ParquetWriter(path, schema.CANONICAL_SCHEMA, compression="zstd") as w:
        for b in reader:
            cols = [b["t"].cast(pa.timestamp("s", tz="UTC"))] + [b[c] for c in _STAGED[1:]]
            tbl = pa.Table.from_arrays(cols, schema=schema.CANONICAL_SCHEMA)
            w.write_table(tbl)
            n += tbl.num_rows
            for name in schema.CANONICAL_SCHEMA.names:
                _digest_column(digests[name], tbl[name])
    top = hashlib.sha256(f"{FORMAT}/{FORMAT_VERSION} rows={n}".encode())
    for name in schema.CANONICAL_SCHEMA.names:
        top.update(name.encode() + digests[name].digest())
    return {"measurements": n, "fingerprint": "sha256:" + top.hexdigest()}


def _digest_column(h, col: pa.ChunkedArray) -> None:
    """Feed one column chunk into a running hash, independent of how the column is chunked."""
    for arr in col.chunks:
        valid = arr.is_valid().to_numpy(zero_copy_only=False)
        h.update(np.packbits(valid).tobytes() if not valid.all() else b"")
        if pa.types.is_string(arr.type):
            lens = np.asarray(pc.binary_length(arr).fill_null(0), np.int32)
            h.update(lens.tobytes())
            off = np.frombuffer(arr.buffers()[1], np.int32)[arr.offset : arr.offset + len(arr) + 1]
            h.update(memoryview(arr.buffers()[2])[off[0] : off[-1]])
        else:
            if pa.types.is_timestamp(arr.type):
                arr = arr.cast(pa.int64())
            h.update(arr.fill_null(0).to_numpy(zero_copy_only=False).tobytes())


def _write_rows(con, split_id: int, out_dir: Path, addr, version, cfg, bar) -> dict:
    """Group one split by probe, time-sorted, into records; returns the rows section of the card."""
    out_dir.mkdir(parents=True, exist_ok=True)
    writer = RowWriter(out_dir, addr, version, cfg.max_record_bytes, cfg.shard_bytes)
    q = """SELECT probe, prb_id, t, src_id, dst_id, rtt FROM m WHERE split = $s
           ORDER BY probe, t, src_id, dst_id, rtt"""
    reader = con.sql(q, params={"s": split_id}).to_arrow_reader(1 << 18)
    pending: list[pa.RecordBatch] = []  # pieces of the current probe

    def flush(pieces):
        tbl = pa.Table.from_batches(pieces).combine_chunks()
        writer.write_probe(tbl["probe"][0].as_py(), tbl["prb_id"][0].as_py(),
                           *(tbl[c].to_numpy() for c in ("t", "src_id", "dst_id", "rtt")))

    for b in reader:
        keys = b["probe"]
        if len(keys) == 0:
            continue
        change = np.flatnonzero(
            np.asarray(pc.not_equal(keys.slice(1), keys.slice(0, len(keys) - 1)))
        ) + 1
        starts = np.concatenate([[0], change, [len(keys)]])
        for i in range(len(starts) - 1):
            piece = b.slice(starts[i], starts[i + 1] - starts[i])
            if pending and pending[0]["probe"][0].as_py() != piece["probe"][0].as_py():
                flush(pending)
                pending = []
            pending.append(piece)
            # A giant probe is flushed in pieces of whole records to keep memory flat.
            if sum(len(p) for p in pending) >= 4 * writer.max_n:
                flush(pending)
                pending = []
        bar.update(len(b))
    if pending:
        flush(pending)
    writer.close()
    ix = writer.index
    return {
        "records": len(ix["n"]),
        "measurements": int(sum(ix["n"])),
        "bytes": int(sum(ix["bytes"])),
        "max_record_bytes": cfg.max_record_bytes,
        "largest_record_bytes": int(max(ix["bytes"], default=0)),
        "probes": len(set(ix["source"])),
        "shards": [f"rows/{out_dir.name}/{s}" for s in writer.shards],
        "index": f"rows/{out_dir.name}/index.parquet",
        "tokens_none": int(sum(ix["tokens_none"])),
        "tokens_full": int(sum(ix["tokens_full"])),
    }


# ----------------------------------------------------------------------------------------------
# the verb


def _iso(t: int | None) -> str | None:
    if t is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(t)))


def _split_stats(con) -> dict:
    rows = con.execute(
        """SELECT split, count(*), count(DISTINCT src), count(DISTINCT dst),
                  count(DISTINCT (src, dst)), count(DISTINCT probe), sum((v = 4)::INT),
                  sum((v = 6)::INT), sum((rtt < 0)::INT), min(t), max(t)
           FROM m GROUP BY split"""
    ).fetchall()
    keys = ("measurements", "sources", "destinations", "pairs", "probes")
    return {SPLITS[r[0]]: {**{k: int(v) for k, v in zip(keys, r[1:6], strict=True)},
                           "ip_versions": {"4": int(r[6]), "6": int(r[7])}, "failed": int(r[8]),
                           "time_range": {"first": _iso(r[9]), "last": _iso(r[10])}}
            for r in rows}


def prepare(inputs, out_dir, config: PrepareConfig | None = None, *, overwrite: bool = False,
            progress: bool = True) -> dict:
    """Canonical Parquet files/directories -> a prepared dataset in `out_dir`; returns the card.

    The dataset is built in a sibling temporary directory and renamed into place at the end, so an
    interrupted run leaves no half-written dataset (run it again; it starts over). An existing
    dataset is replaced only with overwrite=True.
    """
    import duckdb
    from tqdm import tqdm

    from ping_llm import __version__

    cfg = config or PrepareConfig()
    t_start = time.perf_counter()
    files = _expand(inputs)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not (out / "card.json").is_file():
            raise InputError(f"{out} exists and is not a prepared dataset; choose another --out")
        if not overwrite:
            raise InputError(f"{out} already holds a prepared dataset (use --force to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    work = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if work.exists():
        shutil.rmtree(work)
    (work / "splits").mkdir(parents=True)
    spill = (Path(cfg.temp_dir) / f"ping-llm-prepare-{os.getpid()}" if cfg.temp_dir
             else work / "duckdb_tmp")
    try:
        spill.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        shutil.rmtree(work, ignore_errors=True)
        raise InputError(f"cannot use {cfg.temp_dir} as the spill directory: "
                         f"{e.strerror}") from None
    try:
        con = duckdb.connect(str(work / "stage.duckdb"))
        con.execute(f"SET memory_limit = '{cfg.memory_limit}'")
        con.execute(f"SET temp_directory = '{str(spill).replace(chr(39), chr(39) * 2)}'")
        con.execute("SET preserve_insertion_order = false")
        staged = _stage(con, files, cfg, progress)
        addr, version, bad = _addresses(con)
        params = assign(con, cfg)
        n_valid = con.execute("SELECT count(*) FROM m").fetchone()[0]
        overall = con.execute(
            """SELECT count(DISTINCT src), count(DISTINCT dst), count(DISTINCT (src, dst)),
                      count(DISTINCT probe), sum((v = 4)::INT), sum((v = 6)::INT),
                      sum((rtt < 0)::INT) FROM m"""
        ).fetchone()
        splits = _split_stats(con)
        if "train" not in splits:
            raise InputError(
                "every measurement went to a test split (too few sources or time steps for these "
                "fractions); lower --probe-fraction / --val-probe-fraction / --time-fraction "
                "or add data"
            )
        rows_section, token_section = {}, {}
        total_rows = sum(splits[s]["measurements"] for s in cfg.row_splits if s in splits)
        bar = tqdm(total=total_rows, desc="prepare: rows", unit="meas", disable=not progress,
                   file=sys.stderr)
        for sid, name in enumerate(SPLITS):
            if name not in splits:
                splits[name] = {"measurements": 0}
            splits[name]["rule"] = SPLIT_RULES[name]
            fp = _write_split_parquet(con, sid, work / "splits" / f"{name}.parquet")
            splits[name]["fingerprint"] = fp["fingerprint"]
            splits[name]["parquet"] = f"splits/{name}.parquet"
            if name in cfg.row_splits and splits[name]["measurements"]:
                r = _write_rows(con, sid, work / "rows" / name, addr, version, cfg, bar)
                rows_section[name] = r
                n = max(r["measurements"], 1)
                token_section[name] = {  # tokens of each row as one context (exact)
                    "total_full": r["tokens_full"], "total_none": r["tokens_none"],
                    "per_measurement_full": round(r["tokens_full"] / n, 3),
                    "per_measurement_none": round(r["tokens_none"] / n, 3),
                }
        bar.close()
        con.close()
        invariants = split_invariants({n: work / "splits" / f"{n}.parquet" for n in SPLITS},
                                      cfg.memory_limit, spill)
        if invariants["violations"]:  # a bug in the rules above, never the user's input
            raise RuntimeError(f"prepare produced leaking splits: {invariants['violations']}")
        o = [int(x or 0) for x in overall]
        card = {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "record_format": f"{RECORD_MAGIC.decode()}/{RECORD_VERSION}",
            "created_by": f"ping-llm {__version__}", "inputs": [str(f) for f in files],
            "seed": cfg.seed, "config": {**asdict(cfg), "row_splits": list(cfg.row_splits)},
            "counts": {
                "input_rows": staged, "measurements": int(n_valid),
                "dropped_bad_address": int(staged - n_valid - params["outside_time_window"]),
                "outside_time_window": params["outside_time_window"],
                "bad_address_values": bad["bad_addresses"],
                "bad_address_examples": bad["examples"], "sources": o[0], "destinations": o[1],
                "pairs": o[2], "probes": o[3], "failed": o[6],
            },
            "time_range": {"first": _iso(params["t_min"]), "last": _iso(params["t_max"]),
                           "first_epoch_s": params["t_min"], "last_epoch_s": params["t_max"]},
            "ip_versions": {"4": o[4], "6": o[5]},
            "split_params": {
                "seed": cfg.seed,
                "probe_key": "prb_id where present, else the source address",
                "probe_key_rows": params["probe_key"],
                "hash": "u(seed, *keys) = int(md5('|'.join([seed, *keys])).hexdigest()[:13], 16)"
                " / 2**52; keys: ('probe', unit) or ('pair', unit, dst_addr); unit = the "
                "smallest probe key ('prb:<prb_id>' or the canonical source address) of the "
                "probes linked by shared source addresses",
                "time_fraction": cfg.time_fraction, "probe_fraction": cfg.probe_fraction,
                "val_probe_fraction": cfg.val_probe_fraction,
                "pair_fraction": cfg.pair_fraction, "val_time_fraction": cfg.val_time_fraction,
                "val_pair_fraction": cfg.val_pair_fraction,
                "since": _iso(cfg.since), "until": _iso(cfg.until),
                "time_cut_epoch_s": params["time_cut"], "time_cut": _iso(params["time_cut"]),
                "val_time_cut_epoch_s": params["val_time_cut"],
                "val_time_cut": _iso(params["val_time_cut"]),
                **{k: int(params[k]) for k in (
                    "probes_sharing_an_address", "largest_unit_probes", "held_out_units",
                    "val_probe_units_drawn",
                    "held_out_pairs_drawn",
                    "val_pairs_drawn", "unseen_probes", "unseen_probe_measurements")},
            },
            "invariants": invariants,
            "splits": {name: splits[name] for name in SPLITS},
            "rows": rows_section, "tokens": token_section,
            "seconds": round(time.perf_counter() - t_start, 2),
        }
        (work / "stage.duckdb").unlink()
        shutil.rmtree(spill, ignore_errors=True)
        (work / "card.json").write_text(json.dumps(card, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(work, out)
        return card
    finally:
        shutil.rmtree(spill, ignore_errors=True)
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)


def load_card(data_dir) -> dict:
    """card.json of a prepared dataset (InputError if it is not one)."""
    path = Path(data_dir) / "card.json"
    if not path.is_file():
        raise InputError(f"{data_dir} is not a prepared dataset (no card.json); run prepare")
    card = json.loads(path.read_text())
    if card.get("format") != FORMAT or card.get("format_version") != FORMAT_VERSION:
        raise InputError(
            f"{data_dir}: dataset format {card.get('format')}/{card.get('format_version')} is not "
            f"{FORMAT}/{FORMAT_VERSION}; prepare it again"
        )
    return card
