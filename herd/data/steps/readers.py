"""Readers: files on disk -> `Document`s. WARC, JSONL (plain/gz/zstd), Parquet, folders of HTML
or text, Debian packages (fetched into a cache), the Wikipedia leads that ship on PyPI, Jane
Austen's novels and the Python standard library (`herd.data.corpora`).

Trade-off: a reader is split into `units()` (the list of files, computed once in the parent
process) and `read(unit)` (a generator run in a worker). The executor assigns units to shards
round-robin, so parallelism is per file: one huge file is one shard. That is datatrove's
choice too; it keeps resume exact (a shard is a fixed list of files) at the price of needing
inputs split into several files to use several cores.

HTML stays HTML here (`metadata["format"] = "html"`); the `extract` step turns it into text, so a
reader never decides how boilerplate is removed.

Damaged input (a line that is not JSON or not UTF-8, a record without text, a WARC record with a
broken header, a compressed file cut short) is reported as a `Corrupt` to the `on_corrupt` sink
`read` is given and skipped: a crawl of millions of files always has a few bad ones, and one of
them must not cost the run. What came before the damage is kept; a WARC reader resynchronises on
the next record boundary and keeps what comes after too. With `strict = true`, or without a sink,
the first damage is an error naming the file, the line or byte offset and the problem.
"""

from __future__ import annotations

import glob as globlib
import gzip
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, ClassVar

from herd.data.document import Document
from herd.data.steps.damaged import GZIP_MAGIC, Corrupt, CorruptSink, Damaged, byte_lines, next_boundary, tail_problem


def open_text(path: str | Path) -> io.TextIOBase:
    """Opens .jsonl / .jsonl.gz / .jsonl.zst (and any other text file) for reading as UTF-8."""
    p = str(path)
    if p.endswith(".gz"):
        return gzip.open(p, "rt", encoding="utf-8")
    if p.endswith(".zst") or p.endswith(".zstd"):
        import zstandard

        raw = open(p, "rb")
        return io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True), encoding="utf-8")
    return open(p, encoding="utf-8")


def _expand(paths: list[str], *, what: str) -> list[Path]:
    out: list[Path] = []
    for pattern in paths:
        pattern = os.path.expanduser(pattern)
        hits = sorted(globlib.glob(pattern, recursive=True))
        if not hits:
            raise FileNotFoundError(f"{what}: no file matches {pattern!r}; check the path in the pipeline file")
        out.extend(Path(h) for h in hits if Path(h).is_file())
    return out


def _mtime_iso(path: Path) -> str:
    return datetime.fromtimestamp(path.stat().st_mtime, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class Reader:
    type: ClassVar[str] = ""
    name: str = ""
    # Stop at the first damaged record instead of skipping and counting it (readers of user files).
    strict: bool = False

    def units(self) -> list[str]:
        raise NotImplementedError

    def read(self, unit: str, on_corrupt: CorruptSink | None = None) -> Iterator[Document]:
        raise NotImplementedError

    def _corrupt(self, on_corrupt: CorruptSink | None, c: Corrupt) -> None:
        if self.strict or on_corrupt is None:
            hint = "" if self.strict else "; the pipeline skips and counts such records unless strict = true"
            raise ValueError(f"{self.type} reader {self.name}: {c.message()}{hint}")
        on_corrupt(c)


@dataclass
class WarcReader(Reader):
    """HTTP 200 HTML responses from WARC files (`.warc`, `.warc.gz`), read with FastWARC."""

    type: ClassVar[str] = "warc"
    paths: list[str] = field(default_factory=list)
    name: str = "warc"
    # Only these MIME types become documents; everything else (images, robots.txt) is skipped.
    mime_types: list[str] = field(default_factory=lambda: ["text/html", "application/xhtml+xml"])
    strict: bool = False

    def units(self) -> list[str]:
        return [str(p) for p in _expand(self.paths, what="warc reader")]

    def read(self, unit: str, on_corrupt: CorruptSink | None = None) -> Iterator[Document]:
        from fastwarc.warc import ArchiveIterator

        with open(unit, "rb") as f:
            gz = f.read(2) == GZIP_MAGIC[:2]
            start = 0
            held: Document | None = None  # a record's document waits until the stream is known to go past it
            last: int | None = None        # start of the last record FastWARC returned since `start`
            one_stream = False             # a gzip file that is one stream, not a member per record
            in_damage = False              # still inside a damaged region already reported
            while True:
                f.seek(start)
                current: int | None = None
                try:
                    for rec in ArchiveIterator(f):
                        one_stream |= rec.stream_pos == last
                        current = last = rec.stream_pos
                        doc = self._doc(rec, unit)
                        current, in_damage = None, False
                        if held is not None:
                            yield held
                        held = doc
                except OSError as e:  # FastWARC's "Invalid WARC header", "Gzip decompression error"
                    if held is not None:  # the stream got past it: the damage is in what follows
                        yield held
                        held = None
                    problem = f"unreadable WARC record ({e}); skipped to the next record"
                    if current is not None:  # this record's header was read, its body was not
                        self._corrupt(on_corrupt, Corrupt(unit, f"byte {current}", problem))
                        resume = next_boundary(f, current + 1, gz)
                    elif in_damage:  # a false start inside the region already reported
                        resume = next_boundary(f, start + 1, gz)
                    elif last is None:
                        self._corrupt(on_corrupt, Corrupt(unit, f"byte {start}", problem))
                        resume = next_boundary(f, start + 1, gz)
                    elif gz and not one_stream:  # a member per record: the next member is the bad record
                        bad = next_boundary(f, last + 1, gz)
                        self._corrupt(on_corrupt, Corrupt(unit, f"byte {last + 1 if bad is None else bad}", problem))
                        resume = None if bad is None else next_boundary(f, bad + 1, gz)
                    else:  # plain WARC: the bad header need not start with "WARC/", so resume at the next that does
                        self._corrupt(on_corrupt, Corrupt(unit, f"after the record at byte {last}", problem))
                        resume = next_boundary(f, last + 1, gz)
                    if resume is None or one_stream:  # no offsets to resynchronise on inside one gzip stream
                        return
                    start, last, in_damage = resume, None, True
                    continue
                break
            # FastWARC ends quietly where a file is cut short (and returns the cut record, short):
            # check that the last record is whole before its document goes out.
            pos = last if last is not None else start
            tail = tail_problem(f, pos, gz, one_stream=one_stream)
            if held is not None and (tail is None or (tail[0] or 0) > pos):
                yield held  # whole; any damage is after it
            if tail is not None:
                self._corrupt(on_corrupt, Corrupt(unit, "end of file" if tail[0] is None else f"byte {tail[0]}",
                                                  tail[1]))

    def _doc(self, rec: Any, unit: str) -> Document | None:
        from fastwarc.warc import WarcRecordType
        from resiliparse.parse.encoding import bytes_to_str, detect_encoding

        if rec.record_type != WarcRecordType.response:
            return None
        rec.parse_http()
        http = rec.http_headers
        if http is None or http.status_code != 200:
            return None
        ctype = (http.get("Content-Type") or "").lower()
        if not any(m in ctype for m in self.mime_types):
            return None
        body = rec.reader.read()
        # Declared charset first, content sniffing when it is missing or wrong.
        charset = ctype.partition("charset=")[2].split(";")[0].strip() or None
        try:
            html = body.decode(charset) if charset else bytes_to_str(body, detect_encoding(body))
        except (LookupError, UnicodeDecodeError):
            html = bytes_to_str(body, detect_encoding(body))
        rid = rec.headers.get("WARC-Record-ID") or f"{unit}@{rec.stream_pos}"
        return Document(id=rid.strip("<>"), text=html, url=rec.headers.get("WARC-Target-URI"),
                        timestamp=rec.headers.get("WARC-Date"), metadata={"format": "html", "source": self.name})


@dataclass
class JsonlReader(Reader):
    """One JSON object per line; `text_key`/`id_key`/`url_key`/`timestamp_key` name the fields and
    every other field lands in metadata (a nested "metadata" object is merged in)."""

    type: ClassVar[str] = "jsonl"
    paths: list[str] = field(default_factory=list)
    name: str = "jsonl"
    text_key: str = "text"
    id_key: str = "id"
    url_key: str = "url"
    timestamp_key: str = "timestamp"
    format: str = "text"  # "html" when the text field holds raw HTML for the extract step
    strict: bool = False

    def units(self) -> list[str]:
        return [str(p) for p in _expand(self.paths, what="jsonl reader")]

    def _doc(self, row: Any, default_id: str) -> Document:
        """The document a row holds; ValueError (the problem, for a `Corrupt`) when it holds none."""
        if not isinstance(row, dict):
            raise ValueError(f"a JSON {type(row).__name__}, not an object")
        if self.text_key not in row:
            raise ValueError(f"no {self.text_key!r} field (set text_key in the reader config if the text is "
                             "under another name)")
        if not isinstance(row[self.text_key], str):
            raise ValueError(f"{self.text_key!r} is a {type(row[self.text_key]).__name__}, not a string")
        meta = row.pop("metadata", None) or {}
        if isinstance(meta, str):  # herd's Parquet output stores metadata as a JSON string
            meta = json.loads(meta)
        if not isinstance(meta, dict):
            raise ValueError(f"'metadata' is a {type(meta).__name__}, not an object")
        meta = dict(meta)
        text = row.pop(self.text_key)
        doc_id = str(row.pop(self.id_key, default_id))
        url, ts = row.pop(self.url_key, None), row.pop(self.timestamp_key, None)
        meta.update(row)
        meta.setdefault("source", self.name)
        if self.format != "text":
            meta["format"] = self.format
        return Document(id=doc_id, text=text, url=url, timestamp=ts, metadata=meta)

    def read(self, unit: str, on_corrupt: CorruptSink | None = None) -> Iterator[Document]:
        i = good = keyless = 0
        lines = byte_lines(unit)
        while True:
            try:
                raw = next(lines, None)
            except Damaged as e:
                self._corrupt(on_corrupt, Corrupt(unit, f"after line {i}", e.problem))
                return
            if raw is None:
                break
            i += 1
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
                keyless += isinstance(row, dict) and self.text_key not in row
                doc = self._doc(row, f"{Path(unit).name}#{i - 1}")
            except UnicodeDecodeError as e:
                self._corrupt(on_corrupt, Corrupt(unit, f"line {i}", f"not UTF-8 (byte {raw[e.start]:#04x} at "
                                                  f"offset {e.start} of the line)"))
                continue
            except json.JSONDecodeError as e:
                self._corrupt(on_corrupt, Corrupt(unit, f"line {i}", f"invalid JSON ({e.msg} at column {e.colno})"))
                continue
            except ValueError as e:
                self._corrupt(on_corrupt, Corrupt(unit, f"line {i}", str(e)))
                continue
            good += 1
            yield doc
        if good == 0 and keyless > 0:
            # Not damage but a wrong config: skipping every record would hide it behind warnings.
            raise ValueError(f"{unit}: none of its {keyless} JSON objects has a {self.text_key!r} field; set "
                             "text_key in the reader config to the field that holds the text")


@dataclass
class ParquetReader(JsonlReader):
    type: ClassVar[str] = "parquet"
    name: str = "parquet"
    batch_size: int = 1024

    def units(self) -> list[str]:
        return [str(p) for p in _expand(self.paths, what="parquet reader")]

    def read(self, unit: str, on_corrupt: CorruptSink | None = None) -> Iterator[Document]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            batches = iter(pq.ParquetFile(unit).iter_batches(batch_size=self.batch_size))
        except (pa.ArrowException, OSError) as e:  # not a Parquet file at all (bad footer or magic)
            self._corrupt(on_corrupt, Corrupt(unit, "row 0", f"not a readable Parquet file ({e})"))
            return
        i = 0
        while True:
            try:
                batch = next(batches, None)
            except (pa.ArrowException, OSError) as e:
                self._corrupt(on_corrupt, Corrupt(unit, f"after row {i}", f"unreadable Parquet data ({e})"))
                return
            if batch is None:
                return
            for row in batch.to_pylist():
                i += 1
                try:
                    doc = self._doc(row, f"{Path(unit).name}#{i - 1}")
                except ValueError as e:
                    self._corrupt(on_corrupt, Corrupt(unit, f"row {i}", str(e)))
                    continue
                yield doc


@dataclass
class FolderReader(Reader):
    """Files under `root` matching `glob`; `url_template` builds each URL from the file's path
    (`{relpath}`, `{parent}` = its folder name, `{name}`, `{stem}`). The file time is the crawl date."""

    type: ClassVar[str] = "folder"
    root: str = ""
    glob: str | list[str] = "**/*.html"  # several patterns: their files in this order
    name: str = "folder"
    format: str = "html"  # or "text"
    url_template: str = "file://{abspath}"
    # Read every k-th file only: a cheap way to make a demo subset of a big folder.
    every: int = 1
    limit: int | None = None

    def _root(self) -> Path:
        root = Path(os.path.expanduser(self.root))
        if not root.is_dir():
            raise FileNotFoundError(f"folder reader {self.name}: {root} is not a directory")
        return root

    def units(self) -> list[str]:
        if self.format not in ("html", "text"):
            raise ValueError(f"folder reader {self.name}: format must be 'html' or 'text', not {self.format!r}")
        root = self._root()
        files: list[Path] = []
        for pattern in [self.glob] if isinstance(self.glob, str) else self.glob:
            hits = sorted(p for p in root.glob(pattern) if p.is_file() and p not in files)
            if not hits:
                raise FileNotFoundError(f"folder reader {self.name}: nothing matches {pattern!r} under {root}")
            files += hits
        files = files[:: max(1, self.every)]
        if self.limit is not None:
            files = files[: self.limit]
        return [str(p) for p in files]

    def read(self, unit: str, on_corrupt: CorruptSink | None = None) -> Iterator[Document]:
        path = Path(unit)
        rel = path.relative_to(self._root())
        raw = path.read_bytes()
        if self.format == "html":
            from resiliparse.parse.encoding import bytes_to_str, detect_encoding

            text = bytes_to_str(raw, detect_encoding(raw))
        else:
            text = raw.decode("utf-8", errors="replace")
        url = self.url_template.format(relpath=rel.as_posix(), parent=path.parent.name, name=path.name,
                                       stem=path.stem, abspath=path.resolve().as_posix())
        yield Document(id=f"{self.name}/{rel.as_posix()}", text=text, url=url, timestamp=_mtime_iso(path),
                       metadata={"format": self.format, "source": self.name})


@dataclass
class DebianReader(FolderReader):
    """A folder inside Debian packages, fetched with `apt-get download` + `dpkg -x` into a cache
    (never installed). With `warc = true` the selected pages are first written into a WARC with
    their URLs, as a crawler would have stored them, and read back through the WARC reader."""

    type: ClassVar[str] = "debian"
    packages: list[str] = field(default_factory=list)
    cache_dir: str = ""  # default: herd.data.debian.debian_cache_dir() ($HERD_CACHE/debian, ~/.cache/herd/debian)
    name: str = "debian"
    warc: bool = False
    warc_parts: int = 8
    # Where the WARC files are written (default: <cache_dir>/warc). A run that must not share
    # them with other runs of the same reader name (tests, the speedrun) points this at its own folder.
    warc_dir: str = ""

    def _cache(self) -> Path:
        from herd.data.debian import debian_cache_dir

        return Path(os.path.expanduser(self.cache_dir)) if self.cache_dir else debian_cache_dir()

    def _root(self) -> Path:
        from herd.data.debian import fetch_packages

        root = fetch_packages(self.packages, cache_dir=self._cache())
        return root / self.root.lstrip("/")

    def units(self) -> list[str]:
        files = super().units()
        if not self.warc:
            return files
        from herd.data.debian import write_warc

        # Several WARC files, as a crawl would leave them, so the pages spread over shards.
        out = []
        for part in range(self.warc_parts):
            chunk = files[part :: self.warc_parts]
            if chunk:
                folder = Path(os.path.expanduser(self.warc_dir)) if self.warc_dir else self._cache() / "warc"
                warc = folder / f"{self.name}-{part:03d}.warc.gz"
                write_warc((d for f in chunk for d in FolderReader.read(self, f)), warc, source_files=chunk)
                out.append(str(warc))
        return out

    def read(self, unit: str, on_corrupt: CorruptSink | None = None) -> Iterator[Document]:
        if not self.warc:
            yield from super().read(unit)
            return
        yield from WarcReader(paths=[unit], name=self.name).read(unit, on_corrupt)


@dataclass
class WikipediaReader(Reader):
    """Lead paragraphs of ~10k vital Wikipedia articles per language (`herd.data.corpora`);
    `topics` keeps only articles of those vital-article topics (e.g. ["Mathematics"])."""

    type: ClassVar[str] = "wikipedia"
    languages: list[str] = field(default_factory=lambda: ["en"])
    name: str = "wikipedia"
    topics: list[str] | None = None
    exclude_topics: list[str] | None = None
    limit: int | None = None
    parts: int = 4  # units per language, so one language's ~10k articles spread over shards

    def units(self) -> list[str]:
        if self.limit is not None:  # a limit counts from the start of each language
            return list(self.languages)
        return [f"{lang}:{k}" for lang in self.languages for k in range(self.parts)]

    def read(self, unit: str, on_corrupt: CorruptSink | None = None) -> Iterator[Document]:
        from herd.data.corpora import wikipedia_leads

        lang, _, part = unit.partition(":")
        k = int(part) if part else None
        n = 0
        for i, d in enumerate(wikipedia_leads(lang)):
            if k is not None and i % self.parts != k:
                continue
            if (self.topics and d.topic not in self.topics) or (self.exclude_topics and d.topic in self.exclude_topics):
                continue
            if self.limit is not None and n >= self.limit:
                return
            n += 1
            title = d.id.split("/", 1)[1]
            yield Document(id=d.id, text=d.text, url=f"https://{lang}.wikipedia.org/wiki/{title.replace(' ', '_')}",
                           metadata={"source": self.name, "wiki_lang": lang, "topic": d.topic})


@dataclass
class PythonStdlibReader(Reader):
    """The running interpreter's standard-library sources (`herd.data.corpora`): real code."""

    type: ClassVar[str] = "python_stdlib"
    name: str = "python_stdlib"
    limit: int | None = None
    parts: int = 4

    def units(self) -> list[str]:
        return [str(k) for k in range(self.parts)]

    def read(self, unit: str, on_corrupt: CorruptSink | None = None) -> Iterator[Document]:
        from herd.data.corpora import python_stdlib_sources

        for i, d in enumerate(python_stdlib_sources(limit=self.limit)):
            if i % self.parts == int(unit):
                yield Document(id=d.id, text=d.text, metadata={"source": self.name, "format": "text"})


@dataclass
class AustenReader(Reader):
    """Jane Austen's six novels, one document per chapter (`herd.data.corpora.austen_chapters`,
    from the Debian package `r-cran-janeaustenr`, fetched into herd's cache on first use);
    `limit` keeps the first chapters in novel order, `data_dir` reads an unpacked copy elsewhere."""

    type: ClassVar[str] = "austen"
    name: str = "austen"
    limit: int | None = None
    data_dir: str | None = None
    parts: int = 4

    def units(self) -> list[str]:
        return [str(k) for k in range(self.parts)]

    def read(self, unit: str, on_corrupt: CorruptSink | None = None) -> Iterator[Document]:
        from herd.data.corpora import AUSTEN_TITLES, austen_chapters

        data_dir = os.path.expanduser(self.data_dir) if self.data_dir else None
        for i, d in enumerate(austen_chapters(data_dir)):
            if self.limit is not None and i >= self.limit:
                return
            if i % self.parts == int(unit):
                novel = d.id.split("/")[1]
                yield Document(id=d.id, text=d.text, metadata={"source": self.name, "format": "text",
                                                               "title": AUSTEN_TITLES.get(novel, novel)})


READERS: dict[str, type[Reader]] = {
    r.type: r for r in (WarcReader, JsonlReader, ParquetReader, FolderReader, DebianReader, WikipediaReader,
                       PythonStdlibReader, AustenReader)}
