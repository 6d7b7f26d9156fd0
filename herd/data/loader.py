"""Packed training batches from token shards: fixed-length rows, document ids, exact resume.

Each source (a shard directory) is read as an endless stream: epoch e is every document once,
in an order shuffled by (seed, source, e), back to back. A row of S tokens takes the next S
tokens of one source's stream as inputs and the same window shifted by one as targets, so
consecutive rows of a source overlap by one token and, per epoch, every token is an input
exactly once and every token except a document's first is a target exactly once. A target is
-100 where the next token starts another document: nothing before it predicts it (documents
carry their own BOS). `doc_ids` number the documents within a row from 0, so attention and
positions restart wherever the id changes.

Sources are mixed row by row: each row goes to the source furthest below its share of all
tokens read so far (weight * total - own), which keeps every source within one row of its
weighted share at every step, with no sampling noise. Data parallelism splits the same global
sequence of rows: a step draws batch_size * dp_world rows and rank r keeps rows
[r * batch_size, (r + 1) * batch_size). Ranks are therefore disjoint and together cover what a
single process would read with the global batch size.

Trade-off: the state is a few integers (tokens read per source) rather than an iterator with a
prefetch buffer, so a checkpoint is tiny and exact and a run can change batch size, sequence
length or even the number of ranks when it resumes. There is no random generator state to
store: the only randomness is each epoch's shuffle, a pure function of (seed, source, epoch)
computed from PCG64's raw output (stable across numpy versions). The price is that rows are
read synchronously when asked for; a row costs a few memory-mapped slices, far below a step.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from herd.data.shards import TokenShards, open_shards
from herd.targets import IGNORE_INDEX

STATE_VERSION = 1


@dataclass
class Batch:
    inputs: torch.Tensor  # (B, S) int64
    targets: torch.Tensor  # (B, S) int64; -100 where there is nothing to predict
    doc_ids: torch.Tensor  # (B, S) int64; attention never crosses a change of id
    num_targets: int  # targets != -100


class _SourceStream:
    """One shard directory as an endless stream of shuffled epochs, read by token position."""

    def __init__(self, shards: TokenShards, *, seed: int, index: int) -> None:
        self.shards = shards
        self.num_tokens = shards.num_tokens
        self._seed, self._index = seed, index
        self._epochs: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _epoch(self, e: int) -> tuple[np.ndarray, np.ndarray]:
        """(document order, start of each document in the epoch's stream + the end)."""
        if e not in self._epochs:
            if len(self._epochs) >= 2:  # a window spans at most a few epochs; keep the newest two
                del self._epochs[min(self._epochs)]
            bits = np.random.PCG64(np.random.SeedSequence([self._seed, self._index, e]))
            # argsort of raw 64-bit draws: a uniform permutation that numpy will not change under us.
            order = np.argsort(bits.random_raw(self.shards.num_docs), kind="stable")
            starts = np.zeros(order.size + 1, dtype=np.int64)
            np.cumsum(self.shards.doc_lengths[order], out=starts[1:])
            self._epochs[e] = (order, starts)
        return self._epochs[e]

    def read(self, pos: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens at stream positions [pos, pos + n) as int64, and whether each starts a document."""
        tokens = np.empty(n, dtype=np.int64)
        is_start = np.zeros(n, dtype=bool)
        filled = 0
        while filled < n:  # one pass per epoch the window touches
            epoch, off = divmod(pos + filled, self.num_tokens)
            order, starts = self._epoch(epoch)
            take = min(n - filled, self.num_tokens - off)
            # Documents k0..k1-1 overlap [off, off + take); side="right" skips empty documents.
            k0 = int(np.searchsorted(starts, off, side="right")) - 1
            k1 = int(np.searchsorted(starts, off + take, side="left"))
            for k in range(k0, k1):  # one slice per document, never per token
                a, b = max(starts[k], off), min(starts[k + 1], off + take)
                if b > a:
                    doc = self.shards.doc(int(order[k]))
                    tokens[filled + a - off : filled + b - off] = doc[a - starts[k] : b - starts[k]]
            first = starts[k0:k1]
            first = first[(first >= off) & (first < off + take)]
            is_start[filled + first - off] = True
            filled += take
        return tokens, is_start


class PackedLoader:
    """Fixed-length packed rows from one or more shard directories; see the module docstring.

    sources: shard directories (complete: with meta.json), all made with the same tokenizer.
    weights: share of tokens from each source (normalised); None: in proportion to their sizes,
        i.e. as if the sources were one corpus.
    seq_len, batch_size: defaults for `next_batch`; batch_size is per rank.
    seed: the shuffle of every epoch of every source.
    dp_rank, dp_world: this process's place among the data-parallel ranks.
    """

    def __init__(self, sources: Sequence[str | os.PathLike[str]], *, weights: Sequence[float] | None = None,
                 seq_len: int, batch_size: int, seed: int, dp_rank: int = 0, dp_world: int = 1) -> None:
        if isinstance(sources, (str, os.PathLike)):
            raise ValueError("sources is a list of shard directories: wrap a single one as [path]")
        if not sources:
            raise ValueError("PackedLoader needs at least one shard directory")
        _check_shape(batch_size=batch_size, seq_len=seq_len)
        if dp_world < 1 or not 0 <= dp_rank < dp_world:
            raise ValueError(f"dp_rank must be in 0..dp_world-1 and dp_world >= 1, got rank {dp_rank} of {dp_world}")
        shards = [open_shards(p) for p in sources]
        first = shards[0].info
        for s in shards[1:]:
            if (s.info.vocab_size, s.info.tokenizer_sha256) != (first.vocab_size, first.tokenizer_sha256):
                raise ValueError(
                    f"{s.path} was tokenized with another vocabulary (vocab_size {s.info.vocab_size}, tokenizer "
                    f"{s.info.tokenizer_sha256}) than {first.path} ({first.vocab_size}, {first.tokenizer_sha256}); "
                    "re-tokenize all sources with one tokenizer"
                )
        for s in shards:
            if s.num_tokens == 0:
                raise ValueError(f"{s.path} holds no tokens; drop it from the sources")
        if weights is None:
            weights = [s.num_tokens for s in shards]
        if len(weights) != len(shards):
            raise ValueError(f"{len(weights)} weights for {len(shards)} sources; give one weight per source")
        w = np.asarray(weights, dtype=np.float64)
        if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
            raise ValueError(f"weights must be finite, >= 0 and not all 0, got {list(weights)}")
        self.vocab_size = first.vocab_size
        self.weights = w / w.sum()
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.dp_rank, self.dp_world = dp_rank, dp_world
        self._streams = [_SourceStream(s, seed=seed, index=i) for i, s in enumerate(shards)]
        self._positions = [0] * len(shards)  # tokens of each source's stream consumed so far

    def _next_source(self, seq_len: int) -> int:
        """The source furthest below its weighted share once this row is counted (ties: lowest index)."""
        total = sum(self._positions) + seq_len
        deficits = [w * total - p if w > 0 else -np.inf for w, p in zip(self.weights, self._positions)]
        return int(np.argmax(deficits))

    def next_batch(self, *, batch_size: int | None = None, seq_len: int | None = None) -> Batch:
        """This rank's next `batch_size` rows of `seq_len` tokens (defaults: the constructor's)."""
        B = self.batch_size if batch_size is None else batch_size
        S = self.seq_len if seq_len is None else seq_len
        _check_shape(batch_size=B, seq_len=S)
        mine = []
        for row in range(B * self.dp_world):  # every rank plans all rows, to keep positions in step
            j = self._next_source(S)
            if row // B == self.dp_rank:
                mine.append((j, self._positions[j]))
            self._positions[j] += S
        tokens = np.empty((B, S + 1), dtype=np.int64)
        is_start = np.empty((B, S + 1), dtype=bool)
        for r, (j, pos) in enumerate(mine):
            tokens[r], is_start[r] = self._streams[j].read(pos, S + 1)  # one extra token: the last target
        targets = tokens[:, 1:].copy()
        targets[is_start[:, 1:]] = IGNORE_INDEX  # the first token of a document has no predictor
        doc_ids = np.cumsum(is_start[:, :S], axis=1)  # (B, S)
        doc_ids -= doc_ids[:, :1]  # number from 0 in each row
        return Batch(inputs=torch.from_numpy(tokens[:, :S].copy()), targets=torch.from_numpy(targets),
                     doc_ids=torch.from_numpy(doc_ids), num_targets=int((targets != IGNORE_INDEX).sum()))

    def state_dict(self) -> dict:
        """Where every source's stream stands, as plain ints and lists of ints.

        {"version": int, "seed": int, "positions": list[int] (tokens read per source),
         "num_tokens": list[int] (each source's size, to catch a resume on other data)}.
        The same on every rank, so any one rank's copy resumes all of them.
        """
        return {"version": STATE_VERSION, "seed": self.seed, "positions": list(self._positions),
                "num_tokens": [s.num_tokens for s in self._streams]}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly after the last token the saved loader read (any batch size or rank count)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')!r} is not {STATE_VERSION}")
        if int(state["seed"]) != self.seed:
            raise ValueError(f"the state was saved with seed {state['seed']}, this loader has seed {self.seed}; "
                             "resume with the same seed or the epochs are shuffled differently")
        sizes = [int(n) for n in state["num_tokens"]]
        if sizes != [s.num_tokens for s in self._streams]:
            raise ValueError(f"the state was saved over sources of {sizes} tokens, these hold "
                             f"{[s.num_tokens for s in self._streams]}; resume with the same shard directories "
                             "in the same order")
        self._positions = [int(p) for p in state["positions"]]

    @property
    def tokens_read(self) -> list[int]:
        """Tokens of each source's stream consumed by all ranks so far (divide by its size for epochs)."""
        return list(self._positions)

    def __repr__(self) -> str:
        paths = [str(s.shards.path) for s in self._streams]
        return f"PackedLoader({paths}, seq_len={self.seq_len}, batch_size={self.batch_size}, rank {self.dp_rank}/{self.dp_world})"


def _check_shape(*, batch_size: int, seq_len: int) -> None:
    if not isinstance(seq_len, int) or seq_len <= 0:
        raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
