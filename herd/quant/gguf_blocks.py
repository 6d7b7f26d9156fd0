"""GGUF quantized blocks in herd's formats: Q4_0 / Q4_1 become int4 at group 32 without loss.

A GGUF file stores each weight row as blocks of 32 inputs (ggml-common.h, gguf.quants):

    Q4_1  fp16 d, fp16 m, 16 bytes of nibbles:  w = q * d + m
    Q4_0  fp16 d, 16 bytes of nibbles:           w = (q - 8) * d
    Q8_0  fp16 d, 32 int8:                       w = q * d

where byte j of a block holds input j in its low nibble and input 16 + j in its high one.
herd's int4 (`w = q * s + m`, fp16 s and m per group) is Q4_1 at group 32 with the nibbles in
another order, so a Q4_1 tensor maps exactly: the codes are repacked, d and m are copied.
Q4_0 is the same with m = -8 d, which is exact in fp16 (a product by 8 only moves the exponent,
subnormal d included) unless |8 d| exceeds fp16's 65504; such a tensor is dequantized instead.
The dequantized values then equal `gguf.quants.dequantize` bit for bit, but for the sign of a
zero weight (Q4_0 computes 0 * d = -0.0 for negative d, herd 8d - 8d = +0.0), which no sum sees.

Trade-off: Q8_0's scales are per 32 inputs and herd's int8 has one per row, so Q8_0 (and every
K-quant, whose super-blocks have no herd counterpart) is dequantized to float32, and the caller
then keeps it in float or quantizes it with herd's recipe. A lossless Q8_0 would need a second
int8 format and its own kernels for one source of weights. The cost is measured: SmolLM2's tied
Q8_0 head requantized to herd's per-row int8 (relative RMS change 0.012) moves held-out
perplexity by +0.25% and fp32's top-1 choice at 2% of positions; `QuantConfig(head="float")`
keeps the Q8_0 values exactly, at 4 bytes a weight. The builder names every tensor it did not
map exactly, so a double rounding is never silent.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from herd.model.args import ModelArgs
from herd.model.llama import Transformer
from herd.quant.apply import QuantConfig, QuantReport, quantization_plan, quantize_linear
from herd.quant.linear import Int4Linear, pack_int4

log = logging.getLogger("herd.quant")

GROUP = 32  # inputs per GGUF block of the legacy types
_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20}
FP16_MAX = 65504.0
FLOAT_TYPES = ("F32", "F16", "BF16", "F64")


class RawTensorLike(Protocol):
    """A GGUF tensor as stored: its GGML type (a name or a `gguf.GGMLQuantizationType`), its
    shape and its bytes (`herd.model.gguf.RawTensor`, or anything with these attributes)."""

    type: Any
    shape: Any
    data: np.ndarray


def type_name(ggml_type: Any) -> str:
    """"Q4_1" for the string "Q4_1", a `gguf.GGMLQuantizationType.Q4_1` or its integer value."""
    if isinstance(ggml_type, str):
        return ggml_type.upper()
    if isinstance(ggml_type, (int, np.integer)) and not hasattr(ggml_type, "name"):
        import gguf

        return gguf.GGMLQuantizationType(int(ggml_type)).name
    return ggml_type.name


@dataclass(frozen=True)
class Int4Blocks:
    """herd int4 buffers (`Int4Linear`'s weight, scales, mins) at group 32."""

    weight: torch.Tensor  # uint8 (N, K/2), herd's nibble packing
    scales: torch.Tensor  # fp16 (N, K/32)
    mins: torch.Tensor  # fp16 (N, K/32)
    group_size: int = GROUP

    def to_linear(self, *, activations: str = "float") -> Int4Linear:
        n, half = self.weight.shape
        mod = Int4Linear(2 * half, n, group_size=self.group_size, activations=activations, device="meta")
        mod.weight, mod.scales, mod.mins = self.weight, self.scales, self.mins
        return mod

    def dequantize(self) -> torch.Tensor:
        return self.to_linear().dequantize(torch.float32)


def _blocks(data: np.ndarray, shape: tuple[int, int], name: str) -> torch.Tensor:
    """Raw bytes of a Q4_0 / Q4_1 tensor -> uint8 (N, K/32, block bytes), checking the size."""
    n, k = (int(s) for s in shape)
    nbytes = _BLOCK_BYTES[name]
    if k % GROUP != 0:
        raise ValueError(f"a {name} tensor's rows hold whole blocks of {GROUP}, but shape {(n, k)} has {k} inputs; "
                         "pass the torch shape (rows, inputs), the reverse of GGUF's innermost-first listing")
    rows = np.ascontiguousarray(data).view(np.uint8)
    raw = rows.reshape(-1)
    # 2-D data (GGUFReader's) is one row of blocks per weight row: that checks the row length too.
    if raw.size != n * (k // GROUP) * nbytes or (rows.ndim == 2 and rows.shape[0] != n):
        raise ValueError(f"{name} data of {raw.size} bytes does not hold a {(n, k)} tensor "
                         f"({n * (k // GROUP) * nbytes} bytes); pass the torch shape (rows, inputs)")
    return torch.from_numpy(raw.copy()).view(n, k // GROUP, nbytes)


def _fp16(blocks: torch.Tensor, offset: int) -> torch.Tensor:
    return blocks[..., offset:offset + 2].contiguous().view(torch.float16)[..., 0]  # (N, K/32)


def _codes(nibbles: torch.Tensor) -> torch.Tensor:
    """GGML's 16 bytes per block -> codes (N, K) in input order: low nibbles 0..15, high 16..31."""
    n = nibbles.shape[0]
    return torch.cat([nibbles & 0xF, nibbles >> 4], dim=-1).view(n, -1)  # (N, K/32, 32) -> (N, K)


def q4_to_int4(ggml_type: Any, data: np.ndarray, shape: tuple[int, int]) -> Int4Blocks | None:
    """The exact int4 form of a Q4_0 / Q4_1 tensor of torch shape (rows, inputs).

    None when there is none: another type, or a Q4_0 block whose min -8 d overflows fp16.
    """
    name = type_name(ggml_type)
    if name not in _BLOCK_BYTES:
        return None
    blocks = _blocks(data, shape, name)
    d = _fp16(blocks, 0)
    if name == "Q4_1":
        mins, nibbles = _fp16(blocks, 2), blocks[..., 4:]
    else:
        if not bool((d.float().abs() * 8 <= FP16_MAX).all()):
            return None
        mins, nibbles = d * -8, blocks[..., 2:]  # exact: a power-of-two product, in range
    return Int4Blocks(weight=pack_int4(_codes(nibbles)), scales=d.clone(), mins=mins.contiguous())


def dequantize_blocks(ggml_type: Any, data: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
    """Any GGUF tensor -> float32 of torch shape `shape`, with `gguf.quants.dequantize`."""
    import gguf

    name = type_name(ggml_type)
    qtype = gguf.GGMLQuantizationType[name]
    values = gguf.quants.dequantize(np.ascontiguousarray(data), qtype)
    shape = tuple(int(s) for s in shape)
    if values.size != int(np.prod(shape)):
        raise ValueError(f"{name} data holds {values.size} values, not a {shape} tensor")
    return torch.from_numpy(np.asarray(values, dtype=np.float32).reshape(shape).copy())


# ---- a herd quantized Transformer from GGUF tensors -------------------------------------------


@dataclass(frozen=True)
class GgufQuantized:
    """`quantized_model_from_gguf`'s model and what became of each quantized GGUF tensor.

    exact: modules whose Q4_0 / Q4_1 blocks became int4 at group 32 unchanged.
    requantized: module -> GGUF type, for quantized GGUF weights that were dequantized and then
        quantized again by herd's recipe (two roundings).
    dequantized: tensor -> GGUF type, for quantized GGUF weights now held in float32.
    report: what `quantize` would say: every quantized module, exact ones included, and its bytes
        (before: as float32).
    """

    model: Transformer
    exact: tuple[str, ...]
    requantized: dict[str, str]
    dequantized: dict[str, str]
    report: QuantReport


def _source_of(raw: Mapping[str, RawTensorLike], name: str, args: ModelArgs) -> RawTensorLike | None:
    if name == "output" and "output.weight" not in raw and args.tie_embeddings:
        return raw.get("tok_embeddings.weight")  # llama.cpp writes no output.weight for a tied head
    return raw.get(f"{name}.weight")


def quantized_model_from_raw(
    args: ModelArgs,
    state_dict: Mapping[str, torch.Tensor],
    raw: Mapping[str, RawTensorLike],
    config: QuantConfig,
) -> GgufQuantized:
    """Build a quantized `Transformer` from a GGUF file's float reading and its raw blocks.

    state_dict: herd names -> float weights (the whole model, dequantized); raw: herd names ->
    the same tensors as stored, in herd's row order. Every linear layer whose GGUF tensor is
    Q4_0 / Q4_1 becomes int4 at group 32 with the file's codes and scales, the head included:
    the recipe's scheme, group size and head format do not apply to it, since the blocks are
    already 4-bit and any other format would only add error or bytes. Every other linear layer
    follows `config`; the embedding and norms stay float32.
    """
    with torch.device("meta"):
        model = Transformer(args)
    sd = {k: v.to(torch.float32) for k, v in state_dict.items()}
    if args.tie_embeddings:  # one tensor, whether or not the reader listed it twice
        sd["output.weight"] = sd["tok_embeddings.weight"]
    model.load_state_dict(sd, strict=True, assign=True)
    if args.tie_embeddings:
        model.tie_weights()
    model.freqs_cis = torch.empty(0)  # built on meta; recompute on the CPU
    model.init_rope()

    plan = quantization_plan(model, config)
    exact: list[str] = []
    requantized: dict[str, str] = {}
    dequantized: dict[str, str] = {}
    done: list[str] = []
    before = after = 0
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    for name in linears:
        linear = model.get_submodule(name)
        src = _source_of(raw, name, args)
        kind = type_name(src.type) if src is not None else "F32"
        blocks = q4_to_int4(src.type, src.data, tuple(linear.weight.shape)) if src is not None else None
        if blocks is not None:
            new: nn.Module = blocks.to_linear(activations=config.activations)
            exact.append(name)
        elif name in plan:
            new = quantize_linear(linear, plan[name], config)
            if kind not in FLOAT_TYPES:
                requantized[name] = kind
        else:
            if kind not in FLOAT_TYPES:
                dequantized[name] = kind
            continue
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, new)
        done.append(name)
        before += linear.weight.numel() * linear.weight.element_size()
        after += sum(b.numel() * b.element_size() for b in new.buffers())
    emb = raw.get("tok_embeddings.weight")
    if emb is not None and type_name(emb.type) not in FLOAT_TYPES:
        dequantized["tok_embeddings"] = type_name(emb.type)  # a lookup reads one row: float costs no speed
    if exact and config.scheme != "int4":
        log.warning("kept %d Q4_0/Q4_1 GGUF tensors as int4 at group 32, exactly as stored (as %s they would only "
                    "gain error or bytes); %s applies to the other linear layers", len(exact), config.scheme,
                    config.scheme)
    if requantized or dequantized:
        log.warning("GGUF tensors not mapped exactly: requantized by the %s recipe %s; dequantized to float %s",
                    config.scheme, requantized, dequantized)
    head = "int4" if "output" in exact else plan.get("output", "float")
    report = QuantReport(scheme=config.scheme, modules=tuple(done), bytes_before=before, bytes_after=after, head=head)
    return GgufQuantized(model=model.eval(), exact=tuple(exact), requantized=requantized, dequantized=dequantized,
                         report=report)


def quantized_model_from_gguf(path: str | os.PathLike, config: QuantConfig | None = None) -> GgufQuantized:
    """A herd quantized `Transformer` from a llama-architecture GGUF file (default recipe: int4 at
    group 32, int8 head) whose Q4_0 / Q4_1 tensors keep their blocks exactly (see
    `quantized_model_from_raw`). Save it with `save_quantized`."""
    from herd.model.gguf import gguf_raw_tensors, read_gguf

    config = config or QuantConfig("int4", group_size=GROUP)
    ckpt = read_gguf(path)
    return quantized_model_from_raw(ckpt.args, ckpt.state_dict, gguf_raw_tensors(path), config)
