"""Token shards: flat uint32 files of documents back to back, an offset index, and meta.json last.

Format (docs/interfaces.md): `shard_NNNNN.bin` holds little-endian uint32 ids, `shard_NNNNN.idx.npy`
holds `num_docs + 1` int64 offsets into it, and `meta.json` describes the whole directory. A
directory without meta.json is incomplete and is never read.

Trade-off: one flat array per shard plus an offset index, rather than a record format with a
header per document, so the loader reads any token range with one memory-mapped slice and the
files can be inspected with `np.fromfile`. What a record format would give for free, knowing
which files are finished, comes from the write order instead: every file is written under a
temporary name and renamed into place, and meta.json, which lists the shards, is written last.

Tokenization (`tokenize_to_shards`) runs the tokenizer in worker processes (each loads its own
copy; tiktoken releases the GIL only inside one call) and keeps a single writer in the main
process, so shard contents do not depend on the number of workers. After each finished shard it
records, in `.progress.json`, how many documents the shard holds and a hash of their text: a
rerun skips those documents without tokenizing them, and refuses to resume if they changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from herd.io import atomic_write_bytes

FORMAT = "herd-shards-v1"
META = "meta.json"
PROGRESS = ".progress.json"
_SHARD_FILE = re.compile(r"^shard_\d{5}\.(bin|idx\.npy)(\.tmp)?$")


@dataclass(frozen=True)
class ShardFile:
    file: str  # "shard_00000.bin"; its index is the same name with .idx.npy
    num_docs: int
    num_tokens: int


@dataclass(frozen=True)
class ShardsInfo:
    path: Path
    vocab_size: int
    tokenizer_sha256: str | None
    bos: int | None  # the BOS id every document starts with, or None if documents carry none
    eos: int | None
    num_docs: int
    num_tokens: int
    shards: tuple[ShardFile, ...]
    source: str

    def to_meta(self) -> dict:
        return {"format": FORMAT, "vocab_size": self.vocab_size, "tokenizer_sha256": self.tokenizer_sha256,
                "bos": self.bos, "eos": self.eos, "num_docs": self.num_docs, "num_tokens": self.num_tokens,
                "shards": [asdict(s) for s in self.shards], "source": self.source}


def _index_name(bin_name: str) -> str:
    return bin_name[: -len(".bin")] + ".idx.npy"


def _remove_partial_files(out_dir: Path) -> None:
    """Delete shard files and temporaries of an unfinished run (only names this module writes)."""
    for p in out_dir.iterdir():
        # herd.io's temporaries are ".<name>.<random>.tmp"; "<name>.tmp" is what older versions left.
        herd_io_tmp = p.name.startswith((f".{PROGRESS}.", f".{META}.")) and p.name.endswith(".tmp")
        if _SHARD_FILE.match(p.name) or herd_io_tmp or p.name in (PROGRESS, PROGRESS + ".tmp", META + ".tmp"):
            p.unlink()


class ShardWriter:
    """Writes documents into shards of at most `max_tokens_per_shard` tokens; a context manager.

    A shard's files appear under their final names only once complete, and meta.json only at
    `close()`. Leaving the `with` block through an exception removes the shard in progress and
    writes no meta.json. A directory left without meta.json is cleared by the next writer.
    `bos`/`eos` record the ids the caller put around each document (the writer adds nothing).
    """

    def __init__(self, out_dir: str | os.PathLike[str], *, vocab_size: int, tokenizer_sha256: str | None = None,
                 max_tokens_per_shard: int = 2**27, source: str = "", bos: int | None = None,
                 eos: int | None = None) -> None:
        self._setup(Path(out_dir), vocab_size=vocab_size, tokenizer_sha256=tokenizer_sha256,
                    max_tokens_per_shard=max_tokens_per_shard, source=source, bos=bos, eos=eos)
        if (self.out_dir / META).exists():
            raise ValueError(f"{self.out_dir} already holds a complete shard set ({META}); "
                             "delete it or write somewhere else")
        _remove_partial_files(self.out_dir)

    def _setup(self, out_dir: Path, *, vocab_size: int, tokenizer_sha256: str | None, max_tokens_per_shard: int,
               source: str, bos: int | None, eos: int | None) -> None:
        if not 0 < vocab_size <= 2**32:
            raise ValueError(f"vocab_size must be in 1..2**32 for uint32 shards, got {vocab_size}")
        if max_tokens_per_shard <= 0:
            raise ValueError(f"max_tokens_per_shard must be positive, got {max_tokens_per_shard}")
        self.out_dir = out_dir
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.vocab_size, self.tokenizer_sha256 = vocab_size, tokenizer_sha256
        self.max_tokens_per_shard, self.source, self.bos, self.eos = max_tokens_per_shard, source, bos, eos
        self.shards: list[ShardFile] = []  # finished shards, in order
        self._file = None  # the open temporary .bin of the shard in progress
        self._offsets: list[int] = [0]
        self._closed = False

    @classmethod
    def _resuming(cls, out_dir: Path, done: Sequence[ShardFile], **settings) -> ShardWriter:
        """A writer that keeps the finished shards `done` of an interrupted run and continues after them."""
        self = cls.__new__(cls)
        self._setup(out_dir, **settings)
        keep = {s.file for s in done} | {_index_name(s.file) for s in done}
        for p in out_dir.iterdir():
            if _SHARD_FILE.match(p.name) and p.name not in keep:
                p.unlink()
        self.shards = list(done)
        return self

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            if not self._closed:
                self.close()
        else:
            self.abort()

    @property
    def _next_name(self) -> str:
        return f"shard_{len(self.shards):05d}.bin"

    def add(self, tokens) -> None:
        """Append one document (list[int] or integer np.ndarray), already with its BOS/EOS."""
        if self._closed:
            raise ValueError("this ShardWriter is closed")
        arr = np.asarray(tokens)
        if arr.ndim != 1 or not (arr.size == 0 or np.issubdtype(arr.dtype, np.integer)):
            raise ValueError(f"a document is a 1-D sequence of integer token ids, got shape {arr.shape} {arr.dtype}")
        if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= self.vocab_size):
            bad = int(arr.max()) if int(arr.max()) >= self.vocab_size else int(arr.min())
            raise ValueError(f"token id {bad} is outside the vocabulary 0..{self.vocab_size - 1}; "
                             "was the document encoded with another tokenizer?")
        pending = self._offsets[-1]
        if pending and pending + arr.size > self.max_tokens_per_shard:
            self._finish_shard()
        if self._file is None:
            self._file = open(self.out_dir / (self._next_name + ".tmp"), "wb")
        self._file.write(arr.astype("<u4", copy=False).tobytes())
        self._offsets.append(self._offsets[-1] + arr.size)

    def _finish_shard(self) -> None:
        assert self._file is not None and len(self._offsets) > 1
        name = self._next_name
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        idx = self.out_dir / _index_name(name)
        with open(idx.with_name(idx.name + ".tmp"), "wb") as f:
            np.save(f, np.asarray(self._offsets, dtype=np.int64))
        # The .bin goes into place first: an index under its final name implies a complete .bin.
        os.replace(self.out_dir / (name + ".tmp"), self.out_dir / name)
        os.replace(idx.with_name(idx.name + ".tmp"), idx)
        self.shards.append(ShardFile(file=name, num_docs=len(self._offsets) - 1, num_tokens=self._offsets[-1]))
        self._offsets = [0]

    def close(self) -> ShardsInfo:
        """Finish the last shard and write meta.json; the directory is complete afterwards."""
        if self._closed:
            raise ValueError("this ShardWriter is already closed")
        if self._file is not None:
            self._finish_shard()
        info = ShardsInfo(
            path=self.out_dir, vocab_size=self.vocab_size, tokenizer_sha256=self.tokenizer_sha256, bos=self.bos,
            eos=self.eos, num_docs=sum(s.num_docs for s in self.shards),
            num_tokens=sum(s.num_tokens for s in self.shards), shards=tuple(self.shards), source=self.source,
        )
        atomic_write_bytes(self.out_dir / META, (json.dumps(info.to_meta(), indent=1) + "\n").encode())
        self._closed = True
        return info

    def abort(self) -> None:
        """Drop the shard in progress (finished shards stay, and no meta.json is written)."""
        if self._file is not None:
            self._file.close()
            self._file = None
            (self.out_dir / (self._next_name + ".tmp")).unlink(missing_ok=True)
        self._closed = True


# ---- reading ---------------------------------------------------------------------------------------


def read_meta(path: str | os.PathLike[str]) -> ShardsInfo:
    """meta.json of a shard directory, with errors that say what to do about a missing or partial one."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"shard directory {str(path)!r} does not exist; create it with `herd data tokenize`")
    meta_path = path / META
    if not meta_path.is_file():
        raise ValueError(f"{path} has no {META}, so it is incomplete (a tokenize run did not finish); "
                         "rerun `herd data tokenize` with the same arguments to resume it, or delete the directory")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path}: format {meta.get('format')!r} is not {FORMAT!r}")
    shards = tuple(ShardFile(**s) for s in meta["shards"])
    return ShardsInfo(path=path, vocab_size=meta["vocab_size"], tokenizer_sha256=meta["tokenizer_sha256"],
                      bos=meta["bos"], eos=meta["eos"], num_docs=meta["num_docs"], num_tokens=meta["num_tokens"],
                      shards=shards, source=meta["source"])


class TokenShards:
    """A complete shard directory, memory-mapped: documents by global index 0..num_docs-1."""

    def __init__(self, info: ShardsInfo) -> None:
        self.info = info
        self.path = info.path
        self.vocab_size = info.vocab_size
        self._tokens: list[np.ndarray] = []
        offsets = []
        for s in info.shards:
            bin_path, idx_path = self.path / s.file, self.path / _index_name(s.file)
            for p in (bin_path, idx_path):
                if not p.is_file():
                    raise ValueError(f"{p} is listed in {self.path / META} but missing; the directory is damaged, "
                                     "re-create it with `herd data tokenize`")
            if bin_path.stat().st_size != 4 * s.num_tokens:
                raise ValueError(f"{bin_path} has {bin_path.stat().st_size} bytes, expected {4 * s.num_tokens} "
                                 f"({s.num_tokens} uint32 tokens); re-create the directory")
            off = np.load(idx_path)
            if off.shape != (s.num_docs + 1,) or off[0] != 0 or off[-1] != s.num_tokens or np.any(np.diff(off) < 0):
                raise ValueError(f"{idx_path} is not a valid offset index for {s.num_docs} documents and "
                                 f"{s.num_tokens} tokens; re-create the directory")
            # np.memmap cannot map an empty file; a shard of empty documents has no tokens to map.
            mm = np.memmap(bin_path, dtype="<u4", mode="r") if s.num_tokens else np.zeros(0, dtype="<u4")
            self._tokens.append(mm)
            offsets.append(off)
        n = len(info.shards)
        counts = np.array([s.num_docs for s in info.shards], dtype=np.int64)
        self._doc_shard = np.repeat(np.arange(n, dtype=np.int64), counts)  # (num_docs,)
        self._doc_start = np.concatenate([o[:-1] for o in offsets]) if n else np.zeros(0, np.int64)
        self.doc_lengths = np.concatenate([np.diff(o) for o in offsets]) if n else np.zeros(0, np.int64)
        self.num_docs = int(self.doc_lengths.size)
        self.num_tokens = int(self.doc_lengths.sum())
        if self.num_docs != info.num_docs or self.num_tokens != info.num_tokens:
            raise ValueError(f"{self.path / META} totals ({info.num_docs} docs, {info.num_tokens} tokens) disagree "
                             f"with its shards ({self.num_docs}, {self.num_tokens}); re-create the directory")

    def doc(self, i: int) -> np.ndarray:
        """Document i's tokens: a read-only uint32 view into the memory map (no copy)."""
        if not 0 <= i < self.num_docs:
            raise IndexError(f"document {i} out of range 0..{self.num_docs - 1}")
        s, a = self._doc_shard[i], self._doc_start[i]
        return self._tokens[s][a : a + self.doc_lengths[i]]

    def __len__(self) -> int:
        return self.num_docs

    def __repr__(self) -> str:
        return f"TokenShards({str(self.path)!r}, num_docs={self.num_docs}, num_tokens={self.num_tokens})"


def open_shards(path: str | os.PathLike[str]) -> TokenShards:
    """Open a complete shard directory (one that has meta.json) memory-mapped."""
    return TokenShards(read_meta(path))


# ---- tokenizing documents into shards --------------------------------------------------------------

_worker_tokenizer = None
_worker_flags: tuple[bool, bool] = (True, True)


def _init_worker(tokenizer_path: str, bos: bool, eos: bool) -> None:
    from herd.tokenizer import Tokenizer

    global _worker_tokenizer, _worker_flags
    _worker_tokenizer = Tokenizer.from_file(tokenizer_path)
    _worker_flags = (bos, eos)


def _encode_batch(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Tokens of all texts back to back (uint32) and each text's length (int64)."""
    bos, eos = _worker_flags
    encoded = [np.asarray(_worker_tokenizer.encode(t, bos=bos, eos=eos), dtype=np.uint32) for t in texts]
    lengths = np.array([e.size for e in encoded], dtype=np.int64)
    flat = np.concatenate(encoded) if encoded else np.zeros(0, dtype=np.uint32)
    return flat, lengths


class _InProcess:
    """The executor interface for num_workers=0: encode in this process (debugging, tiny inputs)."""

    def submit(self, fn, *args) -> Future:
        f: Future = Future()
        f.set_result(fn(*args))
        return f

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        pass


def _batches(docs: Iterable, max_chars: int, max_docs: int = 4096):
    batch, chars = [], 0
    for doc in docs:
        text = doc if isinstance(doc, str) else doc.text
        if not isinstance(text, str):
            raise ValueError(f"a document's text must be str, got {type(text).__name__}")
        batch.append(text)
        chars += len(text)
        if chars >= max_chars or len(batch) >= max_docs:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _docs_fingerprint(digests: Sequence[bytes]) -> str:
    return hashlib.sha256(b"".join(digests)).hexdigest()


def tokenize_to_shards(
    docs: Iterable,
    out_dir: str | os.PathLike[str],
    *,
    tokenizer_path: str | os.PathLike[str],
    num_workers: int,
    bos: bool = True,
    eos: bool = True,
    resume: bool = True,
    max_tokens_per_shard: int = 2**27,
    source: str = "",
    batch_chars: int = 1 << 20,
    progress: Callable[[int, int], None] | None = None,
) -> ShardsInfo:
    """Tokenize `docs` (str or objects with `.text`, in a fixed order) into a shard directory.

    num_workers: processes that tokenize (0: in this process). The output is the same for any
        number of workers.
    resume: continue an interrupted run into the same directory, skipping the documents of its
        finished shards (the documents must be the same, in the same order: their text hash is
        checked); a complete directory with the same settings is returned as it is. False
        starts over.
    progress: called with (documents, tokens) done so far after each batch.
    """
    from herd.tokenizer import Tokenizer

    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0 (0 tokenizes in this process), got {num_workers}")
    tokenizer_path = Path(tokenizer_path)
    tok = Tokenizer.from_file(tokenizer_path)  # also validates the file before any worker starts
    settings = {"vocab_size": tok.n_words, "tokenizer_sha256": hashlib.sha256(tokenizer_path.read_bytes()).hexdigest(),
                "bos": tok.bos_id if bos else None, "eos": tok.eos_id if eos else None, "source": source,
                "max_tokens_per_shard": max_tokens_per_shard}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    if (out_dir / META).exists():
        if not resume:
            (out_dir / META).unlink()
            _remove_partial_files(out_dir)
        else:
            info = read_meta(out_dir)
            made = {k: v for k, v in info.to_meta().items() if k in settings}
            wanted = {k: v for k, v in settings.items() if k in made}
            if made != wanted:
                changed = sorted(k for k in made if made[k] != wanted[k])
                raise ValueError(f"{out_dir} holds complete shards made with other settings ({', '.join(changed)}); "
                                 "delete it, choose another output directory, or disable resume to overwrite it")
            return info

    done: list[dict] = []
    progress_path = out_dir / PROGRESS
    if resume and progress_path.is_file():
        state = json.loads(progress_path.read_text())
        if state["settings"] != settings:
            raise ValueError(f"{out_dir} holds an interrupted run with other settings; rerun with the same "
                             "tokenizer and flags, or disable resume to start over")
        for rec in state["shards"]:
            p, idx = out_dir / rec["file"], out_dir / _index_name(rec["file"])
            if not (p.is_file() and idx.is_file() and p.stat().st_size == 4 * rec["num_tokens"]):
                break  # a damaged record: redo it and everything after it
            done.append(rec)
    writer_kwargs = dict(vocab_size=tok.n_words, tokenizer_sha256=settings["tokenizer_sha256"],
                         max_tokens_per_shard=max_tokens_per_shard, source=source,
                         bos=settings["bos"], eos=settings["eos"])
    if done:
        finished = [ShardFile(file=r["file"], num_docs=r["num_docs"], num_tokens=r["num_tokens"]) for r in done]
        writer = ShardWriter._resuming(out_dir, finished, **writer_kwargs)
    else:
        writer = ShardWriter(out_dir, **writer_kwargs)

    def save_progress() -> None:
        atomic_write_bytes(progress_path, json.dumps({"settings": settings, "shards": done}).encode())

    docs_iter = iter(docs)
    n_docs = n_tokens = 0
    # Skip the documents of finished shards, checking they are the ones the shards were made from.
    for rec in done:
        digests = []
        for _ in range(rec["num_docs"]):
            doc = next(docs_iter, None)
            if doc is None:
                raise ValueError(f"the documents end before {rec['file']} of the interrupted run in {out_dir}; "
                                 "they are not the same documents: disable resume to start over")
            text = doc if isinstance(doc, str) else doc.text
            digests.append(hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest())
        if _docs_fingerprint(digests) != rec["docs_sha256"]:
            raise ValueError(f"the documents of {rec['file']} differ from those of the interrupted run in {out_dir}; "
                             "disable resume to start over")
        n_docs += rec["num_docs"]
        n_tokens += rec["num_tokens"]
    save_progress()  # settings are on disk before the first new shard can be

    if num_workers == 0:
        _init_worker(str(tokenizer_path), bos, eos)
        pool = _InProcess()
    else:
        pool = ProcessPoolExecutor(num_workers, initializer=_init_worker, initargs=(str(tokenizer_path), bos, eos))
    pending_digests: list[bytes] = []
    in_flight: deque[tuple[Future, list[bytes]]] = deque()

    def drain_one() -> None:
        nonlocal n_docs, n_tokens
        future, digests = in_flight.popleft()
        flat, lengths = future.result()
        bounds = np.concatenate([[0], np.cumsum(lengths)])
        for k, digest in enumerate(digests):
            pending_digests.append(digest)
            writer.add(flat[bounds[k] : bounds[k + 1]])
            while len(done) < len(writer.shards):  # a shard was finished: record it
                s = writer.shards[len(done)]
                done.append({**asdict(s), "docs_sha256": _docs_fingerprint(pending_digests[: s.num_docs])})
                del pending_digests[: s.num_docs]
                save_progress()
        n_docs += len(digests)
        n_tokens += int(lengths.sum())
        if progress is not None:
            progress(n_docs, n_tokens)

    try:
        with writer:
            for batch in _batches(docs_iter, batch_chars):
                digests = [hashlib.sha256(t.encode("utf-8", "surrogatepass")).digest() for t in batch]
                in_flight.append((pool.submit(_encode_batch, batch), digests))
                if len(in_flight) > 2 * max(num_workers, 1):  # bounded: keeps memory flat, order kept
                    drain_one()
            while in_flight:
                drain_one()
            info = writer.close()
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    progress_path.unlink()
    return info
