"""Count the bytes each collective moves, by watching the dispatcher.

Every torch.distributed path used here reaches the dispatcher as an op: FSDP2 and the
pipeline's point-to-point calls as `c10d.*` ops, DTensor (TP) and context parallel as
`_c10d_functional.*` ops. A `TorchDispatchMode` sees them all without patching anything.

Bytes follow the "algorithm bytes" convention: the size of the buffer the collective
produces or consumes at this rank (all-gather: the gathered output; reduce-scatter: the
unreduced input; all-reduce, send, recv: the buffer). Bytes on the wire depend on the
algorithm (a ring all-reduce moves 2(n-1)/n of it) and are not modelled.

Attribution to a parallelism uses who issues what: point-to-point is the pipeline,
functional collectives on the TP or CP group are TP or CP, other collectives of more than
one element are FSDP (but all-reduces within the pipeline group: the tied embedding's gradient,
pp), and one-element all-reduces are the step's loss bookkeeping. Groups
alone would not do: with dp_shard = 1 the CP and FSDP groups are the same ranks and torch
reuses one process group for both.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

_c10d = torch.ops.c10d
_fun = torch.ops._c10d_functional

# op -> (api, kind, index of the tensor argument whose size counts ("out": the result), group argument)
_OPS = {
    _c10d._allgather_base_.default: ("c10d", "all_gather", 0, 2),
    _c10d.allgather_.default: ("c10d", "all_gather", 0, 2),
    _c10d.allgather_into_tensor_coalesced_.default: ("c10d", "all_gather", 0, 2),
    _c10d._reduce_scatter_base_.default: ("c10d", "reduce_scatter", 1, 2),
    _c10d.reduce_scatter_tensor_coalesced_.default: ("c10d", "reduce_scatter", 1, 2),
    _c10d.allreduce_.default: ("c10d", "all_reduce", 0, 1),
    _c10d.broadcast_.default: ("c10d", "broadcast", 0, 1),
    _c10d.send.default: ("c10d", "send", 0, 1),
    _c10d.recv_.default: ("c10d", "recv", 0, 1),
    _fun.all_gather_into_tensor.default: ("funcol", "all_gather", "out", 2),
    _fun.all_gather_into_tensor_coalesced.default: ("funcol", "all_gather", "out", 2),
    _fun.reduce_scatter_tensor.default: ("funcol", "reduce_scatter", 0, 3),
    _fun.reduce_scatter_tensor_coalesced.default: ("funcol", "reduce_scatter", 0, 3),
    _fun.all_reduce.default: ("funcol", "all_reduce", 0, 2),
    _fun.all_reduce_coalesced.default: ("funcol", "all_reduce", 0, 2),
}


def _size(x) -> tuple[int, int]:
    flat, _ = tree_flatten(x)
    tensors = [t for t in flat if isinstance(t, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors), sum(t.numel() for t in tensors)


def _group_name(g) -> str:
    if isinstance(g, str):
        return g
    if isinstance(g, torch.ScriptObject):
        g = dist.ProcessGroup.unbox(g)
    return g.group_name


def _ranks(group) -> tuple[int, ...]:
    if isinstance(group, str):
        group = c10d._resolve_process_group(group)
    return tuple(dist.get_process_group_ranks(group))


@dataclass
class Call:
    group: str
    api: str  # "c10d" or "funcol"
    kind: str
    nbytes: int
    numel: int


@dataclass
class CommCounter(TorchDispatchMode):
    """`with CommCounter() as c: ...`, then `c.attribute(meshes)` or `c.calls`."""

    calls: list[Call] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__init__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented  # let DTensor lower itself; its collectives come back here
        out = func(*args, **kwargs)
        spec = _OPS.get(func)
        if spec is not None:
            api, kind, which, gidx = spec
            nbytes, numel = _size(out if which == "out" else args[which])
            self.calls.append(Call(_group_name(args[gidx]), api, kind, nbytes, numel))
        return out

    def attribute(self, meshes) -> dict[str, int]:
        """Bytes by the parallelism that moved them: fsdp, tp, cp, pp, loss (see module doc)."""
        # By rank set, not group name: FSDP's 2-D (shard, tp) mesh may hold its own TP group.
        tp = _ranks(meshes.tp.get_group()) if meshes.tp.size() > 1 else None
        cp = _ranks(meshes.cp.get_group()) if meshes.cp.size() > 1 else None
        pp = set(_ranks(meshes.pp.get_group())) if meshes.pp.size() > 1 else set()
        out: dict[str, int] = defaultdict(int)
        for c in self.calls:
            ranks = _ranks(c.group)
            if c.kind in ("send", "recv"):
                who = "pp"
            elif c.numel == 1:
                who = "loss"
            elif c.api == "funcol" and ranks == tp:
                who = "tp"
            elif c.api == "funcol" and ranks == cp:
                who = "cp"
            elif c.api == "c10d" and c.kind == "all_reduce" and set(ranks) <= pp:
                who = "pp"  # a tied matrix's gradient between the first and last stage
            elif c.api == "c10d":
                who = "fsdp"
            else:
                who = f"other:{c.kind}"
            out[who] += c.nbytes
        return {k: out.get(k, 0) for k in ("fsdp", "tp", "cp", "pp", "loss")} | {
            k: v for k, v in out.items() if k.startswith("other")}
