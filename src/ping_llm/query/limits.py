"""The HTTP service's per-request limits and its lanes' settings (`ping-llm serve` flags).

Kept apart from `query.server` so that the command line can build its flags from these fields
without importing FastAPI and torch (`ping-llm --help` stays quick).
"""

from __future__ import annotations

from dataclasses import dataclass

from ping_llm.options import option


@dataclass
class Limits:
    """Per-request limits (422 beyond them, 413 for the body) and the lanes' settings. Each field
    is also a `ping-llm serve` flag (--max-cost ...) whose help is the field's."""

    max_batch: int = option(1024, "queries per /rtt_many, candidates per /rank, measurements "
                            "per /score")
    max_context: int = option(60, "context measurements per request (60 IPv4 ones 4 minutes "
                              "apart take 967 of a 1024-token window; what does not fit the "
                              "model's window is refused by its own length check)")
    max_k: int = option(1000, "/destinations k")
    max_sample: int = option(1000, "/sample n")
    max_cost: int = option(50_000, "token positions one request may cost (an IPv4 0/0 -> 0/0 "
                           "query costs ~21,000, a plain one ~45)")
    fast_cost: int = option(4_000, "requests costing up to this run on the fast lane")
    max_body_bytes: int = option(1 << 20, "request body size in bytes (413 beyond it)")
    coalesce: int = option(256, "cheap RTT queries answered per model batch")
    wait_ms: float = option(2.0, "after the first queued query, wait this long for more",
                            metavar="MS")
