"""RIPE Atlas ping results -> canonical rows, checked on the real samples in
../shared/data against counts derived here, independently, from the raw JSON; plus every firmware
shape, the NAT source rule, hostile input, idempotent re-runs and the CLI's exit codes."""

from __future__ import annotations

import bz2
import functools
import gzip
import io
import ipaddress
import json
import os
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import orjson
import pyarrow.parquet as pq
import pytest
import zstandard

from ping_llm.cli import main
from ping_llm.data import ingest, ripe, seen, streams
from ping_llm.data.schema import CANONICAL_SCHEMA, read_canonical, validate

RIPE_FOLDERS = [
    "ripe_atlas_menog_2019",
    "ripe_atlas_builtin_v4v6_2019",
    "ripe_atlas_africa_2021",
    "ripe_atlas_misc_small",
]
FIXTURES = [
    "ripe_atlas_tools_ping_fixtures.jsonl",
    "ripe_atlas_monitor_ping_fixtures.jsonl",
    "extra_real_edge_cases.jsonl",
]


# ----------------------------------------------------------------------------------------------
# the independent oracle: a few lines over the raw JSON (modern firmware, auto source rule)


@functools.cache
def _is_global(address: str) -> bool:
    return ipaddress.ip_address(address).is_global


def expected(objs) -> dict:
    e = dict(rows=0, replies=0, failed=0, errors=0, dups=0, no_dst=0, no_src=0, rtt_sum=0.0)
    for o in objs:
        if not o.get("dst_addr"):
            e["no_dst"] += 1
            continue
        sa = o.get("src_addr")
        src = sa if sa and _is_global(sa) else o.get("from")
        if not src:
            e["no_src"] += 1
            continue
        for p in o["result"]:
            if p.get("dup"):
                e["dups"] += 1
            elif "rtt" in p:
                e["replies"] += 1
                e["rtt_sum"] += p["rtt"]
            else:
                e["failed"] += 1
                e["errors"] += "error" in p
    e["rows"] = e["replies"] + e["failed"]
    return e


def raw_objs(path: Path) -> list[dict]:
    data = path.read_bytes()
    if path.suffix == ".gz":
        data = gzip.decompress(data)
    return [orjson.loads(line) for line in data.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def real(shared_data, tmp_path_factory):
    """All four real RIPE folders ingested once (one core), with the oracle's numbers."""
    out = tmp_path_factory.mktemp("real")
    inputs = [shared_data / f / "raw.jsonl.gz" for f in RIPE_FOLDERS]
    rep = ingest.ingest(inputs, out, progress=False)
    return {
        f: (fr, expected(raw_objs(p)), read_canonical(fr["output"]))
        for f, p, fr in zip(RIPE_FOLDERS, inputs, rep.files, strict=True)
    }


@pytest.mark.parametrize("folder", RIPE_FOLDERS)
def test_real_folder_counts_match_the_raw_json(real, folder):
    rep, exp, table = real[folder]
    assert rep["rejects"] == {}
    assert rep["rows"] == table.num_rows == exp["rows"]
    assert rep["replies"] == exp["replies"]
    assert rep["failed"] == exp["failed"]
    assert rep["errors"] == exp["errors"]
    assert rep["dups"] == exp["dups"]
    assert rep["skipped"].get("no_dst_addr", 0) == exp["no_dst"]
    assert rep["skipped"].get("no_source", 0) == exp["no_src"]
    rtt = table.column("rtt").to_numpy()
    assert rtt[rtt >= 0].sum() == pytest.approx(exp["rtt_sum"], rel=1e-12)
    assert ((rtt >= 0) | (rtt == -1.0)).all()
    validate(table)  # every address parses and matches ip_version


def test_real_counts_agree_with_provenance(real):
    # Cross-check the oracle itself against the numbers published in PROVENANCE.md.
    rep, exp, _ = real["ripe_atlas_africa_2021"]
    assert exp["replies"] + exp["failed"] + exp["dups"] + 30 == 13485  # 10 no-source results
    assert rep["dups"] == 6 and rep["errors"] == 132 and rep["results"] == 4587
    rep, exp, table = real["ripe_atlas_builtin_v4v6_2019"]
    assert rep["results"] == 94848 and rep["dups"] == 39
    assert set(table.column("ip_version").unique().to_pylist()) == {4, 6}


def test_real_sources_are_public_or_the_controller_address(real):
    _, _, table = real["ripe_atlas_menog_2019"]
    srcs = set(table.column("src_addr").unique().to_pylist())
    private = [s for s in srcs if not ipaddress.ip_address(s).is_global]
    assert private == []  # 74% of menog's src_addr are RFC 1918: all replaced by `from`
    assert table.schema == CANONICAL_SCHEMA


def test_fixture_results_match_the_raw_json(shared_data, tmp_path):
    objs = []
    for name in FIXTURES:
        objs += [o["result"] for o in raw_objs(shared_data / "ping_fixtures" / name)]
    src = tmp_path / "fixtures.jsonl"
    src.write_bytes(b"\n".join(orjson.dumps(o) for o in objs))
    rep = ingest.ingest([src], tmp_path / "out", progress=False)
    exp = expected(objs)
    assert rep.rejects == {}
    assert (rep.rows, rep.replies, rep.failed, rep.errors, rep.dups) == (
        exp["rows"], exp["replies"], exp["failed"], exp["errors"], exp["dups"])
    assert rep.skipped.get("no_source", 0) == exp["no_src"]
    assert rep.results_empty >= 1  # the hand-made result with rcvd 0 and an empty list
    table = read_canonical(tmp_path / "out")
    assert table.num_rows == exp["rows"]
    # The anchor pinging itself (0.13 ms) and the 11.4 s outlier survive untouched.
    rtts = table.column("rtt").to_pylist()
    assert min(r for r in rtts if r >= 0) < 0.2 and max(rtts) > 11_000


def test_fixture_wrappers_are_not_results_and_are_rejected_cleanly(shared_data, tmp_path):
    paths = [shared_data / "ping_fixtures" / n for n in FIXTURES]
    n_lines = sum(len(raw_objs(p)) for p in paths)
    rej = tmp_path / "rej.jsonl"
    rep = ingest.ingest(paths, tmp_path / "out", rejects=rej, progress=False)
    assert rep.rows == 0 and rep.rejects == {"missing_timestamp": n_lines}
    records = [json.loads(x) for x in rej.read_text().splitlines()]
    assert len(records) == n_lines
    assert {r["line"] for r in records if r["source"].endswith(FIXTURES[1])} == {1, 2, 3, 4, 5}


def test_netlatency_tsv_is_not_ripe_json_and_is_rejected_line_by_line(shared_data, tmp_path):
    path = shared_data / "netlatency_seattle_planetlab" / "seattle_median_over_time.tsv.gz"
    n_lines = sum(1 for ln in gzip.decompress(path.read_bytes()).splitlines() if ln.strip())
    rep = ingest.ingest([path], tmp_path / "out", progress=False)
    assert rep.rows == 0 and rep.rejects == {"malformed_json": n_lines}


# ----------------------------------------------------------------------------------------------
# firmware shapes


def rows(obj, mode="auto"):
    return ripe.parse_result(obj, mode).rows


def test_fw1_summary_only_result_keeps_min_max_and_mean():
    fw1 = {"addr": "178.63.78.16", "avg": 20.126, "dup": 0, "from": "62.194.83.50", "fw": 1,
           "max": 20.3, "min": 19.938, "msm_id": 1000047, "name": "atlas.ripe.net",
           "prb_id": 165, "rcvd": 3, "sent": 3, "size": 56, "timestamp": 1332938930}
    r = rows(fw1)
    vals = sorted(x["rtt"] for x in r)
    assert len(r) == 3 and vals[0] == 19.938 and vals[-1] == 20.3
    assert sum(vals) / 3 == pytest.approx(20.126)
    assert {x["dst_addr"] for x in r} == {"178.63.78.16"} and r[0]["ip_version"] == 4
    assert r[0]["src_addr"] == "62.194.83.50" and r[0]["size"] is None  # fw < 4460: unknown
    lost = rows({**fw1, "sent": 5, "rcvd": 2})
    assert sorted(x["rtt"] for x in lost) == [-1.0, -1.0, -1.0, 19.938, 20.3]


def test_string_typed_numbers_of_old_firmware():
    old = {"fw": "4400", "addr": "2001:7fd::1", "mode": "ICMP6", "from": "2001:67c:2e8::2",
           "srcaddr": "2001:67c:2e8::2", "timestamp": "1340000000", "prb_id": "21",
           "msm_id": "2001", "size": "56", "result": [{"rtt": "2.172"}, {"x": "*"}]}
    r = rows(old)
    assert [x["rtt"] for x in r] == [2.172, -1.0]
    assert r[0]["ip_version"] == 6 and r[0]["prb_id"] == 21 and r[0]["msm_id"] == 2001
    assert r[0]["event_time"].timestamp() == 1340000000


def test_per_packet_source_address_and_ttl():
    res = {"fw": 4610, "af": 4, "dst_addr": "193.0.14.129", "src_addr": "193.0.0.10",
           "from": "193.0.0.10", "timestamp": 1400000000, "type": "ping",
           "result": [{"rtt": 1.0, "ttl": 57}, {"rtt": 2.0, "src_Addr": "193.0.0.11"},
                      {"rtt": 3.0, "srcaddr": "192.168.1.5"}, {"rtt": 4.0}]}
    auto = [(x["src_addr"], x["rtt"]) for x in rows(res)]
    # public per-packet source wins; a private one falls back to the result's identity
    assert auto == [("193.0.0.10", 1.0), ("193.0.0.11", 2.0), ("193.0.0.10", 3.0),
                    ("193.0.0.10", 4.0)]
    assert [x["src_addr"] for x in rows(res, "src_addr")][2] == "192.168.1.5"
    assert {x["src_addr"] for x in rows(res, "from")} == {"193.0.0.10"}


def test_size_is_normalised_like_ripe_sagan():
    base = {"af": 4, "dst_addr": "8.8.8.8", "from": "8.8.4.4", "timestamp": 1400000000,
            "size": 48, "proto": "ICMP", "result": [{"rtt": 1.0}]}
    assert rows({**base, "fw": 4500})[0]["size"] == 40  # included the ICMP header
    assert rows({**base, "fw": 4700})[0]["size"] == 48
    assert rows({**base, "fw": 4420})[0]["size"] is None


def test_entry_kinds_dup_late_error_timeout():
    res = {"af": 4, "dst_addr": "8.8.8.8", "from": "8.8.4.4", "timestamp": 1600000000,
           "result": [{"rtt": 5.0}, {"dup": 1, "rtt": 9.0}, {"late": 2}, {"x": "*"},
                      {"error": "sendto failed"}, {"rtt": 6.0, "ttl": 50}]}
    p = ripe.parse_result(res)
    assert [x["rtt"] for x in p.rows] == [5.0, -1.0, -1.0, 6.0]
    assert (p.dups, p.late, p.errors) == (1, 1, 1)


# ----------------------------------------------------------------------------------------------
# source identity (NAT rule) and addresses


@pytest.mark.parametrize(
    "src, expect",
    [
        ("192.168.1.5", "from"), ("10.1.2.3", "from"), ("172.20.0.1", "from"),
        ("100.64.3.4", "from"), ("169.254.1.1", "from"), ("127.0.0.1", "from"),
        ("0.0.0.0", "from"), ("193.0.0.10", "src"), ("", "from"),
    ],
)
def test_auto_source_rule_ipv4(src, expect):
    res = {"af": 4, "dst_addr": "8.8.8.8", "src_addr": src, "from": "203.1.1.1",
           "timestamp": 1600000000, "result": [{"rtt": 1.0}]}
    assert rows(res)[0]["src_addr"] == ("203.1.1.1" if expect == "from" else src)


@pytest.mark.parametrize("src", ["fd00::1", "fe80::1", "::1", "::", "2001:db8::5"])
def test_auto_source_rule_ipv6_non_global_uses_from(src):
    res = {"af": 6, "dst_addr": "2001:500:2f::f", "src_addr": src, "from": "2a01:4f8::1",
           "timestamp": 1600000000, "result": [{"rtt": 1.0}]}
    assert rows(res)[0]["src_addr"] == "2a01:4f8::1"
    assert rows(res, "src_addr")[0]["src_addr"] == str(ipaddress.ip_address(src))


def test_no_usable_source_or_destination_is_skipped_not_rejected():
    base = {"af": 4, "dst_addr": "8.8.8.8", "timestamp": 1600000000, "result": [{"rtt": 1.0}]}
    assert ripe.parse_result({**base, "src_addr": "10.0.0.1", "from": ""}).skipped == "no_source"
    assert ripe.parse_result({**base, "from": "1.1.1.1"}, "src_addr").skipped == "no_source"
    no_dst = {**base, "from": "1.1.1.1", "dst_addr": None}
    assert ripe.parse_result(no_dst).skipped == "no_dst_addr"
    assert ripe.parse_result({k: v for k, v in no_dst.items() if k != "dst_addr"}).rows == []


def test_addresses_are_canonical_and_must_match_af():
    base = {"dst_addr": "2001:DB8:0:0::1", "from": "2A01:4F8:0::1", "timestamp": 1600000000,
            "result": [{"rtt": 1.0}]}
    r = rows({**base, "af": 6})[0]
    assert (r["dst_addr"], r["src_addr"]) == ("2001:db8::1", "2a01:4f8::1")
    with pytest.raises(ripe.RejectedResult) as e:
        rows({**base, "af": 4})
    assert e.value.reason == "af_mismatch"
    mapped = {"af": 4, "dst_addr": "::ffff:8.8.8.8", "from": "1.1.1.1", "timestamp": 1600000000,
              "result": [{"rtt": 1.0}]}
    assert rows(mapped)[0]["dst_addr"] == "8.8.8.8"  # IPv4-mapped = the IPv4 address
    with pytest.raises(ripe.RejectedResult, match="af_mismatch"):
        rows({**mapped, "af": 6, "from": "2a01::1"})


@pytest.mark.parametrize(
    "patch, reason",
    [
        ({"dst_addr": "8.8.8.256"}, "bad_address"),
        ({"from": "not-an-ip"}, "bad_address"),
        ({"from": 12345}, "bad_address"),
        ({"af": 5}, "bad_af"),
        ({"type": "traceroute"}, "not_ping"),
        ({"timestamp": None}, "missing_timestamp"),
        ({"timestamp": "soon"}, "bad_timestamp"),
        ({"timestamp": 12}, "bad_timestamp"),
        ({"result": {"rtt": 1.0}}, "bad_result"),
        ({"result": [1.0]}, "bad_entry"),
        ({"result": [{"ttl": 3}]}, "bad_entry"),
        ({"result": [{"rtt": "fast"}]}, "bad_rtt"),
        ({"result": [{"rtt": -3.0}]}, "bad_rtt"),
        ({"result": [{"rtt": True}]}, "bad_rtt"),
        ({"prb_id": "x7"}, "bad_prb_id"),
        ({"msm_id": [1]}, "bad_msm_id"),
        ({"prb_id": 1 << 70}, "bad_prb_id"),
        ({"result": [{"rtt": 1e400}]}, "bad_rtt"),
        ({"size": -1}, "bad_size"),
        # plausibility: corruption, not latency
        ({"result": [{"rtt": 1.0}, {"rtt": 1e308}]}, "implausible_rtt"),
        ({"result": [{"rtt": 60_000.5}]}, "implausible_rtt"),
        ({"result": [{"rtt": 1.0}] * 17}, "too_many_packets"),
        ({"result": None, "sent": 100_000, "rcvd": 0}, "too_many_packets"),
        ({"result": None, "sent": 3, "rcvd": 1, "avg": 1e9}, "implausible_rtt"),
        ({"af": 6, "dst_addr": "fe80::1%eth0", "from": "2a01::1"}, "scoped_address"),
    ],
)
def test_wrong_types_and_values_are_rejected_with_a_reason(patch, reason):
    res = {"af": 4, "dst_addr": "8.8.8.8", "from": "1.1.1.1", "timestamp": 1600000000,
           "prb_id": 1, "msm_id": 2, "size": 48, "result": [{"rtt": 1.0}]}
    res = {k: v for k, v in {**res, **patch}.items() if v is not None}
    with pytest.raises(ripe.RejectedResult) as e:
        ripe.parse_result(res)
    assert e.value.reason == reason


def test_is_globally_routable():
    assert ripe.is_globally_routable("8.8.8.8") and ripe.is_globally_routable("2a00:1450::1")
    assert not ripe.is_globally_routable("100.127.255.1")
    assert not ripe.is_globally_routable("fc12::1")


# ----------------------------------------------------------------------------------------------
# hostile input: nothing stops the run, good rows are never lost


@pytest.fixture(scope="module")
def africa_lines(shared_data) -> list[bytes]:
    with gzip.open(shared_data / "ripe_atlas_africa_2021" / "raw.jsonl.gz", "rb") as f:
        return [ln.rstrip(b"\n") for ln in f][:400]


def rows_of(lines: list[bytes]) -> int:
    return expected([orjson.loads(ln) for ln in lines])["rows"]


def ingest1(path, tmp_path, **kw):
    return ingest.ingest([path], tmp_path / "out", progress=False, **kw)


def test_garbage_lines_are_rejected_and_good_lines_kept(africa_lines, tmp_path):
    bad = [b"{not json", b"[1, 2", b'"a string"', b"42", b'{"type": "ping"}', b"\xff\xfe\x00",
           b'{"af": 4, "timestamp": 1600000000, "dst_addr": "8.8.8.8", "from": "1.1.1.1", '
           b'"result": [{"rtt": "NaN?"}]}']
    mixed = africa_lines[:100] + bad + [b"", b"   "] + africa_lines[100:200]
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"\n".join(mixed) + b"\n")
    rej = tmp_path / "rej.jsonl"
    rep = ingest1(path, tmp_path, rejects=rej)
    assert rep.rows == rows_of(africa_lines[:200])
    assert rep.rejects == {"malformed_json": 3, "not_an_object": 2, "missing_timestamp": 1,
                           "bad_rtt": 1}
    records = [json.loads(x) for x in rej.read_text().splitlines()]
    assert [r["line"] for r in records] == list(range(101, 108))
    assert records[0] == {"source": str(path), "line": 101, "reason": "malformed_json",
                          "raw": "{not json"}


def gz_truncated(data: bytes, keep: float) -> bytes:
    z = gzip.compress(data)
    return z[: int(len(z) * keep)]


def test_truncated_gzip_keeps_every_complete_line_before_the_cut(africa_lines, tmp_path):
    data = b"\n".join(africa_lines) + b"\n"
    cut = gz_truncated(data, 0.6)
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(cut)
    # independently: what zlib can recover from the cut file, complete lines only
    recovered = zlib.decompressobj(31).decompress(cut)
    complete, partial = recovered.split(b"\n")[:-1], recovered.split(b"\n")[-1]
    rej = tmp_path / "rej.jsonl"
    rep = ingest1(path, tmp_path, rejects=rej)
    assert 0 < rep.rows == rows_of(complete)
    assert rep.rejects == {"truncated_file": 1}
    (record,) = [json.loads(x) for x in rej.read_text().splitlines()]
    assert record["line"] == len(complete) + 1 and record["raw"] == partial.decode()


@pytest.mark.parametrize("codec", ["bz2", "zst"])
def test_truncated_bz2_and_zstd_are_reported_and_keep_earlier_rows(shared_data, codec, tmp_path):
    with gzip.open(shared_data / "ripe_atlas_africa_2021" / "raw.jsonl.gz", "rb") as f:
        data = f.read()  # 1.9 MB: several bzip2 blocks (900 kB) and many zstd blocks
    full = bz2.compress(data) if codec == "bz2" else zstandard.ZstdCompressor().compress(data)
    path = tmp_path / f"cut.jsonl.{codec}"
    path.write_bytes(full[: len(full) * 3 // 4])
    rep = ingest1(path, tmp_path)
    n_all = rows_of(data.splitlines())
    assert rep.rejects == {"truncated_file": 1}
    assert n_all // 3 < rep.rows < n_all


def test_corrupt_gzip_is_reported_and_keeps_earlier_rows(africa_lines, tmp_path):
    z = bytearray(gzip.compress(b"\n".join(africa_lines) + b"\n"))
    z[len(z) // 2 : len(z) // 2 + 64] = b"\x00" * 64
    path = tmp_path / "bad.jsonl.gz"
    path.write_bytes(bytes(z))
    rep = ingest1(path, tmp_path)
    assert set(rep.rejects) <= {"corrupt_file", "malformed_json", "truncated_file"}
    assert "corrupt_file" in rep.rejects and rep.rows > 0


@pytest.mark.parametrize("codec", ["plain", "gz", "bz2", "zst", "gz-multimember"])
def test_every_compression_gives_the_same_rows(africa_lines, codec, tmp_path):
    data = b"\n".join(africa_lines) + b"\n"
    enc = {
        "plain": lambda d: d,
        "gz": gzip.compress,
        "bz2": bz2.compress,
        "zst": zstandard.ZstdCompressor().compress,
        "gz-multimember": lambda d: gzip.compress(d[:999]) + gzip.compress(d[999:]),
    }[codec]
    path = tmp_path / "in.data"  # the name says nothing: detected from the content
    path.write_bytes(enc(data))
    rep = ingest1(path, tmp_path)
    assert rep.rejects == {} and rep.rows == rows_of(africa_lines)


def test_json_array_api_download_pretty_printed(africa_lines, tmp_path):
    objs = [orjson.loads(ln) for ln in africa_lines]
    path = tmp_path / "api.json"
    path.write_text(json.dumps(objs, indent=2))
    rep = ingest1(path, tmp_path)
    assert rep.rejects == {} and rep.results == len(objs) and rep.rows == rows_of(africa_lines)
    one_line = tmp_path / "api2.json"
    one_line.write_bytes(orjson.dumps(objs))
    assert ingest.ingest([one_line], tmp_path / "out2", progress=False).rows == rep.rows


def test_json_array_with_a_broken_element_keeps_the_others(africa_lines, tmp_path):
    objs = [orjson.loads(ln) for ln in africa_lines[:50]]
    text = json.dumps(objs, indent=2)
    marker = f'"prb_id": {objs[20]["prb_id"]}'
    i = text.index(marker, text.index(f'"timestamp": {objs[19]["timestamp"]}'))
    broken = text[:i] + '"prb_id": 12,, oops' + text[i + len(marker):]
    path = tmp_path / "broken.json"
    path.write_text(broken)
    rej = tmp_path / "rej.jsonl"
    rep = ingest1(path, tmp_path, rejects=rej)
    lost = [o for o in objs if o is not objs[20]]
    assert rep.rejects == {"malformed_json": 1}
    assert rep.rows == expected(lost)["rows"]
    (record,) = [json.loads(x) for x in rej.read_text().splitlines()]
    assert "oops" in record["raw"] and record["line"] > 1


def test_overlong_line_is_rejected_and_the_next_lines_kept(africa_lines, tmp_path, monkeypatch):
    monkeypatch.setattr(ingest, "MAX_LINE", 10_000)
    monkeypatch.setattr(streams, "READ_BYTES", 4096)
    data = africa_lines[:10] + [b"x" * 50_000] + africa_lines[10:20]
    path = tmp_path / "long.jsonl"
    path.write_bytes(b"\n".join(data) + b"\n")
    rej = tmp_path / "rej.jsonl"
    rep = ingest1(path, tmp_path, rejects=rej)
    assert rep.rejects == {"line_too_long": 1} and rep.rows == rows_of(africa_lines[:20])
    (record,) = [json.loads(x) for x in rej.read_text().splitlines()]
    assert record["line"] == 11 and record["raw"].startswith("xxxx")


def test_absurdly_deep_json_is_rejected_not_a_crash(africa_lines, tmp_path):
    deep = b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    for name, text in [("lines.jsonl", b"\n".join([deep, *africa_lines[:5]])),
                       ("array.json", b"[" + b",".join([deep, *africa_lines[:5]]) + b"]")]:
        path = tmp_path / name
        path.write_bytes(text)
        rep = ingest.ingest([path], tmp_path / name[:5], progress=False)  # same results: apart
        assert rep.rejects == {"malformed_json": 1} and rep.rows == rows_of(africa_lines[:5])


def test_empty_file_gives_an_empty_output(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(b"")
    rep = ingest1(path, tmp_path)
    assert rep.rows == 0 and rep.rejects == {}
    assert read_canonical(rep.outputs[0]).num_rows == 0


def test_chunks_become_row_groups(africa_lines, tmp_path, monkeypatch):
    monkeypatch.setattr(ingest, "CHUNK_RESULTS", 64)
    monkeypatch.setattr(streams, "READ_BYTES", 8192)  # a table is flushed per block read
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"\n".join(africa_lines))
    rep = ingest1(path, tmp_path)
    md = pq.read_metadata(rep.outputs[0])
    assert md.num_row_groups >= 6 and md.num_rows == rows_of(africa_lines)


def test_iter_tables_streams_from_a_file_object(africa_lines):
    report: dict = {}
    tables = list(ingest.iter_tables(io.BytesIO(gzip.compress(b"\n".join(africa_lines))),
                                   report=report))
    assert sum(t.num_rows for t in tables) == report["rows"] == rows_of(africa_lines)


# ----------------------------------------------------------------------------------------------
# output layout: idempotent, appendable, parallel


def test_rerun_is_idempotent_and_a_changed_input_replaces_its_output(africa_lines, tmp_path):
    path = tmp_path / "day1.jsonl"
    path.write_bytes(b"\n".join(africa_lines[:100]))
    out = tmp_path / "out"
    first = ingest.ingest([path], out, progress=False)
    again = ingest.ingest([path], out, progress=False)
    assert again.skipped_inputs == [str(path)] and again.outputs == first.outputs
    assert again.rows == first.rows and again.to_dict()["rejects"] == first.to_dict()["rejects"]
    assert len(list(out.glob("*.parquet"))) == 1
    path.write_bytes(b"\n".join(africa_lines[:200]))  # the dump grew
    os.utime(path, ns=(1, 2_000_000_000_000_000_000))
    grown = ingest.ingest([path], out, progress=False)
    assert grown.skipped_inputs == [] and grown.outputs != first.outputs
    assert [p.name for p in out.glob("*.parquet")] == [Path(grown.outputs[0]).name]
    assert read_canonical(out).num_rows == rows_of(africa_lines[:200])
    other_mode = ingest.ingest([path], out, source_address="from", progress=False)
    assert other_mode.skipped_inputs == [] and len(list(out.glob("*.parquet"))) == 1
    day2 = tmp_path / "day2.jsonl"
    day2.write_bytes(b"\n".join(africa_lines[200:]))
    ingest.ingest([day2], out, progress=False)  # appending a day adds a file
    assert read_canonical(out).num_rows == rows_of(africa_lines)


def test_workers_give_the_same_rows_as_one_process(africa_lines, tmp_path):
    paths = []
    for i in range(3):
        p = tmp_path / f"part{i}.jsonl.gz"
        p.write_bytes(gzip.compress(b"\n".join(africa_lines[i * 100 : (i + 1) * 100])))
        paths.append(p)
    one = ingest.ingest(paths, tmp_path / "one", progress=False)
    two = ingest.ingest(paths, tmp_path / "two", workers=2, progress=False)
    assert one.rows == two.rows == rows_of(africa_lines[:300])
    key = ["event_time", "src_addr", "dst_addr", "rtt"]
    assert read_canonical(tmp_path / "one").sort_by([(k, "ascending") for k in key]).equals(
        read_canonical(tmp_path / "two").sort_by([(k, "ascending") for k in key]))


# ----------------------------------------------------------------------------------------------
# the same result twice is one result


def test_a_result_repeated_in_one_file_is_kept_once(africa_lines, tmp_path):
    path = tmp_path / "twice.jsonl"
    path.write_bytes(b"\n".join(africa_lines[:50] + africa_lines[10:20]))
    rep = ingest1(path, tmp_path)
    assert rep.rows == rows_of(africa_lines[:50]) and rep.skipped["duplicate"] == 10


def test_duplicates_are_found_across_the_runs_on_disk_too(africa_lines, tmp_path, monkeypatch):
    # Keys move from a set into sorted runs on disk every FLUSH results: a repeat of a result
    # from before the spill is still caught, the key file holds every key once, sorted, and no
    # spilled run is left behind.
    monkeypatch.setattr(seen.Seen, "FLUSH", 16)
    path = tmp_path / "twice.jsonl"
    path.write_bytes(b"\n".join(africa_lines[:100] + africa_lines[5:25] + africa_lines[90:95]))
    rep = ingest1(path, tmp_path)
    assert rep.rows == rows_of(africa_lines[:100]) and rep.skipped["duplicate"] == 25
    keys = np.load(next((tmp_path / "out" / "_keys").glob("*.npy")))
    assert len(keys) == 100 and (np.diff(keys) > 0).all()
    assert not list((tmp_path / "out").glob(".ingest-*"))


def test_results_already_in_the_directory_are_not_ingested_again(africa_lines, tmp_path):
    a, b = tmp_path / "api_download.json", tmp_path / "dump.jsonl"
    a.write_bytes(b"[" + b",".join(africa_lines[:60]) + b"]")
    b.write_bytes(b"\n".join(africa_lines[40:100]))  # overlaps the download by 20 results
    ingest.ingest([a], tmp_path / "out", progress=False)
    second = ingest.ingest([b], tmp_path / "out", progress=False)
    assert second.skipped["duplicate"] == 20
    assert read_canonical(tmp_path / "out").num_rows == rows_of(africa_lines[:100])


@pytest.mark.parametrize("workers", [1, 2])
def test_overlapping_inputs_of_one_call_give_each_result_once(africa_lines, tmp_path, workers):
    parts = [africa_lines[0:80], africa_lines[60:140], africa_lines[120:200]]
    paths = []
    for i, lines in enumerate(parts):
        paths.append(tmp_path / f"part{i}.jsonl")
        paths[-1].write_bytes(b"\n".join(lines))
    rep = ingest.ingest(paths, tmp_path / "out", workers=workers, progress=False)
    assert rep.skipped["duplicate"] == 40 and rep.rows == rows_of(africa_lines[:200])
    assert read_canonical(tmp_path / "out").num_rows == rows_of(africa_lines[:200])
    # the first input keeps its results; the later ones lose what they share with it
    first = [f for f in rep.files if f["input"] == str(paths[0])][0]
    assert first["skipped"].get("duplicate", 0) == 0


def test_a_changed_input_is_not_a_duplicate_of_its_own_older_output(africa_lines, tmp_path):
    path = tmp_path / "day.jsonl"
    path.write_bytes(b"\n".join(africa_lines[:50]))
    ingest1(path, tmp_path)
    path.write_bytes(b"\n".join(africa_lines[:80]))  # the dump grew
    os.utime(path, ns=(1, 2_000_000_000_000_000_000))
    grown = ingest1(path, tmp_path)
    assert grown.skipped.get("duplicate", 0) == 0 and grown.rows == rows_of(africa_lines[:80])
    assert len(list((tmp_path / "out" / "_keys").glob("*.npy"))) == 1  # the old keys went too


def test_result_key_is_atlas_s_identity_or_the_content():
    r = {"msm_id": 5, "prb_id": 7, "timestamp": 1600000000, "result": [{"rtt": 1.0}]}
    assert ripe.result_key(r) == ripe.result_key({**r, "result": [{"x": "*"}]})  # same result
    assert ripe.result_key(r) != ripe.result_key({**r, "timestamp": 1600000001})
    anon = {"timestamp": 1600000000, "dst_addr": "8.8.8.8", "result": [{"rtt": 1.0}]}
    assert ripe.result_key(anon) == ripe.result_key(dict(reversed(list(anon.items()))))
    assert ripe.result_key(anon) != ripe.result_key({**anon, "result": [{"rtt": 2.0}]})
    assert ripe.result_key([1, 2]) is None


# ----------------------------------------------------------------------------------------------
# the CLI


def test_cli_exit_codes_and_json_summary(africa_lines, tmp_path, capsys):
    good = tmp_path / "good.jsonl"
    good.write_bytes(b"\n".join(africa_lines[:50]))
    assert main(["ingest", str(good), "--out", str(tmp_path / "o1"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["rows"] == rows_of(africa_lines[:50]) and summary["rejected"] == 0
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b"\n".join(africa_lines[:50] + [b"{oops"]))
    rej = tmp_path / "r.jsonl"
    assert main(["ingest", str(bad), "--out", str(tmp_path / "o2"), "--rejects", str(rej)]) == 3
    assert "malformed_json" in capsys.readouterr().out
    assert json.loads(rej.read_text())["line"] == 51
    assert main(["ingest", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o3")]) == 2
    assert "missing.jsonl" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["ingest", str(good), "--out", str(tmp_path), "--source-address", "nat"])
    assert e.value.code == 2


def test_cli_reads_stdin(africa_lines, tmp_path):
    data = gzip.compress(b"\n".join(africa_lines[:80]))
    cmd = [sys.executable, "-m", "ping_llm.cli", "ingest", "-", "--out", str(tmp_path / "o"),
           "--json"]
    proc = subprocess.run(cmd, input=data, capture_output=True, check=False)
    assert proc.returncode == 0, proc.stderr.decode()
    assert json.loads(proc.stdout)["rows"] == rows_of(africa_lines[:80])
    again = subprocess.run(cmd, input=data, capture_output=True, check=False)
    assert json.loads(again.stdout)["outputs"] == json.loads(proc.stdout)["outputs"]
    assert len(list((tmp_path / "o").glob("*.parquet"))) == 1  # same content, same file


def test_truncated_json_array_keeps_the_complete_elements(africa_lines, tmp_path):
    text = b"[\n" + b",\n".join(africa_lines) + b"\n]"
    cut = gz_truncated(text, 0.5)
    recovered = zlib.decompressobj(31).decompress(cut)
    complete = recovered.split(b"\n")[1:-1]  # element lines that end before the cut
    path = tmp_path / "api.json.gz"
    path.write_bytes(cut)
    rej = tmp_path / "rej.jsonl"
    rep = ingest1(path, tmp_path, rejects=rej)
    assert rep.rejects == {"truncated_file": 1}
    assert rep.results == len(complete) and rep.rows == rows_of([c.rstrip(b",") for c in complete])
    (record,) = [json.loads(x) for x in rej.read_text().splitlines()]
    assert record["line"] == len(complete) + 2


def test_a_directory_input_skips_the_files_synth_writes_beside_its_output(
    africa_lines, tmp_path
):
    d = tmp_path / "in"
    d.mkdir()
    (d / "results.jsonl").write_bytes(b"\n".join(africa_lines[:50]) + b"\n")
    (d / "results.jsonl.world.json").write_text('{"config": {}}')
    (d / "results.jsonl.geo.mmdb").write_bytes(bytes(range(256)) * 64)  # not JSON at all
    rep = ingest.ingest([d], tmp_path / "out", progress=False)
    assert rep.rejected == 0 and rep.rows == rows_of(africa_lines[:50])


# ----------------------------------------------------------------------------------------------
# paths: a link is its target, bad outputs fail before any work, killed runs leave nothing behind


def test_a_symlink_to_an_ingested_file_is_already_ingested(africa_lines, tmp_path):
    real = tmp_path / "day.jsonl"
    real.write_bytes(b"\n".join(africa_lines[:40]))
    (tmp_path / "link.jsonl").symlink_to(real)
    first = ingest1(real, tmp_path)
    again = ingest1(tmp_path / "link.jsonl", tmp_path)
    assert again.skipped_inputs == [str(tmp_path / "link.jsonl")]
    assert again.outputs == first.outputs and len(list((tmp_path / "out").glob("*.parquet"))) == 1


def test_rejects_naming_a_directory_fails_before_any_work(africa_lines, tmp_path, capsys):
    good = tmp_path / "good.jsonl"
    good.write_bytes(b"\n".join(africa_lines[:20]))
    (tmp_path / "rj").mkdir()
    out = tmp_path / "o"
    assert main(["ingest", str(good), "--out", str(out), "--rejects", str(tmp_path / "rj")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a directory" in err
    assert not out.exists() and list((tmp_path / "rj").iterdir()) == []


def test_an_unwritable_out_is_one_line_and_exit_2(africa_lines, tmp_path, capsys):
    good = tmp_path / "good.jsonl"
    good.write_bytes(b"\n".join(africa_lines[:20]))
    (tmp_path / "plain_file").write_text("")
    # below a regular file nothing can be created (what a read-only directory does to non-root)
    assert main(["ingest", str(good), "--out", str(tmp_path / "plain_file" / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot write to --out" in err and "Traceback" not in err


def test_a_killed_ingest_s_old_temporaries_are_removed_and_young_ones_kept(africa_lines, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    old, young = out / ".ingest-123-1.parquet.tmp", out / ".ingest-456-2.rejects.tmp"
    old.write_bytes(b"partial")
    young.write_bytes(b"maybe another ingest's")
    two_hours_ago = time.time() - 7200
    os.utime(old, (two_hours_ago, two_hours_ago))
    good = tmp_path / "good.jsonl"
    good.write_bytes(b"\n".join(africa_lines[:20]))
    ingest1(good, tmp_path)
    assert not old.exists() and young.exists()
