"""The GPT (ping_llm.model): sizes, causality, KV-cache equivalence, loss masking, softcap."""

from __future__ import annotations

import math

import pytest
import torch

from ping_llm.errors import InputError
from ping_llm.model import GPT, PRESETS, GPTConfig, KVCache

V = 267


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: 1 thread on 2 shared cores


def expected_param_count(n_layer, n_embd, n_head, n_kv_head=None, vocab=V):
    """Counted by hand from the architecture: untied wte + lm_head (V x C each); per block
    c_q (C x C), c_k and c_v (C x Hkv*D each), c_proj (C x C), c_fc and mlp c_proj (4C x C each).
    No biases, no norm weights."""
    n_kv_head = n_head if n_kv_head is None else n_kv_head
    C, D = n_embd, n_embd // n_head
    per_block = C * C + 2 * C * n_kv_head * D + C * C + 2 * 4 * C * C
    return 2 * vocab * C + n_layer * per_block


def small_config(**kw):
    return GPTConfig(**{**dict(sequence_len=64, n_layer=2, n_head=4, n_embd=32), **kw})


@torch.no_grad()
def randomized(model: GPT, seed: int = 0) -> GPT:
    """Give every weight a random non-zero value. At init the output projections are zero, which
    makes every block the identity and every position independent of the others, so causality
    and cache tests on a fresh model would pass vacuously."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        fan_in = p.shape[-1]
        p.copy_(torch.randn(p.shape, generator=g) * (1.0 / math.sqrt(fan_in)))
    model.lm_head.weight.mul_(3.0)  # logits O(3): well inside the softcap, differences visible
    return model.eval()


def tokens(B, T, seed=0):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------
# config and sizes


@pytest.mark.parametrize(
    "name, nominal, tol",
    [
        ("tiny", None, None),
        # The original author's notes say "~95M"; the shape has 98.6M (= 94 Mi): allow 5%.
        ("small", 95e6, 0.05),
        ("full", 680e6, 0.01),
    ],
)
def test_preset_param_counts_match_the_formula_and_the_spec(name, nominal, tol):
    config = GPTConfig.preset(name)
    with torch.device("meta"):  # no memory, no init cost: 680M params counted instantly
        model = GPT(config)
    n = model.num_params()
    p = PRESETS[name]
    assert n == expected_param_count(p["n_layer"], p["n_embd"], p["n_head"])
    if nominal is not None:
        assert abs(n - nominal) / nominal < tol, f"{name}: {n / 1e6:.1f}M vs {nominal / 1e6}M"


def test_preset_shapes_are_the_specified_ones():
    assert (
        PRESETS["small"]["n_layer"],
        PRESETS["small"]["n_embd"],
        PRESETS["small"]["n_head"],
    ) == (20, 640, 10)
    assert (PRESETS["full"]["n_layer"], PRESETS["full"]["n_embd"], PRESETS["full"]["n_head"]) == (
        24,
        1536,
        12,
    )
    for name in PRESETS:
        c = GPTConfig.preset(name)
        assert c.vocab_size == V and c.softcap == 15.0 and c.n_kv_head == c.n_head


def test_grouped_query_attention_shrinks_kv_projections_by_the_formula():
    c = GPTConfig.preset("small", n_kv_head=2)
    with torch.device("meta"):
        n = GPT(c).num_params()
    assert n == expected_param_count(20, 640, 10, n_kv_head=2)
    assert n < expected_param_count(20, 640, 10)


def test_every_preset_field_is_overridable_and_config_round_trips_through_a_dict():
    c = GPTConfig.preset(
        "tiny",
        sequence_len=256,
        n_layer=3,
        n_embd=96,
        n_head=6,
        n_kv_head=3,
        softcap=10.0,
        rope_base=5e4,
        vocab_size=300,
    )
    assert (c.sequence_len, c.n_layer, c.n_embd, c.n_head, c.n_kv_head) == (256, 3, 96, 6, 3)
    d = c.to_dict()
    assert GPTConfig.from_dict(d) == c
    assert d["n_kv_head"] == 3 and GPTConfig.preset("tiny").to_dict()["n_kv_head"] == 4


@pytest.mark.parametrize(
    "bad",
    [
        dict(n_embd=130, n_head=4),  # not divisible
        dict(n_embd=60, n_head=4),  # head dim 15 is odd (RoPE needs pairs)
        dict(n_head=4, n_kv_head=3),  # does not divide
        dict(n_head=4, n_kv_head=8),
        dict(n_layer=0),
        dict(softcap=0.0),
        dict(sequence_len=1.5),
        dict(prefix_buckets=-1),
        dict(knowledge_dim=8),  # knowledge needs both its widths
    ],
)
def test_invalid_configs_raise_input_error(bad):
    with pytest.raises(InputError):
        GPTConfig(**{**dict(n_layer=2, n_head=4, n_embd=32), **bad})


def test_unknown_preset_or_field_raises_input_error():
    with pytest.raises(InputError, match="preset"):
        GPTConfig.preset("huge")
    with pytest.raises(InputError, match="n_layers"):
        GPTConfig.preset("tiny", n_layers=3)
    with pytest.raises(InputError):
        GPTConfig.from_dict({**GPTConfig().to_dict(), "dropout": 0.1})


def test_flops_per_token_is_6n_plus_the_attention_term():
    c = GPTConfig.preset("tiny")
    model = GPT(c)
    N = expected_param_count(4, 128, 4)
    assert model.estimate_flops_per_token() == 6 * (N - V * 128) + 12 * 4 * 128 * 1024
    assert model.estimate_flops_per_token(seq_len=64) == 6 * (N - V * 128) + 12 * 4 * 128 * 64


# ------------------------------------------------------------------------------------------------
# init


def test_fresh_model_predicts_nearly_uniformly_and_blocks_start_as_identity():
    torch.manual_seed(0)
    model = GPT(small_config())
    x = tokens(2, 16)
    logits, loss = model(x, tokens(2, 16, seed=1))
    assert abs(loss.item() - math.log(V)) < 0.05
    for block in model.transformer.h:
        assert not block.attn.c_proj.weight.any() and not block.mlp.c_proj.weight.any()
    # identity blocks: a token's logits do not depend on its neighbours
    x2 = x.clone()
    x2[:, 5] = (x2[:, 5] + 1) % V
    logits2, _ = model(x2)
    assert torch.equal(logits[:, 6:], logits2[:, 6:])


def test_meta_construction_then_to_empty_and_init_weights_gives_a_working_model():
    c = small_config()
    ref = randomized(GPT(c))
    with torch.device("meta"):
        model = GPT(c)
    model.to_empty(device="cpu")
    model.init_weights()  # must also recompute the (non-persistent) RoPE tables
    assert torch.equal(model.cos, ref.cos) and torch.equal(model.sin, ref.sin)
    model.load_state_dict(ref.state_dict())
    x = tokens(2, 20)
    torch.testing.assert_close(model(x)[0], ref(x)[0], rtol=0, atol=0)


def test_state_dict_holds_only_weights_with_nanogpt_names():
    keys = set(GPT(small_config(n_layer=1)).state_dict())
    assert keys == {
        "transformer.wte.weight",
        "lm_head.weight",
        "transformer.h.0.attn.c_q.weight",
        "transformer.h.0.attn.c_k.weight",
        "transformer.h.0.attn.c_v.weight",
        "transformer.h.0.attn.c_proj.weight",
        "transformer.h.0.mlp.c_fc.weight",
        "transformer.h.0.mlp.c_proj.weight",
    }


def test_a_fresh_model_with_prefix_memory_predicts_as_one_without_and_costs_no_flops():
    """Memory starts at zero: until training writes a prefix's row, it adds nothing (an unseen
    prefix at query time adds nothing either); its table is a lookup, not a matmul."""
    torch.manual_seed(0)
    plain = GPT(small_config(n_layer=1))
    torch.manual_seed(0)
    memory = GPT(small_config(n_layer=1, prefix_buckets=128))
    memory.load_state_dict({**plain.state_dict(), "transformer.pte.weight":
                            memory.transformer.pte.weight}, strict=True)
    idx = torch.randint(0, 267, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(memory(idx)[0], plain(idx)[0], rtol=0, atol=0)
    assert memory.estimate_flops_per_token() == plain.estimate_flops_per_token()
    assert memory.num_params() - plain.num_params() == (1 + 8 * 128) * plain.config.n_embd


# ------------------------------------------------------------------------------------------------
# causality and the KV cache


@pytest.mark.parametrize("t", [0, 7, 23])
def test_changing_token_t_changes_no_logit_before_t(t):
    model = randomized(GPT(small_config()))
    x = tokens(2, 24)
    x2 = x.clone()
    x2[:, t] = (x2[:, t] + 100) % V
    with torch.no_grad():
        a, _ = model(x)
        b, _ = model(x2)
    torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=1e-6)
    assert (a[:, t:] - b[:, t:]).abs().max() > 1e-2  # and the change is visible from t on


CACHE_ATOL = 1e-4  # fp32 on CPU; differences are summation-order rounding (~1e-6 observed)


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_kv_cache_prefix_then_token_by_token_equals_full_forward(n_kv_head):
    model = randomized(GPT(small_config(n_kv_head=n_kv_head)))
    x = tokens(3, 30)
    with torch.no_grad():
        full, _ = model(x)
        cache = KVCache(model.config, batch_size=3, max_len=30)
        parts = [model(x[:, :10], kv_cache=cache)[0]]  # prefix: 10 tokens at once
        parts.append(model(x[:, 10:14], kv_cache=cache)[0])  # a chunk of 4 after the prefix
        for i in range(14, 30):  # then one at a time
            parts.append(model(x[:, i : i + 1], kv_cache=cache)[0])
    assert cache.pos == 30
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=0, atol=CACHE_ATOL)


@pytest.mark.parametrize("n_kv_head", [4, 1])
def test_kv_cache_prefix_once_then_batched_continuations_equals_full_forward(n_kv_head):
    model = randomized(GPT(small_config(n_kv_head=n_kv_head)))
    prefix = tokens(1, 12)
    with torch.no_grad():
        cache = KVCache(model.config, batch_size=1, max_len=20)
        model(prefix, kv_cache=cache)
        for seed in (1, 2):  # two rounds of continuations from the same prefix
            batch = cache.expand(5)
            assert cache.pos == batch.pos == 12
            cont = tokens(5, 6, seed=seed)
            got, _ = model(cont, kv_cache=batch)  # (5, 6, V)
            full, _ = model(torch.cat([prefix.expand(5, -1), cont], dim=1))  # (5, 18, V)
            torch.testing.assert_close(got, full[:, 12:], rtol=0, atol=CACHE_ATOL)
        # the batch-1 cache is untouched and can be expanded again
        again = cache.expand(2)
        cont = tokens(2, 3, seed=3)
        got, _ = model(cont, kv_cache=again)
        full, _ = model(torch.cat([prefix.expand(2, -1), cont], dim=1))
        torch.testing.assert_close(got, full[:, 12:], rtol=0, atol=CACHE_ATOL)


@pytest.mark.parametrize("n_kv_head", [4, 1])
def test_siblings_are_alternatives_for_one_position_read_from_the_cache(n_kv_head):
    model = randomized(GPT(small_config(n_kv_head=n_kv_head)))
    x, alts = tokens(3, 16), tokens(3, 5, seed=4)
    with torch.no_grad():
        cache = KVCache(model.config, batch_size=3, max_len=17)  # room for one more, not five
        model(x, kv_cache=cache)
        rows = cache.narrow(1, 3)  # rows 1 and 2, sharing the storage
        got, _ = model(alts[1:], kv_cache=rows, siblings=True)  # (2, 5, V)
        assert cache.pos == rows.pos == 16  # nothing written, nothing advanced
        for j in range(5):  # each alternative as the one next token
            full, _ = model(torch.cat([x[1:], alts[1:, j : j + 1]], dim=1))
            torch.testing.assert_close(got[:, j], full[:, -1], rtol=0, atol=CACHE_ATOL)
    with pytest.raises(InputError, match="siblings need"):
        model(alts, kv_cache=KVCache(model.config, 3, 8), siblings=True)


def test_greedy_generate_with_cache_equals_greedy_decoding_by_full_forwards():
    model = randomized(GPT(small_config()))
    x = tokens(2, 8)
    out = model.generate(x, max_new_tokens=10, temperature=0.0)
    seq = x
    with torch.no_grad():
        for _ in range(10):
            nxt = model(seq)[0][:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(out, seq[:, 8:])


def test_too_long_sequences_and_cache_misuse_raise_input_error():
    model = GPT(small_config(sequence_len=16))
    with pytest.raises(InputError, match="sequence_len"):
        model(tokens(1, 17))
    cache = KVCache(model.config, batch_size=1, max_len=8)
    model(tokens(1, 6), kv_cache=cache)
    with pytest.raises(InputError, match="overflow"):
        model(tokens(1, 3), kv_cache=cache)
    with pytest.raises(InputError, match="batch"):
        model(tokens(2, 1), kv_cache=KVCache(model.config, batch_size=1))
    with pytest.raises(InputError, match="batch-1"):
        KVCache(model.config, batch_size=2).expand(4)


# ------------------------------------------------------------------------------------------------
# loss and logits


def manual_ce(logits, targets):
    """Per-position cross-entropy from first principles: -log softmax(logits)[target]."""
    logp = logits.double() - torch.logsumexp(logits.double(), dim=-1, keepdim=True)
    return -logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0]


def test_loss_is_the_mean_over_positions_whose_target_is_not_minus_one():
    model = randomized(GPT(small_config()))
    x, y = tokens(2, 16), tokens(2, 16, seed=1)
    y[0, :5] = -1
    y[1, 10:] = -1
    with torch.no_grad():
        logits, loss = model(x, y)
    keep = y != -1
    expected = manual_ce(logits, y)[keep].mean()
    assert loss.dtype == torch.float32
    assert abs(loss.item() - expected.item()) < 1e-5


def test_padding_with_target_minus_one_does_not_change_the_loss():
    # A context padded at the end: targets -1 there. Whatever tokens the padding holds, and
    # whatever (ignored) predictions the model makes there, the loss is the same.
    model = randomized(GPT(small_config()))
    x, y = tokens(2, 16), tokens(2, 16, seed=1)
    y[:, 11:] = -1
    x2 = x.clone()
    x2[:, 11:] = tokens(2, 5, seed=7)  # different padding tokens (inputs after the last target)
    with torch.no_grad():
        _, l1 = model(x, y)
        _, l2 = model(x2, y)
        _, l_unmasked = model(x, tokens(2, 16, seed=1))
    assert l1.item() == l2.item()
    assert l1.item() != l_unmasked.item()  # the -1 really removed positions from the mean


def test_all_but_one_target_ignored_equals_single_token_cross_entropy():
    model = randomized(GPT(small_config()))
    x = tokens(2, 16)
    y = torch.full((2, 16), -1)
    y[1, 9] = 42
    with torch.no_grad():
        logits, loss = model(x, y)
    expected = -torch.log_softmax(logits[1, 9].double(), dim=-1)[42]
    assert abs(loss.item() - expected.item()) < 1e-5
    _, per_pos = model(x, y, loss_reduction="none")
    assert per_pos.shape == (2, 16) and per_pos[y == -1].abs().max() == 0


def test_softcap_bounds_logits_strictly_inside_plus_minus_softcap():
    for cap in (15.0, 5.0):
        model = randomized(GPT(small_config(softcap=cap)))
        with torch.no_grad():
            model.lm_head.weight.mul_(1000.0)  # raw logits in the thousands
            logits, _ = model(tokens(2, 16))
        # |logits| <= cap: mathematically strict, but fp32 tanh rounds to exactly 1 beyond ~9
        assert logits.abs().max() <= cap
        assert logits.abs().max() > cap * 0.99  # the cap is what limits them
        # and below the cap it is ~identity: softcap * tanh(z / softcap) ~ z for small z
        z = torch.tensor([0.1, -0.2])
        assert torch.allclose(cap * torch.tanh(z / cap), z, atol=1e-3)


def test_bf16_autocast_on_cpu_gives_fp32_logits_and_a_finite_loss():
    model = randomized(GPT(small_config()))
    x, y = tokens(2, 16), tokens(2, 16, seed=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = model(x, y)
        cache = KVCache(model.config, batch_size=2)
        model(x, kv_cache=cache)
    assert logits.dtype == torch.float32 and loss.dtype == torch.float32
    assert torch.isfinite(loss)
    assert cache.kv.dtype == torch.bfloat16
    with torch.no_grad():
        ref, _ = model(x)
    assert (logits - ref).abs().max() < 0.5  # bf16 is a perturbation, not a different model


def test_gradients_reach_every_parameter():
    model = randomized(GPT(small_config())).train()
    _, loss = model(tokens(2, 16), tokens(2, 16, seed=1))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
