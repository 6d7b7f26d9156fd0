"""Logit distillation: a student matches a teacher's next-token distribution (same tokenizer).

loss = alpha * T^2 * KL(p_teacher^T || p_student^T) + (1 - alpha) * CE(student, data)

averaged over the positions that have a target, with p^T = softmax(logits / T). The T^2 factor
(Hinton et al. 2015) keeps the KL gradient's scale independent of the temperature, so alpha
means the same at every T. Forward KL (teacher first) is mode-covering: the student is
penalised wherever the teacher puts mass, which is what recovering a pruned model needs.

Top-k caching: with `top_k > 0` the teacher runs once over the data and only its k most likely
ids per position are written to disk with their log-probabilities at T, normalised over the full
vocabulary (k * 8 bytes per token instead of vocab * 4). The KL is then taken over the partition
{each of the k ids, everything else}: p_rest = 1 - sum of the k teacher probabilities, and the
student's q_rest is its full-softmax mass outside those ids. By the data-processing inequality this
is a lower bound of the full KL, zero when student == teacher and exact when k = V; it keeps the
student's mass outside the teacher's top-k calibrated (renormalising the teacher over its k ids
instead is not a divergence and rewards piling mass onto them), but it cannot say how the teacher
spreads its tail. The cache holds probabilities at one temperature, so it is tied to it. The
trade-off buys not keeping the teacher in memory, or running it, during student training.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from herd.model import Transformer, load_model
from herd.model.loss import cross_entropy_sum
from herd.posttrain.config import DistillConfig, FinetuneOptimConfig
from herd.posttrain.data import IndexBatches, read_chat_jsonl
from herd.io import atomic_write_json
from herd.posttrain.io import save_checkpoint, save_tensors, tokenizer_file
from herd.posttrain.loop import FitResult, StepLoss, fit, load_for_training
from herd.targets import IGNORE_INDEX
from herd.tokenizer import ChatFormat


@dataclass
class KDLoss:
    loss: torch.Tensor
    kl: torch.Tensor  # T^2 * KL, mean over target positions
    ce: torch.Tensor  # cross-entropy with the data at T = 1, mean over target positions


def _check(temperature: float, alpha: float) -> None:
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")


def _mix(kl_per_pos: torch.Tensor, student_logits: torch.Tensor, targets: torch.Tensor, *, temperature: float,
         alpha: float) -> KDLoss:
    valid = targets != IGNORE_INDEX
    n = valid.sum().clamp_min(1)
    kl = (kl_per_pos * valid).sum() / n * temperature**2
    ce = cross_entropy_sum(student_logits, targets) / n
    return KDLoss(alpha * kl + (1 - alpha) * ce, kl, ce)


def kd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor, *,
    temperature: float = 1.0, alpha: float = 0.5,
) -> KDLoss:
    """Forward KL at `temperature` mixed with cross-entropy. logits (..., V), targets (...) with -100 = skip."""
    _check(temperature, alpha)
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits.float().detach() / temperature, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)  # (...)
    return _mix(kl, student_logits, targets, temperature=temperature, alpha=alpha)


def kd_loss_topk(
    student_logits: torch.Tensor, topk_logprobs: torch.Tensor, topk_indices: torch.Tensor, targets: torch.Tensor, *,
    temperature: float = 1.0, alpha: float = 0.5,
) -> KDLoss:
    """`kd_loss` with the teacher given at its top-k ids (..., k) as log-probabilities at `temperature`
    normalised over the full vocabulary (`TeacherTopK.logprobs`); the KL is over the k ids plus one
    bucket for the rest of the vocabulary (module docstring)."""
    _check(temperature, alpha)
    k, vocab = topk_indices.shape[-1], student_logits.shape[-1]
    if topk_logprobs.shape != topk_indices.shape or not 1 <= k <= vocab:
        raise ValueError(f"teacher top-k log-probs {tuple(topk_logprobs.shape)} and ids {tuple(topk_indices.shape)} "
                         f"must have the same shape with 1 <= k <= vocabulary ({vocab})")
    idx = topk_indices.long()
    log_q_all = F.log_softmax(student_logits.float() / temperature, dim=-1)  # (..., V)
    log_q = log_q_all.gather(-1, idx)  # (..., k)
    log_p = topk_logprobs.float().detach()
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)  # (...)
    if k < vocab:  # with k = V the rest bucket is empty (and its log-mass -inf): nothing to add
        # 1 - sum in fp32 is off by ~k * 1e-7 at most; clamped so rounding never makes a mass negative.
        p_rest = (1 - log_p.exp().sum(-1)).clamp_min(0)  # (...)
        # The student's rest mass from its own logits, not 1 - sum: stable when q_rest is tiny.
        log_q_rest = log_q_all.scatter(-1, idx, float("-inf")).logsumexp(-1)  # (...)
        kl = kl + torch.special.xlogy(p_rest, p_rest) - p_rest * log_q_rest
    return _mix(kl, student_logits, targets, temperature=temperature, alpha=alpha)


_CACHE_FORMAT = "herd-teacher-topk-v2"


@dataclass
class TeacherTopK:
    """The teacher's k most likely ids per position (N, S, k) and their log-probabilities at
    `temperature`, normalised over the full vocabulary."""

    logprobs: torch.Tensor  # (N, S, k) fp32
    indices: torch.Tensor  # (N, S, k) int32
    temperature: float


@torch.no_grad()
def cache_teacher_topk(
    teacher: Transformer, inputs: torch.Tensor, doc_ids: torch.Tensor, *, k: int, temperature: float,
    path: str | os.PathLike, batch_size: int = 8,
) -> Path:
    """Run the teacher over packed rows (N, S) once and store its top-k ids (int32) and their
    log-probabilities at `temperature` (fp32); the temperature goes in the file's metadata."""
    if k < 1 or k > teacher.args.vocab_size:
        raise ValueError(f"top_k must be in 1..{teacher.args.vocab_size}, got {k}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    teacher.eval()
    logprobs, indices = [], []
    device = teacher.tok_embeddings.weight.device
    for s in range(0, inputs.shape[0], batch_size):
        logits = teacher(inputs[s : s + batch_size].to(device), doc_ids=doc_ids[s : s + batch_size].to(device))
        top = logits.topk(k, dim=-1)  # (b, S, k)
        log_z = (logits.float() / temperature).logsumexp(-1, keepdim=True)  # (b, S, 1): full-vocabulary normaliser
        logprobs.append((top.values.float() / temperature - log_z).cpu())
        indices.append(top.indices.to(torch.int32).cpu())
    return save_tensors(path, {"logprobs": torch.cat(logprobs), "indices": torch.cat(indices)},
                        metadata={"format": _CACHE_FORMAT, "k": str(k), "temperature": repr(float(temperature))})


def load_teacher_topk(path: str | os.PathLike) -> TeacherTopK:
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no cached teacher top-k (written by cache_teacher_topk)")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != _CACHE_FORMAT or "temperature" not in meta:
        raise ValueError(f"{path}: teacher top-k cache in format {meta.get('format')!r}, not {_CACHE_FORMAT!r} "
                         f"(older caches lack the full-vocabulary log-probabilities at the training temperature); "
                         f"delete it and rerun to rebuild it from the teacher")
    t = load_file(str(path))
    return TeacherTopK(t["logprobs"], t["indices"], float(meta["temperature"]))


@dataclass
class DistillResult:
    fit: FitResult


def train_distill(
    student: Transformer,
    rows: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    optim: FinetuneOptimConfig,
    *,
    teacher: Transformer | None = None,
    topk: TeacherTopK | None = None,
    temperature: float = 2.0,
    alpha: float = 0.5,
    log: Callable[[str], None] | None = print,
    log_every: int = 10,
    max_seconds: float | None = None,
) -> DistillResult:
    """Distil into `student` in place over packed rows (inputs, targets, doc_ids), from a live
    teacher or from its cached top-k (`load_teacher_topk`; one of the two)."""
    if (teacher is None) == (topk is None):
        raise ValueError("give exactly one of teacher (a model) or topk (cached teacher logits)")
    if teacher is not None and teacher.args.vocab_size != student.args.vocab_size:
        raise ValueError(f"teacher vocabulary ({teacher.args.vocab_size}) differs from the student's "
                         f"({student.args.vocab_size}); distillation needs a shared tokenizer")
    inputs, targets, doc_ids = rows
    if topk is not None and topk.logprobs.shape[:2] != inputs.shape:
        raise ValueError(f"the cached teacher top-k covers {tuple(topk.logprobs.shape[:2])} positions, the data "
                         f"{tuple(inputs.shape)}")
    if topk is not None and topk.temperature != temperature:
        raise ValueError(f"cached teacher log-probabilities are at temperature {topk.temperature}, training asks for "
                         f"{temperature}: train at {topk.temperature} or rebuild the cache at {temperature}")
    batches = IndexBatches(inputs.shape[0], batch_size=optim.batch_size, seed=optim.seed)
    device = student.tok_embeddings.weight.device
    if teacher is not None:
        teacher.eval().requires_grad_(False)
    student.train()

    def step(_: int) -> StepLoss:
        idx = batches.next_indices()
        x, t, d = inputs[idx].to(device), targets[idx].to(device), doc_ids[idx].to(device)
        logits = student(x, doc_ids=d)
        if teacher is not None:
            with torch.no_grad():
                teacher_logits = teacher(x, doc_ids=d)
            out = kd_loss(logits, teacher_logits, t, temperature=temperature, alpha=alpha)
        else:
            out = kd_loss_topk(logits, topk.logprobs[idx].to(device), topk.indices[idx].to(device), t,
                               temperature=temperature, alpha=alpha)
        return StepLoss(out.loss, tokens=x.numel(), metrics={"kl": out.kl.item(), "ce": out.ce.item()})

    return DistillResult(fit(student, step, optim, log=log, log_every=log_every, name="distill",
                             max_seconds=max_seconds))


def chat_rows(fmt: ChatFormat, path: str, *, seq_len: int, all_tokens: bool = True):
    """Packed rows of a chat JSONL file, every next token a target (distillation / calibration data)."""
    from herd.posttrain.data import encode_dialog, pack_sft

    dialogs = read_chat_jsonl(path)
    return pack_sft([encode_dialog(fmt, d, max_len=seq_len + 1) for d in dialogs], seq_len=seq_len,
                    all_tokens=all_tokens)


def run_distill(cfg: DistillConfig, *, log: Callable[[str], None] | None = print) -> dict:
    """`herd distill`: student model.path learns from distill.teacher on chat JSONL data."""
    loaded = load_for_training(cfg.model)
    student = loaded.model
    if not cfg.distill.teacher:
        raise ValueError("distill.teacher is empty: give the teacher checkpoint directory")
    if not cfg.data.train:
        raise ValueError("data.train is empty: give a chat JSONL file")
    teacher = load_model(cfg.distill.teacher, dtype=student.tok_embeddings.weight.dtype, device=cfg.model.device)
    rows = chat_rows(loaded.chat, cfg.data.train, seq_len=cfg.data.seq_len)
    topk = None
    if cfg.distill.top_k > 0:
        cache = Path(cfg.distill.cache_dir or cfg.output.dir) / "teacher_topk.safetensors"
        cache_teacher_topk(teacher, rows[0], rows[2], k=cfg.distill.top_k, temperature=cfg.distill.temperature,
                           path=cache)
        topk = load_teacher_topk(cache)
        teacher = None  # freed: the cache is all training needs
    result = train_distill(student, rows, cfg.optim, teacher=teacher, topk=topk, temperature=cfg.distill.temperature,
                           alpha=cfg.distill.alpha, log=log, log_every=cfg.output.log_every)
    out = save_checkpoint(student, Path(cfg.output.dir) / "model", format=cfg.output.format,
                          tokenizer=cfg.model.tokenizer or tokenizer_file(cfg.model.path))
    report = {"steps": result.fit.steps, "rows": int(rows[0].shape[0]),
              "final_loss": result.fit.losses[-1] if result.fit.losses else None,
              "final_kl": result.fit.metrics[-1].get("kl") if result.fit.metrics else None, "output": str(out)}
    atomic_write_json(Path(cfg.output.dir) / "distill_metrics.json", report)
    return report
