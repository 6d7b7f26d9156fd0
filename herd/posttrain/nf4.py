"""4-bit NormalFloat (NF4) weights with double-quantised scales, the frozen base of QLoRA.

NF4 (Dettmers et al. 2023) stores each weight as one of 16 levels placed at quantiles of a
standard normal, scaled by the absolute maximum of its block of 64 weights. Those fp32 block
scales are themselves quantised ("double quantisation"): their mean is subtracted and the rest
stored as int8 per group of 256 scales, with one fp32 absmax per group. Cost per weight:
4 + 8/64 + 32/(64*256) = 4.127 bits, against 16 for bf16 and 32 for fp32.

Error bound (tested): with s the block absmax, s' its double-quantised value, and the largest
half gap between adjacent levels g = 0.1519 (between -1 and -0.6962),

    |w - dequant(w)| <= g * s + |s - s'| <= g * s + a / 254,

where a is the absmax of (scale - mean) over the scale's group of 256 (int8 rounding is at most
half a step of a/127). Levels are picked with the true scale s; storing s' adds at most
|level| * |s - s'| <= |s - s'|.

Trade-off: compute dequantises the whole matrix to the activation dtype on every forward and
again in the backward (for the input gradient) instead of running a 4-bit matmul kernel. That
keeps the code plain PyTorch and the saved state 4-bit (nothing dequantised is kept for the
backward pass), at the price of one dequantisation per use, which on CPU costs about as much as
reading an fp32 weight. Written here rather than taken from torchao: its NF4 module path has
moved between releases and the format is 60 lines.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

BLOCK_SIZE = 64
SCALE_GROUP = 256


def _nf4_levels() -> torch.Tensor:
    # QLoRA's construction: 8 positive and 7 negative normal quantiles (asymmetric so that 0 is
    # exactly representable), offset 0.9677 so the outermost quantile is finite, normalised to [-1, 1].
    offset = 0.9677083
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    return (levels / levels.max()).float()


NF4_LEVELS = _nf4_levels()  # (16,) ascending, -1.0 ... 1.0
MAX_HALF_GAP = float((NF4_LEVELS[1:] - NF4_LEVELS[:-1]).max() / 2)
_MIDPOINTS = (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2  # (15,) decision boundaries
# Byte -> its two levels (high nibble, low nibble): one gather decodes a byte, so dequantising
# needs no unpacked index tensor (that alone was 8 bytes per weight as int64).
_PAIR_LEVELS = torch.stack([NF4_LEVELS.repeat_interleave(16), NF4_LEVELS.repeat(16)], dim=1)  # (256, 2)


class NF4Weight(nn.Module):
    """A frozen matrix in NF4; its four tensors are buffers, so they move, save and count as the model's.

    codes: (numel / 2,) uint8, two 4-bit level indices per byte (high nibble first)
    scale_codes: (n_blocks,) int8; scale_absmax: (n_groups,) fp32; scale_mean: () fp32
    """

    def __init__(self, weight: torch.Tensor, *, block_size: int = BLOCK_SIZE, scale_group: int = SCALE_GROUP):
        super().__init__()
        if weight.numel() % block_size != 0 or block_size % 2 != 0:
            raise ValueError(
                f"NF4 needs the number of weights ({weight.numel()}) to be a multiple of the block size "
                f"({block_size}); leave this layer in full precision"
            )
        self.shape = tuple(weight.shape)
        self.dtype = weight.dtype
        self.block_size, self.scale_group = block_size, scale_group
        w = weight.detach().float().reshape(-1, block_size)  # (n_blocks, block)
        scales = w.abs().amax(dim=1)  # (n_blocks,)
        normed = w / scales.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(1)
        idx = torch.bucketize(normed, _MIDPOINTS.to(normed.device)).to(torch.uint8).reshape(-1)  # nearest level
        self.register_buffer("codes", (idx[0::2] << 4) | idx[1::2])
        mean = scales.mean()
        dev = scales - mean
        n_blocks = dev.numel()
        pad = (-n_blocks) % scale_group
        groups = F.pad(dev, (0, pad)).reshape(-1, scale_group)  # (n_groups, group)
        absmax = groups.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
        q = torch.round(groups / absmax.unsqueeze(1) * 127).to(torch.int8).reshape(-1)[:n_blocks]
        self.register_buffer("scale_codes", q)
        self.register_buffer("scale_absmax", absmax)
        self.register_buffer("scale_mean", mean)

    def block_scales(self) -> torch.Tensor:
        """The dequantised per-block scales s' (n_blocks,) fp32."""
        n = self.scale_codes.numel()
        groups = self.scale_absmax.repeat_interleave(self.scale_group)[:n]
        return self.scale_codes.float() / 127 * groups + self.scale_mean

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        levels = _PAIR_LEVELS.to(self.codes.device)[self.codes.int()]  # (numel / 2, 2) fp32
        w = levels.view(-1, self.block_size).mul_(self.block_scales().unsqueeze(1))  # (n_blocks, block)
        return w.view(self.shape).to(dtype or self.dtype)

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())


class _NF4Linear(torch.autograd.Function):
    """y = x W^T with W dequantised in forward and again in backward: nothing full-size is saved."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, nf4: NF4Weight) -> torch.Tensor:
        ctx.nf4 = nf4
        return F.linear(x, nf4.dequantize(x.dtype))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        return grad_out @ ctx.nf4.dequantize(grad_out.dtype), None


def nf4_linear(x: torch.Tensor, nf4: NF4Weight) -> torch.Tensor:
    """x (..., in) @ W^T (out, in) for a frozen NF4 weight; gradients flow to x only."""
    return _NF4Linear.apply(x, nf4)
