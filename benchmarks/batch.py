"""Offline batch generation throughput: `herd generate --input` against one prompt at a time.

A random model with the real Llama 3 vocabulary is saved and loaded as the CLI loads it; the same
prompts (distinct, ~10-20 tokens) with per-prompt budgets drawn between --min-tokens and
--max-tokens (greedy, end-of-turn ignored by the budget) are generated three ways in one process:

* one at a time: `herd.generate.generate` on each prompt alone (what a loop over `herd generate
  --prompt` does, without the per-call start-up);
* static batches: `generate` on --max-batch prompts at a time (the old rejection-sampling loop:
  a batch waits for its longest member);
* batch mode: `herd.serve.batch.run_batch` through the engine with --max-batch slots, writing
  the output JSONL with an fsync per line, as `herd generate --input` does.

Throughput is completion tokens / wall time. The modes alternate for --rounds rounds; medians.

    python benchmarks/batch.py                    # dim 256, 4 layers, 32 prompts, 16-64 tokens, 16 slots
    python benchmarks/batch.py --prompts 8 --rounds 1   # quicker smoke run

The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

import herd
from herd.generate import GREEDY, generate
from herd.generate.loading import load_for_inference
from herd.model import ModelArgs, build_model
from herd.serve import Engine
from herd.serve.batch import run_batch
from herd.serve.batch_io import BatchDefaults

WORDS = "llama herd alpaca valley river mountain grass wool sun wind stone path field night morning song".split()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--min-tokens", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--kernels", action="store_true", help="herd's CPU decode kernels, as `herd generate` uses")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    opts = ap.parse_args()
    if opts.threads:
        torch.set_num_threads(opts.threads)

    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))) + f" {i}" for i in range(opts.prompts)]
    budgets = [rng.randint(opts.min_tokens, opts.max_tokens) for _ in texts]
    with tempfile.TemporaryDirectory() as tmp:
        args = ModelArgs(dim=opts.dim, n_layers=opts.layers, n_heads=8, n_kv_heads=2, vocab_size=128256,
                         multiple_of=64, max_seq_len=512)
        herd.save_model(build_model(args, seed=0).eval(), Path(tmp) / "ckpt", format="hf")
        lm = load_for_inference(Path(tmp) / "ckpt", cpu_kernels=opts.kernels)
        prompts = [lm.encode_text(t) for t in texts]
        src = Path(tmp) / "in.jsonl"
        src.write_text("".join(json.dumps({"id": i, "prompt": t, "max_tokens": n}) + "\n"
                               for i, (t, n) in enumerate(zip(texts, budgets))))
        stop = ()  # budgets decide the lengths, identically in every mode

        def one_at_a_time() -> int:
            return sum(len(generate(lm.model, [p], max_new_tokens=n, sampling=GREEDY, stop_tokens=stop)[0].tokens)
                       for p, n in zip(prompts, budgets))

        def static_batches() -> int:
            total = 0
            for s in range(0, len(prompts), opts.max_batch):
                group = prompts[s : s + opts.max_batch]
                most = max(budgets[s : s + opts.max_batch])  # one budget per call: the batch runs to its longest
                results = generate(lm.model, group, max_new_tokens=most, sampling=GREEDY, stop_tokens=stop)
                total += sum(min(len(r.tokens), n) for r, n in zip(results, budgets[s : s + opts.max_batch]))
            return total

        runs = [0]

        def batch_mode() -> int:
            runs[0] += 1
            engine = Engine(lm.model, max_batch=opts.max_batch, max_queue=opts.max_batch, max_seq_len=512,
                            token_bytes=lm.tokenizer.decode_single_token_bytes)
            lm_nostop = _NoStop(lm)
            stats = run_batch(engine, lm_nostop, src, Path(tmp) / f"out{runs[0]}.jsonl",
                              defaults=BatchDefaults(temperature=0))
            return stats.completion_tokens

        modes = {"one_at_a_time": one_at_a_time, "static_batches": static_batches, "batch_mode": batch_mode}
        rates: dict[str, list[float]] = {m: [] for m in modes}
        order = list(modes)
        for r in range(opts.rounds):
            for name in order if r % 2 == 0 else order[::-1]:
                t0 = time.perf_counter()
                tokens = modes[name]()
                dt = time.perf_counter() - t0
                rates[name].append(tokens / dt)
                print(f"round {r} {name}: {tokens} tokens in {dt:.2f} s = {tokens / dt:.1f} tok/s", flush=True)
    med = {m: round(statistics.median(v), 2) for m, v in rates.items()}
    print(json.dumps({"model": f"random-dim{opts.dim}-{opts.layers}L-vocab128256-fp32", "params": args.num_params(),
                      "prompts": opts.prompts, "tokens": sum(budgets), "max_batch": opts.max_batch,
                      "kernels": opts.kernels, "threads": torch.get_num_threads(), "rounds": opts.rounds,
                      "median_tokens_per_s": med,
                      "batch_over_one_at_a_time": round(med["batch_mode"] / med["one_at_a_time"], 2),
                      "batch_over_static_batches": round(med["batch_mode"] / med["static_batches"], 2)}))


class _NoStop:
    """The loaded model with no stop tokens, so that budgets alone end each answer in every mode."""

    def __init__(self, lm):
        self._lm = lm

    def __getattr__(self, name):
        return getattr(self._lm, name)

    stop_tokens = ()


if __name__ == "__main__":
    main()
