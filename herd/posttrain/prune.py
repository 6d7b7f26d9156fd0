"""Structured pruning by activation importance, then distillation (how Llama 3.2 1B/3B were made).

Importance comes from one pass over calibration data (Minitron, Muralidharan et al. 2024):

* attention heads: mean L2 norm of each query head's output (the input of wo), per layer;
* FFN channels: mean |activation| of each channel entering w2, per layer;
* embedding channels: mean |value| of each channel of every RMSNorm output, summed over layers;
* layers: 1 - mean cosine(block input, block output) (ShortGPT's block influence): a block
  that barely turns the residual stream matters least.

Pruning keeps the highest-scoring units and slices every weight that touches them. Heads are
pruned inside each GQA group by the same count, so every KV head keeps the same number of
query heads and the model stays a valid Llama; KV heads themselves are kept. Kept units stay in
their original order, so pruning nothing returns the same function. The pruned shape is an
ordinary `ModelArgs` (head_dim is pinned with `head_dim_override` when dim / n_heads no longer
gives it, and the FFN width is expressed through Meta's multiple_of / ffn_dim_multiplier rule),
so the result saves and loads through `herd.model.formats` like any checkpoint.

Trade-off: scores are gathered once, before any pruning, for all four axes (Minitron's
one-shot estimate) rather than re-estimated after each axis is cut. That is one calibration
pass instead of four, at the price of ignoring how removing, say, layers shifts the other
scores; the distillation that follows recovers what the estimate misses.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from herd.model import ModelArgs, Transformer, build_model, load_model
from herd.posttrain.config import PruneConfig
from herd.posttrain.distill import cache_teacher_topk, chat_rows, load_teacher_topk, train_distill
from herd.io import atomic_write_json
from herd.posttrain.io import save_checkpoint, tokenizer_file
from herd.posttrain.loop import load_for_training


@dataclass
class Importance:
    heads: torch.Tensor  # (n_layers, n_heads)
    ffn: torch.Tensor  # (n_layers, ffn_hidden_dim)
    channels: torch.Tensor  # (dim,)
    layers: torch.Tensor  # (n_layers,) block influence
    tokens: int  # calibration tokens scored


@contextlib.contextmanager
def _hooks(handles: list) -> Iterator[None]:
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def activation_importance(
    model: Transformer, inputs: torch.Tensor, doc_ids: torch.Tensor, *, batch_size: int = 8
) -> Importance:
    """Score heads, FFN channels, embedding channels and layers on calibration rows (N, S).

    Positions with doc_id < 0 (padding) are left out of every average.
    """
    a = model.args
    L = len(model.layers)
    heads = torch.zeros(L, a.n_heads)
    ffn = torch.zeros(L, a.ffn_hidden_dim)
    channels = torch.zeros(a.dim)
    influence = torch.zeros(L)
    state: dict[str, torch.Tensor] = {}

    def valid_rows(x: torch.Tensor) -> torch.Tensor:
        return x[state["valid"]].float()  # (T, ...) tokens that are not padding

    handles = []
    for i, layer in enumerate(model.layers.values()):
        def wo_in(_, args, i=i):
            x = valid_rows(args[0]).view(-1, a.n_heads, a.head_dim)  # (T, H, D)
            heads[i] += x.norm(dim=-1).sum(0).cpu()

        def w2_in(_, args, i=i):
            ffn[i] += valid_rows(args[0]).abs().sum(0).cpu()

        def norm_out(_, __, out):
            channels.add_(valid_rows(out).abs().sum(0).cpu())

        def block(_, args, out, i=i):
            cos = F.cosine_similarity(valid_rows(args[0]), valid_rows(out), dim=-1)  # (T,)
            influence[i] += (1 - cos).sum().cpu()

        handles += [layer.attention.wo.register_forward_pre_hook(wo_in),
                    layer.feed_forward.w2.register_forward_pre_hook(w2_in),
                    layer.attention_norm.register_forward_hook(norm_out),
                    layer.ffn_norm.register_forward_hook(norm_out),
                    layer.register_forward_hook(block)]
    was_training = model.training
    model.eval()
    device = model.tok_embeddings.weight.device
    tokens = 0
    with _hooks(handles):
        for s in range(0, inputs.shape[0], batch_size):
            x, d = inputs[s : s + batch_size].to(device), doc_ids[s : s + batch_size].to(device)
            state["valid"] = d >= 0
            tokens += int(state["valid"].sum())
            model.hidden(x, doc_ids=d)
    model.train(was_training)
    if tokens == 0:
        raise ValueError("the calibration data has no tokens")
    return Importance(heads / tokens, ffn / tokens, channels / tokens, influence / tokens, tokens)


def ffn_rule_for(dim: int, hidden: int) -> tuple[int, float | None]:
    """(multiple_of, ffn_dim_multiplier) that make Meta's FFN rule give exactly `hidden` at `dim`.

    multiple_of = hidden and multiplier = hidden / int(8 * dim / 3): the truncations land on
    hidden or hidden - 1, and rounding up to a multiple of hidden gives hidden either way.
    """
    base = int(2 * (4 * dim) / 3)
    multiplier = None if base == hidden else hidden / base
    probe = ModelArgs(dim=dim, n_layers=1, n_heads=1, multiple_of=hidden, ffn_dim_multiplier=multiplier,
                      head_dim_override=2)
    assert probe.ffn_hidden_dim == hidden, (dim, hidden, probe.ffn_hidden_dim)
    return hidden, multiplier


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores, in ascending index order (so keeping all is the identity)."""
    return scores.topk(k).indices.sort().values


def pruned_args(args: ModelArgs, *, n_layers: int, n_heads: int, ffn_hidden_dim: int, dim: int) -> ModelArgs:
    """ModelArgs of the pruned shape; unchanged fields keep their original values exactly."""
    changes: dict = {"n_layers": n_layers, "n_heads": n_heads, "dim": dim}
    if dim != args.dim or ffn_hidden_dim != args.ffn_hidden_dim:
        changes["multiple_of"], changes["ffn_dim_multiplier"] = ffn_rule_for(dim, ffn_hidden_dim)
    if (dim, n_heads) != (args.dim, args.n_heads) and (dim % n_heads or dim // n_heads != args.head_dim):
        changes["head_dim_override"] = args.head_dim
    return args.replace(**changes)


@torch.no_grad()
def prune_model(
    model: Transformer,
    importance: Importance,
    *,
    n_layers: int | None = None,
    n_heads: int | None = None,
    ffn_hidden_dim: int | None = None,
    dim: int | None = None,
) -> Transformer:
    """A new, smaller Transformer keeping the most important layers / heads / channels (None = keep all)."""
    a = model.args
    n_layers = n_layers or a.n_layers
    n_heads = n_heads or a.n_heads
    ffn_hidden_dim = ffn_hidden_dim or a.ffn_hidden_dim
    dim = dim or a.dim
    if not 1 <= n_layers <= a.n_layers:
        raise ValueError(f"n_layers must be in 1..{a.n_layers}, got {n_layers}")
    if not 1 <= n_heads <= a.n_heads or n_heads % a.n_kv_heads:
        raise ValueError(f"n_heads must be a multiple of n_kv_heads ({a.n_kv_heads}) in 1..{a.n_heads}, got {n_heads}; "
                         "heads are pruned equally inside each GQA group")
    if not 1 <= ffn_hidden_dim <= a.ffn_hidden_dim:
        raise ValueError(f"ffn_hidden_dim must be in 1..{a.ffn_hidden_dim}, got {ffn_hidden_dim}")
    if not 1 <= dim <= a.dim:
        raise ValueError(f"dim must be in 1..{a.dim}, got {dim}")
    new_args = pruned_args(a, n_layers=n_layers, n_heads=n_heads, ffn_hidden_dim=ffn_hidden_dim, dim=dim)
    hd, rep_old, rep_new = a.head_dim, a.n_rep, n_heads // a.n_kv_heads

    layers = _top(importance.layers, n_layers).tolist()
    ch = _top(importance.channels, dim)
    sd = model.state_dict()
    out: dict[str, torch.Tensor] = {
        "tok_embeddings.weight": sd["tok_embeddings.weight"][:, ch].clone(),
        "norm.weight": sd["norm.weight"][ch].clone(),
    }
    out["output.weight"] = out["tok_embeddings.weight"] if a.tie_embeddings else sd["output.weight"][:, ch].clone()
    for new_i, old_i in enumerate(layers):
        p, q = f"layers.{old_i}.", f"layers.{new_i}."
        # Heads: the rep_new best query heads of each KV group, in their original order.
        scores = importance.heads[old_i].view(a.n_kv_heads, rep_old)
        keep = torch.cat([g * rep_old + _top(scores[g], rep_new) for g in range(a.n_kv_heads)])
        rows = (keep.unsqueeze(1) * hd + torch.arange(hd)).reshape(-1)  # head h -> rows h*hd .. h*hd+hd-1
        f = _top(importance.ffn[old_i], ffn_hidden_dim)
        out[q + "attention.wq.weight"] = sd[p + "attention.wq.weight"][rows][:, ch].clone()
        out[q + "attention.wk.weight"] = sd[p + "attention.wk.weight"][:, ch].clone()
        out[q + "attention.wv.weight"] = sd[p + "attention.wv.weight"][:, ch].clone()
        out[q + "attention.wo.weight"] = sd[p + "attention.wo.weight"][ch][:, rows].clone()
        out[q + "feed_forward.w1.weight"] = sd[p + "feed_forward.w1.weight"][f][:, ch].clone()
        out[q + "feed_forward.w3.weight"] = sd[p + "feed_forward.w3.weight"][f][:, ch].clone()
        out[q + "feed_forward.w2.weight"] = sd[p + "feed_forward.w2.weight"][ch][:, f].clone()
        out[q + "attention_norm.weight"] = sd[p + "attention_norm.weight"][ch].clone()
        out[q + "ffn_norm.weight"] = sd[p + "ffn_norm.weight"][ch].clone()
    w = model.tok_embeddings.weight
    pruned = build_model(new_args, device=w.device, dtype=w.dtype, init=False)
    pruned.load_state_dict(out, strict=True)
    pruned.tie_weights()
    return pruned


def run_prune(cfg: PruneConfig, *, log: Callable[[str], None] | None = print) -> dict:
    """`herd prune`: score on calibration data, prune, optionally distil from the unpruned model, save."""
    loaded = load_for_training(cfg.model)
    model = loaded.model
    if not cfg.data.train:
        raise ValueError("data.train is empty: give a chat JSONL file for calibration (and distillation)")
    rows = chat_rows(loaded.chat, cfg.data.train, seq_len=cfg.data.seq_len)
    n_cal = min(cfg.prune.calibration_batches, rows[0].shape[0])
    imp = activation_importance(model, rows[0][:n_cal], rows[2][:n_cal])
    p = cfg.prune
    student = prune_model(model, imp, n_layers=p.n_layers or None, n_heads=p.n_heads or None,
                          ffn_hidden_dim=p.ffn_hidden_dim or None, dim=p.dim or None)
    before, after = model.args.num_params(), student.args.num_params()
    if log is not None:
        log(f"prune: {before:,} -> {after:,} parameters ({after / before:.1%}); layers kept by influence "
            f"{_top(imp.layers, student.args.n_layers).tolist()}")
    report: dict = {"params_before": before, "params_after": after, "calibration_tokens": imp.tokens}
    if cfg.optim.steps > 0:
        teacher = load_model(cfg.distill.teacher, dtype=model.tok_embeddings.weight.dtype,
                             device=cfg.model.device) if cfg.distill.teacher else model
        topk = None
        if cfg.distill.top_k > 0:
            cache = Path(cfg.distill.cache_dir or cfg.output.dir) / "teacher_topk.safetensors"
            path = cache_teacher_topk(teacher, rows[0], rows[2], k=cfg.distill.top_k,
                                      temperature=cfg.distill.temperature, path=cache)
            topk, teacher = load_teacher_topk(path), None
        result = train_distill(student, rows, cfg.optim, teacher=teacher, topk=topk,
                               temperature=cfg.distill.temperature, alpha=cfg.distill.alpha, log=log,
                               log_every=cfg.output.log_every)
        report.update(distill_steps=result.fit.steps, final_loss=result.fit.losses[-1])
    out = save_checkpoint(student, Path(cfg.output.dir) / "model", format=cfg.output.format,
                          tokenizer=cfg.model.tokenizer or tokenizer_file(cfg.model.path))
    report["output"] = str(out)
    atomic_write_json(Path(cfg.output.dir) / "prune_metrics.json", report)
    return report
