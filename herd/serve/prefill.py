"""Batched chunked prefill for the engine: the waiting prompts' chunks of one step in one forward.

Why: a forward reads every weight once however many tokens it carries, and a wider matrix
multiply runs nearer the CPU's peak. Prefilling one prompt per model call made 16 clients that
arrive together cost 16 passes over the weights before anyone decodes, and the last one's time
to first token the sum of all 16.

Design trade-offs:
* Padded rows, not one packed row. Each chunk is a row of a (B, S) batch padded to the longest
  chunk, with its own positions, so the model's per-row position mask (`AttentionMask`) is the
  exact causal rule and attention reads each slot's own cache row. Packing all chunks into one
  row would waste no compute on padding but needs a block-diagonal mask over keys gathered from
  several cache rows, which the model's `hidden` does not take.
* Padding is never written. `RowsCache` scatters only the real tokens' keys and values into the
  slots' rows; a padded query repeats its row's last position (a valid RoPE index whose mask is the
  last real token's), and its output is dropped. So a row's cache beyond its chunk is untouched.
* Padding is bounded. Chunks are sorted longest first and cut into groups whose padded size
  (rows x longest) stays within `MAX_PADDING` times their real tokens, so one long prompt next to
  many short ones does not multiply the work; the common case (prompts of similar lengths
  arriving together) is one forward.
* A single chunk runs exactly as before (a (1, c) forward through `RowCache` from an int start,
  SDPA's causal fast path when it starts at 0), and so does everything under tensor parallelism:
  the followers' `prefill` instruction is per prompt, so the engine keeps one forward per chunk
  when a mirror is present.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from herd.generate.kv_cache import KVCache
from herd.serve.pages import RowCache
from herd.serve.requests import SEQ_PREFILL, RunningSeq
from herd.serve.scoring import score_chunk, scored_positions

log = logging.getLogger(__name__)

MAX_PADDING = 1.5  # a group's rows x longest chunk may be at most this many times its real tokens


@dataclass
class Chunk:
    """One prompt's share of this step's prefill: positions start..start+len(tokens)-1."""

    seq: RunningSeq
    start: int
    tokens: list[int]

    @property
    def last(self) -> bool:
        """Whether the chunk ends the prompt (its last position's logits give the first new token)."""
        return self.start + len(self.tokens) == len(self.seq.handle.request.prompt)


def plan_chunks(seqs: Sequence[RunningSeq], budget: int) -> list[Chunk]:
    """The chunks of one step: oldest prompt first, each as much of its rest as the budget allows."""
    out = []
    for seq in sorted((s for s in seqs if s.state == SEQ_PREFILL), key=lambda s: s.order):
        if budget == 0:
            break
        prompt = seq.handle.request.prompt
        c = min(len(prompt) - seq.pos, budget)
        out.append(Chunk(seq, seq.pos, list(prompt[seq.pos : seq.pos + c])))
        budget -= c
    return out


def group_chunks(chunks: Sequence[Chunk], max_padding: float = MAX_PADDING) -> list[list[Chunk]]:
    """Chunks cut into forwards: longest first, a new group whenever adding the next chunk would
    make the group's padded size exceed `max_padding` times its real tokens."""
    groups: list[list[Chunk]] = []
    for ch in sorted(chunks, key=lambda c: -len(c.tokens)):
        g = groups[-1] if groups else None
        if g is not None:
            longest, real = len(g[0].tokens), sum(len(c.tokens) for c in g) + len(ch.tokens)
            if (len(g) + 1) * longest <= max_padding * real:
                g.append(ch)
                continue
        groups.append([ch])
    return [sorted(g, key=lambda c: c.seq.slot) for g in groups]  # consecutive slots: the cache rows are a view


class RowsCache:
    """The model's `Cache` protocol over several rows of a KVCache: batch row b is slot slots[b],
    whose first lengths[b] query positions are real (the rest padding, never written).

    kv_len: the furthest position any row reaches + 1; keys and values are returned up to it only,
    gathered from the slots' rows (a view when the slots are consecutive)."""

    def __init__(self, cache: KVCache, slots: Sequence[int], pos: torch.Tensor, lengths: Sequence[int], kv_len: int):
        B, S = pos.shape
        device = pos.device
        self.cache, self.kv_len = cache, kv_len
        self.valid = torch.arange(S, device=device).unsqueeze(0) < torch.tensor(lengths, device=device).unsqueeze(1)
        self.slot_idx = torch.tensor(slots, device=device).unsqueeze(1).expand(B, S)[self.valid]  # (N,)
        self.pos_idx = pos[self.valid]  # (N,)
        a = slots[0]
        self.span = (a, a + B) if list(slots) == list(range(a, a + B)) else None
        self.rows = None if self.span is not None else torch.tensor(slots, device=device)

    def update(self, layer_id: int, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor):
        kc, vc = self.cache.k[layer_id], self.cache.v[layer_id]
        # Advanced indices split by a slice put their dim first: the targets are (N, K, D).
        kc[self.slot_idx, :, self.pos_idx] = k.transpose(1, 2)[self.valid].to(kc.dtype)
        vc[self.slot_idx, :, self.pos_idx] = v.transpose(1, 2)[self.valid].to(vc.dtype)
        L = self.kv_len
        if self.span is not None:
            a, b = self.span
            return kc[a:b, :, :L], vc[a:b, :, :L]  # (B, K, L, D) views
        return kc[self.rows, :, :L], vc[self.rows, :, :L]  # (B, K, L, D) copies


def forward_chunks(model, cache: KVCache, chunks: Sequence[Chunk], device: torch.device) -> torch.Tensor:
    """Final-normed hidden states (B, S, dim) of `chunks` prefilled together into their slots' rows;
    row b's first len(chunks[b].tokens) positions are real."""
    if len(chunks) == 1:
        ch = chunks[0]
        tokens = torch.tensor([ch.tokens], dtype=torch.long, device=device)
        return model.hidden(tokens, pos=ch.start, cache=RowCache(cache, ch.seq.slot))  # (1, c, dim)
    S = max(len(ch.tokens) for ch in chunks)
    lengths = [len(ch.tokens) for ch in chunks]
    tokens = torch.tensor([ch.tokens + [0] * (S - len(ch.tokens)) for ch in chunks], dtype=torch.long, device=device)
    # A padded query repeats its row's last position: a valid RoPE index, and its output is dropped.
    pos = torch.tensor([[ch.start + min(j, len(ch.tokens) - 1) for j in range(S)] for ch in chunks], device=device)
    kv_len = max(ch.start + len(ch.tokens) for ch in chunks)
    rows = RowsCache(cache, [ch.seq.slot for ch in chunks], pos, lengths, kv_len)
    return model.hidden(tokens, pos=pos, cache=rows, kv_len=kv_len)  # (B, S, dim)


class PrefillSteps:
    """The engine's prefill (a mixin of `herd.serve.engine.Engine`, which owns the state it reads).

    batch_prefill: False keeps one forward per chunk (a model surface that prefills one slot's row
    at a time, e.g. `herd.serve.vision.VisionRows`, whose rows attend to their own images).
    """

    batch_prefill = True

    def _prefill(self) -> bool:
        """Prefill chunks of waiting prompts, oldest first, up to `prefill_budget` tokens in all,
        batched into as few forwards as `group_chunks` allows (one per chunk under a mirror)."""
        chunks = plan_chunks([s for s in self._slots if s is not None], self.prefill_budget)
        if not chunks:
            return False
        single = self._mirror is not None or not self.batch_prefill
        groups = [[ch] for ch in chunks] if single else group_chunks(chunks)
        for group in groups:
            self._prefill_group(group)
        return True

    def _prefill_group(self, group: list[Chunk]) -> None:
        t0 = time.perf_counter()
        try:
            if self._mirror is not None:
                (ch,) = group
                r = ch.seq.handle.request
                scored = 0 if r.prompt_logprobs is None else scored_positions(len(r.prompt), ch.start, len(ch.tokens))
                self._mirror.prefill(ch.seq.slot, ch.start, ch.tokens, last=ch.last, scored=scored)
            if self.adapters is not None:  # multi-LoRA hook: each prefill row's adapter
                self.adapters.select([ch.seq.handle.request.adapter for ch in group])
            h = forward_chunks(self.model, self.cache, group, self.device)  # (B, S, dim)
            ends = [i for i, ch in enumerate(group) if ch.last]
            last_h = torch.stack([h[i, len(group[i].tokens) - 1] for i in ends]) if ends else None  # (E, dim)
            logits = self.model.output(last_h).float() if ends else None  # (E, V)
            for i, ch in enumerate(group):
                r = ch.seq.handle.request
                if r.prompt_logprobs is not None:
                    ch.seq.prompt_lps = score_chunk(self.model.output, r.prompt, ch.start, h[i, : len(ch.tokens)],
                                                    r.prompt_logprobs, ch.seq.prompt_lps)
        except Exception:
            if self._mirror is not None:  # the followers may be inside this forward's collectives
                raise
            log.exception("prefill of %s failed", ", ".join(ch.seq.handle.id for ch in group))
            for ch in group:
                for s in (ch.seq, *ch.seq.forks):
                    if self._slots[s.slot] is s:
                        self._finish(s, "error", error="internal error during prefill")
            return
        for ch in group:
            ch.seq.pos += len(ch.tokens)
            self._commit(ch.seq)
        with self._cond:
            m = self._metrics
            m.prefills_total += len(group)
            m.prefill_tokens_total += sum(len(ch.tokens) for ch in group)
            m.prefill_seconds += time.perf_counter() - t0
        for j, i in enumerate(ends):
            seq, handle = group[i].seq, group[i].seq.handle
            if seq.prompt_lps is not None:  # before any event: consumers may read it once they see one
                handle.prompt_logprobs, seq.prompt_lps = seq.prompt_lps, None
            if seq.limit == 0:  # prefill only (max_tokens 0)
                for s in (seq, *seq.forks):
                    if self._slots[s.slot] is s:
                        self._finish(s, "length")
                continue
            self._fork(seq, logits[j : j + 1])
