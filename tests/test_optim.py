"""Muon, the optimizer split, and the schedules (ping_llm.optim)."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn as nn

from ping_llm.errors import InputError
from ping_llm.model import GPT, GPTConfig
from ping_llm.optim import (
    Muon,
    build_optimizers,
    lr_multiplier,
    muon_momentum,
    zeropower_via_newtonschulz5,
)

SHAPES = [(64, 128), (128, 128), (256, 64)]  # wide, square, tall


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: 1 thread on 2 shared cores


def rand(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def with_spectrum(shape, seed, cond=100.0, scale=50.0):
    """A random matrix with singular values log-spaced from `scale` down to `scale / cond`.

    (A square Gaussian matrix has singular values down to ~0; 5 NS steps only lift those above
    ~1e-3 of the Frobenius norm to ~1, by design, so it is not a fair probe.)"""
    rows, cols = shape
    k = min(rows, cols)
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(rows, k, generator=g, dtype=torch.float64))
    W, _ = torch.linalg.qr(torch.randn(cols, k, generator=g, dtype=torch.float64))
    s = scale * torch.logspace(0, -math.log10(cond), k, dtype=torch.float64)
    return (U @ torch.diag(s) @ W.T).float()


def polar(G):
    """The exact orthogonal factor U V^T of G = U S V^T, via SVD (what NS approximates)."""
    U, _, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    return (U @ Vh).float()


# ------------------------------------------------------------------------------------------------
# Newton–Schulz and Muon


# With Keller Jordan's coefficients and 5 steps, singular values of a well-spread matrix land in
# about [0.68, 1.13] (measured), not exactly 1: the band below leaves margin on both sides.
SV_BAND = (0.6, 1.25)


@pytest.mark.parametrize("shape", SHAPES)
def test_newton_schulz_output_has_singular_values_near_one_and_approximates_the_polar_factor(
    shape,
):
    G = with_spectrum(shape, 0, cond=100.0)  # singular values 50 ... 0.5
    O = zeropower_via_newtonschulz5(G, steps=5, dtype=torch.float32)
    assert O.shape == G.shape
    s = torch.linalg.svdvals(O)
    assert SV_BAND[0] < s.min() and s.max() < SV_BAND[1], (s.min(), s.max())
    P = polar(G)
    cosine = (O * P).sum() / (O.norm() * P.norm())
    assert cosine > 0.97


def test_newton_schulz_on_a_gaussian_matrix_lifts_all_but_the_tiniest_singular_values():
    G = rand((128, 128), 0)
    U, S, Vh = torch.linalg.svd(G.double())
    O = zeropower_via_newtonschulz5(G, steps=5, dtype=torch.float32).double()
    p_of_s = torch.diagonal(U.T @ O @ Vh.T)  # NS acts on each singular value: O = U p(S) V^T
    big = S / G.norm() > 2e-3  # slope of the 5-step polynomial at 0 is 3.4445**5 ~ 485
    assert big.sum() >= 120  # a Gaussian square matrix has only a few tiny singular values
    assert SV_BAND[0] < p_of_s[big].min() and p_of_s[big].max() < SV_BAND[1]


@pytest.mark.parametrize("shape", SHAPES)
def test_one_muon_step_moves_weights_by_lr_times_shape_factor_times_an_orthogonal_matrix(shape):
    W0 = rand(shape, 1)
    p = nn.Parameter(W0.clone())
    lr = 0.02
    opt = Muon([p], lr=lr)
    grad = with_spectrum(shape, 2, cond=100.0, scale=1e-3)  # gradient-sized
    p.grad = grad.clone()
    opt.step()
    rows, cols = shape
    scale = max(1.0, rows / cols) ** 0.5
    update = (W0 - p.detach()) / (lr * scale)  # what was subtracted, per unit lr
    s = torch.linalg.svdvals(update)
    assert SV_BAND[0] < s.min() and s.max() < SV_BAND[1]
    # first step from a zero buffer: Nesterov update is proportional to the gradient
    cosine = (update * polar(p.grad)).sum() / (update.norm() * polar(p.grad).norm())
    assert cosine > 0.97
    assert p.grad.equal(grad)  # the gradient itself is left untouched


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("shape", SHAPES)
def test_our_muon_matches_torch_optim_muon(shape, weight_decay):
    """torch.optim.Muon (torch >= 2.9) implements the same algorithm: same EMA momentum with
    Nesterov lerp, same NS coefficients/steps/eps, same sqrt(max(1, rows/cols)) lr factor
    (adjust_lr_fn="original"), same decoupled weight decay p *= 1 - lr*wd. Its NS always runs in
    bf16; ours does on CUDA ("auto") or when asked. So:
      - ours with ns_dtype="bfloat16" equals torch's (identical op sequence) to ~1 ulp;
      - ours in fp32 (the CPU default) differs from torch's only by bf16 rounding of the NS
        iterate: a few % of the update's size, bounded below."""
    if not hasattr(torch.optim, "Muon"):
        pytest.skip("this torch has no torch.optim.Muon")
    W0 = rand(shape, 3) * 0.1
    grads = [rand(shape, 10 + i) for i in range(4)]

    def run(make):
        p = nn.Parameter(W0.clone())
        opt = make(p)
        for g in grads:
            p.grad = g.clone()
            opt.step()
        return p.detach() - W0

    hp = dict(lr=0.02, momentum=0.95, nesterov=True, ns_steps=5, weight_decay=weight_decay)
    theirs = run(lambda p: torch.optim.Muon([p], adjust_lr_fn="original", **hp))
    ours_bf16 = run(lambda p: Muon([p], ns_dtype="bfloat16", **hp))
    ours_fp32 = run(lambda p: Muon([p], ns_dtype="float32", **hp))
    size = theirs.abs().max()
    torch.testing.assert_close(ours_bf16, theirs, rtol=0, atol=1e-6 * size.item())
    assert (ours_fp32 - theirs).abs().max() < 0.05 * size
    assert (ours_fp32 - theirs).abs().max() > 0  # the fp32 path really is a different path


def test_muon_rejects_non_matrix_parameters():
    with pytest.raises(ValueError, match="2-D"):
        Muon([nn.Parameter(torch.zeros(4))])
    with pytest.raises(ValueError, match="ns_dtype"):
        Muon([nn.Parameter(torch.zeros(4, 4))], ns_dtype="float16")


def test_muon_state_dict_round_trips_without_pickle_and_resumes_exactly():
    shape = (32, 48)

    def make():
        torch.manual_seed(0)
        p = nn.Parameter(rand(shape, 0))
        return p, Muon([p], lr=0.05)

    grads = [rand(shape, 20 + i) for i in range(6)]
    p_ref, opt_ref = make()
    for g in grads:
        p_ref.grad = g.clone()
        opt_ref.step()

    p, opt = make()
    for g in grads[:3]:
        p.grad = g.clone()
        opt.step()
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "p": p.detach()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)  # no arbitrary unpickling
    p2, opt2 = make()
    with torch.no_grad():
        p2.copy_(saved["p"])
    opt2.load_state_dict(saved["opt"])
    for g in grads[3:]:
        p2.grad = g.clone()
        opt2.step()
    assert torch.equal(p2.detach(), p_ref.detach())


# ------------------------------------------------------------------------------------------------
# build_optimizers


def tiny_model(**kw):
    return GPT(GPTConfig.preset("tiny", **{"sequence_len": 64, **kw}))


def test_every_parameter_is_in_exactly_one_group_block_matrices_in_muon_the_rest_in_adamw():
    model = tiny_model()
    adamw, muon = build_optimizers(model)
    assert isinstance(adamw, torch.optim.AdamW) and isinstance(muon, Muon)
    seen = [id(p) for opt in (adamw, muon) for g in opt.param_groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())  # each exactly once
    muon_ids = {id(p) for g in muon.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        in_block_matrix = name.startswith("transformer.h.") and p.ndim == 2
        assert (id(p) in muon_ids) == in_block_matrix, name
    by_name = {g["name"]: g for g in adamw.param_groups}
    assert by_name["embedding"]["params"] == [model.transformer.wte.weight]
    assert by_name["unembedding"]["params"] == [model.lm_head.weight]
    assert len(muon_ids) == 6 * model.config.n_layer  # q, k, v, proj, fc, mlp proj


def test_prefix_memory_has_its_own_adamw_group_and_knowledge_goes_to_other():
    model = tiny_model(prefix_buckets=16, knowledge_dim=5, knowledge_vocab=7)
    adamw, muon = build_optimizers(model, memory_lr=0.05)
    by_name = {g["name"]: g for g in adamw.param_groups}
    assert by_name["memory"]["params"] == [model.transformer.pte.weight]
    assert by_name["memory"]["lr"] == pytest.approx(0.05 * (128 / 768) ** -0.5)
    assert by_name["memory"]["weight_decay"] == 0.0
    assert {id(p) for p in by_name["other"]["params"]} == {
        id(model.transformer.kproj.weight), id(model.transformer.kte.weight)}
    seen = [id(p) for opt in (adamw, muon) for g in opt.param_groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())


def test_build_optimizers_sees_through_a_torch_compile_wrapper():
    model = tiny_model()
    wrapped = torch.compile(model)  # wrapping only; nothing is compiled until it is called
    adamw, muon = build_optimizers(wrapped)
    n = sum(p.numel() for opt in (adamw, muon) for g in opt.param_groups for p in g["params"])
    assert n == model.num_params()


def test_adamw_learning_rates_scale_with_width_and_every_group_records_initial_lr():
    model = tiny_model()  # n_embd 128: AdamW lrs x (128/768) ** -0.5 = x sqrt(6)
    adamw, muon = build_optimizers(
        model, matrix_lr=0.03, embedding_lr=0.3, unembedding_lr=0.005, betas=(0.9, 0.99)
    )
    by_name = {g["name"]: g for g in adamw.param_groups}
    assert math.isclose(by_name["embedding"]["lr"], 0.3 * math.sqrt(6))
    assert math.isclose(by_name["unembedding"]["lr"], 0.005 * math.sqrt(6))
    assert by_name["embedding"]["betas"] == (0.9, 0.99)
    assert muon.param_groups[0]["lr"] == 0.03  # Muon's lr is not width-scaled
    for opt in (adamw, muon):
        for g in opt.param_groups:
            assert g["initial_lr"] == g["lr"]
    wide = GPT(GPTConfig(sequence_len=16, n_layer=1, n_head=2, n_embd=768))
    by_name = {g["name"]: g for g in build_optimizers(wide)[0].param_groups}
    assert math.isclose(by_name["embedding"]["lr"], 0.2)  # tuned at 768: factor 1


def test_extra_one_dimensional_parameters_go_to_an_adamw_group_without_weight_decay():
    model = tiny_model()
    model.transformer.h[0].gain = nn.Parameter(torch.ones(128))  # e.g. a future per-layer scalar
    adamw, muon = build_optimizers(model, weight_decay=0.1)
    by_name = {g["name"]: g for g in adamw.param_groups}
    assert by_name["other"]["params"] == [model.transformer.h[0].gain]
    assert by_name["other"]["weight_decay"] == 0.0
    assert by_name["embedding"]["weight_decay"] == 0.1
    assert muon.param_groups[0]["weight_decay"] == 0.1


def test_tiny_model_with_build_optimizers_overfits_a_fixed_batch():
    # 4 sequences of 64 random tokens: memorising them drives the loss from ln(267) = 5.59 to
    # ~0.02 in 40 steps (measured); we ask for < 0.1 within 60 steps (~3 s on 2 CPU cores).
    torch.manual_seed(0)
    model = tiny_model()
    opts = build_optimizers(model)
    x = torch.randint(0, 267, (4, 65), generator=torch.Generator().manual_seed(1))
    inp, tgt = x[:, :-1], x[:, 1:]
    steps = 60
    losses = []
    for step in range(steps):
        _, loss = model(inp, tgt)
        loss.backward()
        for opt in opts:
            for g in opt.param_groups:
                g["lr"] = g["initial_lr"] * lr_multiplier(
                    step, steps, warmup_steps=5, warmdown_frac=0.0
                )
            opt.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert abs(losses[0] - math.log(267)) < 0.05
    assert losses[-1] < 0.1, losses[::10]


# ------------------------------------------------------------------------------------------------
# schedules


def test_lr_multiplier_warms_up_from_zero_stays_flat_and_decays_to_the_final_fraction():
    def f(s):
        return lr_multiplier(
            s, total_steps=100, warmup_steps=10, warmdown_frac=0.2, final_lr_frac=0.1
        )

    assert f(0) == 0.0
    assert math.isclose(f(5), 0.5)
    assert all(f(s) == 1.0 for s in range(10, 81))  # flat until the last 20 steps
    assert math.isclose(f(90), 0.1 + 0.9 * 0.5)
    assert math.isclose(f(100), 0.1) and math.isclose(f(250), 0.1)
    vals = [f(s) for s in range(101)]
    assert all(a <= b for a, b in zip(vals[:10], vals[1:11], strict=True))  # rising
    assert all(a >= b for a, b in zip(vals[80:-1], vals[81:], strict=True))  # falling


def test_lr_multiplier_edge_cases():
    assert lr_multiplier(0, 10, warmup_steps=0, warmdown_frac=0.0) == 1.0  # no warmup: full lr
    assert lr_multiplier(10, 10, warmup_steps=0, warmdown_frac=1.0) == 0.0  # default final 0
    # warmup and warmdown overlap in a short run: the lower ramp wins, never above 1
    vals = [lr_multiplier(s, 10, warmup_steps=8, warmdown_frac=0.5) for s in range(11)]
    assert max(vals) <= 1.0 and vals[0] == 0.0 and vals[10] == 0.0
    assert math.isclose(vals[6], 0.75)  # min(6/8, (10-6)/5 = 0.8)
    for bad in (
        dict(total_steps=0),
        dict(warmdown_frac=1.5),
        dict(step=-1),
        dict(final_lr_frac=2.0),
    ):
        args = {**dict(step=0, total_steps=10, warmup_steps=1, warmdown_frac=0.2), **bad}
        with pytest.raises(InputError):
            lr_multiplier(**args)


def test_muon_momentum_warms_up_from_085_to_095():
    assert muon_momentum(0) == 0.85
    assert math.isclose(muon_momentum(150), 0.90)
    assert math.isclose(muon_momentum(300), 0.95) and math.isclose(muon_momentum(10_000), 0.95)
