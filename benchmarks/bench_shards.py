"""Past one machine: one `prepare` of everything vs independent prepares of time shards, merged by
the loader (`train --data SHARD1 --data SHARD2 ...`).

    python benchmarks/bench_shards.py [--canonical DIR] [--shards 4] [--work DIR]

Without --canonical the synthetic default world is built first (synth -> ingest). The canonical
table is cut into `--shards` equal time spans, one Parquet file each (what N machines holding
their own days of dumps have; the cut is set-up, not timed). Then, each stage as the command a
user runs, in its own process: one `ping-llm prepare` of all of it, and one per shard (here one
after another; on N machines at once, so the largest is what one machine needs), then 20
training steps on the one dataset and on the mixture of the shards.

What it reports: wall time, peak RSS and output size of the one prepare and of the largest
shard's (the ratio is what sharding buys one machine); train tokens/s, one dataset vs the
mixture (the loader's merge must not cost throughput); and what sharding costs honesty, counted
on the shards' split files: probes held out as test_probe in one shard that train in another
(a shard sees only its own days, so a probe first seen late in a shard is "new" there), test
pairs of one shard trained on in another, and how the shards' held-out probes compare with the
one prepare's. Prints a table, the ratios, one JSON line.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import duckdb

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scale import run  # noqa: E402  (the same per-process wall time and peak RSS)


def cut(canonical: Path, shards: int, out: Path) -> list[Path]:
    """`shards` Parquet files of equal time spans of the canonical table."""
    con = duckdb.connect()
    src = f"read_parquet('{canonical}/**/*.parquet')"
    lo, hi = (int(x) for x in con.execute(
        f"SELECT epoch(min(event_time)), epoch(max(event_time)) + 1 FROM {src}").fetchone())
    edges = [lo + (hi - lo) * i // shards for i in range(shards + 1)]
    files = []
    for i in range(shards):
        d = out / f"canon_{i}"
        d.mkdir(parents=True)
        con.execute(f"COPY (SELECT * FROM {src} WHERE epoch(event_time) >= {edges[i]} AND "
                    f"epoch(event_time) < {edges[i + 1]}) TO '{d}/part.parquet' (FORMAT parquet)")
        files.append(d)
    return files


def size_gb(path: Path) -> float:
    return round(sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**30, 3)


def leaks(shards: list[Path], whole: Path) -> dict:
    """Cross-shard leaks, counted on the split files (probe = prb_id, else the source)."""
    con = duckdb.connect()

    def split(d, s):
        return f"read_parquet('{d}/splits/{s}.parquet')"

    key = "coalesce(prb_id::VARCHAR, src_addr)"
    probe_leak = pair_leak = held = 0
    for i, d in enumerate(shards):
        others = [o for j, o in enumerate(shards) if j != i]
        train = " UNION ALL ".join(f"SELECT {key} AS p, dst_addr AS dst FROM {split(o, 'train')}"
                                   for o in others)
        held += con.execute(f"SELECT count(DISTINCT {key}) FROM {split(d, 'test_probe')}"
                            ).fetchone()[0]
        probe_leak += con.execute(
            f"SELECT count(*) FROM (SELECT DISTINCT {key} AS p FROM {split(d, 'test_probe')}) a "
            f"SEMI JOIN ({train}) b ON a.p = b.p").fetchone()[0]
        pairs = f"SELECT DISTINCT {key} AS p, dst_addr AS dst FROM {split(d, 'test_pair')}"
        pair_leak += con.execute(f"SELECT count(*) FROM ({pairs}) a SEMI JOIN ({train}) b "
                                 "ON a.p = b.p AND a.dst = b.dst").fetchone()[0]
    union = set()
    for d in shards:
        union |= {r[0] for r in con.execute(
            f"SELECT DISTINCT {key} FROM {split(d, 'test_probe')}").fetchall()}
    one = {r[0] for r in con.execute(
        f"SELECT DISTINCT {key} FROM {split(whole, 'test_probe')}").fetchall()}
    return {"held_out_probes_summed_over_shards": held,
            "held_out_probes_training_in_another_shard": probe_leak,
            "test_pairs_training_in_another_shard": pair_leak,
            "held_out_probes_one_prepare": len(one), "held_out_probes_any_shard": len(union),
            "held_out_in_both": len(one & union)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--canonical", type=Path, help="canonical Parquet directory (default: the "
                    "synthetic default world, built first)")
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--work", type=Path, help="where to write (default: a temporary directory)")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_shards-"))
    work.mkdir(parents=True, exist_ok=True)
    cli = [sys.executable, "-m", "ping_llm.cli"]
    canonical = args.canonical
    if canonical is None:
        run(cli + ["synth", "--out", str(work / "raw.jsonl.gz"), "--no-progress"],
            work / "synth.log")
        run(cli + ["ingest", str(work / "raw.jsonl.gz"), "--out", str(work / "canonical"),
                   "--no-progress"], work / "ingest.log")
        canonical = work / "canonical"
    parts = cut(canonical, args.shards, work)
    one = run(cli + ["prepare", str(canonical), "--out", str(work / "whole"), "--no-progress"],
              work / "prepare_whole.log")
    one["out_gb"] = size_gb(work / "whole")
    per = []
    for i, p in enumerate(parts):
        r = run(cli + ["prepare", str(p), "--out", str(work / f"shard_{i}"), "--no-progress"],
                work / f"prepare_{i}.log")
        per.append({**r, "out_gb": size_gb(work / f"shard_{i}")})
    shards = [work / f"shard_{i}" for i in range(len(parts))]
    tps = {}
    for name, data in (("one", [work / "whole"]), ("mixture", shards)):
        out = work / f"run_{name}"
        run(cli + ["train", *sum((["--data", str(d)] for d in data), []), "--out", str(out),
                   "--steps", "20", "--eval-every", "0", "--save-every", "0", "--log-every", "5"],
            work / f"train_{name}.log")
        tok = [json.loads(x).get("tokens_per_s") for x in
               (out / "metrics.jsonl").read_text().splitlines()]
        tps[name] = round([t for t in tok if t][-1])
    leak = leaks(shards, work / "whole")
    big = max(per, key=lambda r: r["rss_gb"])
    print(f"{'prepare':<22}{'wall':>9}{'peak RSS':>10}{'output':>9}")
    print(f"{'one, everything':<22}{one['wall_s']:>8.1f}s{one['rss_gb']:>9.2f}G"
          f"{one['out_gb']:>8.2f}G")
    for i, r in enumerate(per):
        print(f"{f'shard {i}':<22}{r['wall_s']:>8.1f}s{r['rss_gb']:>9.2f}G{r['out_gb']:>8.2f}G")
    print(f"train tokens/s: one dataset {tps['one']:,}, mixture of {len(per)} shards "
          f"{tps['mixture']:,} ({tps['mixture'] / tps['one']:.2f}x)")
    print("ratios, largest shard / one prepare: wall "
          f"{max(r['wall_s'] for r in per) / one['wall_s']:.2f}x, peak RSS "
          f"{big['rss_gb'] / one['rss_gb']:.2f}x, output "
          f"{max(r['out_gb'] for r in per) / one['out_gb']:.2f}x")
    print("cross-shard leaks: " + ", ".join(f"{k} {v}" for k, v in leak.items()))
    for r in (one, *per):
        r.pop("out", None)
    print(json.dumps({"bench": "shards", "shards": len(per), "one": one, "per_shard": per,
                      "train_tokens_per_s": tps, "leaks": leak}))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
