"""RIPE Atlas ping results (JSON) -> the canonical measurement table (SPEC §2.2).

Inputs: daily dumps (one JSON result per line; gzip, bzip2, zstd or plain, detected from the
content, not the file name), API downloads (a JSON array, pretty-printed or not; also any stream
of concatenated JSON values), or stdin ("-"). Everything is streamed in blocks: memory stays flat
whatever the file size (bounded by one chunk of ~128k results and the longest line).

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
- Bad input never stops the run and never loses other results' rows. A bad result is rejected as
  a whole with one reason: malformed_json, not_an_object, not_ping, missing_timestamp,
  bad_timestamp, missing_result, bad_result, bad_entry, bad_rtt, bad_summary, bad_af,
  bad_address, af_mismatch, bad_prb_id, bad_msm_id, bad_size; per file: truncated_file (the
  compressed stream ends early; rows before it are kept, the partial last line is the reject),
  corrupt_file (undecodable compressed data), line_too_long (> 64 MiB without a newline).
  Each reject is a JSON line {"source", "line", "reason", "raw"} (raw capped at 64 KiB; line is
  1-based, the line where the element starts for JSON arrays, null for a damaged array file).
  Timestamps must lie in 2000..2100; `type`, when present, must be "ping". A JSON value that is
  an array inside a JSON-lines file is taken as a list of results.

Output layout (one Parquet file per input, so a month of dumps is ingested file by file and
appended, in parallel over files; re-running is idempotent):

    OUT/<input name>-<path id: 8 hex><version: 8 hex>.parquet   zstd, CANONICAL_SCHEMA, the
                                                                per-file report in its metadata
    OUT/_rejects/<same stem>.jsonl                              that input's rejects, if any

The version part hashes the input's name, size and mtime, the source-address mode and the
format version; an existing output with the same name is complete (outputs are written to a
temporary name and renamed), so the input is skipped and its stored report reused. When the input
changed since (or the source-address mode), its older output is replaced, never duplicated.
stdin is named by a digest of its content. A killed run leaves only hidden `.ingest-*.tmp` files.

Python API (the CLI verb `ping-llm ingest` is a thin wrapper): `ingest(inputs, out_dir,
source_address="auto", workers=1, rejects=None, progress=True) -> IngestReport`;
`iter_tables(source, ...)` streams one input as Arrow tables without writing anything;
`parse_result(obj, source_address="auto") -> ParsedResult` for one result. Worker processes are
spawned (not forked: pyarrow's threads make fork unsafe), so scripts that call `ingest` with
workers > 1 need the usual `if __name__ == "__main__":` guard.
"""

from __future__ import annotations

import bz2
import codecs
import concurrent.futures as cf
import glob
import hashlib
import ipaddress
import json
import math
import multiprocessing as mp
import os
import re
import sys
import time
import zlib
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from ping_llm.errors import InputError
from ping_llm.schema import CANONICAL_SCHEMA, FAILED_RTT

SOURCE_MODES = ("auto", "from", "src_addr")
FORMAT_VERSION = 1
REPORT_KEY = b"ping_llm.ingest"
CHUNK_RESULTS = 1 << 17  # results per Arrow table / Parquet row group (~400k rows)
READ_BYTES = 1 << 20
MAX_LINE = 64 << 20
MAX_RAW = 64 << 10
_MIN_TS, _MAX_TS = 946_684_800, 4_102_444_800  # 2000-01-01 .. 2100-01-01 UTC
_I64 = 1 << 63

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


class _Reject(Exception):
    pass


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
                raise _Reject(reason) from None
    else:
        raise _Reject(reason)
    if kind is int:
        if type(x) is float and not x.is_integer():
            raise _Reject(reason)
        return int(x)
    x = float(x)
    if not math.isfinite(x):
        raise _Reject(reason)
    return x


def _af(v):
    if v is None:
        return None
    if type(v) is str and v.upper().startswith(("ICMP", "UDP", "TCP")):  # fw 4400 `mode`
        v = v[-1]
    af = _num(v, "bad_af", int)
    if af != 4 and af != 6:
        raise _Reject("bad_af")
    return af


def _summary_rtts(obj) -> tuple[list[float], int]:
    """fw 1 results (no `result` list): reply values keeping min/max/mean, and the lost count."""
    get = obj.get
    rcvd = _num(get("rcvd", 0), "bad_summary", int)
    sent = get("sent")
    sent = rcvd if sent is None else _num(sent, "bad_summary", int)
    if rcvd < 0 or sent < rcvd or sent > 1024:  # RIPE pings send at most 16 packets
        raise _Reject("bad_summary")
    if rcvd == 0:
        return [], sent
    avg = _num(get("avg"), "bad_summary")
    lo = avg if get("min") is None else _num(get("min"), "bad_summary")
    hi = avg if get("max") is None else _num(get("max"), "bad_summary")
    if not (0 <= lo <= avg * (1 + 1e-9) + 1e-9 and avg <= hi * (1 + 1e-9) + 1e-9):
        raise _Reject("bad_summary")
    if rcvd == 1:
        return [avg], sent - 1
    if rcvd == 2:
        return [lo, hi], sent - 2
    mid = min(max((rcvd * avg - lo - hi) / (rcvd - 2), lo), hi)
    return [lo, hi] + [mid] * (rcvd - 2), sent - rcvd


_COUNTS = ("results", "rows", "replies", "failed", "errors", "dups", "late", "summary_only",
           "results_empty")


class _Batch:
    """Columnar accumulation: one segment per (result, source), one rtt per row."""

    def __init__(self, mode: str = "auto"):
        if mode not in SOURCE_MODES:
            raise InputError(f"source_address must be one of {SOURCE_MODES}, got {mode!r}")
        self.mode = mode
        self.counts = dict.fromkeys(_COUNTS, 0)
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
                    raise _Reject("bad_address")
                if mode == "src_addr" or s[2]:
                    if s[1] != af:
                        raise _Reject("af_mismatch")
                    return s
            elif mode == "src_addr":
                return None
        fr = get("from")
        if not fr:
            return None
        s = _addr(fr)
        if s is None:
            raise _Reject("bad_address")
        if s[1] != af:
            raise _Reject("af_mismatch")
        return s

    def add(self, obj) -> None:
        """Append one result's rows; raises _Reject (nothing appended) for bad input."""
        if type(obj) is not dict:
            raise _Reject("not_an_object")
        get = obj.get
        typ = get("type")
        if typ is not None and typ != "ping":
            raise _Reject("not_ping")
        ts = get("timestamp")
        if type(ts) is not int:
            if ts is None:
                raise _Reject("missing_timestamp")
            ts = math.floor(_num(ts, "bad_timestamp"))
        if not _MIN_TS <= ts < _MAX_TS:
            raise _Reject("bad_timestamp")
        res = get("result")
        if res is not None and type(res) is not list:
            raise _Reject("bad_result")
        if res is None and get("avg") is None and get("rcvd") is None:
            raise _Reject("missing_result")
        dst = get("dst_addr")
        if dst is None:
            dst = get("addr")  # fw < 4460
        if dst is None or dst == "":
            self.skipped["no_dst_addr"] += 1
            return
        d = _addr(dst)
        if d is None:
            raise _Reject("bad_address")
        af = get("af")
        if af is None:
            af = _af(get("pf")) or _af(get("mode")) or d[1]
        elif type(af) is not int or (af != 4 and af != 6):
            af = _af(af)
        if d[1] != af:
            raise _Reject("af_mismatch")
        src = self._source(get, af)
        if src is None:
            self.skipped["no_source"] += 1
            return
        prb, msm, size = get("prb_id"), get("msm_id"), get("size")
        if prb is not None:
            if type(prb) is not int:
                prb = _num(prb, "bad_prb_id", int)
            if not -_I64 <= prb < _I64:
                raise _Reject("bad_prb_id")
        if msm is not None:
            if type(msm) is not int:
                msm = _num(msm, "bad_msm_id", int)
            if not -_I64 <= msm < _I64:
                raise _Reject("bad_msm_id")
        if size is not None:
            if type(size) is not int:
                size = _num(size, "bad_size", int)
            if not 0 <= size < 1 << 31:
                raise _Reject("bad_size")
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
                        raise _Reject("bad_entry")
                    v = e.get("rtt")
                    if v is not None:
                        if "dup" in e:
                            dups += 1
                            continue
                        if type(v) is not float:
                            v = _num(v, "bad_rtt")
                        if not 0.0 <= v < math.inf:
                            raise _Reject("bad_rtt")
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
                        raise _Reject("bad_entry")
                    # A per-packet source address ("if different from the first reply's").
                    target = base_src
                    if len(e) > 1 and mode != "from":
                        es = e.get("src_addr") or e.get("srcaddr") or e.get("src_Addr")
                        if es:
                            a = _addr(es)
                            if a is None:
                                raise _Reject("bad_address")
                            if a[1] != af:
                                raise _Reject("af_mismatch")
                            if mode == "src_addr" or a[2]:
                                target = a[0]
                    if target is not src_text and target != src_text:
                        self._segment(ts, src_text, d[0], af, prb, msm, size, len(rtt) - n0)
                        n0, src_text = len(rtt), target
                    rtt.append(v)
            except _Reject:
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


def parse_result(obj, source_address: str = "auto") -> ParsedResult:
    """One RIPE Atlas ping result (a dict, JSON text or bytes) -> ParsedResult.

    Raises RejectedResult (an InputError with `.reason`) when it is not a valid ping result.
    """
    b = _Batch(source_address)
    if isinstance(obj, str | bytes):
        try:
            obj = orjson.loads(obj)
        except orjson.JSONDecodeError:
            raise RejectedResult("malformed_json") from None
    try:
        b.add(obj)
    except _Reject as e:
        raise RejectedResult(str(e.args[0])) from None
    c = b.counts
    skipped = next(iter(b.skipped), None)
    return ParsedResult(b.table().to_pylist(), skipped, c["dups"], c["late"], c["errors"])


# ----------------------------------------------------------------------------------------------
# bytes in: decompression (by magic number) and framing (lines or concatenated JSON values)


class _State:
    def __init__(self):
        self.damage: str | None = None  # "truncated_file" / "corrupt_file"


def _decompressed(chunks, st: _State):
    it = iter(chunks)
    first = b""
    for first in it:
        if first:
            break
    if first.startswith(b"\x1f\x8b"):
        new = lambda: zlib.decompressobj(31)  # noqa: E731
    elif first.startswith(b"BZh"):
        new = bz2.BZ2Decompressor
    elif first.startswith(b"\x28\xb5\x2f\xfd"):
        import zstandard

        new = lambda: zstandard.ZstdDecompressor().decompressobj()  # noqa: E731
    else:
        if first:
            yield first
        yield from it
        return
    d, fed = new(), False
    out: list[bytes] = []  # decoded pieces, yielded as ~1 MiB blocks
    n_out = 0

    def all_chunks():
        yield first
        yield from it

    # Small input pieces: on corrupt data only the last piece's output (<~100 kB) is lost.
    piece = 1 << 13
    for chunk in all_chunks():
        for i in range(0, len(chunk), piece):
            data = chunk[i : i + piece]
            while data:
                if d.eof:
                    if not data.strip(b"\0"):  # zero padding after the last member
                        break
                    d, fed = new(), False
                try:
                    o = d.decompress(data)
                except Exception as e:  # zlib.error, OSError, zstandard.ZstdError
                    st.damage = f"corrupt_file: {type(e).__name__}: {e}"
                    if out:
                        yield b"".join(out)
                    return
                fed = True
                if o:
                    out.append(o)
                    n_out += len(o)
                data = d.unused_data if d.eof else b""
            if n_out >= READ_BYTES:
                yield b"".join(out)
                out, n_out = [], 0
    if out:
        yield b"".join(out)
    if fed and not d.eof:
        st.damage = "truncated_file"


def _raw_text(raw) -> tuple[str, bool]:
    if isinstance(raw, bytes | bytearray):
        raw = bytes(raw[: MAX_RAW + 4]).decode("utf-8", errors="replace")
    return raw[:MAX_RAW], len(raw) > MAX_RAW


_SKIP = re.compile(r"[\s,\[\]]*")
_START = re.compile(r"\{")
_RESULT_KEYS = ("timestamp", "prb_id", "msm_id")


def _stream_values(blocks, max_obj: int = 8 << 20):
    """Concatenated JSON values / arrays (API downloads, pretty-printed) -> (ok, line, value).

    Uses the C scanner of json.JSONDecoder.raw_decode on a sliding text buffer (memory: one
    element plus one block). A malformed element yields (False, line, its text) and parsing
    resumes at the next object that looks like a result.
    """
    raw_decode = json.JSONDecoder().raw_decode
    dec = codecs.getincrementaldecoder("utf-8")("replace")
    it = iter(blocks)
    buf, pos, eof = "", 0, False
    line, line_pos = 1, 0  # line number at buf[line_pos]

    def line_at(p):
        nonlocal line, line_pos
        line += buf.count("\n", line_pos, p)
        line_pos = p
        return line

    def more():
        nonlocal buf, pos, eof, line_pos
        line_at(pos)
        buf, line_pos = buf[pos:], 0
        pos = 0
        try:
            buf += dec.decode(next(it))
        except StopIteration:
            buf += dec.decode(b"", final=True)
            eof = True

    while True:
        pos = _SKIP.match(buf, pos).end()
        if pos >= len(buf):
            if eof:
                return
            more()
            continue
        try:
            obj, end = raw_decode(buf, pos)
        except (ValueError, RecursionError):  # JSONDecodeError, or absurdly deep nesting
            if not eof and len(buf) - pos < max_obj:
                more()
                continue
            start_line = line_at(pos)
            nxt = None
            for m in _START.finditer(buf, pos + 1):
                try:
                    cand, _ = raw_decode(buf, m.start())
                except (ValueError, RecursionError):
                    continue
                if type(cand) is dict and any(k in cand for k in _RESULT_KEYS):
                    nxt = m.start()
                    break
            if nxt is None and not eof:
                keep = buf.rfind("{", pos + 1)
                nxt = keep if keep > pos else len(buf)
            elif nxt is None:
                nxt = len(buf)
            yield False, start_line, buf[pos:nxt]
            pos = nxt
            continue
        yield True, line_at(pos), obj
        pos = end


# ----------------------------------------------------------------------------------------------
# one input -> Arrow tables


class _Converter:
    """Runs one input through framing + _Batch, yielding canonical tables chunk by chunk."""

    def __init__(self, name: str, mode: str, on_reject=None, on_progress=None):
        self.name, self.batch = name, _Batch(mode)
        self.on_reject, self.on_progress = on_reject, on_progress

    def reject(self, line: int | None, reason: str, raw) -> None:
        self.batch.rejects[reason] += 1
        if self.on_reject is not None:
            text, cut = _raw_text(raw)
            rec = {"source": self.name, "line": line, "reason": reason, "raw": text}
            if cut:
                rec["raw_truncated"] = True
            self.on_reject(rec)

    def value(self, line: int, obj, raw=None) -> None:
        batch = self.batch
        batch.counts["results"] += 1
        try:
            batch.add(obj)
        except _Reject as e:
            if raw is None:
                try:
                    raw = orjson.dumps(obj)
                except (TypeError, orjson.JSONEncodeError):
                    raw = repr(obj)
            self.reject(line, e.args[0], raw)

    def _flush(self, force=False):
        b = self.batch
        if len(b) >= CHUNK_RESULTS or (force and len(b)):
            return b.table()
        return None

    def run(self, chunks):
        st = _State()
        blocks = _decompressed(chunks, st)
        first = b""
        for block in blocks:  # up to the first non-blank block (blank ones still count lines)
            first += block
            if block.strip():
                break
        head = first.lstrip()
        stream = head.startswith(b"[")
        if head.startswith(b"{"):
            try:
                orjson.loads(head.split(b"\n", 1)[0])
            except orjson.JSONDecodeError:
                stream = b"\n" in head or len(head) < READ_BYTES
        if stream:
            yield from self._run_stream(first, blocks, st)
        else:
            yield from self._run_lines(first, blocks, st)
        t = self._flush(force=True)
        if t is not None:
            yield t

    def _run_stream(self, first, blocks, st):
        def gen():
            yield first
            yield from blocks

        done, counts = 0, self.batch.counts
        bad = None  # held back one step: a bad tail of a damaged file is the damage itself
        for ok, line, x in _stream_values(gen()):
            if bad is not None:
                self.reject(bad[0], "malformed_json", bad[1])
                bad = None
            if not ok:
                counts["results"] += 1
                bad = (line, x)
            elif type(x) is list:
                for o in x:
                    self.value(line, o)
            else:
                self.value(line, x)
            if len(self.batch) >= CHUNK_RESULTS:
                yield self.batch.table()
            if self.on_progress is not None and counts["results"] - done >= 8192:
                self.on_progress(counts["results"] - done)
                done = counts["results"]
        if st.damage:
            if bad is not None:
                counts["results"] -= 1  # a cut-off element, not a result (as in lines mode)
                self.reject(bad[0], st.damage.split(":")[0], bad[1])
            else:
                self.reject(None, st.damage.split(":")[0], st.damage)
        elif bad is not None:
            self.reject(bad[0], "malformed_json", bad[1])
        if self.on_progress is not None:
            self.on_progress(counts["results"] - done)

    def _run_lines(self, first, blocks, st):
        loads, JSONDecodeError = orjson.loads, orjson.JSONDecodeError
        batch, add, counts = self.batch, self.batch.add, self.batch.counts
        carry, lineno, skipping, done = b"", 0, False, 0

        def gen():
            yield first
            yield from blocks

        for block in gen():
            if skipping:
                cut = block.find(b"\n")
                if cut < 0:
                    continue
                block, skipping = block[cut + 1 :], False
            lines = (carry + block if carry else block).split(b"\n")
            carry = lines.pop()
            for ln in lines:
                lineno += 1
                try:
                    obj = loads(ln)
                except JSONDecodeError:
                    if ln.strip():
                        counts["results"] += 1
                        self.reject(lineno, "malformed_json", ln)
                    continue
                if type(obj) is list:
                    for o in obj:
                        self.value(lineno, o, ln)
                    continue
                counts["results"] += 1
                try:
                    add(obj)
                except _Reject as e:
                    self.reject(lineno, e.args[0], ln)
            if len(carry) > MAX_LINE:  # the line is dropped; its end is skipped when it comes
                lineno += 1
                self.reject(lineno, "line_too_long", carry)
                carry, skipping = b"", True
            if len(batch) >= CHUNK_RESULTS:
                yield batch.table()
            if self.on_progress is not None:
                self.on_progress(counts["results"] - done)
                done = counts["results"]
        if st.damage:
            self.reject(lineno + 1, st.damage.split(":")[0], carry or st.damage)
        elif carry.strip():
            self._run_last(lineno + 1, carry)
        if self.on_progress is not None:
            self.on_progress(counts["results"] - done)

    def _run_last(self, lineno, ln):
        try:
            obj = orjson.loads(ln)
        except orjson.JSONDecodeError:
            self.batch.counts["results"] += 1
            self.reject(lineno, "malformed_json", ln)
            return
        for o in obj if type(obj) is list else [obj]:
            self.value(lineno, o, ln)


def iter_tables(source, source_address: str = "auto", on_reject=None, on_progress=None,
                report: dict | None = None, name: str | None = None):
    """Stream one input (path, "-" for stdin, a binary file object or an iterable of byte
    chunks) -> canonical pa.Tables of <= CHUNK_RESULTS results each.

    on_reject(record) receives each reject record; on_progress(n) the number of results read
    since the last call; `report`, if given, is filled with the counts at the end.
    """
    if name is None:
        name = source if isinstance(source, str) else getattr(source, "name", "<stream>")
    conv = _Converter(str(name), source_address, on_reject, on_progress)
    with _open_chunks(source) as chunks:
        yield from conv.run(chunks)
    if report is not None:
        report.update(_file_counts(conv.batch))


class _open_chunks:
    def __init__(self, source):
        self.source, self.fh = source, None

    def __enter__(self):
        src = self.source
        if isinstance(src, str | os.PathLike):
            if str(src) == "-":
                fh = sys.stdin.buffer
            else:
                fh = self.fh = open(src, "rb")  # noqa: SIM115 - closed in __exit__
        elif hasattr(src, "read"):
            fh = src
        else:
            return iter(src)
        return iter(lambda: fh.read(READ_BYTES), b"")

    def __exit__(self, *exc):
        if self.fh is not None:
            self.fh.close()


def _file_counts(batch: _Batch) -> dict:
    out = dict(batch.counts)
    out["skipped"] = dict(batch.skipped)
    out["rejects"] = dict(batch.rejects)
    return out


# ----------------------------------------------------------------------------------------------
# many inputs -> a directory of Parquet files


@dataclass
class IngestReport:
    """Totals over the inputs of one `ingest` call (already-ingested inputs included, from the
    report stored in their output); `files` holds the per-input reports."""

    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    skipped_inputs: list[str] = field(default_factory=list)  # already ingested: reused, not redone
    results: int = 0  # JSON values read (results, valid or not)
    rows: int = 0  # rows written (= replies + failed)
    replies: int = 0  # rows with rtt >= 0
    failed: int = 0  # rows with rtt = -1 (timeouts, errors, lost packets of summary results)
    errors: int = 0  # of which `error` entries
    dups: int = 0  # duplicate replies skipped
    late: int = 0  # late replies skipped
    summary_only: int = 0  # results without a `result` list (rows reconstructed)
    results_empty: int = 0  # valid results that gave no row (empty list, only dups)
    skipped: dict[str, int] = field(default_factory=dict)  # valid results without rows, by reason
    rejects: dict[str, int] = field(default_factory=dict)  # bad input, by reason
    seconds: float = 0.0
    files: list[dict] = field(default_factory=list)

    @property
    def rejected(self) -> int:
        return sum(self.rejects.values())

    def add(self, rep: dict) -> None:
        for k in _COUNTS:
            setattr(self, k, getattr(self, k) + rep.get(k, 0))
        for k in ("skipped", "rejects"):
            total = Counter(getattr(self, k))
            total.update(rep.get(k, {}))
            setattr(self, k, dict(sorted(total.items())))
        self.files.append(rep)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["rejected"] = self.rejected
        return d


def _expand_inputs(inputs) -> list[str]:
    if isinstance(inputs, str | os.PathLike):
        inputs = [inputs]
    out: list[str] = []
    for item in inputs:
        s = str(item)
        if s == "-":
            out.append(s)
        elif os.path.isdir(s):
            # Skip hidden files and the world description `ping-llm synth` writes beside its
            # output, so that a directory of synthetic results ingests cleanly.
            out.extend(str(p) for p in sorted(Path(s).iterdir())
                       if p.is_file() and not p.name.startswith(".")
                       and not p.name.endswith(".world.json"))
        elif os.path.isfile(s):
            out.append(s)
        elif glob.has_magic(s):
            matches = sorted(m for m in glob.glob(s, recursive=True) if os.path.isfile(m))
            if not matches:
                raise InputError(f"no file matches {s!r}")
            out.extend(matches)
        else:
            raise InputError(f"no such file: {s!r}")
    seen, uniq = set(), []
    for s in out:
        key = s if s == "-" else os.path.realpath(s)
        if key not in seen:
            seen.add(key)
            uniq.append(s)
    return uniq


def _stem(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", os.path.basename(name))[:80] or "input"


def _output_name(path: str, mode: str) -> tuple[str, str]:
    """(file name, glob of the older outputs of the same input path)."""
    st = os.stat(path)
    real = os.path.realpath(path)
    pid = hashlib.sha256(real.encode()).hexdigest()[:8]
    ver = hashlib.sha256(
        f"{os.path.basename(real)}\0{st.st_size}\0{st.st_mtime_ns}\0{mode}\0{FORMAT_VERSION}".encode()
    ).hexdigest()[:8]
    stem = _stem(path)
    return f"{stem}-{pid}{ver}.parquet", f"{glob.escape(stem)}-{pid}????????.parquet"


def _stored_report(path: Path) -> dict:
    try:
        meta = pq.read_metadata(path).metadata or {}
        return json.loads(meta.get(REPORT_KEY, b"{}"))
    except (OSError, ValueError, pa.ArrowInvalid):
        return {}


_PROGRESS = None  # shared results counter in worker processes


def _init_worker(counter) -> None:
    global _PROGRESS
    _PROGRESS = counter


def _bump(n: int) -> None:
    with _PROGRESS.get_lock():
        _PROGRESS.value += n


def _ingest_one(path: str, out_dir: str, mode: str, name: str | None, stale: str | None,
                on_progress=None) -> dict:
    """One input -> its Parquet (+ rejects) in out_dir, atomically. Returns the file report."""
    t0 = time.perf_counter()
    out, rej_dir = Path(out_dir), Path(out_dir) / "_rejects"
    tag = f"{os.getpid()}-{time.monotonic_ns()}"
    tmp = out / f".ingest-{tag}.parquet.tmp"
    rej_tmp = out / f".ingest-{tag}.rejects.tmp"
    digest = hashlib.sha256() if path == "-" else None
    rej_fh = None

    def on_reject(rec):
        nonlocal rej_fh
        if rej_fh is None:
            rej_fh = open(rej_tmp, "wb")  # noqa: SIM115 - closed below
        rej_fh.write(orjson.dumps(rec) + b"\n")

    if on_progress is None and _PROGRESS is not None:
        on_progress = _bump
    source = path
    if digest is not None:
        def hashed():
            for b in iter(lambda: sys.stdin.buffer.read(READ_BYTES), b""):
                digest.update(b)
                yield b
        source = hashed()
    counts: dict = {}
    writer = pq.ParquetWriter(tmp, CANONICAL_SCHEMA, compression="zstd")
    try:
        try:
            for table in iter_tables(source, mode, on_reject, on_progress, counts, name=path):
                writer.write_table(table)
        finally:
            if rej_fh is not None:
                rej_fh.close()
        if name is None:
            name = f"stdin-{digest.hexdigest()[:16]}.parquet"
        rep = {"input": path, "output": str(out / name), **counts,
               "seconds": round(time.perf_counter() - t0, 3)}
        writer.add_key_value_metadata({REPORT_KEY: json.dumps(rep)})
        writer.close()
        writer = None
        if rej_fh is not None:
            rej_dir.mkdir(exist_ok=True)
            os.replace(rej_tmp, rej_dir / (name[: -len(".parquet")] + ".jsonl"))
        os.replace(tmp, out / name)  # the commit point: the output exists => it is complete
        if stale:
            for old in out.glob(stale):
                if old.name != name:
                    old.unlink(missing_ok=True)
                    (rej_dir / (old.name[: -len(".parquet")] + ".jsonl")).unlink(missing_ok=True)
        return rep
    finally:
        if writer is not None:
            writer.close()
        tmp.unlink(missing_ok=True)
        rej_tmp.unlink(missing_ok=True)


def ingest(inputs, out_dir, source_address: str = "auto", workers: int = 1, rejects=None,
           progress: bool = True) -> IngestReport:
    """RIPE Atlas ping result files -> one canonical Parquet file per input in `out_dir`.

    inputs: paths, directories, glob patterns or "-" (stdin). Inputs already ingested (same
    name, size, mtime and source_address) are not redone: their stored report is reused.
    workers: processes (parallel over files). rejects: a file that receives all reject records
    of these inputs (JSON lines); they are also kept per input in out_dir/_rejects/.
    Raises InputError (nothing done) for a missing input or a bad argument.
    """
    t0 = time.perf_counter()
    if source_address not in SOURCE_MODES:
        raise InputError(f"source_address must be one of {SOURCE_MODES}, got {source_address!r}")
    if int(workers) < 1:
        raise InputError(f"workers must be >= 1, got {workers}")
    paths = _expand_inputs(inputs)
    if not paths:
        raise InputError("no input files")
    if "-" in paths and sys.stdin.isatty():
        raise InputError("input '-' is a terminal: pipe the results in (... | ping-llm ingest -)")
    if rejects is not None and not Path(rejects).resolve().parent.is_dir():
        raise InputError(f"rejects: directory of {str(rejects)!r} does not exist")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    report = IngestReport(inputs=paths)
    todo = []
    for p in paths:
        if p == "-":
            todo.append((p, None, None))
            continue
        name, stale = _output_name(p, source_address)
        if (out / name).exists():
            rep = _stored_report(out / name) or {"input": p, "output": str(out / name)}
            report.skipped_inputs.append(p)
            report.add({**rep, "input": p, "skipped": rep.get("skipped", {})})
        else:
            todo.append((p, name, stale))

    from tqdm import tqdm

    bar = tqdm(total=None, unit=" results", unit_scale=True, file=sys.stderr, dynamic_ncols=True,
               disable=None if progress else True, desc="ingest")
    try:
        n_workers = min(int(workers), sum(1 for t in todo if t[0] != "-"))
        local = [t for t in todo if t[0] == "-" or n_workers <= 1]
        remote = [t for t in todo if t not in local]
        reps: dict[str, dict] = {}
        if remote:
            ctx = mp.get_context("spawn")
            counter = ctx.Value("q", 0)
            with cf.ProcessPoolExecutor(n_workers, mp_context=ctx, initializer=_init_worker,
                                        initargs=(counter,)) as ex:
                futs = {ex.submit(_ingest_one, p, str(out), source_address, n, s): p
                        for p, n, s in remote}
                pending = set(futs)
                while pending:
                    done, pending = cf.wait(pending, timeout=0.25)
                    bar.update(counter.value - bar.n)
                    for f in done:
                        reps[futs[f]] = f.result()
                        bar.set_postfix(files=f"{len(reps)}/{len(todo)}")
        for p, n, s in local:
            reps[p] = _ingest_one(p, str(out), source_address, n, s, on_progress=bar.update)
            bar.set_postfix(files=f"{len(reps)}/{len(todo)}")
    finally:
        bar.close()
    for p, _, _ in todo:
        report.add(reps[p])
    report.outputs = [f["output"] for f in report.files]
    if rejects is not None:
        _gather_rejects(report, Path(rejects))
    report.seconds = round(time.perf_counter() - t0, 3)
    return report


def _gather_rejects(report: IngestReport, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        for f in report.files:
            out = Path(f["output"])
            rej = out.parent / "_rejects" / (out.name[: -len(".parquet")] + ".jsonl")
            if rej.exists():
                with open(rej, "rb") as src:
                    while b := src.read(READ_BYTES):
                        fh.write(b)
    os.replace(tmp, path)
