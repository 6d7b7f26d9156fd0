"""De-duplication as in Llama 3 §3.1.1: URL (newest crawl wins), exact document, MinHash + LSH,
and line-level (a line seen more than 6 times in a bucket of documents is removed).

Trade-off: every dataset-wide dedup is a `GlobalStep` with datatrove's shape (signatures per
shard -> one decision -> filter per shard), but the decision runs in one process over numpy
arrays (sort + group for exact keys, sort per band + union-find for MinHash, `np.unique` counts
per bucket for lines). That is simple and exact up to what fits in one machine's memory (~10^8
documents of 8-byte keys); beyond that the same signature files are what a sharded merge (by key
range, datatrove's stage 2) would consume.

Library choice: rensa's Rust RMinHash (~40x faster than datasketch's `update_batch` here); the
tests check its candidate rate against 1 - (1 - s^r)^b, which assumes independent rows.

Which copy survives is deterministic: the highest priority (crawl time for URLs), then the
first in (shard, position) order. MinHash clusters keep their first member.

MinHash band math (Broder 1997; FineWeb's defaults): with b bands of r rows, two documents of
word-5-gram Jaccard similarity s share at least one band with probability 1 - (1 - s^r)^b; the
S-curve's midpoint is near (1/b)^(1/r). FineWeb's 14 x 8 = 112 hashes gives 0.056 at s = 0.5,
0.565 at 0.7, 0.924 at 0.8 and 0.988 at 0.85, midpoint 0.72 (`lsh_probability` below).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import numpy as np
import regex
import xxhash

from herd.data.document import Document, parse_timestamp
from herd.data.steps.base import GlobalStep, Step, StepStats, matches
from herd.io import atomic_path


def h64(s: str) -> int:
    return xxhash.xxh64_intdigest(s.encode("utf-8", "surrogatepass"))


def lsh_probability(s: float, *, bands: int, rows: int) -> float:
    """Probability that two documents with Jaccard similarity `s` become LSH candidates."""
    return 1.0 - (1.0 - s**rows) ** bands


# ---- text normalisation --------------------------------------------------------------------------

_PUNCT = re.compile(r"[^\w\s]|_", re.UNICODE)
_DIGITS = re.compile(r"\d")
_SPACES = re.compile(r"\s+")
_MARKS = regex.compile(r"\p{Mn}+")  # `regex` comes with tiktoken; `re` has no Unicode categories


def _strip_accents(s: str) -> str:
    return _MARKS.sub("", unicodedata.normalize("NFD", s))


def simplify_text(text: str) -> str:
    """FineWeb/datatrove's MinHash normalisation: lowercase, accents and punctuation removed,
    digits -> 0, whitespace collapsed."""
    t = _strip_accents(text.lower()) if not text.isascii() else text.lower()
    t = _DIGITS.sub("0", _PUNCT.sub(" ", t))
    return _SPACES.sub(" ", t).strip()


def normalize_line(line: str) -> str:
    """ccNet's `normalize_for_dedup`: the same as `simplify_text` on one line (accents kept, as
    ccNet keeps them: they distinguish lines in languages that use them)."""
    t = _DIGITS.sub("0", _PUNCT.sub(" ", line.lower()))
    return _SPACES.sub(" ", t).strip()


def normalize_url(url: str, *, drop_query_prefixes: tuple[str, ...] = ("utm_",)) -> str:
    """Lowercase scheme and host, default port, fragment, tracking parameters and a trailing slash
    removed; `http` and `https` are the same page."""
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if parts.port and not ((scheme == "http" and parts.port == 80) or (scheme == "https" and parts.port == 443)):
        host = f"{host}:{parts.port}"
    query = urlencode([(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True)
                       if not k.lower().startswith(drop_query_prefixes)])
    path = parts.path.rstrip("/") or "/"
    return urlunsplit(("http" if scheme in ("http", "https") else scheme, host, path, query, ""))


# ---- signatures on disk --------------------------------------------------------------------------


def _save(path: Path, **arrays: np.ndarray) -> None:
    with atomic_path(path) as tmp:  # its name ends in .npz, so numpy adds no second suffix
        np.savez(tmp, **arrays)


def _load_all(sig_paths: list[Path], *names: str) -> tuple[list[dict[str, np.ndarray]], np.ndarray]:
    """Loads every shard's arrays; returns them and each shard's first global document index."""
    loaded = []
    for p in sig_paths:
        with np.load(p) as z:
            loaded.append({n: z[n] for n in names})
    counts = np.array([len(d[names[0]]) for d in loaded], dtype=np.int64)
    return loaded, np.concatenate([[0], np.cumsum(counts)])[:-1]


def _write_removals(plan_dir: Path, remove_global: np.ndarray, starts: np.ndarray, counts: np.ndarray) -> None:
    for shard, (start, n) in enumerate(zip(starts, counts)):
        mine = remove_global[(remove_global >= start) & (remove_global < start + n)] - start
        np.save(plan_dir / f"remove_{shard:05d}.npy", np.sort(mine).astype(np.int64))


def _filter_positions(docs: Iterable[Document], stats: StepStats, remove: np.ndarray, reason: str) -> Iterator[Document]:
    drop = set(remove.tolist())
    for pos, doc in enumerate(docs):
        stats.docs_in += 1
        stats.chars_in += len(doc.text)
        if pos in drop:
            stats.drop(reason)
            continue
        stats.docs_out += 1
        stats.chars_out += len(doc.text)
        yield doc


# ---- exact keys: URL (newest wins) and whole documents -------------------------------------------


class _KeyedDedup(GlobalStep):
    reason: ClassVar[str] = ""
    sig_suffix: ClassVar[str] = ".npz"  # written by `_save`

    def key(self, doc: Document) -> int | None:
        raise NotImplementedError

    def priority(self, doc: Document) -> float:
        return 0.0

    def collect(self, docs: Iterable[Document], sig_path: Path) -> Iterator[Document]:
        keys, prio, has = [], [], []
        for doc in docs:
            k = self.key(doc)
            keys.append(k or 0)
            has.append(k is not None)
            prio.append(self.priority(doc))
            yield doc
        _save(sig_path, key=np.array(keys, dtype=np.uint64), prio=np.array(prio, dtype=np.float64),
              has=np.array(has, dtype=bool))

    def plan(self, sig_paths: list[Path], plan_dir: Path) -> dict[str, Any]:
        loaded, starts = _load_all(sig_paths, "key", "prio", "has")
        counts = np.array([len(d["key"]) for d in loaded], dtype=np.int64)
        key = np.concatenate([d["key"] for d in loaded]) if loaded else np.zeros(0, np.uint64)
        prio = np.concatenate([d["prio"] for d in loaded]) if loaded else np.zeros(0)
        has = np.concatenate([d["has"] for d in loaded]) if loaded else np.zeros(0, bool)
        gid = np.arange(len(key), dtype=np.int64)
        sel = gid[has]
        # Sort by key, then newest (highest priority) first, then earliest position: the first row
        # of each key group is the survivor.
        order = sel[np.lexsort((sel, -prio[sel], key[sel]))]
        k = key[order]
        dup = np.zeros(len(order), dtype=bool)
        dup[1:] = k[1:] == k[:-1]
        remove = order[dup]
        _write_removals(plan_dir, remove, starts, counts)
        return {"documents": int(len(key)), "keys": int(len(k) - dup.sum()), "removed": int(len(remove)),
                "without_key": int((~has).sum())}

    def apply(self, docs: Iterable[Document], stats: StepStats, *, shard: int, plan_dir: Path) -> Iterator[Document]:
        yield from _filter_positions(docs, stats, np.load(plan_dir / f"remove_{shard:05d}.npy"), self.reason)


@dataclass
class UrlDedup(_KeyedDedup):
    """One document per normalised URL, the most recent crawl date winning (Llama 3 §3.1.1).
    Documents without a URL are kept."""

    type: ClassVar[str] = "url_dedup"
    reason: ClassVar[str] = "url_duplicate_older"
    name: str = "url_dedup"
    normalize: bool = True

    def key(self, doc: Document) -> int | None:
        if not doc.url:
            return None
        return h64(normalize_url(doc.url) if self.normalize else doc.url)

    def priority(self, doc: Document) -> float:
        return parse_timestamp(doc.timestamp)


@dataclass
class ExactDedup(_KeyedDedup):
    """One document per exact text (whitespace at both ends ignored); the first one is kept."""

    type: ClassVar[str] = "exact_dedup"
    reason: ClassVar[str] = "exact_duplicate"
    name: str = "exact_dedup"

    def key(self, doc: Document) -> int | None:
        return h64(doc.text.strip())


# ---- MinHash + LSH -------------------------------------------------------------------------------


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = np.arange(n, dtype=np.int64)

    def find(self, x: int) -> int:
        p = self.parent
        root = x
        while p[root] != root:
            root = p[root]
        while p[x] != root:  # path compression
            p[x], x = root, p[x]
        return int(root)

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:  # the smaller id becomes the root: clusters keep their first document
            self.parent[max(ra, rb)] = min(ra, rb)


@dataclass
class MinHashDedup(GlobalStep):
    """Near-duplicate removal with MinHash signatures (rensa) banded for LSH.

    `scope = "global"` clusters across the whole dataset (Llama 3: "global MinHash"); `"shard"`
    dedups each shard on its own in one streaming pass (FineWeb's per-dump choice).
    `by = "language"` dedups within each language only (Llama 3's multilingual rule).
    """

    type: ClassVar[str] = "minhash"
    sig_suffix: ClassVar[str] = ".npz"  # written by `_save`
    name: str = "minhash"
    ngram: int = 5            # FineWeb / datatrove: word 5-grams after simplify_text
    bands: int = 14           # FineWeb / datatrove: 14 bands x 8 rows = 112 hashes
    rows: int = 8
    seed: int = 1             # datatrove's default seed
    scope: str = "global"
    by: str | None = None     # a metadata key to partition by, e.g. "language"

    def __post_init__(self) -> None:
        if self.scope not in ("global", "shard"):
            raise ValueError(f"minhash: scope must be 'global' or 'shard', not {self.scope!r}")
        if self.bands < 1 or self.rows < 1 or self.ngram < 1:
            raise ValueError("minhash: bands, rows and ngram must be positive")

    @property
    def is_global(self) -> bool:
        return self.scope == "global"

    def shingles(self, text: str) -> list[str]:
        w = simplify_text(text).split()
        n = self.ngram
        if len(w) < n:  # short documents are one shingle, as in datatrove
            return [" ".join(w)] if w else []
        return [" ".join(w[i:i + n]) for i in range(len(w) - n + 1)]

    def signature_of(self, shingles: list[str]) -> np.ndarray:
        """(bands * rows,) uint64 MinHash values of a shingle set (rensa's Rust RMinHash)."""
        import rensa

        m = rensa.RMinHash(num_perm=self.bands * self.rows, seed=self.seed)
        m.update(shingles if shingles else [""])
        return np.asarray(m.digest(), dtype=np.uint64)

    def signature(self, text: str) -> np.ndarray:
        return self.signature_of(self.shingles(text))

    def band_keys(self, doc: Document) -> np.ndarray:
        sig = self.signature(doc.text).reshape(self.bands, self.rows)
        part = str(doc.metadata.get(self.by, "")) if self.by else ""
        # One 64-bit key per band; the band index and partition are part of the key so equal
        # rows in different bands (or languages) never match.
        return np.array([xxhash.xxh64_intdigest(row.tobytes(), seed=b) ^ (h64(part) if part else 0)
                         for b, row in enumerate(sig)], dtype=np.uint64)

    def collect(self, docs: Iterable[Document], sig_path: Path) -> Iterator[Document]:
        keys = []
        for doc in docs:
            keys.append(self.band_keys(doc))
            yield doc
        arr = np.stack(keys) if keys else np.zeros((0, self.bands), dtype=np.uint64)
        _save(sig_path, keys=arr)

    def plan(self, sig_paths: list[Path], plan_dir: Path) -> dict[str, Any]:
        loaded, starts = _load_all(sig_paths, "keys")
        counts = np.array([len(d["keys"]) for d in loaded], dtype=np.int64)
        keys = np.concatenate([d["keys"] for d in loaded]) if loaded else np.zeros((0, self.bands), np.uint64)
        n = len(keys)
        uf = _UnionFind(n)
        pairs = 0
        for b in range(self.bands):
            col = keys[:, b]
            order = np.argsort(col, kind="stable")
            same = np.flatnonzero(col[order][1:] == col[order][:-1])
            for i in same:  # consecutive equal keys: link each to its predecessor in the run
                uf.union(int(order[i]), int(order[i + 1]))
            pairs += len(same)
        roots = np.array([uf.find(i) for i in range(n)], dtype=np.int64)
        remove = np.flatnonzero(roots != np.arange(n))
        _write_removals(plan_dir, remove, starts, counts)
        return {"documents": int(n), "candidate_pairs": int(pairs), "clusters_with_duplicates":
                int(len(np.unique(roots[remove]))), "removed": int(len(remove))}

    def apply(self, docs: Iterable[Document], stats: StepStats, *, shard: int, plan_dir: Path) -> Iterator[Document]:
        yield from _filter_positions(docs, stats, np.load(plan_dir / f"remove_{shard:05d}.npy"), "minhash_duplicate")

    def __call__(self, docs: Iterable[Document], stats: StepStats) -> Iterator[Document]:
        if self.is_global:
            yield from super().__call__(docs, stats)
            return
        # Per-shard: stream, and drop a document if any band matches an earlier one. Duplicates'
        # keys are inserted too, so chains of near-duplicates are caught as union-find would.
        seen: list[set[int]] = [set() for _ in range(self.bands)]
        for doc in docs:
            stats.docs_in += 1
            stats.chars_in += len(doc.text)
            keys = self.band_keys(doc).tolist()
            dup = any(k in s for k, s in zip(keys, seen))
            for k, s in zip(keys, seen):
                s.add(k)
            if dup:
                stats.drop("minhash_duplicate")
                continue
            stats.docs_out += 1
            stats.chars_out += len(doc.text)
            yield doc


# ---- line-level dedup ----------------------------------------------------------------------------


@dataclass
class LineDedup(GlobalStep):
    """Removes every line whose normalised form occurs more than `max_occurrences` times within its
    bucket of `bucket_size` consecutive documents (Llama 3: > 6 times per 30M-document bucket).

    Every occurrence counts, also repeats inside one document (ccNet hashes every line). Lines
    that normalise to nothing (blank, punctuation only) are never counted nor removed. With
    `where`, other documents are neither counted nor changed: in code (`return None`) and in
    hard-wrapped prose (a novel's `"Yes."`) a frequent line is content, not boilerplate.
    """

    type: ClassVar[str] = "line_dedup"
    sig_suffix: ClassVar[str] = ".npz"  # written by `_save`
    supports_where: ClassVar[bool] = True
    name: str = "line_dedup"
    max_occurrences: int = 6        # Llama 3 §3.1.1
    bucket_size: int = 30_000_000   # Llama 3 §3.1.1
    by: str | None = None           # e.g. "language": count within each language separately

    def _hashes(self, doc: Document) -> list[int]:
        """One hash per line of the text (0: never removed)."""
        if self.where is not None and not matches(doc, self.where):
            return [0] * (doc.text.count("\n") + 1)
        part = str(doc.metadata.get(self.by, "")) if self.by else ""
        out = []
        for line in doc.text.split("\n"):
            norm = normalize_line(line)
            out.append(h64(part + "\x00" + norm) if norm else 0)
        return out

    def collect(self, docs: Iterable[Document], sig_path: Path) -> Iterator[Document]:
        hashes: list[int] = []
        per_doc: list[int] = []
        for doc in docs:
            hs = [h for h in self._hashes(doc) if h]
            hashes.extend(hs)
            per_doc.append(len(hs))
            yield doc
        _save(sig_path, hashes=np.array(hashes, dtype=np.uint64), per_doc=np.array(per_doc, dtype=np.int64))

    def plan(self, sig_paths: list[Path], plan_dir: Path) -> dict[str, Any]:
        loaded, starts = _load_all(sig_paths, "per_doc", "hashes")
        per_doc = np.concatenate([d["per_doc"] for d in loaded]) if loaded else np.zeros(0, np.int64)
        hashes = np.concatenate([d["hashes"] for d in loaded]) if loaded else np.zeros(0, np.uint64)
        doc_of_line = np.repeat(np.arange(len(per_doc)), per_doc)
        bucket_of_line = doc_of_line // self.bucket_size
        n_buckets = int(len(per_doc) // self.bucket_size + 1)
        removed_kinds = 0
        for b in range(n_buckets):
            hs = hashes[bucket_of_line == b]
            uniq, cnt = np.unique(hs, return_counts=True)
            bad = uniq[cnt > self.max_occurrences]
            removed_kinds += len(bad)
            np.save(plan_dir / f"bucket_{b:06d}.npy", bad)
        np.save(plan_dir / "shard_starts.npy", starts)
        return {"documents": int(len(per_doc)), "lines": int(len(hashes)), "buckets": n_buckets,
                "distinct_lines_removed": int(removed_kinds)}

    def apply(self, docs: Iterable[Document], stats: StepStats, *, shard: int, plan_dir: Path) -> Iterator[Document]:
        start = int(np.load(plan_dir / "shard_starts.npy")[shard])
        cache: dict[int, set[int]] = {}
        for pos, doc in enumerate(docs):
            if self.where is not None and not matches(doc, self.where):
                stats.counters["not_applied"] += 1
            stats.docs_in += 1
            stats.chars_in += len(doc.text)
            b = (start + pos) // self.bucket_size
            if b not in cache:
                cache.clear()
                cache[b] = set(np.load(plan_dir / f"bucket_{b:06d}.npy").tolist())
            bad = cache[b]
            lines = doc.text.split("\n")
            hs = self._hashes(doc)
            kept = [ln for ln, h in zip(lines, hs) if not (h and h in bad)]
            if len(kept) != len(lines):
                stats.counters["lines_removed"] += len(lines) - len(kept)
                stats.modified += 1
                doc.text = "\n".join(kept).strip()
            if not doc.text:
                stats.drop("empty_after_line_dedup")
                continue
            stats.docs_out += 1
            stats.chars_out += len(doc.text)
            yield doc


STEPS: tuple[type[Step], ...] = (UrlDedup, ExactDedup, MinHashDedup, LineDedup)
