"""What the model knows about addresses beyond their bytes: prefix memory (`model.prefix_slots`)
and address knowledge (`ping_llm.knowledge`) -- where they enter, that every query path reads
them exactly as training does, and that runs with and without them save, load and answer.

Identities between two computation paths (KV cache vs full forward) run in float64, as in
tests/query/test_engine.py. The addresses are real ones the packaged GeoLite2-City places (RIPE NCC,
Google, Cloudflare) or does not (private ranges).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ping_llm import checkpoint, knowledge
from ping_llm import tokens as tk
from ping_llm.cli import main
from ping_llm.data import synth
from ping_llm.data.geo import GeoDB, default_db_path
from ping_llm.errors import InputError
from ping_llm.knowledge import AddressKnowledge
from ping_llm.model import GPT, PREFIX_LEVELS, GPTConfig, KVCache, prefix_slots
from ping_llm.query.engine import Engine

pytestmark = pytest.mark.usefixtures("one_thread")

SRC, DST, OTHER = "193.0.14.129", "8.8.8.8", "1.1.1.1"
SRC6, DST6 = "2001:67c:2e8::2", "2001:4860:4860::8888"
T0 = 1_700_000_000
CONTEXT = [
    {"src": SRC, "dst": OTHER, "rtt_ms": 12.0, "time": T0},
    {"src": SRC6, "dst": DST6, "rtt_ms": None, "time": T0 + 30},
    {"src": SRC, "dst": DST, "rtt_ms": 13.5},
]


@pytest.fixture(scope="module")
def geolite():
    return AddressKnowledge.open()


def knowing_model(know, seed: int = 0, buckets: int = 64) -> GPT:
    """A small float64 GPT with prefix memory and knowledge whose random weights all matter
    (both start at zero in a fresh model, which would make every identity trivially true)."""
    torch.manual_seed(seed)
    c = GPTConfig(n_layer=2, n_embd=32, n_head=2, sequence_len=256, prefix_buckets=buckets,
                  knowledge_dim=knowledge.DENSE_DIM, knowledge_vocab=knowledge.KNOWLEDGE_VOCAB)
    m = GPT(c)
    with torch.no_grad():
        m.lm_head.weight.normal_(0.0, 0.3)
        for name in ("pte", "kproj", "kte"):
            m.transformer[name].weight.normal_(0.0, 1.0)
        for block in m.transformer.h:
            block.attn.c_proj.weight.normal_(0.0, 0.05)
            block.mlp.c_proj.weight.normal_(0.0, 0.05)
    m.knowledge = know
    return m.double().eval()


@pytest.fixture(scope="module")
def model64(geolite):
    return knowing_model(geolite)


def encode(ms) -> torch.Tensor:
    return torch.tensor([tk.encode_reference([tk.Measurement(*m) for m in ms])])


def full_forward_probs(model: GPT, toks, allowed) -> np.ndarray:
    with torch.no_grad():
        logits, _ = model(torch.tensor([list(toks)]))
    return torch.softmax(logits[0, -1, list(allowed)].double(), -1).numpy()


# ----------------------------------------------------------------------------------------------
# where memory and knowledge enter


def test_prefix_memory_has_one_row_per_level_of_each_address_and_none_elsewhere():
    toks = encode([(SRC, DST, 12.0, T0), (SRC6, DST6, -1.0)])
    slots = prefix_slots(toks, 1000)[0].numpy()
    version, n = (x[0].numpy() for x in tk.address_progress(toks))
    levels = np.flatnonzero(slots)
    expected = [i for i in range(toks.shape[1])
                if version[i] and n[i] in PREFIX_LEVELS[int(version[i])]]
    assert levels.tolist() == expected and len(levels) == 4 * 4  # four addresses, four levels
    level = (slots[levels] - 1) // 1000
    assert sorted(level[:8]) == [0, 0, 1, 1, 2, 2, 3, 3]  # IPv4: /8 /16 /24 /32 of src and dst
    assert sorted(level[8:]) == [4, 4, 5, 5, 6, 6, 7, 7]  # IPv6: /16 /32 /48 /64


def test_a_prefix_has_the_same_row_as_source_or_destination_and_in_any_field_order():
    a = prefix_slots(encode([(SRC, DST, 5.0)]), 4096)[0]
    order = (tk.FIELD_RESULT, tk.FIELD_TIME, tk.FIELD_DST, tk.FIELD_SRC)
    swapped = tk.encode_reference([tk.Measurement(DST, SRC, 5.0)], orders=[order])
    b = prefix_slots(torch.tensor([swapped]), 4096)[0]
    assert sorted(a[a > 0].tolist()) == sorted(b[b > 0].tolist())
    near = prefix_slots(encode([("193.0.14.1", DST, 5.0)]), 4096)[0]
    same, differ = set(a[a > 0].tolist()), set(near[near > 0].tolist())
    assert len(same & differ) == 3 + 4  # 193/8, 193.0/16, 193.0.14/24; all of 8.8.8.8
    assert len(same - differ) == 1  # only the /32 differs


def test_knowledge_sits_at_the_byte_that_completes_each_address(geolite):
    toks = encode([(SRC, DST, 12.0, T0), ("10.0.0.1", OTHER, -1.0), (SRC6, DST6, 30.0)])
    dense, ids = geolite.features(toks)
    version, n = tk.address_progress(toks)
    ends = tk.address_complete(version, n)[0]
    placed = (dense[0].abs().sum(-1) > 0) | (ids[0].sum(-1) > 0)
    assert not (placed & ~ends).any()  # nothing anywhere else
    info = geolite.db.locate([SRC, DST, "10.0.0.1", OTHER, SRC6, DST6])
    want_dense, want_ids = knowledge.encode(info)
    at = torch.nonzero(ends).flatten()
    np.testing.assert_allclose(dense[0, at].numpy(), want_dense, rtol=1e-6)
    assert ids[0, at].tolist() == want_ids.tolist()
    assert info["found"].tolist() == [True, True, False, True, True, True]
    assert dense[0, at[2]].abs().sum() == 0 and ids[0, at[2]].tolist() == [0, 0, 0]  # private
    assert want_dense[0, 0] == 1 and np.linalg.norm(want_dense[0, 1:4]) == pytest.approx(1)


def test_features_depend_only_on_the_address_not_on_its_context(geolite):
    alone, _ = geolite.features(encode([(SRC, DST, 1.0)]))
    later, _ = geolite.features(encode([(OTHER, "9.9.9.9", 7.0, T0), (SRC, DST, 1.0)]))
    pick = lambda d: d[0][d[0].abs().sum(-1) > 0]  # noqa: E731
    torch.testing.assert_close(pick(alone), pick(later)[2:])


def test_a_re_addressed_source_can_read_its_real_address_s_knowledge_for_a_while(geolite):
    """`aliases` (eval --readdress-sources, calibrate): inside, the new addresses (IPv4 and
    IPv6) read their real addresses' features and every other address its own; outside, each
    reads its own again."""
    new4, new6 = "9.9.9.9", "2a00:1450:4001::1"  # found by the database, elsewhere
    rows = lambda ms: geolite.features(encode(ms))[0][0]  # noqa: E731
    ends = lambda ms: rows(ms)[rows(ms).abs().sum(-1) > 0]  # noqa: E731
    real = ends([(SRC, DST, 1.0), (SRC6, DST6, 2.0)])
    renamed = [(new4, DST, 1.0), (new6, DST6, 2.0)]
    own = ends(renamed)
    assert not torch.equal(own, real)
    with geolite.aliases([new4, new6], [SRC, SRC6]):
        torch.testing.assert_close(ends(renamed), real, rtol=0, atol=0)
        assert torch.equal(ends([(DST, new4, 1.0)])[0], real[1])  # only the aliased addresses
    torch.testing.assert_close(ends(renamed), own, rtol=0, atol=0)



# ----------------------------------------------------------------------------------------------
# every path reads them as training does


def test_kv_cached_forward_in_any_pieces_equals_the_full_forward(model64):
    toks = encode([(SRC, DST, 12.0, T0), (SRC6, DST6, -1.0, T0 + 9), (SRC, OTHER, 3.0)])
    with torch.no_grad():
        full, _ = model64(toks)
        for cuts in ([1, 2, 7, 9, 30], [5, 6, 25, 26, 27, 40]):  # inside addresses too
            cache, parts, start = KVCache(model64.config, 1, toks.shape[1]), [], 0
            for end in [*cuts, toks.shape[1]]:
                parts.append(model64(toks[:, start:end], kv_cache=cache)[0])
                start = end
            torch.testing.assert_close(torch.cat(parts, 1), full, rtol=0, atol=1e-12)
        # a branched cache (expand, select) keeps each row's own address history
        cache = KVCache(model64.config, 1, toks.shape[1])
        model64(toks[:, :30], kv_cache=cache)
        rows = cache.expand(3).select([2, 0])
        out, _ = model64(toks[:, 30:].expand(2, -1), kv_cache=rows)
        torch.testing.assert_close(out, full[:, 30:].expand(2, -1, -1), rtol=0, atol=1e-12)


def test_training_features_given_to_forward_equal_the_ones_it_computes(model64):
    toks = encode([(SRC, DST, 12.0, T0), (OTHER, DST, 4.0)])
    with torch.no_grad():
        given, _ = model64(toks, feats=model64.address_features(toks))
        own, _ = model64(toks)
    torch.testing.assert_close(given, own, rtol=0, atol=0)


def test_engine_rtt_reads_the_model_exactly_with_memory_and_knowledge(model64):
    engine = Engine(model64)
    prefix = engine.query_tokens(SRC, DST, T0 + 100, CONTEXT)
    d = engine.rtt(SRC, DST, time=T0 + 100, context=CONTEXT)
    p_role = full_forward_probs(model64, prefix, [tk.RTT_START, tk.FAILED])
    assert d.p_failed == pytest.approx(p_role[1], abs=1e-9)
    p1 = full_forward_probs(model64, prefix + [tk.RTT_START], tk.BYTE0 + tk.CANON_B1)
    marginal = np.bincount(d.codes.astype(int) >> 8, weights=d.probs, minlength=256)
    np.testing.assert_allclose(marginal[tk.CANON_B1], p1, atol=1e-9)


def test_cidr_marginal_gives_each_completion_its_own_knowledge(model64):
    """193.0.14.128/31 -> 8.8.8.8/31: each of the 4 completions is scored with the features of
    its own full addresses, weighted by the model's probability of it."""
    engine = Engine(model64)
    total_pf, pw = 0.0, full_forward_probs(model64, engine.query_tokens(SRC, DST)[:5],
                                           [tk.BYTE0 + 128, tk.BYTE0 + 129])
    for s in (0, 1):
        src = f"193.0.14.{128 + s}"
        dw = full_forward_probs(model64, engine.query_tokens(src, DST)[:-1],
                                [tk.BYTE0 + 8, tk.BYTE0 + 9])
        for j, dst in enumerate(("8.8.8.8", "8.8.8.9")):
            total_pf += pw[s] * dw[j] * engine.rtt(src, dst).p_failed
    d = engine.rtt("193.0.14.128/31", "8.8.8.8/31")
    assert d.n_completions == 4 and d.p_failed == pytest.approx(total_pf, abs=1e-9)


def test_destination_beam_search_reads_the_memory_of_each_prefix(model64):
    engine = Engine(model64)
    found = engine.destinations(SRC, k=3, within="8.8.8.0/24", beam=256, with_rtt=False)
    toks = engine.query_tokens(SRC, "8.8.8.0")[:-1]
    p = full_forward_probs(model64, toks, range(tk.BYTE0, 267))
    top = np.argsort(-p)[:3]
    assert [d.dst for d in found] == [f"8.8.8.{i}" for i in top]
    np.testing.assert_allclose([d.p for d in found], p[top], rtol=1e-9)


# ----------------------------------------------------------------------------------------------
# runs with and without them


def save_run(model: GPT, run_dir, config: dict) -> None:
    checkpoint.save_checkpoint(run_dir, model_state=model.state_dict(), config=config,
                               optimizers=[], loader_states=[{}], rng_states=[{}], step=0)


def test_a_run_without_memory_or_knowledge_is_unchanged_and_old_configs_load(tmp_path):
    torch.manual_seed(0)
    plain = GPT(GPTConfig(n_layer=1, n_embd=32, n_head=2, sequence_len=64))
    old = {k: v for k, v in plain.config.to_dict().items()
           if k not in ("prefix_buckets", "knowledge_dim", "knowledge_vocab")}  # a 0.x run
    save_run(plain, tmp_path / "old", {"model": old, "train": {}})
    loaded, config = checkpoint.load_model(tmp_path / "old")
    assert config.prefix_buckets == 0 and config.knowledge_dim == 0 and loaded.knowledge is None
    toks = encode([(SRC, DST, 12.0, T0)])
    with torch.no_grad():
        torch.testing.assert_close(loaded(toks)[0], plain(toks)[0], rtol=0, atol=0)


def test_a_run_records_its_database_and_refuses_another(tmp_path, geolite, trained_run):
    model = knowing_model(geolite).float()
    config = {"model": model.config.to_dict(), "train": {}, "knowledge": geolite.describe()}
    save_run(model, tmp_path / "run", config)
    loaded, _ = checkpoint.load_model(tmp_path / "run")
    assert loaded.knowledge.describe()["sha256"] == geolite.db.sha256
    d = Engine.load(tmp_path / "run").rtt(SRC, DST)
    assert d.p_failed == pytest.approx(Engine(model).rtt(SRC, DST).p_failed, abs=1e-6)
    world_db = synth.geo_db_path(trained_run.results)  # a database of another build
    with pytest.raises(InputError, match="trained with GeoLite2-City built 2019-12-24"):
        Engine.load(tmp_path / "run", geo_db=world_db)
    assert main(["query", "rtt", "--run", str(tmp_path / "run"), SRC, DST,
                 "--geo-db", str(world_db)]) == 2


def test_train_with_memory_and_knowledge_then_query_through_the_cli(tmp_path, trained_run,
                                                                    capsys):
    """The real pipeline: the synthetic world's own database, a few steps, then every verb."""
    world_db = synth.geo_db_path(trained_run.results)
    run = tmp_path / "run"
    assert main(["train", "--data", str(trained_run.data_dir), "--out", str(run), "--steps", "3",
                 "--model", "sequence_len=256", "--prefix-buckets", "256", "--knowledge",
                 "--geo-db", str(world_db), "--eval-every", "0", "--log-every", "1"]) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["prefix_buckets"] == 256
    assert config["model"]["knowledge_dim"] == knowledge.DENSE_DIM
    assert config["knowledge"]["sha256"] == GeoDB.open(world_db).sha256
    loaded, _ = checkpoint.load_model(run)
    assert loaded.transformer.pte.weight.abs().sum() > 0  # the memory trained
    assert loaded.transformer.kproj.weight.abs().sum() > 0  # and so did the knowledge
    world = synth.World.load(trained_run.results)
    src, dst = world.addr4[0], world.addr4[-1]
    capsys.readouterr()
    assert main(["query", "rtt", "--run", str(run), src, dst, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert 0 <= out["p_failed"] <= 1 and out["median_ms"] > 0
    assert main(["query", "destinations", "--run", str(run), src, "--k", "2", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 2
    # resuming with another database is refused before any step
    assert main(["train", "--data", str(trained_run.data_dir), "--out", str(run), "--steps", "4",
                 "--resume", "--geo-db", default_db_path()]) == 2
    assert "pass --geo-db with the run's database" in capsys.readouterr().err


def test_readdressed_contexts_can_keep_the_knowledge_of_their_real_addresses(tmp_path,
                                                                             trained_run):
    """--readdress-knowledge: a re-addressed source reads its real address's features. With
    nothing re-addressed the run is the plain knowledge run; with every source re-addressed it
    is not (the features differ); without knowledge there is none to keep (recorded as off)."""
    from ping_llm.config import TrainConfig
    from ping_llm.train import train

    base = dict(data_dir=str(trained_run.data_dir), model={"sequence_len": 256}, steps=2,
                eval_every=0, knowledge=True, geo_db=str(synth.geo_db_path(trained_run.results)))

    def weights(name, **kw):
        train(TrainConfig(out_dir=str(tmp_path / name), **{**base, **kw}))
        return checkpoint.load_model(tmp_path / name)[0].state_dict()

    def same(a, b):
        return all(torch.equal(a[k], b[k]) for k in a)

    plain = weights("plain", readdress_src=0.0, readdress_knowledge=False)
    assert same(plain, weights("kept0", readdress_src=0.0, readdress_knowledge=True))
    moved = weights("moved", readdress_src=1.0, readdress_knowledge=False)
    kept = weights("kept", readdress_src=1.0, readdress_knowledge=True)
    assert not same(moved, kept) and not same(plain, kept)
    assert json.loads((tmp_path / "kept" / "config.json").read_text())["train"][
        "readdress_knowledge"] is True
    assert TrainConfig(**{**base, "knowledge": False}).readdress_knowledge is False


def test_knowledge_dropout_reads_whole_contexts_as_unplaced_and_is_seeded():
    """knowledge.drop: a dropped row has the features of an address the database does not place
    (zeros, id row 0) at every position; kept rows are untouched; the rows depend on the seed."""
    dense = torch.rand(64, 5, knowledge.DENSE_DIM) + 0.1
    ids = torch.randint(1, knowledge.KNOWLEDGE_VOCAB, (64, 5, knowledge.N_IDS))
    d1, i1 = knowledge.drop((dense, ids), 0.5, seed=7)
    dropped = (d1 == 0).all(2).all(1)  # (B,)
    assert ((i1 == 0).all(2).all(1) == dropped).all()
    assert torch.equal(d1[~dropped], dense[~dropped]) and torch.equal(i1[~dropped], ids[~dropped])
    assert 16 <= int(dropped.sum()) <= 48
    assert torch.equal(knowledge.drop((dense, ids), 0.5, seed=7)[0], d1)
    assert not torch.equal(knowledge.drop((dense, ids), 0.5, seed=8)[0], d1)
    assert torch.equal(knowledge.drop((dense, ids), 0.0, seed=7)[1], ids)
    assert not knowledge.drop((dense, ids), 1.0, seed=7)[0].any()


def test_a_run_with_every_context_dropped_learns_nothing_from_the_database(tmp_path, trained_run):
    """--knowledge-dropout 1: the knowledge weights get no gradient except the unknown id's row
    (they start at zero and stay there); a fraction trains differently from none and resumes
    exactly; without knowledge there is nothing to drop (recorded as 0)."""
    from ping_llm.config import TrainConfig
    from ping_llm.train import train

    base = dict(data_dir=str(trained_run.data_dir), model={"sequence_len": 256}, steps=2,
                eval_every=0, geo_db=str(synth.geo_db_path(trained_run.results)))

    def weights(name, **kw):
        train(TrainConfig(out_dir=str(tmp_path / name), **{**base, **kw}))
        return checkpoint.load_model(tmp_path / name)[0].state_dict()

    none = weights("none", knowledge_dropout=0.0)
    every = weights("every", knowledge_dropout=1.0)
    assert none["transformer.kproj.weight"].any() and none["transformer.kte.weight"][1:].any()
    assert not every["transformer.kproj.weight"].any()
    assert not every["transformer.kte.weight"][1:].any()
    half = weights("half", knowledge_dropout=0.5)
    assert not torch.equal(none["transformer.wte.weight"], half["transformer.wte.weight"])
    train(TrainConfig(out_dir=str(tmp_path / "stop"), stop_at=1, knowledge_dropout=0.5, **base))
    resumed = weights("stop", knowledge_dropout=0.5, resume=True)
    assert all(torch.equal(half[k], resumed[k]) for k in half)
    assert TrainConfig(**{**base, "knowledge": False, "knowledge_dropout": 0.5}
                       ).knowledge_dropout == 0.0
