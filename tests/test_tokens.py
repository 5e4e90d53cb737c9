"""The token language (docs/tokens.md): vocabulary, RTT codec, timestamps, encoders, decoding."""

from __future__ import annotations

import ipaddress

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ping_llm import tokens as T
from ping_llm.errors import InputError

# ----------------------------------------------------------------------------------------------
# strategies: random mixed IPv4/IPv6/failed/timestamped contexts

ipv4 = st.integers(0, 2**32 - 1).map(lambda i: str(ipaddress.IPv4Address(i)))
ipv6 = (
    st.integers(0, 2**128 - 1)
    .map(ipaddress.IPv6Address)
    .filter(lambda a: a.ipv4_mapped is None)
    .map(str)
)
rtts = st.one_of(
    st.just(-1.0),
    st.floats(0, 3.0),  # sub-3 ms: the exact-microsecond range and its upper edge
    st.floats(0, 1e6),
    st.floats(0, 1e12),  # far beyond the maximum: clamps
    st.sampled_from([0.0, 2.047, 2.048, 1.024, T.RTT_MAX_MS, float("inf")]),
)
times = st.one_of(
    st.integers(0, 2**40),
    st.integers(1_500_000_000, 1_500_000_600),  # close together: DELTA1 and DELTA4 mixes
)


@st.composite
def measurement(draw):
    family = draw(st.sampled_from([ipv4, ipv6]))
    return T.Measurement(
        src=draw(family),
        dst=draw(family),
        rtt_ms=draw(rtts),
        time=draw(st.one_of(st.none(), times)),
    )


@st.composite
def context(draw, max_size=12):
    ms = draw(st.lists(measurement(), min_size=1, max_size=max_size))
    orders = [draw(st.permutations(range(4))) for _ in ms]
    return ms, orders


def arrays_of(ms, orders):
    src, sv = T.parse_addresses([m.src for m in ms])
    dst, dv = T.parse_addresses([m.dst for m in ms])
    assert (sv == dv).all()
    return dict(
        src=src,
        dst=dst,
        version=sv,
        rtt_ms=np.array([m.rtt_ms for m in ms]),
        time=np.array([m.time or 0 for m in ms], dtype=np.int64),
        has_time=np.array([m.time is not None for m in ms]),
        order=np.array(orders, dtype=np.int8),
    )


def quantised(m: T.Measurement) -> T.Measurement:
    rtt = m.rtt_ms if m.rtt_ms < 0 else float(T.code_to_rtt(T.rtt_to_code(m.rtt_ms)))
    canon = lambda a: str(ipaddress.ip_address(a))  # noqa: E731
    return T.Measurement(canon(m.src), canon(m.dst), rtt, m.time)


# ----------------------------------------------------------------------------------------------
# vocabulary


def test_vocabulary_has_267_ids_with_the_spec_role_numbers():
    assert T.VOCAB_SIZE == 267
    assert [T.token_id(n) for n in T.ROLE_NAMES] == list(range(11))
    assert (T.MEASUREMENT_START, T.SRC_IPV4, T.DST_IPV6, T.RTT_START, T.FAILED) == (0, 1, 4, 8, 10)
    assert T.token_name(11) == "B0x00" and T.token_name(266) == "B0xff"
    assert all(T.token_id(T.token_name(i)) == i for i in range(T.VOCAB_SIZE))
    with pytest.raises(InputError):
        T.token_name(267)
    with pytest.raises(InputError):
        T.token_id("B0x100")


# ----------------------------------------------------------------------------------------------
# RTT codec


def test_rtt_code_layout_is_exponent_then_mantissa():
    # 12.5 ms = 12500 us = 1562.5 * 2**3 -> e=3, m=1563 (round half up): byte1 = 3<<3 | 1563>>8.
    code = int(T.rtt_to_code(12.5))
    assert code >> 8 == (3 << 3) | (1563 >> 8) and code & 0xFF == 1563 & 0xFF
    assert T.code_to_rtt(code) == 1563 * 8 / 1000


@pytest.mark.parametrize(
    "rtt_ms, expected_us",
    [
        (0.0, 0),  # 0 us is representable
        (0.0004, 0),
        (0.0006, 1),
        (2.047, 2047),  # last exact microsecond
        (2.048, 2048),  # first value with e > 0 (normalised: e=1, m=1024)
        (2.0491, 2050),  # e=1 step is 2 us: nearest
        (T.RTT_MAX_MS, 2047 * 2**31),
        (T.RTT_MAX_MS * 10, 2047 * 2**31),  # clamp
        (float("inf"), 2047 * 2**31),
    ],
)
def test_rtt_boundaries(rtt_ms, expected_us):
    code = int(T.rtt_to_code(rtt_ms))
    assert T.is_canonical_code(code)
    assert (code & 0x7FF) << (code >> 11) == expected_us  # exact integer microseconds


@pytest.mark.parametrize("bad", [float("nan"), -0.5])
def test_rtt_codec_rejects_nan_and_negative(bad):
    with pytest.raises(InputError):
        T.rtt_to_code(bad)


@given(st.floats(0, T.RTT_MAX_MS, allow_nan=False))
def test_rtt_error_bounds(rtt_ms):
    back = float(T.code_to_rtt(T.rtt_to_code(rtt_ms)))
    us, back_us = rtt_ms * 1000, back * 1000
    if rtt_ms >= 1.024:
        assert abs(back_us - us) <= us / 2048 * (1 + 1e-12)
    else:
        assert abs(back_us - us) <= 0.5 + 1e-9


def test_rtt_rounds_to_the_nearest_code_everywhere():
    rng = np.random.default_rng(0)
    us = np.exp(rng.uniform(0, np.log(1e10), 100_000))
    code = T.rtt_to_code(us / 1000).astype(np.int64)
    grid = T.RTT_GRID_MS[np.isfinite(T.RTT_GRID_MS)] * 1000
    nearest = np.abs(grid[np.searchsorted(grid, us).clip(1, len(grid) - 1) - 1] - us)
    nearest = np.minimum(
        nearest, np.abs(grid[np.searchsorted(grid, us).clip(0, len(grid) - 1)] - us)
    )
    assert np.allclose(np.abs(T.code_to_rtt(code) * 1000 - us), nearest, rtol=0, atol=1e-6)


def test_the_canonical_grid_is_132_byte1_bins_of_256_codes_in_rtt_order():
    b1 = [b for b in range(256) if b >> 3 == 0 or b & 7 >= 4]  # e = b1 >> 3, m >> 8 = b1 & 7
    assert T.CANON_B1.tolist() == b1 and len(b1) == 132
    assert (((T.CANON_B1[:, None] << 8) | np.arange(256)).ravel() == T.CANON_CODES).all()
    assert T.is_canonical_code(T.CANON_CODES).all()
    assert (np.diff(T.RTT_GRID_MS[T.CANON_CODES]) > 0).all()  # ascending codes = ascending RTTs


def test_every_code_the_encoder_emits_is_canonical_and_in_its_own_cell():
    cells = T.rtt_code_cells_ms()
    valid = np.isfinite(T.RTT_GRID_MS)
    assert valid.sum() == 2048 + 31 * 1024  # e=0: all 2048 mantissas; e>0: m in [1024, 2048)
    # Cells tile [0, inf) in code order, and each code's own value lies inside its cell.
    lo, hi = cells[valid, 0], cells[valid, 1]
    assert lo[0] == 0 and hi[-1] == np.inf and (lo[1:] == hi[:-1]).all()
    assert (lo <= T.RTT_GRID_MS[valid]).all() and (T.RTT_GRID_MS[valid] < hi).all()
    # Encoding a cell's lower edge (just inside) gives that very code.
    codes = np.flatnonzero(valid)[1:-1]
    inside = np.nextafter(cells[codes, 0], np.inf) + 1e-9
    assert (T.rtt_to_code(inside) == codes).all()


def test_byte1_bins_are_log_scale_with_unused_values_marked():
    edges = T.byte1_bin_edges_ms()
    used = np.isfinite(edges[:, 0])
    # e = 0 uses all 8 byte1 values (0..2047 us), each e > 0 the 4 with m >> 8 in 4..7.
    assert used.sum() == 8 + 31 * 4
    assert not used[8:12].any() and used[12:16].all()
    e = edges[used]
    assert (e[1:, 0] == e[:-1, 1]).all()  # contiguous
    # Above 2 ms each octave is split into four bins (mantissa 1024-1279, ..., 1792-2047), so a
    # bin spans a factor between 8/7 and 5/4 and four consecutive bins span an octave.
    ratio = e[20:-1, 1] / e[20:-1, 0]
    assert np.all((ratio > 8 / 7 - 1e-3) & (ratio < 5 / 4 + 1e-3))
    octave = e[24:, 0] / e[20:-4, 0]
    assert np.allclose(octave, 2, rtol=1e-3)


# ----------------------------------------------------------------------------------------------
# timestamps


def _time_tokens(deltas, first=1_600_000_000):
    times = np.cumsum([first, *deltas])
    ms = [T.Measurement("10.0.0.1", "10.0.0.2", 1.0, int(t)) for t in times]
    toks = T.encode_reference(ms)
    return [t for t in toks if t in (T.TIMESTAMP_ABS, T.TIMESTAMP_DELTA1, T.TIMESTAMP_DELTA4)]


def test_timestamp_delta_boundaries():
    ABS, D1, D4 = T.TIMESTAMP_ABS, T.TIMESTAMP_DELTA1, T.TIMESTAMP_DELTA4
    assert _time_tokens([0, 255, 256, 2**32 - 1, 2**32, -1]) == [ABS, D1, D1, D4, D4, ABS, ABS]


def test_delta_is_to_the_previous_timestamped_measurement():
    ms = [
        T.Measurement("10.0.0.1", "10.0.0.2", 1.0, 1000),
        T.Measurement("10.0.0.1", "10.0.0.3", 1.0, None),
        T.Measurement("10.0.0.1", "10.0.0.4", 1.0, 1300),
    ]
    toks = T.encode_reference(ms)
    i = toks.index(T.TIMESTAMP_DELTA4)
    assert int.from_bytes(bytes(t - T.BYTE0 for t in toks[i + 1 : i + 5]), "big") == 300
    assert [m.time for m in T.decode(toks)] == [1000, None, 1300]


def test_vectorised_reset_restarts_the_delta_chain_per_context():
    ms = [T.Measurement("10.0.0.1", "10.0.0.2", 1.0, 1000 + i) for i in range(4)]
    a = arrays_of(ms, [T.QUERY_ORDER] * 4)
    toks, off = T.encode(**a, reset=np.array([True, False, True, False]))
    two = T.encode_reference(ms[:2]) + T.encode_reference(ms[2:])
    assert toks.tolist() == two


# ----------------------------------------------------------------------------------------------
# encoders agree; decode inverts encode


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(context())
def test_vectorised_encoder_equals_reference(ctx):
    ms, orders = ctx
    toks, offsets = T.encode(**arrays_of(ms, orders))
    assert toks.dtype == np.int32
    assert toks.tolist() == T.encode_reference(ms, orders)
    assert offsets[0] == 0 and offsets[-1] == len(toks)
    assert (toks[offsets[:-1]] == T.MEASUREMENT_START).all()
    assert toks.min() >= 0 and toks.max() < T.VOCAB_SIZE


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(context())
def test_decode_inverts_encode_up_to_rtt_quantisation(ctx):
    ms, orders = ctx
    decoded, got_orders = T.decode(T.encode_reference(ms, orders), with_orders=True)
    assert decoded == [quantised(m) for m in ms]
    expected = [
        tuple(f for f in o if m.time is not None or f != T.FIELD_TIME)
        for m, o in zip(ms, orders, strict=True)
    ]
    assert got_orders == expected


def test_vectorised_encoder_on_a_large_batch_matches_reference():
    rng = np.random.default_rng(1)
    n = 5000
    v6 = rng.random(n) < 0.4
    src = rng.integers(0, 256, (n, 16), dtype=np.uint8)
    dst = rng.integers(0, 256, (n, 16), dtype=np.uint8)
    src[~v6, 4:] = 0
    dst[~v6, 4:] = 0
    src[v6, :12] = [0x20, 1, 0xD, 0xB8, 0, 0, 0, 0, 0, 0, 0, 0]  # never IPv4-mapped
    version = np.where(v6, 6, 4).astype(np.uint8)
    rtt = np.where(rng.random(n) < 0.1, -1.0, rng.lognormal(3, 1.5, n))
    time = np.cumsum(rng.integers(0, 1000, n)) + 1_600_000_000
    has_time = rng.random(n) < 0.7
    order = T.random_orders(rng, n)
    toks, _ = T.encode(src, dst, version, rtt, time, has_time, order)
    ms = [
        T.Measurement(
            T.format_address(src[i], version[i]),
            T.format_address(dst[i], version[i]),
            rtt[i],
            int(time[i]) if has_time[i] else None,
        )
        for i in range(n)
    ]
    assert toks.tolist() == T.encode_reference(ms, order)


def test_random_orders_are_uniform_permutations():
    o = T.random_orders(np.random.default_rng(0), 24_000)
    assert (np.sort(o, axis=1) == np.arange(4)).all()
    _, counts = np.unique(o, axis=0, return_counts=True)
    assert len(counts) == 24 and counts.min() > 850 and counts.max() < 1150


# ----------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize(
    "src, dst, reason",
    [
        ("::ffff:1.2.3.4", "::1", "IPv4-mapped"),
        ("10.0.0.1", "2001:db8::1", "mixed address families"),
        ("10.0.0.256", "10.0.0.1", "not an IP address"),
        ("", "10.0.0.1", "not an IP address"),
    ],
)
def test_reference_encoder_rejects_bad_addresses(src, dst, reason):
    with pytest.raises(InputError, match=reason):
        T.encode_reference([T.Measurement(src, dst, 1.0)])


def test_vectorised_encoder_rejects_inconsistent_input():
    a = arrays_of([T.Measurement("10.0.0.1", "10.0.0.2", 1.0)], [T.QUERY_ORDER])
    with pytest.raises(InputError, match="NaN"):
        T.encode(**{**a, "rtt_ms": np.array([np.nan])})
    with pytest.raises(InputError, match="version"):
        T.encode(**{**a, "version": np.array([5])})
    with pytest.raises(InputError, match="permutation"):
        T.encode(**{**a, "order": np.array([[0, 0, 1, 2]])})
    with pytest.raises(InputError, match="beyond the first four"):
        bad = a["src"].copy()
        bad[0, 7] = 1
        T.encode(**{**a, "src": bad})
    with pytest.raises(InputError, match="1970"):
        T.encode(**{**a, "has_time": np.array([True]), "time": np.array([-5])})


GOOD = T.encode_reference([T.Measurement("10.0.0.1", "10.0.0.2", 5.0, 1000)])


@pytest.mark.parametrize(
    "stream, position, reason",
    [
        ([T.SRC_IPV4] + GOOD, 0, "expected MEASUREMENT_START"),
        (GOOD[:-2], len(GOOD) - 2, "stream ends inside"),
        (GOOD[:6] + GOOD[11:], 0, "measurement lacks dst"),  # drop the destination block
        (GOOD + GOOD[:6] + GOOD[1:6] + GOOD[6:], len(GOOD) + 6, "second src"),
        ([0, T.SRC_IPV4, 11, 11, 11, T.FAILED], 5, "inside SRC_IPV4"),
        ([0, 20], 1, "byte token where a field role"),
        ([0, T.THROUGHPUT_START], 1, "reserved"),
        ([0, T.TIMESTAMP_DELTA1, 12], 1, "delta before any absolute"),
        ([0, 300], 1, "outside the vocabulary"),
        ([0, T.RTT_START, T.BYTE0 + (1 << 3), T.BYTE0], 2, "non-canonical RTT"),
        (
            [0, T.SRC_IPV4, 11, 11, 11, 11, T.DST_IPV6] + [11] * 16 + [T.FAILED],
            0,
            "different IP versions",
        ),
    ],
)
def test_decoder_rejects_broken_streams_with_position_and_reason(stream, position, reason):
    with pytest.raises(T.TokenStreamError, match=reason) as e:
        T.decode(stream)
    assert e.value.position == position


def test_empty_stream_is_valid():
    assert T.decode([]) == []


def test_address_progress_counts_the_bytes_of_each_address_and_nothing_else():
    import torch

    ms = [T.Measurement("193.0.14.129", "8.8.8.8", 12.0, 1_700_000_000),
          T.Measurement("2001:67c:2e8::2", "2001:4860:4860::8888", -1.0)]
    toks = T.encode_reference(ms, orders=[(T.FIELD_TIME, T.FIELD_RESULT, T.FIELD_DST,
                                           T.FIELD_SRC), T.QUERY_ORDER])
    version, n = (x[0].tolist() for x in T.address_progress(torch.tensor([toks])))
    got = [(v, k) for v, k in zip(version, n, strict=True) if v]
    assert got == [(4, i) for i in range(1, 5)] * 2 + [(6, i) for i in range(1, 17)] * 2
    for i, tok in enumerate(toks):  # timestamp and RTT bytes are not address bytes
        if version[i]:
            assert tok >= T.BYTE0
    cut = T.address_progress(torch.tensor([toks[3:]]))[0][0].tolist()  # no role token in view
    assert cut[:1] == [0]


@given(context())
@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_result_targets_are_exactly_each_measurements_result_block(ctx):
    """The targets result_targets marks, in order, are the measurements' Result blocks (FAILED,
    or RTT_START and the code's two bytes), whatever the field order; nothing else is marked."""
    import torch

    ms, orders = ctx
    toks = torch.tensor([T.encode_reference(ms, orders)])
    x, y = toks[:, :-1], toks[:, 1:]
    marked = y[T.result_targets(x, y)].tolist()
    want = []
    for m in ms:
        if m.rtt_ms < 0:
            want.append(T.FAILED)
        else:
            code = int(T.rtt_to_code(m.rtt_ms))
            want += [T.RTT_START, T.BYTE0 + (code >> 8), T.BYTE0 + (code & 0xFF)]
    assert marked == want


def test_result_targets_do_not_mark_an_rtt_byte_whose_start_is_cut_off():
    import torch

    toks = T.encode_reference([T.Measurement("192.0.2.1", "198.51.100.7", 12.0)])  # QUERY_ORDER
    start = toks.index(T.RTT_START)
    cut = torch.tensor([toks[start + 1:]])  # begins at byte1: its RTT_START is out of view
    x, y = cut[:, :-1], cut[:, 1:]
    assert not T.result_targets(x, y).any()  # byte2 is the only target left, and unmarked


def test_time_blocks_follow_the_token_language_delta_rules():
    t = 1_700_000_000
    assert T.time_tokens(t, None)[0] == T.TIMESTAMP_ABS
    assert T.time_tokens(t, t - 255) == [T.TIMESTAMP_DELTA1, T.BYTE0 + 255]
    assert T.time_tokens(t, t - 256)[0] == T.TIMESTAMP_DELTA4
    assert T.time_tokens(t, t + 1)[0] == T.TIMESTAMP_ABS  # back in time: absolute again
    for prev in (None, t - 3, t - 70_000, t + 5):
        toks = T.time_tokens(t, prev)
        ms = [T.Measurement("192.0.2.1", "198.51.100.7", 1.0, prev)] if prev else []
        ref = T.encode_reference(ms + [T.Measurement("192.0.2.1", "198.51.100.7", 1.0, t)])
        assert ref[-len(toks) - 3:-3] == toks  # the reference encoder's time block, RTT after
