"""Ingest throughput: data.ingest + data.ripe (orjson + columnar) vs a naive stdlib-json baseline.

Both run on one core over the same decompressed bytes of ripe_atlas_menog_2019/raw.jsonl.gz
(181,810 results, ~544k packets), so decompression (timed separately) is not in either number.
The naive baseline applies the same rules (dup skip, -1 for timeouts/errors, auto source via
ipaddress) with `json.loads` per line and one dict per row, then `pa.Table.from_pylist`.
Times are CPU seconds of this process (time.process_time), robust to a busy shared machine.

    python benchmarks/bench_ingest.py [--data PATH] [--limit N]

Prints a human summary, the ratio, and one JSON line (prefix "BENCH ").
"""

from __future__ import annotations

import argparse
import gzip
import io
import ipaddress
import json
import os
import tempfile
import time
from pathlib import Path

import pyarrow as pa

from ping_llm.data import ingest, ripe
from ping_llm.data.schema import CANONICAL_SCHEMA

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DEFAULT = DATA / "ripe_atlas_menog_2019" / "raw.jsonl.gz"


def naive(lines: list[bytes]) -> pa.Table:
    rows = []
    for line in lines:
        if not line.strip():
            continue
        r = json.loads(line)
        if not r.get("dst_addr"):
            continue
        src = r.get("src_addr")
        if not src or not ipaddress.ip_address(src).is_global:
            src = r.get("from")
        if not src:
            continue
        src = str(ipaddress.ip_address(src))
        dst = str(ipaddress.ip_address(r["dst_addr"]))
        for e in r["result"]:
            if e.get("dup"):
                continue
            rtt = float(e["rtt"]) if "rtt" in e else -1.0
            rows.append({"event_time": r["timestamp"], "src_addr": src, "dst_addr": dst,
                         "ip_version": r["af"], "rtt": rtt, "prb_id": r.get("prb_id"),
                         "msm_id": r.get("msm_id"), "size": r.get("size")})
    t = pa.Table.from_pylist(rows)
    return t.set_column(0, "event_time", t.column(0).cast(pa.timestamp("s", tz="UTC"))).cast(
        CANONICAL_SCHEMA)


def ours(data: bytes) -> pa.Table:
    report: dict = {}
    tables = list(ingest.iter_tables(io.BytesIO(data), report=report))
    return pa.concat_tables(tables)


def cpu(fn, *args):
    t0 = time.process_time()
    out = fn(*args)
    return out, time.process_time() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(DEFAULT))
    ap.add_argument("--limit", type=int, default=0,
                    help="only the first N results in the in-memory comparison (0 = all); "
                    "the end-to-end run always reads the whole file")
    args = ap.parse_args()
    raw = Path(args.data).read_bytes()
    data, t_gunzip = cpu(gzip.decompress, raw)
    lines = data.split(b"\n")
    if args.limit:
        lines = lines[: args.limit]
        data = b"\n".join(lines)
    n = sum(1 for ln in lines if ln.strip())

    ripe._ADDR_CACHE.clear()
    t_ours, s_ours = cpu(ours, data)
    t_naive, s_naive = cpu(naive, lines)
    assert t_ours.num_rows == t_naive.num_rows, (t_ours.num_rows, t_naive.num_rows)
    assert t_ours.column("rtt").equals(t_naive.column("rtt"))

    with tempfile.TemporaryDirectory() as tmp:  # end to end: gunzip + parse + Parquet write
        ripe._ADDR_CACHE.clear()
        rep, s_e2e = cpu(ingest.ingest, [args.data], tmp, "auto", 1, None, False)
        size = sum(os.path.getsize(p) for p in rep.outputs)

    res = {
        "bench": "ingest",
        "file": Path(args.data).name,
        "results": n,
        "rows": t_ours.num_rows,
        "decompress_s": round(t_gunzip, 3),
        "ours_s": round(s_ours, 3),
        "naive_s": round(s_naive, 3),
        "ours_results_per_s": round(n / s_ours),
        "naive_results_per_s": round(n / s_naive),
        "speedup": round(s_naive / s_ours, 2),
        "end_to_end_s": round(s_e2e, 3),
        "end_to_end_results_per_s": round(rep.results / s_e2e),
        "parquet_bytes": size,
    }
    print(f"{n} results -> {t_ours.num_rows} rows; gunzip {t_gunzip:.2f} s (not counted)")
    print(f"ours : {s_ours:.2f} s  {n / s_ours:,.0f} results/s/core")
    print(f"naive: {s_naive:.2f} s  {n / s_naive:,.0f} results/s/core")
    print(f"ratio: {s_naive / s_ours:.1f}x   end-to-end ingest (gunzip+parse+write): "
          f"{rep.results / s_e2e:,.0f} results/s")
    print("BENCH " + json.dumps(res))


if __name__ == "__main__":
    main()
