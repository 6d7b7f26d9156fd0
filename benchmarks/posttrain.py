"""LoRA finetuning: herd against HF transformers + PEFT on the same shape and data; QLoRA against LoRA.

    .venv/bin/python benchmarks/posttrain.py            # ~3-6 min on a 2-core CPU

Shape: Llama 3.2 style (tied embeddings, GQA 8/2, the real 128,256-token vocabulary) at dim 512
and 4 layers, fp32; LoRA rank 16 on all seven block linears; AdamW; batch 2 x 256 tokens of
chatterbot dialogs tokenised with the Llama 3 tokenizer (loss on assistant tokens). Both
libraries load the same safetensors file, and their first losses are checked to agree.

Each configuration runs in its own subprocess, alternating herd / HF `--repeats` times; the
median tokens/s is reported. Memory on CPU has no allocator counter, so it is the process's
peak resident set during the timed steps (VmHWM after resetting it through /proc/self/clear_refs
once warm-up is done), minus the resident set measured right after the imports: the model,
optimizer state, activations and temporaries, without the libraries' own code. Every weight is
copied out of the memory-mapped file first, so file pages do not blur the comparison.

The last line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VOCAB = 128256
TARGETS = ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set


def _tensor_bytes(model) -> int:
    """Parameters and buffers, tied tensors once, RoPE tables (herd freqs_cis, HF inv_freq) left out."""
    seen, total = set(), 0
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if "freqs" in name or "inv_freq" in name or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def worker(kind: str, model_dir: str, data: str, steps: int, warmup: int, threads: int, rank: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    if kind == "hf":
        import peft  # noqa: F401  (imported before the baseline, like herd's own modules)
        import transformers  # noqa: F401
    else:
        import herd.posttrain.lora  # noqa: F401
        import herd.posttrain.sft  # noqa: F401
    rss_imports = _status("VmRSS")
    batches = torch.load(data)
    inputs, targets = batches["inputs"], batches["targets"]  # (N, B, S)
    torch.manual_seed(0)
    if kind == "hf":
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=HF_TARGETS,
                                                 lora_dropout=0.0, bias="none", task_type="CAUSAL_LM"))
        params = [p for p in model.parameters() if p.requires_grad]

        def loss_fn(x, t):
            # shift_labels: the targets are already aligned with the inputs (as herd's are).
            return model(input_ids=x, labels=t, shift_labels=t).loss
    else:
        from herd.model import load_model
        from herd.posttrain.data import Batch
        from herd.posttrain.lora import apply_lora, lora_parameters
        from herd.posttrain.sft import next_token_loss_sum
        from herd.targets import IGNORE_INDEX as IGNORE

        model = load_model(model_dir, dtype=torch.float32)
        apply_lora(model, TARGETS, rank, 2.0 * rank, quantize_base=kind == "herd-qlora")
        params = lora_parameters(model)
        plain = kind == "herd-plain-loss"

        def loss_fn(x, t):
            n = int((t != IGNORE).sum())
            if plain:  # ablation: the ordinary logits + cross-entropy path instead of the fused one
                logits = model(x)
                return torch.nn.functional.cross_entropy(logits.flatten(0, 1), t.flatten(), ignore_index=IGNORE)
            return next_token_loss_sum(model, Batch(x, t, None, n)) / n

    # Both loaders map the safetensors file; pages of weights that QLoRA has quantised (or that a
    # library copied) would stay resident as file cache and count in RSS. Own every tensor instead.
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            t.data = t.data.clone()
    model.train()
    opt = torch.optim.AdamW(params, lr=1e-4, foreach=True)
    n_params = sum(p.numel() for p in params)
    param_bytes = _tensor_bytes(model)
    losses, times = [], []
    for step in range(warmup + steps):
        if step == warmup:
            _reset_peak()
            rss_start = _status("VmRSS")
        i = step % inputs.shape[0]
        t0 = time.perf_counter()
        loss = loss_fn(inputs[i], targets[i])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= warmup:
            times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    peak = _status("VmHWM")
    tokens = inputs[0].numel()
    return {"kind": kind, "tokens_per_s": tokens * len(times) / sum(times), "step_s": statistics.median(times),
            "peak_rss_mb": peak / 2**20, "peak_above_imports_mb": (peak - rss_imports) / 2**20,
            "rss_at_timing_start_mb": rss_start / 2**20, "imports_rss_mb": rss_imports / 2**20,
            "params_and_buffers_mb": param_bytes / 2**20, "trainable_params": n_params, "first_loss": losses[0],
            "losses": losses}


def _prepare(tmp: Path, *, seq_len: int, batch: int, n_batches: int) -> tuple[str, str]:
    import torch

    from herd.model import ModelArgs, build_model, save_model
    from herd.posttrain.data import (
        chatterbot_conversations,
        conversation_dialog,
        encode_dialog,
        pack_sft,
    )
    from herd.tokenizer import ChatFormat, Tokenizer, llama3_tokenizer_path

    args = ModelArgs(dim=512, n_layers=4, n_heads=8, n_kv_heads=2, vocab_size=VOCAB, multiple_of=256,
                     ffn_dim_multiplier=1.5, rope_scaling=dict(factor=32.0, original_max_seq_len=8192),
                     max_seq_len=2048, tie_embeddings=True)
    save_model(build_model(args, seed=0), tmp / "model", format="hf")
    fmt = ChatFormat(Tokenizer.from_file(llama3_tokenizer_path()), version="3.1")
    dialogs = [conversation_dialog(c, system="You are a helpful assistant.") for c in chatterbot_conversations()]
    inputs, targets, _ = pack_sft([encode_dialog(fmt, d, max_len=seq_len + 1) for d in dialogs], seq_len=seq_len)
    need = batch * n_batches
    torch.save({"inputs": inputs[:need].view(n_batches, batch, seq_len).clone(),
                "targets": targets[:need].view(n_batches, batch, seq_len).clone()}, tmp / "data.pt")
    return str(tmp / "model"), str(tmp / "data.pt")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2, help="runs of each configuration, alternating")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--kinds", default="herd,hf,herd-qlora,herd-plain-loss",
                   help="configurations to run (herd, hf, herd-qlora, herd-plain-loss); the summary needs all four")
    opts = p.parse_args()
    if opts.worker:
        print(json.dumps(worker(opts.worker, opts.model, opts.data, opts.steps, opts.warmup, opts.threads, opts.rank)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        model_dir, data = _prepare(Path(tmp), seq_len=opts.seq_len, batch=opts.batch,
                                   n_batches=opts.steps + opts.warmup)
        runs: dict[str, list[dict]] = {}
        kinds = opts.kinds.split(",")
        for r in range(opts.repeats):
            for kind in kinds if r == 0 else [k for k in kinds if k in ("herd", "hf")]:  # ablations once
                cmd = [sys.executable, __file__, "--worker", kind, "--model", model_dir, "--data", data,
                       "--steps", str(opts.steps), "--warmup", str(opts.warmup), "--threads", str(opts.threads),
                       "--rank", str(opts.rank)]
                out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
                if out.returncode != 0:
                    raise SystemExit(f"{kind} worker failed:\n{out.stderr[-3000:]}")
                res = json.loads(out.stdout.strip().splitlines()[-1])
                runs.setdefault(kind, []).append(res)
                print(f"{kind:>16}: {res['tokens_per_s']:8.1f} tok/s  peak {res['peak_rss_mb']:7.0f} MiB "
                      f"({res['peak_above_imports_mb']:6.0f} above imports)  weights+buffers "
                      f"{res['params_and_buffers_mb']:6.1f} MiB  first loss {res['first_loss']:.4f}", flush=True)

    if set(runs) != {"herd", "hf", "herd-qlora", "herd-plain-loss"}:
        return  # a partial run (--kinds): the lines above are its result

    def med(kind: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[kind])

    herd_tps, hf_tps = med("herd", "tokens_per_s"), med("hf", "tokens_per_s")
    herd_mem, hf_mem = med("herd", "peak_above_imports_mb"), med("hf", "peak_above_imports_mb")
    loss_gap = abs(runs["herd"][0]["first_loss"] - runs["hf"][0]["first_loss"])
    assert loss_gap < 1e-3, f"herd and HF+PEFT disagree on the first loss by {loss_gap}: not the same computation"
    summary = {
        "model": "llama3.2-style dim512 4L vocab128256 tied fp32", "lora_rank": opts.rank, "threads": opts.threads,
        "tokens_per_step": opts.batch * opts.seq_len, "timed_steps": opts.steps, "repeats": opts.repeats,
        "herd_lora_tok_s": round(herd_tps, 1), "hf_peft_lora_tok_s": round(hf_tps, 1),
        "speed_herd_over_hf": round(herd_tps / hf_tps, 3),
        "herd_lora_peak_mb": round(herd_mem, 1), "hf_peft_lora_peak_mb": round(hf_mem, 1),
        "memory_herd_over_hf": round(herd_mem / hf_mem, 3),
        "herd_plain_loss_tok_s": round(med("herd-plain-loss", "tokens_per_s"), 1),
        "herd_plain_loss_peak_mb": round(med("herd-plain-loss", "peak_above_imports_mb"), 1),
        "herd_qlora_tok_s": round(med("herd-qlora", "tokens_per_s"), 1),
        "herd_qlora_peak_mb": round(med("herd-qlora", "peak_above_imports_mb"), 1),
        "lora_weights_buffers_mb": round(med("herd", "params_and_buffers_mb"), 1),
        "qlora_weights_buffers_mb": round(med("herd-qlora", "params_and_buffers_mb"), 1),
        "first_loss_herd": round(runs["herd"][0]["first_loss"], 5), "first_loss_hf": round(runs["hf"][0]["first_loss"], 5),
        "target_met": herd_tps >= hf_tps and herd_mem < hf_mem,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
