"""The R lazy-load decoder on blobs this test serializes itself, the Austen chapter split, the fetch errors,
and (when the Debian package is at hand) the real novels."""

import gzip
import json
import os
import struct
import zlib

import pytest

from herd.data import corpora, debian
from herd.data.corpora import (
    RSymbol, RVector, austen_chapters, austen_data_dir, check_sources, fetch_austen, jsonl_docs,
    r_unserialize, read_r_lazyload_db, read_sources,
)

# ---- a small XDR serializer for the subset the decoder reads (R's serialize(), format "X") ----------


class Chr(list): ...
class Int(list): ...
class Dbl(list): ...
class Lgl(list): ...


def _i(v: int) -> bytes:
    return struct.pack(">i", v)


def _flags(rtype: int, *, attr=False, tag=False, levels=0) -> bytes:
    return _i(rtype | (attr << 9) | (tag << 10) | (levels << 12))


class XDRWriter:
    def __init__(self, *, version=3, long_lengths=False):
        self.version, self.long_lengths, self.symbols = version, long_lengths, []

    def header(self) -> bytes:
        out = b"X\n" + _i(self.version) + _i(0x040201) + _i(0x030500 if self.version == 3 else 0x020300)
        return out + (_i(5) + b"UTF-8" if self.version == 3 else b"")

    def charsxp(self, s, *, latin1=False) -> bytes:
        if s is None:
            return _flags(9) + _i(-1)
        raw = s.encode("latin-1" if latin1 else "utf-8")
        return _flags(9, levels=(1 << 2) if latin1 else (1 << 3)) + _i(len(raw)) + raw

    def symbol(self, name: str) -> bytes:
        if name in self.symbols:  # R writes a repeated symbol as a reference to its first occurrence
            return _i(255 | ((self.symbols.index(name) + 1) << 8))
        self.symbols.append(name)
        return _flags(1) + self.charsxp(name)

    def length(self, n: int) -> bytes:
        return _i(-1) + _i(n >> 32) + _i(n & 0xFFFFFFFF) if self.long_lengths else _i(n)

    def attributes(self, attrs: dict) -> bytes:
        out = b""
        for k, v in attrs.items():
            out += _flags(2, tag=True) + self.symbol(k) + self.obj(v)
        return out + _i(254)

    def obj(self, x, attrs=None) -> bytes:
        if x is None:
            return _i(254)
        if isinstance(x, dict):  # a named list
            return self.obj(list(x.values()), {"names": Chr(x.keys())})
        a = bool(attrs)
        if isinstance(x, Chr):
            body = _flags(16, attr=a) + self.length(len(x)) + b"".join(self.charsxp(s) for s in x)
        elif isinstance(x, (Int, Lgl)):
            ints = [-(2**31) if v is None else int(v) for v in x]
            body = _flags(13 if isinstance(x, Int) else 10, attr=a) + self.length(len(x)) + struct.pack(f">{len(x)}i", *ints)
        elif isinstance(x, Dbl):
            body = _flags(14, attr=a) + self.length(len(x)) + struct.pack(f">{len(x)}d", *x)
        elif isinstance(x, list):
            body = _flags(19, attr=a) + self.length(len(x)) + b"".join(self.obj(v) for v in x)
        else:
            raise TypeError(x)
        return body + (self.attributes(attrs) if a else b"")

    def serialize(self, x) -> bytes:
        return self.header() + self.obj(x)


def write_lazyload_db(data_dir, objects: dict) -> None:
    """Rdata.rdb (size + zlib per object) and Rdata.rdx (gzip of the index), as R's makeLazyLoadDB does."""
    rdb, variables = b"", {}
    for name, obj in objects.items():
        payload = XDRWriter().serialize(obj)
        record = struct.pack(">I", len(payload)) + zlib.compress(payload)
        variables[name] = Int([len(rdb), len(record)])
        rdb += record
    index = {"variables": variables, "references": {}, "compressed": Lgl([True])}
    (data_dir / "Rdata.rdb").write_bytes(rdb)
    (data_dir / "Rdata.rdx").write_bytes(gzip.compress(XDRWriter().serialize(index)))


# ---- the decoder -------------------------------------------------------------------------------------


@pytest.mark.parametrize("version, long_lengths", [(3, False), (2, False), (3, True)])
def test_unserialize_round_trips_vectors_attributes_and_na(version, long_lengths):
    value = {"text": Chr(["It is a truth", None, "universally acknowledged", "é ✓ 漢字 🦙"]),
             "ints": Int([1, None, -7, 2**31 - 1]), "reals": Dbl([0.5, -2.25]), "flags": Lgl([True, False, None]),
             "nested": {"names": Chr(["a"]), "empty": Chr([])}}
    blob = XDRWriter(version=version, long_lengths=long_lengths).serialize(value)
    out = r_unserialize(blob)
    assert isinstance(out, RVector) and out.rtype == "list"
    d = out.as_dict()
    assert d["text"] == ["It is a truth", None, "universally acknowledged", "é ✓ 漢字 🦙"]
    assert d["text"].rtype == "character"
    assert d["ints"] == [1, None, -7, 2**31 - 1] and d["ints"].rtype == "integer"
    assert d["reals"] == [0.5, -2.25] and d["flags"] == [True, False, None]
    # "names" is written once as a symbol and then as references: the nested list resolves them.
    assert d["nested"].as_dict() == {"names": ["a"], "empty": []}


def test_repeated_symbols_resolve_to_the_right_reference():
    w = XDRWriter()
    attrs = {"names": Chr(["x"]), "label": Chr(["y"])}
    blob = w.header() + _flags(19) + _i(2) + w.obj(Chr(["a"]), attrs) + w.obj(Chr(["b"]), attrs)
    assert w.symbols == ["names", "label"]  # the second vector refers to both by number
    first, second = r_unserialize(blob)
    assert first.attributes == second.attributes == {"names": ["x"], "label": ["y"]}


def test_latin1_strings_are_decoded_as_latin1():
    w = XDRWriter()
    blob = w.header() + _flags(16) + _i(1) + w.charsxp("café", latin1=True)
    assert r_unserialize(blob) == ["café"]


def test_unsupported_types_and_formats_are_named():
    w = XDRWriter()
    with pytest.raises(ValueError, match="R type 4"):  # an environment
        r_unserialize(w.header() + _flags(4) + _i(0))
    with pytest.raises(ValueError, match="XDR"):
        r_unserialize(b"A\n1\n")  # R's ASCII format
    with pytest.raises(ValueError, match="version 1"):
        r_unserialize(b"X\n" + _i(1) + _i(0) + _i(0))


def test_symbols_decode_to_rsymbol():
    w = XDRWriter()
    assert r_unserialize(w.header() + w.symbol("emma")) == RSymbol("emma")


def test_lazyload_db_reads_every_variable(tmp_path):
    write_lazyload_db(tmp_path, {"a": Chr(["x", "y"]), "b": Int([3])})
    assert read_r_lazyload_db(tmp_path) == {"a": ["x", "y"], "b": [3]}


def test_lazyload_db_rejects_other_compression(tmp_path):
    write_lazyload_db(tmp_path, {"a": Chr(["x"])})
    rdb = bytearray((tmp_path / "Rdata.rdb").read_bytes())
    rdb[4:5] = b"X"  # an xz record's type byte
    (tmp_path / "Rdata.rdb").write_bytes(bytes(rdb))
    with pytest.raises(ValueError, match="not zlib"):
        read_r_lazyload_db(tmp_path)


def test_lazyload_db_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="Rdata.rdx"):
        read_r_lazyload_db(tmp_path)


# ---- Austen's chapters ---------------------------------------------------------------------------------

NOVEL = Chr(["EMMA", "", "By Jane Austen", "", "VOLUME I", "", "CHAPTER I", "", "Emma Woodhouse, handsome.",
             "Clever, and rich.", "", "CHAPTER II", "", "Mr. Weston was a native.", "", "", "VOLUME II", "",
             "CHAPTER I", "", "Emma and Harriet walked.", "", "FINIS"])


def test_chapters_keep_title_page_and_volume_headings_with_their_chapter(tmp_path):
    write_lazyload_db(tmp_path, {"emma": NOVEL, "persuasion": Chr(["Persuasion", "", "Chapter 1", "", "Sir Walter."])})
    docs = list(austen_chapters(tmp_path))
    assert [d.id for d in docs] == ["austen/emma/001", "austen/emma/002", "austen/emma/003", "austen/persuasion/001"]
    assert docs[0].text == "EMMA\n\nBy Jane Austen\n\nVOLUME I\n\nCHAPTER I\n\nEmma Woodhouse, handsome.\nClever, and rich."
    assert docs[1].text == "CHAPTER II\n\nMr. Weston was a native."
    assert docs[2].text == "VOLUME II\n\nCHAPTER I\n\nEmma and Harriet walked.\n\nFINIS"
    assert {d.source for d in docs} == {"austen"}
    # Nothing is lost or duplicated: the chapters are the novel, blank lines aside.
    assert "\n".join(d.text for d in docs[:3]).split() == " ".join(NOVEL).split()


def test_austen_reader_splits_chapters_over_units_and_keeps_the_title(tmp_path):
    from herd.data.steps.readers import AustenReader

    write_lazyload_db(tmp_path, {"emma": Chr(NOVEL)})
    r = AustenReader(data_dir=str(tmp_path), parts=2)
    docs = [d for u in r.units() for d in r.read(u)]
    # Three chapters (see test_corpora_austen): 1 and 3 in unit 0, 2 in unit 1.
    assert [d.id for d in docs] == ["austen/emma/001", "austen/emma/003", "austen/emma/002"]
    assert {d.metadata["title"] for d in docs} == {"Emma"} and {d.metadata["source"] for d in docs} == {"austen"}
    assert docs[2].text == "CHAPTER II\n\nMr. Weston was a native."
    r = AustenReader(data_dir=str(tmp_path), parts=2, limit=2)
    assert sorted(d.id for u in r.units() for d in r.read(u)) == ["austen/emma/001", "austen/emma/002"]


def test_a_non_text_object_is_an_error(tmp_path):
    write_lazyload_db(tmp_path, {"emma": Int([1, 2])})
    with pytest.raises(ValueError, match="character vector"):
        list(austen_chapters(tmp_path))


def test_fetch_without_apt_names_the_manual_command(tmp_path, monkeypatch):
    monkeypatch.setattr(debian.shutil, "which", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"apt-get download r-cran-janeaustenr && dpkg -x"):
        fetch_austen(cache_dir=tmp_path)


def test_failed_download_suggests_apt_get_update(tmp_path, monkeypatch):
    fake = tmp_path / "bin"
    fake.mkdir()
    for name, code in (("apt-get", 100), ("dpkg", 0)):
        (fake / name).write_text(f"#!/bin/sh\necho 'E: Unable to locate package' >&2\nexit {code}\n")
        (fake / name).chmod(0o755)
    monkeypatch.setenv("PATH", str(fake))
    with pytest.raises(FileNotFoundError, match="apt-get update"):
        fetch_austen(cache_dir=tmp_path / "cache")


def _real_austen_dir():
    try:
        return austen_data_dir(fetch=False)
    except FileNotFoundError:
        return None


@pytest.mark.skipif(_real_austen_dir() is None, reason="r-cran-janeaustenr is not unpacked (herd fetches it on first use)")
def test_real_package_has_six_novels_in_about_270_chapters():
    docs = list(austen_chapters(_real_austen_dir()))
    novels = {d.id.split("/")[1] for d in docs}
    assert novels == set(corpora.AUSTEN_TITLES)
    assert 250 <= len(docs) <= 290
    assert 3_900_000 < sum(len(d.text) for d in docs) < 4_100_000
    pp = next(d for d in docs if d.id == "austen/prideprejudice/001")
    assert "It is a truth universally acknowledged" in pp.text


# ---- JSONL and named sources -----------------------------------------------------------------------------


def test_jsonl_docs_use_id_or_line_number(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps({"text": "one", "id": 7}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    assert [(d.id, d.text, d.source) for d in jsonl_docs(path)] == [("7", "one", "mine.jsonl"), ("mine.jsonl:3", "two", "mine.jsonl")]
    path.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match="line 1.*\"text\""):
        list(jsonl_docs(path))


def test_sources_are_checked_before_reading(tmp_path):
    with pytest.raises(ValueError, match="unknown source 'wiki-xx'"):
        read_sources(["wiki-en", "wiki-xx"])
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        check_sources([os.fspath(tmp_path / "missing.jsonl")])
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "hello"}\n')
    assert [d.text for d in read_sources([str(path), str(path)])] == ["hello", "hello"]
