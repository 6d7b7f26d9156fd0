"""Decode and prefill speed of herd vs HF transformers, against this machine's own rooflines.

Everything is measured in the same run because these machines are noisy: herd and HF are
interleaved repetition by repetition, and the rooflines come from the same process.

* memory read bandwidth: best of a streaming sum and a large fp32 GEMV over 1 GiB
* fp32 matmul peak: best of large square fp32 matmuls
* decode tok/s: (time of generating 1 + N tokens - time of generating 1 token) / N, greedy,
  batch 1, through each library's own generate API (what users call)
* prefill tok/s: prompt length / time of generating 1 token

Roofline fractions: decode reads every matmul weight once per token (all layers plus the
output head; the embedding lookup reads one row), so its bound is bandwidth / weight bytes.
Prefill is compute bound: its bound is (prefill FLOPs) / matmul peak.

    python benchmarks/decode.py                 # Llama-3.2-1B-shaped random fp32 model
    python benchmarks/decode.py --layers 4      # quicker smoke run

The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from herd.generate import SamplingParams, generate
from herd.model import ModelArgs, build_model


def best_time(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def memory_bandwidth_gb_s() -> float:
    n = 1 << 28  # 1 GiB of fp32
    x = torch.ones(n)
    sum_bw = x.numel() * 4 / best_time(lambda: x.sum(), 5) / 1e9
    w, v = x.view(8192, n // 8192), torch.ones(n // 8192)
    gemv_bw = w.numel() * 4 / best_time(lambda: torch.mv(w, v), 5) / 1e9
    return max(sum_bw, gemv_bw)


def matmul_peak_gflop_s() -> float:
    a, b = torch.randn(4096, 4096), torch.randn(4096, 4096)
    return 2 * 4096**3 / best_time(lambda: a @ b, 5) / 1e9


def build_hf(args: ModelArgs):
    from transformers import LlamaConfig, LlamaForCausalLM

    s = args.rope_scaling
    cfg = LlamaConfig(
        vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.ffn_hidden_dim,
        num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads, num_key_value_heads=args.n_kv_heads,
        head_dim=args.head_dim, rms_norm_eps=args.norm_eps, tie_word_embeddings=args.tie_embeddings,
        max_position_embeddings=131072,
        rope_scaling=dict(rope_type="llama3", factor=s.factor, low_freq_factor=s.low_freq_factor,
                          high_freq_factor=s.high_freq_factor, original_max_position_embeddings=s.original_max_seq_len),
        rope_theta=args.rope_theta,
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model.to_empty(device="cpu")
    model.eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02, generator=gen)
    model.model.rotary_emb.__init__(cfg)  # inv_freq is a buffer that to_empty left uninitialised
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=None, help="override n_layers (default: the 1B's 16)")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    opts = ap.parse_args()
    if opts.threads:
        torch.set_num_threads(opts.threads)

    args = ModelArgs.from_name("llama3.2-1b", max_seq_len=4096)
    if opts.layers:
        args = args.replace(n_layers=opts.layers)
    print(f"model: llama3.2-1b shape, {args.n_layers} layers, {args.num_params() / 1e9:.3f} B params, fp32, "
          f"{torch.get_num_threads()} threads")
    bw, peak = memory_bandwidth_gb_s(), matmul_peak_gflop_s()
    print(f"machine: read bandwidth {bw:.1f} GB/s, fp32 matmul peak {peak:.1f} GFLOP/s")

    herd_model = build_model(args, seed=0).eval()
    hf_model = build_hf(args)
    prompt = torch.randint(0, args.vocab_size, (1, opts.prompt_len), generator=torch.Generator().manual_seed(2))
    greedy = SamplingParams(temperature=0.0)

    def run_herd(n: int) -> None:
        generate(herd_model, prompt.tolist(), max_new_tokens=n, sampling=greedy)

    def run_hf(n: int) -> None:
        with torch.inference_mode():
            hf_model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, pad_token_id=0)

    run_herd(2)  # warm up both (first calls allocate and pick kernels)
    run_hf(2)
    times: dict[str, list[float]] = {k: [] for k in ("herd_1", "herd_n", "hf_1", "hf_n")}
    n = 1 + opts.new_tokens
    for _ in range(opts.reps):
        for name, fn in (("herd", run_herd), ("hf", run_hf)):
            t = time.perf_counter(); fn(1); times[f"{name}_1"].append(time.perf_counter() - t)  # noqa: E702
            t = time.perf_counter(); fn(n); times[f"{name}_n"].append(time.perf_counter() - t)  # noqa: E702

    def rates(name: str) -> tuple[float, float]:
        t1, tn = statistics.median(times[f"{name}_1"]), statistics.median(times[f"{name}_n"])
        if tn <= t1:
            raise SystemExit(f"{name}: generating {n} tokens was not slower than 1 ({tn:.3f} s vs {t1:.3f} s); "
                             "the machine is too noisy, raise --new-tokens or --reps")
        return opts.prompt_len / t1, opts.new_tokens / (tn - t1)

    herd_prefill, herd_decode = rates("herd")
    hf_prefill, hf_decode = rates("hf")

    # Rooflines. Decode reads all matmul weights (the output head too; tied or not it is read).
    weight_bytes = (args.num_params(embeddings=False) + args.vocab_size * args.dim) * 4
    decode_bound = bw * 1e9 / weight_bytes  # tok/s
    S, L, H, D = opts.prompt_len, args.n_layers, args.n_heads, args.head_dim
    prefill_flops = 2 * args.num_params(embeddings=False) * S + 2 * args.vocab_size * args.dim \
        + 2 * 2 * L * H * D * S * (S + 1) / 2  # causal QK^T and PV
    prefill_bound = S / (prefill_flops / (peak * 1e9))  # tok/s

    print(f"{'':8}{'prefill tok/s':>16}{'decode tok/s':>14}")
    print(f"{'herd':8}{herd_prefill:16.1f}{herd_decode:14.2f}")
    print(f"{'HF':8}{hf_prefill:16.1f}{hf_decode:14.2f}")
    print(f"{'bound':8}{prefill_bound:16.1f}{decode_bound:14.2f}")
    figures = {
        "model": f"llama3.2-1b-shape-{args.n_layers}L-fp32",
        "threads": torch.get_num_threads(),
        "prompt_len": S,
        "new_tokens": opts.new_tokens,
        "bandwidth_gb_s": round(bw, 2),
        "matmul_peak_gflop_s": round(peak, 1),
        "decode_herd_tok_s": round(herd_decode, 3),
        "decode_hf_tok_s": round(hf_decode, 3),
        "prefill_herd_tok_s": round(herd_prefill, 2),
        "prefill_hf_tok_s": round(hf_prefill, 2),
        "decode_herd_over_hf": round(herd_decode / hf_decode, 3),
        "prefill_herd_over_hf": round(herd_prefill / hf_prefill, 3),
        "decode_roofline_fraction": round(herd_decode / decode_bound, 3),
        "decode_roofline_fraction_hf": round(hf_decode / decode_bound, 3),
        "prefill_roofline_fraction": round(herd_prefill / prefill_bound, 3),
        "prefill_roofline_fraction_hf": round(hf_prefill / prefill_bound, 3),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
