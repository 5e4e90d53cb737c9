"""`ping-llm serve`: a real uvicorn server on a loopback port, spoken to over HTTP with httpx.

Checks every endpoint against the engine, that concurrent RTT requests are coalesced into a few
model batches, that bad payloads get a 422 with a message (never a 500), and that the service
binds 127.0.0.1 by default. The model is a small GPT with random weights (answers are compared
with the same checkpoint loaded into a second, in-process engine; both run it in float64, see
`engine64`).
"""

from __future__ import annotations

import asyncio
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
from ping_llm.query import Engine
from ping_llm.server import Limits, create_app, serve

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


@pytest.fixture(scope="module")
def server(run_dir):
    app = create_app(engine64(run_dir), LIMITS)
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
    yield SimpleNamespace(url=f"http://127.0.0.1:{port}", expected=engine64(run_dir))
    srv.should_exit = True
    thread.join(timeout=10)
    sock.close()


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
