"""The optimisation loop every post-training stage shares: AdamW, warmup + cosine, clipping, logging.

Each stage supplies only its loss: `TokenSteps` (batches + a summed token loss, SFT) or
`loss_fn(step) -> StepLoss` (DPO, reward model, distillation). The step itself (backward,
clipping, the optimizer) is `herd.train.core`'s, the pretraining trainer's; the loop adds the
schedule, timing and the log line. The parameter groups (no decay on norms
and embeddings) and the warmup-cosine schedule are the pretraining trainer's own
(`herd.train.optim`, `herd.train.schedule`), so both phases follow one rule.

Trade-off: post-training runs are short (hundreds of steps) and single-process here, so this
stays a plain loop without the trainer's DCP checkpoints and resume; a run that is cut off is
rerun.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from herd.posttrain.config import FinetuneOptimConfig, StartModelConfig
from herd.train.core import MicroBatch, StepLoss, TokenLoss, TrainCore
from herd.train.optim import param_groups
from herd.train.schedule import Schedule, StageSpan

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TokenSteps:
    """A token loss for `fit`: `batches(step)` gives the step's micro-batches, `loss(model, batch)` the
    summed loss of one, and the core divides by the step's target count (SFT's assistant tokens)."""

    batches: Callable[[int], Sequence[MicroBatch]]
    loss: TokenLoss


@dataclass
class FitResult:
    steps: int
    losses: list[float]
    metrics: list[dict[str, float]]
    seconds: float
    tokens: int

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def schedule_for(cfg: FinetuneOptimConfig, name: str = "posttrain") -> Schedule:
    """The trainer's warmup + cosine as one stage: cfg.lr after warmup, cfg.lr * min_lr_ratio at the last step."""
    return Schedule(peak_lr=cfg.lr, min_lr=cfg.lr * cfg.min_lr_ratio, warmup_steps=cfg.warmup_steps,
                    decay_steps=max(cfg.steps - cfg.warmup_steps - 1, 1),
                    spans=(StageSpan(0, name, 0, max(cfg.steps, 1), "cosine"),))


def check_optim(cfg: FinetuneOptimConfig) -> None:
    cfg.validate()  # also at config load; again here for configs built in Python


def fit(
    model: nn.Module,
    loss_fn: Callable[[int], StepLoss] | TokenSteps,
    cfg: FinetuneOptimConfig,
    *,
    log_every: int = 10,
    log: Callable[[str], None] | None = print,
    name: str = "train",
    max_seconds: float | None = None,
) -> FitResult:
    """Run cfg.steps optimizer steps over the trainable parameters of `model` (frozen ones, e.g. a
    LoRA base, are left out); stops early once `max_seconds` have passed.

    loss_fn: `TokenSteps` for a loss summed over target tokens, else `loss_fn(step) -> StepLoss`
    with the loss already normalised (DPO, reward model, distillation). Either way the step
    itself is `herd.train.core.TrainCore`'s, the pretraining trainer's.
    """
    check_optim(cfg)
    groups = [g for g in param_groups(model, cfg.weight_decay) if g["params"]]
    if not groups:
        raise ValueError("no trainable parameters: everything is frozen")
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, foreach=True)
    core = TrainCore(model, opt, grad_clip=cfg.grad_clip, hint=f"{name}: lower optim.lr",
                     **({"loss": loss_fn.loss} if isinstance(loss_fn, TokenSteps) else {}))
    schedule = schedule_for(cfg, name)
    losses, metrics, tokens = [], [], 0
    start = time.perf_counter()
    for step in range(cfg.steps):
        lr = schedule.lr(step)
        if isinstance(loss_fn, TokenSteps):
            out = core.step(loss_fn.batches(step), lr=lr, step=step)
        else:
            out = core.step_closure(lambda: loss_fn(step), lr=lr, step=step)
        losses.append(out.loss)
        metrics.append(out.metrics)
        tokens += out.tokens
        elapsed = time.perf_counter() - start
        if log is not None and (step % log_every == 0 or step == cfg.steps - 1):
            extra = "".join(f"  {k} {v:.3f}" for k, v in out.metrics.items())
            log(f"{name} step {step + 1:>4}/{cfg.steps}  loss {losses[-1]:.4f}{extra}  lr {lr:.2e}  "
                f"{tokens / max(elapsed, 1e-9):,.0f} tok/s")
        if max_seconds is not None and elapsed > max_seconds:
            if log is not None:
                log(f"{name}: stopping after {step + 1} steps ({elapsed:.0f} s budget reached)")
            break
    return FitResult(len(losses), losses, metrics, time.perf_counter() - start, tokens)


def load_for_training(cfg: StartModelConfig):
    """The checkpoint of a StartModelConfig in the requested dtype, in train mode, with its tokenizer and
    chat format (`LoadedModel`: `.model`, `.tokenizer`, `.chat`)."""
    from herd.generate.loading import load_for_inference

    if not cfg.path:
        raise ValueError("model.path is empty: give the checkpoint directory (or .gguf file) to start from")
    if cfg.dtype not in _DTYPES:
        raise ValueError(f"model.dtype must be one of {', '.join(_DTYPES)}, got {cfg.dtype!r}")
    return load_for_inference(cfg.path, tokenizer=cfg.tokenizer or None, dtype=_DTYPES[cfg.dtype], device=cfg.device,
                              train=True)
