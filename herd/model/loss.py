"""Next-token cross-entropy in fp32, optionally with the output head computed in chunks.

The one summed cross-entropy of the project: herd.parallel (below train in the dependency
order) needs it as the default loss of a parallelised model, herd.train.core as the loss of
every layout, and post-training as the plain path of SFT and distillation, so it lives here,
beside the model whose logits it scores.

The loss is returned as a *sum* over predicted tokens, not a mean: the trainer divides by the
number of targets in the whole (accumulated) batch, so every token weighs the same however the
batch is split into micro-batches and however many targets each row has (-100 marks none).

Chunking trade-off: the (B*S, vocab) fp32 logits are the largest activation of a Llama 3 step
(8,192 tokens x 128,256 x 4 bytes = 4 GiB per sequence). With `chunks > 1` each chunk's logits
are recomputed in the backward pass (activation checkpointing of the head) so only one chunk is
alive at a time; the price is the head's forward matmul once more per step, 2*N_head / (6*N) of
the step's FLOPs (about 2% for Llama 3 8B). With `chunks == 1` the plain path is used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from herd.targets import IGNORE_INDEX


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum of -log p(target) over positions whose target is not -100. logits (..., V), targets (...).

    `flatten` rather than `reshape(-1, V)`: under tensor parallelism the logits are a DTensor
    sharded on the vocabulary, whose local last dimension is not V.
    """
    return F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")


def _head_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return cross_entropy_sum(F.linear(hidden, weight), targets)


def chunked_cross_entropy_sum(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, chunks: int
) -> torch.Tensor:
    """Output head + cross-entropy over `chunks` slices of the flattened tokens.

    hidden (B, S, dim) final-normed states, weight (vocab, dim) the output matrix, targets (B, S).
    """
    h = hidden.reshape(-1, hidden.shape[-1])  # (B*S, dim)
    t = targets.reshape(-1)  # (B*S,)
    total = hidden.new_zeros((), dtype=torch.float32)
    for h_chunk, t_chunk in zip(h.chunk(chunks), t.chunk(chunks)):
        total = total + checkpoint(_head_loss, h_chunk, weight, t_chunk, use_reentrant=False)
    return total
