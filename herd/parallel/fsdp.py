"""Fully sharded data parallelism (FSDP2 `fully_shard`), and HSDP on a 2-D mesh.

Each transformer block is its own FSDP unit, so only one block's full weights exist at a
time; the token embedding is another unit, and the root (norm + output head) is the last.
The trade-off is granularity: finer units overlap communication with compute and keep peak
memory at one block, at the price of more, smaller collectives.

A tied embedding/output matrix must live in one unit (FSDP replaces a parameter by its
sharded DTensor once); it then stays in the root, which is gathered for the whole step.

`Transformer.hidden` (the final-normed states a chunked loss feeds to the head) gets a second
entry into the root's hooks, `hidden_states(model, ...)`: FSDP only hooks `forward`, so calling
`hidden` directly would run the blocks' own hooks but never gather the root's norm. Through it
the root is gathered on entry and, being the root, kept gathered until its gradients are
reduce-scattered at the end of backward, so the head's chunks all read the one full output
matrix and its gradient accumulates there before a single reduce-scatter. The hooks go on an
alias (`fsdp_hidden`), not on `hidden` itself: `forward` calls `hidden`, and entering the root's
hooks twice in one forward costs one more all-gather of the root per step (measured).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method


def apply_fsdp(
    model: nn.Module,
    mesh: DeviceMesh,
    *,
    param_dtype: torch.dtype = torch.float32,
    reduce_dtype: torch.dtype = torch.float32,
    reshard_after_forward: bool = True,
) -> None:
    """Shard `model` (a Transformer or a pipeline stage of one) over `mesh`, in place.

    mesh: 1-D for FSDP, 2-D (replicate, shard) for HSDP.
    param_dtype: the dtype blocks compute in (bf16 on GPU); parameters and the optimizer stay
        in their stored dtype. Gradients are reduced in `reduce_dtype` (the paper reduces in fp32).
    reshard_after_forward: free gathered weights after each block's forward (ZeRO-3). Pipeline
        parallelism turns it off: every microbatch would gather the same weights again.
    """
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    kwargs = dict(mesh=mesh, mp_policy=mp)
    for block in model.layers.values():
        fully_shard(block, reshard_after_forward=reshard_after_forward, **kwargs)
    tied = getattr(model, "output", None) is not None and getattr(model, "tok_embeddings", None) is not None \
        and model.output.weight is model.tok_embeddings.weight
    if getattr(model, "tok_embeddings", None) is not None and not tied:
        fully_shard(model.tok_embeddings, reshard_after_forward=reshard_after_forward, **kwargs)
    # The root's weights (norm, output head) are needed again as soon as backward starts.
    fully_shard(model, reshard_after_forward=False, **kwargs)
    if hasattr(model, "hidden"):
        model.fsdp_hidden = model.hidden
        register_fsdp_forward_method(model, "fsdp_hidden")


def hidden_states(model: nn.Module, tokens: torch.Tensor, **kwargs) -> torch.Tensor:
    """`model.hidden(tokens, **kwargs)`, through the root's FSDP hooks when `apply_fsdp` sharded it."""
    return getattr(model, "fsdp_hidden", model.hidden)(tokens, **kwargs)
