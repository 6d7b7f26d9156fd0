"""Training throughput: herd's train_step against HF transformers' LlamaForCausalLM, same shape, fp32, CPU.

    .venv/bin/python benchmarks/train.py                 # ~21M parameters, batch 8 x 256
    .venv/bin/python benchmarks/train.py --rounds 9 --steps 3 --threads 2

herd runs `Trainer.train_step` itself (fp32 loss, gradient clipping at 1.0, fused AdamW with
decay groups, the learning rate set per step). HF runs the plain loop a user writes:
`model(input_ids, labels=...).loss.backward()`, `clip_grad_norm_(1.0)`, `torch.optim.AdamW`
with its defaults (betas 0.9/0.95, weight decay 0.1), SDPA attention. Both start from the same
weights (herd's, converted with herd.model.formats) and see the same random tokens; the
document mask is off for herd so both compute plain causal attention.

Rounds alternate the order (herd first, then HF first) so that drift in machine load hits both
equally; each round times `--steps` steps per contender after one warm-up step, and the
reported figure is the median over rounds. The machine is shared: expect noise, read medians.

FLOPs per token are herd.model.ModelArgs.flops_per_token(seq_len): 6 x (non-embedding
parameters + the output head) for the matmuls forward and backward, plus the attention score
and value products 12 x n_layers x n_heads x head_dim x seq_len (no discount for causality).
MFU = tokens/s x FLOPs/token / peak, where the peak is the best fp32 FLOP/s of a 2048 x 2048
matmul measured on this machine at the start and at the end (the higher is used).

Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass

import torch


@dataclass
class SyntheticBatch:
    inputs: torch.Tensor
    targets: torch.Tensor
    doc_ids: torch.Tensor
    num_targets: int


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=2, help="timed steps per contender per round")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--compile", action="store_true", help="herd's blocks through torch.compile ([parallel] compile)")
    opts = p.parse_args(argv)
    if opts.threads:
        torch.set_num_threads(opts.threads)

    from transformers import LlamaConfig, LlamaForCausalLM

    from herd.model import ModelArgs
    from herd.model.keymap import hf_config_from_args, to_hf_state_dict
    from herd.train.config import config_from_dict
    from herd.train.metrics import measure_matmul_peak
    from herd.train.trainer import Trainer

    B, S = opts.batch, opts.seq
    args = ModelArgs(dim=opts.dim, n_layers=opts.layers, n_heads=opts.heads, n_kv_heads=opts.kv_heads,
                     vocab_size=opts.vocab, multiple_of=256, max_seq_len=S)
    flops_per_token = args.flops_per_token(S)
    peak_start = measure_matmul_peak(torch.device("cpu"), torch.float32, cached=False)

    with tempfile.TemporaryDirectory() as out:
        cfg = config_from_dict({
            "job": {"out_dir": out, "device": "cpu", "seed": 0},
            "model": {"preset": "", **{k: getattr(args, k) for k in (
                "dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "max_seq_len")}},
            "data": {"train": ["synthetic"]},
            "train": {"document_mask": False},
            "optim": {"lr": 3e-4},
            "metrics": {"tensorboard": False, "plot": False, "progress": False},
            "stages": [{"name": "bench", "steps": 10**6, "ramp": [[0, B * S, S]]}],
            **({"parallel": {"compile": True}} if opts.compile else {}),
        })
        trainer = Trainer(cfg, log=lambda msg: None)
        config = hf_config_from_args(args, dtype=torch.float32)
        config.pop("torch_dtype")
        hf = LlamaForCausalLM(LlamaConfig(**config, attn_implementation="sdpa")).float().train()
        hf.load_state_dict(to_hf_state_dict(trainer.model.state_dict(), args), strict=False)
        hf.tie_weights()
        hf_opt = torch.optim.AdamW(hf.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)

        gen = torch.Generator().manual_seed(0)

        def batch() -> SyntheticBatch:
            tokens = torch.randint(0, args.vocab_size, (B, S + 1), generator=gen)
            return SyntheticBatch(tokens[:, :-1], tokens[:, 1:], torch.zeros(B, S, dtype=torch.long), B * S)

        def herd_step(b: SyntheticBatch) -> float:
            return trainer.train_step([b]).loss

        def hf_step(b: SyntheticBatch) -> float:
            loss = hf(input_ids=b.inputs, labels=b.inputs).loss  # HF shifts the labels itself
            loss.backward()
            torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
            hf_opt.step()
            hf_opt.zero_grad(set_to_none=True)
            return loss.item()

        contenders = {"herd": herd_step, "hf": hf_step}
        for step in contenders.values():  # warm-up: allocator, kernel choice, optimizer state
            step(batch())
        tok_s: dict[str, list[float]] = {name: [] for name in contenders}
        for r in range(opts.rounds):
            order = list(contenders) if r % 2 == 0 else list(reversed(contenders))
            for name in order:
                batches = [batch() for _ in range(opts.steps)]
                t = time.perf_counter()
                for b in batches:
                    contenders[name](b)
                tok_s[name].append(opts.steps * B * S / (time.perf_counter() - t))
            print(f"round {r + 1}/{opts.rounds}: " + ", ".join(f"{n} {tok_s[n][-1]:,.0f} tok/s" for n in contenders),
                  file=sys.stderr, flush=True)

    peak = max(peak_start, measure_matmul_peak(torch.device("cpu"), torch.float32, cached=False))
    med = {name: statistics.median(v) for name, v in tok_s.items()}
    result = {
        "benchmark": "train", "device": "cpu", "dtype": "float32", "threads": torch.get_num_threads(),
        "params": args.num_params(), "non_embedding_params": args.num_params(embeddings=False),
        "shape": {"dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads,
                  "n_kv_heads": args.n_kv_heads, "vocab_size": args.vocab_size, "ffn_hidden": args.ffn_hidden_dim},
        "batch": B, "seq_len": S, "flops_per_token": flops_per_token, "rounds": opts.rounds, "steps": opts.steps,
        "peak_gflops": round(peak / 1e9, 1),
        "herd_tok_s": round(med["herd"]), "hf_tok_s": round(med["hf"]),
        "herd_over_hf": round(med["herd"] / med["hf"], 3),
        "herd_mfu": round(med["herd"] * flops_per_token / peak, 3),
        "hf_mfu": round(med["hf"] * flops_per_token / peak, 3),
    }
    print(f"\n{args.num_params() / 1e6:.1f}M parameters, batch {B} x {S}, fp32, {result['threads']} threads; "
          f"{flops_per_token / 1e6:.1f} MFLOP/token; measured fp32 matmul peak {result['peak_gflops']} GFLOP/s")
    print(f"{'':>6}{'tok/s (median)':>16}{'MFU':>8}   rounds")
    for name in contenders:
        print(f"{name:>6}{med[name]:>16,.0f}{result[name + '_mfu']:>8.1%}   "
              + " ".join(f"{v:,.0f}" for v in tok_s[name]))
    print(f"herd / HF = {result['herd_over_hf']:.2f}x")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
