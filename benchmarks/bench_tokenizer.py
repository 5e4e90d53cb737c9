"""Vectorised vs reference tokenizer on the same 200k mixed measurements, one core.

    python benchmarks/bench_tokenizer.py [--n 200000]

Both encoders get the same measurements, field orders and timestamps and must produce identical
tokens (checked). The reference starts from `Measurement` objects (strings); the vectorised encoder
from the arrays the loader holds (16-byte addresses), so address parsing is timed on its own too.
Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from ping_llm import tokens as T


def make_batch(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    v6 = rng.random(n) < 0.4
    src = rng.integers(0, 256, (n, 16), dtype=np.uint8)
    dst = rng.integers(0, 256, (n, 16), dtype=np.uint8)
    src[~v6, 4:] = 0
    dst[~v6, 4:] = 0
    src[v6, :2] = (0x20, 0x01)  # global unicast, never IPv4-mapped
    dst[v6, :2] = (0x2A, 0x00)
    version = np.where(v6, 6, 4).astype(np.uint8)
    rtt = np.where(rng.random(n) < 0.1, -1.0, rng.lognormal(3.5, 1.0, n))
    when = 1_700_000_000 + np.cumsum(rng.exponential(60, n)).astype(np.int64)
    has_time = rng.random(n) < 0.7
    order = T.random_orders(rng, n)
    return src, dst, version, rtt, when, has_time, order


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200_000)
    args = ap.parse_args()
    n = args.n
    src, dst, version, rtt, when, has_time, order = make_batch(n)
    src_s = [T.format_address(a, v) for a, v in zip(src, version, strict=True)]
    dst_s = [T.format_address(a, v) for a, v in zip(dst, version, strict=True)]
    ms = [
        T.Measurement(s, d, float(r), int(t) if h else None)
        for s, d, r, t, h in zip(src_s, dst_s, rtt, when, has_time, strict=True)
    ]
    orders = order.tolist()

    ref_tokens = T.encode_reference(ms, orders)
    t_ref = best_of(lambda: T.encode_reference(ms, orders), 1)
    vec_tokens, _ = T.encode(src, dst, version, rtt, when, has_time, order)
    assert vec_tokens.tolist() == ref_tokens, "encoders disagree"
    t_vec = best_of(lambda: T.encode(src, dst, version, rtt, when, has_time, order), 5)
    t_parse = best_of(lambda: (T.parse_addresses(src_s), T.parse_addresses(dst_s)), 1)

    n_tok = len(ref_tokens)
    result = {
        "bench": "tokenizer",
        "measurements": n,
        "tokens": n_tok,
        "reference_meas_per_s": n / t_ref,
        "vectorised_meas_per_s": n / t_vec,
        "vectorised_tokens_per_s": n_tok / t_vec,
        "parse_addresses_meas_per_s": n / t_parse,
        "ratio_vectorised_over_reference": t_ref / t_vec,
    }
    print(f"{n} measurements, {n_tok} tokens ({n_tok / n:.1f} per measurement)")
    print(f"  reference   {n / t_ref:>14,.0f} meas/s {n_tok / t_ref:>14,.0f} tokens/s")
    print(f"  vectorised  {n / t_vec:>14,.0f} meas/s {n_tok / t_vec:>14,.0f} tokens/s")
    print(f"  (address parsing, once per dataset: {n / t_parse:,.0f} meas/s)")
    print(f"  ratio vectorised / reference: {t_ref / t_vec:.1f}x")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
