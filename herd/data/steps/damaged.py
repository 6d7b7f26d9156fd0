"""Damaged input, found and described: the `Corrupt` record a reader reports, line reading that
notices where a compressed file (gzip, zstd) breaks off, and the WARC boundary search and tail
check behind `WarcReader`'s skipping.

Trade-off: Python's gzip raises at the cut, but zstandard's stream reader and FastWARC end
quietly where a file is cut short, which is how a truncated crawl file once lost most of its
records without a word. Checking costs little: zstd is decompressed through a `decompressobj`
that says whether its frame ended, and only the last WARC record of a file is decompressed a
second time to check that it is whole.
"""

from __future__ import annotations

import gzip
import re
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Corrupt:
    """One damaged record or file region that a reader skipped."""

    file: str
    where: str      # "line 7", "byte 1419", "after line 12"
    problem: str

    def message(self) -> str:
        return f"{self.file}, {self.where}: {self.problem}"

    def to_dict(self) -> dict[str, str]:
        return {"file": self.file, "where": self.where, "problem": self.problem}


CorruptSink = Callable[[Corrupt], None]


class Damaged(Exception):
    """A compressed stream that cannot be read on (cut short or corrupt); `problem` says which."""

    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem


def _damage(e: BaseException) -> str:
    if isinstance(e, EOFError):
        return "the compressed file ends early (truncated); the records before this point were kept"
    return f"corrupt compressed data ({e}); the records before this point were kept"


def _zstd_chunks(path: str) -> Iterator[bytes]:
    # zstandard's stream_reader returns a clean EOF for a file cut inside a frame; a decompressobj
    # says whether the frame ended, which is how a truncated file is told from a complete one.
    import zstandard

    dctx = zstandard.ZstdDecompressor()
    obj, eof = dctx.decompressobj(), True
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            while block:
                try:
                    out = obj.decompress(block)
                except zstandard.ZstdError as e:
                    raise Damaged(_damage(e)) from None
                if out:
                    yield out
                eof = obj.eof
                block = obj.unused_data if obj.eof else b""
                if obj.eof:
                    obj = dctx.decompressobj()
    if not eof:
        raise Damaged(_damage(EOFError()))


def byte_lines(path: str | Path) -> Iterator[bytes]:
    """The lines of a text file (plain, .gz, .zst) as bytes, so that each is decoded on its own and a
    bad one can be skipped; raises `Damaged` where the compressed stream breaks off."""
    p = str(path)
    if p.endswith(".zst") or p.endswith(".zstd"):
        rest = b""
        for chunk in _zstd_chunks(p):
            lines = (rest + chunk).split(b"\n")
            rest = lines.pop()
            yield from (line + b"\n" for line in lines)
        if rest:
            yield rest
        return
    opener = gzip.open if p.endswith(".gz") else open
    with opener(p, "rb") as f:
        while True:
            try:
                line = f.readline()
            except (EOFError, OSError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
                raise Damaged(_damage(e)) from None
            if not line:
                return
            yield line


GZIP_MAGIC = b"\x1f\x8b\x08"


def next_boundary(f: Any, pos: int, gz: bool) -> int | None:
    """The next offset >= pos where a record could start: a gzip member (WARC files compress each
    record as its own member) or a WARC/1.x version line."""
    magic = GZIP_MAGIC if gz else b"WARC/1."
    block = 1 << 20
    while True:
        f.seek(pos)
        data = f.read(block + len(magic))
        if not data:
            return None
        i = data.find(magic)
        if i >= 0:
            return pos + i
        if len(data) <= block:
            return None
        pos += block


def _gzip_stream_problem(f: Any) -> str | None:
    """Why the whole gzip file does not decompress to its end, or None (streamed, nothing kept)."""
    f.seek(0)
    d, fed = zlib.decompressobj(wbits=31), False
    while block := f.read(1 << 20):
        while block:
            try:
                d.decompress(block)
            except zlib.error as e:
                return f"corrupt gzip data ({e})"
            fed = True
            block = d.unused_data if d.eof else b""
            if d.eof:
                d, fed = zlib.decompressobj(wbits=31), False
    if fed and not d.eof:
        return "the file is cut short (truncated gzip stream); the records before the cut were kept"
    return None


def tail_problem(f: Any, pos: int, gz: bool, *, one_stream: bool = False) -> tuple[int | None, str] | None:
    """Where and why the file from `pos` (the start of its last record) is not one whole WARC record
    and nothing else, or None. The offset is `pos` when that record itself is damaged, a later one
    when the record is whole and damaged bytes follow it, and None for a whole-stream problem.

    `one_stream`: the file is one gzip stream rather than a member per record (FastWARC then gives
    no usable record offsets), so only the stream as a whole can be checked."""
    if gz and one_stream:
        problem = _gzip_stream_problem(f)
        return None if problem is None else (None, problem)
    f.seek(pos)
    raw = f.read()
    if not raw.strip():
        return None
    after = b""  # what follows the last record's gzip member
    if gz:
        if not raw.startswith(GZIP_MAGIC):
            return pos, "the file does not continue with a gzip member here; it is corrupt or cut short"
        d = zlib.decompressobj(wbits=31)
        try:
            data = d.decompress(raw)
        except zlib.error as e:
            return pos, f"corrupt gzip data in the last record ({e})"
        if not d.eof:
            return pos, ("the file is cut short inside this record (truncated gzip member); the records "
                         "before it were kept")
        after = d.unused_data
    else:
        data = raw
    head, sep, block = data.partition(b"\r\n\r\n")
    m = re.search(rb"(?im)^content-length:[ \t]*(\d+)", head)
    if not sep or m is None:
        return pos, "the file is cut short inside a WARC header (truncated); the records before it were kept"
    n = int(m.group(1))
    if len(block) < n:
        return pos, (f"the file is cut short inside this record ({len(block)} of its {n} bytes); "
                     "the records before it were kept")
    if block[n:].strip():
        return pos + 1, "unreadable bytes after the last record (a cut-off or corrupt record)"
    if after.strip():
        return pos + len(raw) - len(after), ("the file is cut short inside the record here (truncated gzip "
                                             "member); the records before it were kept")
    return None
