"""Turning next-token logits into tokens: temperature, top-k, min-p and Meta's top-p.

Top-p follows Meta's `sample_top_p` exactly: sort descending, drop every token whose
*preceding* mass already exceeds p, renormalise, and draw with `torch.multinomial` over the
sorted order. HF's warper keeps the same set but draws over the unsorted vocabulary, so the
same seed gives different tokens; drawing in sorted order is what makes a seeded herd run
reproduce a seeded Meta run token for token. The price is one sort of the vocabulary per
step (about a millisecond for 128K entries on CPU, small next to a decode forward).

Min-p (vLLM's and HF's rule) keeps the tokens whose probability after temperature is at least
`min_p` times the most likely token's. The cut is relative to the maximum, so it keeps the same
set before or after top-k's renormalisation; top-p is then measured on what min-p kept (vLLM's
order). With min_p unset the code path is exactly Meta's, so seeded draws do not change.

`truncated_probs` exposes the distribution that is actually sampled from (in vocabulary
order), which tests and speculative decoding need.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the next token.

    Defaults are Meta's `generate` defaults (temperature 0.6, top_p 0.9), also the values in
    the HF `generation_config.json` of the Llama 3 instruct models.

    temperature: 0 means greedy (argmax; top_p, top_k and seed are then ignored).
    top_p: keep the smallest set of most likely tokens whose mass reaches top_p (1.0 = all).
    top_k: keep only the k most likely tokens before top-p (None = no limit). When both are
        set, top-p is measured on the renormalised top-k distribution (the HF/vLLM order).
    min_p: keep only tokens with probability >= min_p * (the top token's probability), after
        temperature; applied after top-k and before top-p (None or 0 = off).
    seed: seeds the one torch.Generator used for the whole batch; None draws a fresh seed.
    """

    temperature: float = 0.6
    top_p: float = 0.9
    top_k: int | None = None
    seed: int | None = None
    min_p: float | None = None

    def __post_init__(self) -> None:
        if not self.temperature >= 0:  # also rejects NaN
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 = no nucleus truncation), got {self.top_p}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or self.top_k < 1):
            raise ValueError(f"top_k must be an integer >= 1 or None (no limit), got {self.top_k}")
        if self.min_p is not None and not 0 <= self.min_p <= 1:  # also rejects NaN
            raise ValueError(f"min_p must be in [0, 1] or None (0 and None: no min-p cut), got {self.min_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def make_generator(self, device: torch.device | str) -> torch.Generator:
        gen = torch.Generator(device=device)
        # A fresh Generator has a fixed default seed; without an explicit seed, draw a random one
        # so that two unseeded runs do not silently produce the same text.
        if self.seed is None:
            gen.seed()
        else:
            gen.manual_seed(self.seed)
        return gen


GREEDY = SamplingParams(temperature=0.0, top_p=1.0)


def _sorted_truncated(logits: torch.Tensor, params: SamplingParams) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities after temperature, top-k, min-p and top-p, in descending order, with their token ids.

    Returns (probs, ids), both (B, V) or (B, k) with top-k; probs rows sum to 1.
    """
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)  # (B, V)
    if params.top_k is not None and params.top_k < probs.shape[-1]:
        # topk returns values sorted descending, and is cheaper than a full sort when k << V.
        probs_sort, ids = torch.topk(probs, params.top_k, dim=-1)  # (B, k)
        probs_sort = probs_sort / probs_sort.sum(dim=-1, keepdim=True)
    else:
        probs_sort, ids = torch.sort(probs, dim=-1, descending=True)  # (B, V)
    if params.min_p:
        # Sorted descending: column 0 holds each row's maximum, which itself always survives.
        probs_sort = probs_sort.masked_fill(probs_sort < params.min_p * probs_sort[:, :1], 0.0)
        probs_sort = probs_sort / probs_sort.sum(dim=-1, keepdim=True)
    # Meta's rule: drop token i when the mass strictly before it exceeds p. The top token's
    # preceding mass is 0, so at least one token always survives. Applied even at top_p = 1,
    # as Meta does: rounding in the cumsum can then drop a tail of ~1e-7 mass, and matching
    # that keeps seeded draws identical.
    before = torch.cumsum(probs_sort, dim=-1) - probs_sort
    probs_sort = probs_sort.masked_fill(before > params.top_p, 0.0)
    probs_sort = probs_sort / probs_sort.sum(dim=-1, keepdim=True)
    return probs_sort, ids


def truncated_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution `sample` draws from, in vocabulary order: (B, V) fp32, rows sum to 1.

    Greedy parameters give a one-hot row at the argmax.
    """
    logits = logits.float()
    out = torch.zeros_like(logits)  # (B, V)
    if params.greedy:
        return out.scatter_(-1, logits.argmax(dim=-1, keepdim=True), 1.0)
    probs_sort, ids = _sorted_truncated(logits, params)
    return out.scatter_(-1, ids, probs_sort)


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick one token per row: logits (B, V) -> token ids (B,) int64.

    generator: the source of randomness (see `SamplingParams.make_generator`); it must live on
    the logits' device. Unused when greedy.
    """
    if logits.dim() != 2:
        raise ValueError(f"sample expects logits of shape (batch, vocab), got {tuple(logits.shape)}")
    if params.greedy:
        return logits.argmax(dim=-1)  # (B,)
    probs_sort, ids = _sorted_truncated(logits, params)
    choice = torch.multinomial(probs_sort, num_samples=1, generator=generator)  # (B, 1) index into sorted
    return ids.gather(-1, choice).squeeze(-1)  # (B,)
