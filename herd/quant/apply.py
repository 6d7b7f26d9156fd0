"""`quantize(model, config)` and `apply_cpu_kernels(model)`: module swaps from outside the model.

The model's code never changes: these functions walk a built `Transformer` and replace
`nn.Linear` children with the modules of `herd.quant.linear`, keeping the attribute names, so
the state-dict keys stay Meta's (`layers.3.feed_forward.w1.weight`, plus `.scale` etc.).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from herd.kernels import cpu_kernels, unavailable_reason
from herd.model.llama import Transformer
from herd.quant.linear import ACTIVATION_MODES, ACTIVATION_SCALE_UB, CpuKernelLinear, Fp8Linear, Int4Linear, Int8Linear

log = logging.getLogger("herd.quant")

Scheme = Literal["int8", "int4", "fp8"]
SCHEMES: tuple[str, ...] = ("int8", "int4", "fp8")
Head = Literal["int8", "same", "float"]
HEADS: tuple[str, ...] = ("int8", "same", "float")
QUANTIZED_TYPES = (Int8Linear, Int4Linear, Fp8Linear)


@dataclass(frozen=True)
class QuantConfig:
    """What to quantize and how.

    scheme: "int8" (weight-only, per output channel) and "int4" (weight-only, group-wise)
        quantize every linear layer of the blocks; "fp8" follows the Llama 3 paper (section
        6.2): only feed-forward w1/w3/w2, never attention, the first or last block, the
        embedding or the head.
    head: the output head's format for int8 / int4. None (the default) means "int8": the head
        turns every hidden state into the next-token choice, so its error is not averaged away
        by later layers, and llama.cpp's 4-bit mixes keep it at Q6_K / Q8_0 too. On SmolLM2-135M
        at int4 an int4 head kept fp32's top-1 at 85% of positions, an int8 head at 98%.
        "same" gives it the scheme's own format (the smallest file), "float" leaves it
        unquantized (and tied, if it was). fp8 never quantizes the head; it accepts only None
        or "float".
    group_size: int4 inputs per (scale, min) pair; must divide every layer's in_features. 32 (5.0
        bits per weight), llama.cpp's block: on SmolLM2 group 64 (4.5 bits, Q4_0's size) lost to
        Q4_0 in perplexity, and at 32 GGUF Q4_0 / Q4_1 files map onto the same format exactly.
    activation_scale_ub: fp8 only; a token's abs-max is clamped to this before scaling (1200
        in the paper and Meta's reference).
    activations: int8 / int4 only. "float" keeps decode exact; "int8" lets the CPU decode kernels
        quantize each activation row to int8 per block of 32 inputs (llama.cpp's Q8_0 for
        activations) and multiply in integers: faster, with a bounded extra error (cpu_gemv.cpp).
    """

    scheme: Scheme
    group_size: int = 32
    activation_scale_ub: float = ACTIVATION_SCALE_UB
    activations: Literal["float", "int8"] = "float"
    head: Head | None = None

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ValueError(f"unknown quantization scheme {self.scheme!r}; choose one of {', '.join(SCHEMES)}")
        if self.head is not None and self.head not in HEADS:
            raise ValueError(f"head must be one of {', '.join(HEADS)}, got {self.head!r}")
        if self.scheme == "fp8" and self.head not in (None, "float"):
            raise ValueError(f"fp8 follows the Llama 3 paper and never quantizes the output head; drop head="
                             f"{self.head!r} (--head), or quantize with int8 / int4")
        if self.group_size <= 0 or self.group_size % 32 != 0:
            raise ValueError(f"group_size must be a positive multiple of 32, got {self.group_size}")
        if self.activations not in ACTIVATION_MODES:
            raise ValueError(f"activations must be one of {', '.join(ACTIVATION_MODES)}, got {self.activations!r}")
        if self.activations != "float" and self.scheme == "fp8":
            raise ValueError("activations='int8' applies to int8 and int4; fp8 always quantizes activations to fp8")
        if not self.activation_scale_ub > 0:
            raise ValueError(f"activation_scale_ub must be > 0, got {self.activation_scale_ub}")


    @property
    def head_scheme(self) -> Scheme | None:
        """The output head's scheme under this recipe; None keeps it in float."""
        if self.scheme == "fp8" or self.head == "float":
            return None
        return self.scheme if self.head == "same" else "int8"


@dataclass(frozen=True)
class QuantReport:
    """What `quantize` did: which modules changed, and the weight bytes of those modules."""

    scheme: Scheme
    modules: tuple[str, ...]  # quantized module names, e.g. "layers.1.feed_forward.w1"
    bytes_before: int  # of the replaced modules' weights
    bytes_after: int  # of their quantized buffers (codes + scales)
    head: str = "float"  # the output head's format afterwards: "int8", "int4" or "float"


def quantization_plan(model: Transformer, config: QuantConfig) -> dict[str, Scheme]:
    """The `nn.Linear` modules `config` replaces, in model order, each with its scheme."""
    plan: dict[str, Scheme] = {}
    last = model.args.n_layers - 1
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if name == "output":
            if config.head_scheme is not None:
                plan[name] = config.head_scheme
            continue
        if config.scheme == "fp8":
            parts = name.split(".")  # layers.{i}.feed_forward.w{1,2,3}
            is_ffn = len(parts) == 4 and parts[0] == "layers" and parts[2] == "feed_forward"
            # Meta skips blocks by layer_id, so a pipeline stage holding layer 0 still skips it.
            if not is_ffn or int(parts[1]) in (0, last):
                continue
        plan[name] = config.scheme
    return plan


def modules_to_quantize(model: Transformer, scheme: Scheme) -> list[str]:
    """Names of the `nn.Linear` modules the default recipe of `scheme` replaces, in model order."""
    return list(quantization_plan(model, QuantConfig(scheme)))


def quantize_linear(linear: nn.Linear, scheme: Scheme, config: QuantConfig) -> nn.Module:
    """One `nn.Linear` -> its quantized replacement in `scheme`, with `config`'s parameters."""
    if scheme == "int8":
        return Int8Linear.from_linear(linear, activations=config.activations)
    if scheme == "int4":
        return Int4Linear.from_linear(linear, group_size=config.group_size, activations=config.activations)
    return Fp8Linear.from_linear(linear, activation_scale_ub=config.activation_scale_ub)


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, new)


def _buffer_bytes(module: nn.Module) -> int:
    return sum(b.numel() * b.element_size() for b in module.buffers())


@torch.no_grad()
def quantize(model: Transformer, config: QuantConfig) -> QuantReport:
    """Replace `model`'s linear layers in place according to `config`; returns what changed.

    Quantization runs on the weights' device, in fp32. Quantizing the head of a model with tied
    embeddings unties it: the embedding keeps its float weights (a lookup reads one row per
    token, so shrinking it would not speed decoding), the head gets quantized codes.
    """
    if any(isinstance(m, QUANTIZED_TYPES) for m in model.modules()):
        raise ValueError("this model is already quantized; quantize the float checkpoint instead")
    plan = quantization_plan(model, config)
    if not any(name != "output" for name in plan):
        raise ValueError(f"{config.scheme} leaves this {model.args.n_layers}-layer model unchanged: it quantizes only "
                         "the feed-forward layers of blocks 1..n-2 (the paper's rule), so it needs >= 3 layers")
    before = after = 0
    for name, scheme in plan.items():
        linear = model.get_submodule(name)
        before += linear.weight.numel() * linear.weight.element_size()
        new = quantize_linear(linear, scheme, config)
        after += _buffer_bytes(new)
        _set_module(model, name, new)
    head = plan.get("output", "float")
    log.info("quantized %d modules to %s (head %s): %.1f MiB -> %.1f MiB", len(plan), config.scheme, head,
             before / 2**20, after / 2**20)
    return QuantReport(scheme=config.scheme, modules=tuple(plan), bytes_before=before, bytes_after=after, head=head)


def apply_cpu_kernels(model: nn.Module) -> int:
    """Route decode-sized fp32 matmuls of every plain CPU `nn.Linear` through herd's GEMV kernel,
    and repack every CPU `Int4Linear` into the decode kernels' tiles (`Int4Linear.repack`).

    Returns how many fp32 layers now use the kernel: 0 when the kernels cannot be built (the
    reason is logged once) or nothing qualifies. The parameters are shared, not copied, so tied
    weights stay tied and `state_dict()` is unchanged. Quantized modules pick their kernels
    themselves; int4 ones read the tiles once repacked (the row layout stays for everything else).
    """
    int4 = [m for m in model.modules() if isinstance(m, Int4Linear) and m.weight.device.type == "cpu"]
    targets = [
        name for name, m in model.named_modules()
        if type(m) is nn.Linear and m.weight.dtype == torch.float32 and m.weight.device.type == "cpu"
    ]
    if not (targets or int4) or cpu_kernels() is None:
        if targets or int4:
            log.warning("apply_cpu_kernels: leaving %d layers on MKL / ATen (%s)", len(targets) + len(int4),
                        unavailable_reason())
        return 0
    repacked = sum(m.repack() for m in int4)
    if int4:
        log.info("apply_cpu_kernels: %d of %d int4 layers repacked into the decode kernels' tiles", repacked, len(int4))
    for name in targets:
        old = model.get_submodule(name)
        new = CpuKernelLinear(old.in_features, old.out_features, bias=old.bias is not None, device="meta")
        new.weight = old.weight
        if old.bias is not None:
            new.bias = old.bias
        _set_module(model, name, new)
    return len(targets)
