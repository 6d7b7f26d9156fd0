"""Supervised finetuning: next-token loss on assistant tokens only, over packed dialogs.

Dialogs are tokenised with the chat format (whose assistant mask decides what is trained: the
assistant bodies and their eot/eom, never headers, system or user text), packed several to a
row, and attention is kept inside each dialog with document ids.

The loss goes through `linear_cross_entropy`, which fuses the output head with the
cross-entropy and computes both gradients chunk by chunk during the forward pass. The (tokens,
vocab) fp32 logits are the largest tensor of a finetuning step with Llama 3's 128K vocabulary
(512 tokens x 128,256 x 4 bytes = 263 MB, plus as much again for their gradient); here only one
chunk of them exists at a time and nothing vocabulary-sized is kept for the backward pass. It
also applies the head only at positions that have a target, which in SFT skips every system and
user token. The trade-off is that the loss must be the last op applied to the logits (the
gradient is fixed in the forward pass), which is true for SFT; losses that transform the
log-probabilities further (DPO) use the plain path.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from herd.model import Transformer
from herd.model.loss import cross_entropy_sum
from herd.posttrain.config import FinetuneOptimConfig, LoRAConfig, SFTConfig
from herd.posttrain.data import (
    Batch,
    PackedBatches,
    encode_dialog,
    pack_sft,
    read_chat_jsonl,
)
from herd.io import atomic_write_json
from herd.posttrain.io import save_checkpoint, tokenizer_file
from herd.posttrain.loop import FitResult, TokenSteps, fit, load_for_training
from herd.posttrain.lora import apply_lora, merge_lora, save_adapter
from herd.targets import IGNORE_INDEX
from herd.tokenizer import ChatFormat, ChatTokens, Message


def _chunk_rows(vocab: int) -> int:
    # About 128 MiB of fp32 logits per chunk, and never under 256 rows: each chunk streams the whole
    # (vocab, dim) head through the cache twice, so small chunks turn the head into a bandwidth-bound
    # loop (64-row chunks measured 30% slower than the unfused path at Llama 3's 128K vocabulary).
    return max(256, min(8192, 2**25 // vocab))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # Only positions with a target touch the head: in SFT that skips the prompt tokens entirely.
        rows = (targets != IGNORE_INDEX).nonzero().squeeze(1)  # (n,)
        hv, tv = h[rows], targets[rows]  # (n, D), (n,)
        grad_hv = torch.empty_like(hv) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for s in range(0, hv.shape[0], chunk):
            hc, tc = hv[s : s + chunk], tv[s : s + chunk]  # (c, D), (c,)
            logits = F.linear(hc, weight).float()  # (c, V)
            picked = logits.gather(1, tc.unsqueeze(1)).squeeze(1)  # (c,)
            # One exp pass, in place: logits become exp(logits - max), then (if needed) the softmax.
            m = logits.amax(dim=-1, keepdim=True)
            z = logits.sub_(m).exp_().sum(dim=-1, keepdim=True)  # (c, 1)
            total += (z.log() + m).squeeze(1).sub(picked).sum()
            if need_h or need_w:
                g = logits.div_(z)  # d(sum of -log p)/d logits = softmax - onehot
                g[torch.arange(g.shape[0], device=g.device), tc] -= 1.0
                if need_h:
                    grad_hv[s : s + chunk] = (g.to(weight.dtype) @ weight).to(h.dtype)  # (c, D)
                if need_w:
                    grad_w.addmm_(g.t(), hc.float())  # (V, D)
        grad_h = None
        if need_h:
            grad_h = torch.zeros_like(h)
            grad_h[rows] = grad_hv
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        return gh, gw, None, None


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, chunk: int | None = None
) -> torch.Tensor:
    """Sum over positions with target != -100 of -log softmax(hidden @ weight^T)[target], in fp32.

    hidden (..., D), weight (V, D), targets (...). Equal to F.cross_entropy(..., reduction="sum")
    on the full logits, with the memory of one chunk of `chunk` rows.
    """
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1)
    if h.shape[0] != t.shape[0]:
        raise ValueError(f"hidden has {h.shape[0]} positions but targets has {t.shape[0]}")
    return _LinearCrossEntropy.apply(h, weight, t, chunk or _chunk_rows(weight.shape[0]))


def next_token_loss_sum(model: Transformer, batch: Batch) -> torch.Tensor:
    """Summed cross-entropy of batch.targets under `model`, document-masked; fused head when possible."""
    h = model.hidden(batch.inputs, doc_ids=batch.doc_ids)  # (B, S, D)
    if type(model.output) is nn.Linear:
        return linear_cross_entropy(h, model.output.weight, batch.targets)
    # An adapter on the output head: its output is not a single matrix product, so use the plain path.
    return cross_entropy_sum(model.output(h), batch.targets)


@dataclass
class SFTResult:
    fit: FitResult
    train_examples: int
    packed_rows: int
    trained_tokens_per_row: float  # assistant targets per packed row (how much of a row is trained)
    val_loss: float | None
    output: Path | None = None


def tokenize_dialogs(fmt: ChatFormat, dialogs: Sequence[Sequence[Message]], *, seq_len: int) -> list[ChatTokens]:
    return [encode_dialog(fmt, d, max_len=seq_len + 1) for d in dialogs]


@torch.no_grad()
def eval_loss(model: Transformer, rows: tuple[torch.Tensor, torch.Tensor, torch.Tensor], *, batch_size: int = 8) -> float:
    """Mean next-token loss per trained token over packed rows (inputs, targets, doc_ids)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    inputs, targets, doc_ids = rows
    for s in range(0, inputs.shape[0], batch_size):
        b = Batch(inputs[s : s + batch_size], targets[s : s + batch_size], doc_ids[s : s + batch_size], 0)
        total += next_token_loss_sum(model, b).item()
        count += int((b.targets != IGNORE_INDEX).sum())
    model.train(was_training)
    return total / max(count, 1)


def train_sft(
    model: Transformer,
    examples: Sequence[ChatTokens],
    optim: FinetuneOptimConfig,
    *,
    seq_len: int,
    lora: LoRAConfig | None = None,
    val_examples: Sequence[ChatTokens] = (),
    log: Callable[[str], None] | None = print,
    log_every: int = 10,
    max_seconds: float | None = None,
) -> SFTResult:
    """Finetune `model` in place on tokenised dialogs (full finetuning, or LoRA when lora.rank > 0)."""
    inputs, targets, doc_ids = pack_sft(examples, seq_len=seq_len)
    batches = PackedBatches(inputs, targets, doc_ids, batch_size=optim.batch_size, seed=optim.seed)
    if lora is not None and lora.rank > 0:
        apply_lora(model, lora.targets, lora.rank, lora.alpha, dropout=lora.dropout,
                   quantize_base=lora.quantize_base)
    model.train()

    # The loss is summed over assistant tokens and divided by their count by the training core.
    steps = TokenSteps(batches=lambda _: [batches.next_batch()], loss=next_token_loss_sum)
    result = fit(model, steps, optim, log=log, log_every=log_every, name="sft", max_seconds=max_seconds)
    val = eval_loss(model, pack_sft(val_examples, seq_len=seq_len)) if val_examples else None
    per_row = float((targets != IGNORE_INDEX).sum()) / max(inputs.shape[0], 1)
    return SFTResult(result, len(examples), inputs.shape[0], per_row, val)


def run_sft(cfg: SFTConfig, *, log: Callable[[str], None] | None = print) -> SFTResult:
    """`herd sft`: read the chat JSONL, finetune, write the model (and adapters) to output.dir."""
    import random

    loaded = load_for_training(cfg.model)
    model, fmt = loaded.model, loaded.chat
    if not cfg.data.train:
        raise ValueError("data.train is empty: give a chat JSONL file")
    dialogs = read_chat_jsonl(cfg.data.train)
    random.Random(cfg.optim.seed).shuffle(dialogs)
    n_val = int(len(dialogs) * cfg.data.val_fraction)
    examples = tokenize_dialogs(fmt, dialogs[n_val:], seq_len=cfg.data.seq_len)
    val = tokenize_dialogs(fmt, dialogs[:n_val], seq_len=cfg.data.seq_len)
    result = train_sft(model, examples, cfg.optim, seq_len=cfg.data.seq_len, lora=cfg.lora, val_examples=val,
                       log=log, log_every=cfg.output.log_every)
    result.output = save_trained(model, cfg.output.dir, source=cfg.model.path, lora=cfg.lora,
                                 format=cfg.output.format, tokenizer=cfg.model.tokenizer or None)
    atomic_write_json(Path(cfg.output.dir) / "sft_metrics.json", {
        "steps": result.fit.steps, "final_loss": result.fit.losses[-1] if result.fit.losses else None,
        "val_loss": result.val_loss, "tokens_per_s": result.fit.tokens_per_s, "train_examples": result.train_examples,
        "packed_rows": result.packed_rows})
    return result


def save_trained(
    model: Transformer, out_dir: str | os.PathLike, *, source: str, lora: LoRAConfig, format: str,
    tokenizer: str | None = None,
) -> Path:
    """Write `<out_dir>/adapter` (LoRA) and/or `<out_dir>/model` (full weights, merged if LoRA)."""
    out = Path(out_dir)
    tok_file = tokenizer or tokenizer_file(source)
    if getattr(model, "lora_spec", None) is not None:
        save_adapter(model, out / "adapter", base_model=source)
        if not lora.merge:
            return out / "adapter"
        merge_lora(model)
    return save_checkpoint(model, out / "model", format=format, tokenizer=tok_file)
