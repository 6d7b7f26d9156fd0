"""Multi-LoRA on CPU: which per-row delta is fastest, and what adapters cost a decode step.

Two measurements, both in CPU time of this thread at one thread (`time.thread_time`, median over
repetitions), which a busy shared machine barely moves, unlike wall-clock time:

1. One linear's LoRA delta for B = 1..16 decode rows, each row on one of N adapters (or none,
   every fourth row), three ways:
   * "masked" (herd.generate.adapters): every adapter's A stacked into one (N*R, in) matmul, the
     (B, N*R) projections masked to each row's own adapter, one (out, N*R) matmul back;
   * "gather": each row's A and B gathered into (B, R, in) / (B, out, R), two batched matmuls;
   * "grouped": a Python loop over the adapters present, one pair of matmuls per group of rows
     and an index_add back.
2. Decode CPU time per step on a model (a checkpoint with --hf, else a random SmolLM2-135M-shaped
   one) with herd's CPU kernels and fused decode: no adapters, adapters loaded but unused, every
   row on one adapter, rows on mixed adapters; and the base through the eager blocks, which is
   what a step with any adapter row runs (the fused op has no LoRA), to split the cost.

    python benchmarks/multi_lora.py [--hf /tmp/smol/hf-fp32] [--adapters 4] [--rank 8]

The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent.parent))  # this checkout's herd, not an installed one

from herd.generate import KVCache, apply_fast_decode, remove_fast_decode
from herd.generate.adapters import load_adapters
from herd.generate.generate import decode_step
from herd.model import ModelArgs, build_model, load_model
from herd.posttrain.lora import apply_lora, lora_parameters, save_adapter
from herd.quant import apply_cpu_kernels


def cpu_ms(fn, reps: int, inner: int) -> float:
    """Median CPU milliseconds of this thread per call of `fn`."""
    times = []
    for _ in range(reps):
        t0 = time.thread_time()
        for _ in range(inner):
            fn()
        times.append((time.thread_time() - t0) / inner * 1e3)
    return statistics.median(times)


def delta_strategies(d_in: int, d_out: int, n: int, rank: int, rows: int) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, rank, d_in, generator=g)  # (N, R, in)
    b = torch.randn(n, d_out, rank, generator=g)  # (N, out, R)
    a_cat, b_cat = a.reshape(n * rank, d_in), b.permute(1, 0, 2).reshape(d_out, n * rank)
    x = torch.randn(rows, d_in, generator=g)
    out = torch.randn(rows, d_out, generator=g)
    choice = [None if i % 4 == 3 else i % n for i in range(rows)]
    mask = torch.zeros(rows, n)
    for i, c in enumerate(choice):
        if c is not None:
            mask[i, c] = 1.0
    a_pad = torch.cat([a, torch.zeros(1, rank, d_in)])  # slot n: no adapter
    b_pad = torch.cat([b, torch.zeros(1, d_out, rank)])
    idx = torch.tensor([n if c is None else c for c in choice])
    groups = [(j, torch.tensor([i for i, c in enumerate(choice) if c == j])) for j in sorted({c for c in choice
                                                                                             if c is not None})]

    def masked():
        h = F.linear(x, a_cat).view(rows, n, rank) * mask.view(rows, n, 1)
        return out + F.linear(h.view(rows, n * rank), b_cat)

    def gather():
        h = torch.bmm(a_pad[idx], x.unsqueeze(-1))  # (B, R, 1)
        return out + torch.bmm(b_pad[idx], h).squeeze(-1)

    def grouped():
        y = out.clone()
        for j, sel in groups:
            y.index_add_(0, sel, F.linear(F.linear(x[sel], a[j]), b[j]))
        return y

    ref = masked()
    for fn in (gather, grouped):
        torch.testing.assert_close(fn(), ref, rtol=1e-4, atol=1e-3)
    return {name: round(cpu_ms(fn, 3, 100), 4) for name, fn in (("masked", masked), ("gather", gather),
                                                                ("grouped", grouped))}


def decode_ms(model, names, steps: int, reps: int, adapters) -> float:
    B = len(names)
    cache = KVCache(model.args, batch_size=B, max_seq_len=steps + 8, dtype=torch.float32)
    tokens = torch.randint(0, model.args.vocab_size, (B,))

    def run():
        for s in range(steps):
            if adapters is not None:
                adapters.select(names)
            decode_step(model, tokens, torch.full((B,), s), cache)

    with torch.inference_mode():
        run()  # warm-up
        return cpu_ms(run, reps, 1) / steps


def eager_ms(model, B: int, opts) -> float:
    """The base model through the eager blocks (what adapter rows run), without any adapter."""
    remove_fast_decode(model)
    try:
        return decode_ms(model, [None] * B, opts.steps, opts.reps, None)
    finally:
        apply_fast_decode(model, huge_pages=False)  # the weights are in huge pages already


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hf", type=Path, help="an HF checkpoint (default: random SmolLM2-135M shapes)")
    p.add_argument("--adapters", type=int, default=4)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--reps", type=int, default=5)
    opts = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    results: dict = {"threads": 1, "adapters": opts.adapters, "rank": opts.rank}

    def fresh():
        if opts.hf:
            return load_model(opts.hf, dtype=torch.float32).eval()
        # SmolLM2-135M's shapes (hidden 8/3 * 576 = 1536 at multiple_of 256).
        return build_model(ModelArgs(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, vocab_size=49152,
                                     multiple_of=256, tie_embeddings=True, max_seq_len=2048), seed=0).eval()

    model = fresh()
    a = model.args
    print(f"model: dim {a.dim}, {a.n_layers} layers, ffn {a.ffn_hidden_dim}", file=sys.stderr)

    per_rows = {}
    for rows in (1, 2, 4, 8, 16):
        per_rows[rows] = {"attn_dim_to_dim": delta_strategies(a.dim, a.dim, opts.adapters, opts.rank, rows),
                          "ffn_dim_to_hidden": delta_strategies(a.dim, a.ffn_hidden_dim, opts.adapters, opts.rank,
                                                                rows)}
        print(f"delta ms, {rows} rows: {per_rows[rows]}", file=sys.stderr)
    results["delta_cpu_ms"] = per_rows

    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for i in range(opts.adapters):
            m = copy.deepcopy(model)
            apply_lora(m, ["wq", "wk", "wv", "wo", "w1", "w2", "w3"], opts.rank, 2.0 * opts.rank)
            with torch.no_grad():
                for prm in lora_parameters(m):
                    prm.normal_(std=0.02)
            save_adapter(m, Path(tmp) / f"a{i}")
            paths[f"a{i}"] = Path(tmp) / f"a{i}"
            del m
        # Each model as `herd serve` builds it: CPU kernels, fused decode (weights moved into huge
        # pages), then the adapters. A deepcopy would leave the copy's weights out of huge pages.
        plain, served = model, fresh()
        for m in (plain, served):
            apply_cpu_kernels(m)
            apply_fast_decode(m)
        adapters = load_adapters(served, paths)
        names = list(paths)
    decode = {}
    for B in (1, 8):
        row = {
            "no_adapters": decode_ms(plain, [None] * B, opts.steps, opts.reps, None),
            "no_adapters_eager_blocks": eager_ms(plain, B, opts),
            "loaded_unused": decode_ms(served, [None] * B, opts.steps, opts.reps, adapters),
            "one_adapter_all_rows": decode_ms(served, [names[0]] * B, opts.steps, opts.reps, adapters),
            "mixed_rows": decode_ms(served, [None if i % 4 == 3 else names[i % len(names)] for i in range(B)],
                                    opts.steps, opts.reps, adapters),
        }
        decode[B] = {k: round(v, 3) for k, v in row.items()}
        decode[B]["tokens_per_cpu_s"] = {k: round(B * 1e3 / v, 1) for k, v in row.items()}
        print(f"decode ms/step, batch {B}: {decode[B]}", file=sys.stderr)
    results["decode_cpu_ms_per_step"] = decode
    print(json.dumps(results))


if __name__ == "__main__":
    main()
