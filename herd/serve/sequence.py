"""One running choice of a request in the serving engine: its slot, position, blocks and state.

Shared by the engine (`herd.serve.engine`) and its speculative decode step
(`herd.serve.speculative`), which both advance sequences.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from herd.generate.processors import LogitsProcessor
from herd.serve.requests import PromptLogprob, RequestHandle

# A sequence's state. Keys/values exist for positions < pos in its row, always.
PREFILL = "prefill"  # prompt[pos:] is still to be prefilled (choice 0 of its request)
FORK = "fork"  # choices 1..n-1, waiting for choice 0's prompt: they start from a copy of it
DECODE = "decode"  # `pending` is fed at `pos` in the next decode step
PAUSED = "paused"  # a decoding sequence that gave its blocks back (none were free); its row is intact


@dataclass
class Seq:
    """One running choice in one slot."""

    handle: RequestHandle
    index: int
    slot: int
    limit: int  # new tokens allowed
    generator: torch.Generator | None
    pending: int = 0  # the last sampled token, fed at the next decode step...
    pos: int = 0  # ...at this position
    count: int = 0  # tokens generated
    tail: bytearray = field(default_factory=bytearray)  # recent output bytes, for stop strings
    stop_bytes: tuple[bytes, ...] = ()  # the request's stop strings in UTF-8, encoded once
    processors: list[LogitsProcessor] = field(default_factory=list)  # this choice's own, stateful
    generated: list[int] = field(default_factory=list)  # tokens delivered so far
    last_token_at: float | None = None  # engine clock at the previous token, for inter-token latency
    prompt_lps: list[PromptLogprob] | None = None  # prompt logprobs so far, chunk by chunk
    order: int = 0  # admission order: the youngest sequence is paused first
    state: str = DECODE
    blocks: list[int] = field(default_factory=list)  # block table: positions [i*bs, (i+1)*bs) live in blocks[i]
    names: list[bytes] = field(default_factory=list)  # chained names of its full blocks named so far
    forks: list[Seq] = field(default_factory=list)  # choice 0 of n > 1: the choices waiting for its prompt

    def token_at(self, position: int) -> int:
        """The committed token id at `position` (prompt, then generated tokens)."""
        prompt = self.handle.request.prompt
        return prompt[position] if position < len(prompt) else self.generated[position - len(prompt)]
