"""Speculative decoding: a small draft model proposes k tokens, the target checks them in one forward.

Greedy only, so the output is the target's own greedy output and the gain is pure speed: each
target forward commits every draft token the target agrees with plus one token of its own (the
correction, or a bonus token when all k were right). A forward over k + 1 positions costs about
as much as one over a single position when decoding is bound by reading the weights, so the
speed-up approaches (accepted per round + 1) / (1 + k * draft_cost / target_cost).

Rollback costs nothing. Every row has its own position and slot p of the cache holds position p,
so rejecting drafts is just not advancing the row's position: their stale keys/values sit in
slots beyond it, hidden by the position mask until the next forward overwrites them. The draft
cache is rewound the same way; it is one token behind the committed text when every draft was
accepted (the last draft was never fed to it), so each round starts by feeding the draft the
last two committed tokens (re-writing one slot with the same values when it was not behind).

Exactness: the target's logits for k + 1 positions come from one forward with a longer query
axis than `generate`'s one-token steps, so they round differently in the last bits; only an
exact near-tie between the two best tokens could make the outputs differ (the same caveat as
batched versus single-prompt decoding).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch

from herd.generate.generate import FinishReason, _check_prompts, pad_prompts, prefill
from herd.generate.kv_cache import KVCache
from herd.model.llama import Transformer


@dataclass
class SpeculativeResult:
    """One prompt's outcome; `tokens`, `finish_reason` and `stop_token` as in `GenerationResult`.

    drafted: draft tokens proposed for this row; accepted: how many the target agreed with.
    target_forwards: forwards of the target this row took part in (prefill included); plain
        greedy decoding needs one per token.
    """

    tokens: list[int]
    finish_reason: FinishReason
    stop_token: int | None
    drafted: int
    accepted: int
    target_forwards: int

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


@torch.inference_mode()
def speculative_generate(
    target: Transformer,
    draft: Transformer,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    num_draft: int = 4,
    stop_tokens: Collection[int] = (),
) -> list[SpeculativeResult]:
    """Greedy generation with `target`, accelerated by `draft` (same tokenizer, same device).

    num_draft: tokens the draft proposes per round (k). Rounds near a row's length limit
        propose fewer, so no position ever passes prompt + max_new_tokens.
    Returns one `SpeculativeResult` per prompt, whose tokens equal
    `generate(target, prompts, sampling=GREEDY, ...)`'s.
    """
    args = target.args
    _check_prompts(prompts, vocab_size=args.vocab_size, max_seq_len=args.max_seq_len)
    if draft.args.vocab_size != args.vocab_size:
        raise ValueError(
            f"the draft's vocabulary ({draft.args.vocab_size}) differs from the target's ({args.vocab_size}); "
            "a draft model must share the target's tokenizer"
        )
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if isinstance(num_draft, bool) or not isinstance(num_draft, int) or num_draft < 1:
        raise ValueError(f"num_draft must be an integer >= 1, got {num_draft!r}")
    device = target.tok_embeddings.weight.device
    if draft.tok_embeddings.weight.device != device:
        raise ValueError(f"draft is on {draft.tok_embeddings.weight.device} but the target is on {device}; move one")

    B = len(prompts)
    limits = [min(max_new_tokens, args.max_seq_len - len(p)) for p in prompts]
    total_len = max(len(p) + lim for p, lim in zip(prompts, limits))
    if draft.args.max_seq_len < total_len:
        raise ValueError(
            f"the draft's max_seq_len {draft.args.max_seq_len} is shorter than the {total_len} positions this call "
            "needs; lower max_new_tokens or load the draft with a longer max_seq_len"
        )
    tcache = KVCache(args, batch_size=B, max_seq_len=total_len, device=device, dtype=target.tok_embeddings.weight.dtype)
    dcache = KVCache(draft.args, batch_size=B, max_seq_len=total_len, device=device,
                     dtype=draft.tok_embeddings.weight.dtype)

    tokens, lengths = pad_prompts(prompts, device=device)  # (B, S), (B,)
    rows = torch.arange(B, device=device)
    first = target.output(prefill(target, tokens, tcache)[rows, lengths - 1]).argmax(-1).tolist()  # (B,)
    prefill(draft, tokens, dcache)

    stop_ids = set(stop_tokens)
    seqs = [list(p) for p in prompts]  # committed tokens: prompt + new
    new: list[list[int]] = [[] for _ in range(B)]
    finish: list[FinishReason | None] = [None] * B
    stopped_by: list[int | None] = [None] * B
    drafted, accepted, forwards = [0] * B, [0] * B, [1] * B

    def commit(i: int, token: int) -> None:
        if token in stop_ids:
            finish[i], stopped_by[i] = "stop", token
            return
        new[i].append(token)
        seqs[i].append(token)
        if len(new[i]) == limits[i]:
            finish[i] = "length"

    for i, t in enumerate(first):
        commit(i, t)

    while any(f is None for f in finish):
        active = [i for i in range(B) if finish[i] is None]
        k = min(num_draft, *(limits[i] - len(new[i]) for i in active))  # >= 1 for every active row
        # Row i's last committed token sits at position L - 1 and is in neither cache yet.
        # Finished rows ride along at positions 0..k, writing slots nobody reads again.
        last = [len(s) - 1 if finish[i] is None else 1 for i, s in enumerate(seqs)]
        fill = [s[-2:] if finish[i] is None else [0, 0] for i, s in enumerate(seqs)]

        # Draft: catch up on the last two committed tokens, then propose k tokens one at a time.
        d_pos = torch.tensor([[p - 1, p] for p in last], device=device)  # (B, 2)
        h = draft.hidden(torch.tensor(fill, device=device), pos=d_pos, cache=dcache)  # (B, 2, dim)
        proposal = [draft.output(h[:, -1]).argmax(-1)]  # k tensors of (B,)
        for j in range(1, k):
            pos = torch.tensor(last, device=device) + j
            h = draft.hidden(proposal[-1].view(-1, 1), pos=pos.view(-1, 1), cache=dcache)  # (B, 1, dim)
            proposal.append(draft.output(h[:, -1]).argmax(-1))
        proposed = torch.stack(proposal, dim=1)  # (B, k)

        # Target: score the last committed token and the k drafts in one forward.
        fed = torch.cat([torch.tensor([f[-1] for f in fill], device=device).view(-1, 1), proposed], dim=1)  # (B, k+1)
        v_pos = torch.tensor(last, device=device).view(-1, 1) + torch.arange(k + 1, device=device)  # (B, k+1)
        verdict = target.output(target.hidden(fed, pos=v_pos, cache=tcache)).argmax(-1).tolist()  # (B, k+1)
        proposed_list = proposed.tolist()

        for i in active:
            d, y = proposed_list[i], verdict[i]
            m = 0
            while m < k and d[m] == y[m]:  # y[j] is the target's choice after seeing d[:j]
                m += 1
            drafted[i] += k
            accepted[i] += m
            forwards[i] += 1
            for t in (*d[:m], y[m]):
                commit(i, t)
                if finish[i] is not None:
                    break

    return [
        SpeculativeResult(tokens=new[i], finish_reason=finish[i], stop_token=stopped_by[i], drafted=drafted[i],
                          accepted=accepted[i], target_forwards=forwards[i])
        for i in range(B)
    ]
