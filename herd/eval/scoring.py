"""Log-likelihood of continuations given contexts: the one primitive behind multiple choice,
needle scoring and the lm-eval adapter.

Design trade-off: requests are scored in padded batches through `model.hidden`, and the output
head is applied only at the positions that predict a continuation token. Full (B, S, V) logits
would cost B * S * 128K * 4 bytes (4 GiB for 16 x 512 with Llama 3's vocabulary) to read a
handful of entries; gathering the hidden states first makes the head cost proportional to the
continuation length. Right padding is harmless because attention is causal: a position never
sees the pad slots after it.

Requests are sorted by length (longest first) before batching so that padding is small and an
out-of-memory error, if any, happens on the first batch rather than after minutes of work.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from herd.model.llama import Transformer


@dataclass(frozen=True)
class ContinuationScore:
    """How a model scores one continuation after its context.

    logprob: sum over continuation tokens of log p(token | everything before it).
    is_greedy: every continuation token is the model's argmax at its position (greedy
        decoding from the context would produce exactly this continuation).
    num_tokens: continuation length in tokens.
    """

    logprob: float
    is_greedy: bool
    num_tokens: int


def _check_request(i: int, context: Sequence[int], continuation: Sequence[int], *, max_len: int) -> None:
    if len(context) == 0:
        raise ValueError(
            f"request {i} has an empty context; prepend a prefix token (usually BOS) so the first "
            "continuation token has something to be predicted from"
        )
    if len(continuation) == 0:
        raise ValueError(f"request {i} has an empty continuation; there is nothing to score")
    if len(continuation) > max_len:
        raise ValueError(
            f"request {i} has a {len(continuation)}-token continuation but the model reads at most "
            f"{max_len} tokens at once; score it in pieces (see rolling_loglikelihood)"
        )


@torch.inference_mode()
def score_continuations(
    model: Transformer,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    batch_size: int = 16,
    max_len: int | None = None,
) -> list[ContinuationScore]:
    """Score each (context tokens, continuation tokens) pair; results in request order.

    A pair longer than the model's context is cut from the left (the oldest context tokens go
    first), as lm-eval does; `max_len` (default `model.args.max_seq_len`) is the number of
    tokens one forward may read.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    max_len = model.args.max_seq_len if max_len is None else max_len
    if not 1 <= max_len <= model.args.max_seq_len:
        raise ValueError(f"max_len must be in 1..{model.args.max_seq_len} (the model's context), got {max_len}")
    vocab = model.args.vocab_size
    rows: list[tuple[list[int], int]] = []  # (tokens fed + the last target, continuation length)
    for i, (context, continuation) in enumerate(requests):
        _check_request(i, context, continuation, max_len=max_len)
        full = [*context, *continuation]
        lo, hi = min(full), max(full)
        if lo < 0 or hi >= vocab:
            raise ValueError(f"request {i} has token ids outside the vocabulary 0..{vocab - 1} (min {lo}, max {hi})")
        # Input is full[:-1]: keep at most max_len + 1 tokens so the input fits.
        rows.append((full[-(max_len + 1):], len(continuation)))

    device = model.tok_embeddings.weight.device
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    out: list[ContinuationScore | None] = [None] * len(rows)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        S = len(rows[idx[0]][0]) - 1  # longest input in this batch (sorted descending)
        tokens = torch.zeros(len(idx), S, dtype=torch.long)  # (B, S), right-padded with id 0
        sel_row, sel_pos, targets = [], [], []
        for b, i in enumerate(idx):
            full, n_cont = rows[i]
            tokens[b, : len(full) - 1] = torch.tensor(full[:-1], dtype=torch.long)
            first = len(full) - 1 - n_cont  # input position that predicts the first continuation token
            sel_row += [b] * n_cont
            sel_pos += range(first, first + n_cont)
            targets += full[-n_cont:]
        h = model.hidden(tokens.to(device))  # (B, S, dim)
        picked = h[torch.tensor(sel_row, device=device), torch.tensor(sel_pos, device=device)]  # (T, dim)
        logits = model.output(picked).float()  # (T, V): only the scored positions
        tgt = torch.tensor(targets, device=device)
        logprobs = logits.gather(-1, tgt.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)  # (T,)
        greedy = logits.argmax(dim=-1) == tgt  # (T,)
        offset = 0
        for i in idx:
            n = rows[i][1]
            out[i] = ContinuationScore(
                logprob=float(logprobs[offset : offset + n].sum()),
                is_greedy=bool(greedy[offset : offset + n].all()),
                num_tokens=n,
            )
            offset += n
    assert all(s is not None for s in out)
    return out  # type: ignore[return-value]


def rolling_windows(tokens: Sequence[int], *, prefix_token: int, max_len: int) -> list[tuple[list[int], list[int]]]:
    """Split a document into (context, continuation) windows that predict every token once.

    The first window reads `prefix_token` then tokens[:max_len - 1]; each later window predicts
    the next `max_len` tokens, and the last one is given as much preceding context as fits
    (lm-eval's `loglikelihood_rolling` convention, so its perplexities are comparable).
    """
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    seq = [prefix_token, *tokens]
    windows = []
    for a in range(1, len(seq), max_len):
        b = min(a + max_len, len(seq))
        start = max(0, b - 1 - max_len)
        windows.append((seq[start:a], seq[a:b]))
    return windows


def rolling_loglikelihood(
    model: Transformer,
    documents: Sequence[Sequence[int]],
    *,
    prefix_token: int,
    batch_size: int = 16,
    max_len: int | None = None,
) -> list[float]:
    """Total log-likelihood of each whole document (conditioned on `prefix_token`), in windows."""
    max_len = model.args.max_seq_len if max_len is None else max_len
    requests, owner = [], []
    for d, doc in enumerate(documents):
        for window in rolling_windows(doc, prefix_token=prefix_token, max_len=max_len):
            requests.append(window)
            owner.append(d)
    totals = [0.0] * len(documents)
    for d, score in zip(owner, score_continuations(model, requests, batch_size=batch_size, max_len=max_len)):
        totals[d] += score.logprob
    return totals
