"""The token language of ping-llm (docs/tokens.md): 267 tokens, compatible with the author's models.

A measurement is `MEASUREMENT_START` followed by three or four field blocks in any order:

    SrcIp     SRC_IPV4 U8{4}  | SRC_IPV6 U8{16}
    DstIp     DST_IPV4 U8{4}  | DST_IPV6 U8{16}
    Result    RTT_START U8 U8 | FAILED
    Timestamp TIMESTAMP_ABS U8{8} | TIMESTAMP_DELTA1 U8 | TIMESTAMP_DELTA4 U8{4}

Ids 0-10 are role tokens, 11-266 are bytes (id = 11 + byte). Integers are big-endian.

RTT codec: microseconds as an unsigned 16-bit float m * 2**e, 5-bit exponent, 11-bit mantissa,
byte1 = e << 3 | m >> 8, byte2 = m & 0xFF, so the 16-bit code is simply `e << 11 | m`. Codes are
normalised (m >= 1024 whenever e > 0): below 2048 us the value is exact to 1 us (e = 0), above it
each octave has 1024 steps. Rounding is to the nearest representable value, which bounds the error
by 0.5 us below 2.048 ms and by 1/2048 relative above 1.024 ms. byte1 alone is a log-scale bin
(4 used values per octave above 2 ms), which is what makes exact distributions cheap to enumerate.

Timestamps are epoch seconds. The first timestamped measurement of a context is absolute (8 bytes);
each later one is the delta to the previous *timestamped* measurement: DELTA1 below 256 s, DELTA4
below 2**32 s, and a negative or larger delta falls back to ABS.

Addresses travel as 16-byte arrays plus a version; an IPv4 address fills bytes 0-3 and leaves the
rest zero. IPv4-mapped IPv6 addresses (::ffff:a.b.c.d) are rejected: write them as IPv4.

Two encoders produce identical tokens: `encode_reference` (one measurement at a time, obviously
correct, the oracle in tests) and `encode` (whole arrays, numpy, no per-measurement Python loop, the
one the training loader uses). `decode` parses any token stream back into measurements and rejects
streams that break the grammar with the position and the reason.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ping_llm.errors import InputError

if TYPE_CHECKING:  # the two address-position helpers at the end run on the model's tensors
    import torch

# ----------------------------------------------------------------------------------------------
# vocabulary

MEASUREMENT_START = 0
SRC_IPV4 = 1
SRC_IPV6 = 2
DST_IPV4 = 3
DST_IPV6 = 4
TIMESTAMP_ABS = 5
TIMESTAMP_DELTA1 = 6
TIMESTAMP_DELTA4 = 7
RTT_START = 8
THROUGHPUT_START = 9  # reserved: never produced, rejected by the decoder
FAILED = 10
BYTE0 = 11
VOCAB_SIZE = 267

ROLE_NAMES = (
    "MEASUREMENT_START",
    "SRC_IPV4",
    "SRC_IPV6",
    "DST_IPV4",
    "DST_IPV6",
    "TIMESTAMP_ABS",
    "TIMESTAMP_DELTA1",
    "TIMESTAMP_DELTA4",
    "RTT_START",
    "THROUGHPUT_START",
    "FAILED",
)

# Field ids, used for per-measurement field orders: order[i] is a permutation of these four.
FIELD_SRC, FIELD_DST, FIELD_RESULT, FIELD_TIME = 0, 1, 2, 3
FIELD_NAMES = ("src", "dst", "result", "time")
# Queries put the asked-for field last: src, dst, [time], result.
QUERY_ORDER = (FIELD_SRC, FIELD_DST, FIELD_TIME, FIELD_RESULT)

DELTA1_LIMIT = 256  # seconds; deltas below use one byte
DELTA4_LIMIT = 2**32  # seconds; deltas below use four bytes, anything else falls back to ABS

# Each role token's field and the bytes that follow it (a field block is the role + its bytes).
ROLE_FIELD = {
    SRC_IPV4: FIELD_SRC, SRC_IPV6: FIELD_SRC, DST_IPV4: FIELD_DST, DST_IPV6: FIELD_DST,
    TIMESTAMP_ABS: FIELD_TIME, TIMESTAMP_DELTA1: FIELD_TIME, TIMESTAMP_DELTA4: FIELD_TIME,
    RTT_START: FIELD_RESULT, FAILED: FIELD_RESULT,
}
ROLE_BYTES = {
    SRC_IPV4: 4, SRC_IPV6: 16, DST_IPV4: 4, DST_IPV6: 16,
    TIMESTAMP_ABS: 8, TIMESTAMP_DELTA1: 1, TIMESTAMP_DELTA4: 4, RTT_START: 2, FAILED: 0,
}
ADDRESS_BYTES = {4: 4, 6: 16}  # an address's length in bytes (tokens) per IP version


def address_role(field: int, version: int) -> int:
    """The role token that opens an address field (FIELD_SRC or FIELD_DST) of an IP version."""
    if field == FIELD_SRC:
        return SRC_IPV4 if version == 4 else SRC_IPV6
    return DST_IPV4 if version == 4 else DST_IPV6


def token_name(token_id: int) -> str:
    """'SRC_IPV4', 'RTT_START', ... for role tokens, 'B0x2a' for byte tokens."""
    if 0 <= token_id < BYTE0:
        return ROLE_NAMES[token_id]
    if BYTE0 <= token_id < VOCAB_SIZE:
        return f"B0x{token_id - BYTE0:02x}"
    raise InputError(f"token id {token_id} is outside the vocabulary [0, {VOCAB_SIZE})")


def token_id(name: str) -> int:
    """Inverse of `token_name`."""
    if name in ROLE_NAMES:
        return ROLE_NAMES.index(name)
    if name.startswith("B0x"):
        try:
            b = int(name[3:], 16)
        except ValueError:
            b = -1
        if 0 <= b < 256:
            return BYTE0 + b
    raise InputError(f"unknown token name {name!r}")


# ----------------------------------------------------------------------------------------------
# RTT codec

RTT_MAX_US = 2047 * 2**31  # largest representable value; larger RTTs clamp to it (~50 days)
RTT_MAX_MS = RTT_MAX_US / 1000.0


def _check_rtt(rtt_ms: np.ndarray) -> None:
    if np.isnan(rtt_ms).any():
        raise InputError(f"RTT is NaN at index {int(np.flatnonzero(np.isnan(rtt_ms))[0])}")
    if (rtt_ms < 0).any():
        raise InputError(f"RTT is negative at index {int(np.flatnonzero(rtt_ms < 0)[0])}")


def rtt_to_code(rtt_ms) -> np.ndarray:
    """RTT in milliseconds (>= 0; +inf and huge values clamp) -> 16-bit codes `e << 11 | m`."""
    ms = np.asarray(rtt_ms, dtype=np.float64)
    _check_rtt(ms)
    us = np.minimum(ms * 1000.0, float(RTT_MAX_US))
    # frexp: us = f * 2**x with f in [0.5, 1), so floor(log2(us)) = x - 1 and e = x - 11 keeps
    # the mantissa in [1024, 2048). Below 2048 us the exponent is 0 (exact microseconds).
    _, x = np.frexp(us)
    e = np.maximum(x.astype(np.int64) - 11, 0)
    m = np.floor(np.ldexp(us, -e) + 0.5).astype(np.int64)  # round half up, on the mantissa grid
    carry = m >= 2048  # rounding overflowed into the next octave: 2048 * 2**e = 1024 * 2**(e+1)
    e = e + carry
    m = np.where(carry, 1024, m)
    over = e > 31
    e = np.where(over, 31, e)
    m = np.where(over, 2047, m)
    return ((e << 11) | m).astype(np.uint16)


def code_to_rtt(code) -> np.ndarray:
    """16-bit codes -> RTT in milliseconds (float64)."""
    c = np.asarray(code).astype(np.int64)
    return np.ldexp((c & 0x7FF).astype(np.float64), c >> 11) / 1000.0


def is_canonical_code(code) -> np.ndarray:
    """True where the code is normalised (e == 0, or m >= 1024)."""
    c = np.asarray(code).astype(np.int64)
    return ((c >> 11) == 0) | ((c & 0x7FF) >= 1024)


_ALL_CODES = np.arange(65536)
RTT_GRID_MS = np.where(is_canonical_code(_ALL_CODES), code_to_rtt(_ALL_CODES), np.nan)
RTT_GRID_MS.setflags(write=False)
# The canonical codes, ascending (RTT order): byte1 = e << 3 | m >> 8 with m >= 1024 whenever
# e > 0, so 8 byte1 values for e = 0 and 4 for each e > 0 -- 132 of them, each with all 256 byte2.
CANON_CODES = np.flatnonzero(np.isfinite(RTT_GRID_MS))  # (33792,)
CANON_B1 = CANON_CODES[::256] >> 8  # (132,)
CANON_CODES.setflags(write=False)
CANON_B1.setflags(write=False)


def rtt_code_cells_ms() -> np.ndarray:
    """(65536, 2) [lo, hi) in ms: the RTTs that round to each code; NaN rows for unused codes.

    The cells tile [0, inf): P(code) = F(hi) - F(lo) for any RTT distribution with CDF F, which
    is how ground truth and baselines are put on the model's grid.
    """
    valid = np.flatnonzero(is_canonical_code(_ALL_CODES))
    v = code_to_rtt(valid)
    mid = (v[1:] + v[:-1]) / 2  # round-to-nearest boundaries between consecutive codes
    cells = np.full((65536, 2), np.nan)
    cells[valid, 0] = np.concatenate([[0.0], mid])
    cells[valid, 1] = np.concatenate([mid, [np.inf]])
    return cells


def byte1_bin_edges_ms() -> np.ndarray:
    """(256, 2) [lo, hi) in ms of the RTTs whose code has each byte1 value; NaN rows if unused."""
    # A byte1 bin holds either 256 canonical codes or none, so its range runs from the cell of
    # its first code to the cell of its last.
    cells = rtt_code_cells_ms().reshape(256, 256, 2)  # (byte1, byte2, lo/hi)
    return np.stack([cells[:, 0, 0], cells[:, 255, 1]], axis=1)


# ----------------------------------------------------------------------------------------------
# addresses


def parse_address(text: str) -> tuple[bytes, int]:
    """'192.0.2.1' -> (16 bytes with the address in the first 4, 4); IPv6 -> (16 bytes, 6)."""
    try:
        ip = ipaddress.ip_address(text.strip() if isinstance(text, str) else text)
    except (ValueError, TypeError, AttributeError):
        raise InputError(f"not an IP address: {text!r}") from None
    if ip.version == 6 and ip.ipv4_mapped is not None:
        raise InputError(f"IPv4-mapped IPv6 address {text!r}: write it as {ip.ipv4_mapped}")
    return ip.packed.ljust(16, b"\0"), ip.version


def parse_addresses(texts) -> tuple[np.ndarray, np.ndarray]:
    """Address strings -> (addr uint8 (N, 16), version uint8 (N,)); parses each value once."""
    arr = np.asarray(texts, dtype=object)
    if arr.size == 0:
        return np.zeros((0, 16), np.uint8), np.zeros(0, np.uint8)
    uniq, inverse = np.unique(arr.astype(str), return_inverse=True)
    parsed = [parse_address(u) for u in uniq]
    addr = np.frombuffer(b"".join(p[0] for p in parsed), dtype=np.uint8).reshape(-1, 16)
    ver = np.array([p[1] for p in parsed], dtype=np.uint8)
    return addr[inverse.ravel()], ver[inverse.ravel()]


def format_address(addr16, version: int) -> str:
    if isinstance(addr16, bytes | bytearray):
        raw = bytes(addr16).ljust(16, b"\0")
    else:
        raw = np.asarray(addr16, dtype=np.uint8).tobytes()
    if version == 4:
        return str(ipaddress.IPv4Address(raw[:4]))
    if version == 6:
        return str(ipaddress.IPv6Address(raw))
    raise InputError(f"IP version must be 4 or 6, got {version}")


# ----------------------------------------------------------------------------------------------
# reference encoder: one measurement at a time, the oracle


@dataclass
class Measurement:
    """One ping packet as the token language sees it. rtt_ms < 0 means no reply (FAILED)."""

    src: str
    dst: str
    rtt_ms: float
    time: int | None = None

    @property
    def failed(self) -> bool:
        return self.rtt_ms < 0

    def to_dict(self) -> dict:
        return {"src": self.src, "dst": self.dst, "rtt_ms": self.rtt_ms, "time": self.time}


def _u8(value: int, n: int) -> list[int]:
    return [BYTE0 + b for b in value.to_bytes(n, "big")]


def time_tokens(t: int, prev: int | None) -> list[int]:
    """The time block of a measurement at t (Unix seconds, >= 0) after a timestamped one at
    prev (None: the first of its context): DELTA1, DELTA4 or ABS, as the module docstring says."""
    delta = None if prev is None else t - prev
    if delta is not None and 0 <= delta < DELTA1_LIMIT:
        return [TIMESTAMP_DELTA1] + _u8(delta, 1)
    if delta is not None and 0 <= delta < DELTA4_LIMIT:
        return [TIMESTAMP_DELTA4] + _u8(delta, 4)
    return [TIMESTAMP_ABS] + _u8(t, 8)


def query_prefix(version: int, src, dst=None, time: int | None = None,
                 last_time: int | None = None) -> list:
    """The known fields of a query measurement, in their fixed order (docs/tokens.md, "Queries"):
    MEASUREMENT_START, the source, the destination (None: it is the asked-for field), the
    timestamp (None: none; relative to the context's last timestamp `last_time`). src and dst
    give one item per address byte: an int is that byte; anything else (a partial address's
    unknown byte) is kept as is, for the caller to fill."""
    seq = [MEASUREMENT_START, address_role(FIELD_SRC, version)]
    seq += [BYTE0 + b if isinstance(b, int) else b for b in src]
    if dst is not None:
        seq += [address_role(FIELD_DST, version)]
        seq += [BYTE0 + b if isinstance(b, int) else b for b in dst]
    if time is not None:
        seq += time_tokens(time, last_time)
    return seq


def encode_reference(measurements, orders=None) -> list[int]:
    """Measurements (one context, in order) -> token ids. orders[i] is a permutation of field ids
    (default QUERY_ORDER); the time field is skipped for measurements without a time."""
    out: list[int] = []
    prev_time = None
    for i, m in enumerate(measurements):
        order = QUERY_ORDER if orders is None else tuple(int(f) for f in orders[i])
        if sorted(order) != [0, 1, 2, 3]:
            raise InputError(f"field order {order} is not a permutation of 0..3")
        src, sv = parse_address(m.src)
        dst, dv = parse_address(m.dst)
        if sv != dv:
            raise InputError(f"mixed address families: {m.src} -> {m.dst}")
        n = 4 if sv == 4 else 16
        rtt = float(m.rtt_ms)
        if rtt != rtt:
            raise InputError(f"RTT is NaN in measurement {i}")
        blocks = {
            FIELD_SRC: [address_role(FIELD_SRC, sv)] + [BYTE0 + b for b in src[:n]],
            FIELD_DST: [address_role(FIELD_DST, dv)] + [BYTE0 + b for b in dst[:n]],
        }
        if rtt < 0:
            blocks[FIELD_RESULT] = [FAILED]
        else:
            code = int(rtt_to_code(rtt))
            blocks[FIELD_RESULT] = [RTT_START, BYTE0 + (code >> 8), BYTE0 + (code & 0xFF)]
        if m.time is not None:
            t = int(m.time)
            if t < 0:
                raise InputError(f"timestamp {t} before 1970 in measurement {i}")
            blocks[FIELD_TIME] = time_tokens(t, prev_time)
            prev_time = t
        out.append(MEASUREMENT_START)
        for f in order:
            out.extend(blocks.get(f, ()))
    return out


# ----------------------------------------------------------------------------------------------
# vectorised encoder: whole arrays, no per-measurement Python


def random_orders(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, 4) int8: an independent uniformly random field order per measurement."""
    return np.argsort(rng.random((n, 4)), axis=1).astype(np.int8)


def _scatter(out, starts, lengths, mat) -> None:
    """out[starts[i] + j] = mat[i, j] for j < lengths[i], for every row at once."""
    width = mat.shape[1]
    cols = np.arange(width)
    mask = cols < lengths[:, None]
    out[(starts[:, None] + cols)[mask]] = mat[mask]


def encode(src, dst, version, rtt_ms, time, has_time, order, reset=None):
    """Encode N measurements of one or more contexts into one token array.

    src, dst (N, 16) uint8; version (N,) 4|6; rtt_ms (N,) float (< 0 = failed); time (N,) int64
    epoch seconds; has_time (N,) bool; order (N, 4) field-id permutations; reset (N,) bool marks the
    first measurement of each context (timestamp deltas restart; index 0 always starts one).
    Returns (tokens int32 (L,), offsets int64 (N + 1,)); measurement i is
    tokens[offsets[i] : offsets[i + 1]].
    """
    src = np.asarray(src, dtype=np.uint8)
    dst = np.asarray(dst, dtype=np.uint8)
    version = np.asarray(version)
    rtt = np.asarray(rtt_ms, dtype=np.float64)
    time = np.asarray(time, dtype=np.int64)
    has_time = np.asarray(has_time, dtype=bool)
    order = np.asarray(order, dtype=np.int64)
    n = len(rtt)
    if not (
        src.shape == dst.shape == (n, 16)
        and version.shape == time.shape == has_time.shape == (n,)
        and order.shape == (n, 4)
    ):
        raise InputError("encode: src/dst must be (N, 16), order (N, 4), the rest (N,)")
    if n == 0:
        return np.zeros(0, np.int32), np.zeros(1, np.int64)
    v4 = version == 4
    if not (v4 | (version == 6)).all():
        raise InputError(f"IP version must be 4 or 6, got {version[~(v4 | (version == 6))][0]}")
    if (src[v4, 4:].any()) or (dst[v4, 4:].any()):
        raise InputError("an IPv4 address has non-zero bytes beyond the first four")
    if np.isnan(rtt).any():
        raise InputError(f"RTT is NaN at index {int(np.flatnonzero(np.isnan(rtt))[0])}")
    if (has_time & (time < 0)).any():
        raise InputError("timestamp before 1970")
    if not (np.sort(order, axis=1) == np.arange(4)).all():
        raise InputError("every field order must be a permutation of 0..3")

    # Timestamp kinds: delta to the previous timestamped measurement of the same context.
    seg = np.cumsum(_resets(reset, n))
    tidx = np.flatnonzero(has_time)
    t = time[tidx]
    first = np.ones(len(tidx), bool)
    first[1:] = seg[tidx[1:]] != seg[tidx[:-1]]
    delta = np.zeros(len(tidx), np.int64)
    delta[1:] = t[1:] - t[:-1]
    is_abs = first | (delta < 0) | (delta >= DELTA4_LIMIT)
    is_d1 = ~is_abs & (delta < DELTA1_LIMIT)
    ts_kind = np.where(is_abs, TIMESTAMP_ABS, np.where(is_d1, TIMESTAMP_DELTA1, TIMESTAMP_DELTA4))
    ts_len = np.where(is_abs, 9, np.where(is_d1, 2, 5))

    failed = rtt < 0
    addr_len = np.where(v4, 5, 17)
    lens = np.zeros((n, 4), np.int64)  # (N, field id)
    lens[:, FIELD_SRC] = addr_len
    lens[:, FIELD_DST] = addr_len
    lens[:, FIELD_RESULT] = np.where(failed, 1, 3)
    lens[tidx, FIELD_TIME] = ts_len
    meas_len = 1 + lens.sum(axis=1)
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(meas_len, out=offsets[1:])
    # Start of each field: 1 + lengths of the fields before it in this measurement's order.
    lens_in_order = np.take_along_axis(lens, order, axis=1)  # (N, 4)
    starts_in_order = 1 + np.cumsum(lens_in_order, axis=1) - lens_in_order
    field_start = np.empty_like(starts_in_order)
    np.put_along_axis(field_start, order, starts_in_order, axis=1)
    field_start += offsets[:-1, None]

    out = np.empty(offsets[-1], np.int32)
    out[offsets[:-1]] = MEASUREMENT_START
    addr_mat = np.empty((n, 17), np.int32)
    addr_mat[:, 0] = np.where(v4, SRC_IPV4, SRC_IPV6)
    addr_mat[:, 1:] = src.astype(np.int32) + BYTE0
    _scatter(out, field_start[:, FIELD_SRC], addr_len, addr_mat)
    addr_mat[:, 0] = np.where(v4, DST_IPV4, DST_IPV6)
    addr_mat[:, 1:] = dst.astype(np.int32) + BYTE0
    _scatter(out, field_start[:, FIELD_DST], addr_len, addr_mat)

    res = np.full((n, 3), FAILED, np.int32)
    ok = ~failed
    code = rtt_to_code(rtt[ok]).astype(np.int32)
    res[ok, 0] = RTT_START
    res[ok, 1] = BYTE0 + (code >> 8)
    res[ok, 2] = BYTE0 + (code & 0xFF)
    _scatter(out, field_start[:, FIELD_RESULT], lens[:, FIELD_RESULT], res)

    if len(tidx):
        ts = np.zeros((len(tidx), 9), np.int32)
        ts[:, 0] = ts_kind
        abs_bytes = t.astype(">u8").view(np.uint8).reshape(-1, 8)
        d4_bytes = np.clip(delta, 0, DELTA4_LIMIT - 1).astype(">u4").view(np.uint8).reshape(-1, 4)
        ts[is_abs, 1:9] = abs_bytes[is_abs]
        ts[~is_abs, 1:5] = np.where(is_d1[~is_abs, None], 0, d4_bytes[~is_abs])
        ts[is_d1, 1] = delta[is_d1]
        ts[:, 1:] += BYTE0
        _scatter(out, field_start[tidx, FIELD_TIME], ts_len, ts)
    return out, offsets


def _resets(reset, n: int) -> np.ndarray:
    r = np.zeros(n, bool) if reset is None else np.asarray(reset, dtype=bool).copy()
    if r.shape != (n,):
        raise InputError("reset must be (N,)")
    r[0] = True
    return r


# ----------------------------------------------------------------------------------------------
# decoder / validator


class TokenStreamError(InputError):
    """A token stream that breaks the grammar; `.position` is the offending token's index."""

    def __init__(self, position: int, reason: str):
        super().__init__(f"token {position}: {reason}")
        self.position = position
        self.reason = reason


ADDRESS_LOOKBACK = ADDRESS_BYTES[6]  # tokens before a position `address_progress` may need


def address_progress(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each position of token streams idx (B, T) stands inside an address -> (version,
    n_bytes), both (B, T) int64: version 4 or 6 at an address byte (0 elsewhere) and how many
    bytes of that address are known there (1..4 or 1..16).

    The grammar makes this local: a byte token belongs to the field opened by the nearest
    earlier role token, so a byte is the n-th byte of an address iff that role token is an
    address role n positions back. A stream cut inside an address (no role token in view) marks
    those bytes as 0; to be sure of a position, give it ADDRESS_LOOKBACK tokens of history.
    Torch ops only (no Python loop over positions), so the model runs it on any device.
    """
    import torch  # not at the top: the rest of the language (and `ping-llm --help`) needs none

    B, T = idx.shape
    pos = torch.arange(T, device=idx.device).expand(B, T)
    role_at = torch.where(idx < BYTE0, pos, torch.full_like(pos, -1))
    last = role_at.cummax(dim=1).values  # (B, T) position of the nearest role token, -1 none
    role = idx.gather(1, last.clamp(min=0))
    n = pos - last
    v4 = ((role == SRC_IPV4) | (role == DST_IPV4)) & (n <= ADDRESS_BYTES[4])
    v6 = ((role == SRC_IPV6) | (role == DST_IPV6)) & (n <= ADDRESS_BYTES[6])
    ok = (last >= 0) & (n >= 1) & (v4 | v6)
    version = torch.where(ok, torch.where(v4, 4, 6), 0)
    return version, torch.where(ok, n, 0)


def result_targets(idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Which next-token targets (B, T) of inputs idx (B, T) are a Result field: RTT_START or
    FAILED, or one of the two RTT bytes after RTT_START -> (B, T) bool. Role ids never appear as
    bytes, so this is local too; an RTT's second byte at position 0 (its RTT_START cut off) is
    not marked."""
    import torch

    after_start = torch.zeros_like(idx, dtype=torch.bool)
    after_start[:, 1:] = idx[:, :-1] == RTT_START
    return (targets == RTT_START) | (targets == FAILED) | (idx == RTT_START) | after_start


def address_complete(version: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """Where `address_progress` says an address's last byte is: (B, T) bool."""
    return ((version == 4) & (n == ADDRESS_BYTES[4])) | ((version == 6) & (n == ADDRESS_BYTES[6]))


def decode(tokens, *, with_orders: bool = False):
    """Token ids -> list[Measurement] (and their field orders if asked); TokenStreamError if the
    stream breaks the grammar. An empty stream is valid."""
    toks = [int(x) for x in np.asarray(tokens).ravel()]
    n = len(toks)
    measurements: list[Measurement] = []
    orders: list[tuple[int, ...]] = []
    prev_time = None
    i = 0

    def read_bytes(start: int, count: int, what: str) -> bytes:
        if start + count > n:
            raise TokenStreamError(n, f"stream ends inside {what} ({count} bytes expected)")
        for j in range(start, start + count):
            if toks[j] < BYTE0:
                raise TokenStreamError(j, f"{token_name(toks[j])} inside {what}, byte expected")
        return bytes(t - BYTE0 for t in toks[start : start + count])

    while i < n:
        if toks[i] != MEASUREMENT_START:
            bad = toks[i]
            name = token_name(bad) if 0 <= bad < VOCAB_SIZE else str(bad)
            raise TokenStreamError(i, f"expected MEASUREMENT_START, got {name}")
        start = i
        i += 1
        fields: dict[int, object] = {}
        order: list[int] = []
        while i < n and toks[i] != MEASUREMENT_START:
            tok = toks[i]
            if not 0 <= tok < VOCAB_SIZE:
                raise TokenStreamError(i, f"token id {tok} outside the vocabulary")
            if tok >= BYTE0:
                raise TokenStreamError(i, "byte token where a field role was expected")
            field, nbytes = ROLE_FIELD.get(tok), ROLE_BYTES.get(tok)
            if field in (FIELD_SRC, FIELD_DST):
                value: object = (
                    read_bytes(i + 1, nbytes, token_name(tok)),
                    4 if nbytes == 4 else 6,
                )
            elif field == FIELD_TIME:
                raw = int.from_bytes(read_bytes(i + 1, nbytes, token_name(tok)), "big")
                if tok != TIMESTAMP_ABS and prev_time is None:
                    raise TokenStreamError(i, "timestamp delta before any absolute timestamp")
                value = raw if tok == TIMESTAMP_ABS else prev_time + raw
            elif tok == RTT_START:
                b = read_bytes(i + 1, 2, "RTT")
                code = b[0] << 8 | b[1]
                if not is_canonical_code(code):
                    raise TokenStreamError(i + 1, f"non-canonical RTT code 0x{code:04x}")
                value = float(code_to_rtt(code))
            elif tok == FAILED:
                value = -1.0
            elif tok == THROUGHPUT_START:
                raise TokenStreamError(i, "THROUGHPUT_START is reserved and never valid")
            else:
                raise TokenStreamError(i, f"unexpected {token_name(tok)}")
            if field in fields:
                raise TokenStreamError(i, f"second {FIELD_NAMES[field]} field in one measurement")
            fields[field] = value
            order.append(field)
            if field == FIELD_TIME:
                prev_time = value
            i += 1 + nbytes
        missing = [FIELD_NAMES[f] for f in (FIELD_SRC, FIELD_DST, FIELD_RESULT) if f not in fields]
        if missing:
            raise TokenStreamError(start, f"measurement lacks {', '.join(missing)}")
        (sb, sv), (db, dv) = fields[FIELD_SRC], fields[FIELD_DST]
        if sv != dv:
            raise TokenStreamError(start, "source and destination are of different IP versions")
        measurements.append(
            Measurement(
                src=format_address(sb, sv),
                dst=format_address(db, dv),
                rtt_ms=fields[FIELD_RESULT],
                time=fields.get(FIELD_TIME),
            )
        )
        orders.append(tuple(order))
    return (measurements, orders) if with_orders else measurements
