"""What a question is about: addresses and CIDR prefixes, times, measurements, queries.

Everything here validates caller input and turns it into what the engine reads: a `Target` is a
full address or a CIDR prefix (host bits cleared; its free bytes become "holes" the engine fills
from the model's own distribution), `parse_time` accepts epoch seconds or ISO 8601 (naive = UTC),
`as_measurement` accepts the shapes callers use for context measurements, `as_context` also
takes RIPE Atlas ping results as downloaded (one measurement per packet), and `Query` is one RTT
question. Bad input raises InputError with the offending value in the message.
"""

from __future__ import annotations

import datetime
import math
from dataclasses import dataclass

import numpy as np

from ping_llm import tokens as tk
from ping_llm.errors import InputError


@dataclass(frozen=True)
class Target:
    """An address or a CIDR prefix: 16 packed bytes (IPv4 in the first 4), version, prefix bits."""

    packed: bytes
    version: int
    prefix: int

    @property
    def nbytes(self) -> int:
        return 4 if self.version == 4 else 16

    @property
    def is_full(self) -> bool:
        return self.prefix == 8 * self.nbytes

    @property
    def n_completions(self) -> int:
        return 2 ** (8 * self.nbytes - self.prefix)

    def items(self) -> list:
        """Per address byte: the byte, or (lo, hi) its inclusive range when not fully known (the
        form `tokens.query_prefix` takes)."""
        out: list = []
        for i in range(self.nbytes):
            fixed = min(max(self.prefix - 8 * i, 0), 8)
            b = self.packed[i]
            if fixed == 8:
                out.append(b)
            else:
                mask = (0xFF << (8 - fixed)) & 0xFF
                out.append((b & mask, (b & mask) | (~mask & 0xFF)))
        return out

    def __str__(self) -> str:
        addr = tk.format_address(self.packed, self.version)
        return addr if self.is_full else f"{addr}/{self.prefix}"


def parse_target(text) -> Target:
    """'192.0.2.1', '10.1.2.0/24', '2001:db8::/48' -> Target (host bits of a prefix are cleared)."""
    if not isinstance(text, str) or not text.strip():
        raise InputError(f"expected an IP address or CIDR prefix, got {text!r}")
    addr, _, plen = text.strip().partition("/")
    packed, version = tk.parse_address(addr)
    bits = 32 if version == 4 else 128
    if plen == "":
        prefix = bits
    else:
        try:
            prefix = int(plen)
        except ValueError:
            raise InputError(f"bad prefix length in {text!r}") from None
        if not 0 <= prefix <= bits:
            raise InputError(
                f"prefix length /{prefix} in {text!r} is longer than an IPv{version} address "
                f"({bits} bits)"
                if prefix > bits
                else f"prefix length in {text!r} must be >= 0"
            )
    raw = bytearray(packed)
    for i in range(16):  # clear host bits
        keep = min(max(prefix - 8 * i, 0), 8)
        raw[i] &= (0xFF << (8 - keep)) & 0xFF
    return Target(bytes(raw), version, prefix)


def parse_time(t) -> int | None:
    """None, epoch seconds (int or digit string) or ISO 8601 (naive = UTC) -> epoch seconds."""
    if t is None:
        return None
    if isinstance(t, datetime.datetime):
        dt = t if t.tzinfo else t.replace(tzinfo=datetime.UTC)
        value = int(dt.timestamp())
    elif isinstance(t, bool):
        raise InputError(f"time must be epoch seconds or ISO 8601, got {t!r}")
    elif isinstance(t, int | np.integer) or (isinstance(t, float) and t.is_integer()):
        value = int(t)
    elif isinstance(t, str) and t.strip().lstrip("-").isdigit():
        value = int(t.strip())
    elif isinstance(t, str):
        try:
            dt = datetime.datetime.fromisoformat(t.strip())
        except ValueError:
            raise InputError(f"time {t!r} is neither epoch seconds nor ISO 8601") from None
        return parse_time(dt)
    else:
        raise InputError(f"time must be epoch seconds or ISO 8601, got {t!r}")
    if not 0 <= value < 2**63:
        raise InputError(f"time {t!r} is outside 1970 .. 2**63 s")
    return value


def as_measurement(x) -> tk.Measurement:
    """tokens.Measurement, a dict {src, dst, rtt_ms (or rtt; None/negative = failed), time}, or a
    tuple (src, dst, rtt_ms[, time]) -> a validated Measurement (full addresses only)."""
    if isinstance(x, tk.Measurement):
        src, dst, rtt, time = x.src, x.dst, x.rtt_ms, x.time
    elif isinstance(x, dict):
        unknown = set(x) - {"src", "dst", "rtt_ms", "rtt", "time"}
        if unknown or "src" not in x or "dst" not in x:
            raise InputError(f"a measurement needs keys src, dst, rtt_ms [, time]; got {sorted(x)}")
        src, dst, time = x["src"], x["dst"], x.get("time")
        rtt = x.get("rtt_ms", x.get("rtt"))
    elif isinstance(x, list | tuple) and len(x) in (3, 4):
        src, dst, rtt = x[:3]
        time = x[3] if len(x) == 4 else None
    else:
        raise InputError(f"not a measurement: {x!r}")
    if rtt is None or (isinstance(rtt, str) and rtt.strip().lower() in ("failed", "*")):
        rtt = -1.0
    try:
        rtt = float(rtt)
    except (TypeError, ValueError):
        raise InputError(f"rtt_ms must be a number (negative = failed), got {rtt!r}") from None
    if not math.isfinite(rtt):
        raise InputError(f"rtt_ms must be finite, got {rtt!r}")
    s, d = parse_target(src), parse_target(dst)
    if not (s.is_full and d.is_full):
        raise InputError(f"a measurement needs full addresses, not prefixes: {src} -> {dst}")
    if s.version != d.version:
        raise InputError(f"mixed address families in a measurement: {src} -> {dst}")
    return tk.Measurement(str(s), str(d), rtt if rtt >= 0 else -1.0, parse_time(time))


MAX_CONTEXT_ITEMS = 100_000  # a context longer than any model's window is a mistake, not data


def is_atlas_result(x) -> bool:
    """A RIPE Atlas ping result (API download or daily dump line), not one of our measurements."""
    return isinstance(x, dict) and "result" in x


def as_context(items, source_address: str = "auto") -> list[tk.Measurement]:
    """Context measurements from what a caller has, in the order given: our shapes
    (`as_measurement`) and RIPE Atlas ping results, which become one measurement per packet
    (lost packets as failed, the source chosen as ingest does: the public `from` address
    behind NAT). Results without a destination (DNS failures) add nothing."""
    from ping_llm.data.ripe import RejectedResult, parse_result

    items = list(items or [])
    if len(items) > MAX_CONTEXT_ITEMS:
        raise InputError(f"context has {len(items)} items; at most {MAX_CONTEXT_ITEMS} are read")
    out: list[tk.Measurement] = []
    for i, x in enumerate(items):
        if not is_atlas_result(x):
            out.append(as_measurement(x))
            continue
        try:
            rows = parse_result(x, source_address).rows
        except RejectedResult as e:
            raise InputError(f"context item {i} is not a usable RIPE Atlas ping result: "
                             f"{e.reason}") from None
        out += [as_measurement((r["src_addr"], r["dst_addr"], r["rtt"], r["event_time"]))
                for r in rows]
    return out


@dataclass
class Query:
    """One RTT question; `context` (if any) replaces the context shared by a `rtt_many` call."""

    src: str
    dst: str
    time: object = None
    context: list | None = None
    seed: int = 0  # Monte Carlo seed for large partial addresses


def as_query(q) -> Query:
    if isinstance(q, Query):
        return q
    if isinstance(q, dict):
        unknown = set(q) - {"src", "dst", "time", "context", "seed"}
        if unknown or "src" not in q or "dst" not in q:
            raise InputError(
                f"a query needs keys src, dst [, time, context, seed]; got {sorted(q)}"
            )
        return Query(**q)
    if isinstance(q, list | tuple) and len(q) in (2, 3):
        return Query(*q)
    raise InputError(f"not a query: {q!r} (expected (src, dst[, time]), a dict or a Query)")
