"""targets: what callers may ask about (addresses, CIDR prefixes, times, measurements, queries)
and the clear errors for everything else."""

from __future__ import annotations

import datetime

import pytest

from ping_llm import tokens as tk
from ping_llm.errors import InputError
from ping_llm.query.targets import (
    Query,
    as_context,
    as_measurement,
    as_query,
    parse_target,
    parse_time,
)


def test_a_full_address_is_a_target_with_every_byte_fixed():
    t = parse_target("192.0.2.1")
    assert (t.version, t.prefix, t.nbytes, t.is_full, t.n_completions) == (4, 32, 4, True, 1)
    assert t.items() == [192, 0, 2, 1]
    assert str(t) == "192.0.2.1"


def test_a_prefix_clears_host_bits_and_leaves_byte_ranges_as_holes():
    t = parse_target("10.1.2.99/20")
    assert str(t) == "10.1.0.0/20"
    assert t.n_completions == 2**12
    assert t.items() == [10, 1, (0, 15), (0, 255)]
    v6 = parse_target("2001:db8:abcd::1/48")
    assert (v6.version, v6.nbytes, str(v6)) == (6, 16, "2001:db8:abcd::/48")
    assert v6.items()[6] == (0, 255) and v6.items()[5] == 0xCD
    assert parse_target("0.0.0.0/0").n_completions == 2**32


@pytest.mark.parametrize("bad", ["", "  ", "not-an-ip", "10.0.0.0/33", "10.0.0.0/-1",
                                 "10.0.0.0/x", "2001:db8::/129", None, 42])
def test_bad_targets_are_refused_with_the_text_in_the_message(bad):
    with pytest.raises(InputError):
        parse_target(bad)


def test_times_are_epoch_seconds_or_iso_8601_with_naive_meaning_utc():
    assert parse_time(None) is None
    assert parse_time(1_700_000_000) == parse_time("1700000000") == 1_700_000_000
    assert parse_time(1_700_000_000.0) == 1_700_000_000
    assert parse_time("2023-11-14T22:13:20") == 1_700_000_000
    assert parse_time("2023-11-14T23:13:20+01:00") == 1_700_000_000
    assert parse_time(datetime.datetime(2023, 11, 14, 22, 13, 20)) == 1_700_000_000
    for bad in ("yesterday", True, 1.5, -1, [1]):
        with pytest.raises(InputError):
            parse_time(bad)


def test_measurements_come_as_records_dicts_or_tuples_and_failures_are_negative():
    want = tk.Measurement("192.0.2.1", "198.51.100.7", 23.5, 1_700_000_000)
    assert as_measurement(want) == want
    assert as_measurement({"src": "192.0.2.1", "dst": "198.51.100.7", "rtt_ms": 23.5,
                           "time": "2023-11-14T22:13:20"}) == want
    assert as_measurement(("192.0.2.1", "198.51.100.7", 23.5, 1_700_000_000)) == want
    for failed in (None, "*", "failed", -3):
        assert as_measurement(("192.0.2.1", "198.51.100.7", failed)).rtt_ms == -1.0
    for bad in (("192.0.2.1", "198.51.100.0/24", 1.0), ("192.0.2.1", "2001:db8::1", 1.0),
                ("192.0.2.1", "198.51.100.7", float("nan")), {"src": "192.0.2.1"},
                {"src": "192.0.2.1", "dst": "198.51.100.7", "rtt": 1, "ttl": 3}, "x"):
        with pytest.raises(InputError):
            as_measurement(bad)


def test_queries_come_as_records_dicts_or_tuples():
    q = Query("192.0.2.1", "198.51.100.0/24", 5)
    assert as_query(q) is q
    assert as_query(("192.0.2.1", "198.51.100.0/24", 5)) == q
    assert as_query({"src": "192.0.2.1", "dst": "198.51.100.0/24", "time": 5}) == q
    for bad in (("192.0.2.1",), {"src": "a", "dst": "b", "rtt": 1}, 7):
        with pytest.raises(InputError):
            as_query(bad)


# ----------------------------------------------------------------------------------------------
# context as a caller has it: our measurements and RIPE Atlas results as downloaded

ATLAS = {  # a real result (ripe-atlas-tools' fixtures), one packet lost and one duplicate added
    "af": 4, "prb_id": 1216, "type": "ping", "msm_id": 1000192, "timestamp": 1445025400,
    "from": "109.190.83.40", "src_addr": "192.168.103.132", "dst_addr": "62.2.16.24",
    "result": [{"rtt": 27.429}, {"x": "*"}, {"rtt": 25.681}, {"rtt": 25.7, "dup": 1}],
    "sent": 3, "rcvd": 2, "size": 20, "ttl": 54, "fw": 4700, "step": 360,
}


def test_atlas_results_become_one_measurement_per_packet_from_the_public_source():
    ours = {"src": "109.190.83.40", "dst": "8.8.8.8", "rtt_ms": 3.5, "time": 1445025000}
    ms = as_context([ours, ATLAS])
    assert ms[0] == as_measurement(ours)
    assert [(m.src, m.dst, m.rtt_ms, m.time) for m in ms[1:]] == [
        ("109.190.83.40", "62.2.16.24", 27.429, 1445025400),  # NAT'd src_addr -> `from`
        ("109.190.83.40", "62.2.16.24", -1.0, 1445025400),  # lost packet: failed
        ("109.190.83.40", "62.2.16.24", 25.681, 1445025400),  # the duplicate reply is not a ping
    ]
    assert as_context([ATLAS], source_address="src_addr")[0].src == "192.168.103.132"
    assert as_context([{**ATLAS, "dst_addr": None}]) == []  # DNS failure: nothing measured
    assert as_context(None) == []


def test_real_downloaded_results_all_parse_as_context(shared_data):
    import json

    path = shared_data / "ping_fixtures" / "ripe_atlas_tools_ping_fixtures.jsonl"
    results = [json.loads(line)["result"] for line in path.read_text().splitlines()[:20]]
    ms = as_context(results)
    assert len(ms) >= 3 * len(results) - 5 and all(m.time is not None for m in ms)


@pytest.mark.parametrize("bad, message", [
    ({**ATLAS, "af": 6}, "not a usable RIPE Atlas ping result"),
    ({**ATLAS, "result": "nope"}, "not a usable RIPE Atlas ping result"),
    ({"src": "1.2.3.4", "dst": "5.6.7.8", "rtt": "fast"}, "must be a number"),
])
def test_bad_context_items_are_refused_with_a_reason(bad, message):
    with pytest.raises(InputError, match=message):
        as_context([bad])
