"""Which results are already ingested: exact deduplication in memory that does not grow.

Ingest drops a result whose key (`ripe.result_key`, 64 bits) it has already seen, earlier in the
same input or in any output already in the directory, and must never drop one it has not (good
data is never lost): the test is exact, so every key is kept. Keys live on disk, in sorted .npy
files of unique uint64 (8 bytes a result). In memory, per file, only every BLOCK-th key (an index
of 1/1024 of the file); for all the files together, one bit per hash slot (SLOTS bits, 128 MB),
which answers "never seen" without reading a file for nearly every new key. Only a duplicate, or
a new key whose slot another key took (n / SLOTS of them: 2% at 23M keys, 9% at 100M), reads one
8 KB block per file. Files are read with positioned reads, never memory-mapped, so their pages are
the OS's cache and not this process's memory.

Within one input the new keys gather in a set up to FLUSH, are sorted into a run on disk, and the
newest run is merged into the one before it while that one is at most twice its size (as an LSM
tree merges levels): at most ~log2(n / FLUSH) runs are searched, and each key is rewritten about
as many times, sequentially. Merges hold CHUNK keys in memory however many files they read, and
take FAN_IN files at a time (a directory of thousands of outputs would exhaust descriptors).
"""

from __future__ import annotations

import array
import os
import shutil
import tempfile
import weakref
from pathlib import Path

import numpy as np

from ping_llm.errors import InputError

BLOCK = 1024  # keys per index entry: a lookup reads one block of 8 KB from each file
CHUNK = BLOCK * 1024  # keys in memory at a time in a sequential read or a merge (8 MB)
FAN_IN = 128  # key files merged at once (each holds a file descriptor)
_U64 = np.dtype(np.uint64)


def _header(n: int) -> dict:
    return {"descr": np.lib.format.dtype_to_descr(_U64), "fortran_order": False, "shape": (n,)}


class KeyFile:
    """A sorted .npy of unique uint64 keys, read through an in-memory index of every BLOCK-th
    key. A file that is not sorted (key files written before they were) is sorted once, in
    place, in memory."""

    def __init__(self, path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as fh:
                major, _ = np.lib.format.read_magic(fh)
                read = (np.lib.format.read_array_header_1_0 if major == 1
                        else np.lib.format.read_array_header_2_0)
                shape, _, dtype = read(fh)
                self.offset, self.n = fh.tell(), shape[0]
                if dtype != _U64 or len(shape) != 1:
                    raise ValueError(f"{dtype} {shape}, not uint64 (n,)")
                if os.fstat(fh.fileno()).st_size != self.offset + 8 * self.n:
                    raise ValueError("its size is not what its header says")
        except (OSError, ValueError) as e:
            raise InputError(f"{self.path} is not a readable key file ({e}); delete it (and "
                             "the output it belongs to, to ingest that input again)") from None
        self.fd = os.open(self.path, os.O_RDONLY)
        self.close = weakref.finalize(self, os.close, self.fd)  # close(): at most once
        index, last = [], None
        for c in self.chunks():
            if (c[1:] <= c[:-1]).any() or (last is not None and c[0] <= last):
                self._sort_in_place()
                return
            index.append(c[::BLOCK])
            last = c[-1]
        self.index = np.concatenate(index) if index else np.zeros(0, _U64)

    def _sort_in_place(self) -> None:
        keys = _sorted_unique(self.read(0, self.n))
        write(self.path, [keys])
        self.close()
        self.__init__(self.path)

    def read(self, start: int, stop: int) -> np.ndarray:
        """Keys [start, stop) of the file."""
        return np.frombuffer(os.pread(self.fd, (stop - start) * 8, self.offset + start * 8),
                             _U64)

    def chunks(self, size: int = CHUNK):
        for start in range(0, self.n, size):
            yield self.read(start, min(self.n, start + size))

    def _block(self, key: np.uint64) -> tuple[int, np.ndarray]:
        j = int(self.index.searchsorted(key, "right")) - 1
        if j < 0:
            return 0, np.zeros(0, _U64)
        return j * BLOCK, self.read(j * BLOCK, min(self.n, (j + 1) * BLOCK))

    def __contains__(self, key: np.uint64) -> bool:
        _, blk = self._block(key)
        i = int(blk.searchsorted(key))
        return i < len(blk) and blk[i] == key

    def count_below(self, key: np.uint64, inclusive: bool = False) -> int:
        """How many keys are < key (<= key if inclusive)."""
        start, blk = self._block(key)
        return start + int(blk.searchsorted(key, "right" if inclusive else "left"))

    def __len__(self) -> int:
        return self.n


def _sorted_unique(x: np.ndarray) -> np.ndarray:
    """np.unique for uint64, 10x faster on random keys and 100x on a merge's few sorted runs:
    numpy 2.4's unique hashes wide integers (~1 us a key); a stable sort is timsort, linear on
    sorted runs."""
    x = np.sort(x, kind="stable")
    return x[np.concatenate(([True], x[1:] != x[:-1]))]


def write(path, parts) -> None:
    """Arrays of keys, one after the other, as one .npy at path: written to a temporary renamed
    into place (a reader of the old file keeps it: a new inode)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".w.tmp")
    with open(tmp, "wb") as fh:
        np.lib.format.write_array_header_1_0(fh, _header(sum(len(p) for p in parts)))
        for p in parts:
            np.asarray(p, _U64).tofile(fh)
    os.replace(tmp, path)


def merge(files: list[KeyFile], path) -> KeyFile:
    """The union of sorted key files as one sorted key file at path, CHUNK keys in memory
    across them. The count is known only at the end: the header is written again then (the
    same length: numpy pads it)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".w.tmp")
    pos, total = [0] * len(files), 0
    chunk = max(BLOCK, CHUNK // max(1, len(files)))
    with open(tmp, "wb") as fh:
        np.lib.format.write_array_header_1_0(fh, _header(0))
        start = fh.tell()
        while True:
            heads = {i: f.read(pos[i], min(f.n, pos[i] + chunk)) for i, f in enumerate(files)
                     if pos[i] < f.n}
            if not heads:
                break
            bound = min(h[-1] for h in heads.values())  # every key <= bound of each file is here
            parts = []
            for i, h in heads.items():
                m = int(h.searchsorted(bound, "right"))
                parts.append(h[:m])
                pos[i] += m
            out = _sorted_unique(np.concatenate(parts))
            out.tofile(fh)
            total += len(out)
        fh.seek(0)
        np.lib.format.write_array_header_1_0(fh, _header(total))
        if fh.tell() != start:
            raise AssertionError("npy header changed length")  # numpy pads it for growth
    os.replace(tmp, path)
    return KeyFile(path)


def merge_paths(paths, path) -> KeyFile:
    """merge() of any number of key files, FAN_IN at a time; the partial merges are temporaries
    beside path, removed at the end."""
    path, paths, parts = Path(path), [Path(p) for p in paths], []
    try:
        while len(paths) > FAN_IN:
            level = []
            for i in range(0, len(paths), FAN_IN):
                parts.append(path.with_name(f"{path.name}.{len(parts)}.part.tmp"))
                files = [KeyFile(p) for p in paths[i : i + FAN_IN]]
                merge(files, parts[-1])
                for f in files:
                    f.close()
                level.append(parts[-1])
            paths = level
        files = [KeyFile(p) for p in paths]
        out = merge(files, path)
        for f in files:
            f.close()
        return out
    finally:
        for p in parts:
            p.unlink(missing_ok=True)


def shares(a: KeyFile, b: KeyFile) -> bool:
    """Whether two key files have a key in common (a chunk of `a` against b's keys in its
    range)."""
    for c in a.chunks():
        seg = b.read(b.count_below(c[0]), b.count_below(c[-1], inclusive=True))
        if len(seg) and np.isin(c, seg, assume_unique=True).any():
            return True
    return False


class Seen:
    """The keys of `before` (a KeyFile, or None) and those added since. Runs are spilled to a
    private temporary directory under `spill_dir` (default: the system's); `close()` removes
    it."""

    FLUSH = 1 << 18
    SLOTS = 1 << 30

    def __init__(self, before: KeyFile | None = None, spill_dir=None):
        self.before = before
        self.dir = Path(tempfile.mkdtemp(prefix=".ingest-", suffix=".tmp", dir=spill_dir))
        self._cleanup = weakref.finalize(self, shutil.rmtree, self.dir, ignore_errors=True)
        self.runs: list[KeyFile] = []
        self.n_runs = 0  # run files made so far (names)
        self.new: set[int] = set()  # the keys of `pending`, for membership
        self.pending = array.array("Q")
        self.bits = bytearray(self.SLOTS >> 3)
        if before is not None:
            view = np.frombuffer(self.bits, np.uint8)
            for c in before.chunks():
                slot = (c & np.uint64(self.SLOTS - 1)).astype(np.int64)
                np.bitwise_or.at(view, slot >> 3, (1 << (slot & 7)).astype(np.uint8))

    def __contains__(self, key: int) -> bool:
        slot = key & (self.SLOTS - 1)
        if not self.bits[slot >> 3] >> (slot & 7) & 1:
            return False
        if key in self.new:
            return True
        k = np.uint64(key)  # a Python int above 2**63 would make numpy convert the whole array
        return any(k in f for f in self.runs) or (self.before is not None and k in self.before)

    def add(self, key: int) -> None:
        """Remember a key that is not in (`key in self` was False)."""
        slot = key & (self.SLOTS - 1)
        self.bits[slot >> 3] |= 1 << (slot & 7)
        self.new.add(key)
        self.pending.append(key)
        if len(self.pending) >= self.FLUSH:
            self._flush()

    def _path(self) -> Path:
        self.n_runs += 1
        return self.dir / f"run{self.n_runs}.npy"

    def _flush(self) -> None:
        if not self.pending:
            return
        path = self._path()
        write(path, [np.sort(np.frombuffer(self.pending, _U64))])
        self.runs.append(KeyFile(path))
        self.new, self.pending = set(), array.array("Q")
        while len(self.runs) > 1 and len(self.runs[-2]) <= 2 * len(self.runs[-1]):
            old = self.runs[-2:]
            self.runs[-2:] = [merge(old, self._path())]
            for f in old:
                f.close()
                f.path.unlink()

    def write(self, path) -> None:
        """Every key added (not those of `before`), as one sorted key file at path."""
        self._flush()
        if self.runs:
            merge(self.runs, path)
        else:
            write(path, [])

    def close(self) -> None:
        self._cleanup()
