"""Speculative decoding: a small draft model proposes k tokens, the target checks them in one forward.

Each target forward commits every draft token it accepts plus one token of its own (the
correction, or a bonus token when all k were accepted). A forward over k + 1 positions costs
about as much as one over a single position when decoding is bound by reading the weights, so
the speed-up approaches (accepted per round + 1) / (1 + k * draft_cost / target_cost).

Greedy (temperature 0): a draft token is accepted when it is the target's argmax, so the output
is the target's own greedy output and the gain is pure speed.

Sampling: the rejection rule of Leviathan et al. (2023), "Fast Inference from Transformers via
Speculative Decoding". The draft samples x ~ q, the target's p is computed for all k + 1
positions in one forward, x is accepted with probability min(1, p(x) / q(x)); at the first
rejection the token is drawn from norm(max(0, p - q)) instead and the round ends; when all k
are accepted a bonus token is drawn from p at the last position. Every committed token is then
distributed exactly as the target's sampler would draw it. p and q are the distributions after
the same temperature / top-k / min-p / top-p transform (`truncated_probs`), so the output follows
the target's *sampler*, not its raw softmax. One seeded torch.Generator drives every draw
(draft proposals, acceptance uniforms, residual draws) in a fixed order, so a seeded run is
reproducible; it does not reproduce `generate`'s draws for the same seed (different draws).

Rollback costs nothing. Every row has its own position and slot p of the cache holds position p,
so rejecting drafts is just not advancing the row's position: their stale keys/values sit in
slots beyond it, hidden by the position mask until the next forward overwrites them. The draft
cache is rewound the same way; it is one token behind the committed text when every draft was
accepted (the last draft was never fed to it), so each round starts by feeding the draft the
last two committed tokens (re-writing one slot with the same values when it was not behind).

Exactness of greedy: the target's logits for k + 1 positions come from one forward with a longer
query axis than `generate`'s one-token steps, so they round differently in the last bits; only
an exact near-tie between the two best tokens could make the outputs differ (the same caveat as
batched versus single-prompt decoding).
"""

from __future__ import annotations

from collections.abc import Collection, Generator, Sequence
from dataclasses import dataclass

import torch

from herd.generate.generate import FinishReason, _check_prompts, pad_prompts, prefill
from herd.generate.kv_cache import KVCache
from herd.generate.sampling import GREEDY, SamplingParams, sample, truncated_probs
from herd.model.llama import Transformer


@dataclass
class SpeculativeResult:
    """One prompt's outcome; `tokens`, `finish_reason` and `stop_token` as in `GenerationResult`.

    drafted: draft tokens proposed for this row; accepted: how many the target accepted.
    target_forwards: forwards of the target this row took part in (prefill included); plain
        decoding needs one per token.
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


@dataclass
class SpeculativeStep:
    """What one round (or the prefill) committed: per row the new tokens (stop tokens left out)
    and the finish reason if the row ended in this round."""

    tokens: list[list[int]]
    finish_reasons: list[FinishReason | None]


def accept_drafts(
    p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rejection step of Leviathan et al. for a batch of rows.

    p: (B, k+1, V) the target's probabilities after the drafts 0..j-1 (row j predicts draft j;
        row k predicts the bonus token). q: (B, k, V) the draft's probabilities that drafts
        (B, k) were drawn from. Returns (accepted (B,), next (B,)), both int64: the row keeps
        drafts[:accepted] and then `next`, drawn from norm(max(0, p - q)) at the first rejected
        position, or from p[:, k] when all k were accepted.
    """
    B, k = drafts.shape
    assert p.shape[:2] == (B, k + 1) and q.shape[:2] == (B, k), (p.shape, q.shape, drafts.shape)
    px = p[:, :k].gather(-1, drafts.unsqueeze(-1)).squeeze(-1)  # (B, k)
    qx = q.gather(-1, drafts.unsqueeze(-1)).squeeze(-1)  # (B, k); > 0, since each draft was drawn from q
    u = torch.rand((B, k), generator=generator, device=p.device, dtype=p.dtype)  # (B, k) in [0, 1)
    ok = u * qx <= px  # accept with probability min(1, p(x) / q(x)), without dividing by q
    accepted = ok.long().cumprod(dim=-1).sum(dim=-1)  # (B,) the leading run of acceptances
    rows = torch.arange(B, device=p.device)
    p_m = p[rows, accepted]  # (B, V)
    q_m = torch.cat([q, torch.zeros_like(q[:, :1])], dim=1)[rows, accepted]  # (B, V); zero for the bonus
    residual = (p_m - q_m).clamp_min(0.0)
    mass = residual.sum(dim=-1, keepdim=True)  # (B, 1)
    # A rejection leaves positive residual mass (p(x) < q(x) means p exceeds q elsewhere); a row
    # whose residual rounds to zero (p == q up to rounding) draws from p, the limit of the rule.
    dist = torch.where(mass > 0, residual / mass.clamp_min(torch.finfo(p.dtype).tiny), p_m)
    nxt = torch.multinomial(dist, num_samples=1, generator=generator).squeeze(-1)  # (B,)
    return accepted, nxt


def _check_args(target: Transformer, draft: Transformer, prompts, max_new_tokens, num_draft) -> None:
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


def speculative_tokens(
    target: Transformer,
    draft: Transformer,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    num_draft: int = 4,
    sampling: SamplingParams = GREEDY,
    stop_tokens: Collection[int] = (),
) -> Generator[SpeculativeStep, None, list[SpeculativeResult]]:
    """Like `speculative_generate`, but yields a `SpeculativeStep` after the prefill and after every
    round (for streaming); its return value is the list of `SpeculativeResult`s. Arguments are
    checked at the call, the work runs as steps are pulled."""
    _check_args(target, draft, prompts, max_new_tokens, num_draft)
    args = target.args
    limits = [min(max_new_tokens, args.max_seq_len - len(p)) for p in prompts]
    total_len = max(len(p) + lim for p, lim in zip(prompts, limits))
    if draft.args.max_seq_len < total_len:
        raise ValueError(
            f"the draft's max_seq_len {draft.args.max_seq_len} is shorter than the {total_len} positions this call "
            "needs; lower max_new_tokens or load the draft with a longer max_seq_len"
        )
    return _loop(target, draft, prompts, limits=limits, total_len=total_len, num_draft=num_draft,
                 sampling=sampling, stop_ids=set(stop_tokens))


@torch.inference_mode()
def _loop(target, draft, prompts, *, limits, total_len, num_draft, sampling, stop_ids):
    device = target.tok_embeddings.weight.device
    B = len(prompts)
    tcache = KVCache(target.args, batch_size=B, max_seq_len=total_len, device=device,
                     dtype=target.tok_embeddings.weight.dtype)
    dcache = KVCache(draft.args, batch_size=B, max_seq_len=total_len, device=device,
                     dtype=draft.tok_embeddings.weight.dtype)
    generator = None if sampling.greedy else sampling.make_generator(device)

    tokens, lengths = pad_prompts(prompts, device=device)  # (B, S), (B,)
    rows = torch.arange(B, device=device)
    first_logits = target.output(prefill(target, tokens, tcache)[rows, lengths - 1]).float()  # (B, V)
    first = sample(first_logits, sampling, generator).tolist()  # (B,)
    prefill(draft, tokens, dcache)

    seqs = [list(p) for p in prompts]  # committed tokens: prompt + new
    new: list[list[int]] = [[] for _ in range(B)]
    finish: list[FinishReason | None] = [None] * B
    stopped_by: list[int | None] = [None] * B
    drafted, accepted, forwards = [0] * B, [0] * B, [1] * B
    step_new: list[list[int]] = [[] for _ in range(B)]

    def commit(i: int, token: int) -> None:
        if token in stop_ids:
            finish[i], stopped_by[i] = "stop", token
            return
        new[i].append(token)
        seqs[i].append(token)
        step_new[i].append(token)
        if len(new[i]) == limits[i]:
            finish[i] = "length"

    def step_event(before: list[FinishReason | None]) -> SpeculativeStep:
        event = SpeculativeStep(tokens=[list(t) for t in step_new],
                                finish_reasons=[f if b is None else None for f, b in zip(finish, before)])
        for t in step_new:
            t.clear()
        return event

    for i, t in enumerate(first):
        commit(i, t)
    yield step_event([None] * B)

    while any(f is None for f in finish):
        before = list(finish)
        active = [i for i in range(B) if finish[i] is None]
        k = min(num_draft, *(limits[i] - len(new[i]) for i in active))  # >= 1 for every active row
        # Row i's last committed token sits at position L - 1 and is in neither cache yet.
        # Finished rows ride along at positions 0..k, writing slots nobody reads again.
        last = [len(s) - 1 if finish[i] is None else 1 for i, s in enumerate(seqs)]
        fill = [s[-2:] if finish[i] is None else [0, 0] for i, s in enumerate(seqs)]

        # Draft: catch up on the last two committed tokens, then propose k tokens one at a time.
        d_pos = torch.tensor([[p - 1, p] for p in last], device=device)  # (B, 2)
        h = draft.hidden(torch.tensor(fill, device=device), pos=d_pos, cache=dcache)  # (B, 2, dim)
        proposal, q = [], []  # k tensors of (B,) and, when sampling, k of (B, V)
        for j in range(k):
            if j:
                pos = torch.tensor(last, device=device) + j
                h = draft.hidden(proposal[-1].view(-1, 1), pos=pos.view(-1, 1), cache=dcache)  # (B, 1, dim)
            logits = draft.output(h[:, -1]).float()  # (B, V)
            if generator is None:
                proposal.append(logits.argmax(-1))
            else:
                q.append(truncated_probs(logits, sampling))
                proposal.append(torch.multinomial(q[-1], num_samples=1, generator=generator).squeeze(-1))
        proposed = torch.stack(proposal, dim=1)  # (B, k)

        # Target: score the last committed token and the k drafts in one forward.
        fed = torch.cat([torch.tensor([f[-1] for f in fill], device=device).view(-1, 1), proposed], dim=1)  # (B, k+1)
        v_pos = torch.tensor(last, device=device).view(-1, 1) + torch.arange(k + 1, device=device)  # (B, k+1)
        t_logits = target.output(target.hidden(fed, pos=v_pos, cache=tcache)).float()  # (B, k+1, V)
        proposed_list = proposed.tolist()
        if generator is None:
            verdict = t_logits.argmax(-1).tolist()  # (B, k+1): y[j] is the target's choice after d[:j]
            n_ok = []
            for i in range(B):
                m = 0
                while m < k and proposed_list[i][m] == verdict[i][m]:
                    m += 1
                n_ok.append(m)
            nxt = [verdict[i][n_ok[i]] for i in range(B)]
        else:
            p = truncated_probs(t_logits.flatten(0, 1), sampling).view(B, k + 1, -1)  # (B, k+1, V)
            n_ok_t, nxt_t = accept_drafts(p, torch.stack(q, dim=1), proposed, generator)
            n_ok, nxt = n_ok_t.tolist(), nxt_t.tolist()

        for i in active:
            m = n_ok[i]
            drafted[i] += k
            accepted[i] += m
            forwards[i] += 1
            for t in (*proposed_list[i][:m], nxt[i]):
                commit(i, t)
                if finish[i] is not None:
                    break
        yield step_event(before)

    return [
        SpeculativeResult(tokens=new[i], finish_reason=finish[i], stop_token=stopped_by[i], drafted=drafted[i],
                          accepted=accepted[i], target_forwards=forwards[i])
        for i in range(B)
    ]


def speculative_generate(
    target: Transformer,
    draft: Transformer,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    num_draft: int = 4,
    sampling: SamplingParams = GREEDY,
    stop_tokens: Collection[int] = (),
) -> list[SpeculativeResult]:
    """Generate with `target`, accelerated by `draft` (same tokenizer, same device).

    num_draft: tokens the draft proposes per round (k). Rounds near a row's length limit
        propose fewer, so no position ever passes prompt + max_new_tokens.
    sampling: GREEDY (the default) gives tokens equal to `generate(target, prompts,
        sampling=GREEDY, ...)`'s; other parameters give tokens distributed as the target's
        sampler with those parameters would draw them (see the module docstring).
    Returns one `SpeculativeResult` per prompt.
    """
    events = speculative_tokens(target, draft, prompts, max_new_tokens=max_new_tokens, num_draft=num_draft,
                                sampling=sampling, stop_tokens=stop_tokens)
    while True:
        try:
            next(events)
        except StopIteration as done:
            return done.value
