"""A tied embedding/output matrix (Llama 3.2 1B/3B) under pipeline parallelism.

The first stage looks tokens up in the matrix and the last stage multiplies by it, usually on
different ranks, so each of the two stages holds its own copy. The copies start equal and stay
equal because both take the same optimizer step on the same gradient: after each backward the
two copies' gradients (each stage's share of the tied gradient) are summed between the first
and the last stage's ranks over a two-rank group, which is what one process accumulates into
its single shared tensor. The alternative, sending the matrix from the first to the last stage
each step, moves vocab x dim values instead of the same amount once per step of gradient, and
would still need the gradient sent back.

Checkpoints name the matrix as one process does: the model state holds it as
`tok_embeddings.weight` and `output.weight` (a tied module's state dict lists both names), the
optimizer state once, as `tok_embeddings.weight`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from herd.parallel.dims import Meshes

_EMB, _HEAD = "tok_embeddings.weight", "output.weight"


def local(x: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a (possibly) distributed tensor, as a view that in-place writes reach."""
    return x.to_local() if isinstance(x, DTensor) else x


def tie_group(meshes: Meshes, *, last_stage_rank: int) -> dist.ProcessGroup | None:
    """The group of the two pipeline ranks holding the first and the last stage (for every other
    mesh coordinate); None when one rank holds both (a V schedule). Every rank creates every
    group (`new_group` is collective) and keeps its own; middle stages keep None."""
    if last_stage_rank == 0:
        return None
    if meshes.dims.pp == 2:
        return meshes.pp.get_group()
    pp_dim = meshes.world.mesh_dim_names.index("pp")
    pairs = meshes.world.mesh.movedim(pp_dim, -1)[..., [0, last_stage_rank]].reshape(-1, 2)
    mine = None
    for ranks in pairs.tolist():
        group = dist.new_group(ranks)
        if dist.get_rank() in ranks:
            mine = group
    return mine


class TiedCopies:
    """The copies of the tied matrix that this rank's pipeline stages hold, and their group."""

    def __init__(self, parts: list[nn.Module], group: dist.ProcessGroup | None):
        self.group = group
        self.embeddings = [p.tok_embeddings.weight for p in parts if getattr(p, "tok_embeddings", None) is not None]
        self.heads = [p.output.weight for p in parts if getattr(p, "output", None) is not None]
        self.copies = self.embeddings + self.heads
        self.head_ids = {id(w) for w in self.heads}
        assert group is None or len(self.copies) == 1, "a tie group joins one copy per rank"

    def __bool__(self) -> bool:
        return bool(self.copies)

    @torch.no_grad()
    def copy_weights(self) -> None:
        """Make the head copies equal to the embedding (after a random init, which drew them apart)."""
        if self.group is not None:
            (mine,) = self.copies
            src = dist.get_global_rank(self.group, 0)  # the pipeline's first rank: it holds the embedding
            dist.broadcast(local(mine), src=src, group=self.group)
        elif self.embeddings:
            (emb,) = self.embeddings
            for w in self.heads:
                local(w).copy_(local(emb))

    def _grads(self) -> list[torch.Tensor | None]:
        """This rank's shards of the copies' gradients, laid out like the copies themselves.

        Under TP the embedding's gradient comes back replicated while the weight is sharded over
        the vocabulary (the head's gradient is sharded); slicing it to the weight's layout (no
        communication) makes the two copies' shards line up element by element.
        """
        out = []
        for w in self.copies:
            g = w.grad
            if isinstance(g, DTensor) and g.placements != w.placements:
                w.grad = g = g.redistribute(placements=w.placements)
            out.append(None if g is None else local(g))
        return out

    @torch.no_grad()
    def grads_before(self) -> list[torch.Tensor | None]:
        return [None if g is None else g.clone() for g in self._grads()]

    @torch.no_grad()
    def sum_grads(self, before: list[torch.Tensor | None]) -> None:
        """Give every copy the sum of this call's gradients of all copies.

        Only this call's part is exchanged (gradient minus `before`), so calls that accumulate
        into the same `.grad` (gradient accumulation) do not count an earlier call twice.
        """
        grads = self._grads()
        assert all(g is not None for g in grads), "every copy of a tied matrix gets a gradient in backward"
        total = sum(g if b is None else g - b for g, b in zip(grads, before))
        if self.group is not None:
            dist.all_reduce(total, group=self.group)
        for g, b in zip(grads, before):
            g.copy_(total if b is None else b + total)

    # ---- optimizer state under one name ---------------------------------------------------------

    def name_once(self, sd: dict) -> dict:
        """An optimizer state dict (DCP's) with the head copy filed under the embedding's name.

        The copies' states are equal (equal gradients from equal starts), so a rank holding both
        drops the head's; DCP writes the state the first and last stage both hold once.
        """
        state = sd["state"]
        head = state.pop(_HEAD, None)
        if head is not None and _EMB not in state:
            state[_EMB] = head
        for group in sd["param_groups"]:
            names = group["params"]
            if _HEAD in names:
                names.remove(_HEAD)
                if _EMB not in names:
                    names.append(_EMB)
        return sd

    def name_copies(self, sd: dict) -> dict:
        """The inverse of `name_once` for this rank's copies: what `set_optimizer_state_dict` expects."""
        if not self.heads:
            return sd
        state = dict(sd["state"])
        # Copies: a rank holding both copies must not give them one shared (in-place updated) moment.
        state[_HEAD] = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state[_EMB].items()}
        if not self.embeddings:
            del state[_EMB]
        groups = []
        for group in sd["param_groups"]:
            names = list(group["params"])
            if _EMB in names:
                names.append(_HEAD)
                if not self.embeddings:
                    names.remove(_EMB)
            groups.append(dict(group, params=names))
        return dict(sd, state=state, param_groups=groups)
