"""Learning rate by step and batch shape by tokens seen: pure functions of the run's position.

Llama 3's pretraining recipe (paper §3.4): linear warmup, cosine decay to a floor (8e-5 ->
8e-7), a batch-size and sequence-length ramp by tokens seen (4M tokens at 4,096 -> 8M at 8,192
-> 16M), and an annealing phase whose learning rate falls linearly to zero.

Design trade-off: nothing here has state. The learning rate is a function of the global step
and the stage table, and the batch shape a function of the tokens seen, so a restart only needs
(step, tokens_seen) to land on exactly the same values; there is no scheduler object whose
internal counters could drift from the optimizer's. The cost is that a schedule cannot react to
what happened during training (no "reduce on plateau"), which pretraining does not want anyway.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from herd.train.config import Config


@dataclass(frozen=True)
class StageSpan:
    index: int
    name: str
    start: int  # first global step of the stage
    end: int  # one past its last step
    lr: str  # "cosine" or "linear_to_zero"

    @property
    def steps(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Schedule:
    peak_lr: float
    min_lr: float
    warmup_steps: int
    decay_steps: int
    spans: tuple[StageSpan, ...]

    @classmethod
    def from_config(cls, cfg: Config) -> Schedule:
        spans, start = [], 0
        for i, s in enumerate(cfg.stages):
            spans.append(StageSpan(i, s.name, start, start + s.steps, s.lr))
            start += s.steps
        decay = cfg.schedule.decay_steps
        if decay == 0:  # default: the cosine ends where the last cosine stage ends
            cosine_end = max((sp.end for sp in spans if sp.lr == "cosine"), default=0)
            decay = max(cosine_end - cfg.schedule.warmup_steps, 1)
        return cls(cfg.optim.lr, cfg.schedule.min_lr, cfg.schedule.warmup_steps, decay, tuple(spans))

    @property
    def total_steps(self) -> int:
        return self.spans[-1].end

    def stage_at(self, step: int) -> StageSpan:
        """The stage that step `step` (0-based) belongs to; the last one for step >= total."""
        for span in self.spans:
            if step < span.end:
                return span
        return self.spans[-1]

    def cosine(self, step: int) -> float:
        """Warmup then cosine: step 0 gets peak/warmup, step warmup-1 the peak, then the cosine
        reaches min_lr after `decay_steps` more and stays there."""
        if step < self.warmup_steps:
            return self.peak_lr * (step + 1) / self.warmup_steps
        progress = min((step - self.warmup_steps) / self.decay_steps, 1.0)
        return self.min_lr + (self.peak_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def lr(self, step: int) -> float:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        span = self.stage_at(step)
        if span.lr == "cosine":
            return self.cosine(step)
        assert span.lr == "linear_to_zero", span.lr
        # From wherever the cosine stood when the stage began, down to 0 at the stage's end:
        # the first annealing step uses that value, the last one 1/steps of it.
        return self.cosine(span.start) * max(span.end - step, 0) / span.steps


@dataclass(frozen=True)
class BatchShape:
    batch_tokens: int
    seq_len: int

    @property
    def rows(self) -> int:
        return self.batch_tokens // self.seq_len


def batch_shape(ramp: list[list[int]], tokens_seen: int) -> BatchShape:
    """The last ramp row whose threshold `tokens_seen` has been reached."""
    chosen = ramp[0]
    for row in ramp:
        if row[0] <= tokens_seen:
            chosen = row
    return BatchShape(batch_tokens=chosen[1], seq_len=chosen[2])
