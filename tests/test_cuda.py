"""The CUDA path: bf16 autocast, torch.compile, the query engine and KV cache on a GPU.

Marked `cuda`: they need a GPU, so on a CPU-only machine they are skipped (and say so). They are
what `scripts/gpu_check.sh` runs first (`pytest -m cuda`). What a CPU can check of the same
plumbing (bf16 refused off CUDA, device names resolved, MFU peaks) is in test_runtime/test_train.
"""

from __future__ import annotations

import math

import pytest
import torch

from ping_llm import checkpoint as ck
from ping_llm.config import TrainConfig
from ping_llm.data.markov import SyntheticLoader
from ping_llm.model import GPT, GPTConfig, KVCache
from ping_llm.query.engine import Engine
from ping_llm.runtime import peak_flops_for, resolve_device
from ping_llm.train import train

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
MODEL = dict(n_layer=2, n_embd=64, n_head=2, sequence_len=128)


@pytest.fixture
def fp32_matmuls():
    """Exact fp32 matmuls for comparisons with the CPU (training turns TF32 on)."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def test_the_device_is_resolved_and_its_peak_known():
    d = resolve_device("cuda")
    assert d == torch.device("cuda:0") and resolve_device("auto") == d
    name = torch.cuda.get_device_name(d)
    assert peak_flops_for(d) is not None, f"add {name!r} to runtime.PEAK_BF16_FLOPS"


def test_bf16_compiled_training_learns_and_its_checkpoint_loads_on_the_cpu(tmp_path):
    cfg = TrainConfig(out_dir=str(tmp_path), model=MODEL, steps=30, device_batch_size=8,
                      eval_every=0, log_every=1, save_every=0, device="cuda", compile=True)
    s = train(cfg, loader=SyntheticLoader(8, 128))
    assert s["bf16"] and s["compile"] and s["device"] == "cuda:0" and s["mfu"] is not None
    losses = [r["loss"] for r in ck.read_metrics(tmp_path) if r["kind"] == "train"]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0] - 0.5
    cpu, _ = ck.load_model(tmp_path, "cpu")
    gpu, _ = ck.load_model(tmp_path, "cuda")
    x, _ = SyntheticLoader(2, 128, split="val").batch(0)
    with torch.no_grad():
        a, b = cpu(x)[0], gpu(x.cuda())[0].cpu()
    torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)  # fp32 weights, TF32 may be on


def test_the_query_engine_answers_on_the_gpu_as_on_the_cpu(fp32_matmuls):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**MODEL)).eval()
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 0.3)
    cpu = Engine(model)
    gpu = Engine(GPT(GPTConfig(**MODEL)).cuda().eval())
    gpu.model.load_state_dict(model.state_dict())
    ctx = [{"src": "10.0.0.1", "dst": "192.0.2.9", "rtt_ms": 12.0, "time": 1_700_000_000}]
    for src, dst in [("10.0.0.1", "192.0.2.7"), ("10.0.0.1", "192.0.2.0/30")]:
        a, b = cpu.rtt(src, dst, context=ctx), gpu.rtt(src, dst, context=ctx)
        assert abs(a.p_failed - b.p_failed) < 1e-5
        assert abs(a.median - b.median) <= 1e-6 + 0.01 * a.median


def test_the_kv_cache_on_the_gpu_computes_what_a_full_forward_does(fp32_matmuls):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**MODEL)).cuda().eval()
    x = torch.randint(0, 267, (3, 40), device="cuda")
    with torch.no_grad():
        full = model(x)[0]
        cache = KVCache(model.config, 3, 40)
        parts = [model(x[:, :25], kv_cache=cache)[0], model(x[:, 25:], kv_cache=cache)[0]]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-4, atol=1e-4)
