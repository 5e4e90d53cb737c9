"""Training loader (grain + vectorised context sampler) vs a plain per-measurement Python sampler.

    python benchmarks/bench_loader.py [--data DATASET_DIR] [--workers 0 2] [--batches 100]

Without --data the synthetic default is built first (synth -> ingest -> prepare, in a temporary
directory; --menog uses ../shared/data/ripe_atlas_menog_2019 instead). The pipeline is timed after
its first batch (worker start-up is reported separately) as tokens delivered per second: all B x T
positions, and the useful ones (target != -1); once with the per-process record cache (what a
dataset that fits in 256 MB per worker gets) and once "cold" (every record read and decompressed
from the ArrayRecord shards, what a large dataset gets). The baseline samples the same kind of
contexts one measurement at a time: walk a random window in time order, keep measurements at
random, build a `tokens.Measurement` and call `tokens.encode_reference` for each, stop when the
next one does not fit. Prints a table, the ratio, one JSON line. Target: >= 1M tokens/s with 2
workers.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

from ping_llm import tokens as T
from ping_llm.data import contexts, loader, prepare

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def build_dataset(work: Path, menog: bool) -> Path:
    from ping_llm.data import ingest, synth, synth_atlas

    if menog:
        raw = SHARED / "ripe_atlas_menog_2019" / "raw.jsonl.gz"
    else:
        raw = work / "synth.jsonl.gz"
        synth_atlas.generate(synth.SynthConfig(), raw, progress=False)
    ingest.ingest([raw], work / "canonical", progress=False)
    prepare.prepare([work / "canonical"], work / "dataset", progress=False)
    return work / "dataset"


def time_pipeline(data: Path, workers: int, batches: int, batch_size: int, seq_len: int,
                  cache: bool = True) -> dict:
    t0 = time.perf_counter()
    ld = loader.build_loader(data, "train", batch_size, seq_len, 0, 0, 1, worker_count=workers,
                             cache_bytes=(256 << 20) if cache else 0)
    next(ld)
    startup = time.perf_counter() - t0
    useful = 0
    t0 = time.perf_counter()
    for _ in range(batches):
        _, y = next(ld)
        useful += int((y >= 0).sum())
    dt = time.perf_counter() - t0
    ld.close()
    total = batches * batch_size * seq_len
    return {"workers": workers, "cache": cache, "startup_s": round(startup, 2),
            "tokens_per_s": total / dt,
            "useful_tokens_per_s": useful / dt, "padding_fraction": 1 - useful / total}


def plain_sampler(store: loader.RowStore, n_seqs: int, seq_len: int, seed: int = 0):
    """One context per sequence, built measurement by measurement with encode_reference."""
    import torch

    rng = random.Random(seed)
    budget = seq_len + 1
    out = []
    for _ in range(n_seqs):
        row = store.row(rng.randrange(len(store)))
        names = [T.format_address(a, v) for a, v in zip(row.addr, row.version, strict=True)]
        times, rtts = row.time.tolist(), row.rtt_ms().tolist()
        srcs, dsts = row.src.tolist(), row.dst.tolist()
        mode = rng.choices(contexts.MODES, weights=(0.4, 0.3, 0.3))[0]
        frac = {"full": 1.0, "none": 0.0}.get(mode, rng.uniform(0.1, 0.9))
        keep = min(1.0, 2 * budget / 16 / max(row.n, 1))  # about twice the measurements needed
        i = rng.randrange(max(1, row.n - int(budget / 16 / keep)))
        seq: list[int] = []
        prev = None
        while i < row.n:
            if rng.random() < keep:
                timed = rng.random() < frac
                t = times[i] if timed else None
                m = T.Measurement(names[srcs[i]], names[dsts[i]], rtts[i], t)
                order = rng.sample(range(4), 4)
                if timed and prev is not None:  # the delta needs the previous timestamp
                    toks = T.encode_reference([prev, m], [order, order])
                    toks = toks[len(T.encode_reference([prev], [order])):]
                else:
                    toks = T.encode_reference([m], [order])
                if len(seq) + len(toks) > budget:
                    break
                seq += toks
                prev = m if timed else prev
            i += 1
        out.append(seq + [-1] * (budget - len(seq)))
    t = torch.tensor(out, dtype=torch.int64)
    return t[:, :-1].clamp(min=0), t[:, 1:]


def time_plain(data: Path, n_seqs: int, seq_len: int) -> dict:
    store = loader.RowStore(data, "train")
    t0 = time.perf_counter()
    _, y = plain_sampler(store, n_seqs, seq_len)
    dt = time.perf_counter() - t0
    useful = int((y >= 0).sum())
    return {"tokens_per_s": y.numel() / dt, "useful_tokens_per_s": useful / dt,
            "padding_fraction": 1 - useful / y.numel()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, help="a prepared dataset (default: build one)")
    ap.add_argument("--menog", action="store_true", help="build from the menog 2019 sample")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--batches", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--plain-seqs", type=int, default=64)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        data = args.data or build_dataset(Path(tmp), args.menog)
        built = time.perf_counter() - t0
        card = prepare.load_card(data)
        runs = [time_pipeline(data, w, args.batches, args.batch_size, args.seq_len, cache)
                for cache in (True, False) for w in args.workers]
        plain = time_plain(data, args.plain_seqs, args.seq_len)
    best = max(runs, key=lambda r: (r["workers"], r["cache"]))
    ratio = best["useful_tokens_per_s"] / plain["useful_tokens_per_s"]  # padding not counted
    print(f"dataset {data if args.data else ('menog' if args.menog else 'synthetic default')}: "
          f"{card['splits']['train']['measurements']:,} train measurements"
          + (f" (built in {built:.0f} s)" if not args.data else ""))
    print(f"  {'sampler':<22} {'tokens/s':>12} {'useful/s':>12} {'padding':>8} {'start-up':>9}")
    for r in runs:
        name = f"pipeline, {r['workers']} workers" + ("" if r["cache"] else ", cold")
        print(f"  {name:<22} {r['tokens_per_s']:>12,.0f} "
              f"{r['useful_tokens_per_s']:>12,.0f} {100 * r['padding_fraction']:>7.2f}% "
              f"{r['startup_s']:>8.1f}s")
    print(f"  plain per-measurement  {plain['tokens_per_s']:>12,.0f} "
          f"{plain['useful_tokens_per_s']:>12,.0f} {100 * plain['padding_fraction']:>7.2f}%")
    print(f"  ratio pipeline ({best['workers']} workers) / plain, useful tokens: {ratio:.0f}x; "
          f"target >= 1M tokens/s: {'met' if best['tokens_per_s'] >= 1e6 else 'NOT met'}")
    print(json.dumps({"bench": "loader", "batch_size": args.batch_size, "seq_len": args.seq_len,
                      "pipeline": runs, "plain": plain, "ratio_pipeline_over_plain": ratio}))


if __name__ == "__main__":
    main()
