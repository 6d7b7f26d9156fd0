"""AdamW with Llama 3's settings and the two parameter groups that weight decay needs.

Weight decay (0.1, decoupled, so each step shrinks a weight by lr * 0.1) applies to the matmul
weights only. Norm gains are excluded because pulling them toward 0 rescales activations rather
than regularising anything. Token embeddings are excluded too (decision, not from the paper):
a row is only updated when its token occurs, but decay would shrink every row every step, so rare
tokens' embeddings would drift toward zero between occurrences. A tied embedding/output matrix
is the embedding and is not decayed. The untied output head is a matmul and is decayed. A pipeline
stage of a tied model holds the head as its own copy of the embedding (herd.parallel.tied): that
copy is not decayed either, or it would drift from the first stage's.
"""

from __future__ import annotations

import torch
from torch import nn

from herd.train.config import OptimConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    seen: set[int] = set()
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    tied = getattr(getattr(model, "args", None), "tie_embeddings", False)
    for name, p in model.named_parameters():  # named_parameters yields a tied tensor once
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        embedding = id(p) in embedding_ids or (tied and name == "output.weight")  # a pipeline stage's copy
        (no_decay if p.ndim < 2 or embedding else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    # fused: one kernel for the whole update on CPU as on CUDA. On CPU the default (a Python loop
    # over parameters) takes ~6x longer, about a tenth of a step for a 20M-parameter model.
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas),
                             eps=cfg.eps, fused=True)
