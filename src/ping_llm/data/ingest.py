"""`ping-llm ingest`: RIPE Atlas ping result files -> a directory of canonical Parquet files.

The parsing rules (what one result means, source identity, reject reasons per result) live in
`data.ripe`, decompression and JSON framing in `data.streams`; this module is everything
around them: streaming results in chunks through the rules, the output layout, worker processes
and the report.

Inputs: daily dumps (one JSON result per line; gzip, bzip2, zstd or plain, detected from the
content, not the file name), API downloads (a JSON array, pretty-printed or not; also any stream
of concatenated JSON values), or stdin ("-"). Everything is streamed in blocks: memory stays flat
whatever the file size (bounded by one chunk of ~128k results and the longest line). A JSON value
that is an array inside a JSON-lines file is taken as a list of results.

Bad input never stops the run and never loses other results' rows. Besides the per-result reasons
of `ripe`, per file: truncated_file (the compressed stream ends early; rows before it are kept,
the partial last line is the reject), corrupt_file (undecodable compressed data), line_too_long
(> 64 MiB without a newline). Each reject is a JSON line {"source", "line", "reason", "raw"} (raw
capped at 64 KiB; line is 1-based, the line where the element starts for JSON arrays, null for a
damaged array file).

Output layout (one Parquet file per input, so a month of dumps is ingested file by file and
appended, in parallel over files; re-running is idempotent):

    OUT/<input name>-<path id: 8 hex><version: 8 hex>.parquet   zstd, CANONICAL_SCHEMA, the
                                                                per-file report in its metadata
    OUT/_rejects/<same stem>.jsonl                              that input's rejects, if any
    OUT/_keys/<same stem>.npy                                   its results' keys (sorted uint64)

The version part hashes the input's name, size and mtime, the source-address mode and the
format version; an existing output with the same name is complete (outputs are written to a
temporary name and renamed), so the input is skipped and its stored report reused. When the input
changed since (or the source-address mode), its older output is replaced, never duplicated.
stdin is named by a digest of its content. A killed run leaves only hidden `.ingest-*.tmp` files,
which the next ingest into the same directory deletes once they are an hour old (a younger one
may be another ingest's, still writing).

Duplicates: a result whose `ripe.result_key` is already in the directory (an earlier output, or
earlier in the same input) is skipped and counted as `skipped.duplicate`. Each output keeps its
results' keys beside it; an ingest call merges the directory's keys into one sorted file for its
workers (on disk, 8 bytes a result: memory stays flat, `data.seen`), and afterwards re-does,
with the keys of the earlier ones, any input of the call that shared results with an earlier
input of the same call (files ingested in parallel cannot see each other).

Python API (the CLI verb `ping-llm ingest` is a thin wrapper): `ingest(inputs, out_dir,
source_address="auto", workers=1, rejects=None, progress=True) -> IngestReport`;
`iter_tables(source, ...)` streams one input as Arrow tables without writing anything. Worker
processes are spawned (not forked: pyarrow's threads make fork unsafe), so scripts that call
`ingest` with workers > 1 need the usual `if __name__ == "__main__":` guard.
"""

from __future__ import annotations

import concurrent.futures as cf
import glob
import hashlib
import json
import multiprocessing as mp
import os
import re
import shutil
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from ping_llm.data import seen, streams
from ping_llm.data.ripe import COUNTS, SOURCE_MODES, Batch, Reject, result_key
from ping_llm.data.schema import CANONICAL_SCHEMA
from ping_llm.data.streams import StreamState, decompressed, json_values, open_chunks
from ping_llm.data.synth import COMPANION_SUFFIXES
from ping_llm.errors import InputError

FORMAT_VERSION = 1
REPORT_KEY = b"ping_llm.ingest"
CHUNK_RESULTS = 1 << 17  # results per Arrow table / Parquet row group (~400k rows)
MAX_LINE = 64 << 20
MAX_RAW = 64 << 10


def _raw_text(raw) -> tuple[str, bool]:
    if isinstance(raw, bytes | bytearray):
        raw = bytes(raw[: MAX_RAW + 4]).decode("utf-8", errors="replace")
    return raw[:MAX_RAW], len(raw) > MAX_RAW


# ----------------------------------------------------------------------------------------------
# one input -> Arrow tables


class _Converter:
    """Runs one input through framing + Batch, yielding canonical tables chunk by chunk."""

    def __init__(self, name: str, mode: str, on_reject=None, on_progress=None, seen=None):
        self.name, self.batch = name, Batch(mode)
        self.on_reject, self.on_progress = on_reject, on_progress
        self.seen = seen

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
        key = None if self.seen is None else result_key(obj)
        if key is not None and key in self.seen:
            batch.skipped["duplicate"] += 1
            return
        try:
            batch.add(obj)
        except Reject as e:
            if raw is None:
                try:
                    raw = orjson.dumps(obj)
                except (TypeError, orjson.JSONEncodeError):
                    raw = repr(obj)
            self.reject(line, e.args[0], raw)
            return
        if key is not None:
            self.seen.add(key)

    def _flush(self, force=False):
        b = self.batch
        if len(b) >= CHUNK_RESULTS or (force and len(b)):
            return b.table()
        return None

    def run(self, chunks):
        st = StreamState()
        blocks = decompressed(chunks, st)
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
                stream = b"\n" in head or len(head) < streams.READ_BYTES
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
        for ok, line, x in json_values(gen()):
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
        batch, value, counts = self.batch, self.value, self.batch.counts
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
                value(lineno, obj, ln)
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
                report: dict | None = None, name: str | None = None, seen: seen.Seen | None = None):
    """Stream one input (path, "-" for stdin, a binary file object or an iterable of byte
    chunks) -> canonical pa.Tables of <= CHUNK_RESULTS results each.

    on_reject(record) receives each reject record; on_progress(n) the number of results read
    since the last call; `report`, if given, is filled with the counts at the end; `seen`, if
    given, drops results already in it (and gets this input's keys).
    """
    if name is None:
        name = source if isinstance(source, str) else getattr(source, "name", "<stream>")
    conv = _Converter(str(name), source_address, on_reject, on_progress, seen)
    with open_chunks(source) as chunks:
        yield from conv.run(chunks)
    if report is not None:
        report.update(_file_counts(conv.batch))


def _keys_file(out: Path, name: str) -> Path:
    return out / "_keys" / (name[: -len(".parquet")] + ".npy")


def _directory_keys(out: Path, path: Path, leave_out=()) -> seen.KeyFile:
    """The keys of the complete outputs in `out` (not those named in leave_out), merged into one
    sorted key file at path."""
    return seen.merge_paths([_keys_file(out, p.name) for p in sorted(out.glob("*.parquet"))
                             if p.name not in leave_out and _keys_file(out, p.name).exists()],
                            path)


def _file_counts(batch: Batch) -> dict:
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
        for k in COUNTS:
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
            # Skip hidden files and what `ping-llm synth` writes beside its results (the world,
            # its geolocation database), so that a directory of synthetic results ingests
            # cleanly.
            out.extend(str(p) for p in sorted(Path(s).iterdir())
                       if p.is_file() and not p.name.startswith(".")
                       and not p.name.endswith(COMPANION_SUFFIXES))
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
    stem = _stem(real)  # a symlink is the file it points to: ingested once, under its name
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
                seen_file: str | None = None, on_progress=None) -> dict:
    """One input -> its Parquet (+ rejects, + keys) in out_dir, atomically, leaving out the
    results whose keys are in seen_file (a .npy). Returns the file report."""
    t0 = time.perf_counter()
    out, rej_dir = Path(out_dir), Path(out_dir) / "_rejects"
    tag = f"{os.getpid()}-{time.monotonic_ns()}"
    tmp = out / f".ingest-{tag}.parquet.tmp"
    rej_tmp = out / f".ingest-{tag}.rejects.tmp"
    keys_tmp = out / f".ingest-{tag}.keys.tmp"
    known = seen.Seen(None if seen_file is None else seen.KeyFile(seen_file), spill_dir=out)
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
            for b in iter(lambda: sys.stdin.buffer.read(streams.READ_BYTES), b""):
                digest.update(b)
                yield b
        source = hashed()
    counts: dict = {}
    writer = pq.ParquetWriter(tmp, CANONICAL_SCHEMA, compression="zstd")
    try:
        try:
            for table in iter_tables(source, mode, on_reject, on_progress, counts, name=path,
                                     seen=known):
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
        known.write(keys_tmp)
        _keys_file(out, name).parent.mkdir(exist_ok=True)
        os.replace(keys_tmp, _keys_file(out, name))
        os.replace(tmp, out / name)  # the commit point: the output exists => it is complete
        if stale:
            for old in out.glob(stale):
                if old.name != name:
                    old.unlink(missing_ok=True)
                    (rej_dir / (old.name[: -len(".parquet")] + ".jsonl")).unlink(missing_ok=True)
                    _keys_file(out, old.name).unlink(missing_ok=True)
        return rep
    finally:
        if writer is not None:
            writer.close()
        known.close()
        for t in (tmp, rej_tmp, keys_tmp):
            t.unlink(missing_ok=True)


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
    if rejects is not None:
        if Path(rejects).is_dir():
            raise InputError(f"rejects: {str(rejects)!r} is a directory; name a file")
        if not Path(rejects).resolve().parent.is_dir():
            raise InputError(f"rejects: directory of {str(rejects)!r} does not exist")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        _remove_stale_tmp(out)
        probe = out / f".ingest-probe-{os.getpid()}.tmp"  # writable? (before any work is done)
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise InputError(f"cannot write to --out {out}: {e.strerror}") from None
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
    # The keys already in the directory, less those of outputs this call replaces.
    replaced = {old.name for _, _, stale in todo if stale for old in out.glob(stale)}
    seen_file = out / f".ingest-seen-{os.getpid()}-{time.monotonic_ns()}.tmp"
    before = _directory_keys(out, seen_file, leave_out=replaced)
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
                futs = {ex.submit(_ingest_one, p, str(out), source_address, n, s, str(seen_file)):
                        p for p, n, s in remote}
                pending = set(futs)
                while pending:
                    done, pending = cf.wait(pending, timeout=0.25)
                    bar.update(counter.value - bar.n)
                    for f in done:
                        reps[futs[f]] = f.result()
                        bar.set_postfix(files=f"{len(reps)}/{len(todo)}")
            before = _redo_overlaps(remote, reps, out, source_address, before)
        for p, n, s in local:  # one after the other: each sees the keys of those before it
            reps[p] = _ingest_one(p, str(out), source_address, n, s, str(seen_file),
                                  on_progress=bar.update)
            if len(local) > 1:
                new = seen.KeyFile(_keys_file(out, Path(reps[p]["output"]).name))
                before = seen.merge([before, new], seen_file)
            bar.set_postfix(files=f"{len(reps)}/{len(todo)}")
    finally:
        bar.close()
        seen_file.unlink(missing_ok=True)
    for p, _, _ in todo:
        report.add(reps[p])
    report.outputs = [f["output"] for f in report.files]
    if rejects is not None:
        _gather_rejects(report, Path(rejects))
    report.seconds = round(time.perf_counter() - t0, 3)
    return report


def _redo_overlaps(todo, reps, out: Path, mode: str, before: seen.KeyFile) -> seen.KeyFile:
    """Inputs ingested side by side saw only the keys from before the call: in input order, redo
    any that shares results with an earlier one, leaving those out. Returns before + all keys
    (the same file, merged)."""
    for p, _, stale in todo:
        name = Path(reps[p]["output"]).name
        keys = seen.KeyFile(_keys_file(out, name))
        if seen.shares(keys, before):  # it holds results of an earlier input of this call
            reps[p] = _ingest_one(p, str(out), mode, name, stale, str(before.path))
            keys = seen.KeyFile(_keys_file(out, name))
        before = seen.merge([before, keys], before.path)
    return before


def _remove_stale_tmp(out: Path, older_than_s: float = 3600.0) -> None:
    """Delete the hidden temporaries a killed ingest left behind. Only old ones: a temporary
    younger than an hour may belong to another ingest writing the same directory right now."""
    now = time.time()
    for tmp in out.glob(".ingest-*.tmp"):
        try:
            if now - tmp.stat().st_mtime > older_than_s:
                shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()  # a dir: Seen's runs
        except FileNotFoundError:
            pass


def _gather_rejects(report: IngestReport, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        for f in report.files:
            out = Path(f["output"])
            rej = out.parent / "_rejects" / (out.name[: -len(".parquet")] + ".jsonl")
            if rej.exists():
                with open(rej, "rb") as src:
                    while b := src.read(streams.READ_BYTES):
                        fh.write(b)
    os.replace(tmp, path)
