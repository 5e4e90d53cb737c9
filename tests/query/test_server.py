"""`ping-llm serve`: a real uvicorn server on a loopback port, spoken to over HTTP with httpx.

Checks every endpoint against the engine, that concurrent RTT requests are coalesced into a few
model batches, that bad payloads get a 422 with a message (never a 500), and that the service
binds 127.0.0.1 by default. The model is a small GPT with random weights (answers are compared
with the same checkpoint loaded into a second, in-process engine; both run it in float64, see
`engine64`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import inspect
import json
import socket
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import httpx
import pytest
import torch
import uvicorn

from ping_llm import checkpoint
from ping_llm.cli import build_parser
from ping_llm.model import GPT, GPTConfig
from ping_llm.query.engine import Engine
from ping_llm.query.server import Limits, create_app, serve

SRC, DST, T0 = "10.0.0.1", "192.0.2.7", 1_700_000_000
CTX = [{"src": SRC, "dst": "192.0.2.9", "rtt_ms": 12.0, "time": T0}]
LIMITS = Limits(max_batch=40, max_context=8, wait_ms=20)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny forwards on a busy 2-core machine: threads only add overhead
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    torch.manual_seed(0)
    m = GPT(GPTConfig(n_layer=2, n_embd=32, n_head=2, sequence_len=128))
    with torch.no_grad():  # opinionated random weights (nanochat's init predicts ~uniformly)
        m.lm_head.weight.normal_(0.0, 0.3)
        for block in m.transformer.h:
            block.attn.c_proj.weight.normal_(0.0, 0.05)
    run = tmp_path_factory.mktemp("server_run")
    checkpoint.save_checkpoint(
        run,
        model_state=m.state_dict(),
        config={"model": m.config.to_dict(), "train": {}},
        optimizers=[],
        loader_states=[{}],
        rng_states=[{}],
        step=0,
    )
    return run


def engine64(run_dir) -> Engine:
    """An engine over the run's model in float64. The server coalesces requests into batches of
    other shapes than the in-process engine's (batched vs one by one), and in float32 two such
    paths differ by summation-order rounding (~1e-7..1e-6 in a probability, CPU-dependent), as
    much as the tolerances below. In float64 they agree to ~1e-15 before GPT.forward rounds its
    logits to float32, which both paths then do identically (bar a rounding-boundary tie, odds
    ~1e-8 per logit, worth 1-2 ulps: < 1e-6 in a probability)."""
    model, _ = checkpoint.load_model(run_dir)
    return Engine(model.double())


@contextlib.contextmanager
def running(app):
    """A real uvicorn server for `app` on a free loopback port; yields its URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(timeout=30)
        sock.close()


@pytest.fixture(scope="module")
def server(run_dir):
    with running(create_app(engine64(run_dir), LIMITS)) as url:
        yield SimpleNamespace(url=url, expected=engine64(run_dir))


def post(server, path, payload):
    return httpx.post(server.url + path, json=payload, timeout=60)


def test_healthz_and_the_openapi_schema(server):
    r = httpx.get(server.url + "/healthz")
    assert r.status_code == 200
    h = r.json()
    assert h["status"] == "ok" and h["limits"]["max_batch"] == 40 and "rtt_batches" in h
    assert h["calibrated"] is False  # this run has no calibration.json
    paths = httpx.get(server.url + "/openapi.json").json()["paths"]
    for p in ("/healthz", "/rtt", "/rtt_many", "/rank", "/destinations", "/score", "/sample"):
        assert p in paths


def test_rtt_answers_what_the_engine_answers(server):
    r = post(
        server, "/rtt", {"src": SRC, "dst": DST, "time": T0 + 60, "context": CTX, "histogram": True}
    )
    assert r.status_code == 200, r.text
    out = r.json()
    d = server.expected.rtt(SRC, DST, time=T0 + 60, context=CTX)
    assert out["p_failed"] == pytest.approx(d.p_failed, abs=1e-6)
    assert out["median_ms"] == d.median and out["mean_ms"] == pytest.approx(d.mean, rel=1e-4)
    assert set(out["quantiles"]) >= {"0.05", "0.5", "0.95"}
    assert sum(b["p"] for b in out["histogram"]) == pytest.approx(1.0)
    partial = post(server, "/rtt", {"src": SRC, "dst": "192.0.2.0/30"}).json()
    assert partial["exact"] and partial["n_completions"] == 4


ATLAS = {  # a RIPE Atlas ping result as downloaded (NAT'd probe: the public `from` is the source)
    "af": 4, "prb_id": 6012, "type": "ping", "msm_id": 1001, "timestamp": T0, "from": SRC,
    "src_addr": "192.168.1.20", "dst_addr": "192.0.2.9", "result": [{"rtt": 11.0}, {"x": "*"}],
    "sent": 2, "rcvd": 1, "lts": 20, "fw": 5020,
}


def test_context_may_be_ripe_atlas_results_counted_per_packet(server):
    body = {"src": SRC, "dst": DST, "context": [ATLAS, CTX[0]]}
    r = post(server, "/rtt", body)
    assert r.status_code == 200, r.text
    want = server.expected.rtt(SRC, DST, context=[(SRC, "192.0.2.9", 11.0, T0),
                                                  (SRC, "192.0.2.9", -1.0, T0), CTX[0]])
    assert r.json()["p_failed"] == pytest.approx(want.p_failed, abs=1e-6)
    assert r.json()["median_ms"] == want.median
    ranked = post(server, "/rank", {"src": SRC, "candidates": [DST, "192.0.2.1"],
                                    "context": [ATLAS]})
    assert ranked.status_code == 200, ranked.text
    many = {**ATLAS, "result": [{"rtt": 10.0}] * 9}  # 9 packets > the limit of 8 measurements
    r = post(server, "/rtt", {"src": SRC, "dst": DST, "context": [many]})
    assert r.status_code == 422 and "9 measurements; the limit is 8" in r.json()["detail"]
    r = post(server, "/rtt", {"src": SRC, "dst": DST, "context": [{**ATLAS, "af": 6}]})
    assert r.status_code == 422 and "RIPE Atlas" in r.json()["detail"]


def test_rtt_many_returns_results_in_request_order(server):
    dsts = ["192.0.2.1", "2001:db8::1", "198.51.100.5", "192.0.2.1"]
    srcs = [SRC, "2001:db8::9", SRC, SRC]
    queries = [{"src": s, "dst": d} for s, d in zip(srcs, dsts, strict=True)]
    queries[2]["context"] = []  # its own (empty) context instead of the shared one
    r = post(server, "/rtt_many", {"queries": queries, "context": CTX})
    assert r.status_code == 200, r.text
    got = [x["p_failed"] for x in r.json()["results"]]
    want = [
        server.expected.rtt(SRC, "192.0.2.1", context=CTX),
        server.expected.rtt("2001:db8::9", "2001:db8::1", context=CTX),
        server.expected.rtt(SRC, "198.51.100.5"),
        server.expected.rtt(SRC, "192.0.2.1", context=CTX),
    ]
    assert got == pytest.approx([d.p_failed for d in want], abs=1e-6)


def test_rank_destinations_score_and_sample_endpoints(server):
    cands = ["192.0.2.1", "192.0.2.2", "198.51.100.5"]
    ranking = post(server, "/rank", {"src": SRC, "candidates": cands}).json()["ranking"]
    assert [r["rank"] for r in ranking] == [1, 2, 3] and sorted(r["dst"] for r in ranking) == cands
    assert [r["median_ms"] for r in ranking] == sorted(r["median_ms"] for r in ranking)
    found = post(server, "/destinations", {"src": SRC, "k": 3}).json()["destinations"]
    want = server.expected.destinations(SRC, k=3)
    assert [f["dst"] for f in found] == [w.dst for w in want]
    m = {"src": SRC, "dst": DST, "rtt_ms": 20.0, "time": T0 + 60}
    scores = post(server, "/score", {"measurements": [m, {**m, "rtt_ms": None}], "context": CTX})
    s = scores.json()["scores"]
    assert len(s) == 2 and set(s[0]["fields"]) == {"src", "dst", "time", "result"}
    assert s[0]["total"] == pytest.approx(server.expected.score(m, context=CTX).total, abs=1e-5)
    ms = post(server, "/sample", {"n": 4, "src": SRC, "seed": 1}).json()["measurements"]
    assert len(ms) == 4 and all(x["src"] == SRC for x in ms)


def test_concurrent_rtt_requests_are_coalesced_into_few_model_batches(server):
    dsts = [f"192.0.2.{i}" for i in range(32)]
    before = httpx.get(server.url + "/healthz").json()

    async def fire():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            reqs = [client.post("/rtt", json={"src": SRC, "dst": d}) for d in dsts]
            return await asyncio.gather(*reqs)

    responses = asyncio.run(fire())
    assert all(r.status_code == 200 for r in responses)
    after = httpx.get(server.url + "/healthz").json()
    assert after["rtt_queries"] - before["rtt_queries"] == 32
    batches = after["rtt_batches"] - before["rtt_batches"]
    assert 1 <= batches <= 8, f"32 concurrent requests took {batches} model batches"
    assert after["largest_batch"] >= 4
    want = server.expected.rtt_many([(SRC, d) for d in dsts])
    got = [r.json()["p_failed"] for r in responses]
    assert got == pytest.approx([d.p_failed for d in want], abs=1e-6)


Q = {"src": SRC, "dst": DST}


@pytest.mark.parametrize(
    "path, payload, message",
    [
        ("/rtt", {"src": SRC}, "Field required"),
        ("/rtt", {"src": 5, "dst": DST}, "valid string"),
        ("/rtt", {**Q, "bogus": 1}, "Extra inputs"),
        ("/rtt", {"src": "nope", "dst": DST}, "not an IP address"),
        ("/rtt", {"src": SRC, "dst": "10.0.0.0/33"}, "longer than an IPv4"),
        ("/rtt", {"src": SRC, "dst": "2001:db8::1"}, "mixed address families"),
        ("/rtt", {**Q, "time": "noon"}, "ISO 8601"),
        ("/rtt", {**Q, "context": CTX * 9}, "the limit is 8"),
        ("/rtt", {**Q, "context": [{"src": SRC, "dst": DST, "rtt_ms": "x"}]}, "valid number"),
        ("/rtt_many", {"queries": []}, "1..40"),
        ("/rtt_many", {"queries": [Q] * 41}, "1..40"),
        ("/rtt_many", {"queries": [Q, {"src": SRC, "dst": "x"}]}, "not an IP address"),
        ("/rank", {"src": SRC, "candidates": []}, "candidates must hold"),
        ("/rank", {"src": SRC, "candidates": [DST], "by": "p_below"}, "threshold_ms"),
        ("/rank", {"src": SRC, "candidates": [DST], "by": "mean"}, "'median' or 'p_below'"),
        ("/destinations", {"src": SRC, "k": 0}, "k must be"),
        ("/destinations", {"src": "10.0.0.0/8"}, "full source address"),
        ("/score", {"measurements": []}, "measurements must hold"),
        ("/sample", {"n": 100000}, "n must be"),
        ("/sample", {"n": 2, "temperature": 0}, "temperature"),
    ],
)
def test_bad_payloads_get_422_with_a_message(server, path, payload, message):
    r = post(server, path, payload)
    assert r.status_code == 422, r.text
    assert message in json.dumps(r.json()["detail"])


def test_malformed_json_gets_422_and_the_server_stays_up(server):
    r = httpx.post(
        server.url + "/rtt", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert r.status_code == 422 and "JSON" in r.text
    assert httpx.get(server.url + "/healthz").json()["status"] == "ok"


def test_the_service_binds_loopback_by_default():
    assert inspect.signature(serve).parameters["host"].default == "127.0.0.1"
    args = build_parser().parse_args(["serve", "--run", "somewhere"])
    assert args.host == "127.0.0.1" and args.port == 8000


def test_ping_llm_serve_runs_as_a_command(run_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "ping_llm.cli",
        "serve",
        "--run",
        str(run_dir),
        "--port",
        str(port),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "ping-llm serve did not come up"
            time.sleep(0.2)
        r = httpx.post(url + "/rtt", json={"src": SRC, "dst": DST}, timeout=60)
        assert r.status_code == 200 and 0 < r.json()["p_failed"] < 1
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# ----------------------------------------------------------------------------------------------
# abuse: every request priced before it runs, bodies capped, cheap requests never wait behind
# expensive ones, work dropped when its client goes away

WIDE = {"src": "::/0", "dst": "::/0"}  # 512 drawn completions x 34 address bytes: ~2 s here
OPEN_LIMITS = Limits(max_cost=10**7, max_batch=64)


@pytest.fixture(scope="module")
def open_server(run_dir):
    model, _ = checkpoint.load_model(run_dir)
    with running(create_app(Engine(model), OPEN_LIMITS)) as url:
        yield url


def test_a_request_over_its_cost_budget_is_refused_before_it_runs(server):
    r = post(server, "/rtt_many", {"queries": [WIDE] * 20})
    assert r.status_code == 422
    detail = r.json()["detail"]
    assert "would cost 665,640 token positions; the limit is 50,000" in detail
    assert httpx.get(server.url + "/healthz").json()["limits"]["max_cost"] == 50_000


def test_a_body_over_the_cap_gets_413_whether_declared_or_streamed(server):
    big = json.dumps({"src": SRC, "dst": DST, "pad": "x" * (2 << 20)}).encode()
    r = httpx.post(server.url + "/rtt", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "1,048,576 bytes" in r.json()["detail"]
    chunked = httpx.post(server.url + "/rtt", content=iter([big[:1000], big[1000:]]),
                         headers={"content-type": "application/json"})  # no content-length
    assert chunked.status_code == 413
    assert post(server, "/rtt", {"src": SRC, "dst": DST}).status_code == 200  # still serving


def test_docs_work_offline(server):
    r = httpx.get(server.url + "/docs")
    assert r.status_code == 200 and "<script" not in r.text
    assert "http://" not in r.text and "https://" not in r.text  # nothing to fetch elsewhere
    for path in ("/rtt", "/rtt_many", "/rank", "/destinations", "/score", "/sample"):
        assert f"POST {path}</code>" in r.text


def _cheap_latencies(url: str, n: int) -> list[float]:
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        r = httpx.post(url + "/rtt", json={"src": SRC, "dst": f"192.0.2.{i + 1}"}, timeout=30)
        out.append(time.perf_counter() - t0)
        assert r.status_code == 200
    return out


def test_cheap_requests_are_answered_within_a_second_while_expensive_ones_run(open_server):
    with concurrent.futures.ThreadPoolExecutor(2) as ex:
        slow = [ex.submit(httpx.post, open_server + "/rtt_many", json={"queries": [WIDE] * 3},
                          timeout=300) for _ in range(2)]
        time.sleep(0.5)  # the slow lane is busy now
        waits = _cheap_latencies(open_server, 10)
        assert not all(f.done() for f in slow), "the expensive requests ended too early"
        assert all(f.result().status_code == 200 for f in slow)
    assert max(waits) < 1.0, waits


def test_work_stops_when_its_client_disconnects(open_server):
    with pytest.raises(httpx.ReadTimeout):  # gives up on a ~30 s request after half a second
        httpx.post(open_server + "/rtt_many", json={"queries": [WIDE] * 16}, timeout=0.5)
    deadline = time.monotonic() + 10
    while httpx.get(open_server + "/healthz").json()["cancelled"] < 1:
        assert time.monotonic() < deadline, "the abandoned request was not cancelled"
        time.sleep(0.05)
    t0 = time.perf_counter()  # the slow lane is free again: one wide query, not the 16 before it
    assert httpx.post(open_server + "/rtt", json=WIDE, timeout=60).status_code == 200
    assert time.perf_counter() - t0 < 15


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS")) / 1024


def test_load_mixed_valid_invalid_and_expensive_requests(server, capsys):
    """Bounded, loopback only: 240 requests from 8 clients. No 5xx; every over-budget request
    refused with its cost; everything else answered."""
    kinds = [
        ("/rtt", {"src": SRC, "dst": DST}, 200),
        ("/rtt", {"src": SRC, "dst": DST, "context": CTX, "time": T0 + 5}, 200),
        ("/rtt_many", {"queries": [{"src": SRC, "dst": f"192.0.2.{i}"} for i in range(30)]}, 200),
        ("/rank", {"src": SRC, "candidates": ["192.0.2.1", "192.0.2.2", "192.0.2.3"]}, 200),
        ("/rtt", {"src": "10.0.0.0/24", "dst": DST}, 200),  # 256 completions, within budget
        ("/rtt", {"src": SRC, "dst": "not-an-ip"}, 422),
        ("/rtt", {"src": SRC}, 422),
        ("/rtt_many", {"queries": [WIDE] * 2}, 422),  # over budget
        ("/sample", {"n": 3, "src": SRC}, 200),
        ("/score", {"measurements": [{"src": SRC, "dst": DST, "rtt_ms": 9.0}]}, 200),
    ]
    rss0 = _rss_mb()

    def one(i):
        path, body, want = kinds[i % len(kinds)]
        t0 = time.perf_counter()
        r = httpx.post(server.url + path, json=body, timeout=120)
        return path, want, r.status_code, r.text, time.perf_counter() - t0

    with concurrent.futures.ThreadPoolExecutor(8) as ex:
        results = list(ex.map(one, range(240)))
    assert not [r for r in results if r[2] >= 500]
    assert [(p, w, c) for p, w, c, _, _ in results if c != w] == []
    assert all("would cost" in t for p, _, c, t, _ in results if p == "/rtt_many" and c == 422)
    lat = sorted(r[4] for r in results)
    cheap = sorted(r[4] for i, r in enumerate(results) if i % len(kinds) in (0, 1, 5, 6))
    with capsys.disabled():
        print(f"\nload: 240 requests, p50 {lat[120] * 1e3:.0f} ms, p99 {lat[237] * 1e3:.0f} ms; "
              f"plain /rtt and invalid ones p50 {cheap[len(cheap) // 2] * 1e3:.0f} ms, max "
              f"{cheap[-1] * 1e3:.0f} ms; RSS {rss0:.0f} -> {_rss_mb():.0f} MB")
    assert cheap[-1] < 2.0  # the /24 queries queue on the slow lane, not in front of these


def test_a_context_shared_by_a_request_s_queries_is_priced_once(server):
    ctx = [{"src": SRC, "dst": f"192.0.2.{i + 100}", "rtt_ms": 10.0 + i, "time": T0 + 240 * i}
           for i in range(3)]
    queries = [{"src": SRC, "dst": f"192.0.2.{i}"} for i in range(40)]
    engine = server.expected
    shared = engine.rtt_cost([(q["src"], q["dst"]) for q in queries], context=ctx)
    each = engine.rtt_cost([{"src": q["src"], "dst": q["dst"], "context": list(ctx)}
                            for q in queries])
    assert shared < each - 30 * len(engine.runner.context(ctx).tokens)  # 39 copies not paid for
    r = post(server, "/rtt_many", {"queries": queries, "context": ctx})
    assert r.status_code == 200 and len(r.json()["results"]) == 40
