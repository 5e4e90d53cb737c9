"""The query engine: exact RTT distributions, CIDR marginals, rank, destinations, score,
sample, input validation, and the `ping-llm query` verbs.

Most properties here are identities that hold for any weights (the KV-cached, batched answer
equals an uncached forward; a /24 is the weighted mixture of its /32s), so they run on a small
GPT with random, deliberately opinionated weights. The tests that take `trained` use the session's
tiny model trained on the synthetic Internet (`trained_run` in conftest.py) and real addresses of
that world, and one checks the answers against the world's ground truth.

Identities between two *different* computation paths (KV cache vs full forward, batched vs one by
one, a mixture vs its members) run the model in float64 (`model64`, `engine64`, `fast64`,
`trained64`): in float32 the paths differ by summation-order rounding, ~1e-6 relative in a
probability (more on some CPUs than others), as large as the tolerances. In float64 the paths
agree to ~1e-15 before GPT.forward casts its logits to float32 (`.float()`, then the softcap in
float32), so both round to the same float32 logits; only a logit within ~1e-15 of a float32
rounding boundary (odds ~1e-8 per logit) can come out 1-2 ulps apart (< 1e-6 for |logit| < 8),
still inside the tolerances. Same-path repeats (same seed, reloaded run) stay float32 and exact.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from ping_llm import checkpoint
from ping_llm import tokens as tk
from ping_llm.cli import main
from ping_llm.data import schema, synth
from ping_llm.errors import InputError
from ping_llm.model import GPT, GPTConfig
from ping_llm.query.distribution import RTTDistribution
from ping_llm.query.engine import Engine
from ping_llm.query.targets import Query

SRC = "10.0.0.1"
DST = "192.0.2.7"
T0 = 1_700_000_000
CONTEXT = [
    {"src": SRC, "dst": "192.0.2.9", "rtt_ms": 12.0, "time": T0},
    {"src": SRC, "dst": "198.51.100.3", "rtt_ms": None, "time": T0 + 30},
    {"src": SRC, "dst": "192.0.2.9", "rtt_ms": 13.5},
]


def random_model(seed: int = 0, sequence_len: int = 128) -> GPT:
    """A small GPT whose random weights have opinions: nanochat's init predicts ~uniformly (tiny
    lm_head, zero output projections), which would make every identity below trivially true."""
    torch.manual_seed(seed)
    m = GPT(GPTConfig(n_layer=2, n_embd=32, n_head=2, sequence_len=sequence_len))
    with torch.no_grad():
        m.lm_head.weight.normal_(0.0, 0.3)
        for block in m.transformer.h:
            block.attn.c_proj.weight.normal_(0.0, 0.05)
            block.mlp.c_proj.weight.normal_(0.0, 0.05)
    return m.eval()


def save_run(model: GPT, run_dir) -> None:
    checkpoint.save_checkpoint(
        run_dir,
        model_state=model.state_dict(),
        config={"model": model.config.to_dict(), "train": {}},
        optimizers=[],
        loader_states=[{}],
        rng_states=[{}],
        step=0,
    )


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A run directory holding `random_model()` (shared with tests/query/test_server.py)."""
    run = tmp_path_factory.getbasetemp() / "query_tiny_run"
    if checkpoint.find_checkpoint(run) is None:
        save_run(random_model(), run)
    return run


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: 1 thread on 2 shared cores


@pytest.fixture(scope="module")
def model():
    return random_model()


@pytest.fixture(scope="module")
def engine(model):
    return Engine(model)


@pytest.fixture(scope="module")
def model64():
    """`random_model()` in float64: for identities between two different computation paths (see
    the module docstring)."""
    return random_model().double()


@pytest.fixture(scope="module")
def engine64(model64):
    return Engine(model64)


@pytest.fixture(scope="module")
def fast64(model64):
    """Refines only the byte1 bins carrying 90% of the mass (random weights spread it over all
    132 bins): the identities below hold for any refinement threshold."""
    return Engine(model64, byte2_mass=0.9)


@dataclass
class Trained:
    engine: Engine
    world: object  # synth.World: the ground truth
    table: object  # the canonical measurements it was trained on (pyarrow.Table)
    src: str  # the busiest source of the world
    dsts: list[str]  # five of its destinations
    context: list[tk.Measurement]  # its first three measurements


@pytest.fixture(scope="module")
def trained(trained_run):
    table = schema.read_canonical(trained_run.canonical)
    srcs = table["src_addr"].to_numpy(zero_copy_only=False)
    dsts = table["dst_addr"].to_numpy(zero_copy_only=False)
    times = table["event_time"].cast("int64").to_numpy()
    rtts = table["rtt"].to_numpy()
    values, counts = np.unique(srcs, return_counts=True)
    src = str(values[np.argmax(counts)])
    mine = np.flatnonzero(srcs == src)
    mine = mine[np.argsort(times[mine], kind="stable")]
    context = [tk.Measurement(src, str(dsts[i]), float(rtts[i]), int(times[i])) for i in mine[:3]]
    return Trained(
        Engine.load(trained_run.run_dir),
        synth.World.load(trained_run.results),
        table,
        src,
        [str(d) for d in pd_unique(dsts[mine])[:5]],
        context,
    )


@pytest.fixture(scope="module")
def trained64(trained_run):
    """The engine over the trained model in float64 (see the module docstring)."""
    model, _ = checkpoint.load_model(trained_run.run_dir)
    return Engine(model.double())


def pd_unique(a) -> np.ndarray:
    """Distinct values in order of first appearance."""
    _, first = np.unique(a, return_index=True)
    return a[np.sort(first)]


def full_forward_probs(model: GPT, toks, allowed) -> np.ndarray:
    """Uncached forward over toks; the next-token distribution restricted to `allowed` ids."""
    with torch.no_grad():
        logits, _ = model(torch.tensor([list(toks)]))
    return torch.softmax(logits[0, -1, list(allowed)].double(), -1).numpy()


def measurements(ctx) -> list[tk.Measurement]:
    """CONTEXT-style dicts -> Measurements (rtt_ms None = failed)."""
    return [
        tk.Measurement(
            c["src"], c["dst"], -1.0 if c["rtt_ms"] is None else c["rtt_ms"], c.get("time")
        )
        for c in ctx or []
    ]


def unconditional(d: RTTDistribution) -> np.ndarray:
    return (1 - d.p_failed) * d.pmf()


# ----------------------------------------------------------------------------------------------
# RTT distributions


def test_rtt_distribution_and_p_failed_sum_to_one(trained):
    t = trained.context[-1].time + 100
    d = trained.engine.rtt(trained.src, trained.dsts[0], time=t, context=trained.context)
    assert 0 < d.p_failed < 1
    assert d.p_failed + (1 - d.p_failed) * d.probs.sum() == pytest.approx(1.0, abs=1e-12)
    assert (d.probs > 0).all() and (np.diff(d.codes.astype(int)) > 0).all()
    assert not np.isnan(tk.RTT_GRID_MS[d.codes]).any()  # only canonical codes
    qs = d.quantile([0.05, 0.25, 0.5, 0.75, 0.95])
    assert (np.diff(qs) >= 0).all() and d.median == qs[2]
    assert d.values_ms.min() <= d.mean <= d.values_ms.max()
    assert d.p_below(math.inf) == pytest.approx(1 - d.p_failed)
    assert d.p_below(math.inf, given_reply=True) == pytest.approx(1.0)
    lo, hi, p = d.histogram()
    assert p.sum() == pytest.approx(1.0) and (lo < hi).all()
    assert d.exact and d.n_samples is None and 0 <= d.coarse_mass <= 1e-4 + 1e-12
    out = d.to_dict()
    assert {"p_failed", "median_ms", "mean_ms", "quantiles"} <= set(out)
    assert {"0.05", "0.5", "0.95"} <= set(out["quantiles"])


def test_query_tokens_follow_the_token_language_and_the_time_delta_chain(engine):
    cases = [
        (SRC, DST, None, None),
        (SRC, DST, T0 + 100, CONTEXT),  # DELTA1 after the context's last timestamp
        (SRC, DST, T0 + 10**6, CONTEXT),  # DELTA4
        (SRC, DST, T0 - 5, CONTEXT),  # earlier than the context: ABS
        (SRC, DST, T0, CONTEXT[2:]),  # no timestamp before it: ABS
        ("2001:db8::1", "2001:db8:1::2", "2023-11-14T22:13:20Z", None),
    ]
    for src, dst, time, ctx in cases:
        t = T0 if time == "2023-11-14T22:13:20Z" else time
        expected = tk.encode_reference(measurements(ctx) + [tk.Measurement(src, dst, 0.0, t)])
        assert engine.query_tokens(src, dst, time, ctx) == expected[:-3]


def test_p_failed_byte1_and_byte2_equal_an_uncached_forward(engine64, model64):
    """The KV-cached, batched enumeration reads exactly the model's constrained distributions."""
    engine, model = engine64, model64  # two paths: compared in float64
    prefix = engine.query_tokens(SRC, DST, T0 + 100, CONTEXT)
    d = engine.rtt(SRC, DST, time=T0 + 100, context=CONTEXT)
    p_role = full_forward_probs(model, prefix, [tk.RTT_START, tk.FAILED])
    assert d.p_failed == pytest.approx(p_role[1], abs=1e-6)
    p1 = full_forward_probs(model, prefix + [tk.RTT_START], tk.BYTE0 + tk.CANON_B1)
    marginal = np.bincount(d.codes.astype(int) >> 8, weights=d.probs, minlength=256)
    np.testing.assert_allclose(marginal[tk.CANON_B1], p1, atol=1e-6)
    b1 = int(tk.CANON_B1[np.argmax(p1)])  # the most probable bin is always refined
    p2 = full_forward_probs(model, prefix + [tk.RTT_START, tk.BYTE0 + b1], range(tk.BYTE0, 267))
    np.testing.assert_allclose(d.pmf()[b1 << 8 : (b1 + 1) << 8] / p1.max(), p2, atol=1e-6)


def test_quantiles_agree_with_monte_carlo_sampling_from_the_model(trained):
    """Sample with model.generate from the same prefix, restricted the same way (rejection):
    the exact CDF lies within the DKW band of the sample (alpha = 1e-3)."""
    eng, n, src, dst = trained.engine, 2000, trained.src, trained.dsts[0]
    prefix = eng.query_tokens(src, dst)  # short: generate recomputes the prefix for every draw
    g = torch.Generator().manual_seed(0)
    role = eng.model.generate(torch.tensor([prefix] * n), 1, generator=g)[:, 0].numpy()
    role = role[np.isin(role, [tk.RTT_START, tk.FAILED])]
    rb = eng.model.generate(torch.tensor([prefix + [tk.RTT_START]] * n), 2, generator=g).numpy()
    b1, b2 = rb[:, 0] - tk.BYTE0, rb[:, 1] - tk.BYTE0
    ok = np.isin(b1, tk.CANON_B1) & (b2 >= 0)
    sample = np.sort(tk.RTT_GRID_MS[(b1[ok] << 8) | b2[ok]])
    # A trained model follows the grammar, so nearly every draw is accepted; random weights
    # rarely pick a result role (~0.5%), so the binomial bound then uses the few accepted draws.
    assert len(role) >= 5 and len(sample) > n / 4

    d = eng.rtt(src, dst)
    pf_mc = float((role == tk.FAILED).mean())
    sd = math.sqrt(d.p_failed * (1 - d.p_failed) / len(role))
    assert abs(pf_mc - d.p_failed) <= 4.5 * sd + 1 / len(role)
    eps = math.sqrt(math.log(2 / 1e-3) / (2 * len(sample)))
    exact_cdf = np.cumsum(d.probs)
    at = np.searchsorted(d.values_ms, sample, side="right") - 1  # exact CDF at each sample
    emp = np.arange(1, len(sample) + 1) / len(sample)
    assert np.max(np.abs(exact_cdf[at] - emp)) <= eps + 1e-4
    for q in (0.05, 0.25, 0.5, 0.75, 0.95):
        x = d.quantile(q)
        assert (sample <= x).mean() >= q - eps and (sample < x).mean() <= q + eps


def test_rtt_many_answers_in_order_and_equals_single_queries(engine64):
    engine = engine64  # batched vs one by one: two paths, compared in float64
    queries = [
        (SRC, DST),
        Query("2001:db8::1", "2001:db8::2"),
        {"src": SRC, "dst": "198.51.100.1", "time": T0 + 50},
        Query(SRC, DST, context=CONTEXT[:1]),  # its own context replaces the shared one
        (SRC, "192.0.2.0/30"),
        (SRC, "192.0.2.9"),
    ]
    batch = engine.rtt_many(queries, context=CONTEXT)
    singles = [
        engine.rtt(SRC, DST, context=CONTEXT),
        engine.rtt("2001:db8::1", "2001:db8::2", context=CONTEXT),
        engine.rtt(SRC, "198.51.100.1", time=T0 + 50, context=CONTEXT),
        engine.rtt(SRC, DST, context=CONTEXT[:1]),
        engine.rtt(SRC, "192.0.2.0/30", context=CONTEXT),
        engine.rtt(SRC, "192.0.2.9", context=CONTEXT),
    ]
    for a, b in zip(batch, singles, strict=True):
        assert a.p_failed == pytest.approx(b.p_failed, abs=1e-6)
        assert np.abs(a.pmf() - b.pmf()).sum() < 3e-4  # a bin at the refine threshold may flip
        np.testing.assert_allclose(a.histogram()[2], b.histogram()[2], atol=1e-6)
    assert batch[0].p_failed != pytest.approx(batch[3].p_failed, abs=1e-6)  # context matters


def test_cidr_24_is_the_probability_weighted_mixture_of_its_32s(fast64, model64):
    fast, model = fast64, model64  # the walk vs its members and a full forward: float64
    prefix = fast.query_tokens(SRC, "192.0.2.0")[:-1]  # ... DST_IPV4 192 0 2
    w = full_forward_probs(model, prefix, range(tk.BYTE0, 267))
    members = fast.rtt_many([(SRC, f"192.0.2.{i}") for i in range(256)])
    d = fast.rtt(SRC, "192.0.2.0/24")
    assert d.exact and d.n_completions == 256 and d.n_samples is None
    assert d.p_failed == pytest.approx(
        sum(wi * m.p_failed for wi, m in zip(w, members, strict=True)), abs=1e-6
    )
    mix = sum(wi * unconditional(m) for wi, m in zip(w, members, strict=True))
    assert np.abs(unconditional(d) - mix).max() < 1e-6


def test_prefixes_off_byte_boundaries_constrain_the_partial_byte(fast64, model64):
    """10.0.0.0/31 -> 10.0.0.2/31: two source and two destination completions, each weighted by
    the model's probability renormalised over the allowed values."""
    engine, model = fast64, model64  # the walk vs its members and a full forward: float64
    total_pf, total = 0.0, np.zeros(65536)
    pw = full_forward_probs(model, engine.query_tokens("10.0.0.0", DST)[:5], [11, 12])
    for s in (0, 1):
        src = f"10.0.0.{s}"
        dw = full_forward_probs(model, engine.query_tokens(src, "10.0.0.2")[:-1], [13, 14])
        for j, dst in enumerate(("10.0.0.2", "10.0.0.3")):
            m = engine.rtt(src, dst)
            total_pf += pw[s] * dw[j] * m.p_failed
            total += pw[s] * dw[j] * unconditional(m)
    d = engine.rtt("10.0.0.0/31", "10.0.0.3/31")  # host bits are cleared
    assert d.n_completions == 4
    assert d.p_failed == pytest.approx(total_pf, abs=1e-6)
    assert np.abs(unconditional(d) - total).max() < 1e-6


def test_large_prefixes_use_seeded_monte_carlo_and_report_the_sample_count(model):
    exact = Engine(model, byte2_mass=0.9).rtt(SRC, "192.0.2.0/23")  # 512 completions: exact
    mc = Engine(model, exact_limit=256, mc_samples=400, byte2_mass=0.9)
    a = mc.rtt(SRC, "192.0.2.0/23", seed=1)
    assert exact.exact and exact.n_completions == 512
    assert not a.exact and a.n_samples == 400 and 1 < a.n_completions <= 400
    assert a.p_failed + (1 - a.p_failed) * a.probs.sum() == pytest.approx(1.0)
    # unbiased: p_failed per completion is in [0, 1], so its MC std is <= 0.5 / sqrt(400)
    assert abs(a.p_failed - exact.p_failed) < 4 * 0.5 / math.sqrt(400)
    again, other = mc.rtt(SRC, "192.0.2.0/23", seed=1), mc.rtt(SRC, "192.0.2.0/23", seed=2)
    assert again.p_failed == a.p_failed and np.array_equal(again.probs, a.probs)
    assert other.p_failed != a.p_failed


# ----------------------------------------------------------------------------------------------
# rank, destinations, score, sample


def test_rank_is_consistent_with_rtt(trained, trained64):
    # rank batches the candidates, rtt answers one by one: two paths, compared in float64 (an
    # exact median equality could flip on a CDF within float32 rounding of 0.5)
    eng, src, ctx, cands = trained64, trained.src, trained.context, trained.dsts[:4]
    single = {c: eng.rtt(src, c, context=ctx) for c in cands}
    by_median = eng.rank(src, cands, context=ctx)
    assert sorted(r.dst for r in by_median) == sorted(cands)
    assert [r.rank for r in by_median] == [1, 2, 3, 4]
    medians = [r.median_ms for r in by_median]
    assert medians == sorted(medians)
    for r in by_median:
        assert r.median_ms == single[r.dst].median
    by_p = eng.rank(src, cands, by="p_below", threshold_ms=50.0, context=ctx)
    ps = [r.p_below for r in by_p]
    assert ps == sorted(ps, reverse=True)
    for r in by_p:
        assert r.p_below == pytest.approx(single[r.dst].p_below(50.0), abs=1e-6)


def test_trained_answers_follow_the_synthetic_worlds_ground_truth(trained):
    """End to end: the engine reads the trained model the way it was trained (field order, time
    chain), so on 40 observed (src, dst, time) its medians rank like the true medians, and its
    distribution is closer (KL) to the true one than the prediction made for another pair."""
    rng = np.random.default_rng(0)
    rows = rng.choice(trained.table.num_rows, 40, replace=False)
    col = {c: trained.table[c].take(rows).to_pylist() for c in ("src_addr", "dst_addr")}
    times = trained.table["event_time"].cast("int64").take(rows).to_numpy()
    queries = list(zip(col["src_addr"], col["dst_addr"], times.tolist(), strict=True))
    dists = trained.engine.rtt_many(queries)
    truth = trained.world.truth(col["src_addr"], col["dst_addr"], times.astype(float))
    rho = spearmanr(truth.median(), [d.median for d in dists]).statistic
    assert rho > 0.3, f"Spearman(model median, true median) = {rho:.2f}"
    pf = np.array([d.p_failed for d in dists])
    pmf = np.stack([d.pmf() for d in dists])
    other = np.roll(np.arange(40), 7)
    kl_right, kl_other = truth.kl(pf, pmf), truth.kl(pf[other], pmf[other])
    assert kl_right.mean() < kl_other.mean() - 0.5


def test_destinations_beam_search_is_exact_inside_a_small_prefix(engine64, model64):
    engine, model = engine64, model64  # KV-cached beam vs a full forward: float64
    found = engine.destinations(SRC, k=5, within="192.0.2.0/24", beam=256, with_rtt=False)
    toks = engine.query_tokens(SRC, "192.0.2.0")[:6] + [tk.DST_IPV4, 11 + 192, 11, 11 + 2]
    p = full_forward_probs(model, toks, range(tk.BYTE0, 267))
    top = np.argsort(-p)[:5]
    assert [d.dst for d in found] == [f"192.0.2.{i}" for i in top]
    np.testing.assert_allclose([d.p for d in found], p[top], rtol=1e-6)


def test_destinations_report_the_models_probability_of_each_address(engine64, model64):
    engine, model = engine64, model64  # KV-cached beam vs full forwards: float64
    found = engine.destinations(SRC, k=4)
    assert len(found) == 4 and len({d.dst for d in found}) == 4
    assert [d.p for d in found] == sorted((d.p for d in found), reverse=True)
    for d in found:
        toks = engine.query_tokens(SRC, d.dst)[:6] + [tk.DST_IPV4]
        dst_bytes = engine.query_tokens(SRC, d.dst)[7:11]
        p = 1.0
        for b in dst_bytes:
            p *= full_forward_probs(model, toks, range(tk.BYTE0, 267))[b - tk.BYTE0]
            toks = toks + [b]
        assert d.p == pytest.approx(p, rel=1e-5)
        assert d.rtt is not None and d.rtt.p_failed == pytest.approx(
            engine.rtt(SRC, d.dst).p_failed
        )


@pytest.mark.parametrize("rtt_below", [None, 1.0])
def test_destinations_inside_a_prefix_form_a_distribution(engine, rtt_below):
    """All 256 addresses of a /24, with or without conditioning on the RTT: p sums to 1."""
    found = engine.destinations(
        SRC, k=256, within="192.0.2.0/24", beam=256, rtt_below=rtt_below, with_rtt=False
    )
    assert len({d.dst for d in found}) == 256
    assert sum(d.p for d in found) == pytest.approx(1.0, abs=1e-9)


def test_destinations_under_an_rtt_bound_and_by_sampling(engine):
    bounded = engine.destinations(SRC, k=3, rtt_below=30.0)
    assert 1 <= len(bounded) <= 3 and len({d.dst for d in bounded}) == len(bounded)
    assert all(0 < d.p <= 1 for d in bounded) and sum(d.p for d in bounded) <= 1 + 1e-9
    drawn = engine.destinations(SRC, k=20, method="sample", seed=3, with_rtt=False)
    assert sum(d.count for d in drawn) == 20
    again = engine.destinations(SRC, k=20, method="sample", seed=3, with_rtt=False)
    assert [(d.dst, d.count) for d in drawn] == [(d.dst, d.count) for d in again]


def test_score_per_field_sums_to_the_models_log_likelihood_and_matches_rtt(trained, trained64):
    # score (full forward) vs rtt (KV-cached): two paths, compared in float64
    eng, src, dst, ctx = trained64, trained.src, trained.dsts[1], trained.context
    t = ctx[-1].time + 100
    d = eng.rtt(src, dst, time=t, context=ctx)
    hist = np.bincount(d.codes.astype(int) >> 8, weights=d.probs, minlength=256)
    b1 = int(np.argmax(hist))  # the most probable byte1 bin is always refined
    in_bin = (d.codes.astype(int) >> 8) == b1
    code = int(d.codes[in_bin][np.argmax(d.probs[in_bin])])
    m = tk.Measurement(src, dst, float(tk.RTT_GRID_MS[code]), t)
    s = eng.score(m, context=ctx)
    assert set(s.fields) == {"src", "dst", "time", "result"}
    toks = tk.encode_reference(ctx + [m])
    start = len(tk.encode_reference(ctx))
    with torch.no_grad():
        logp = torch.log_softmax(eng.model(torch.tensor([toks]))[0][0].double(), -1)
    ll = sum(float(logp[t - 1, toks[t]]) for t in range(start, len(toks)))
    assert s.total == pytest.approx(ll, abs=1e-6)
    assert s.result_conditional == pytest.approx(
        math.log((1 - d.p_failed) * d.pmf()[code]), abs=1e-6
    )
    failed = eng.score({"src": src, "dst": dst, "rtt_ms": None, "time": t}, ctx)
    assert failed.result_conditional == pytest.approx(math.log(d.p_failed), abs=1e-6)


def test_sample_generates_valid_seeded_streams_that_roll_over_the_window(engine):
    ms = engine.sample(12, src="2001:db8::1", seed=5)  # 12 IPv6 measurements > 128 tokens
    assert len(ms) == 12 and all(m.src == "2001:db8::1" for m in ms)
    assert all(tk.parse_address(m.dst)[1] == 6 for m in ms)
    assert tk.decode(tk.encode_reference(ms)) == ms  # every measurement is in the language
    assert engine.sample(12, src="2001:db8::1", seed=5) == ms
    free = engine.sample(6, seed=6, context=CONTEXT)
    assert len(free) == 6 and free != engine.sample(6, seed=7, context=CONTEXT)


# ----------------------------------------------------------------------------------------------
# hostile input


LONG_CONTEXT = [{"src": "2001:db8::1", "dst": "2001:db8::2", "rtt_ms": 5.0}] * 10


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda e: e.rtt("not-an-ip", DST), "not an IP address"),
        (lambda e: e.rtt(None, DST), "expected an IP address"),
        (lambda e: e.rtt(SRC, "2001:db8::1"), "mixed address families"),
        (lambda e: e.rtt(SRC, "10.0.0.0/33"), "longer than an IPv4 address"),
        (lambda e: e.rtt("2001:db8::1", "2001:db8::/129"), "longer than an IPv6 address"),
        (lambda e: e.rtt(SRC, "10.0.0.0/-1"), "must be >= 0"),
        (lambda e: e.rtt(SRC, "10.0.0.0/x"), "bad prefix length"),
        (lambda e: e.rtt(SRC, "::ffff:1.2.3.4"), "IPv4-mapped"),
        (lambda e: e.rtt(SRC, DST, time="yesterday"), "neither epoch seconds nor ISO 8601"),
        (lambda e: e.rtt(SRC, DST, time=-5), "outside 1970"),
        (lambda e: e.rtt(SRC, DST, context=LONG_CONTEXT), "sequence_len"),
        (lambda e: e.rtt(SRC, DST, context=[{"src": SRC}]), "needs keys src, dst"),
        (lambda e: e.rtt(SRC, DST, context=[(SRC, DST, float("nan"))]), "finite"),
        (lambda e: e.rtt(SRC, DST, context=[(SRC, "10.0.0.0/8", 1.0)]), "full addresses"),
        (lambda e: e.rtt(SRC, DST, context=[(SRC, "2001:db8::1", 1.0)]), "mixed address"),
        (lambda e: e.rtt_many([(SRC,)]), "not a query"),
        (lambda e: e.rank(SRC, []), "at least one candidate"),
        (lambda e: e.rank(SRC, [DST], by="p_below"), "needs threshold_ms"),
        (lambda e: e.rank(SRC, [DST], by="mean"), "rank by"),
        (lambda e: e.rank(SRC, [DST], threshold_ms=-1), "positive"),
        (lambda e: e.destinations(SRC, k=0), "k must be"),
        (lambda e: e.destinations("10.0.0.0/8"), "full source address"),
        (lambda e: e.destinations(SRC, within="2001:db8::/32"), "mixed address families"),
        (lambda e: e.destinations(SRC, rtt_below=float("nan")), "positive number"),
        (lambda e: e.sample(0), "n must be"),
        (lambda e: e.sample(1, src="10.0.0.0/24"), "full source address"),
        (lambda e: e.score({"src": SRC, "dst": DST, "rtt_ms": "fast"}), "must be a number"),
    ],
)
def test_hostile_input_raises_a_clear_input_error(engine, call, message):
    with pytest.raises(InputError, match=message):
        call(engine)


def test_engine_loads_a_run_directory_and_rejects_a_missing_one(tiny_run, engine, tmp_path):
    loaded = Engine.load(tiny_run)
    assert loaded.rtt(SRC, DST).p_failed == pytest.approx(engine.rtt(SRC, DST).p_failed, abs=1e-9)
    with pytest.raises(InputError, match="no ping-llm checkpoint"):
        Engine.load(tmp_path / "nothing")


# ----------------------------------------------------------------------------------------------
# CLI


def test_cli_query_rtt_json_has_the_documented_fields(tiny_run, engine, tmp_path, capsys):
    ctx = tmp_path / "ctx.jsonl"
    ctx.write_text("\n".join(json.dumps(c) for c in CONTEXT))
    argv = [
        "query",
        "rtt",
        "--run",
        str(tiny_run),
        SRC,
        DST,
        "--json",
        "--context",
        str(ctx),
        "--time",
        "2023-11-14T22:15:00+00:00",
    ]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    d = engine.rtt(SRC, DST, time=T0 + 100, context=CONTEXT)
    assert out["p_failed"] == pytest.approx(d.p_failed, abs=1e-9)
    assert out["median_ms"] == d.median and out["mean_ms"] == pytest.approx(d.mean)
    assert {"0.05", "0.5", "0.95"} <= set(out["quantiles"])
    assert main(["query", "rtt", "--run", str(tiny_run), SRC, "192.0.2.0/24"]) == 0
    assert "median" in capsys.readouterr().out


ATLAS_RESULT = {  # a RIPE Atlas ping result as downloaded, behind NAT (src_addr private)
    "af": 4, "prb_id": 1216, "type": "ping", "msm_id": 1000192, "timestamp": T0,
    "from": SRC, "src_addr": "192.168.103.132", "dst_addr": "192.0.2.9",
    "result": [{"rtt": 27.4}, {"x": "*"}, {"rtt": 25.7}], "sent": 3, "rcvd": 2,
}


@pytest.mark.parametrize("shape", ["array.json", "lines.jsonl.gz"])
def test_cli_context_takes_ripe_atlas_results_as_downloaded(tiny_run, engine, tmp_path, capsys,
                                                           shape):
    import gzip

    later = {**ATLAS_RESULT, "timestamp": T0 + 240, "result": [{"rtt": 30.1}]}
    items = [ATLAS_RESULT, CONTEXT[0], later]
    path = tmp_path / shape
    if shape.endswith(".gz"):
        path.write_bytes(gzip.compress("\n".join(json.dumps(x) for x in items).encode()))
    else:
        path.write_text(json.dumps(items, indent=2))
    assert main(["query", "rtt", "--run", str(tiny_run), SRC, DST, "--json", "--context",
                 str(path)]) == 0
    out = json.loads(capsys.readouterr().out)
    packets = [(SRC, "192.0.2.9", 27.4, T0), (SRC, "192.0.2.9", -1.0, T0),
               (SRC, "192.0.2.9", 25.7, T0), CONTEXT[0], (SRC, "192.0.2.9", 30.1, T0 + 240)]
    d = engine.rtt(SRC, DST, context=packets)
    assert out["p_failed"] == pytest.approx(d.p_failed, abs=1e-9)
    assert out["median_ms"] == d.median
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{**ATLAS_RESULT, "af": 6}]))
    assert main(["query", "rtt", "--run", str(tiny_run), SRC, DST, "--context", str(bad)]) == 2
    assert "not a usable RIPE Atlas ping result" in capsys.readouterr().err


def test_cli_query_rank_destinations_score_sample(tiny_run, capsys):
    run = ["--run", str(tiny_run)]
    assert main(["query", "rank", *run, SRC, "192.0.2.1", "192.0.2.2", "--json"]) == 0
    assert [r["rank"] for r in json.loads(capsys.readouterr().out)] == [1, 2]
    assert main(["query", "destinations", *run, SRC, "--k", "3", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 3
    assert main(["query", "destinations", *run, SRC, "--k", "2", "--rtt-below", "20"]) == 0
    assert "median" in capsys.readouterr().out
    assert main(["query", "score", *run, SRC, DST, "failed", "--json"]) == 0
    assert "result_conditional" in json.loads(capsys.readouterr().out)
    assert main(["query", "sample", *run, "--n", "3", "--src", SRC, "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 3


@pytest.mark.parametrize(
    "args, message",
    [
        (["rtt", SRC, "10.0.0.0/40"], "longer than an IPv4"),
        (["rtt", SRC, "2001:db8::1"], "mixed address families"),
        (["rtt", SRC, DST, "--context", "/nonexistent.json"], "cannot read context file"),
        (["rank", SRC, "nope"], "not an IP address"),
        (["destinations", SRC, "--k", "0"], "k must be"),
    ],
)
def test_cli_bad_input_exits_2_with_a_message(tiny_run, capsys, args, message):
    verb, *rest = args
    assert main(["query", verb, "--run", str(tiny_run), *rest]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "content, message",
    [
        (bytes(range(256)) * 8, "not JSON"),  # binary
        (b"[" * 100_000 + b"]" * 100_000, "no measurements"),  # nested arrays, nothing inside
        (b'{"a": ' * 5000 + b"1" + b"}" * 5000, "not JSON"),  # nested objects past any limit
        (b"", "no measurements"),
    ],
)
def test_cli_hostile_context_files_are_one_line_errors(tiny_run, tmp_path, capsys, content,
                                                        message):
    f = tmp_path / "ctx"
    f.write_bytes(content)
    argv = ["query", "rtt", "--run", str(tiny_run), SRC, DST, "--context", str(f)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


@pytest.mark.parametrize("device", ["bogus", "cuda:99"])
def test_cli_a_device_the_machine_lacks_exits_2(tiny_run, capsys, device):
    assert main(["query", "rtt", "--run", str(tiny_run), SRC, DST, "--device", device]) == 2
    assert "device" in capsys.readouterr().err
