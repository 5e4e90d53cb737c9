"""The canonical measurement table: the exact schema of the shared contract, readers
that accept our files and the original author's, and a validator that catches bad tables."""

from __future__ import annotations

import datetime as dt

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ping_llm.data.schema import (
    CANONICAL_SCHEMA,
    FAILED_RTT,
    iter_canonical,
    normalize,
    read_canonical,
    validate,
    write_canonical,
)
from ping_llm.errors import InputError

T0 = 1_750_766_400  # 2025-06-24T12:00:00Z


def canonical(n=3, **cols) -> pa.Table:
    base = {
        "event_time": pa.array([T0 + i for i in range(n)], pa.int64()).cast(
            pa.timestamp("s", tz="UTC")),
        "src_addr": ["192.0.2.1"] * n,
        "dst_addr": ["8.8.8.8"] * n,
        "ip_version": pa.array([4] * n, pa.int8()),
        "rtt": [42.5 + i for i in range(n)],
        "prb_id": pa.array([7] * n, pa.int64()),
        "msm_id": pa.array([12345] * n, pa.int64()),
        "size": pa.array([64] * n, pa.int32()),
    }
    base.update(cols)
    return pa.table(base).cast(CANONICAL_SCHEMA)


def author_table() -> pa.Table:
    """The original author's layout (seeds/): int64 everywhere, extra columns, tz-aware time."""
    ny = dt.timezone(dt.timedelta(hours=-4))
    return pa.table({
        "msm_id": pa.array([12345, 12346], pa.int64()),
        "event_time": pa.array([dt.datetime(2025, 6, 24, 8, 0, 0, 900_000, tzinfo=ny),
                                dt.datetime(2025, 6, 24, 8, 0, 1, tzinfo=ny)],
                               pa.timestamp("us", tz="America/New_York")),
        "src_addr": ["192.0.2.1", "2001:db8::1"],
        "dst_addr": ["8.8.8.8", "2001:4860:4860::8888"],
        "ip_version": pa.array([4, 6], pa.int64()),
        "rtt": [42.5, -1.0],
        "size": pa.array([64, 2000], pa.int64()),
        "packet_error_count": pa.array([0, 16], pa.int64()),
        "rtt_min": [40.0, None],
        "rtt_avg": [42.5, None],
        "rtt_max": [45.0, None],
    })


def test_schema_is_the_shared_contract():
    assert CANONICAL_SCHEMA.names == ["event_time", "src_addr", "dst_addr", "ip_version", "rtt",
                                      "prb_id", "msm_id", "size"]
    assert CANONICAL_SCHEMA.field("event_time").type == pa.timestamp("s", tz="UTC")
    assert [CANONICAL_SCHEMA.field(c).type for c in ("ip_version", "rtt", "size")] == [
        pa.int8(), pa.float64(), pa.int32()]
    assert all(CANONICAL_SCHEMA.field(c).nullable for c in ("prb_id", "msm_id", "size"))
    assert FAILED_RTT == -1.0


def test_our_files_round_trip(tmp_path):
    t = canonical()
    write_canonical(t, tmp_path / "a.parquet")
    assert read_canonical(tmp_path / "a.parquet").equals(t)
    assert read_canonical(tmp_path).equals(t)  # a directory
    assert read_canonical(str(tmp_path / "*.parquet")).equals(t)  # a glob
    assert [p.name for p in tmp_path.iterdir()] == ["a.parquet"]  # no temp file left


def test_the_original_authors_files_are_normalised(tmp_path):
    pq.write_table(author_table(), tmp_path / "author.parquet")
    t = read_canonical(tmp_path / "author.parquet")
    assert t.schema == CANONICAL_SCHEMA
    # 08:00:00.9 at UTC-4 is 12:00:00Z, floored to the second
    assert [x.timestamp() for x in t.column("event_time").to_pylist()] == [T0, T0 + 1]
    assert t.column("ip_version").to_pylist() == [4, 6]
    assert t.column("size").to_pylist() == [64, 2000]
    assert t.column("prb_id").to_pylist() == [None, None]
    validate(t)


@pytest.mark.parametrize(
    "values, typ",
    [([T0, T0 + 1], pa.int64()), ([T0, T0 + 1], pa.uint32()),
     ([T0 + 0.7, T0 + 1.2], pa.float64())],
)
def test_epoch_seconds_are_accepted(values, typ):
    t = author_table().set_column(1, "event_time", pa.array(values, typ))
    out = normalize(t)
    assert [x.timestamp() for x in out.column("event_time").to_pylist()] == [T0, T0 + 1]


def test_epoch_milliseconds_are_refused_not_guessed():
    t = author_table().set_column(1, "event_time", pa.array([T0 * 1000, T0 * 1000], pa.int64()))
    with pytest.raises(InputError, match="milliseconds"):
        normalize(t)


def test_missing_required_column_is_a_clear_error(tmp_path):
    pq.write_table(author_table().drop_columns(["dst_addr"]), tmp_path / "x.parquet")
    with pytest.raises(InputError, match="dst_addr"):
        read_canonical(tmp_path / "x.parquet")


@pytest.mark.parametrize(
    "col, values, match",
    [
        ("rtt", [1.0, float("nan")], "NaN"),
        ("rtt", [1.0, None], "null"),
        ("ip_version", [4, 5], "ip_version"),
        ("src_addr", ["1.1.1.1", None], "null"),
    ],
)
def test_impossible_values_are_refused(col, values, match):
    t = author_table()
    t = t.set_column(t.schema.get_field_index(col), col, pa.array(values))
    with pytest.raises(InputError, match=match):
        normalize(t)


def test_any_negative_rtt_is_a_failure():
    t = author_table().set_column(5, "rtt", pa.array([-5.0, 3.0]))
    assert normalize(t).column("rtt").to_pylist() == [FAILED_RTT, 3.0]


def test_not_found_and_not_parquet_are_input_errors(tmp_path):
    with pytest.raises(InputError):
        read_canonical(tmp_path / "nope.parquet")
    with pytest.raises(InputError):
        read_canonical(str(tmp_path / "*.parquet"))
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(InputError, match="not a readable Parquet"):
        read_canonical(tmp_path / "bad.parquet")


def test_empty_input_gives_an_empty_canonical_table(tmp_path):
    assert read_canonical([]).schema == CANONICAL_SCHEMA
    write_canonical(canonical(0), tmp_path / "e.parquet")
    assert read_canonical(tmp_path).num_rows == 0


def test_iter_canonical_streams_the_same_rows(tmp_path):
    write_canonical(canonical(5), tmp_path / "a.parquet")
    write_canonical(canonical(4), tmp_path / "b.parquet")
    parts = list(iter_canonical(tmp_path, batch_rows=2))
    assert len(parts) == 5 and pa.concat_tables(parts).equals(read_canonical(tmp_path))


@pytest.mark.parametrize(
    "cols, match",
    [
        ({"src_addr": ["192.0.2.1", "192.0.2.300", "x"]}, "src_addr"),
        ({"dst_addr": ["8.8.8.8", "2001:db8::1", "8.8.8.8"]}, "dst_addr"),
        ({"dst_addr": ["::ffff:8.8.8.8"] * 3}, "dst_addr"),
        ({"rtt": [1.0, -2.0, 3.0]}, "negative"),
        ({"rtt": [1.0, float("inf"), 3.0]}, "non-finite"),
    ],
)
def test_validate_catches_bad_tables(cols, match):
    with pytest.raises(InputError, match=match):
        validate(canonical(**cols))


def test_validate_accepts_good_tables_and_refuses_foreign_schemas():
    validate(canonical())
    validate(canonical(src_addr=["2001:db8::1"] * 3, dst_addr=["2001:db8::2"] * 3,
                       ip_version=pa.array([6] * 3, pa.int8())))
    with pytest.raises(InputError, match="schema"):
        validate(author_table())
