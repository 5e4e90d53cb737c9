"""The cost curve: synth -> ingest -> prepare -> loader -> a 20-step train, at growing sizes.

    python benchmarks/bench_scale.py [--sizes 1M 4M 16M] [--work DIR] [--keep]
    python benchmarks/bench_scale.py --sizes 1M 4M 16M 64M     # the largest on request

Each size is a synthetic world of about that many packets (the default world, 120 probes and two
days, is 1.1M; a size scales the probes, so a larger world has more sources, destinations and
pairs, like a day of a larger platform's dumps). Every stage runs as the command a user runs
(`ping-llm synth`, `ingest`, `prepare`, `benchmarks/bench_loader.py` for the loader, `ping-llm
train --steps 20`), in its own process, and is measured by its wall time and its peak resident
memory (the kernel's, from wait4). The growth exponent of each stage is the least-squares slope
of log(wall time) against log(packets), and likewise for memory: 1.0 is linear, 0.0 flat. The
comparison is the largest size against the smallest (time per packet for the stages whose work
grows with the data; tokens/s for the loader and the train steps, whose work is fixed); it
prints a table and one JSON line.

Goals: every stage linear in time (exponent <= 1.1); ingest and synth memory flat; prepare's
memory bounded by its DuckDB setting (`--memory-limit`, default 2GB, spilling to `--temp-dir`);
loader throughput and the train step independent of the dataset's size. Disk: ~55 bytes per packet
across the stages (3.5 GB at 64M), under --work (default: a temporary directory).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKETS_PER_PROBE = 9_174  # of the default world: 1,100,911 packets from 120 probes in 2 days


def parse_size(s: str) -> int:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([kKmM]?)", s)
    if not m:
        raise SystemExit(f"bench_scale: not a size: {s!r} (e.g. 4M, 500k)")
    return int(float(m[1]) * {"": 1, "k": 1e3, "K": 1e3, "m": 1e6, "M": 1e6}[m[2]])


def run(cmd: list[str], log: Path) -> dict:
    """Run one stage; its wall time, peak RSS (GB) and stdout. Exits on failure, naming the log."""
    t0 = time.perf_counter()
    with open(log, "w") as err:
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
        out = p.stdout.read()
        _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"bench_scale: {' '.join(cmd[:3])} failed; see {log}")
    return {"wall_s": round(wall, 2), "rss_gb": round(usage.ru_maxrss / 2**20, 3), "out": out}


def one_size(target: int, work: Path, memory_limit: str) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    cli = [sys.executable, "-m", "ping_llm.cli"]
    raw, canon, data = work / "raw.jsonl.gz", work / "canonical", work / "dataset"
    probes = max(2, min(20_000, round(target / PACKETS_PER_PROBE)))
    r = {}
    s = run(cli + ["synth", "--out", str(raw), "--probes", str(probes), "--json",
                   "--no-progress"], work / "synth.log")
    summary = json.loads(s.pop("out"))
    r["synth"] = s
    r["ingest"] = run(cli + ["ingest", str(raw), "--out", str(canon), "--no-progress"],
                      work / "ingest.log")
    r["prepare"] = run(cli + ["prepare", str(canon), "--out", str(data), "--no-progress",
                              "--memory-limit", memory_limit], work / "prepare.log")
    lo = run([sys.executable, str(ROOT / "benchmarks" / "bench_loader.py"), "--data", str(data),
              "--workers", "2", "--batches", "60", "--plain-seqs", "4"], work / "loader.log")
    pipe = json.loads(lo.pop("out").strip().splitlines()[-1])["pipeline"]
    cold = next(p for p in pipe if not p["cache"])
    r["loader"] = {**lo, "tokens_per_s": round(cold["tokens_per_s"]),
                   "startup_s": cold["startup_s"]}
    tr = run(cli + ["train", "--data", str(data), "--out", str(work / "run"), "--steps", "20",
                    "--eval-every", "0", "--save-every", "0", "--log-every", "5"],
             work / "train.log")
    tr.pop("out")
    steps = [json.loads(x) for x in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    tok = [m["tokens_per_s"] for m in steps if "tokens_per_s" in m]
    r["train"] = {**tr, "tokens_per_s": round(tok[-1]) if tok else None}
    for stage in r.values():
        stage.pop("out", None)
    return {"target": target, "probes": probes, "packets": summary["packets"],
            "results": summary["results"], "stages": r,
            "disk_gb": round(sum(f.stat().st_size for f in work.rglob("*") if f.is_file())
                             / 2**30, 2)}


def slope(xs, ys) -> float | None:
    """Least-squares slope of log y on log x (None with fewer than two sizes)."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys, strict=True) if y and y > 0]
    if len(pts) < 2:
        return None
    mx, my = (sum(p[i] for p in pts) / len(pts) for i in (0, 1))
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    return round(sum((x - mx) * (y - my) for x, y in pts) / sxx, 3) if sxx else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["1M", "4M", "16M"],
                    help="packets per world (default 1M 4M 16M; add 64M on request)")
    ap.add_argument("--work", type=Path, help="where the stages write (default: a temporary "
                    "directory, removed at the end)")
    ap.add_argument("--keep", action="store_true", help="keep each size's files")
    ap.add_argument("--memory-limit", default="2GB", help="prepare's DuckDB memory limit")
    args = ap.parse_args()
    targets = sorted(parse_size(s) for s in args.sizes)
    base = args.work or Path(tempfile.mkdtemp(prefix="bench_scale-"))
    rows = []
    for n in targets:
        work = base / f"{n // 1000}k"
        rows.append(one_size(n, work, args.memory_limit))
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        print(f"  {n / 1e6:g}M done: {rows[-1]['packets']:,} packets, "
              f"{rows[-1]['disk_gb']} GB on disk", file=sys.stderr)
    if not args.work and not args.keep:
        shutil.rmtree(base, ignore_errors=True)
    packets = [r["packets"] for r in rows]
    stages = list(rows[0]["stages"])
    fits = {}
    print(f"{'stage':<8}" + "".join(f"{p / 1e6:>14.1f}M" for p in packets)
          + f"{'time exp':>10}{'mem exp':>9}")
    for st in stages:
        wall = [r["stages"][st]["wall_s"] for r in rows]
        rss = [r["stages"][st]["rss_gb"] for r in rows]
        fits[st] = {"time_exponent": slope(packets, wall), "rss_exponent": slope(packets, rss),
                    "wall_s": wall, "rss_gb": rss}
        cells = "".join(f"{w:>8.1f}s {m:>4.2f}G" for w, m in zip(wall, rss, strict=True))
        print(f"{st:<8}{cells}{fits[st]['time_exponent'] or 0:>10.2f}"
              f"{fits[st]['rss_exponent'] or 0:>9.2f}")
    for st in ("loader", "train"):
        tps = [r["stages"][st]["tokens_per_s"] for r in rows]
        fits[st]["tokens_per_s"] = tps
        print(f"{st} tokens/s: " + ", ".join(f"{t:,}" for t in tps if t))
    big, small = rows[-1], rows[0]
    per = {st: round((big["stages"][st]["wall_s"] / big["packets"])
                     / (small["stages"][st]["wall_s"] / small["packets"]), 2)
           for st in ("synth", "ingest", "prepare")}  # the stages whose work is the data's size
    per.update({st: round(big["stages"][st]["tokens_per_s"] / small["stages"][st]["tokens_per_s"],
                          2) for st in ("loader", "train")})  # fixed work: tokens/s should hold
    print("largest / smallest size: time per packet "
          + ", ".join(f"{st} {per[st]:.2f}x" for st in ("synth", "ingest", "prepare"))
          + "; tokens/s " + ", ".join(f"{st} {per[st]:.2f}x" for st in ("loader", "train")))
    print(json.dumps({"bench": "scale", "sizes": [{k: r[k] for k in ("target", "probes",
                      "packets", "results", "disk_gb")} for r in rows], "stages": fits,
                      "largest_over_smallest": per}))


if __name__ == "__main__":
    main()
