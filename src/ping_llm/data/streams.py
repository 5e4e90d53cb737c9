"""Bytes in: decompression by magic number and framing of JSON values (for `ping_llm.data.ingest`).

Inputs are streamed in blocks of READ_BYTES, so memory stays flat whatever the file size. The
compression (gzip, bzip2, zstd or none) is detected from the content, not the file name; a
truncated or corrupt stream keeps everything decoded before the damage and says what happened.
`json_values` frames concatenated JSON values (API downloads, pretty-printed or not) with a
sliding buffer over the C scanner and resynchronises on the next result after a bad element.
"""

from __future__ import annotations

import bz2
import codecs
import json
import os
import re
import sys
import zlib

READ_BYTES = 1 << 20


class StreamState:
    """What went wrong with the compressed stream, if anything (read after it is consumed)."""

    def __init__(self):
        self.damage: str | None = None  # "truncated_file" / "corrupt_file"


def decompressed(chunks, st: StreamState):
    """Byte chunks -> decompressed blocks (gzip, bzip2 or zstd by magic number, else as is;
    concatenated members and zero padding allowed). Damage ends the stream and is recorded in
    `st.damage`; everything decoded before it is still yielded."""
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



_SKIP = re.compile(r"[\s,\[\]]*")


_START = re.compile(r"\{")


_RESULT_KEYS = ("timestamp", "prb_id", "msm_id")


def json_values(blocks, max_obj: int = 8 << 20):
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


class open_chunks:  # noqa: N801 - used like open()
    """`with open_chunks(path | "-" | file object | iterable of bytes) as chunks:` byte chunks."""

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
