"""Tensor parallelism with sequence parallelism, the Llama plan written as data.

`llama_tp_plan` maps module-name patterns to `torch.distributed.tensor.parallel` styles:
attention and FFN input projections are column-parallel (each rank owns whole heads and a
slice of the FFN), the output projections are row-parallel and reduce-scatter back onto a
sequence-sharded residual stream, and RMSNorms run on that sequence shard. The embedding is
row-parallel over the vocabulary; the output head is column-parallel and, with loss parallel,
the cross-entropy is computed on vocabulary shards without gathering the logits.

Trade-off: sequence parallelism replaces one all-reduce per projection pair by an all-gather
plus a reduce-scatter (same bytes) and in exchange divides norm and residual activations by
the TP degree. The plan is data so a reader sees the whole layout at once and a test can
check it covers every linear layer.
"""

from __future__ import annotations

import fnmatch

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from herd.model.args import ModelArgs


def llama_tp_plan(*, loss_parallel: bool = True) -> dict[str, ParallelStyle]:
    """FQN pattern -> style for `herd.model.Transformer` (patterns use `*` for a layer index)."""
    return {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
        "layers.*.attention_norm": SequenceParallel(),
        # Attention.forward(x, freqs_cis, mask, cache): gather the sequence shards of x only.
        "layers.*.attention": PrepareModuleInput(
            input_layouts=(Shard(1), None, None, None), desired_input_layouts=(Replicate(), None, None, None)
        ),
        "layers.*.attention.wq": ColwiseParallel(),
        "layers.*.attention.wk": ColwiseParallel(),
        "layers.*.attention.wv": ColwiseParallel(),
        "layers.*.attention.wo": RowwiseParallel(output_layouts=Shard(1)),
        "layers.*.ffn_norm": SequenceParallel(),
        "layers.*.feed_forward": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
        "layers.*.feed_forward.w1": ColwiseParallel(),
        "layers.*.feed_forward.w3": ColwiseParallel(),
        "layers.*.feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
        "norm": SequenceParallel(),
        # With loss parallel the logits stay a vocabulary-sharded DTensor for the loss.
        "output": ColwiseParallel(
            input_layouts=Shard(1),
            output_layouts=Shard(-1) if loss_parallel else Replicate(),
            use_local_output=not loss_parallel,
        ),
    }


def check_tp(args: ModelArgs, tp: int) -> None:
    """Raise ValueError naming the fix when `args` cannot be split over `tp` ranks."""
    if tp == 1:
        return
    if args.n_kv_heads % tp != 0:
        ok = [d for d in range(1, args.n_kv_heads + 1) if args.n_kv_heads % d == 0]
        raise ValueError(
            f"tensor parallel degree {tp} does not divide n_kv_heads={args.n_kv_heads}: with grouped-query "
            f"attention each TP rank must own whole KV heads (and their {args.n_rep} query heads); "
            f"use parallel.tp in {ok}"
        )
    for name, size in (("n_heads", args.n_heads), ("ffn_hidden_dim", args.ffn_hidden_dim),
                       ("vocab_size", args.vocab_size), ("dim", args.dim)):
        if size % tp != 0:
            raise ValueError(f"tensor parallel degree {tp} does not divide {name}={size}; choose a tp that does")


def apply_tp(model: nn.Module, mesh: DeviceMesh, *, loss_parallel: bool = True) -> None:
    """Apply `llama_tp_plan` to `model` (a Transformer or pipeline stage), in place."""
    check_tp(model.args, mesh.size())
    names = {name for name, _ in model.named_modules() if name}
    plan: dict[str, ParallelStyle] = {}
    for pattern, style in llama_tp_plan(loss_parallel=loss_parallel).items():
        # A pipeline stage has lost some modules; the plan applies to those that remain.
        matches = sorted(n for n in names if fnmatch.fnmatchcase(n, pattern) and n.count(".") == pattern.count("."))
        plan.update({n: style for n in matches})
    tied = model.args.tie_embeddings and model.tok_embeddings is not None and model.output is not None
    parallelize_module(model, mesh, plan)
    if tied:
        # Both halves of a tied matrix are sharded the same way (Shard(0), the vocabulary), but
        # distributing each module made two parameters; point the head back at the embedding.
        model.output.weight = model.tok_embeddings.weight
