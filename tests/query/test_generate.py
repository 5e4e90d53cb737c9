"""Teacher-forced scoring (`generate.teacher_forced`: eval's token NLL and `Engine.score` share
it): the same numbers as the engine's exact RTT distribution, batched with right padding as one
by one, fields found from their role tokens."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ping_llm import tokens as tk
from ping_llm.query import generate as G
from ping_llm.query.engine import Engine

MODEL = dict(n_layer=2, n_embd=64, n_head=2, sequence_len=256)


def _random_model():
    """In float64: the tests below compare two different computation paths (a padded batch vs
    one sequence, a full forward vs the engine's KV cache), which in float32 differ by summation
    order rounding of logits up to the softcap (|logit| < 15: a few ulps, ~1e-6 each, per token).
    In float64 they agree to ~1e-15 before GPT.forward rounds its logits to float32, identically
    on both paths (bar a rounding-boundary tie, odds ~1e-8 per logit, worth 1-2 ulps)."""
    from ping_llm.model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(**MODEL))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)  # far from the (near-uniform) init, so the test has teeth
    return model.double().eval()


def test_engine_score_is_the_teacher_forced_score_and_the_exact_distribution():
    model = _random_model()
    engine = Engine(model, byte2_mass=1.0)  # every byte1 bin refined: exact code probabilities
    ctx = [tk.Measurement("192.0.2.1", "198.51.100.7", 23.5, 1_700_000_000),
           tk.Measurement("192.0.2.1", "198.51.100.9", -1.0, 1_700_000_100)]
    queries = [tk.Measurement("192.0.2.1", "203.0.113.5", 41.25, 1_700_000_160),
               tk.Measurement("192.0.2.1", "203.0.113.5", -1.0, 1_700_000_999),
               tk.Measurement("2001:db8::1", "2001:db8:5::3", 180.0, None)]
    for context in (ctx, []):
        for m in queries:
            if context and ":" in m.src:
                continue
            seq = tk.encode_reference(context + [m])
            mine = G.teacher_forced(engine.runner, [seq], [len(tk.encode_reference(context))])[0]
            ref = engine.score(m, context=context)
            assert set(mine["fields"]) == set(ref.fields)
            for f, v in ref.fields.items():
                assert mine["fields"][f] == pytest.approx(v, abs=1e-5)
            assert mine["result"] == pytest.approx(ref.result_conditional, abs=1e-5)
            if context:
                assert mine["tokens"]["start"] == pytest.approx(ref.start, abs=1e-5)
            # and the result's log P is that of the engine's exact distribution
            d = engine.rtt(m.src, m.dst, m.time, context=context)
            if m.rtt_ms < 0:
                p = d.p_failed
            else:
                code = int(tk.rtt_to_code(m.rtt_ms))
                p = (1 - d.p_failed) * d.probs[np.searchsorted(d.codes, code)]
            assert mine["result"] == pytest.approx(math.log(p), abs=1e-4)


def test_batched_scoring_with_right_padding_equals_one_by_one():
    engine = Engine(_random_model())
    ms = [tk.Measurement("192.0.2.1", "203.0.113.5", 41.25, 1_700_000_160),
          tk.Measurement("2001:db8::1", "2001:db8:5::3", -1.0, None),
          tk.Measurement("192.0.2.1", "203.0.113.9", 7.0, None)]
    ctx = [tk.Measurement("192.0.2.1", "198.51.100.7", 23.5, 1_700_000_000)]
    seqs = [tk.encode_reference([m]) for m in ms] + [tk.encode_reference(ctx + [ms[2]])]
    starts = [0, 0, 0, len(tk.encode_reference(ctx))]
    assert len({len(x) for x in seqs}) == 4  # every length differs: one padded batch
    together = G.teacher_forced(engine.runner, seqs, starts)
    for seq, st, got in zip(seqs, starts, together, strict=True):
        alone = G.teacher_forced(engine.runner, [seq], [st])[0]
        assert got["tokens"].keys() == alone["tokens"].keys()
        for key, v in alone["tokens"].items():
            assert got["tokens"][key] == pytest.approx(v, abs=1e-5)
        assert got["result"] == pytest.approx(alone["result"], abs=1e-5)


def test_field_blocks_follow_the_role_tokens():
    m = tk.Measurement("192.0.2.1", "203.0.113.5", 41.25, 1_700_000_160)
    toks = tk.encode_reference([m])
    blocks = G.field_blocks(toks, 0)
    assert [b[0] for b in blocks] == ["src", "dst", "time", "result"]
    assert [b[2] - b[1] for b in blocks] == [5, 5, 9, 3]
    assert blocks[-1][2] == len(toks)
