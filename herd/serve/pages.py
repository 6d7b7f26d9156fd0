"""Paged KV blocks for the serving engine: a pool of fixed-size blocks, refcounts, a prefix cache.

Every running sequence owns a block table: the ids of the blocks that hold its positions
0..block_size-1, block_size..2*block_size-1, and so on. A full block is named by a hash chained
over its parent's hash and its own token ids (vLLM's automatic prefix caching), so a block's
name stands for the whole prefix up to its end; a newcomer whose first blocks have names in the
table reuses them (refcount + 1) and prefills only the rest. A block whose refcount drops to
zero keeps its contents and its name and waits in an LRU list: reused if the same prefix comes
back, evicted (oldest first) only when a fresh block is needed and no never-named block is left.

Design trade-offs:
* Bookkeeping is separate from storage. `BlockPool` is plain Python (ids, refcounts, hashes,
  the LRU) and is tested on its own; `BlockStore` holds the tensors and copies blocks to and
  from a contiguous cache row. The engine decides when.
* Hashes are SHA-256 digests, not Python's `hash`: a collision would silently serve another
  prompt's keys, and 32 bytes per block is nothing next to the block itself.
* Only full blocks are named. The last, partial block of a prompt is always the sequence's own,
  which also makes n > 1 choices copy-on-write for free: they share the prompt's full blocks by
  refcount and each gets a private block for the partial tail.
* The LRU list holds only unreferenced blocks, so "free" means "refcount 0" and eviction never
  touches a block somebody uses. Freed tables are released last block first, so a prompt's tail
  is evicted before its head (the head is what other prompts share).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence

import torch

from herd.generate.kv_cache import KVCache


def block_hashes(tokens: Sequence[int], block_size: int, start: int = 0, parent: bytes = b"") -> list[bytes]:
    """Chained names of the full blocks of `tokens` from block index `start`, whose parent is
    `parent` (the name of block start - 1, or b"" for the first block)."""
    out = []
    for i in range(start, len(tokens) // block_size):
        block = tokens[i * block_size : (i + 1) * block_size]
        parent = hashlib.sha256(parent + b"".join(int(t).to_bytes(4, "little") for t in block)).digest()
        out.append(parent)
    return out


def chain_root(adapter: str | None, images: bytes = b"") -> bytes:
    """The parent name of a sequence's first block. Keys and values depend on the LoRA adapter and
    (Llama 3.2 Vision, through cross-attention) on the request's images as well as on the tokens,
    so each adapter's and each image set's blocks form their own chains (b"": the base model, no
    images). `images` is the images' digest (`Request.image_digest`)."""
    root = b"" if adapter is None else hashlib.sha256(b"lora:" + adapter.encode("utf-8")).digest()
    return root if not images else hashlib.sha256(root + b"|images:" + images).digest()


class BlockPool:
    """Which blocks are used, by how many sequences, and which unused ones still hold a known prefix.

    num_blocks: blocks in the pool; block_size: positions per block.
    prefix_caching: False turns naming off: `match` finds nothing and `name` records nothing, so
        every freed block is empty again (the baseline the prefix cache is measured against).
    """

    def __init__(self, num_blocks: int, block_size: int, *, prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks} and {block_size}")
        self.num_blocks, self.block_size, self.prefix_caching = num_blocks, block_size, prefix_caching
        self.refs = [0] * num_blocks
        self._name: list[bytes | None] = [None] * num_blocks  # block -> the prefix it holds, if known
        self._table: dict[bytes, int] = {}  # prefix name -> block
        # Refcount 0, nothing worth keeping; a stack, so the blocks touched (and the memory the OS
        # has committed for them) stay few until the prefix cache fills the pool.
        self._empty: list[int] = list(range(num_blocks - 1, -1, -1))
        self._lru: OrderedDict[int, None] = OrderedDict()  # refcount 0, named; oldest first
        self.evictions = 0

    @property
    def num_free(self) -> int:
        """Blocks a caller can get now (empty ones, and named ones by eviction)."""
        return len(self._empty) + len(self._lru)

    def match(self, names: Sequence[bytes]) -> list[int]:
        """The blocks holding the longest prefix of `names` (not acquired)."""
        found = []
        if self.prefix_caching:
            for name in names:
                block = self._table.get(name)
                if block is None:
                    break
                found.append(block)
        return found

    def available_with(self, blocks: Sequence[int]) -> int:
        """Free blocks left after acquiring `blocks` (those unreferenced leave the free list)."""
        return self.num_free - sum(1 for b in set(blocks) if self.refs[b] == 0)

    def acquire(self, blocks: Sequence[int]) -> None:
        """One more reference to each of `blocks` (a prefix hit, or choices sharing a prompt)."""
        for b in blocks:
            if self.refs[b] == 0:
                del self._lru[b]  # a used block is never free; only named ones can be unreferenced
            self.refs[b] += 1

    def allocate(self, n: int) -> list[int]:
        """n blocks with refcount 1 and no name: empty ones first, then the least recently used
        named ones (evicted: their names leave the table). Callers check `num_free` first."""
        assert n <= self.num_free, f"asked for {n} blocks with {self.num_free} free"
        out = []
        for _ in range(n):
            if self._empty:
                b = self._empty.pop()
            else:
                b, _ = self._lru.popitem(last=False)
                del self._table[self._name[b]]
                self._name[b] = None
                self.evictions += 1
            self.refs[b] = 1
            out.append(b)
        return out

    def release(self, blocks: Sequence[int]) -> None:
        """Drop one reference to each of `blocks` (a block table, in order); the last block goes
        first, so the LRU evicts a prompt's tail before the head that other prompts share."""
        for b in reversed(blocks):
            assert self.refs[b] > 0, f"block {b} released more often than acquired"
            self.refs[b] -= 1
            if self.refs[b] == 0:
                if self._name[b] is not None:
                    self._lru[b] = None  # the most recently used end
                else:
                    self._empty.append(b)

    def name(self, block: int, name: bytes) -> None:
        """Record that `block` (referenced, full) now holds the prefix `name`. If another block
        holds it already (two sequences computed the same prefix at once), this one stays
        unnamed and becomes empty when freed."""
        assert self.refs[block] > 0, "only a referenced block can be named"
        if self.prefix_caching and self._name[block] is None and name not in self._table:
            self._table[name] = block
            self._name[block] = name

    def check(self) -> None:
        """Assert the invariants (tests call this after every operation)."""
        free = set(self._empty) | set(self._lru)
        assert len(free) == len(self._empty) + len(self._lru), "a block is listed free twice"
        for b in range(self.num_blocks):
            assert self.refs[b] >= 0, f"block {b} has refcount {self.refs[b]}"
            assert (self.refs[b] == 0) == (b in free), f"block {b}: refcount {self.refs[b]}, free {b in free}"
            assert (b in self._lru) <= (self._name[b] is not None), f"unnamed block {b} in the LRU"
        assert all(self._name[b] == n for n, b in self._table.items()), "the name table disagrees with the blocks"


class BlockStore:
    """The pool's keys and values: per layer (num_blocks, K, block_size, D) tensors, and the
    copies between blocks and one row of a contiguous `KVCache` (where attention reads them).

    `torch.empty`, not zeros: a block is always written before it is read, and untouched pages of a
    large allocation cost no memory until the pool is first used that far."""

    def __init__(self, cache: KVCache, num_blocks: int, block_size: int):
        self.block_size = block_size
        shape = (num_blocks, cache.k[0].shape[1], block_size, cache.k[0].shape[3])
        self.k = [torch.empty(shape, dtype=t.dtype, device=t.device) for t in cache.k]
        self.v = [torch.empty(shape, dtype=t.dtype, device=t.device) for t in cache.v]

    def save(self, cache: KVCache, row: int, first: int, blocks: Sequence[int]) -> None:
        """Copy positions of row `row` into `blocks`, which hold its blocks first, first + 1, ..."""
        if not blocks:
            return
        bs, n = self.block_size, len(blocks)
        idx = torch.tensor(blocks, device=self.k[0].device)
        for src, dst in ((cache.k, self.k), (cache.v, self.v)):
            for c, p in zip(src, dst):
                part = c[row, :, first * bs : (first + n) * bs]  # (K, n*bs, D)
                p.index_copy_(0, idx, part.unflatten(1, (n, bs)).transpose(0, 1))  # (n, K, bs, D)

    def load(self, cache: KVCache, row: int, blocks: Sequence[int]) -> None:
        """Copy `blocks` into positions 0..len(blocks)*block_size-1 of row `row`."""
        if not blocks:
            return
        n = len(blocks) * self.block_size
        idx = torch.tensor(blocks, device=self.k[0].device)
        for src, dst in ((self.k, cache.k), (self.v, cache.v)):
            for p, c in zip(src, dst):
                c[row, :, :n] = p.index_select(0, idx).transpose(0, 1).flatten(1, 2)  # (K, n*bs, D)

    def copy_row(self, cache: KVCache, src: int, dst: int, n: int) -> None:
        """Copy positions 0..n-1 of row `src` into row `dst` (the extra choices of n > 1 fork the prompt)."""
        for buf in (*cache.k, *cache.v):
            buf[dst, :, :n] = buf[src, :, :n]

    def commit(self, pool: BlockPool, cache: KVCache, row: int, blocks: Sequence[int], names: Sequence[bytes],
               tokens: Sequence[int], root: bytes = b"") -> list[bytes]:
        """A sequence in row `row` has filled more blocks: `tokens` are its ids from the first block
        not yet in `names` on. Copy those full blocks into the pool, name them, return the names.
        `root` is the parent of the first block (see `chain_root`)."""
        first = len(names)
        new = block_hashes(tokens, self.block_size, parent=names[-1] if names else root)
        self.save(cache, row, first, blocks[first : first + len(new)])
        for block, name in zip(blocks[first:], new):
            pool.name(block, name)
        return new

    def reacquire(self, pool: BlockPool, cache: KVCache, row: int, names: Sequence[bytes], need: int) -> list[int] | None:
        """`need` blocks for a sequence that gave its blocks back but kept its row, whose full blocks
        were named `names`: those still cached by refcount, fresh ones (refilled from the row) for
        the rest. None, and nothing taken, if too few are free."""
        hits = pool.match(names)
        if pool.available_with(hits) < need - len(hits):
            return None
        pool.acquire(hits)
        blocks = hits + pool.allocate(need - len(hits))
        evicted = blocks[len(hits) : len(names)]
        self.save(cache, row, len(hits), evicted)
        for block, name in zip(evicted, names[len(hits) :]):
            pool.name(block, name)
        return blocks

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))


class RowCache:
    """The model's `Cache` protocol over one row of a KVCache: prefill a newcomer into its slot
    while the other rows keep their contents."""

    def __init__(self, cache: KVCache, slot: int):
        self.cache, self.slot = cache, slot

    def update(self, layer_id: int, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor):
        assert k.shape[0] == 1 and pos.shape[0] == 1, "a row cache takes one sequence"
        kc = self.cache.k[layer_id][self.slot : self.slot + 1]  # (1, K, Lmax, D), a view into the cache
        vc = self.cache.v[layer_id][self.slot : self.slot + 1]
        kc.index_copy_(2, pos[0], k.to(kc.dtype))
        vc.index_copy_(2, pos[0], v.to(vc.dtype))
        return kc, vc
