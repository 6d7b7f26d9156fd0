"""Quantized replacements for `nn.Linear`, and the tensor-level quantizers behind them.

Each module stores its weight in the quantized format as buffers (so `state_dict()` holds
exactly what is saved) and chooses a matmul per call:

* CPU, fp32 activations, at most 16 rows (decode and batched decode): herd's AVX2 GEMV kernels
  (`herd.kernels`; int4 reads its repacked copy once `repack()` made one, see `Int4Linear`); from
  17 to 512 rows (prompts) their tiled matmul, exact, which dequantizes the weight a cache-sized
  tile at a time. With `activations="int8"` (int8 and int4 only) a call of at most 16 rows
  quantizes the activation rows to int8 per block of 32 inputs and multiplies in integers,
  1.5-3x faster per core; the result then differs from the exact one by the activation rounding
  (bounded in gemv_kernels.h, tested). Longer calls (prompts) and the other paths stay exact.
* CPU int8 with bf16/fp16 activations: ATen's `_weight_int8pack_mm` (fast only for those).
* Anything else (long prompts, GPU, no compiler): dequantize to the activation dtype and `F.linear`.
  This is also the reference every fast path is tested against.

Formats (the trade-offs are in herd/quant/__init__.py):

    int8  weight int8 (N, K), scale fp32 (N,):           w = q * scale[n], q in [-127, 127]
    int4  weight uint8 (N, K/2), scales, mins fp16 (N, K/G):  w = q * s + m, q in [0, 15]
    fp8   weight float8_e4m3fn (N, K), scale fp32 (N,):  w = q * scale[n]; activations per token
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from herd.kernels import (
    KIND_F32,
    KIND_INT4,
    KIND_INT4_TILES,
    KIND_INT8,
    MAX_ROWS,
    KernelWeight,
    cpu_kernels,
)

# ---- int8, per output channel, symmetric ----------------------------------------------------


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float -> (int8 (N, K), fp32 scale (N,)), symmetric with 127 levels each side."""
    w = w.float()
    amax = w.abs().amax(dim=1).clamp(min=1e-12)  # all-zero rows get a harmless tiny scale
    scale = amax / 127.0
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.to(torch.float32) * scale[:, None]).to(dtype)


# ---- int4, group-wise, asymmetric ------------------------------------------------------------

_INT4_UNIT = 32  # inputs per packed unit (16 bytes); group sizes are multiples of it


def check_int4_shape(in_features: int, group_size: int) -> None:
    if group_size <= 0 or group_size % _INT4_UNIT != 0:
        raise ValueError(f"int4 group_size must be a positive multiple of {_INT4_UNIT}, got {group_size}")
    if in_features % group_size != 0:
        raise ValueError(
            f"int4 needs in_features divisible by group_size, but {in_features} % {group_size} != 0; "
            f"choose a group size that divides {in_features} (e.g. 32)"
        )


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, K) float -> (packed uint8 (N, K/2), scales fp16 (N, K/G), mins fp16 (N, K/G)).

    Each group maps [min, max] onto 0..15. The scale and min are rounded to fp16 *before* the
    codes are chosen, so the codes are the nearest ones for the values actually stored.
    """
    N, K = w.shape
    check_int4_shape(K, group_size)
    g = w.float().view(N, K // group_size, group_size)  # (N, G, g)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    mins = lo.to(torch.float16)
    scales = ((hi - lo) / 15.0).clamp(min=1e-8).to(torch.float16)
    s, m = scales.float().clamp(min=2**-24), mins.float()  # clamp: fp16 underflow to 0 must not divide
    q = torch.round((g - m[..., None]) / s[..., None]).clamp(0, 15).to(torch.uint8).view(N, K)
    return pack_int4(q), scales, mins


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Codes (N, K) in 0..15 -> (N, K/2) uint8 in the kernel's layout (see gemv_kernels.h).

    Per 32 inputs, four little-endian int32 words; nibble i of word l holds input 4*i + l.
    """
    N, K = q.shape
    assert K % _INT4_UNIT == 0
    # Little-endian word l holds nibbles i = 0..7 in bytes c = i // 2, so byte 4l + c of a unit
    # holds inputs 8c + l (low nibble) and 8c + 4 + l (high nibble).
    v = q.to(torch.uint8).view(N, K // 32, 4, 2, 4)  # (N, unit, c, nibble, l): input 8c + 4*nibble + l
    b = v[:, :, :, 0] | (v[:, :, :, 1] << 4)  # (N, unit, c, l)
    return b.transpose(2, 3).reshape(N, K // 2)  # (N, unit, l, c) -> byte 4l + c


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_int4`: (N, K/2) uint8 -> codes (N, K) uint8."""
    N, half = packed.shape
    words = packed.contiguous().view(torch.int32).view(N, half // 16, 1, 4)  # (N, unit, 1, l)
    shifts = (4 * torch.arange(8, dtype=torch.int32, device=packed.device)).view(1, 1, 8, 1)
    return ((words >> shifts) & 0xF).to(torch.uint8).view(N, half * 2)  # (N, unit, i, l) -> (N, K)


def dequantize_int4(
    packed: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group_size: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    N = packed.shape[0]
    q = unpack_int4(packed).view(N, -1, group_size).float()  # (N, G, g)
    w = q * scales.float()[..., None] + mins.float()[..., None]
    return w.view(N, -1).to(dtype)


# ---- fp8 row-wise (Llama 3 paper section 6.2, FBGEMM's quantize_fp8_per_row) ---------------

FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP8_EPS = 1e-12
ACTIVATION_SCALE_UB = 1200.0  # the paper's upper bound on a token's abs-max


def quantize_fp8_rows(x: torch.Tensor, *, scale_ub: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, K) -> (float8_e4m3fn (R, K), fp32 scale (R,)), one scale per row, FBGEMM's arithmetic.

    row_max = max|x_row| clamped to [1e-12, scale_ub]; the row is multiplied by 448 / row_max,
    clamped to +-448 (values above the bound saturate) and rounded to e4m3; the stored scale
    is the reciprocal of the multiplier, so x ~= q * scale.
    """
    xf = x.float()
    row_max = xf.abs().amax(dim=-1)
    row_max = row_max.clamp(min=FP8_EPS, max=scale_ub) if scale_ub is not None else row_max.clamp(min=FP8_EPS)
    inv = FP8_MAX / row_max  # (R,)
    q = (xf * inv[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, inv.reciprocal()


def _scaled_mm_supported(device: torch.device) -> bool:
    # FP8 tensor-core GEMMs exist from compute capability 8.9 (Ada, Hopper) on.
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


# ---- modules ---------------------------------------------------------------------------------


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])  # (..., K) -> (M, K)


ACTIVATION_MODES = ("float", "int8")


def _check_activations(activations: str) -> str:
    if activations not in ACTIVATION_MODES:
        raise ValueError(f"activations must be one of {', '.join(ACTIVATION_MODES)}, got {activations!r}")
    return activations


# Quantized weights take herd's kernels up to these many rows: the GEMV kernels up to MAX_ROWS
# (decode, batched decode), the tiled matmul beyond (prompts: tiles of the weight dequantized to
# fp32 in cache, gemv.h). Above the limit the whole weight is dequantized once for MKL's GEMM.
# One core, 37-row prompt, against dequantize + F.linear: 576x1536 1.0-1.4x; 8192x2048 (1B's w1)
# int8 6x, int4 3.8x, and still 1.3x / 1.2x at 512 rows, where MKL's blocking starts to win.
# The earlier 16-row chunks through the GEMV kernels were 1.5-2x slower than the tiled matmul.
INT8_KERNEL_ROWS = 512
INT4_KERNEL_ROWS = 512


def _use_kernel(x2: torch.Tensor, weight: torch.Tensor, max_rows: int = MAX_ROWS) -> bool:
    # The kernels have no backward: anything autograd must differentiate takes the ATen path.
    needs_grad = torch.is_grad_enabled() and (x2.requires_grad or weight.requires_grad)
    return x2.device.type == "cpu" and x2.dtype == torch.float32 and x2.shape[0] <= max_rows and not needs_grad


def _quant_kernel(x2: torch.Tensor, exact, a8, matmul, activations: str, *weights) -> torch.Tensor:
    """x2 (M, K) through a quantized kernel: a GEMV kernel up to MAX_ROWS rows, else the tiled matmul.

    The int8-activation kernel serves calls of at most MAX_ROWS rows (decode and batched decode);
    longer inputs (prompts) take an exact kernel, so the activation rounding stays a decode-only
    cost. The matmul needs in_features % 8 == 0; other shapes go MAX_ROWS rows at a time through
    the exact GEMV kernel (rows are independent, so chunking changes no result).
    """
    x2 = x2.contiguous()
    M, K = x2.shape
    if M <= MAX_ROWS:
        return (a8 if activations == "int8" else exact)(x2, *weights)
    if K % 8 == 0:
        return matmul(x2, *weights)
    return torch.cat([exact(x2[i : i + MAX_ROWS], *weights) for i in range(0, M, MAX_ROWS)])


class Int8Linear(nn.Module):
    """Weight-only int8, one scale per output channel.

    activations: "float" (exact) or "int8" (the decode kernel quantizes activations per block of
    32 and uses integer dot products; see the module docstring).
    """

    def __init__(self, in_features: int, out_features: int, *, activations: str = "float",
                 device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.activations = _check_activations(activations)
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.empty(out_features, dtype=torch.float32, device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, activations: str = "float") -> Int8Linear:
        if linear.bias is not None:
            raise ValueError("herd's quantized linears have no bias (Llama has none)")
        mod = cls(linear.in_features, linear.out_features, activations=activations, device="meta")
        mod.weight, mod.scale = quantize_int8(linear.weight.detach())
        return mod

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_int8(self.weight, self.scale, dtype)

    def kernel_weight(self) -> KernelWeight:
        return KernelWeight(KIND_INT8, (self.weight, self.scale), 0, self.activations == "int8")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = _rows(x)
        if _use_kernel(x2, self.weight, INT8_KERNEL_ROWS) and (ops := cpu_kernels()) is not None:
            y = _quant_kernel(x2, ops.linear_int8, ops.linear_int8_a8, ops.matmul_int8, self.activations, self.weight,
                              self.scale)
        elif x2.device.type == "cpu" and x2.dtype in (torch.bfloat16, torch.float16):
            y = torch.ops.aten._weight_int8pack_mm(x2.contiguous(), self.weight, self.scale.to(x2.dtype))
        else:
            y = F.linear(x2, self.dequantize(x2.dtype))
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel, "
                f"activations={self.activations}")


def _tensor_versions(*tensors: torch.Tensor) -> tuple[int, ...] | None:
    """The tensors' version counters (bumped by every in-place write), or None where one has none:
    inference tensors keep no counter, and can only be written inside inference mode, which nothing
    in herd does to weights."""
    if any(t.is_inference() for t in tensors):
        return None
    return tuple(t._version for t in tensors)


class Int4Linear(nn.Module):
    """Weight-only int4, asymmetric, one fp16 scale and min per group of `group_size` inputs.

    `repack()` (called by `apply_cpu_kernels`) adds `tiles`, a copy of the weight in the CPU decode
    kernels' layout (8 rows interleaved, herd/kernels/int4_tiles.h), which decode then reads
    instead: ~2-3x faster per token at group 32. It is a non-persistent buffer: `state_dict()` and
    every reader of `weight` / `scales` / `mins` see the row layout, unchanged. The price is memory:
    the tiles take the int4 weights' bytes again (the row layout stays resident, for prompts'
    tiled matmul, `dequantize()` and saving), e.g. +66 MB on SmolLM2-135M, +0.6 GB on Llama 3.2 1B.
    Replacing or writing the row-layout tensors in place (load_state_dict) after a repack rebuilds
    the tiles at the next kernel call, so they never go stale.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        group_size: int,
        activations: str = "float",
        device: torch.device | str | None = None,
    ):
        super().__init__()
        check_int4_shape(in_features, group_size)
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.activations = _check_activations(activations)
        n_groups = in_features // group_size
        self.register_buffer("weight", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.empty(out_features, n_groups, dtype=torch.float16, device=device))
        self.register_buffer("mins", torch.empty(out_features, n_groups, dtype=torch.float16, device=device))
        self.register_buffer("tiles", None, persistent=False)
        self._tiles_of: tuple = ()  # (weight, scales, mins, their versions) the tiles were built from

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, group_size: int, activations: str = "float") -> Int4Linear:
        if linear.bias is not None:
            raise ValueError("herd's quantized linears have no bias (Llama has none)")
        mod = cls(linear.in_features, linear.out_features, group_size=group_size, activations=activations,
                  device="meta")
        mod.weight, mod.scales, mod.mins = quantize_int4(linear.weight.detach(), group_size)
        return mod

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_int4(self.weight, self.scales, self.mins, self.group_size, dtype)

    def repack(self) -> bool:
        """Build `tiles` for the CPU decode kernels; False (and no tiles) where they cannot run."""
        ops = cpu_kernels()
        w, s, m = self.weight, self.scales, self.mins
        ok = ops is not None and all(t.device.type == "cpu" and t.is_contiguous() for t in (w, s, m)) and (
            s.dtype == m.dtype == torch.float16)
        with torch.no_grad():
            self.tiles = ops.repack_int4(w, s, m, self.group_size) if ok else None
        self._tiles_of = (w, s, m, _tensor_versions(w, s, m)) if ok else ()
        return ok

    def current_tiles(self) -> torch.Tensor | None:
        """`tiles` if repacked, rebuilt first if the row-layout tensors changed since; else None."""
        if self.tiles is None:
            return None
        w, s, m = self.weight, self.scales, self.mins
        of = self._tiles_of
        if not (of and of[0] is w and of[1] is s and of[2] is m
                and (of[3] is None or of[3] == (w._version, s._version, m._version))):
            self.repack()
        return self.tiles

    def _apply(self, fn, recurse=True):
        # .to() / .float() / .cuda() reach `tiles` too, but only the CPU kernels read them: they are
        # kept if the row layout came through unchanged, else rebuilt from it (or dropped off CPU).
        tiles, self.tiles = self.tiles, None
        super()._apply(fn, recurse)
        if tiles is not None:
            self.tiles = tiles
            self.current_tiles()
        return self

    def kernel_weight(self) -> KernelWeight:
        tiles = self.current_tiles()
        if tiles is not None:
            return KernelWeight(KIND_INT4_TILES, (self.weight, self.scales, self.mins, tiles), self.group_size,
                                self.activations == "int8")
        return KernelWeight(KIND_INT4, (self.weight, self.scales, self.mins), self.group_size,
                            self.activations == "int8")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = _rows(x)
        if _use_kernel(x2, self.weight, INT4_KERNEL_ROWS) and (ops := cpu_kernels()) is not None:
            exact, a8 = ops.linear_int4, ops.linear_int4_a8
            if (tiles := self.current_tiles()) is not None:
                exact, a8 = partial(exact, tiles=tiles), partial(a8, tiles=tiles)
            y = _quant_kernel(x2, exact, a8, ops.matmul_int4, self.activations, self.weight, self.scales, self.mins,
                              self.group_size)
        elif x2.device.type == "cpu" and (ops := cpu_kernels()) is not None:
            w = ops.dequantize_int4(self.weight, self.scales, self.mins, self.group_size)  # one pass, fp32
            y = F.linear(x2, w.to(x2.dtype))
        else:
            y = F.linear(x2, self.dequantize(x2.dtype))
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, int4 group_size={self.group_size}, "
                f"activations={self.activations}")


class Fp8Linear(nn.Module):
    """FP8 e4m3 weights (one scale per output row) x FP8 activations (one scale per token).

    On CUDA devices with FP8 tensor cores this is `torch._scaled_mm`. Elsewhere the same
    quantized operands are multiplied in fp32: every e4m3 x e4m3 product is exact in fp32, so
    the emulation differs from the GPU only in summation order (and the GPU's fast accumulation).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        activation_scale_ub: float = ACTIVATION_SCALE_UB,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.activation_scale_ub = activation_scale_ub
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.float8_e4m3fn,
                                                   device=device))
        self.register_buffer("scale", torch.empty(out_features, dtype=torch.float32, device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, activation_scale_ub: float = ACTIVATION_SCALE_UB) -> Fp8Linear:
        if linear.bias is not None:
            raise ValueError("herd's quantized linears have no bias (Llama has none)")
        mod = cls(linear.in_features, linear.out_features, activation_scale_ub=activation_scale_ub, device="meta")
        mod.weight, mod.scale = quantize_fp8_rows(linear.weight.detach(), scale_ub=None)  # weights: no bound
        return mod

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.weight.float() * self.scale[:, None]).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = _rows(x)
        xq, x_scale = quantize_fp8_rows(x2, scale_ub=self.activation_scale_ub)  # (M, K), (M,)
        if _scaled_mm_supported(x2.device):
            y = torch._scaled_mm(xq, self.weight.t(), scale_a=x_scale[:, None], scale_b=self.scale[None, :],
                                 out_dtype=x2.dtype if x2.dtype != torch.float32 else torch.bfloat16,
                                 use_fast_accum=True).to(x2.dtype)
        else:
            y = (xq.float() @ self.weight.float().t()) * x_scale[:, None] * self.scale[None, :]  # (M, N) fp32
            y = y.to(x2.dtype)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, fp8 e4m3 row-wise, "
                f"activation_scale_ub={self.activation_scale_ub:g}")


class CpuKernelLinear(nn.Linear):
    """An fp32 `nn.Linear` whose decode-sized calls (<= 16 rows on CPU) use herd's GEMV kernel.

    MKL's sgemv reaches ~14-16 GB/s inside the model where a plain stream reaches ~20; larger
    inputs (prefill) still go to MKL's GEMM, which is compute-bound and hard to beat.
    """

    def kernel_weight(self) -> KernelWeight | None:
        return KernelWeight(KIND_F32, (self.weight,)) if self.bias is None and self.weight.dtype == torch.float32 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = _rows(x)
        if self.bias is None and self.weight.dtype == torch.float32 and _use_kernel(x2, self.weight):
            ops = cpu_kernels()
            assert ops is not None, "apply_cpu_kernels only installs this module when the kernels load"
            return ops.linear_f32(x2.contiguous(), self.weight).view(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight, self.bias)
