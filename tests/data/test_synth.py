"""The synthetic Internet: deterministic RIPE-Atlas-format output whose ground truth is exact.

Covers synth.py (the world and its truth) and synth_atlas.py (schedules and the JSON writer)
together: the truth is checked against the written JSON, so both share one generated world.

Most tests share one small generated world (40 probes, 1 day, ~150k packets). Expected values are
derived from the generated JSON itself (or from the ingested canonical table) and compared with the
world's ground truth, so a bug in either side shows up.
"""

from __future__ import annotations

import gzip
import ipaddress
import json
from collections import defaultdict

import numpy as np
import orjson
import pytest
from scipy import stats

from ping_llm import cli, tokens
from ping_llm.data import ingest, schema, synth, synth_atlas
from ping_llm.errors import InputError

SMALL = synth.SynthConfig(seed=7, probes=40, days=1.0)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "small.jsonl.gz"
    summary = synth_atlas.generate(SMALL, out, progress=False)
    with gzip.open(out, "rb") as fh:
        records = [orjson.loads(line) for line in fh]
    return out, summary, records, synth.World.load(out)


@pytest.fixture(scope="module")
def packets(small):
    """One row per non-dup packet, straight from the JSON: from, dst, af, time, rtt (-1 lost)."""
    _, _, records, _ = small
    cols = defaultdict(list)
    for r in records:
        for e in r["result"]:
            if e.get("dup"):
                continue
            cols["src"].append(r["from"])
            cols["dst"].append(r["dst_addr"])
            cols["t"].append(r["timestamp"])
            cols["prb"].append(r["prb_id"])
            cols["msm"].append(r["msm_id"])
            cols["rtt"].append(e.get("rtt", -1.0))
    return {k: np.array(v) for k, v in cols.items()}


@pytest.fixture(scope="module")
def canonical(small, tmp_path_factory):
    out, _, _, _ = small
    rep = ingest.ingest([str(out)], tmp_path_factory.mktemp("canon"), progress=False)
    return rep, schema.read_canonical(rep.outputs)


# ----------------------------------------------------------------------------------------------
# determinism and format


def test_same_seed_gives_byte_identical_output_and_another_seed_differs(tmp_path):
    cfg = synth.SynthConfig(seed=3, probes=12, days=0.25)
    a, b, c = tmp_path / "a.jsonl.gz", tmp_path / "b.jsonl.gz", tmp_path / "c.jsonl.gz"
    synth_atlas.generate(cfg, a, progress=False)
    synth_atlas.generate(cfg, b, progress=False)
    synth_atlas.generate(synth.SynthConfig(seed=4, probes=12, days=0.25), c, progress=False)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
    assert synth.geo_db_path(a).read_bytes() == synth.geo_db_path(b).read_bytes()
    assert synth.World(cfg).fingerprint() == synth.World.load(a).fingerprint()
    assert synth.World(cfg).fingerprint() != synth.World.load(c).fingerprint()


def test_output_is_the_same_whatever_the_window_results_are_generated_in(tmp_path, monkeypatch):
    # Memory is bounded by generating a time window at a time; every draw comes from where it
    # would be in one pass, so the bytes do not depend on the window size.
    cfg = synth.SynthConfig(seed=5, probes=16, days=0.5)
    one, many = tmp_path / "one.jsonl", tmp_path / "many.jsonl"
    s1 = synth_atlas.generate(cfg, one, progress=False)
    monkeypatch.setattr(synth_atlas, "WINDOW_RESULTS", 500)
    s2 = synth_atlas.generate(cfg, many, progress=False)
    assert s1["results"] > 20 * 500  # so that the second run really took 20+ windows
    assert one.read_bytes() == many.read_bytes()
    assert {k: v for k, v in s1.items() if k not in ("out", "world", "geo_db", "seconds")} == \
        {k: v for k, v in s2.items() if k not in ("out", "world", "geo_db", "seconds")}
    times = [orjson.loads(line)["timestamp"] for line in many.read_bytes().splitlines()]
    assert times == sorted(times) and s2["first_timestamp"] == times[0]


def test_generated_json_ingests_with_zero_rejects_one_row_per_packet(small, packets, canonical):
    _, summary, _, _ = small
    rep, tab = canonical
    assert rep.rejected == 0, rep.rejects
    assert rep.rows == tab.num_rows == len(packets["rtt"]) == summary["packets"]
    assert rep.failed == int((packets["rtt"] < 0).sum()) == summary["failed_packets"]
    # NAT-aware source identity: the canonical source is the public `from`, never a LAN address.
    assert sorted(set(tab.column("src_addr").to_pylist())) == sorted(set(packets["src"]))
    assert not any(ipaddress.ip_address(a).is_private for a in set(packets["src"]))


def test_results_have_the_ripe_atlas_ping_shape(small):
    _, _, records, world = small
    keys = {"fw", "lts", "dst_name", "dst_addr", "src_addr", "from", "af", "proto", "size", "sent",
            "rcvd", "dup", "min", "max", "avg", "result", "prb_id", "msm_id", "msm_name",
            "timestamp", "type", "stored_timestamp"}
    start, end = SMALL.start, SMALL.start + SMALL.days * 86400
    times = [r["timestamp"] for r in records]
    assert times == sorted(times) and start <= times[0] and times[-1] < end
    kind = world.kind[world.resolve([r["from"] for r in records])[0]]
    for r, k in zip(records, kind, strict=True):
        assert keys <= r.keys(), keys - r.keys()
        assert (r["type"], r["proto"], r["msm_name"]) == ("ping", "ICMP", "Ping")
        rtts = [e["rtt"] for e in r["result"] if "rtt" in e and not e.get("dup")]
        assert r["sent"] == sum(not e.get("dup") for e in r["result"])
        assert r["rcvd"] == len(rtts) and r["dup"] == sum(bool(e.get("dup")) for e in r["result"])
        if rtts:
            assert (r["min"], r["max"]) == (min(rtts), max(rtts)) and "ttl" in r
            assert r["avg"] == pytest.approx(sum(rtts) / len(rtts), abs=1e-9)
        else:
            assert r["min"] == r["max"] == r["avg"] == -1
        src, frm, dst = (ipaddress.ip_address(r[k]) for k in ("src_addr", "from", "dst_addr"))
        assert src.version == frm.version == dst.version == r["af"]
        assert frm.is_global and dst.is_global and r["stored_timestamp"] >= r["timestamp"]
        if k == synth.HOME and r["af"] == 4:
            assert src.is_private  # NAT'd home probe
        else:
            assert src == frm  # anchors, and IPv6 (no NAT)


def test_schedules_builtin_every_240s_user_intervals_and_one_offs(small):
    _, _, records, _ = small
    by = defaultdict(list)
    for r in records:
        by[(r["msm_id"], r["prb_id"])].append(r["timestamp"])
    builtin = [np.diff(v) for (m, _), v in by.items() if m == 1001 and len(v) > 1]
    assert len(builtin) == SMALL.probes
    assert all(np.all((d >= 237) & (d <= 243)) for d in builtin)
    steps = {r.get("step") for r in records}
    assert {240, 900} <= steps and len(steps - {240, 900, None}) >= 3
    assert any("step" not in r for r in records)  # one-off measurements
    v6 = [r for r in records if r["af"] == 6]
    assert 0.05 < len(v6) / len(records) < 0.6
    v4_probes = {r["prb_id"] for r in records if r["af"] == 4}
    assert {r["prb_id"] for r in v6} <= v4_probes  # IPv6 only from dual-stack probes


# ----------------------------------------------------------------------------------------------
# ground truth


def test_generated_rtts_follow_the_ground_truth_distribution(canonical):
    """Probability integral transform: F_truth(rtt) of every reply must be Uniform(0, 1)."""
    _, tab = canonical
    rtt = tab.column("rtt").to_numpy()
    t = tab.column("event_time").cast("int64").to_numpy()
    src, dst = tab.column("src_addr").to_numpy(False), tab.column("dst_addr").to_numpy(False)
    ok = np.flatnonzero(rtt >= 0)
    world = synth.World(SMALL)
    sub = np.random.default_rng(0).choice(ok, 6000, replace=False)
    truth = world.truth(src[sub], dst[sub], t[sub])
    u = truth.cdf(rtt[sub][:, None])[:, 0]
    assert stats.kstest(u, "uniform").pvalue > 1e-3
    # ... and per pair, for the busiest pairs (each pooled over its own times).
    pair = np.char.add(src[ok].astype(str), np.char.add(" ", dst[ok].astype(str)))
    names, counts = np.unique(pair, return_counts=True)
    for name in names[np.argsort(-counts)[:4]]:
        rows = ok[pair == name][:1500]
        tr = world.truth(src[rows], dst[rows], t[rows])
        assert stats.kstest(tr.cdf(rtt[rows][:, None])[:, 0], "uniform").pvalue > 1e-3, name
    # A wrong law must fail the same test: shift the truth by 1 ms.
    truth.loc += 1.0
    assert stats.kstest(truth.cdf(rtt[sub][:, None])[:, 0], "uniform").pvalue < 1e-6


def test_failures_match_the_truth(packets, small):
    _, _, _, world = small
    truth = world.truth(packets["src"], packets["dst"], packets["t"])
    lost = packets["rtt"] < 0
    expected, sd = truth.p_fail.sum(), np.sqrt((truth.p_fail * (1 - truth.p_fail)).sum())
    assert abs(lost.sum() - expected) < 4 * sd, (lost.sum(), expected, sd)
    assert 0.01 < lost.mean() < 0.2
    certain = truth.p_fail == 1.0  # filtered destinations and probe outages
    assert certain.any() and lost[certain].all()
    mid = (truth.p_fail > 0.05) & (truth.p_fail < 1)  # rate-limited destinations, flaky IPv6
    assert abs(lost[mid].sum() - truth.p_fail[mid].sum()) < 4 * np.sqrt(
        (truth.p_fail[mid] * (1 - truth.p_fail[mid])).sum()) + 1


def test_truth_on_the_token_grid_is_the_law_of_rtt_to_code(small):
    _, _, _, world = small
    home, anchor = np.flatnonzero(world.kind == synth.HOME)[0], np.flatnonzero(
        world.kind == synth.ANCHOR)[0]
    server = np.flatnonzero((world.kind == synth.SERVER) & (world.filt == 0))[0]
    s, d = np.array([home, home, anchor]), np.array([server, anchor, server])
    truth, _ = world.truth_idx(s, d, 4, SMALL.start + np.array([3600, 72000, 40000]))
    pdf = truth.pdf_codes()
    assert np.allclose(pdf.sum(axis=1), 1.0) and (pdf >= 0).all()
    assert pdf[:, ~np.isfinite(tokens.RTT_GRID_MS)].sum() == 0
    b1 = truth.pdf_byte1()
    assert np.allclose(b1, pdf.reshape(3, 256, 256).sum(axis=2))
    rng = np.random.default_rng(1)
    for i in range(3):
        x = truth[i].sample(rng, np.zeros(200_000, np.int64))
        assert stats.kstest(x, lambda v, i=i: truth[i].cdf(np.atleast_1d(v))[0]).pvalue > 1e-3
        emp = np.bincount(tokens.rtt_to_code(x), minlength=65536) / len(x)
        assert 0.5 * np.abs(emp - pdf[i]).sum() < 0.05  # per code
        emp1 = np.bincount(tokens.rtt_to_code(x) >> 8, minlength=256) / len(x)
        assert 0.5 * np.abs(emp1 - b1[i]).sum() < 0.01  # per byte1 bin
        q = truth[i].quantiles([0.05, 0.5, 0.95])[0]
        assert np.allclose(truth[i].cdf(q[None, :])[0], [0.05, 0.5, 0.95], atol=1e-6)
        assert np.allclose(q, np.quantile(x, [0.05, 0.5, 0.95]), rtol=0.01)
        se = x.std() / np.sqrt(len(x))
        assert abs(truth[i].mean()[0] - x.mean()) < 5 * se
    assert np.allclose(truth.kl(truth.p_fail, pdf), 0.0, atol=1e-9)
    assert (truth.kl(truth.p_fail, np.roll(pdf, 64, axis=1)) > 0.1).all()


def test_anycast_is_near_from_everywhere_unicast_is_not(packets, small):
    _, _, records, world = small
    anycast_addr = {r["dst_addr"] for r in records if r["msm_id"] == 1001}
    assert len(anycast_addr) == 1  # one address for everyone
    ok = packets["rtt"] >= 0
    v4 = np.char.find(packets["dst"].astype(str), ":") < 0
    any_med, uni_med = [], []
    kinds = {a: world.kind[world.resolve(a)[0][0]] for a in set(packets["dst"])}
    is_uni = np.array([kinds[a] in (synth.SERVER, synth.ANCHOR) for a in packets["dst"]])
    for p in np.unique(packets["prb"]):
        mine = (packets["prb"] == p) & ok & v4
        a = packets["rtt"][mine & (packets["msm"] == 1001)]
        u = packets["rtt"][mine & is_uni]
        if len(a) and len(u):
            any_med.append(np.median(a))
            uni_med.append(np.median(u))
    assert len(any_med) >= 30
    assert np.median(any_med) < 0.5 * np.median(uni_med)
    # Anycast beats any single site: a unicast server in the best of its sites would be farther
    # (by pure great-circle propagation alone) for the median probe.
    svc = world.sites[0][world.sites[0] >= 0]
    probes = world.resolve(sorted({a for a in packets["src"] if ":" not in a}))[0]
    lat, lon = world.lat[world.city[probes]], world.lon[world.city[probes]]
    one_site = [np.median(2 * synth._km(lat, lon, world.lat[c], world.lon[c]) / synth.KM_PER_MS)
                for c in svc]
    assert np.median(any_med) < min(one_site)


def test_evening_is_slower_than_night_in_probe_local_time(packets, small):
    _, _, _, world = small
    ok = (packets["rtt"] >= 0) & (packets["msm"] == 1001)
    e = world.resolve(packets["src"][ok])[0]
    home = world.kind[e] == synth.HOME
    utc = world.cities["utc"][world.city[e]]
    hour = np.mod(packets["t"][ok] / 3600 + utc, 24)
    diffs = []
    for p in np.unique(packets["prb"][ok][home]):
        mine = (packets["prb"][ok] == p) & home
        eve = packets["rtt"][ok][mine & (hour >= 19) & (hour < 23)]
        night = packets["rtt"][ok][mine & (hour >= 2) & (hour < 6)]
        if len(eve) > 30 and len(night) > 30:
            diffs.append(np.median(eve) - np.median(night))
    assert len(diffs) >= 25
    assert np.mean(np.array(diffs) > 0) > 0.8 and np.median(diffs) > 0.5


def test_address_prefixes_carry_location(small):
    _, _, _, world = small
    tab = world.endpoint_table()
    fixed = [i for i, k in enumerate(tab["kind"]) if k != "anycast"]
    for width4, width6, key in ((20, 40, "city"), (16, 32, "asn")):
        owner = {}
        for i in fixed:
            nets = [ipaddress.ip_network(f"{tab['addr4'][i]}/{width4}", strict=False)]
            if tab["addr6"][i]:
                nets.append(ipaddress.ip_network(f"{tab['addr6'][i]}/{width6}", strict=False))
            for net in nets:
                assert owner.setdefault(net, tab[key][i]) == tab[key][i], (net, key)
    # And the world is not trivial: many networks and cities.
    assert len(set(tab["asn"])) > 30 and len(set(tab["city"])) > 20


def test_the_world_publishes_a_geolocation_database_that_is_right_but_not_exact(small):
    """Like a real one: every probe and server is in it, most within ~100 km of their city,
    about GEO_MISPLACED of the networks at their AS's first city instead; anycast is not in it."""
    from ping_llm.data.geo import GeoDB, great_circle_km

    _, summary, _, world = small
    db = GeoDB.open(summary["geo_db"])
    assert db.name == "ping-llm-synthetic-world-City" and summary["geo_db"].endswith(".geo.mmdb")
    tab = world.endpoint_table()
    fixed = [i for i, k in enumerate(tab["kind"]) if k != "anycast"]
    for family in ("addr4", "addr6"):
        rows = [i for i in fixed if tab[family][i]]
        info = db.locate([tab[family][i] for i in rows])
        assert info["found"].all()
        km = great_circle_km(info["lat"], info["lon"], tab["lat"][rows], tab["lon"][rows])
        assert 0.6 < np.mean(km < 150) < 0.98, family  # near their city, but not all of them
        assert np.mean(info["country"] == np.array(tab["country"])[rows]) > 0.8
        assert (info["asn"] >= 64512).all() and set(info["continent"]) <= {
            "EU", "NA", "AS", "SA", "AF"}
    anycast = [tab["addr4"][i] for i, k in enumerate(tab["kind"]) if k == "anycast"]
    assert not db.locate(anycast)["found"].any()


def test_renumbered_probes_keep_their_prefix_and_resolve_to_one_probe(tmp_path):
    cfg = synth.SynthConfig(seed=1, probes=10, days=4, renumber_frac=1.0)
    out = tmp_path / "r.jsonl"
    synth_atlas.generate(cfg, out, progress=False)
    froms = defaultdict(set)
    for line in out.read_bytes().splitlines():
        r = orjson.loads(line)
        if r["af"] == 4:
            froms[r["prb_id"]].add(r["from"])
    world = synth.World.load(out)
    moved = [a for a in froms.values() if len(a) > 1]
    assert moved
    for addrs in moved:
        idx, _ = world.resolve(sorted(addrs))
        assert len(set(idx)) == 1
        assert len({ipaddress.ip_network(f"{a}/20", strict=False) for a in addrs}) == 1


def test_world_round_trips_and_bad_queries_are_input_errors(small, tmp_path):
    out, summary, records, world = small
    rebuilt = synth.World(SMALL)
    r = next(r for r in records if r["af"] == 4 and r["rcvd"])
    a = world.truth(r["from"], r["dst_addr"], r["timestamp"])
    b = rebuilt.truth([r["from"]] * 2, [r["dst_addr"]] * 2, r["timestamp"])
    assert len(b) == 2 and a.loc[0] == b.loc[1] and a.p_fail[0] == b.p_fail[0]
    assert json.loads(synth.world_path(out).read_text())["summary"]["packets"] == summary["packets"]
    v6 = next(r for r in records if r["af"] == 6)
    anycast = next(r for r in records if r["msm_id"] == 1001)["dst_addr"]
    for bad in (("192.168.1.1", r["dst_addr"]),  # a LAN address: sources are public `from`s
                ("192.0.2.1", r["dst_addr"]), ("not-an-ip", r["dst_addr"]),
                (r["from"], v6["dst_addr"]), (anycast, r["from"])):
        with pytest.raises(InputError):
            world.truth(*bad, r["timestamp"])
    with pytest.raises(InputError):
        world.truth([r["from"]] * 3, [r["dst_addr"]] * 2, r["timestamp"])
    doc = json.loads(synth.world_path(out).read_text())
    doc["fingerprint"] = "0" * 16
    tampered = tmp_path / "t.world.json"
    tampered.write_text(json.dumps(doc))
    with pytest.raises(InputError, match="different generator"):
        synth.World.load(tampered)


@pytest.mark.parametrize("kw", [dict(probes=1), dict(days=0), dict(seed=-1), dict(anchor_frac=2),
                                dict(tail_alpha=1.0), dict(builtin_services=9)])
def test_bad_config_is_an_input_error(kw):
    with pytest.raises(InputError):
        synth.SynthConfig(**kw)


def test_default_world_is_about_a_million_packets():
    world = synth.World(synth.SynthConfig())
    msms, streams = synth_atlas._schedule(world, np.random.default_rng(0))
    res = streams.results(-np.inf, np.inf)
    packets = sum(msms[m][7] for m in res["m"].tolist())
    assert 500_000 <= packets <= 1_500_000
    assert len(np.unique(res["e"])) == 120 and len({msms[m][1] for m in res["m"]}) > 250


def test_cli_synth_writes_results_and_a_json_summary(tmp_path, capsys):
    out = tmp_path / "cli.jsonl"
    argv = ["synth", "--out", str(out), "--probes", "8", "--days", "0.1", "--seed", "2", "--json",
            "--no-progress"]
    assert cli.main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["packets"] == sum(len(orjson.loads(x)["result"]) - orjson.loads(x)["dup"]
                                     for x in out.read_bytes().splitlines())
    assert synth.world_path(out).exists()
    assert cli.main(["synth", "--out", str(out), "--probes", "1"]) == 2
    assert cli.main(["synth", "--out", str(tmp_path / "no" / "x.jsonl")]) == 2
    assert cli.main(["synth", "--out", str(out), "--start", "yesterday"]) == 2
