"""From logits to tokens and logprobs, for the engine: picking each row's token, the logprobs of
the picked tokens, and prompt logprobs from a prefill's hidden states.

Split from `engine.py`, which keeps the scheduling. Prompt positions are scored once per prefill
chunk (chunked prefill scores a long prompt piece by piece), and the output head runs over a
bounded number of positions at a time so that the (S, V) logits of a long prompt never exist at
once.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from herd.generate import sample
from herd.serve.requests import PromptLogprob, Request

PROMPT_LOGPROB_CHUNK = 256  # prompt positions per output-head matmul: (256, V) fp32 is 128 MB at V = 128K


def head_spans(n: int) -> list[tuple[int, int]]:
    """The [a, b) ranges of positions that `score_positions` runs the output head over, in order
    (tensor-parallel followers run the head, a collective, over the same ranges)."""
    return [(a, min(a + PROMPT_LOGPROB_CHUNK, n)) for a in range(0, n, PROMPT_LOGPROB_CHUNK)]


def scored_positions(prompt_len: int, start: int, c: int) -> int:
    """How many positions of a prefill chunk start..start+c-1 `score_chunk` scores (the last prompt
    position predicts a new token, not a prompt one)."""
    return max(0, min(c, prompt_len - 1 - start))


def score_positions(head: torch.nn.Module, h: torch.Tensor, targets: torch.Tensor, k: int) -> list[PromptLogprob]:
    """h (n, dim): final-normed hidden states; targets (n,): the token each position predicts.
    Returns one PromptLogprob per position, with the k most likely alternatives when k > 0."""
    out: list[PromptLogprob] = []
    for a, b in head_spans(len(targets)):
        lsm = torch.log_softmax(head(h[a:b]).float(), dim=-1)  # (b - a, V)
        picked = lsm.gather(-1, targets[a:b].view(-1, 1)).squeeze(-1).tolist()
        if k:
            top = torch.topk(lsm, k, dim=-1)
            alts = [list(zip(i, v)) for i, v in zip(top.indices.tolist(), top.values.tolist())]
        else:
            alts = [None] * (b - a)
        out.extend(PromptLogprob(lp, alt) for lp, alt in zip(picked, alts))
    return out



def score_chunk(head: torch.nn.Module, prompt: Sequence[int], start: int, h: torch.Tensor, k: int,
                acc: list[PromptLogprob] | None) -> list[PromptLogprob]:
    """`acc` extended with the prompt logprobs of a prefill chunk: h (c, dim) holds the hidden
    states of positions start..start+c-1. The first prompt token has no context (None)."""
    acc = [PromptLogprob(None, None)] if acc is None else acc
    n = scored_positions(len(prompt), start, len(h))
    if n > 0:
        targets = torch.tensor(list(prompt[start + 1 : start + 1 + n]), dtype=torch.long, device=h.device)
        acc += score_positions(head, h[:n], targets, k)
    return acc


def pick_tokens(logits: torch.Tensor, requests: Sequence[Request], generators: Sequence[torch.Generator | None]) -> list[int]:
    """One token per row of logits (R, V): argmax for greedy requests (one batched argmax), else a
    draw from that row's own generator under its request's sampling parameters."""
    greedy = [i for i, r in enumerate(requests) if r.sampling.greedy]
    chosen: list[int] = [0] * len(requests)
    if greedy:
        picks = logits[greedy].argmax(dim=-1).tolist() if len(greedy) < len(requests) else logits.argmax(-1).tolist()
        for i, t in zip(greedy, picks):
            chosen[i] = t
    for i, (r, g) in enumerate(zip(requests, generators)):
        if g is not None:
            chosen[i] = int(sample(logits[i : i + 1], r.sampling, g))
    return chosen


def token_logprobs(raw: torch.Tensor, requests: Sequence[Request], chosen: Sequence[int]
                   ) -> dict[int, tuple[float, list[tuple[int, float]] | None]]:
    """For the rows whose request asked for logprobs: log p(chosen token) under the raw model logits
    (R, V), and the request's top_logprobs alternatives."""
    want = [i for i, r in enumerate(requests) if r.logprobs or r.top_logprobs]
    out: dict[int, tuple[float, list[tuple[int, float]] | None]] = {}
    if not want:
        return out
    lsm = torch.log_softmax(raw[want].float(), dim=-1)  # (R', V)
    picked = lsm.gather(-1, torch.tensor([chosen[i] for i in want], device=lsm.device).view(-1, 1))
    k = max(requests[i].top_logprobs for i in want)
    top = torch.topk(lsm, k, dim=-1) if k else None
    for j, i in enumerate(want):
        kk = requests[i].top_logprobs
        alts = list(zip(top.indices[j, :kk].tolist(), top.values[j, :kk].tolist())) if kk else None
        out[i] = (float(picked[j]), alts)
    return out


def match_stop(tail: bytearray, new: bytes, stops: Sequence[str], stop_bytes: Sequence[bytes]) -> str | None:
    """Append a token's bytes to a choice's `tail` and return the stop string that now ends in them
    (the earliest-starting one), if any; `tail` keeps only the bytes a later match could need."""
    tail += new
    found, best = None, len(tail)
    for stop, b in zip(stops, stop_bytes):
        # Only matches that end inside the new bytes are new.
        at = tail.find(b, max(0, len(tail) - len(new) - len(b) + 1))
        if 0 <= at < best:
            found, best = stop, at
    longest = max(map(len, stop_bytes))
    del tail[: max(0, len(tail) - (longest - 1))]
    return found
