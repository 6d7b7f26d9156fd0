"""Per-choice logits processors: the one hook between the model's logits and the sampler.

A processor rewrites one choice's next-token logits before the token is picked: penalties,
`logit_bias`, grammar masks for structured output. It is built fresh for every choice (it
may keep state, e.g. a grammar matcher), so requests carry *factories*, not processors.

Contract, as the serving engine calls it at every step of a choice:
* `processor(logits, generated)` gets that choice's logits as a (V,) fp32 tensor that it may
  modify in place, and the token ids the choice has produced so far (a list the caller owns;
  do not keep it). It returns the logits to use (the same tensor or a new one). A row with
  every logit at -inf is an error of the processor, not of the model.
* After the token is picked, `processor.accept(token)` is called when the processor has an
  `accept` method (a grammar matcher advances its state there). Tokens that end the choice
  (a stop token) are passed too.
* Reported logprobs stay those of the raw model logits (as OpenAI and vLLM report them).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class LogitsProcessor(Protocol):
    def __call__(self, logits: torch.Tensor, generated: Sequence[int]) -> torch.Tensor: ...


ProcessorFactory = Callable[[], LogitsProcessor]


def apply_processors(processors: Sequence[LogitsProcessor], logits: torch.Tensor, generated: Sequence[int]) -> torch.Tensor:
    """Run `processors` in order over one (V,) row of logits."""
    for p in processors:
        logits = p(logits, generated)
    return logits


def accept_token(processors: Sequence[LogitsProcessor], token: int) -> None:
    """Tell every stateful processor which token was picked."""
    for p in processors:
        accept = getattr(p, "accept", None)
        if accept is not None:
            accept(token)
