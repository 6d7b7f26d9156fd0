"""The OpenAI and vLLM sampling penalties as logits processors (`herd.generate.processors`).

* `LogitBias` (OpenAI `logit_bias`): add a fixed bias to chosen token ids.
* `RepetitionPenalty` (CTRL, Keskar et al. 2019, as HF and vLLM implement it): every token seen
  in the prompt or the output so far has its logit divided by `penalty` when positive and
  multiplied by it when negative, so `penalty > 1` always makes a repeat less likely.
* `FrequencyPresencePenalty` (OpenAI): `logit[j] -= count[j] * frequency + (count[j] > 0) * presence`,
  where `count` counts token j in this choice's *generated* tokens only (not the prompt).

`penalty_factories` builds them in vLLM's order (bias, then repetition, then frequency and
presence) as per-choice factories for `Request.logits_processors`. Each processor folds the
newly generated tokens into its own count or mask tensor, so a step costs O(new tokens) plus one
vectorised update of the (V,) row, not a pass over the whole history.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from herd.generate.processors import ProcessorFactory


class LogitBias:
    """`logits[id] += bias` for every (id, bias) given."""

    def __init__(self, ids: torch.Tensor, values: torch.Tensor):
        self.ids, self.values = ids, values  # (N,) int64, (N,) fp32

    def __call__(self, logits: torch.Tensor, generated: Sequence[int]) -> torch.Tensor:
        if self.ids.device != logits.device:
            self.ids, self.values = self.ids.to(logits.device), self.values.to(logits.device)
        return logits.index_add_(0, self.ids, self.values.to(logits.dtype))


class RepetitionPenalty:
    """CTRL's rule over the prompt and the generated tokens: divide positive logits, multiply negative ones."""

    def __init__(self, penalty: float, prompt: torch.Tensor):
        self.penalty = penalty
        self._prompt = prompt  # (S,) int64 ids, shared by every choice of a request
        self._seen: torch.Tensor | None = None  # (V,) bool, built on the first call
        self._folded = 0  # how many generated tokens are in _seen

    def __call__(self, logits: torch.Tensor, generated: Sequence[int]) -> torch.Tensor:
        if self._seen is None:
            self._seen = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
            self._seen[self._prompt.to(logits.device)] = True
        if len(generated) > self._folded:
            self._seen[torch.tensor(generated[self._folded :], device=logits.device)] = True
            self._folded = len(generated)
        penalised = torch.where(logits > 0, logits / self.penalty, logits * self.penalty)
        return torch.where(self._seen, penalised, logits)


class FrequencyPresencePenalty:
    """OpenAI's frequency and presence penalties over this choice's generated tokens."""

    def __init__(self, frequency: float, presence: float):
        self.frequency, self.presence = frequency, presence
        self._counts: torch.Tensor | None = None  # (V,) fp32
        self._folded = 0

    def __call__(self, logits: torch.Tensor, generated: Sequence[int]) -> torch.Tensor:
        if self._counts is None:
            self._counts = torch.zeros(logits.shape[-1], dtype=torch.float32, device=logits.device)
        if len(generated) > self._folded:
            new = torch.tensor(generated[self._folded :], device=logits.device)
            self._counts.index_add_(0, new, torch.ones(len(new), device=logits.device))
            self._folded = len(generated)
        penalty = self._counts * self.frequency + (self._counts > 0).float() * self.presence
        return logits.sub_(penalty.to(logits.dtype))


@dataclass(frozen=True)
class Penalties:
    """The penalty settings of one request; the neutral values mean "off".

    frequency, presence: OpenAI's, in [-2, 2]. repetition: CTRL's, > 0 (1 = off).
    logit_bias: token id -> bias in [-100, 100].
    """

    frequency: float = 0.0
    presence: float = 0.0
    repetition: float = 1.0
    logit_bias: Mapping[int, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, value in (("frequency", self.frequency), ("presence", self.presence)):
            if not -2 <= value <= 2:
                raise ValueError(f"the {name} penalty must be in [-2, 2], got {value}")
        if not 0 < self.repetition < float("inf"):
            raise ValueError(f"the repetition penalty must be a finite number > 0 (1 = off), got {self.repetition}")
        for token, bias in self.logit_bias.items():
            if isinstance(token, bool) or not isinstance(token, int) or token < 0:
                raise ValueError(f"logit_bias keys must be token ids (integers >= 0), got {token!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {bias} for token {token}")

    @property
    def active(self) -> bool:
        return bool(self.frequency or self.presence or self.repetition != 1.0 or self.logit_bias)

    def factories(self, prompt: Sequence[int]) -> list[ProcessorFactory]:
        """One factory per active penalty, in vLLM's order: bias, repetition, frequency/presence."""
        out: list[ProcessorFactory] = []
        if self.logit_bias:
            ids = torch.tensor(list(self.logit_bias), dtype=torch.long)
            values = torch.tensor(list(self.logit_bias.values()), dtype=torch.float32)
            out.append(lambda: LogitBias(ids, values))
        if self.repetition != 1.0:
            prompt_ids = torch.tensor(list(prompt), dtype=torch.long)
            out.append(lambda: RepetitionPenalty(self.repetition, prompt_ids))
        if self.frequency or self.presence:
            out.append(lambda: FrequencyPresencePenalty(self.frequency, self.presence))
        return out


NO_PENALTIES = Penalties()
