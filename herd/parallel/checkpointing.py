"""Activation checkpointing: trade recomputation for activation memory, per block.

* full: keep only each block's input; the whole block is recomputed in backward (about one
  extra forward, ~33% more compute) and activation memory drops to one (B, S, dim) per layer.
* selective: keep the outputs of matmuls, attention and TP reduce-scatters, recompute the
  cheap element-wise work (norms, RoPE, SiLU, products) and the all-gathers that feed the
  projections. Most of the memory of the norm/activation tensors is saved at a few percent
  of compute.

Wrapping replaces `layers[i]` by a `CheckpointWrapper`, which adds `_checkpoint_wrapped_module`
to parameter names; its state-dict hooks and DCP's state-dict helpers remove it again, so
checkpoints stay interchangeable with unwrapped models.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

AC_MODES = ("none", "full", "selective")

# Expensive to recompute, so selective AC keeps their outputs.
_SAVE_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops.aten._scaled_mm.default,
    # TP's reduce-scatter ends each projection pair: keeping its (sequence-sharded) output
    # avoids communicating again; the input all-gathers are recomputed.
    torch.ops._c10d_functional.reduce_scatter_tensor.default,
}


def _selective_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def apply_ac(model: nn.Module, *, mode: str) -> None:
    """Wrap every remaining block of `model` for activation checkpointing, in place."""
    if mode not in AC_MODES:
        raise ValueError(f"unknown activation checkpointing mode {mode!r}; use one of {', '.join(AC_MODES)}")
    if mode == "none":
        return
    for name, block in list(model.layers.items()):
        if mode == "full":
            wrapped = checkpoint_wrapper(block, preserve_rng_state=False)
        else:
            wrapped = checkpoint_wrapper(
                block, preserve_rng_state=False,
                context_fn=partial(create_selective_checkpoint_contexts, _selective_policy),
            )
        model.layers[name] = wrapped
