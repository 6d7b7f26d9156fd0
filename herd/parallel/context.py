"""Context parallelism the Llama 3 way: shard the sequence, all-gather only K and V.

The sequence is cut into 2 x CP chunks and rank r keeps chunks r and 2CP-1-r (zig-zag), so
under a causal mask every rank has the same amount of attention work: an early chunk with
little to attend to is paired with a late one that attends to almost everything. In each
layer the ranks all-gather their keys and values (post-RoPE) and attend their local queries
over the whole sequence; nothing else is exchanged. Backward of the all-gather is a
reduce-scatter of dK and dV, through `funcol.all_gather_tensor_autograd`.

Trade-off (paper section 3.3.2): unlike ring attention, the all-gather is not overlapped
with compute, but it makes any mask easy (the document mask is built from global positions
before the step), and with GQA the K/V tensors are n_heads / n_kv_heads times smaller than
the queries, so O(S) communication stays small next to O(S^2) attention.

The model is untouched except for its one seam: each `Attention.attend` is replaced by
`ContextParallel.attend`, which ignores the model's own (local) mask and uses one built here
from global positions and document ids. Without pipeline parallelism that mask is state kept
for one step, set by `shard_batch` (recomputation under activation checkpointing happens
before the next `shard_batch`). Under pipeline parallelism a step runs several microbatches,
interleaved and each with its own rows, so there is no one mask of the step: each stage
builds its microbatch's `GatheredMask` from the rows' document ids (which travel with every
microbatch as a keyword) and hands it to its layers, which is also what activation
checkpointing replays.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from herd.model.llama import Attention, positions_from_doc_ids


# Renamed in torch 2.13 (the old name warns); both gather with autograd (backward: reduce-scatter).
_all_gather = getattr(funcol, "all_gather_single_autograd", None) or funcol.all_gather_tensor_autograd


def zigzag_chunks(rank: int, cp: int) -> tuple[int, int]:
    """The two sequence chunks (out of 2*cp) that `rank` holds."""
    return rank, 2 * cp - 1 - rank


def local_slots(seq_len: int, rank: int, cp: int, *, device: torch.device | str = "cpu") -> torch.Tensor:
    """Indices into the full sequence of the tokens `rank` holds, in local order: (S / cp,)."""
    if seq_len % (2 * cp) != 0:
        raise ValueError(
            f"context parallel degree {cp} needs the sequence length to be a multiple of 2*cp = {2 * cp}, "
            f"got {seq_len}; change training.seq_len or parallel.cp"
        )
    c = seq_len // (2 * cp)
    a, b = zigzag_chunks(rank, cp)
    return torch.cat([torch.arange(a * c, (a + 1) * c, device=device), torch.arange(b * c, (b + 1) * c, device=device)])


@dataclass
class CPBatch:
    """One rank's share of a batch. `pos` are global RoPE positions (B, S/cp); `doc_ids` the
    rows' document ids over the whole sequence (B, S), or None: what a pipeline stage needs to
    build its microbatch's mask (`ContextParallel.gathered_mask`)."""

    inputs: torch.Tensor
    targets: torch.Tensor | None
    pos: torch.Tensor
    doc_ids: torch.Tensor | None = None


class GatheredMask:
    """A boolean mask (B or 1, 1, S/cp, S) of local queries over all-gathered keys.

    Passed to the layers in place of the model's `AttentionMask` (the `attend` seam receives
    it), so the mask belongs to the call rather than to the step.
    """

    is_causal = False

    def __init__(self, mask: torch.Tensor):
        self.mask = mask


class ContextParallel:
    """All-gather-K/V attention over a 1-D `mesh`; installed into a model by `apply_cp`."""

    def __init__(self, mesh: DeviceMesh):
        assert mesh.ndim == 1
        self.mesh = mesh
        self.size = mesh.size()
        self.rank = mesh.get_local_rank()
        self._mask: torch.Tensor | None = None

    def gathered_mask(self, seq_len: int, doc_ids: torch.Tensor | None, *, device: torch.device) -> torch.Tensor:
        """(B or 1, 1, S/cp, S): causal by global slot, and within one document when `doc_ids` (B, S) is given.

        Keys are in all-gathered order (rank 0's chunks, then rank 1's, ...), queries in this
        rank's local order; both are mapped back to global slots, so the mask is exact for any
        document layout.
        """
        S = seq_len
        q_slot = local_slots(S, self.rank, self.size, device=device)  # (Sl,)
        k_slot = torch.cat([local_slots(S, r, self.size, device=device) for r in range(self.size)])  # (S,)
        mask = k_slot.view(1, 1, S) <= q_slot.view(1, -1, 1)  # (1, Sl, S)
        if doc_ids is not None:
            if doc_ids.shape[1] != S:
                raise ValueError(f"doc_ids cover {doc_ids.shape[1]} tokens but the sequence has {S}; pass the "
                                 "document ids of the whole rows, not of this rank's chunks")
            same_doc = doc_ids[:, q_slot].unsqueeze(-1) == doc_ids[:, k_slot].unsqueeze(1)  # (B, Sl, S)
            mask = mask & same_doc
        return mask.unsqueeze(1)

    def shard_batch(
        self, inputs: torch.Tensor, targets: torch.Tensor | None = None, *, doc_ids: torch.Tensor | None = None,
        pos: torch.Tensor | None = None,
    ) -> CPBatch:
        """Keep this rank's zig-zag chunks of a full (B, S) batch and set the step's mask.

        Every CP rank receives the same full batch; this is what lets the document mask be
        built locally instead of being communicated.
        """
        B, S = inputs.shape
        q_slot = local_slots(S, self.rank, self.size, device=inputs.device)  # (Sl,)
        if pos is None:
            pos = positions_from_doc_ids(doc_ids) if doc_ids is not None else torch.arange(S, device=inputs.device).expand(B, S)
        self._mask = self.gathered_mask(S, doc_ids, device=inputs.device)  # (B or 1, 1, Sl, S)
        local_targets = None if targets is None else targets[:, q_slot]
        return CPBatch(inputs=inputs[:, q_slot], targets=local_targets, pos=pos[:, q_slot], doc_ids=doc_ids)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask=None) -> torch.Tensor:
        """Local queries (B, H, Sl, D) over all-gathered keys/values (B, K, S, D).

        `mask` is the caller's `GatheredMask` (pipeline stages), else the step's mask from
        `shard_batch` (the model's own `AttentionMask` covers only local keys).
        """
        attn_mask = mask.mask if isinstance(mask, GatheredMask) else self._mask
        if attn_mask is None:
            raise RuntimeError("ContextParallel.shard_batch must run before the forward pass")
        if attn_mask.shape[0] not in (1, q.shape[0]):
            raise ValueError(f"CP mask has {attn_mask.shape[0]} rows but the batch has {q.shape[0]}")
        n_kv = k.shape[1]
        # One collective for both: latency matters more than the copy at these sizes.
        kv = _all_gather(torch.cat([k, v], dim=1), gather_dim=2, group=self.mesh)  # (B, 2K, S, D)
        k, v = kv[:, :n_kv], kv[:, n_kv:]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=q.shape[1] != k.shape[1])


def apply_cp(model: nn.Module, cp: ContextParallel) -> None:
    """Route every attention module of `model` (or of one pipeline stage) through `cp`."""
    n = 0
    for module in model.modules():
        if isinstance(module, Attention):
            module.attend = cp.attend  # instance attribute shadows the method: the model's seam
            n += 1
    assert n == len(model.layers)
