"""`ping-llm serve`: the query engine as an HTTP JSON service (FastAPI + uvicorn, SPEC §6).

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

Batching: RTT questions from concurrent requests (/rtt and every query of /rtt_many) go into one
asyncio queue; a single worker task takes the first, waits up to `wait_ms` for more, drains up to
`coalesce` of them and answers all with one `Engine.rtt_many` call. The model always runs in one
worker thread (the engine is not thread-safe, and the event loop must stay responsive), so the
other endpoints queue behind the current batch. /healthz reports `rtt_batches` (model calls of the
coalescer) and `rtt_queries`, which is how the tests see that 32 concurrent requests were answered
in a few batches. Bound to 127.0.0.1 unless told otherwise: the service has no authentication.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from typing import Literal

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from ping_llm import __version__
from ping_llm.errors import InputError
from ping_llm.query import Engine, Query
from ping_llm.targets import as_context


@dataclass
class Limits:
    """Per-request limits (422 beyond them) and the coalescer's settings."""

    max_batch: int = 1024  # queries per /rtt_many, candidates per /rank, measurements per /score
    max_context: int = 64  # context measurements per request (or per query)
    max_k: int = 1000  # /destinations k
    max_sample: int = 1000  # /sample n
    coalesce: int = 256  # RTT queries per model batch
    wait_ms: float = 2.0  # after the first queued query, wait this long for more to arrive


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
# the coalescer


class _Coalescer:
    """One queue of RTT questions, one worker task, one model thread."""

    def __init__(self, engine: Engine, pool, limits: Limits):
        self.engine, self.pool, self.limits = engine, pool, limits
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
                results = await loop.run_in_executor(self.pool, self.engine.rtt_many, queries)
                self.batches += 1
            except Exception:  # isolate the failing query, answer the others
                results = []
                for q in queries:
                    try:
                        results.extend(
                            await loop.run_in_executor(self.pool, self.engine.rtt_many, [q])
                        )
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


# ----------------------------------------------------------------------------------------------
# the app


def create_app(engine: Engine, limits: Limits | None = None) -> FastAPI:
    """The FastAPI app over `engine` (tests build one around an in-memory engine)."""
    limits = limits or Limits()
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="ping-llm")
    co = _Coalescer(engine, pool, limits)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        co.queue = asyncio.Queue()
        task = asyncio.create_task(co.run())
        try:
            yield
        finally:
            task.cancel()
            pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(
        title="ping-llm",
        version=__version__,
        description="Latency questions to a generative model of Internet measurements.",
        lifespan=lifespan,
    )
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

    async def in_thread(fn, *args, **kw):
        return await asyncio.get_running_loop().run_in_executor(pool, lambda: fn(*args, **kw))

    def to_query(q: QueryIn, shared: list | None = None) -> Query:
        own = context_of(q.context, f"query {q.src} -> {q.dst}: context")
        query = Query(q.src, q.dst, q.time, shared if own is None else own, q.seed)
        engine.check(query)  # InputError -> 422 before the query joins a batch
        return query

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
            "limits": asdict(limits),
        }

    @app.post("/rtt")
    async def rtt(body: RTTIn) -> dict:
        (d,) = await co.ask([to_query(body)])
        return d.to_dict(histogram=body.histogram)

    @app.post("/rtt_many")
    async def rtt_many(body: RTTManyIn) -> dict:
        n = len(body.queries)
        check(0 < n <= limits.max_batch, f"queries must hold 1..{limits.max_batch} items, got {n}")
        shared = context_of(body.context)
        dists = await co.ask([to_query(q, shared) for q in body.queries])
        return {"results": [d.to_dict(histogram=body.histogram) for d in dists]}

    @app.post("/rank")
    async def rank(body: RankIn) -> dict:
        n = len(body.candidates)
        check(
            0 < n <= limits.max_batch, f"candidates must hold 1..{limits.max_batch} items, got {n}"
        )
        ctx = context_of(body.context)
        ranked = await in_thread(
            engine.rank,
            body.src,
            body.candidates,
            by=body.by,
            threshold_ms=body.threshold_ms,
            time=body.time,
            context=ctx,
        )
        return {"ranking": [r.to_dict() for r in ranked]}

    @app.post("/destinations")
    async def destinations(body: DestinationsIn) -> dict:
        check(1 <= body.k <= limits.max_k, f"k must be in 1..{limits.max_k}, got {body.k}")
        ctx = context_of(body.context)
        found = await in_thread(
            engine.destinations,
            body.src,
            body.k,
            rtt_below=body.rtt_below,
            within=body.within,
            method=body.method,
            seed=body.seed,
            time=body.time,
            context=ctx,
        )
        return {"destinations": [d.to_dict() for d in found]}

    @app.post("/score")
    async def score(body: ScoreIn) -> dict:
        n = len(body.measurements)
        check(0 < n <= limits.max_batch, f"measurements must hold 1..{limits.max_batch}, got {n}")
        ctx = context_of(body.context)
        scores = await in_thread(
            engine.score_many, [m.plain() for m in body.measurements], context=ctx
        )
        return {"scores": [s.to_dict() for s in scores]}

    @app.post("/sample")
    async def sample(body: SampleIn) -> dict:
        check(
            1 <= body.n <= limits.max_sample, f"n must be in 1..{limits.max_sample}, got {body.n}"
        )
        ctx = context_of(body.context)
        ms = await in_thread(
            engine.sample,
            body.n,
            body.src,
            seed=body.seed,
            temperature=body.temperature,
            context=ctx,
        )
        return {"measurements": [m.to_dict() for m in ms]}

    return app


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
