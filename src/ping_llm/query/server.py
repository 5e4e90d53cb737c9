"""`ping-llm serve`: the query engine as an HTTP JSON service (FastAPI + uvicorn).

Endpoints (POST bodies are JSON; the schema is at /openapi.json, browsable at /docs):

    GET  /healthz        liveness + counters (model batches, queries) and the limits in force
    POST /rtt            {src, dst, time?, context?, seed?, histogram?} -> RTT distribution
    POST /rtt_many       {queries: [{src, dst, time?, context?}], context?} -> {results: [...]}
    POST /rank           {src, candidates, by?, threshold_ms?, time?, context?} -> {ranking}
    POST /destinations   {src, k?, rtt_below?, within?, method?, seed?, time?, context?}
    POST /score          {measurements: [...], context?} -> {scores: [...]}
    POST /sample         {n, src?, seed?, temperature?, context?} -> {measurements: [...]}

A `context` is a list of measurements {src, dst, rtt_ms, time} and/or RIPE Atlas ping results as
downloaded (each packet one measurement; the limit counts packets).

Bad input never produces a 500: pydantic rejects malformed bodies, limits (batch size, context
length, k, n) are checked before any work, and the engine's InputError (bad address, mixed
families, prefix too long, context too long for the model...) is mapped to 422 with its message.

Cost and fairness. Every request is priced before it runs, in token positions the model will
compute (`Engine.rtt_cost`: per completion of a CIDR query, exact or drawn, its tail plus the
result; `_cost` below for the other endpoints). Over `max_cost` it is refused with a 422 that
names its cost and the limit; bodies over `max_body_bytes` get a 413 before they are parsed.
Requests run on one of two lanes, each one model thread: cheap ones (cost <= `fast_cost`) on
the fast lane, the rest on the slow lane, so a cheap question never waits behind an expensive
one. A request that runs on its own, on either lane (everything but the coalesced cheap RTT
questions), is cancelled within one model forward (`query.runner.CANCEL`) when its client
disconnects; /healthz's `cancelled` counts the slow lane's. /docs is a page rendered from the
OpenAPI schema here, with no outside links (FastAPI's own loads its scripts from a CDN, so it is
blank offline).

Batching: cheap RTT questions from concurrent requests (/rtt and /rtt_many) go into one asyncio
queue; a worker task takes the first, waits up to `wait_ms` for more, drains up to `coalesce` of
them and answers all with one `Engine.rtt_many` call on the fast lane. /healthz reports
`rtt_batches` (model calls of the coalescer) and `rtt_queries`, which is how the tests see that
32 concurrent requests were answered in a few batches. Bound to 127.0.0.1 unless told otherwise:
the service has no authentication.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import html
import json
import threading
from contextlib import asynccontextmanager
from dataclasses import asdict
from typing import Literal

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from ping_llm import __version__
from ping_llm import tokens as tk
from ping_llm.errors import InputError
from ping_llm.query.engine import RESULT_COST, Engine
from ping_llm.query.limits import Limits
from ping_llm.query.runner import CANCEL
from ping_llm.query.targets import Query, as_context, parse_target

# ----------------------------------------------------------------------------------------------
# request bodies


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MeasurementIn(_Body):
    src: str
    dst: str
    rtt_ms: float | None = Field(None, description="milliseconds; null or negative = no reply")
    time: int | str | None = Field(None, description="epoch seconds or ISO 8601")

    def plain(self) -> dict:
        return {"src": self.src, "dst": self.dst, "rtt_ms": self.rtt_ms, "time": self.time}


class AtlasResultIn(BaseModel):
    """A RIPE Atlas ping result as downloaded; read as `ping-llm ingest` reads it."""

    model_config = ConfigDict(extra="allow")
    result: list = Field(description='its packets: {"rtt": ms}, {"x": "*"}, {"error": ...}')

    def plain(self) -> dict:
        return self.model_dump()


Context = list[MeasurementIn | AtlasResultIn] | None


class QueryIn(_Body):
    src: str = Field(description="address or CIDR prefix, e.g. 192.0.2.1 or 10.1.2.0/24")
    dst: str = Field(description="address or CIDR prefix")
    time: int | str | None = None
    context: Context = None
    seed: int = 0


class RTTIn(QueryIn):
    histogram: bool = False


class RTTManyIn(_Body):
    queries: list[QueryIn]
    context: Context = None
    histogram: bool = False


class RankIn(_Body):
    src: str
    candidates: list[str]
    by: Literal["median", "p_below"] = "median"
    threshold_ms: float | None = None
    time: int | str | None = None
    context: Context = None


class DestinationsIn(_Body):
    src: str
    k: int = 10
    rtt_below: float | None = None
    within: str | None = None
    method: Literal["beam", "sample"] = "beam"
    seed: int = 0
    time: int | str | None = None
    context: Context = None


class ScoreIn(_Body):
    measurements: list[MeasurementIn]
    context: Context = None


class SampleIn(_Body):
    n: int = 10
    src: str | None = None
    seed: int = 0
    temperature: float = 1.0
    context: Context = None


# ----------------------------------------------------------------------------------------------
# lanes, cancellation, the coalescer


class _Lane:
    """One model thread. `run` awaits fn() there; if the client disconnects meanwhile, the work
    is cancelled (query.runner.CANCEL, checked before every model forward) and the thread freed."""

    def __init__(self, name: str):
        self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=name)
        self.cancelled = 0

    async def run(self, fn, request: Request | None = None):
        stop = threading.Event()

        def work():
            token = CANCEL.set(stop)
            try:
                return fn()
            finally:
                CANCEL.reset(token)

        fut = asyncio.get_running_loop().run_in_executor(self.pool, work)
        if request is None:
            return await fut
        while True:
            done, _ = await asyncio.wait({fut}, timeout=POLL_S)
            if done:
                return fut.result()
            if await request.is_disconnected():
                stop.set()
                self.cancelled += 1
                fut.add_done_callback(lambda f: f.exception())  # Cancelled: nobody to tell
                raise HTTPException(status_code=499, detail="client closed the request")


POLL_S = 0.05  # how often a waiting slow request checks that its client is still there


class _Coalescer:
    """One queue of cheap RTT questions, one worker task, answered on the fast lane."""

    def __init__(self, engine: Engine, lane: _Lane, limits: Limits):
        self.engine, self.lane, self.limits = engine, lane, limits
        self.queue: asyncio.Queue | None = None
        self.batches = 0
        self.queries = 0
        self.largest = 0

    async def ask(self, queries: list[Query]) -> list:
        loop = asyncio.get_running_loop()
        futures = []
        for q in queries:
            fut = loop.create_future()
            await self.queue.put((q, fut))
            futures.append(fut)
        return await asyncio.gather(*futures)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        rtt_many = self.engine.rtt_many
        while True:
            items = [await self.queue.get()]
            deadline = loop.time() + self.limits.wait_ms / 1000
            while len(items) < self.limits.coalesce:
                try:
                    items.append(self.queue.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    pass
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    items.append(await asyncio.wait_for(self.queue.get(), left))
                except TimeoutError:
                    break
            queries = [q for q, _ in items]
            try:
                results = await self.lane.run(lambda qs=queries: rtt_many(qs))
                self.batches += 1
            except Exception:  # isolate the failing query, answer the others
                results = []
                for q in queries:
                    try:
                        results.extend(await self.lane.run(lambda q=q: rtt_many([q])))
                    except Exception as e:  # its own error, for its own request
                        results.append(e)
                    self.batches += 1
            self.queries += len(items)
            self.largest = max(self.largest, len(items))
            for (_, fut), r in zip(items, results, strict=True):
                if fut.done():  # the client went away
                    continue
                if isinstance(r, Exception):
                    fut.set_exception(r)
                else:
                    fut.set_result(r)


class _BodyLimit:
    """ASGI middleware: a request body over `max_bytes` gets 413 before the app parses it."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(send)
        chunks, size, more = [], 0, True
        while more:  # read it all (bounded), then hand it on
            msg = await receive()
            if msg["type"] != "http.request":
                return
            chunks.append(msg.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._refuse(send)
            more = msg.get("more_body", False)
        first = {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        async def replay():
            nonlocal first
            if first is not None:
                msg, first = first, None
                return msg
            return await receive()  # later: the disconnect, for the lanes

        return await self.app(scope, replay, send)

    async def _refuse(self, send):
        body = json.dumps({"detail": f"request body over {self.max_bytes:,} bytes (the "
                           "server's max_body_bytes)"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


# ----------------------------------------------------------------------------------------------
# the app


def create_app(engine: Engine, limits: Limits | None = None) -> FastAPI:
    """The FastAPI app over `engine` (tests build one around an in-memory engine)."""
    limits = limits or Limits()
    fast, slow = _Lane("ping-llm-fast"), _Lane("ping-llm-slow")
    co = _Coalescer(engine, fast, limits)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        co.queue = asyncio.Queue()
        task = asyncio.create_task(co.run())
        try:
            yield
        finally:
            task.cancel()
            for lane in (fast, slow):
                lane.pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(
        title="ping-llm",
        version=__version__,
        description="Latency questions to a generative model of Internet measurements.",
        lifespan=lifespan,
        docs_url=None,  # FastAPI's pages load scripts from a CDN: ours below needs nothing
        redoc_url=None,
    )
    app.add_middleware(_BodyLimit, max_bytes=limits.max_body_bytes)
    app.state.engine, app.state.coalescer, app.state.limits = engine, co, limits

    @app.exception_handler(InputError)
    async def _input_error(request: Request, exc: InputError):
        return JSONResponse(status_code=422, content={"detail": str(exc)})

    def check(ok: bool, message: str) -> None:
        if not ok:
            raise HTTPException(status_code=422, detail=message)

    def context_of(context: Context, where: str = "context") -> list | None:
        """A body's context as measurements (RIPE results expanded per packet), within limits."""
        if context is None:
            return None
        ms = as_context([m.plain() for m in context])
        n = len(ms)
        check(n <= limits.max_context,
              f"{where} has {n} measurements; the limit is {limits.max_context}")
        return ms

    def priced(cost: int) -> _Lane:
        """The lane for a request of this cost; 422 over the budget."""
        check(cost <= limits.max_cost,
              f"this request would cost {cost:,} token positions; the limit is "
              f"{limits.max_cost:,} (max_cost): use longer prefixes (fewer completions), fewer "
              "queries or candidates, or a shorter context")
        return fast if cost <= limits.fast_cost else slow

    def context_len(ctx) -> int:
        return len(engine.runner.context(ctx).tokens)

    def to_query(q: QueryIn, shared: list | None = None) -> Query:
        own = context_of(q.context, f"query {q.src} -> {q.dst}: context")
        return Query(q.src, q.dst, q.time, shared if own is None else own, q.seed)

    async def rtt_answers(queries: list[Query], request: Request) -> list:
        # Pricing plans every query, so a bad one is a 422 before any joins a batch.
        lane = priced(engine.rtt_cost(queries))
        if lane is fast:
            return await co.ask(queries)
        return await slow.run(lambda: engine.rtt_many(queries), request)

    @app.get("/healthz")
    async def healthz() -> dict:
        c = engine.config
        return {
            "status": "ok",
            "version": __version__,
            "model": {"n_layer": c.n_layer, "n_embd": c.n_embd, "sequence_len": c.sequence_len},
            "calibrated": engine.calibration is not None,
            "rtt_batches": co.batches,
            "rtt_queries": co.queries,
            "largest_batch": co.largest,
            "cancelled": slow.cancelled,
            "limits": asdict(limits),
        }

    @app.get("/docs", response_class=HTMLResponse, include_in_schema=False)
    async def docs() -> str:
        return _docs_page(app.openapi())

    @app.post("/rtt")
    async def rtt(body: RTTIn, request: Request) -> dict:
        (d,) = await rtt_answers([to_query(body)], request)
        return d.to_dict(histogram=body.histogram)

    @app.post("/rtt_many")
    async def rtt_many(body: RTTManyIn, request: Request) -> dict:
        n = len(body.queries)
        check(0 < n <= limits.max_batch, f"queries must hold 1..{limits.max_batch} items, got {n}")
        shared = context_of(body.context)
        dists = await rtt_answers([to_query(q, shared) for q in body.queries], request)
        return {"results": [d.to_dict(histogram=body.histogram) for d in dists]}

    @app.post("/rank")
    async def rank(body: RankIn, request: Request) -> dict:
        n = len(body.candidates)
        check(
            0 < n <= limits.max_batch, f"candidates must hold 1..{limits.max_batch} items, got {n}"
        )
        ctx = context_of(body.context)
        lane = priced(engine.rtt_cost([Query(body.src, c, body.time) for c in body.candidates],
                                      ctx))
        ranked = await lane.run(
            lambda: engine.rank(body.src, body.candidates, by=body.by,
                                threshold_ms=body.threshold_ms, time=body.time, context=ctx),
            request,
        )
        return {"ranking": [r.to_dict() for r in ranked]}

    @app.post("/destinations")
    async def destinations(body: DestinationsIn, request: Request) -> dict:
        check(1 <= body.k <= limits.max_k, f"k must be in 1..{limits.max_k}, got {body.k}")
        ctx = context_of(body.context)
        n_bytes = tk.ADDRESS_BYTES[parse_target(body.src).version]
        paths = max(4 * body.k, 64) if body.method == "beam" else body.k  # generate's beam width
        lane = priced(context_len(ctx) + paths * (n_bytes + 2)
                      + body.k * (2 * n_bytes + 4 + RESULT_COST))  # + the rtt of each found
        found = await lane.run(
            lambda: engine.destinations(body.src, body.k, rtt_below=body.rtt_below,
                                        within=body.within, method=body.method, seed=body.seed,
                                        time=body.time, context=ctx),
            request,
        )
        return {"destinations": [d.to_dict() for d in found]}

    @app.post("/score")
    async def score(body: ScoreIn, request: Request) -> dict:
        n = len(body.measurements)
        check(0 < n <= limits.max_batch, f"measurements must hold 1..{limits.max_batch}, got {n}")
        ctx = context_of(body.context)
        lane = priced(n * (context_len(ctx) + MEASUREMENT_COST))  # each scored after the context
        scores = await lane.run(
            lambda: engine.score_many([m.plain() for m in body.measurements], context=ctx),
            request,
        )
        return {"scores": [s.to_dict() for s in scores]}

    @app.post("/sample")
    async def sample(body: SampleIn, request: Request) -> dict:
        check(
            1 <= body.n <= limits.max_sample, f"n must be in 1..{limits.max_sample}, got {body.n}"
        )
        ctx = context_of(body.context)
        lane = priced(context_len(ctx) + 2 * body.n * MEASUREMENT_COST)  # x2: window roll-overs
        ms = await lane.run(
            lambda: engine.sample(body.n, body.src, seed=body.seed,
                                  temperature=body.temperature, context=ctx),
            request,
        )
        return {"measurements": [m.to_dict() for m in ms]}

    return app


MEASUREMENT_COST = 48  # token positions of one measurement at most (IPv6, timestamp, result)


def _docs_page(spec: dict) -> str:
    """The endpoints and their request fields as one self-contained HTML page (no scripts)."""
    schemas = spec.get("components", {}).get("schemas", {})
    out = [f"<!doctype html><meta charset=utf-8><title>{html.escape(spec['info']['title'])}"
           "</title><style>body{font:15px/1.45 system-ui,sans-serif;max-width:52em;margin:2em auto}"
           "code{background:#f3f3f3;padding:0 .2em}td{padding:0 .8em .2em 0;vertical-align:top}"
           f"</style><h1>{html.escape(spec['info']['title'])} {spec['info']['version']}</h1>",
           f"<p>{html.escape(spec['info'].get('description', ''))} The machine-readable schema "
           "is <a href=/openapi.json>/openapi.json</a>.</p>"]
    for path, methods in spec["paths"].items():
        for method, op in methods.items():
            out.append(f"<h2><code>{method.upper()} {html.escape(path)}</code></h2>")
            ref = (op.get("requestBody", {}).get("content", {}).get("application/json", {})
                   .get("schema", {}).get("$ref", ""))
            props = schemas.get(ref.rsplit("/", 1)[-1], {}).get("properties", {})
            required = set(schemas.get(ref.rsplit("/", 1)[-1], {}).get("required", []))
            rows = [f"<tr><td><code>{html.escape(k)}</code>{'' if k in required else '?'}</td>"
                    f"<td>{html.escape(v.get('description', ''))}</td></tr>"
                    for k, v in props.items()]
            if rows:
                out.append("<table>" + "".join(rows) + "</table>")
    return "\n".join(out)


def serve(
    run_dir,
    host: str = "127.0.0.1",
    port: int = 8000,
    device: str = "cpu",
    limits: Limits | None = None,
    calibrated: bool = True,
    geo_db=None,
) -> None:
    """Load the run's model (with its calibration unless calibrated=False) and serve it until
    interrupted."""
    import uvicorn

    engine = Engine.load(run_dir, device=device, calibrated=calibrated, geo_db=geo_db)
    uvicorn.run(create_app(engine, limits), host=host, port=port, log_level="info")
