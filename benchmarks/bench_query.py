"""Exact RTT distributions (query engine) vs naive sampling-based estimates, same model, same run.

    python benchmarks/bench_query.py [--run RUN_DIR] [--threads N] [--context K]

Model: a run directory, or by default the `tiny` preset (4 x 128, 0.86M params) with random
weights. nanochat's init predicts nearly uniformly, which is the *worst case* for the exact
engine: every one of the 132 byte1 bins carries > 1e-4 of the mass, so all of them are refined to
byte2 (a trained model keeps a handful). Queries: random IPv4 pairs, each after K context
measurements of its own (default 0).

Measured:
- exact, one query at a time (`Engine.rtt`): latency p50 / p99;
- exact, batched (`Engine.rtt_many` over --batch queries): queries/s;
- naive: per query, --samples draws of the 3 tokens after the prefix with `GPT.generate`
  (KV-cached, batched over the draws), quantiles of the draws that are RTTs: latency p50 / p99;
- fair Monte Carlo: the engine's own machinery (prefix run once, cache expanded, the same
  constraints on role and byte1) drawing --samples (role, byte1, byte2) instead of enumerating.
Sampling error is reported as |F_exact(estimated quantile) - q|, averaged over q in {.05,.5,.95}.
Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from ping_llm import tokens as tk
from ping_llm.model import GPT, GPTConfig, KVCache
from ping_llm.query.engine import Engine
from ping_llm.query.targets import Query
from ping_llm.runtime import resolve_device

QS = (0.05, 0.5, 0.95)


def make_queries(n: int, k: int, seed: int) -> list[Query]:
    rng = np.random.default_rng(seed)

    def ip() -> str:
        return ".".join(str(b) for b in [rng.integers(1, 224), *rng.integers(0, 256, 3)])

    out = []
    for _ in range(n):
        src = ip()
        t = 1_700_000_000 + np.cumsum(rng.integers(1, 300, k + 1))
        ctx = [
            tk.Measurement(src, ip(), float(rng.lognormal(3.5, 0.8)), int(t[i])) for i in range(k)
        ]
        out.append(Query(src, ip(), int(t[k]), ctx))
    return out


def naive(engine: Engine, q: Query, n: int, gen: torch.Generator) -> dict:
    prefix = engine.query_tokens(q.src, q.dst, q.time, q.context)
    with torch.inference_mode():
        idx = torch.tensor([prefix] * n, device=engine.device)
        out = engine.model.generate(idx, 3, generator=gen).cpu().numpy()
    role, b1, b2 = out[:, 0], out[:, 1] - tk.BYTE0, out[:, 2] - tk.BYTE0
    ok_role = np.isin(role, [tk.RTT_START, tk.FAILED])
    ok = (role == tk.RTT_START) & np.isin(b1, tk.CANON_B1) & (b2 >= 0)
    values = tk.RTT_GRID_MS[(b1[ok] << 8) | b2[ok]] if ok.any() else np.array([np.nan])
    return {
        "p_failed": float((role[ok_role] == tk.FAILED).mean()) if ok_role.any() else float("nan"),
        "quantiles": np.quantile(values, QS, method="inverted_cdf"),
        "accepted": int(ok.sum()),
    }


def sampled(engine: Engine, q: Query, n: int, gen: torch.Generator) -> dict:
    """Fair Monte Carlo: prefix once, cache expanded, the engine's constraints; n draws."""
    prefix = engine.query_tokens(q.src, q.dst, q.time, q.context)
    m = engine.model
    with torch.inference_mode():
        cache = KVCache(m.config, 1, len(prefix) + 2)
        dev = engine.device
        logits = m(torch.tensor([prefix], device=dev), kv_cache=cache)[0][0, -1]
        role = torch.softmax(logits[[tk.RTT_START, tk.FAILED]], -1)
        failed = torch.multinomial(role, n, replacement=True, generator=gen) == 1
        lg = m(torch.tensor([[tk.RTT_START]], device=dev), kv_cache=cache)[0][0, -1]
        p1 = torch.softmax(lg[tk.BYTE0 + torch.as_tensor(tk.CANON_B1, device=dev)], -1)
        b1 = tk.CANON_B1[torch.multinomial(p1, n, replacement=True, generator=gen).cpu().numpy()]
        uniq, inv = np.unique(b1, return_inverse=True)
        rows = cache.expand(len(uniq))
        lg2 = m(torch.as_tensor(tk.BYTE0 + uniq, device=dev)[:, None], kv_cache=rows)[0][:, -1,
                                                                                      tk.BYTE0:]
        p2 = torch.softmax(lg2, -1)[torch.as_tensor(inv, device=dev)]  # (n, 256)
        b2 = torch.multinomial(p2, 1, generator=gen)[:, 0].cpu().numpy()
    values = tk.RTT_GRID_MS[(b1 << 8) | b2]
    return {
        "p_failed": float(failed.float().mean().cpu()),
        "quantiles": np.quantile(values, QS, method="inverted_cdf"),
    }


def level_error(d, quantiles) -> list[float]:
    """|F_exact(estimated quantile) - q| for each level (nan estimates count as 1)."""
    cdf = np.cumsum(d.probs)
    out = []
    for q_level, x in zip(QS, quantiles, strict=True):
        if np.isnan(x):
            out.append(1.0)
            continue
        i = np.searchsorted(d.values_ms, x, side="right") - 1
        out.append(abs((cdf[i] if i >= 0 else 0.0) - q_level))
    return out


def pct(xs, p) -> float:
    return float(np.percentile(np.asarray(xs) * 1000, p))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", help="run directory (default: random-weight tiny preset)")
    ap.add_argument(
        "--lm-head-std",
        type=float,
        help="re-draw the random model's lm_head with this std: confident random predictions, "
        "closer to a trained model (few byte1 bins refined)",
    )
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (cpu)")
    ap.add_argument("--preset", default="tiny", help="random-weight model preset (tiny)")
    ap.add_argument("--context", type=int, default=0, help="context measurements per query")
    ap.add_argument("--single", type=int, default=30, help="queries timed one at a time")
    ap.add_argument("--batch", type=int, default=256, help="queries in the batched call")
    ap.add_argument("--naive", type=int, default=20, help="queries estimated by sampling")
    ap.add_argument("--samples", type=int, default=1000, help="draws per sampled estimate")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.run:
        engine = Engine.load(args.run, device=args.device)
        name = args.run
    else:
        torch.manual_seed(0)
        model = GPT(GPTConfig.preset(args.preset))
        if args.lm_head_std:
            with torch.no_grad():
                model.lm_head.weight.normal_(0.0, args.lm_head_std)
        engine = Engine(model.to(resolve_device(args.device)))
        name = f"{args.preset}, random weights (lm_head std {args.lm_head_std or 0.001})"
    gen = torch.Generator(device=engine.device).manual_seed(0)
    queries = make_queries(max(args.single, args.batch, args.naive), args.context, seed=1)

    engine.rtt_many(queries[:2])  # warm-up (allocator, kernels)
    single = []
    for q in queries[: args.single]:
        t0 = time.perf_counter()
        engine.rtt_many([q])
        single.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    exact = engine.rtt_many(queries[: args.batch])
    batch_s = time.perf_counter() - t0
    naive_t, naive_err, mc_t, mc_err = [], [], [], []
    for q, d in zip(queries[: args.naive], exact, strict=False):
        t0 = time.perf_counter()
        est = naive(engine, q, args.samples, gen)
        naive_t.append(time.perf_counter() - t0)
        naive_err += level_error(d, est["quantiles"])
        t0 = time.perf_counter()
        est = sampled(engine, q, args.samples, gen)
        mc_t.append(time.perf_counter() - t0)
        mc_err += level_error(d, est["quantiles"])
    refined = [np.sum(np.bincount(d.codes.astype(int) >> 8, minlength=256) > 1) for d in exact]

    res = {
        "bench": "query",
        "model": name,
        "params": engine.model.num_params(),
        "threads": torch.get_num_threads(),
        "device": str(engine.device),
        "context": args.context,
        "byte1_bins_refined": float(np.mean(refined)),
        "exact_single_p50_ms": pct(single, 50),
        "exact_single_p99_ms": pct(single, 99),
        "exact_batched_qps": args.batch / batch_s,
        "samples": args.samples,
        "naive_p50_ms": pct(naive_t, 50),
        "naive_p99_ms": pct(naive_t, 99),
        "naive_qps": len(naive_t) / sum(naive_t),
        "naive_quantile_level_error": float(np.mean(naive_err)),
        "mc_p50_ms": pct(mc_t, 50),
        "mc_p99_ms": pct(mc_t, 99),
        "mc_quantile_level_error": float(np.mean(mc_err)),
    }
    res["ratio_single_p50_naive_over_exact"] = res["naive_p50_ms"] / res["exact_single_p50_ms"]
    res["ratio_qps_exact_batched_over_naive"] = res["exact_batched_qps"] / res["naive_qps"]
    res["ratio_single_p50_mc_over_exact"] = res["mc_p50_ms"] / res["exact_single_p50_ms"]
    print(
        f"model {name}: {res['params']:,} params, {res['threads']} threads, "
        f"{args.context} context measurements per query, "
        f"{res['byte1_bins_refined']:.1f} of 132 byte1 bins refined per query"
    )
    print(
        f"exact, one at a time     p50 {res['exact_single_p50_ms']:8.1f} ms  "
        f"p99 {res['exact_single_p99_ms']:8.1f} ms"
    )
    print(f"exact, {args.batch} per call    {res['exact_batched_qps']:8.1f} queries/s")
    print(
        f"naive generate x{args.samples}    p50 {res['naive_p50_ms']:8.1f} ms  "
        f"p99 {res['naive_p99_ms']:8.1f} ms  {res['naive_qps']:.2f} queries/s  "
        f"quantile-level error {res['naive_quantile_level_error']:.4f}"
    )
    print(
        f"fair MC x{args.samples}           p50 {res['mc_p50_ms']:8.1f} ms  "
        f"p99 {res['mc_p99_ms']:8.1f} ms  quantile-level error "
        f"{res['mc_quantile_level_error']:.4f}   (exact: 0)"
    )
    print(
        f"ratio: single-query p50 naive/exact "
        f"{res['ratio_single_p50_naive_over_exact']:.1f}x, fair-MC/exact "
        f"{res['ratio_single_p50_mc_over_exact']:.2f}x; throughput exact-batched/naive "
        f"{res['ratio_qps_exact_batched_over_naive']:.1f}x"
    )
    print(json.dumps(res))


if __name__ == "__main__":
    main()
