"""RIPE Atlas ping results (JSON) -> canonical measurement rows: the parsing rules.

This module decides what one result means: which rows it gives, which source identity they get,
or why it is rejected. Reading files (decompression, framing, streaming, Parquet output, workers,
the report) is `ping_llm.data.ingest`, which feeds every result through the `Batch` defined here.

Rules (one row per ping packet):
- One row per entry of `result`: `{"rtt": x}` -> x (ms); `{"x": "*"}` -> -1.0 (timeout);
  `{"error": ...}` -> -1.0, also counted as `errors`; entries with a `dup` key (extra replies;
  RIPE writes "dup": 1, and like ripe.atlas.sagan any `dup` key counts) and `late` entries
  (replies to an earlier packet) are not pings: skipped and counted. All packets of a result
  share its `timestamp` (results carry no per-packet time) -> `event_time`.
- Old firmware (fw 1 .. 4570) is recognised by its keys, not by `fw`: `addr`/`name` instead of
  `dst_addr`/`dst_name`, `srcaddr` instead of `src_addr`, `pf` or `mode` ("ICMP4"/"ICMP6") instead
  of `af` (if all are missing, the family of the destination), numbers as strings ("12.3"),
  per-packet `srcaddr`/`src_addr`/`src_Addr` (the probe's address for that packet) and `ttl`.
  Results without a `result` list (fw 1) have only sent/rcvd/min/avg/max: they become `rcvd`
  reply rows with values that keep min, max and mean exact (min, max and the rest at the value
  that restores the mean) plus `sent - rcvd` failure rows; counted as `summary_only`.
  `size` is normalised like RIPE's own parser (ripe.atlas.sagan): fw 4460-4569 ICMP sizes
  included the 8-byte ICMP header (minus 8); fw < 4460 sizes have unknown meaning (null).
- Source identity (`source_address`): "src_addr" = the probe's local address; "from" = the
  address the RIPE controller saw (public, NAT-side); "auto" (default) = `src_addr` when it is
  globally routable, else `from` (private RFC 1918, CGNAT 100.64/10, loopback, link-local,
  unspecified, documentation, benchmarking, multicast/reserved, ULA fc00::/7, site-local ...).
  A per-packet source address overrides the result's under "src_addr", and under "auto" when it
  is global. A result whose chosen source is empty/missing (e.g. no `from` and a private
  `src_addr`) has no usable identity: skipped and counted (`skipped.no_source`).
- `dst_addr` missing or empty (DNS failure) -> result skipped, counted (`skipped.no_dst_addr`).
- Addresses must parse and match `af`; they are written in canonical form (lower-case, shortest
  IPv6). IPv4-mapped IPv6 (::ffff:a.b.c.d) is the IPv4 address a.b.c.d: accepted as such in an
  af=4 result, an `af_mismatch` in an af=6 result.
- A bad result is rejected as a whole (none of its rows kept) with one reason: malformed_json,
  not_an_object, not_ping, missing_timestamp, bad_timestamp, missing_result, bad_result,
  bad_entry, bad_rtt, bad_summary, bad_af, bad_address, af_mismatch, bad_prb_id, bad_msm_id,
  bad_size. Timestamps must lie in 2000..2100; `type`, when present, must be "ping".
- The same result twice (same `result_key`: msm_id, prb_id and timestamp, or the same content)
  is one result: ingest keeps the first and counts the others as `skipped.duplicate`.
- Plausibility, also rejects: implausible_rtt (a reply over MAX_RTT_MS = 60 s: Atlas waits
  seconds, so such a value is corruption, not latency), too_many_packets (more than
  MAX_PACKETS = 16 pings in one result, Atlas's own maximum), scoped_address (a destination
  with an IPv6 zone such as fe80::1%eth0: it names an address on that probe's link only, and
  stripping the zone would merge different probes' neighbours into one address).

Python API: `parse_result(obj, source_address="auto") -> ParsedResult` for one result (raises
`RejectedResult`, an InputError with `.reason`); `is_globally_routable(address)` (the "auto"
rule). Hot path: `Batch.add` appends columns (no per-row objects) and `Batch.table()` builds
one canonical Arrow table per chunk; addresses are parsed once per distinct string (a cache).
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
from collections import Counter
from dataclasses import dataclass

import numpy as np
import orjson
import pyarrow as pa

from ping_llm.data.schema import CANONICAL_SCHEMA, FAILED_RTT
from ping_llm.errors import InputError

SOURCE_MODES = ("auto", "from", "src_addr")
# Plausibility: RIPE Atlas pings send 1..16 packets and wait seconds, not minutes, for a reply.
MAX_PACKETS = 16
MAX_RTT_MS = 60_000.0
_MIN_TS, _MAX_TS = 946_684_800, 4_102_444_800  # 2000-01-01 .. 2100-01-01 UTC
_I64 = 1 << 63
_U64 = (1 << 64) - 1

# ----------------------------------------------------------------------------------------------
# addresses: parse once per distinct string (a cache), classify, normalise

_NON_GLOBAL_SPECS = (  # not a public unicast source (IANA special-purpose registries)
    *("0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16"),
    *("172.16.0.0/12", "192.0.0.0/24", "192.0.2.0/24", "192.168.0.0/16", "198.18.0.0/15"),
    *("198.51.100.0/24", "203.0.113.0/24", "224.0.0.0/3"),  # .. multicast, reserved, broadcast
    *("::/128", "::1/128", "64:ff9b:1::/48", "100::/64", "2001:2::/48", "2001:10::/28"),
    *("2001:db8::/32", "3fff::/20", "5f00::/16", "fc00::/7", "fe80::/10", "fec0::/10"),
    "ff00::/8",
)
_NON_GLOBAL = {4: [], 6: []}
for _spec in _NON_GLOBAL_SPECS:
    _net = ipaddress.ip_network(_spec)
    _NON_GLOBAL[_net.version].append((int(_net.network_address), int(_net.netmask)))
_ADDR_CACHE: dict = {}


def _classify(text):
    """str -> (canonical text, version, globally routable) or None when not an address."""
    if type(text) is not str or not text or len(text) > 64:
        return None
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    n = int(ip)
    is_global = not any((n & mask) == net for net, mask in _NON_GLOBAL[ip.version])
    out = (str(ip), ip.version, is_global)
    if len(_ADDR_CACHE) >= 1 << 20:
        _ADDR_CACHE.clear()
    _ADDR_CACHE[text] = out
    return out


def _addr(text):
    try:
        return _ADDR_CACHE[text]
    except KeyError:
        return _classify(text)
    except TypeError:  # unhashable (a list or dict where an address should be)
        return None


def is_globally_routable(address: str) -> bool:
    """True for a public unicast address (the `auto` rule); InputError when not an address."""
    a = _addr(address)
    if a is None:
        raise InputError(f"not an IP address: {address!r}")
    return a[2]


# ----------------------------------------------------------------------------------------------
# one result -> rows


class Reject(Exception):
    """A result `Batch.add` refuses; args[0] is the counted reason (cheaper than
    RejectedResult's message on the hot path)."""


class RejectedResult(InputError):
    """A result that is not a valid ping result; `.reason` is the counted reason."""

    def __init__(self, reason: str):
        super().__init__(f"rejected result: {reason}")
        self.reason = reason


def _num(v, reason, kind=float):
    """Tolerant number: the type itself, or a numeric string (old firmware); bool is refused."""
    t = type(v)
    if t is kind:
        return v
    if t is int or t is float:
        x = v
    elif t is str:
        try:
            x = float(v) if kind is float else int(v)
        except ValueError:
            try:
                x = float(v)
            except ValueError:
                raise Reject(reason) from None
    else:
        raise Reject(reason)
    if kind is int:
        if type(x) is float and not x.is_integer():
            raise Reject(reason)
        return int(x)
    x = float(x)
    if not math.isfinite(x):
        raise Reject(reason)
    return x


def _af(v):
    if v is None:
        return None
    if type(v) is str and v.upper().startswith(("ICMP", "UDP", "TCP")):  # fw 4400 `mode`
        v = v[-1]
    af = _num(v, "bad_af", int)
    if af != 4 and af != 6:
        raise Reject("bad_af")
    return af


def _summary_rtts(obj) -> tuple[list[float], int]:
    """fw 1 results (no `result` list): reply values keeping min/max/mean, and the lost count."""
    get = obj.get
    rcvd = _num(get("rcvd", 0), "bad_summary", int)
    sent = get("sent")
    sent = rcvd if sent is None else _num(sent, "bad_summary", int)
    if rcvd < 0 or sent < rcvd:
        raise Reject("bad_summary")
    if sent > MAX_PACKETS:
        raise Reject("too_many_packets")
    if rcvd == 0:
        return [], sent
    avg = _num(get("avg"), "bad_summary")
    lo = avg if get("min") is None else _num(get("min"), "bad_summary")
    hi = avg if get("max") is None else _num(get("max"), "bad_summary")
    if not (0 <= lo <= avg * (1 + 1e-9) + 1e-9 and avg <= hi * (1 + 1e-9) + 1e-9):
        raise Reject("bad_summary")
    if hi > MAX_RTT_MS:
        raise Reject("implausible_rtt")
    if rcvd == 1:
        return [avg], sent - 1
    if rcvd == 2:
        return [lo, hi], sent - 2
    mid = min(max((rcvd * avg - lo - hi) / (rcvd - 2), lo), hi)
    return [lo, hi] + [mid] * (rcvd - 2), sent - rcvd


# What a Batch counts, per input (ingest's report adds them up over inputs).
COUNTS = ("results", "rows", "replies", "failed", "errors", "dups", "late", "summary_only",
           "results_empty")


class Batch:
    """Columnar accumulation: one segment per (result, source), one rtt per row."""

    def __init__(self, mode: str = "auto"):
        if mode not in SOURCE_MODES:
            raise InputError(f"source_address must be one of {SOURCE_MODES}, got {mode!r}")
        self.mode = mode
        self.counts = dict.fromkeys(COUNTS, 0)
        self.skipped: Counter = Counter()
        self.rejects: Counter = Counter()
        self._clear()

    def _clear(self):
        self.ts, self.src, self.dst, self.ver = [], [], [], []
        self.prb, self.msm, self.size, self.n = [], [], [], []
        self.rtt: list[float] = []

    def __len__(self):
        return len(self.n)

    def _source(self, get, af):
        """The source identity of a result: (canonical address, global) or None = no source."""
        mode = self.mode
        if mode != "from":
            sa = get("src_addr")
            if sa is None:
                sa = get("srcaddr")
            if sa:
                s = _addr(sa)
                if s is None:
                    raise Reject("bad_address")
                if mode == "src_addr" or s[2]:
                    if s[1] != af:
                        raise Reject("af_mismatch")
                    return s
            elif mode == "src_addr":
                return None
        fr = get("from")
        if not fr:
            return None
        s = _addr(fr)
        if s is None:
            raise Reject("bad_address")
        if s[1] != af:
            raise Reject("af_mismatch")
        return s

    def add(self, obj) -> None:
        """Append one result's rows; raises Reject (nothing appended) for bad input."""
        if type(obj) is not dict:
            raise Reject("not_an_object")
        get = obj.get
        typ = get("type")
        if typ is not None and typ != "ping":
            raise Reject("not_ping")
        ts = get("timestamp")
        if type(ts) is not int:
            if ts is None:
                raise Reject("missing_timestamp")
            ts = math.floor(_num(ts, "bad_timestamp"))
        if not _MIN_TS <= ts < _MAX_TS:
            raise Reject("bad_timestamp")
        res = get("result")
        if res is not None and type(res) is not list:
            raise Reject("bad_result")
        if res is None and get("avg") is None and get("rcvd") is None:
            raise Reject("missing_result")
        dst = get("dst_addr")
        if dst is None:
            dst = get("addr")  # fw < 4460
        if dst is None or dst == "":
            self.skipped["no_dst_addr"] += 1
            return
        d = _addr(dst)
        if d is None:
            raise Reject("bad_address")
        if "%" in dst:  # fe80::1%eth0: only means something on that probe's own link
            raise Reject("scoped_address")
        af = get("af")
        if af is None:
            af = _af(get("pf")) or _af(get("mode")) or d[1]
        elif type(af) is not int or (af != 4 and af != 6):
            af = _af(af)
        if d[1] != af:
            raise Reject("af_mismatch")
        src = self._source(get, af)
        if src is None:
            self.skipped["no_source"] += 1
            return
        prb, msm, size = get("prb_id"), get("msm_id"), get("size")
        if prb is not None:
            if type(prb) is not int:
                prb = _num(prb, "bad_prb_id", int)
            if not -_I64 <= prb < _I64:
                raise Reject("bad_prb_id")
        if msm is not None:
            if type(msm) is not int:
                msm = _num(msm, "bad_msm_id", int)
            if not -_I64 <= msm < _I64:
                raise Reject("bad_msm_id")
        if size is not None:
            if type(size) is not int:
                size = _num(size, "bad_size", int)
            if not 0 <= size < 1 << 31:
                raise Reject("bad_size")
            fw = get("fw")
            if type(fw) is not int:
                fw = int(fw) if type(fw) is str and fw.strip().isdigit() else None
            if fw is not None and 0 < fw < 4570:
                if fw < 4460:
                    size = None
                elif get("proto", "ICMP") == "ICMP" and size >= 8:
                    size -= 8
        rtt = self.rtt
        n0 = r0 = len(rtt)
        s0 = len(self.n)
        dups = late = errors = 0
        src_text = base_src = src[0]
        mode = self.mode
        if res is None:
            values, lost = _summary_rtts(obj)
            rtt.extend(values)
            rtt.extend([FAILED_RTT] * lost)
            self.counts["summary_only"] += 1
        else:
            try:
                for e in res:
                    if type(e) is not dict:
                        raise Reject("bad_entry")
                    v = e.get("rtt")
                    if v is not None:
                        if "dup" in e:
                            dups += 1
                            continue
                        if type(v) is not float:
                            v = _num(v, "bad_rtt")
                        if not 0.0 <= v < math.inf:
                            raise Reject("bad_rtt")
                        if v > MAX_RTT_MS:
                            raise Reject("implausible_rtt")
                    elif "x" in e:
                        v = FAILED_RTT
                    elif "error" in e:
                        v = FAILED_RTT
                        errors += 1
                    elif "dup" in e:
                        dups += 1
                        continue
                    elif "late" in e:
                        late += 1
                        continue
                    else:
                        raise Reject("bad_entry")
                    # A per-packet source address ("if different from the first reply's").
                    target = base_src
                    if len(e) > 1 and mode != "from":
                        es = e.get("src_addr") or e.get("srcaddr") or e.get("src_Addr")
                        if es:
                            a = _addr(es)
                            if a is None:
                                raise Reject("bad_address")
                            if a[1] != af:
                                raise Reject("af_mismatch")
                            if mode == "src_addr" or a[2]:
                                target = a[0]
                    if target is not src_text and target != src_text:
                        self._segment(ts, src_text, d[0], af, prb, msm, size, len(rtt) - n0)
                        n0, src_text = len(rtt), target
                    rtt.append(v)
                if len(rtt) - r0 > MAX_PACKETS:
                    raise Reject("too_many_packets")
            except Reject:
                del rtt[r0:]
                for col in (self.ts, self.src, self.dst, self.ver, self.prb, self.msm, self.size,
                            self.n):
                    del col[s0:]
                raise
        self._segment(ts, src_text, d[0], af, prb, msm, size, len(rtt) - n0)
        c = self.counts
        c["dups"] += dups
        c["late"] += late
        c["errors"] += errors
        if len(rtt) == r0:
            c["results_empty"] += 1

    def _segment(self, ts, src, dst, af, prb, msm, size, n):
        if n:
            self.ts.append(ts)
            self.src.append(src)
            self.dst.append(dst)
            self.ver.append(af)
            self.prb.append(prb)
            self.msm.append(msm)
            self.size.append(size)
            self.n.append(n)

    def table(self) -> pa.Table:
        """The accumulated rows as a canonical table; clears the buffers."""
        counts = np.asarray(self.n, dtype=np.int64)
        idx = pa.array(np.repeat(np.arange(len(counts)), counts))
        rtt = np.asarray(self.rtt, dtype=np.float64)
        cols = [
            pa.array(np.asarray(self.ts, dtype=np.int64)).take(idx).cast(
                CANONICAL_SCHEMA.field("event_time").type),
            pa.array(self.src, pa.string()).take(idx),
            pa.array(self.dst, pa.string()).take(idx),
            pa.array(np.asarray(self.ver, dtype=np.int8)).take(idx),
            pa.array(rtt),
            pa.array(self.prb, pa.int64()).take(idx),
            pa.array(self.msm, pa.int64()).take(idx),
            pa.array(self.size, pa.int32()).take(idx),
        ]
        n_failed = int(np.count_nonzero(rtt < 0))
        self.counts["rows"] += len(rtt)
        self.counts["failed"] += n_failed
        self.counts["replies"] += len(rtt) - n_failed
        self._clear()
        return pa.Table.from_arrays(cols, schema=CANONICAL_SCHEMA)


@dataclass
class ParsedResult:
    """What one result becomes: its rows (canonical column dicts) and what was left out."""

    rows: list[dict]
    skipped: str | None = None  # "no_dst_addr" / "no_source": a valid result without rows
    dups: int = 0
    late: int = 0
    errors: int = 0


def result_key(obj) -> int | None:
    """A result's identity in 64 bits, for dropping a result seen twice (overlapping downloads,
    a dump and an API fetch of the same hour): RIPE Atlas's own (msm_id, prb_id, timestamp) when
    all three are there, else the result's whole content. None for what is not a result (a
    non-object, rejected anyway). A 64-bit hash (of the three integers, or blake2b of the
    content): two different results collide with odds ~1e-5 among 10^7 of them."""
    if type(obj) is not dict:
        return None
    get = obj.get
    ident = (get("msm_id"), get("prb_id"), get("timestamp"))
    if type(ident[0]) is int and type(ident[1]) is int and type(ident[2]) is int:
        return hash(ident) & _U64  # ints hash the same in every process (only str is salted)
    if None in ident:
        try:
            payload = orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)
        except (TypeError, orjson.JSONEncodeError):
            return None
    else:
        payload = repr(ident).encode()
    return int.from_bytes(hashlib.blake2b(payload, digest_size=8).digest(), "little")


def parse_result(obj, source_address: str = "auto") -> ParsedResult:
    """One RIPE Atlas ping result (a dict, JSON text or bytes) -> ParsedResult.

    Raises RejectedResult (an InputError with `.reason`) when it is not a valid ping result.
    """
    b = Batch(source_address)
    if isinstance(obj, str | bytes):
        try:
            obj = orjson.loads(obj)
        except orjson.JSONDecodeError:
            raise RejectedResult("malformed_json") from None
    try:
        b.add(obj)
    except Reject as e:
        raise RejectedResult(str(e.args[0])) from None
    c = b.counts
    skipped = next(iter(b.skipped), None)
    return ParsedResult(b.table().to_pylist(), skipped, c["dups"], c["late"], c["errors"])
