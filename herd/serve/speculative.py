"""Speculative decoding inside the continuous-batching engine: a draft model proposes k tokens per
row, the target checks every row's k + 1 positions in one batched forward.

The rule per row is `herd.generate.speculative`'s: greedy rows keep the drafts that equal the
target's argmax, sampled rows use Leviathan et al.'s rejection step (`accept_drafts`) with the
row's own generator and sampling parameters, so each choice's output is distributed as without
a draft. Rows whose request has logits processors (structured outputs, penalties, logit_bias)
or asks for logprobs take part in the same forward as plain rows: their token comes from the
first of their k + 1 positions, whose query sees exactly what a one-token decode step would
(the k dummy tokens behind it sit at later positions, hidden by the position mask).

Design trade-offs:
* The draft has its own static `KVCache` rows, one per slot, and no paging or prefix cache: it
  is small, and its rows are filled lazily. `DraftRunner` remembers, per slot, up to which
  position its row holds the draft's keys for the sequence now in that slot; a newcomer (or a
  row that fell behind, e.g. through steps where speculation was off) is caught up with one
  single-row forward over the missing committed tokens before it proposes. A prompt's draft
  prefill therefore happens in the first decode step, whole (outside `prefill_budget`).
* Rollback is not advancing positions, in both caches: the target's rejected positions hold
  stale keys beyond the row's committed length, hidden by the position mask and overwritten
  later. Blocks are copied into the pool and named (`_commit`) only once full of committed
  tokens, one token at a time as they are delivered, so no draft token ever reaches a block
  hash. A sequence reserves blocks for pos + k ahead, since a round can commit k + 1 tokens.
* One k per step for the batch, capped so that no busy row's positions pass the cache
  (max_seq_len - 1); near the end of any row's context the step falls back to plain decoding.
* Rows ride along as in the plain step: rows that do not propose write their dummy drafts at
  positions nobody reads before a real write replaces them. In the draft's cache a riding row's
  dummies land at positions 0..k, so its draft row is marked empty and refilled if it ever
  proposes (a paused row on resuming).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from herd.generate.kv_cache import KVCache
from herd.generate.processors import accept_token
from herd.generate.sampling import truncated_probs
from herd.generate.speculative import accept_drafts
from herd.model.llama import Transformer
from herd.serve.pages import RowCache
from herd.serve.requests import SEQ_DECODE as DECODE
from herd.serve.requests import RunningSeq as Seq
from herd.serve.requests import TokenEvent
from herd.serve.scoring import match_stop


class DraftRunner:
    """The draft model and its cache rows.

    num_draft: tokens proposed per step (k) at most.
    """

    def __init__(self, draft: Transformer, *, target: Transformer, max_batch: int, max_seq_len: int,
                 num_draft: int = 4):
        if isinstance(num_draft, bool) or not isinstance(num_draft, int) or num_draft < 1:
            raise ValueError(f"num_draft must be an integer >= 1 (tokens the draft proposes per step), got {num_draft!r}")
        if draft.args.vocab_size != target.args.vocab_size:
            raise ValueError(f"the draft's vocabulary ({draft.args.vocab_size}) differs from the model's "
                             f"({target.args.vocab_size}); a draft model must share the model's tokenizer")
        if draft.args.max_seq_len < max_seq_len:
            raise ValueError(f"the draft's context ({draft.args.max_seq_len}) is shorter than the engine's "
                             f"({max_seq_len}); lower the context (--max-seq-len) or use a draft with a longer one")
        weight = draft.tok_embeddings.weight
        if weight.device != target.tok_embeddings.weight.device:
            raise ValueError(f"the draft is on {weight.device} but the model is on "
                             f"{target.tok_embeddings.weight.device}; load both on one device")
        self.model, self.num_draft = draft, num_draft
        self.cache = KVCache(draft.args, batch_size=max_batch, max_seq_len=max_seq_len, device=weight.device,
                             dtype=weight.dtype)
        self._rows: list[tuple[Seq | None, int]] = [(None, 0)] * max_batch  # slot -> (owner, positions filled)

    def _catch_up(self, s: Seq) -> None:
        """Fill the draft's row with s's committed tokens up to position pos - 2."""
        owner, filled = self._rows[s.slot]
        if owner is not s:
            filled = 0
        if filled < s.pos - 1:
            tokens = [s.token_at(i) for i in range(filled, s.pos - 1)]
            self.model.hidden(torch.tensor([tokens], device=self.cache.k[0].device), pos=filled,
                              cache=RowCache(self.cache, s.slot))  # (1, n, dim)
        self._rows[s.slot] = (s, s.pos - 1)

    def propose(self, spec: Sequence[Seq], k: int) -> tuple[list[list[int]], list[torch.Tensor | None]]:
        """k draft tokens per sequence (each decoding, with its pending token at pos), and for sampled
        ones the (k, V) distributions they were drawn from (None for greedy ones)."""
        device = self.cache.k[0].device
        B = max(s.slot for s in spec) + 1
        rows = {s.slot: s for s in spec}
        tokens, pos = [[0, 0]] * B, [[0, 1]] * B
        for slot in range(B):
            s = rows.get(slot)
            if s is None:
                self._rows[slot] = (None, 0)  # rides along: its dummies land at positions 0..k
                continue
            self._catch_up(s)
            tokens[slot], pos[slot] = [s.token_at(s.pos - 1), s.pending], [s.pos - 1, s.pos]
        # The last two committed tokens, then one token per step (Meta's order: feed, then draw).
        h = self.model.hidden(torch.tensor(tokens, device=device), pos=torch.tensor(pos, device=device),
                              cache=self.cache)[:, -1]  # (B, dim)
        base = torch.tensor([p[1] for p in pos], device=device)  # (B,)
        drafts: dict[int, list[int]] = {s.slot: [] for s in spec}
        probs: dict[int, list[torch.Tensor]] = {s.slot: [] for s in spec if s.generator is not None}
        for j in range(k):
            if j:
                fed = torch.tensor([drafts[i][-1] if i in rows else 0 for i in range(B)], device=device)
                h = self.model.hidden(fed.view(-1, 1), pos=(base + j).view(-1, 1), cache=self.cache)[:, -1]
            logits = self.model.output(h).float()  # (B, V)
            greedy = logits.argmax(dim=-1).tolist()
            for s in spec:
                if s.generator is None:
                    drafts[s.slot].append(greedy[s.slot])
                else:
                    q = truncated_probs(logits[s.slot : s.slot + 1], s.handle.request.sampling)  # (1, V)
                    probs[s.slot].append(q[0])
                    drafts[s.slot].append(int(torch.multinomial(q, 1, generator=s.generator)))
        for s in spec:  # its row now holds positions < pos + k, valid as far as the drafts are accepted
            self._rows[s.slot] = (s, s.pos + k)
        return ([drafts[s.slot] for s in spec],
                [torch.stack(probs[s.slot]) if s.slot in probs else None for s in spec])

    def verify(self, s: Seq, logits: torch.Tensor, drafts: list[int], q: torch.Tensor | None) -> tuple[int, int]:
        """The target's logits (k + 1, V) at s's pending token and its k drafts -> (drafts kept, next token)."""
        k = len(drafts)
        if q is None:
            verdict = logits.argmax(dim=-1).tolist()  # verdict[j]: the target's choice after drafts[:j]
            m = 0
            while m < k and drafts[m] == verdict[m]:
                m += 1
            return m, verdict[m]
        p = truncated_probs(logits, s.handle.request.sampling)  # (k + 1, V)
        kept, nxt = accept_drafts(p.unsqueeze(0), q.unsqueeze(0), torch.tensor([drafts], device=p.device), s.generator)
        return int(kept), int(nxt)

    def settle(self, s: Seq) -> None:
        """After s's tokens were delivered: its draft row is valid only below its new position."""
        owner, filled = self._rows[s.slot]
        if owner is s:
            self._rows[s.slot] = (s, min(filled, s.pos))


class SpeculativeSteps:
    """Mixed into `Engine` (which provides the attributes): delivering one token to a sequence, which
    the plain and the speculative steps share, and the decode step with a draft. They live here to
    keep engine.py under 600 lines."""

    def _deliver(self, s: Seq, t: int, lp: float | None, alts, now: float) -> int:
        """Token t for s: emit it, finish s on a stop or its length, else make it the pending token.
        Returns 1 when t counts as generated (a stop token does not)."""
        r = s.handle.request
        if s.processors:
            accept_token(s.processors, t)
        if t in r.stop_tokens:
            self._finish(s, "stop", stop_token=t)
            return 0
        s.count += 1
        s.generated.append(t)
        if s.last_token_at is not None:
            for observer in self._latency:
                observer.inter_token(now - s.last_token_at)
        s.last_token_at = now
        self._emit(s.handle, TokenEvent(s.handle.id, s.index, t, lp if r.logprobs else None, alts))
        if r.stop_strings:
            hit = match_stop(s.tail, self.token_bytes(t), r.stop_strings, s.stop_bytes)
            if hit is not None:
                self._finish(s, "stop", stop_string=hit)
                return 1
        if s.count == s.limit:
            self._finish(s, "length")
            return 1
        s.pending, s.pos = t, s.pos + 1
        return 1

    def _speculable(self, s: Seq) -> bool:
        r = s.handle.request
        return not s.processors and not (r.logprobs or r.top_logprobs)

    def _lookahead(self, s: Seq) -> int:
        """Positions beyond pos a decode step may commit for s (blocks are reserved for them)."""
        return self.draft.num_draft if self.draft is not None and self._speculable(s) else 0

    def _spec_k(self, running: Sequence[Seq]) -> int:
        """This step's k: 0 (plain step) without a proposing row or when a busy row's context is full."""
        if self.draft is None or not any(self._speculable(s) for s in running):
            return 0
        B = max(s.slot for s in running) + 1
        room = min(self.max_seq_len - 1 - s.pos for s in self._slots[:B] if s is not None)
        return max(0, min(self.draft.num_draft, room))

    def _decode_speculative(self, running: list[Seq], k: int, t0: float) -> None:
        spec = [s for s in running if self._speculable(s)]
        plain = [s for s in running if not self._speculable(s)]
        drafts, qs = self.draft.propose(spec, k)
        B = max(s.slot for s in running) + 1
        tokens, base = [[0] * (k + 1) for _ in range(B)], [0] * B
        for s in self._slots[:B]:
            if s is not None:
                base[s.slot] = s.pos
                tokens[s.slot][0] = s.pending if s.state == DECODE else 0
        for s, d in zip(spec, drafts):
            tokens[s.slot][1:] = d
        pos = torch.tensor(base, device=self.device).view(-1, 1) + torch.arange(k + 1, device=self.device)
        h = self.model.hidden(torch.tensor(tokens, device=self.device), pos=pos, cache=self.cache)  # (B, k+1, dim)
        if plain:  # their one real position is the first
            logits = self.model.output(h[torch.tensor([s.slot for s in plain], device=self.device), 0]).float()
            for s in plain:
                s.pos += 1
                self._commit(s)
                s.pos -= 1
            self._advance(plain, logits)  # (P, V)
        logits = self.model.output(h[torch.tensor([s.slot for s in spec], device=self.device)]).float()  # (R, k+1, V)
        generated, kept_total, now = 0, 0, self._clock()
        for i, s in enumerate(spec):
            kept, nxt = self.draft.verify(s, logits[i], drafts[i], qs[i])
            kept_total += kept
            for t in (*drafts[i][:kept], nxt):
                s.pos += 1  # the keys at pos (the token before t) are in and committed: name full blocks
                self._commit(s)
                s.pos -= 1
                generated += self._deliver(s, t, None, None, now)
                if self._slots[s.slot] is not s:  # finished
                    break
            self.draft.settle(s)
        with self._cond:
            m = self._metrics
            m.generation_tokens_total += generated
            m.decode_steps_total += 1
            m.decode_rows_total += len(running)
            m.decode_seconds += time.perf_counter() - t0
            m.spec_draft_tokens_total += k * len(spec)
            m.spec_accepted_tokens_total += kept_total
