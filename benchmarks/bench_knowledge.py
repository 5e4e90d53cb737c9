"""What prefix memory and address knowledge cost a training step: tokens/s of forward + backward
of the tiny model on real measurement contexts, plain vs + prefix memory vs + knowledge (features
computed per batch on the CPU from the packaged GeoLite2-City, as `train` does).

    python benchmarks/bench_knowledge.py                 # 8 x 1024 tokens, 10 timed steps
    python benchmarks/bench_knowledge.py --steps 20 --threads 2

Contexts: 8 sources, each pinging 40 public destinations of a synthetic world; timestamps on,
random field orders (what the loader writes). The ratios printed are tokens/s of each variant
over the plain model's; the feature lookups are memoised per address, so after the first batch
they cost a dictionary lookup per address. Last line: one JSON object with everything.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from ping_llm import knowledge
from ping_llm import tokens as tk
from ping_llm.data import synth
from ping_llm.model import GPT, GPTConfig


def contexts(batch: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    world = synth.World.build()
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(batch):
        src = world.addr4[int(rng.integers(len(world.addr4)))]
        dsts = rng.choice(world.addr4, size=40)
        toks, t = [], 1_700_000_000
        while len(toks) < seq_len + 1:
            t += int(rng.integers(1, 600))
            m = tk.Measurement(src, str(rng.choice(dsts)), float(rng.lognormal(3, 1)), t)
            toks += tk.encode_reference([m], orders=[rng.permutation(4)])
        rows.append(toks[: seq_len + 1])
    return torch.tensor(rows)


def measure(config: GPTConfig, batch: torch.Tensor, steps: int, know=None) -> float:
    torch.manual_seed(0)
    model = GPT(config)
    model.knowledge = know
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = batch[:, :-1], batch[:, 1:]
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        feats = model.address_features(x) if config.knowledge_dim else None
        _, loss = model(x, y, feats=feats)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return x.numel() / statistics.median(times[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    batch = contexts(args.batch_size, args.seq_len)
    base = GPTConfig.preset("tiny", sequence_len=args.seq_len)
    know = knowledge.AddressKnowledge.open()
    variants = {
        "plain": (base, None),
        "prefix_memory": (GPTConfig.preset("tiny", sequence_len=args.seq_len,
                                           prefix_buckets=4096), None),
        "knowledge": (GPTConfig.preset("tiny", sequence_len=args.seq_len,
                                       knowledge_dim=knowledge.DENSE_DIM,
                                       knowledge_vocab=knowledge.KNOWLEDGE_VOCAB), know),
    }
    out = {"batch": list(batch[:, :-1].shape), "threads": torch.get_num_threads()}
    for name, (config, k) in variants.items():
        out[f"{name}_tokens_per_s"] = round(measure(config, batch, args.steps, k))
        print(f"{name:14s} {out[f'{name}_tokens_per_s']:>9,} tokens/s")
    for name in ("prefix_memory", "knowledge"):
        out[f"{name}_vs_plain"] = round(out[f"{name}_tokens_per_s"] / out["plain_tokens_per_s"], 3)
        print(f"{name} / plain: {out[f'{name}_vs_plain']:.3f}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
