"""Hand-written CPU kernels for decode-sized matmuls, compiled on first use.

Trade-off: a C++ extension built at run time (`torch.utils.cpp_extension.load`, cached on
disk) instead of a prebuilt wheel. It keeps herd a pure-Python install and lets the kernels
target the machine they run on, at the price of a one-time compile (~20-40 s on 2 cores, logged
loudly) and a dependency on a C++ compiler and ninja. When either is missing, or the CPU lacks
AVX2/FMA/F16C, `cpu_kernels()` returns None and says why once, loudly; callers then use plain
PyTorch ops, which compute the same values more slowly.

The ops (namespace `herd_cpu`, CPU only, fp32 activations, at most MAX_ROWS = 16 rows; the
register kernels are in gemv_kernels.h, how they are called in gemv.h):

    linear_f32(x (M, K), w (N, K) f32) -> (M, N)                       cpu_gemv.cpp
    linear_int8(x, w (N, K) int8, scale (N,) f32) -> (M, N)           w = q * scale
    linear_int4(x, w (N, K/2) uint8, scale, min (N, K/G) f16, G, tiles=None) -> (M, N)   w = q * s + m
    repack_int4(w, scale, min, G) -> tiles uint8: the same weight in tiles of 8 rows (int4_tiles.h),
        which linear_int4(_a8) and decode_block read when given (decode at memory speed)
    dequantize_int4(w, scale, min, G) -> (N, K) f32   (long prompts: one pass, then MKL's GEMM)
    matmul_int8(x (M, K), w, scale), matmul_int4(x, w, scale, min, G) -> (M, N): any M (prompts),
        exact; tiles of the weight dequantized to fp32 in cache, then register-blocked FMAs (gemv.h)
    linear_int8_a8, linear_int4_a8: same arguments as linear_int8 / linear_int4; x is quantized
        to int8 per block of 32 inputs inside the op and multiplied in integers (an opt-in mode,
        herd.quant's activations="int8"; its error bound is in gemv_kernels.h)
    decode_block(x, pos, rope, k_cache, v_cache, norms, weights, ...) -> x'   decode_block.cpp
        one transformer block for one token per row, GEMVs and all (herd.generate.fast_decode)

Numerics (all but the *_a8 ops): fp32 products accumulated in fp32, in a different order than MKL's, so results equal
`F.linear` on the dequantized weight to fp32 reassociation error (relative ~1e-6 of sum |w x|).

Instruction sets: built for AVX2 + FMA + F16C; the int4 tile kernels also have an AVX-512 (F, VL, BW,
VNNI) copy chosen at run time where the CPU has it. `tiles_isa()` says which runs (0 AVX2, 1 AVX-512),
`set_max_isa(0)` forces AVX2 (tests), as does HERD_CPU_ISA=avx2 for the whole process.

Environment: HERD_CPU_KERNELS=0 disables them (logged); HERD_KERNEL_CACHE sets the build
directory (default ~/.cache/herd/kernels); HERD_CPU_ISA=avx2 (above).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, NamedTuple

import torch

from herd.io import atomic_write_bytes

log = logging.getLogger("herd.kernels")

MAX_ROWS = 16  # the kernels' M limit (batched decode); larger inputs belong to MKL's GEMM

# Weight formats as the ops number them (gemv.h's Kind).
KIND_F32, KIND_INT8, KIND_INT4, KIND_INT4_TILES = 0, 1, 2, 3


class KernelWeight(NamedTuple):
    """One linear layer's stored weight as the kernels take it (gemv.h's `weight_from`).

    tensors: f32 (w,); int8 (w, scale); int4 (packed w, scales, mins).
    int8_activations: decode quantizes this layer's input rows to int8 (the *_a8 kernels).
    Modules that can run on the kernels expose it as `kernel_weight()`; the fused decode block
    (herd.generate.fast_decode) reads it without knowing the module types.
    """

    kind: int
    tensors: tuple[torch.Tensor, ...]
    group_size: int = 0
    int8_activations: bool = False
_HERE = Path(__file__).parent
_SOURCES = [_HERE / "cpu_gemv.cpp", _HERE / "decode_block.cpp"]
_HEADERS = [_HERE / "gemv.h", _HERE / "gemv_kernels.h", _HERE / "int4_tiles.h", _HERE / "int4_tiles_body.h"]
_FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-std=c++17", "-fopenmp"]

_lock = threading.Lock()
_state: dict[str, Any] = {}  # "ops": namespace or None, "reason": why not


def cache_dir() -> Path:
    """Where the compiled extension lives; one subdirectory per source + torch version."""
    root = os.environ.get("HERD_KERNEL_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "herd" / "kernels"


def _build_name() -> str:
    text = b"".join(p.read_bytes() for p in (*_SOURCES, *_HEADERS))
    # "src/": builds compile copies of the sources kept in the build directory (_stage_sources);
    # the tag keeps them apart from older builds that compiled the checkout's own files.
    digest = hashlib.sha256(text + " ".join(_FLAGS).encode() + b" src/").hexdigest()[:12]
    torch_tag = torch.__version__.replace("+", "_").replace(".", "_")
    return f"herd_cpu_{torch_tag}_{digest}"


def _unavailable_reason() -> str | None:
    if os.environ.get("HERD_CPU_KERNELS", "1") == "0":
        return "HERD_CPU_KERNELS=0 is set"
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):
        return f"this CPU's best vector ISA is {capability}; the kernels need AVX2 + FMA + F16C"
    if shutil.which("ninja") is None and not _ninja_module():
        return "ninja is not installed (`pip install ninja`, or `pip install herd[quant]`)"
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return f"no C++ compiler ({os.environ.get('CXX', 'c++')}) on PATH"
    return None


def _ninja_module() -> bool:
    # pip's ninja puts its binary in the environment's bin directory, which may not be on PATH
    # when the interpreter is run by its full path; cpp_extension then finds nothing either.
    try:
        import ninja  # noqa: F401
    except ImportError:
        return False
    from ninja import BIN_DIR

    os.environ["PATH"] = BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    return True


def _stage_sources(build_dir: Path) -> list[Path]:
    """Copies of the sources and headers in `build_dir`/src; the .cpp copies, to compile.

    The build directory is named by the sources' contents, so every checkout of the same code
    (several clones or git worktrees, one ~/.cache/herd) shares it. ninja rebuilds when a compile
    command changes, and the command holds the source's path: compiling each checkout's own files
    made two checkouts rebuild the extension in turn, about a minute each time on 2 cores. The
    copies' paths are the same for all of them. Called under the build lock.
    """
    src = build_dir / "src"
    src.mkdir(exist_ok=True)
    for path in (*_SOURCES, *_HEADERS):
        data, copy = path.read_bytes(), src / path.name
        if not copy.is_file() or copy.read_bytes() != data:
            atomic_write_bytes(copy, data)
    return [src / p.name for p in _SOURCES]


def _build() -> SimpleNamespace:
    from torch.utils.cpp_extension import load

    name = _build_name()
    build_dir = cache_dir() / name
    build_dir.mkdir(parents=True, exist_ok=True)
    with _build_lock(build_dir):
        built = any(build_dir.glob(f"{name}*.so"))
        if not built:
            log.warning("herd.kernels: compiling the CPU decode kernels into %s (first use only, ~30 s)", build_dir)
        load(name=name, sources=[str(p) for p in _stage_sources(build_dir)], extra_cflags=_FLAGS, extra_ldflags=["-fopenmp"],
             build_directory=str(build_dir), is_python_module=False, verbose=False)
    ops = torch.ops.herd_cpu
    _register_fakes()
    return SimpleNamespace(linear_f32=ops.linear_f32, linear_int8=ops.linear_int8, linear_int4=ops.linear_int4,
                           linear_int8_a8=ops.linear_int8_a8, linear_int4_a8=ops.linear_int4_a8,
                           dequantize_int4=ops.dequantize_int4, matmul_int8=ops.matmul_int8,
                           matmul_int4=ops.matmul_int4, decode_block=ops.decode_block,
                           repack_int4=ops.repack_int4, tiles_isa=ops.tiles_isa, set_max_isa=ops.set_max_isa,
                           parallel_threads=ops.parallel_threads)


@contextlib.contextmanager
def _build_lock(build_dir: Path, timeout_s: float = 900.0) -> Iterator[None]:
    """Hold an flock on `build_dir`/herd.lock while torch builds or loads the extension there.

    torch's own guard is a `lock` file created with O_EXCL and removed when the build ends: a
    process killed mid-build (Ctrl-C at the wrong moment, a job's time limit) leaves it behind, and
    every later process then waits on it forever, silently. An flock is released by the kernel when
    its holder dies, so while we hold ours no live herd process is building here, and a torch
    `lock` file found now is stale: it is removed, with a warning.
    """
    with open(build_dir / "herd.lock", "a") as f:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise OSError(f"another process has held the build lock {build_dir / 'herd.lock'} for "
                                  f"{timeout_s:.0f} s") from None
                time.sleep(0.2)
        try:
            stale = build_dir / "lock"
            if stale.exists():
                log.warning("herd.kernels: removing %s, left by a build that was killed", stale)
                stale.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _register_fakes() -> None:
    """Output shapes of the ops for torch.compile's tracing, which then keeps them as opaque calls."""
    from torch.library import register_fake

    def linear(x, w, *_):
        return x.new_empty(x.shape[0], w.shape[0])

    for name in ("linear_f32", "linear_int8", "linear_int8_a8", "linear_int4", "linear_int4_a8", "matmul_int8",
                 "matmul_int4"):
        register_fake(f"herd_cpu::{name}")(linear)
    register_fake("herd_cpu::dequantize_int4")(lambda w, *_: w.new_empty(w.shape[0], 2 * w.shape[1], dtype=torch.float32))
    register_fake("herd_cpu::decode_block")(lambda x, *_: torch.empty_like(x))
    register_fake("herd_cpu::repack_int4")(lambda w, s, m, g: w.new_empty(-(-w.shape[0] // 8), (s.shape[1]) * (32 + 4 * g)))


def cpu_kernels() -> SimpleNamespace | None:
    """The compiled ops (`linear_*`, `dequantize_int4`), or None with a logged reason.

    Thread-safe; the build (or the failure) happens once per process.
    """
    if "ops" in _state:  # the per-call fast path: no lock once decided
        return _state["ops"]
    with _lock:
        if "ops" not in _state:
            reason = _unavailable_reason()
            ops = None
            if reason is None:
                try:
                    ops = _build()
                except (RuntimeError, OSError, subprocess.CalledProcessError) as e:
                    # cpp_extension reports compiler and linker failures as RuntimeError.
                    reason = f"building the extension failed: {str(e).strip().splitlines()[-1] if str(e).strip() else e!r}"
            if ops is None:
                log.warning("herd.kernels: CPU kernels unavailable (%s); using plain PyTorch ops, decode will "
                            "be slower", reason)
            _state["ops"], _state["reason"] = ops, reason
        return _state["ops"]


def unavailable_reason() -> str | None:
    """Why `cpu_kernels()` returned None (after it has been called), else None."""
    return _state.get("reason")


__all__ = ["KIND_F32", "KIND_INT4", "KIND_INT4_TILES", "KIND_INT8", "MAX_ROWS", "KernelWeight", "cache_dir", "cpu_kernels",
           "unavailable_reason"]
