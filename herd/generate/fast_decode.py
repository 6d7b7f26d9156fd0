"""Decode steps as one fused C++ op per transformer block, swapped in from outside the model.

Trade-off: on a small model a decode step is mostly per-op overhead, not matmul. SmolLM2-135M
runs 30 blocks of seven small GEMVs and ~40 other ATen ops (RMSNorm is eight, RoPE goes through
complex views, the cache write, SDPA, transposes, residual adds), a few microseconds each; at one
thread that was a third of the step. `FusedDecodeBlock` replaces that with one call per block
into `herd_cpu::decode_block` (herd/kernels/decode_block.cpp), which runs the block's math in
plain loops around the kernels' GEMVs. The price is a second implementation of the block, kept
honest by tests against the eager block and HF transformers. It is taken only where it computes
exactly what the eager block would (to fp32 reassociation): one token per row (decode), a herd
`KVCache` in fp32, CPU fp32 activations, no autograd, the model's own Attention / FeedForward /
RMSNorm modules with no hooks, and weights in one kernel format (`kernel_weight()`). Everything
else, prefill included, runs the eager block unchanged, so the swap is always safe to apply.

    apply_fast_decode(model)   # after quantize() / apply_cpu_kernels(); returns blocks swapped
    remove_fast_decode(model)  # back to plain TransformerBlocks (same parameters)

The parameters are shared, not copied: `state_dict()` is unchanged and nothing is allocated.
"""

from __future__ import annotations

import logging
import operator
from typing import NamedTuple

import torch
from torch import nn

from herd.generate.kv_cache import KVCache
from herd.kernels import (
    KIND_F32,
    KIND_INT4_TILES,
    MAX_ROWS,
    KernelWeight,
    cpu_kernels,
    unavailable_reason,
)
from herd.kernels.hugepages import move_to_huge_pages
from herd.model.llama import (
    Attention,
    AttentionMask,
    FeedForward,
    RMSNorm,
    Transformer,
    TransformerBlock,
)

log = logging.getLogger("herd.generate")


def kernel_weight(module: nn.Module) -> KernelWeight | None:
    """How the kernels read `module`'s weight, or None when they cannot (a bias, a LoRA wrapper...)."""
    if type(module) is nn.Linear:  # exactly: a subclass may compute something else
        ok = module.bias is None and module.weight.dtype == torch.float32
        return KernelWeight(KIND_F32, (module.weight,)) if ok else None
    fn = getattr(module, "kernel_weight", None)
    return fn() if fn is not None else None


def _plain(module: nn.Module, cls: type) -> bool:
    return type(module) is cls and not module._forward_hooks and not module._forward_pre_hooks


class _Operands(NamedTuple):
    """What `herd_cpu::decode_block` takes from the block, read once per plan (module attribute
    lookups cost ~0.5 us each, several per call)."""

    kind: int
    tensors: list[torch.Tensor]  # the seven weights' kernel tensors, in the op's order (int4 tiles: tiles only)
    group_size: int
    a8: bool
    layer: int
    attention_norm: torch.Tensor
    ffn_norm: torch.Tensor
    eps: float
    n_heads: int
    sources: list[torch.Tensor]  # int4 tiles: the row-layout tensors they were built from
    gates: tuple  # objects whose `.eager` is True while a step needs the eager block (multi-LoRA rows)


def _block_operands(block: TransformerBlock) -> _Operands | None:
    """The op's operands for this block, or None when it is not fusable."""
    att, ffn = block.attention, block.feed_forward
    if not (_plain(att, Attention) and _plain(ffn, FeedForward) and _plain(block.attention_norm, RMSNorm)
            and _plain(block.ffn_norm, RMSNorm)) or "attend" in att.__dict__:  # context parallel's seam
        return None
    if block.attention_norm.eps != block.ffn_norm.eps:
        return None
    tensors: list[torch.Tensor] = []
    sources: list[torch.Tensor] = []
    gates: dict[int, object] = {}
    first = None
    for lin in (att.wq, att.wk, att.wv, att.wo, ffn.w1, ffn.w2, ffn.w3):
        gate = lin.__dict__.get("adapter_rows")  # herd.generate.adapters.MultiLoRALinear's shared AdapterRows
        if gate is not None:
            gates[id(gate)] = gate
        kw = kernel_weight(lin)
        if kw is None or lin._forward_hooks or lin._forward_pre_hooks:
            return None
        if first is None:
            first = kw
        elif (kw.kind, kw.group_size, kw.int8_activations) != (first.kind, first.group_size, first.int8_activations):
            return None  # mixed formats in one block: the eager path handles them
        if kw.kind == KIND_INT4_TILES:  # the op takes the tiles alone (the shapes follow from the model's)
            tensors.append(kw.tensors[3])
            sources.extend(kw.tensors[:3])
        else:
            tensors.extend(kw.tensors)
    if any(not t.is_contiguous() or t.device.type != "cpu" for t in tensors):
        return None
    return _Operands(first.kind, tensors, first.group_size, first.int8_activations, att.layer_id,
                     block.attention_norm.weight, block.ffn_norm.weight, block.attention_norm.eps, att.n_heads, sources,
                     tuple(gates.values()))


def _written(operands: _Operands | None) -> tuple[list[torch.Tensor], list[int]]:
    """The row-layout tensors int4 tiles were built from, and their versions: the op reads the
    tiles, a copy, so an in-place write into these (load_state_dict) must rebuild them (~0.5 us
    per block to check; weights of the other formats are read where they are, and need nothing)."""
    if operands is None:
        return [], []
    sources = [t for t in operands.sources if not t.is_inference()]
    return sources, list(map(_version, sources))


_version = operator.attrgetter("_version")


def _state(block: TransformerBlock) -> list:
    """Every object the fused call depends on: submodules, their tensors and the attributes the op
    reads, and hook dicts' emptiness. Comparing it by identity is ~10x cheaper than rebuilding the
    operands each call."""
    mods = block._modules
    att, ffn, an, fn = mods["attention"], mods["feed_forward"], mods["attention_norm"], mods["ffn_norm"]
    a = att.__dict__
    state = [att, ffn, an, fn, a.get("attend"), a.get("layer_id"), a.get("n_heads"), an.__dict__.get("eps"),
             fn.__dict__.get("eps"), *an._parameters.values(), *fn._parameters.values()]
    for lin in (*att._modules.values(), *ffn._modules.values()):
        state += (lin, *lin._parameters.values(), *lin._buffers.values(), lin.__dict__.get("activations"))
    for m in (att, ffn, *att._modules.values(), *ffn._modules.values()):
        state.append(bool(m._forward_hooks or m._forward_pre_hooks))
    return state


class FusedDecodeBlock(TransformerBlock):
    """A `TransformerBlock` whose decode steps run as one `herd_cpu::decode_block` call.

    It holds the original block's submodules (same names, same parameters); any call the fused
    op does not cover goes to `TransformerBlock.forward`. The operands are read from the
    submodules once and reused until any of them changes (a module swap, new weight tensors, a
    hook); weights updated in place need nothing, since the op reads their memory at each call
    (int4 tiles, a repacked copy, are rebuilt: see `_written`).
    """

    def __init__(self, block: TransformerBlock):
        nn.Module.__init__(self)
        self.attention, self.feed_forward = block.attention, block.feed_forward
        self.attention_norm, self.ffn_norm = block.attention_norm, block.ffn_norm
        # (_state, _block_operands, *_written) at the last check
        self._plan: tuple[list, _Operands | None, list, list] | None = None

    def _operands(self) -> _Operands | None:
        state = _state(self)
        plan = self._plan
        # map() keeps the comparisons in C: a generator per element cost more than the rest here.
        if (plan is None or len(plan[0]) != len(state) or any(map(operator.is_not, plan[0], state))
                or list(map(_version, plan[2])) != plan[3]):
            operands = _block_operands(self)  # int4 tiles are rebuilt here when their source changed
            plan = self._plan = (_state(self), operands, *_written(operands))
        return plan[1]

    def forward(self, x, freqs_cis, mask: AttentionMask, cache):
        ops = cpu_kernels()
        B, S, _ = x.shape
        fusable = (
            ops is not None and S == 1 and B <= MAX_ROWS and type(cache) is KVCache and x.dtype == torch.float32
            and x.device.type == "cpu" and not torch.is_grad_enabled() and not _global_hooks()
        )
        op = self._operands() if fusable else None
        if op is None or cache.k[op.layer].dtype != torch.float32 or any(g.eager for g in op.gates):
            return super().forward(x, freqs_cis, mask, cache)
        pos, rope = _step_inputs(mask, freqs_cis)
        return ops.decode_block(
            x.contiguous(), pos, rope, cache.k[op.layer], cache.v[op.layer], op.attention_norm, op.ffn_norm, op.tensors,
            op.kind, op.group_size, op.a8, op.eps, op.n_heads, mask.kv_len,
        )  # (B, 1, dim)


_last_step: list = [None, None, None, None]  # mask, freqs_cis -> pos (B,), rope (B, D/2, 2): shared by all blocks


def _step_inputs(mask: AttentionMask, freqs_cis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The op's position and RoPE inputs, computed by the first block of a step and reused by the rest."""
    last = _last_step
    if last[0] is not mask or last[1] is not freqs_cis:
        # Strong references: the cached objects cannot be freed and their ids reused.
        last[:] = [mask, freqs_cis, mask.pos.reshape(-1), torch.view_as_real(freqs_cis).contiguous()]
    return last[2], last[3]


def _global_hooks() -> bool:
    m = nn.modules.module
    return bool(m._global_forward_hooks or m._global_forward_pre_hooks)


def _rebuild(cls: type, block: TransformerBlock) -> TransformerBlock:
    if cls is FusedDecodeBlock:
        return FusedDecodeBlock(block)
    plain = TransformerBlock.__new__(TransformerBlock)
    nn.Module.__init__(plain)
    plain.attention, plain.feed_forward = block.attention, block.feed_forward
    plain.attention_norm, plain.ffn_norm = block.attention_norm, block.ffn_norm
    plain.train(block.training)
    return plain


def apply_fast_decode(model: Transformer, *, huge_pages: bool = True) -> int:
    """Swap each plain `TransformerBlock` of `model` for a `FusedDecodeBlock`; returns how many.

    0 when the CPU kernels are unavailable (the reason is logged). Blocks with hooks or of
    another class (wrapped for checkpointing, say) are left alone. Apply it after `quantize` or
    `apply_cpu_kernels`; later module swaps are seen too (formats are read at every call).
    huge_pages: also move the model's CPU weights into transparent huge pages
    (`herd.kernels.hugepages`), which speeds up decode's weight stream by 10-30%.
    """
    if cpu_kernels() is None:
        log.warning("apply_fast_decode: decode keeps the eager blocks (%s)", unavailable_reason())
        return 0
    if huge_pages:
        move_to_huge_pages(model)
    swapped = 0
    for name, block in list(model.layers.items()):
        if type(block) is TransformerBlock and not block._forward_hooks and not block._forward_pre_hooks:
            fused = _rebuild(FusedDecodeBlock, block)
            fused.train(block.training)
            model.layers[name] = fused
            swapped += 1
    return swapped


def remove_fast_decode(model: Transformer) -> int:
    """Undo `apply_fast_decode`: plain `TransformerBlock`s over the same submodules; returns how many."""
    restored = 0
    for name, block in list(model.layers.items()):
        if type(block) is FusedDecodeBlock:
            model.layers[name] = _rebuild(TransformerBlock, block)
            restored += 1
    return restored
