"""From named sources to a tokenizer and token shards, with the held-out split applied everywhere.

`herd tokenizer train` and `herd data tokenize` are thin wrappers over these two functions. Both
take the same `val_fraction`, so the documents a tokenizer never saw are exactly the ones that
land in the `val` shards: the split is by document-id hash (`herd.data.split`), not by position,
and reading the sources twice (once per split) is the price of never holding a corpus in memory.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from herd.data.corpora import check_sources, read_sources
from herd.data.shards import META, ShardsInfo, tokenize_to_shards
from herd.data.split import select_split


@dataclass(frozen=True)
class TrainedOnSources:
    """A tokenizer trained on the train split, measured on the held-out split."""

    path: Path
    vocab_size: int  # base tokens, without the 256 special ones
    n_words: int  # every id, special tokens included
    num_chars: int
    sha256: str
    seconds: float
    held_out_docs: int
    held_out_bytes_per_token: float | None  # None when the held-out split is empty


def train_tokenizer_on_sources(sources: Sequence[str], out: str | os.PathLike[str], *, vocab_size: int,
                               val_fraction: float) -> TrainedOnSources:
    """Train BPE merges on the train split of `sources` (held-out documents stay unseen) and report
    the held-out compression, the number a vocabulary size is chosen by."""
    from herd.tokenizer import Tokenizer
    from herd.tokenizer.train_bpe import train_tokenizer

    train_docs = select_split(read_sources(sources), "train", val_fraction=val_fraction)
    start = time.perf_counter()
    result = train_tokenizer((d.text for d in train_docs), out, vocab_size=vocab_size)
    seconds = time.perf_counter() - start
    tok = Tokenizer.from_file(result.path)
    held_out = [d.text for d in select_split(read_sources(sources), "val", val_fraction=val_fraction)]
    ratio = None
    if held_out:
        n_bytes = sum(len(t.encode("utf-8")) for t in held_out)
        n_tokens = sum(len(ids) for ids in tok.encode_batch(held_out, bos=False, eos=False))
        ratio = n_bytes / n_tokens
    return TrainedOnSources(path=Path(result.path), vocab_size=result.vocab_size, n_words=tok.n_words,
                            num_chars=result.num_chars, sha256=result.sha256, seconds=seconds,
                            held_out_docs=len(held_out), held_out_bytes_per_token=ratio)


@dataclass(frozen=True)
class SplitShards:
    """One split's shard directory; `already_complete` when a finished earlier run was reused."""

    split: str
    info: ShardsInfo
    seconds: float
    already_complete: bool


def tokenize_sources(
    sources: Sequence[str],
    out: str | os.PathLike[str],
    *,
    tokenizer_path: str | os.PathLike[str],
    val_fraction: float,
    num_workers: int | None = None,
    bos: bool = True,
    eos: bool = True,
    resume: bool = True,
    max_tokens_per_shard: int = 2**27,
    progress: Callable[[str, int, int], None] | None = None,
) -> Iterator[SplitShards]:
    """Tokenize `sources` into `out/val` (when val_fraction > 0) and `out/train`.

    Yields each split as it is finished. Each split resumes on its own (see `tokenize_to_shards`),
    so an interrupted run restarts at the split and shard where it stopped. progress: called with
    (split, documents, tokens) done so far after each batch. num_workers: tokenizer processes
    (None: one per CPU core; 0: in this process).
    """
    if num_workers is None:
        num_workers = os.cpu_count() or 1
    check_sources(sources)  # before the val split's work, so a typo in the last source fails first
    for split in ("val", "train") if val_fraction > 0 else ("train",):
        docs = select_split(read_sources(sources), split, val_fraction=val_fraction)
        split_dir = Path(out) / split
        complete_before = resume and (split_dir / META).is_file()
        start = time.perf_counter()
        info = tokenize_to_shards(docs, split_dir, tokenizer_path=tokenizer_path, num_workers=num_workers, bos=bos,
                                  eos=eos, resume=resume, max_tokens_per_shard=max_tokens_per_shard,
                                  progress=(lambda d, t, split=split: progress(split, d, t)) if progress else None,
                                  source=f"{'+'.join(sources)} ({split}, val_fraction={val_fraction})")
        yield SplitShards(split=split, info=info, seconds=time.perf_counter() - start,
                          already_complete=complete_before)
