"""Training throughput (tokens/s) and MFU of the tiny and small presets, through `train()` itself.

    python benchmarks/bench_train.py                       # CPU: tiny vs small, fp32
    python benchmarks/bench_train.py --device cuda         # GPU: bf16, compile off vs on
    python benchmarks/bench_train.py --presets tiny --steps 30 --batch-size tiny=32

Every measurement is a real `ping_llm.train.train` run (Muon + AdamW step, gradient clipping,
logging) with nothing written to disk, fed from a few pre-generated `SyntheticLoader` batches so
that data generation is not timed. tokens/s is the median over steps after the first (which pays
for warm-up and, with compile, compilation).

MFU: on GPU against the datasheet peak bf16 FLOP/s (`ping_llm.train.PEAK_BF16_FLOPS`). A CPU has no
datasheet number that torch can reach, so on CPU the "peak" is measured in this run: the best
fp32 FLOP/s of a 1024^3 matmul with the same thread count, i.e. CPU MFU is "fraction of what this
CPU's GEMM achieves". Comparisons printed: tiny/small tokens/s (CPU) and compile/no-compile
tokens/s per preset (GPU). Last line: one JSON object with everything.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import time

import torch

from ping_llm.config import TrainConfig
from ping_llm.data.markov import SyntheticLoader
from ping_llm.runtime import peak_flops_for
from ping_llm.train import train


class CachedLoader:
    """Cycles a few pre-generated batches (loader contract), so data generation is not timed."""

    def __init__(self, batch_size: int, seq_len: int, n: int = 4):
        src = SyntheticLoader(batch_size, seq_len)
        self.batches = [next(src) for _ in range(n)]
        self.i = 0

    def __iter__(self):
        return self

    def __next__(self):
        b = self.batches[self.i % len(self.batches)]
        self.i += 1
        return b

    def get_state(self) -> dict:
        return {"i": self.i}

    def set_state(self, state: dict) -> None:
        self.i = state["i"]


def cpu_matmul_flops(n: int = 1024, repeats: int = 5) -> float:
    """Best achieved fp32 FLOP/s of an n x n x n matmul on this CPU (current thread count)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    return best


def measure(preset: str, device: str, batch_size: int, steps: int, compile: bool,
            peak: float | None, seq_len: int | None) -> dict:
    overrides = {} if seq_len is None else {"sequence_len": seq_len}
    cfg = TrainConfig(preset=preset, model=overrides, steps=steps, device_batch_size=batch_size,
                      eval_every=0, log_every=10**9, save_every=0, device=device,
                      compile=compile, peak_flops=peak)
    T = cfg.gpt_config().sequence_len
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    with contextlib.redirect_stdout(sys.stderr):  # train()'s log; stdout is the report
        s = train(cfg, loader=CachedLoader(batch_size, T))
    peak_mem = torch.cuda.max_memory_allocated() if device.startswith("cuda") else None
    return {
        "preset": preset, "device": s["device"], "bf16": s["bf16"], "compile": compile,
        "batch_size": batch_size, "seq_len": T, "steps": steps, "num_params": s["num_params"],
        "flops_per_token": s["flops_per_token"], "tokens_per_s": s["tokens_per_s"],
        "mfu": s["mfu"], "peak_flops": peak,
        "step_s": s["tokens_per_step"] / s["tokens_per_s"],
        "peak_memory_gib": None if peak_mem is None else peak_mem / 2**30,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--presets", default="tiny,small")
    ap.add_argument("--steps", type=int, default=None,
                    help="steps per run (CPU: tiny 4, small 2; GPU 12)")
    ap.add_argument("--batch-size", action="append", default=[], metavar="PRESET=B",
                    help="per-preset device batch (CPU: tiny=8 small=1; GPU: tiny=32 small=16)")
    ap.add_argument("--seq-len", type=int, default=None, help="override sequence_len (1024)")
    ap.add_argument("--compile", choices=["off", "on", "both"], default=None,
                    help="CPU default off, GPU default both")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    args = ap.parse_args()

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = device.startswith("cuda")
    if args.threads:
        torch.set_num_threads(args.threads)
    # CPU: small takes ~20-50 s a step here, so 2 steps (the 2nd is the one measured)
    steps = {p: args.steps or (12 if gpu else 4 if p == "tiny" else 2) for p in ("tiny", "small",
                                                                                  "full")}
    batch = {"tiny": 32, "small": 16, "full": 4} if gpu else {"tiny": 8, "small": 1, "full": 1}
    for kv in args.batch_size:
        k, _, v = kv.partition("=")
        batch[k] = int(v)
    compile_modes = {"off": [False], "on": [True], "both": [False, True]}[
        args.compile or ("both" if gpu else "off")]
    if gpu:
        peak = peak_flops_for(torch.device(device))
        hw = torch.cuda.get_device_name(torch.device(device))
    else:
        peak = cpu_matmul_flops()
        hw = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"# bench_train on {hw}; torch {torch.__version__}; peak used for MFU: "
          f"{peak / 1e12 if peak else float('nan'):.3f} TFLOP/s "
          f"({'datasheet bf16' if gpu else 'measured fp32 1024^3 matmul'})")

    results = []
    for preset in args.presets.split(","):
        for comp in compile_modes:
            r = measure(preset, device, batch[preset], steps[preset], comp, peak, args.seq_len)
            results.append(r)
            mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
            print(f"{preset:5s} params {r['num_params'] / 1e6:7.2f}M  batch {r['batch_size']}x"
                  f"{r['seq_len']}  bf16 {r['bf16']!s:5s}  compile {comp!s:5s}  "
                  f"{r['tokens_per_s']:10,.0f} tok/s  {r['step_s']:7.3f} s/step  MFU {mfu}")

    ratios = {}
    by = {(r["preset"], r["compile"]): r for r in results}
    for preset in args.presets.split(","):
        if (preset, True) in by and (preset, False) in by:
            ratios[f"{preset}_compile_over_eager"] = (
                by[preset, True]["tokens_per_s"] / by[preset, False]["tokens_per_s"])
    comp = compile_modes[-1]
    if ("tiny", comp) in by and ("small", comp) in by:
        ratios["tiny_over_small_tokens_per_s"] = (
            by["tiny", comp]["tokens_per_s"] / by["small", comp]["tokens_per_s"])
    for k, v in ratios.items():
        print(f"ratio {k}: {v:.2f}x")
    print(json.dumps({"bench": "train", "hardware": hw, "torch": torch.__version__,
                      "peak_flops": peak, "results": results, "ratios": ratios,
                      "median_step_s": statistics.median(r["step_s"] for r in results)}))


if __name__ == "__main__":
    main()
