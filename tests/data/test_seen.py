"""Exact deduplication with flat memory: sorted key files on disk read through a sparse index,
their merge, and Seen (a slot bitmap in front of runs spilled to disk), each checked against
numpy's set operations on random uint64 keys, the extremes of the range included."""

from __future__ import annotations

import numpy as np
import pytest

from ping_llm.data import seen
from ping_llm.errors import InputError

TOP = np.uint64(2**64 - 1)


def _keys(rng, n) -> np.ndarray:
    k = rng.integers(0, 2**64 - 1, size=n, dtype=np.uint64, endpoint=True)
    return np.unique(np.concatenate([k, np.array([0, TOP], np.uint64)]))


def _file(tmp_path, name, keys) -> seen.KeyFile:
    seen.write(tmp_path / name, [keys])
    return seen.KeyFile(tmp_path / name)


def test_a_key_file_answers_membership_and_rank_like_numpy(tmp_path):
    rng = np.random.default_rng(0)
    keys = _keys(rng, 5 * seen.BLOCK + 7)  # several index blocks and a partial last one
    f = _file(tmp_path, "k.npy", keys)
    probe = np.concatenate([keys[::37], rng.integers(0, 2**63, 500, dtype=np.uint64),
                            keys[::seen.BLOCK], keys[seen.BLOCK - 1 :: seen.BLOCK]])
    assert [k in f for k in probe] == np.isin(probe, keys).tolist()
    assert [f.count_below(k) for k in probe] == np.searchsorted(keys, probe).tolist()
    assert ([f.count_below(k, inclusive=True) for k in probe]
            == np.searchsorted(keys, probe, "right").tolist())
    assert np.array_equal(np.load(tmp_path / "k.npy"), keys)  # a plain .npy


def test_an_empty_key_file_holds_nothing(tmp_path):
    f = _file(tmp_path, "e.npy", np.zeros(0, np.uint64))
    assert len(f) == 0 and np.uint64(0) not in f and TOP not in f and f.count_below(TOP) == 0


def test_a_damaged_key_file_is_a_one_line_error(tmp_path):
    keys = _keys(np.random.default_rng(7), 100)
    seen.write(tmp_path / "k.npy", [keys])
    data = (tmp_path / "k.npy").read_bytes()
    for name, bad in (("cut.npy", data[:-8]), ("junk.npy", b"not a key file"),
                      ("float.npy", None)):
        if bad is None:
            np.save(tmp_path / name, keys.astype(np.float64))
        else:
            (tmp_path / name).write_bytes(bad)
        with pytest.raises(InputError, match="not a readable key file.*delete it"):
            seen.KeyFile(tmp_path / name)


def test_an_unsorted_key_file_from_an_older_version_is_sorted_in_place(tmp_path):
    keys = _keys(np.random.default_rng(1), 3000)
    shuffled = np.random.default_rng(2).permutation(keys)
    np.save(tmp_path / "old.npy", shuffled)
    f = seen.KeyFile(tmp_path / "old.npy")
    assert np.array_equal(np.load(tmp_path / "old.npy"), keys)
    assert all(k in f for k in shuffled[:200])


@pytest.mark.parametrize("chunk", [seen.BLOCK, seen.CHUNK])
def test_merge_is_the_sorted_union_chunk_by_chunk(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(seen, "CHUNK", chunk)
    rng = np.random.default_rng(3)
    a, b = _keys(rng, 4000), _keys(rng, 2500)
    b = np.union1d(b, a[::3])  # shared keys
    files = [_file(tmp_path, "a.npy", a), _file(tmp_path, "b.npy", b),
             _file(tmp_path, "e.npy", np.zeros(0, np.uint64))]
    m = seen.merge(files, tmp_path / "m.npy")
    assert np.array_equal(np.load(tmp_path / "m.npy"), np.union1d(a, b)) and len(m) == len(
        np.union1d(a, b))
    assert len(seen.merge([], tmp_path / "none.npy")) == 0


def test_many_key_files_are_merged_a_few_at_a_time(tmp_path, monkeypatch):
    monkeypatch.setattr(seen, "FAN_IN", 2)  # 7 files: three levels of partial merges
    rng = np.random.default_rng(6)
    parts = [_keys(rng, 300) for _ in range(7)]
    for i, p in enumerate(parts):
        seen.write(tmp_path / f"{i}.npy", [p])
    m = seen.merge_paths([tmp_path / f"{i}.npy" for i in range(7)], tmp_path / "all.npy")
    assert np.array_equal(np.load(tmp_path / "all.npy"), np.unique(np.concatenate(parts)))
    assert len(m) == len(np.unique(np.concatenate(parts)))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"{i}.npy" for i in range(7)] + ["all.npy"])  # no partial merge left behind


def test_shares_says_whether_two_key_files_meet(tmp_path, monkeypatch):
    monkeypatch.setattr(seen, "CHUNK", seen.BLOCK)
    rng = np.random.default_rng(4)
    keys = _keys(rng, 6000)
    even, odd = _file(tmp_path, "e.npy", keys[::2]), _file(tmp_path, "o.npy", keys[1::2])
    assert not seen.shares(even, odd) and not seen.shares(odd, even)
    one = _file(tmp_path, "one.npy", keys[5001:5002])  # an odd one
    assert seen.shares(odd, one) and seen.shares(one, odd)


@pytest.mark.parametrize("slots", [64, 1 << 30])  # every slot taken: every lookup reads files
def test_seen_knows_exactly_what_was_added_and_what_was_before(tmp_path, monkeypatch, slots):
    monkeypatch.setattr(seen.Seen, "FLUSH", 16)
    monkeypatch.setattr(seen.Seen, "SLOTS", slots)
    rng = np.random.default_rng(5)
    keys = _keys(rng, 3000)
    before, added, never = keys[:1000], keys[1000:2000], keys[2000:]
    s = seen.Seen(_file(tmp_path, "before.npy", before), spill_dir=tmp_path)
    for k in added.tolist():
        assert k not in s
        s.add(k)
    assert len(s.runs) <= 2 * np.log2(len(added) / 16) + 1  # merged as it goes, not 63 runs
    assert all(k in s for k in rng.permutation(np.concatenate([before, added])).tolist())
    assert not any(k in s for k in never.tolist())
    s.write(tmp_path / "out.npy")
    assert np.array_equal(np.load(tmp_path / "out.npy"), added)  # what was added, not before
    s.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["before.npy", "out.npy"]


def test_seen_with_nothing_added_writes_an_empty_key_file(tmp_path):
    s = seen.Seen(spill_dir=tmp_path)
    s.write(tmp_path / "k.npy")
    assert len(np.load(tmp_path / "k.npy")) == 0
