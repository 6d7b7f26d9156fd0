"""herd's CPU kernels against their references.

Tolerances. fp32 summation in a different order than MKL (or float64) changes a dot product
of K terms by at most gamma_K * sum|x_k w_k| with gamma_K ~ K * 2**-24 (Higham's bound); in
practice the error is ~sqrt(K) * 2**-24 of that sum. The tests compare to a float64 reference
with the rigorous bound and to `F.linear` in fp32 with twice it, and also assert that the
typical error is far below the bound (so a kernel that drops a term cannot hide under it).

The extension compiles once per machine into HERD_KERNEL_CACHE (~/.cache/herd/kernels) and is
reused by later runs. A machine where it cannot be built fails these tests unless
HERD_CPU_KERNELS=0 says the fallback is intended.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from herd.kernels import cpu_kernels, unavailable_reason
from herd.quant.linear import (
    CpuKernelLinear,
    Int4Linear,
    Int8Linear,
    dequantize_int4,
    pack_int4,
    quantize_int4,
    quantize_int8,
    unpack_int4,
)

U = 2.0**-24  # fp32 unit roundoff


@pytest.fixture(scope="module")
def ops():
    k = cpu_kernels()
    if k is None:
        if os.environ.get("HERD_CPU_KERNELS") == "0":
            pytest.skip("HERD_CPU_KERNELS=0: kernels disabled on purpose")
        pytest.fail(f"herd's CPU kernels did not build: {unavailable_reason()}")
    return k


def _check_close(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, *, extra_roundings: int = 0) -> None:
    """y (fp32) against x @ w.T in float64, within gamma_K * sum|x w| (+ extra per-output roundings)."""
    ref = x.double() @ w.double().T
    mag = x.double().abs() @ w.double().abs().T
    K = x.shape[1]
    bound = (K + extra_roundings) * U * mag + 1e-30
    err = (y.double() - ref).abs()
    assert (err <= bound).all(), f"max err / bound {(err / bound).max():.3g}"
    assert (err / mag).max() < 64 * K**0.5 * U, "typical error should be ~sqrt(K) ulps, not near the bound"
    fl = F.linear(x, w.float()).double()  # MKL's fp32 result is within the same bound of ref
    assert ((y.double() - fl).abs() <= 2 * bound).all()


SHAPES = [(1, 8), (5, 17), (37, 100), (64, 224), (300, 2048), (4, 4096)]


# 1-4 rows: one register pass; 7 and 16: groups of 4 over L2-sized blocks of weight rows.
ROWS = [1, 2, 3, 4, 7, 16]


@pytest.mark.parametrize("M", ROWS)
@pytest.mark.parametrize("N, K", SHAPES)
def test_f32_equals_linear(ops, M, N, K):
    g = torch.Generator().manual_seed(N * 1000 + K + M)
    x, w = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g)
    _check_close(ops.linear_f32(x, w), x, w)


@pytest.mark.parametrize("M", [1, 4, 13])
@pytest.mark.parametrize("N, K", SHAPES)
def test_int8_equals_dequantized_matmul(ops, M, N, K):
    g = torch.Generator().manual_seed(N + K + M)
    x, w = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g)
    q, scale = quantize_int8(w)
    y = ops.linear_int8(x, q, scale)
    # The kernel scales after the dot product (one more rounding per output); the reference
    # weight q * scale is exact in float64.
    _check_close(y, x, q.double() * scale.double()[:, None], extra_roundings=2)


@pytest.mark.parametrize("M", ROWS)
@pytest.mark.parametrize("N, K, G", [(5, 32, 32), (37, 96, 32), (64, 224, 32), (300, 2048, 64), (8, 4096, 128),
                                     (3, 512, 256)])
def test_int4_equals_dequantized_matmul(ops, M, N, K, G):
    g = torch.Generator().manual_seed(N + K + G + M)
    x, w = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g)
    packed, scales, mins = quantize_int4(w, G)
    wd = dequantize_int4(packed, scales, mins, G)
    y = ops.linear_int4(x, packed, scales, mins, G)
    # The kernel computes sum_g s_g (q . x)_g + m_g (sum x)_g: the same sum, regrouped.
    _check_close(y, x, wd)


def test_int4_dequantize_op_equals_the_python_reference(ops):
    w = torch.randn(33, 192, generator=torch.Generator().manual_seed(5))
    for G in (32, 64, 192):
        packed, scales, mins = quantize_int4(w, G)
        fast = ops.dequantize_int4(packed, scales, mins, G)
        ref = dequantize_int4(packed, scales, mins, G)
        # One fused multiply-add against a multiply then an add: at most one rounding apart.
        q = unpack_int4(packed).float().view(33, -1, G)
        mag = (q * scales.float()[..., None]).abs() + mins.float().abs()[..., None]
        assert ((fast - ref).abs() <= 2**-23 * mag.view(33, -1)).all()


def test_int4_packing_round_trip_and_layout():
    q = torch.randint(0, 16, (3, 64), dtype=torch.uint8)
    packed = pack_int4(q)
    assert packed.shape == (3, 32) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), q)
    # The documented layout: per 32 inputs, nibble i of little-endian word l holds input 4i + l.
    word0 = int.from_bytes(bytes(packed[0, :4].tolist()), "little")
    assert [(word0 >> (4 * i)) & 0xF for i in range(8)] == [int(q[0, 4 * i]) for i in range(8)]


def test_int4_quantization_error_is_at_most_half_a_step():
    w = torch.randn(16, 256, generator=torch.Generator().manual_seed(0))
    packed, scales, mins = quantize_int4(w, 64)
    err = (dequantize_int4(packed, scales, mins, 64) - w).view(16, 4, 64).abs()
    step = scales.float()[..., None]
    # Half a step, plus the fp16 rounding of the min (relative 2**-11).
    assert (err <= step / 2 + mins.float().abs()[..., None] * 2**-11 + 1e-6).all()


def test_kernels_reject_bad_inputs(ops):
    w = torch.randn(8, 32)
    with pytest.raises(RuntimeError, match="1..16 rows"):
        ops.linear_f32(torch.randn(17, 32), w)
    with pytest.raises(RuntimeError, match="float32 activations"):
        ops.linear_f32(torch.randn(1, 32, dtype=torch.float64), w)
    with pytest.raises(RuntimeError, match="columns"):
        ops.linear_f32(torch.randn(1, 31), w)
    packed, scales, mins = quantize_int4(w, 32)
    with pytest.raises(RuntimeError, match="float16 scales"):
        ops.linear_int4(torch.randn(1, 32), packed, scales.float(), mins, 32)


def test_modules_take_the_gemv_kernel_then_the_tiled_matmul_then_the_reference(ops, monkeypatch):
    from herd.quant.linear import INT4_KERNEL_ROWS, INT8_KERNEL_ROWS

    lin = torch.nn.Linear(96, 40, bias=False)
    mods = [(Int8Linear.from_linear(lin), INT8_KERNEL_ROWS), (Int4Linear.from_linear(lin, group_size=32),
                                                              INT4_KERNEL_ROWS)]
    calls = []
    for name in ("linear_int8", "linear_int4", "matmul_int8", "matmul_int4"):
        real = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, _real=real, _n=name: calls.append((_n[:6], a[0].shape[0])) or _real(*a))
    x = torch.randn(max(INT8_KERNEL_ROWS, INT4_KERNEL_ROWS) + 2, 96)
    with torch.inference_mode():
        for mod, limit in mods:
            ref = F.linear(x, mod.dequantize())
            for rows, want in ((2, [("linear", 2)]), (16, [("linear", 16)]), (18, [("matmul", 18)]),
                               (limit, [("matmul", limit)]), (limit + 2, [])):
                calls.clear()
                y = mod(x[:rows].view(2, rows // 2, 96))  # leading dims are flattened into rows
                torch.testing.assert_close(y.view(rows, -1), ref[:rows], rtol=1e-5, atol=1e-5)
                assert calls == want, (type(mod).__name__, rows)


@pytest.mark.parametrize("M, K, N", [(17, 8, 5), (37, 576, 100), (5, 96, 7), (64, 2048, 33), (3, 32, 1)])
def test_tiled_matmul_equals_the_dequantized_reference(ops, M, K, N):
    # Every block shape of the 4 x 3 register tiling and its remainders (M % 4, N % 3, tile edges).
    g = torch.Generator().manual_seed(M * N)
    x, w = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g)
    # The weights are dequantized with one fp32 rounding each (int8 q * s, int4 fma(q, s, m)): one
    # more rounding per term than the float64 references here.
    q8, s8 = quantize_int8(w)
    _check_close(ops.matmul_int8(x, q8, s8), x, q8.double() * s8.double()[:, None], extra_roundings=1)
    if K % 32 == 0:
        packed, scales, mins = quantize_int4(w, 32)
        codes = unpack_int4(packed).double().view(N, K // 32, 32)
        w64 = (codes * scales.double()[..., None] + mins.double()[..., None]).view(N, K)
        _check_close(ops.matmul_int4(x, packed, scales, mins, 32), x, w64, extra_roundings=1)
    with pytest.raises(RuntimeError, match="divisible by 8"):
        ops.matmul_int8(torch.randn(3, 12), *quantize_int8(torch.randn(4, 12)))


def test_int8_bf16_activations_use_atens_packed_kernel():
    lin = torch.nn.Linear(64, 48, bias=False)
    mod = Int8Linear.from_linear(lin)
    x = torch.randn(3, 64).bfloat16()
    ref = F.linear(x.float(), mod.dequantize()).bfloat16()
    torch.testing.assert_close(mod(x), ref, rtol=2e-2, atol=2e-2)


def test_cpu_kernel_linear_keeps_autograd_on_the_aten_path(ops):
    lin = CpuKernelLinear(32, 16, bias=False)
    x = torch.randn(1, 32, requires_grad=True)
    lin(x).sum().backward()  # the custom op has no backward; training must not reach it
    assert x.grad is not None and lin.weight.grad is not None


# ---- int8 activations (the opt-in "a8" kernels) ---------------------------------------------
#
# Definition: each activation row is quantized per block of 32 inputs (the last block may be
# shorter) to xq = round_half_even(x * (127 / amax)), d = amax / 127, and the weights are
# multiplied by d * xq; int4 codes are centred on 7.5 with the exact fp32 group sums of x making
# up the difference (gemv_kernels.h). Two checks: the kernel equals a float64 emulation of that
# definition to fp32 rounding, and it is within the activation-rounding bound of the exact result:
#     |y - x @ w.T| <= sum_k d_b(k) / 2 * |w_k - c_k|,  c = 0 (int8), c = m_g + 7.5 s_g (int4).


def _quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) -> dequantized activations d * xq (M, K) float64, and d per input (M, K)."""
    M, K = x.shape
    nb = -(-K // 32)
    xp = torch.zeros(M, nb * 32)
    xp[:, :K] = x
    blocks = xp.view(M, nb, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))  # fp32, as the kernel
    xq = torch.round(blocks * inv).clamp(-127, 127)
    d = (amax / 127.0).double().expand(M, nb, 32)
    return (xq.double() * d).reshape(M, -1)[:, :K], d.reshape(M, -1)[:, :K]


A8_SHAPES = [(1, 8), (5, 17), (37, 100), (64, 224), (300, 2048), (4, 4096), (9, 33)]


@pytest.mark.parametrize("M", ROWS)
@pytest.mark.parametrize("N, K", A8_SHAPES)
def test_int8_a8_is_its_definition_and_within_the_activation_bound(ops, M, N, K):
    g = torch.Generator().manual_seed(7 * N + K + M)
    x, w = torch.randn(M, K, generator=g) * 3, torch.randn(N, K, generator=g)
    x[0, : min(K, 32)] = 0  # an all-zero block: d = 0 must not divide
    q, scale = quantize_int8(w)
    y = ops.linear_int8_a8(x, q, scale).double()
    wd = q.double() * scale.double()[:, None]
    xh, d = _quantize_activations(x)
    emulated = xh @ wd.T
    mag = xh.abs() @ wd.abs().T
    assert ((y - emulated).abs() <= (K // 32 + 16) * U * mag + 1e-30).all()
    exact = x.double() @ wd.T
    bound = (d / 2) @ wd.abs().T  # (M, N)
    err = (y - exact).abs()
    assert (err <= bound + (K // 32 + 16) * U * mag + 1e-30).all()
    if K >= 64:  # random rounding errors cancel: far below the worst case
        assert err.mean() < 0.2 * bound.mean()


@pytest.mark.parametrize("M", ROWS)
@pytest.mark.parametrize("N, K, G", [(5, 32, 32), (37, 96, 32), (64, 224, 32), (300, 2048, 64), (8, 4096, 128),
                                     (3, 512, 256), (7, 192, 64), (6, 192, 96)])
def test_int4_a8_is_its_definition_and_within_the_activation_bound(ops, M, N, K, G):
    g = torch.Generator().manual_seed(11 * N + K + G + M)
    x, w = torch.randn(M, K, generator=g) * 3, torch.randn(N, K, generator=g)
    x[-1, :32] = 0
    packed, scales, mins = quantize_int4(w, G)
    _check_int4_a8(ops.linear_int4_a8(x, packed, scales, mins, G), x, packed, scales, mins, G)


def _check_int4_a8(y: torch.Tensor, x: torch.Tensor, packed, scales, mins, G: int) -> None:
    """y against the a8 definition (to fp32 rounding) and the activation-rounding bound."""
    y = y.double()
    (M, K), N = x.shape, packed.shape[0]
    q = unpack_int4(packed).double().view(N, -1, G)  # (N, groups, G)
    s, m = scales.double()[..., None], mins.double()[..., None]
    xh, d = _quantize_activations(x)
    xs = x.double().view(M, -1, G).sum(-1)  # (M, groups)
    # The definition: sum_g s_g (q - 7.5) . xh_g + (m_g + 7.5 s_g) (sum x)_g.
    centred = ((q - 7.5) * s).view(N, K)
    emulated = xh @ centred.T + xs @ (m + 7.5 * s).squeeze(-1).T
    mag = xh.abs() @ centred.abs().T + x.double().abs().view(M, -1, G).sum(-1) @ (m.abs() + 7.5 * s).squeeze(-1).T
    assert ((y - emulated).abs() <= (K // 32 + 64) * U * mag + 1e-30).all()
    wd = (q * s + m).view(N, K)
    err = (y - x.double() @ wd.T).abs()
    bound = (d / 2) @ centred.abs().T
    assert (err <= bound + (K // 32 + 64) * U * mag + 1e-30).all()
    if K >= 64:
        assert err.mean() < 0.2 * bound.mean()


def test_a8_mode_is_explicit_and_reaches_the_a8_kernels(ops, monkeypatch):
    from herd.quant import QuantConfig

    with pytest.raises(ValueError, match="activations"):
        QuantConfig("int8", activations="int4")
    with pytest.raises(ValueError, match="fp8"):
        QuantConfig("fp8", activations="int8")
    lin = torch.nn.Linear(96, 40, bias=False)
    mods = [Int8Linear.from_linear(lin, activations="int8"), Int4Linear.from_linear(lin, group_size=32,
                                                                                   activations="int8")]
    assert Int8Linear.from_linear(lin).activations == "float"  # exact unless asked
    calls = []
    for name in ("linear_int8_a8", "linear_int4_a8", "linear_int8", "linear_int4", "matmul_int8", "matmul_int4"):
        real = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, _real=real, _n=name: calls.append(_n) or _real(*a))
    x = torch.randn(1, 96)
    with torch.inference_mode():
        for mod in mods:
            torch.testing.assert_close(mod(x), F.linear(x, mod.dequantize()), rtol=0.05, atol=0.05)
    assert calls == ["linear_int8_a8", "linear_int4_a8"]
    # More than 16 rows (a prompt) takes the exact matmul: activation rounding is a decode-only cost.
    calls.clear()
    x = torch.randn(20, 96)
    with torch.inference_mode():
        for mod in mods:
            torch.testing.assert_close(mod(x), F.linear(x, mod.dequantize()), rtol=1e-5, atol=1e-5)
    assert calls == ["matmul_int8", "matmul_int4"]


def test_kernels_run_on_torchs_threads(ops):
    """The parallel regions use torch.set_num_threads' count, and splitting rows changes no bit.

    ATen's parallel_for is a header template over `#pragma omp parallel`: built without -fopenmp
    it runs on one thread without a warning, which is how these kernels first shipped (decode at
    half speed on 2 cores). Each output row is one thread's dot product, so 1 and 2 threads agree
    exactly.
    """
    before = torch.get_num_threads()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 512, generator=g)
    w = torch.randn(4096, 512, generator=g)
    q8, s8 = quantize_int8(w)
    q4 = quantize_int4(w, 64)
    tiles = ops.repack_int4(*q4, 64)
    calls = {
        "f32": lambda: ops.linear_f32(x, w),
        "int8": lambda: ops.linear_int8(x, q8, s8),
        "int8_a8": lambda: ops.linear_int8_a8(x, q8, s8),
        "int4": lambda: ops.linear_int4(x, *q4, 64),
        "int4_a8": lambda: ops.linear_int4_a8(x, *q4, 64),
        "int4_tiles": lambda: ops.linear_int4(x, *q4, 64, tiles),
        "int4_tiles_a8": lambda: ops.linear_int4_a8(x, *q4, 64, tiles),
    }
    try:
        torch.set_num_threads(1)
        assert ops.parallel_threads() == 1
        one = {k: f() for k, f in calls.items()}
        torch.set_num_threads(2)
        assert ops.parallel_threads() == 2, "the extension was built without OpenMP: rebuild with -fopenmp"
        for k, f in calls.items():
            assert torch.equal(f(), one[k]), k
    finally:
        torch.set_num_threads(before)


# ---- int4 repacked into tiles of 8 rows (herd/kernels/int4_tiles.h) ----------------------------
#
# The tile kernels compute the row kernels' sums in another order, so they are held to the same
# references: the float64 product for fp32 activations, the a8 definition and bound for int8
# ones. Both instruction sets run here (AVX-512 where the CPU has F/VL/BW/VNNI).


@pytest.fixture(params=["avx2", "avx512"])
def isa(ops, request):
    want = {"avx2": 0, "avx512": 1}[request.param]
    before = ops.set_max_isa(want)
    try:
        if ops.tiles_isa() != want:
            pytest.skip("this CPU (or HERD_CPU_ISA) leaves the AVX-512 tile kernels out")
        yield request.param
    finally:
        ops.set_max_isa(before)


TILE_SHAPES = [(5, 32, 32), (13, 576, 32), (64, 224, 32), (37, 1536, 32), (300, 2048, 64), (9, 4096, 128),
               (3, 512, 256), (7, 192, 64), (6, 192, 96)]


@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 8, 13, 16])
@pytest.mark.parametrize("N, K, G", TILE_SHAPES)
def test_int4_tiles_equal_the_references(ops, isa, M, N, K, G):
    g = torch.Generator().manual_seed(13 * N + K + G + M)
    x, w = torch.randn(M, K, generator=g) * 3, torch.randn(N, K, generator=g)
    if K > 32:
        x[-1, :32] = 0  # an all-zero block (a8: d = 0); not a whole row, which would leave no error to compare
    packed, scales, mins = quantize_int4(w, G)
    tiles = ops.repack_int4(packed, scales, mins, G)
    assert tiles.shape == (-(-N // 8), K // G * (32 + 4 * G)) and tiles.dtype == torch.uint8
    _check_close(ops.linear_int4(x, packed, scales, mins, G, tiles), x, dequantize_int4(packed, scales, mins, G))
    _check_int4_a8(ops.linear_int4_a8(x, packed, scales, mins, G, tiles), x, packed, scales, mins, G)


def _tiles_reference(q: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, G: int) -> torch.Tensor:
    """int4_tiles.h's layout, built from its description: codes q (N, K) -> (tiles, bytes) uint8."""
    N, K = q.shape
    T = -(-N // 8)
    qp = torch.zeros(T * 8, K, dtype=torch.uint8)
    sp, mp = (torch.zeros(T * 8, K // G, dtype=torch.float16) for _ in range(2))
    qp[:N], sp[:N], mp[:N] = q, scales, mins
    out = []
    for t in range(T):
        rows = slice(8 * t, 8 * t + 8)
        for g in range(K // G):
            out += [sp[rows, g].contiguous().view(torch.uint8), mp[rows, g].contiguous().view(torch.uint8)]
            for k0 in range(g * G, (g + 1) * G, 32):
                c = qp[rows, k0 : k0 + 32].reshape(8, 2, 4, 4)  # (row r, half h, j, i): input 16 h + 4 j + i
                out.append((c[:, 0] | (c[:, 1] << 4)).permute(1, 0, 2).reshape(-1))  # byte 32 j + 4 r + i
    return torch.cat(out).view(T, -1)


@pytest.mark.parametrize("N, K, G", [(3, 64, 32), (8, 32, 32), (17, 256, 64), (10, 192, 96)])
def test_int4_repack_follows_the_documented_layout(ops, N, K, G):
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(N * K))
    packed, scales, mins = quantize_int4(w, G)
    ref = _tiles_reference(unpack_int4(packed), scales, mins, G)
    assert torch.equal(ops.repack_int4(packed, scales, mins, G), ref)


def test_int4_tiles_are_checked(ops):
    packed, scales, mins = quantize_int4(torch.randn(16, 64), 32)
    tiles = ops.repack_int4(packed, scales, mins, 32)
    other = ops.repack_int4(*quantize_int4(torch.randn(24, 64), 32), 32)
    with pytest.raises(RuntimeError, match="tiles do not match"):
        ops.linear_int4(torch.randn(1, 64), packed, scales, mins, 32, other)  # another weight's
    with pytest.raises(RuntimeError, match="tiles do not match"):
        ops.linear_int4(torch.randn(1, 64), packed, scales, mins, 32, tiles[:1])


def test_int4_linear_repack_keeps_state_dict_and_results(ops):
    from herd.kernels import KIND_INT4, KIND_INT4_TILES

    lin = torch.nn.Linear(192, 45, bias=False)
    mods = [Int4Linear.from_linear(lin, group_size=32, activations=a) for a in ("float", "int8")]
    xs = [torch.randn(M, 192, generator=torch.Generator().manual_seed(M)) for M in (1, 5, 16, 40)]
    with torch.inference_mode():
        for mod in mods:
            before = {k: v.clone() for k, v in mod.state_dict().items()}
            rows = [mod(x) for x in xs]
            assert mod.kernel_weight().kind == KIND_INT4 and mod.tiles is None
            assert mod.repack() and mod.kernel_weight().kind == KIND_INT4_TILES
            sd = mod.state_dict()
            assert list(sd) == list(before) == ["weight", "scales", "mins"]
            assert all(torch.equal(sd[k], before[k]) for k in before)
            for x, want in zip(xs, rows):
                # a8 decode rows: the same codes and integer sums; prompts (40 rows): the same exact matmul
                torch.testing.assert_close(mod(x), want, rtol=1e-5, atol=1e-5)
            assert torch.equal(mod(xs[-1]), rows[-1])


def test_int4_tiles_follow_writes_to_the_row_layout(ops):
    """load_state_dict (in place), buffer replacement and in-place writes all reach the tiles."""
    a, b = (Int4Linear.from_linear(torch.nn.Linear(96, 24, bias=False), group_size=32) for _ in range(2))
    x = torch.randn(1, 96)
    with torch.inference_mode():
        want_b = b(x)
        assert a.repack()
        a.load_state_dict(b.state_dict())
        torch.testing.assert_close(a(x), want_b, rtol=1e-5, atol=1e-5)
        tiles = a.tiles
        a.scales.mul_(2)  # scales the group sums: y = 2 (q . x) s + (sum x) m
        torch.testing.assert_close(a(x), F.linear(x, a.dequantize()), rtol=1e-5, atol=1e-5)
        assert a.tiles is not tiles
        a.mins = b.mins.clone()
        torch.testing.assert_close(a(x), F.linear(x, a.dequantize()), rtol=1e-5, atol=1e-5)


def test_int4_tiles_follow_module_moves(ops):
    lin = Int4Linear.from_linear(torch.nn.Linear(64, 16, bias=False), group_size=32)
    assert lin.repack()
    tiles = lin.tiles
    lin.to("cpu")  # nothing moves: the same tiles
    assert lin.tiles is tiles
    lin.to(torch.float64)  # scales and mins become float64, which no kernel takes: no tiles
    assert lin.tiles is None and lin.kernel_weight().tensors[1].dtype == torch.float64


def test_isa_environment_variable_forces_avx2(ops):
    import subprocess
    import sys
    from pathlib import Path

    import herd

    code = "from herd.kernels import cpu_kernels; print(cpu_kernels().tiles_isa())"
    env = {**os.environ, "HERD_CPU_ISA": "avx2"}
    root = Path(herd.__file__).parents[1]  # this checkout's herd, whatever the working directory
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0"


def test_a_build_killed_midway_does_not_hang_later_processes(ops, tmp_path):
    # torch's cpp_extension guards a build with a `lock` file that only the builder removes: a
    # process killed mid-compile left one behind, and every later process waited on it forever (a
    # CI run hung 80 minutes in the first test that loaded the kernels). Copy the built extension
    # into a fresh cache, plant such a stale `lock`, and load from a new process.
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    import herd
    from herd.kernels import _build_name, cache_dir

    name = _build_name()
    shutil.copytree(cache_dir() / name, tmp_path / name, ignore=shutil.ignore_patterns("lock", "herd.lock"))
    (tmp_path / name / "lock").touch()
    code = "from herd.kernels import cpu_kernels; print(cpu_kernels() is not None)"
    env = {**os.environ, "HERD_KERNEL_CACHE": str(tmp_path)}
    root = Path(herd.__file__).parents[1]
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"
    assert "left by a build that was killed" in out.stderr
    assert not (tmp_path / name / "lock").exists()


def test_every_checkout_compiles_the_same_paths(tmp_path, monkeypatch):
    # The build directory is shared by every checkout of the same sources, and ninja rebuilds when
    # a compile command changes: compiling each checkout's own files made two git worktrees rebuild
    # the extension in turn (a minute or more each time). The build must compile copies kept in
    # the build directory, so the command is the same whichever checkout asks.
    from pathlib import Path

    import torch.utils.cpp_extension

    import herd.kernels as kernels

    seen = []

    class Stop(Exception):
        pass

    def fake_load(*, sources, build_directory, **_):
        seen.append((sources, build_directory))
        raise Stop

    monkeypatch.setenv("HERD_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(torch.utils.cpp_extension, "load", fake_load)
    for _ in range(2):  # the second call finds the copies already there
        with pytest.raises(Stop):
            kernels._build()
    (sources, build_dir), again = seen
    assert again == (sources, build_dir)
    assert [Path(s).name for s in sources] == [p.name for p in kernels._SOURCES]
    for source in sources:
        assert Path(source).parent == Path(build_dir) / "src"
    for original in (*kernels._SOURCES, *kernels._HEADERS):  # the headers the .cpp files include sit beside them
        assert (Path(build_dir) / "src" / original.name).read_bytes() == original.read_bytes()
