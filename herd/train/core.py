"""The one training step: forward, loss, backward, clipping and the optimizer step, for every layout.

Pretraining (`Trainer`) and every post-training stage (`herd.posttrain.loop.fit`) call
`TrainCore`; what differs between them is only the loss, which is pluggable:

* a token loss `loss(model, batch) -> summed loss over batch.targets` (plain cross-entropy,
  the chunked output head of `train.loss_chunks`, SFT's fused head over assistant tokens). The
  core splits nothing itself: it receives the micro-batches of one step and normalises every
  micro-batch's sum by the target count of the *whole* step before backward, so gradient
  accumulation changes memory and nothing else.
* a closure that returns an already-normalised `StepLoss` (DPO, reward model, distillation:
  losses that are not a sum over target tokens); the core runs its backward.

Layouts differ in one place, `_micro_step`: a single process runs the loss and backward
itself; a `ParallelModel` (FSDP, TP, PP, CP) owns its forward/backward (pipeline schedules
interleave them), takes this rank's data-parallel rows and normalises by the same global count.
The parallel path runs the next-token cross-entropy itself, from the full logits or with the
head in `train.loss_chunks` slices under every layout (`ParallelModel.check_loss_chunks` says
how each one reaches the head). Other token losses (SFT's fused head) run in a single process
only.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ContextManager, Protocol

import torch
from torch import nn

from herd.model.loss import chunked_cross_entropy_sum, cross_entropy_sum
from herd.parallel import ParallelModel, StepLoss
from herd.targets import IGNORE_INDEX

if TYPE_CHECKING:
    from herd.train.anomaly import AnomalyGuard, AnomalyRecord, FaultInjector, Verdict

__all__ = [
    "IGNORE_INDEX", "ChunkedNextTokenLoss", "CoreStep", "StepLoss", "TokenBatch", "TokenLoss", "TrainCore",
    "chunked_cross_entropy_sum", "cross_entropy_sum", "next_token_loss", "token_loss",
]


class MicroBatch(Protocol):  # herd.data.loader.Batch and herd.posttrain.data.Batch both fit
    inputs: torch.Tensor  # (B, S) int64
    targets: torch.Tensor  # (B, S) int64, IGNORE_INDEX = no target
    doc_ids: torch.Tensor | None  # (B, S) int64
    num_targets: int


@dataclass
class TokenBatch:
    """A micro-batch on the model's device, as a token loss sees it."""

    inputs: torch.Tensor  # (B, S)
    targets: torch.Tensor  # (B, S)
    doc_ids: torch.Tensor | None  # (B, S); None: attention may cross documents
    num_targets: int


TokenLoss = Callable[[nn.Module, TokenBatch], torch.Tensor]  # summed loss (fp32) over batch.targets


def next_token_loss(model: nn.Module, batch: TokenBatch) -> torch.Tensor:
    """Summed cross-entropy of the full logits."""
    return cross_entropy_sum(model(batch.inputs, doc_ids=batch.doc_ids), batch.targets)


@dataclass(frozen=True)
class ChunkedNextTokenLoss:
    """Summed cross-entropy with the output head applied in `chunks` slices (see herd.model.loss)."""

    chunks: int

    def __call__(self, model: nn.Module, batch: TokenBatch) -> torch.Tensor:
        hidden = model.hidden(batch.inputs, doc_ids=batch.doc_ids)  # (B, S, dim)
        return chunked_cross_entropy_sum(hidden, model.output.weight, batch.targets, chunks=self.chunks)


def token_loss(loss_chunks: int) -> TokenLoss:
    """The loss `train.loss_chunks` asks for."""
    return next_token_loss if loss_chunks == 1 else ChunkedNextTokenLoss(loss_chunks)


@dataclass
class CoreStep:
    loss: float  # mean over the step's targets (closure losses: as the closure normalised it)
    grad_norm: float  # before clipping
    num_targets: int
    tokens: int  # input tokens read
    metrics: dict[str, float] = field(default_factory=dict)
    anomaly: Verdict | None = None  # set: every rank skipped this update (herd.train.anomaly)
    retried: AnomalyRecord | None = None  # set: the first computation was non-finite, a recomputation was not


class TrainCore:
    """Runs optimizer steps of `model` with `optimizer`.

    parallel: the model's `ParallelModel` in a parallel layout (then `model` is its `.module`).
    loss: the token loss of `step`; with `parallel`, `next_token_loss` or `ChunkedNextTokenLoss`.
    document_mask: pass the batches' doc_ids to the model (attention stays inside documents).
    autocast: a context-manager factory around forward and loss (bf16 autocast on GPU).
    hint: what to advise when the loss is not finite.
    guard: decides, on every rank alike, to skip the update of a step whose loss or gradients went
        wrong (herd.train.anomaly); None: a non-finite loss or gradient norm raises FloatingPointError.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, grad_clip: float,
                 loss: TokenLoss = next_token_loss, parallel: ParallelModel | None = None,
                 device: torch.device | None = None, document_mask: bool = True,
                 autocast: Callable[[], ContextManager[Any]] = contextlib.nullcontext, hint: str = "",
                 guard: AnomalyGuard | None = None):
        self.loss_chunks = 1  # head slices the parallel path runs (the single-process loss chunks itself)
        if parallel is not None:
            if isinstance(loss, ChunkedNextTokenLoss):
                self.loss_chunks = loss.chunks
            elif loss is not next_token_loss:
                raise ValueError(f"the token loss {getattr(loss, '__name__', type(loss).__name__)} runs in a single "
                                 "process only: parallel layouts compute next-token cross-entropy themselves "
                                 "(train.loss_chunks sets how many slices the head runs in)")
            parallel.check_loss_chunks(self.loss_chunks)
        if grad_clip < 0:
            raise ValueError(f"optim.grad_clip must be >= 0 (0 disables clipping), got {grad_clip}")
        self.model, self.optimizer, self.loss, self.parallel = model, optimizer, loss, parallel
        self.grad_clip, self.document_mask, self.autocast, self.hint = grad_clip, document_mask, autocast, hint
        self.guard = guard
        self.injector: FaultInjector | None = None  # tests and benchmarks only (FaultInjector.install)
        self.params = [p for p in model.parameters() if p.requires_grad]  # frozen ones (a LoRA base) have no grad
        if not self.params:
            raise ValueError("no trainable parameters: everything is frozen")
        self.device = device if device is not None else self.params[0].device

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    # ---- forward + backward ------------------------------------------------------------------

    def forward_backward(self, micro_batches: Sequence[MicroBatch], *, step: int = 0) -> StepLoss:
        """Accumulate the gradient of (summed loss / targets of the whole step) over the micro-batches."""
        num_targets = sum(b.num_targets for b in micro_batches)
        if num_targets == 0:
            raise ValueError(f"step {step}: the batch has no target tokens (all {IGNORE_INDEX}); check the data")
        total = torch.zeros((), device=self.device)
        for batch in micro_batches:
            total += self._micro_step(batch, num_targets)
        return StepLoss(total / num_targets, num_targets=num_targets,
                        tokens=sum(b.inputs.numel() for b in micro_batches))

    def _micro_step(self, batch: MicroBatch, num_targets: int) -> torch.Tensor:
        """Forward and backward of one micro-batch; returns its summed loss (over all ranks), detached."""
        doc_ids = batch.doc_ids if self.document_mask else None
        inputs = batch.inputs.to(self.device, non_blocking=True)
        targets = batch.targets.to(self.device, non_blocking=True)
        doc_ids = doc_ids.to(self.device, non_blocking=True) if doc_ids is not None else None
        if self.parallel is not None:
            # Every rank reads the whole global batch (so a checkpoint's data position does not
            # depend on the layout) and keeps its data-parallel rows; num_targets is global.
            pm = self.parallel
            inputs, targets, doc_ids = pm.dp_rows(inputs), pm.dp_rows(targets), pm.dp_rows(doc_ids)
            with self.autocast():
                result = pm.forward_backward(inputs, targets, doc_ids=doc_ids, num_targets=num_targets,
                                             loss_chunks=self.loss_chunks)
            return result.loss * num_targets
        with self.autocast():
            loss = self.loss(self.model, TokenBatch(inputs, targets, doc_ids, batch.num_targets))
        (loss / num_targets).backward()  # gradients accumulate as the mean over the whole step
        return loss.detach()

    # ---- the update ----------------------------------------------------------------------------

    def step(self, micro_batches: Sequence[MicroBatch], *, lr: float, step: int = 0) -> CoreStep:
        """One optimizer step of the token loss over `micro_batches` (gradient accumulation).

        A non-finite loss or gradient is recomputed from the same micro-batches, weights and RNG
        state up to `guard.cfg.retry_nonfinite` times (herd.train.anomaly): a finite recomputation
        is the step, exactly as if the fault had never happened."""
        self.set_lr(lr)
        retries = self.guard.cfg.retry_nonfinite if self.guard is not None else 0
        rng = _rng_state() if retries else None
        result = self._update(self.forward_backward(micro_batches, step=step), step, retry=retries > 0)
        first = result.anomaly.record if result.anomaly is not None and result.anomaly.retry else None
        for attempt in range(1, retries + 1):
            if result.anomaly is None or not result.anomaly.retry:
                break
            _set_rng_state(rng)  # dropout and any other randomness draw what the first computation drew
            result = self._update(self.forward_backward(micro_batches, step=step), step, retry=attempt < retries)
        if first is not None and result.anomaly is None:
            result.retried = self.guard.transient(first)
        return result

    def step_closure(self, closure: Callable[[], StepLoss], *, lr: float, step: int = 0) -> CoreStep:
        """One optimizer step of a loss `closure()` computes and normalises itself (single process)."""
        if self.parallel is not None:
            raise ValueError("closure losses run in a single process; parallel layouts train the token loss")
        self.set_lr(lr)
        out = closure()
        out.loss.backward()
        return self._update(StepLoss(out.loss.detach(), num_targets=out.num_targets, tokens=out.tokens,
                                     metrics=out.metrics), step)

    def _update(self, out: StepLoss, step: int, *, retry: bool = False) -> CoreStep:
        if self.injector is not None:
            out.loss = self.injector.apply(step, self.params, out.loss)
        max_norm = self.grad_clip if self.grad_clip > 0 else math.inf  # inf: measure the norm, scale by 1
        if self.parallel is not None:  # the norm over every shard and pipeline stage
            grad_norm = self.parallel.clip_grad_norm_(max_norm)
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm, foreach=True)
        loss, norm = out.loss.item(), grad_norm.item()
        result = CoreStep(loss=loss, grad_norm=norm, num_targets=out.num_targets, tokens=out.tokens,
                          metrics=out.metrics)
        # Checked before the update, so the weights stay those of the last good step.
        if self.guard is not None:
            result.anomaly = self.guard.check(step=step, loss=loss, grad_norm=norm, retry=retry)
        elif not (math.isfinite(loss) and math.isfinite(norm)):
            self.optimizer.zero_grad(set_to_none=True)
            what = f"loss became {loss}" if not math.isfinite(loss) else f"gradient norm became {norm}"
            raise FloatingPointError(f"{what} at step {step}; {self.hint or 'lower optim.lr'}")
        if result.anomaly is None:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return result


def _rng_state() -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    return torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None


def _set_rng_state(state: tuple[torch.Tensor, list[torch.Tensor] | None]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])
