"""One decode GEMV (x: 1 x K fp32, W: N x K) through each of herd's CPU kernels, in GB/s per core.

Decode at batch 1 streams every weight once per token, so a kernel's figure of merit is weight
bytes (codes + scales) per second; this script measures it for the Llama-3.2-1B shapes
(w1/w3 8192x2048, w2 2048x8192, the 128256x2048 head) and, in the same run, the single-thread
read bandwidth it is bounded by (a streaming `sum` over 512 MiB). Every GEMV streams its weight
from DRAM, as decode does (see _Rotating). Run it pinned to one core:

    taskset -c 1 python benchmarks/gemv.py            # threads default to 1
    python benchmarks/gemv.py --threads 2 --shapes 8192x2048

Kernels: `f32` (herd), `torch_f32` (F.linear, MKL's sgemv), `int8` / `int4` (fp32 activations,
exact to fp32 rounding), `int8_a8` / `int4_a8` (activations quantized to int8 per block of 32,
integer dot products; see herd/kernels/gemv_kernels.h). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from herd.kernels import cpu_kernels
from herd.quant.linear import quantize_int4, quantize_int8


def _time(fn, *, min_s: float, reps: int = 9) -> float:
    """Fastest seconds per call over `reps` batches of calls, each batch >= min_s / reps long.

    The fastest batch, not the median: on a shared machine another process's memory traffic
    only ever slows a batch down, so the minimum is the reproducible figure.
    """
    fn()
    t0 = time.perf_counter()
    fn()
    once = max(time.perf_counter() - t0, 1e-6)
    n = max(1, int(min_s / reps / once))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        times.append((time.perf_counter() - t0) / n)
    return min(times)


def read_bandwidth(min_s: float) -> float:
    buf = torch.ones(128 * 2**20)  # 512 MiB, far beyond the last-level cache
    s = _time(lambda: buf.sum(), min_s=min_s)
    return buf.numel() * 4 / s / 1e9


class _Rotating:
    """Calls fn on copies of a weight in turn, so every call streams from DRAM, as decode does.

    A 2048 x 8192 int4 matrix (9 MiB) fits in this machine's 32 MiB L3; timing it alone would
    measure the cache. Copies totalling >= `COLD_BYTES` are cycled instead.
    """

    COLD_BYTES = 128 * 2**20

    def __init__(self, fn, *tensors: torch.Tensor):
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        copies = max(1, -(-self.COLD_BYTES // nbytes))
        self.sets = [tensors] + [tuple(t.clone() for t in tensors) for _ in range(copies - 1)]
        self.fn, self.i = fn, 0

    def __call__(self):
        self.i = (self.i + 1) % len(self.sets)
        return self.fn(*self.sets[self.i])


def bench_shape(ops, N: int, K: int, G: int, kernels: list[str], min_s: float) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, K, generator=g)
    out: dict[str, float] = {}
    w = torch.randn(N, K, generator=g)
    if "f32" in kernels:
        out["f32"] = N * K * 4 / _time(_Rotating(lambda w: ops.linear_f32(x, w), w), min_s=min_s) / 1e9
    if "torch_f32" in kernels:
        out["torch_f32"] = N * K * 4 / _time(_Rotating(lambda w: F.linear(x, w), w), min_s=min_s) / 1e9
    q8 = quantize_int8(w)
    q4 = quantize_int4(w, G)
    del w
    for name, fn, weights in [
        ("int8", lambda q, s: ops.linear_int8(x, q, s), q8),
        ("int8_a8", lambda q, s: ops.linear_int8_a8(x, q, s), q8),
        ("int4", lambda p, s, m: ops.linear_int4(x, p, s, m, G), q4),
        ("int4_a8", lambda p, s, m: ops.linear_int4_a8(x, p, s, m, G), q4),
    ]:
        if name in kernels and hasattr(ops, name.replace("int", "linear_int", 1)):
            nbytes = sum(t.numel() * t.element_size() for t in weights)
            out[name] = nbytes / _time(_Rotating(fn, *weights), min_s=min_s) / 1e9
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--shapes", default="8192x2048,2048x8192,128256x2048", help="NxK,... (out x in)")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--kernels", default="f32,torch_f32,int8,int8_a8,int4,int4_a8")
    p.add_argument("--min-seconds", type=float, default=1.0, help="timed seconds per measurement")
    opts = p.parse_args()
    torch.set_num_threads(opts.threads)
    ops = cpu_kernels()
    assert ops is not None, "herd's CPU kernels did not build (see the log)"
    kernels = opts.kernels.split(",")
    result: dict = {"threads": opts.threads, "group_size": opts.group_size,
                    "read_GBps": round(read_bandwidth(opts.min_seconds), 2), "GBps": {}}
    print(f"read bandwidth ({opts.threads} thread(s)): {result['read_GBps']:.2f} GB/s")
    for shape in opts.shapes.split(","):
        N, K = (int(v) for v in shape.split("x"))
        r = bench_shape(ops, N, K, opts.group_size, kernels, opts.min_seconds)
        result["GBps"][shape] = {k: round(v, 2) for k, v in r.items()}
        print(f"{shape:>12}: " + "  ".join(f"{k} {v:6.2f}" for k, v in r.items()) + "  GB/s of weight bytes")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
