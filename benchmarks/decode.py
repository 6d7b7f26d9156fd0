"""Decode and prefill speed of herd (fp32, int8, int4) vs HF transformers and llama.cpp, on rooflines.

Everything is measured in the same run because these machines are noisy: every engine is
timed once per repetition, in turn, and the medians are reported; the rooflines come from the
same process.

* memory read bandwidth: best of a streaming sum and a large fp32 GEMV over 1 GiB
* fp32 matmul peak: best of large square fp32 matmuls
* decode tok/s: N / (time between the first and the last of 1 + N generated tokens), greedy,
  batch 1, from a timestamp taken as each token becomes available. herd through
  `generate_tokens` (the streaming generator under `generate`), HF through `model.generate`
  with a streamer, llama.cpp through llama-cpp-python's `eval` (prefill, then one token at a
  time, greedy on its logits). Timing the decode steps themselves matters: the earlier
  "time(1 + N tokens) - time(1 token)" took the difference of two runs that each include the
  prefill, and for the quantized engines (prefill 5-8 s, decode ~1 s) the prefill's run-to-run
  noise swamped the decode time.
* prefill tok/s: prompt length / time to the first generated token

Roofline fractions: decode reads every matmul weight once per token (all layers plus the output
head, in whatever format the engine stores them; the embedding lookup reads one row), so its
bound is bandwidth / those bytes. Prefill is compute bound: (prefill FLOPs) / matmul peak.

Engines: herd fp32 with its AVX2 GEMV kernel and fused decode block (`apply_cpu_kernels`,
`apply_fast_decode`, as `herd generate` runs on CPU), herd int8 and int4 (`quantize`'s default
recipe: int4 groups of 32, output head int8), HF transformers fp32, and with --llamacpp llama.cpp
at F32, Q8_0 and Q4_0 on the *same* weights as herd, written by `herd.model.gguf.write_gguf`
(cached in --gguf-dir; its Q4_0 keeps the tied embedding / output head at Q8_0, as llama.cpp's
own 4-bit mixes keep that tensor at 6-8 bits). llama.cpp runs in a process of its own without
torch (benchmarks/llamacpp_worker.py), as its users run it; --llamacpp-in-process loads it into
this process instead, as earlier versions of this script did, to compare the two. llama-cpp-python
comes with herd's `llamacpp` extra (it compiles llama.cpp from source, ~6 minutes on 2 cores).

Quality cost: a random model has no meaningful perplexity, so each quantized engine is
compared with herd fp32 on next-token distributions: mean KL(fp32 || quantized) and how often
the argmax agrees, twice: over the prompt's positions as prefill computes them, and over N
positions computed by decode steps (the prompt, then herd fp32's greedy continuation fed one
token at a time). They differ for herd's `activations="int8"` mode, which quantizes activations
only in the decode kernels (at most 16 rows); prefill stays exact. (`herd eval perplexity`
measures the perplexity change on real text for trained checkpoints.)

    python benchmarks/decode.py                 # Llama-3.2-1B-shaped random model
    python benchmarks/decode.py --llamacpp      # ... and llama.cpp F32 / Q8_0 / Q4_0
    python benchmarks/decode.py --layers 4      # quicker smoke run

The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import importlib.util
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from engines import herd_runner, hf_runner, time_engines  # noqa: E402
from llamacpp_client import LlamaCppProcess  # noqa: E402

from herd.generate import KVCache, SamplingParams, generate  # noqa: E402
from herd.generate.fast_decode import apply_fast_decode  # noqa: E402
from herd.generate.generate import decode_step, prefill  # noqa: E402
from herd.model import ModelArgs, build_model  # noqa: E402
from herd.model.gguf import write_gguf  # noqa: E402
from herd.quant import QuantConfig, apply_cpu_kernels, quantize  # noqa: E402
from herd.quant.linear import Fp8Linear, Int4Linear, Int8Linear  # noqa: E402


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


def matmul_bytes(model: torch.nn.Module) -> int:
    """Bytes of every matmul weight (codes + scales for quantized layers): what decode reads."""
    kinds = (torch.nn.Linear, Int8Linear, Int4Linear, Fp8Linear)
    total = 0
    for m in model.modules():
        if isinstance(m, kinds):
            total += sum(t.numel() * t.element_size() for t in (*m.parameters(recurse=False), *m.buffers(recurse=False)))
    return total


def quantized_copy(args: ModelArgs, scheme: str, group_size: int, share_embedding: torch.nn.Parameter,
                   activations: str = "float"):
    """The benchmark's weights (seed 0), quantized; the float embedding is shared, not copied."""
    model = build_model(args, seed=0).eval()
    quantize(model, QuantConfig(scheme, group_size=group_size, activations=activations))
    model.tok_embeddings.weight = share_embedding  # identical values; saves 1 GB per copy
    gc.collect()
    return model


# ---- llama.cpp ------------------------------------------------------------------------------

LLAMACPP_TYPES = ("F32", "Q8_0", "Q4_0")


def ensure_llamacpp() -> None:
    if importlib.util.find_spec("llama_cpp") is None:
        raise SystemExit("--llamacpp needs llama-cpp-python: pip install 'herd[llamacpp]' (compiles llama.cpp, "
                         "~6 minutes on 2 cores)")


def _llama3_vocab(vocab_size: int) -> dict:
    """GGUF tokenizer metadata of the Llama 3 tokenizer (llama.cpp refuses a GGUF without one)."""
    from herd.tokenizer import Tokenizer, llama3_tokenizer_path
    from herd.tokenizer.export import gguf_tokenizer_metadata

    return gguf_tokenizer_metadata(Tokenizer.from_file(llama3_tokenizer_path()), vocab_size=vocab_size)


def gguf_matmul_bytes(path: Path) -> int:
    """Bytes of the GGUF's 2-D weights (token_embd is the tied output head, read every token)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    return sum(int(t.n_bytes) for t in reader.tensors if len(t.shape) == 2 or t.name == "token_embd.weight")


def llamacpp_files(model, gguf_dir: Path) -> dict[str, Path]:
    """The benchmark model as GGUF files at LLAMACPP_TYPES, written once and cached by shape."""
    a = model.args
    tag = hashlib.sha256(repr((a, "seed0", "herd.model.gguf")).encode()).hexdigest()[:10]
    out = {}
    for qtype in LLAMACPP_TYPES:
        path = gguf_dir / f"bench-{tag}-{qtype}.gguf"
        if not path.is_file():  # herd's GGUF writer; at Q4_0 the tied embedding / output head is Q8_0
            print(f"writing {path} ...", flush=True)
            write_gguf(model, path, qtype=qtype, tokenizer_metadata=_llama3_vocab(a.vocab_size))
        out[qtype] = path
    return out


def llamacpp_in_process(path: Path, n_ctx: int, threads: int):
    from llama_cpp import Llama

    return Llama(model_path=str(path), n_ctx=n_ctx, n_batch=512, n_threads=threads, n_threads_batch=threads,
                 logits_all=True, verbose=False)


def llamacpp_runner(llm, prompt: list[int]) -> Callable[[int], tuple[float, list[float]]]:
    """run(n) -> (start, a timestamp as each of the n greedy tokens becomes available)."""
    import numpy as np

    def run(n: int) -> tuple[float, list[float]]:
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)  # prefill; its last row of logits gives the first new token
        stamps = [time.perf_counter()]
        for _ in range(n - 1):
            tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            llm.eval([tok])
            stamps.append(time.perf_counter())
        return t0, stamps

    return run


def llamacpp_decode_logits(llm, prompt: list[int], continuation: list[int]) -> torch.Tensor:
    """(len(continuation), V) logits, each from a one-token `eval` after the prompt's prefill."""
    llm.reset()
    llm.eval(prompt)
    for tok in continuation:
        llm.eval([tok])
    S = len(prompt)
    return torch.from_numpy(llm.scores[S : S + len(continuation)].copy()).float()


# ---- quality ---------------------------------------------------------------------------------


def divergence(ref_logits: torch.Tensor, logits: torch.Tensor) -> tuple[float, float]:
    """Mean KL(ref || other) over positions, and the share of positions whose argmax agrees."""
    kl = F.kl_div(logits.log_softmax(-1), ref_logits.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    return float(kl.mean()), float((logits.argmax(-1) == ref_logits.argmax(-1)).float().mean())


def herd_decode_logits(model, prompt: list[int], continuation: list[int]) -> torch.Tensor:
    """(len(continuation), V) logits, each from a one-token decode step after the prompt's prefill.

    These go through the decode path (the small-M kernels and, with activations="int8", their
    activation quantization), where logits from one forward pass over the sequence would not.
    """
    S = len(prompt)
    cache = KVCache(model.args, batch_size=1, max_seq_len=S + len(continuation),
                    dtype=model.tok_embeddings.weight.dtype)
    with torch.inference_mode():
        prefill(model, torch.tensor([prompt]), cache)
        rows = [decode_step(model, torch.tensor([tok]), torch.tensor([S + i]), cache)[0]
                for i, tok in enumerate(continuation)]
    return torch.stack(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=None, help="override n_layers (default: the 1B's 16)")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--group-size", type=int, default=32, help="int4 group size (herd quantize's default)")
    ap.add_argument("--activations", choices=("float", "int8", "both"), default="both",
                    help="herd int8/int4 decode with exact fp32 activations, int8-quantized ones, or both")
    ap.add_argument("--llamacpp", action="store_true", help="also llama.cpp F32/Q8_0/Q4_0, each in its own process")
    ap.add_argument("--llamacpp-in-process", action="store_true",
                    help="with --llamacpp: load llama.cpp into this (torch) process instead")
    ap.add_argument("--gguf-dir", default="runs/bench-gguf", help="where converted GGUF files are cached")
    opts = ap.parse_args()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    threads = torch.get_num_threads()

    args = ModelArgs.from_name("llama3.2-1b", max_seq_len=4096)
    if opts.layers:
        args = args.replace(n_layers=opts.layers)
    print(f"model: llama3.2-1b shape, {args.n_layers} layers, {args.num_params() / 1e9:.3f} B params, "
          f"{threads} threads")
    if opts.llamacpp:
        ensure_llamacpp()
    bw, peak = memory_bandwidth_gb_s(), matmul_peak_gflop_s()
    print(f"machine: read bandwidth {bw:.1f} GB/s, fp32 matmul peak {peak:.1f} GFLOP/s")

    fp32 = build_model(args, seed=0).eval()
    kernel_layers = apply_cpu_kernels(fp32)
    print(f"herd fp32: {kernel_layers} linear layers on herd's GEMV kernel")
    engines: dict[str, dict] = {"herd_fp32": {"model": fp32}}
    modes = ["float", "int8"] if opts.activations == "both" else [opts.activations]
    for scheme in ("int8", "int4"):
        for mode in modes:  # herd_int8 / herd_int8_a8: exact fp32 activations / int8-quantized activations
            name = f"herd_{scheme}" + ("_a8" if mode == "int8" else "")
            engines[name] = {"model": quantized_copy(args, scheme, opts.group_size, fp32.tok_embeddings.weight,
                                                     activations=mode)}
    for e in engines.values():
        e["bytes"] = matmul_bytes(e["model"])
        apply_cpu_kernels(e["model"])  # int4: the decode kernels' tiles, as `herd generate` repacks them
        apply_fast_decode(e["model"])  # each decode step's block as one fused op, as the CLI does on CPU
    hf_model = build_hf(args)
    engines["hf_fp32"] = {"model": hf_model, "bytes": engines["herd_fp32"]["bytes"]}
    prompt = torch.randint(0, args.vocab_size, (1, opts.prompt_len), generator=torch.Generator().manual_seed(2))
    prompt_ids = prompt[0].tolist()
    n = 1 + opts.new_tokens

    # Quality: prefill positions (one forward pass) and decode positions (one-token steps over
    # herd fp32's greedy continuation), each against herd fp32 on the same positions.
    continuation = generate(fp32, [prompt_ids], max_new_tokens=opts.new_tokens,
                            sampling=SamplingParams(temperature=0.0))[0].tokens
    with torch.inference_mode():
        ref_full = fp32(torch.tensor([prompt_ids + continuation]))[0]  # (S + N, V)
    ref_prefill, ref_decode = ref_full[: opts.prompt_len], ref_full[opts.prompt_len:]
    del ref_full
    with torch.inference_mode():
        for name in [n for n in engines if n.startswith(("herd_int8", "herd_int4"))]:
            model = engines[name]["model"]
            engines[name]["kl"], engines[name]["top1"] = divergence(ref_prefill, model(prompt)[0])
            engines[name]["kl_decode"], engines[name]["top1_decode"] = divergence(
                ref_decode, herd_decode_logits(model, prompt_ids, continuation))

    for name in [n for n in engines if n.startswith("herd_")]:
        engines[name]["run"] = herd_runner(engines[name]["model"], prompt_ids)

    engines["hf_fp32"]["run"] = hf_runner(hf_model, prompt)

    workers = []
    if opts.llamacpp:
        n_ctx = opts.prompt_len + opts.new_tokens + 8
        for qtype, path in llamacpp_files(fp32, Path(opts.gguf_dir)).items():
            name = f"llamacpp_{qtype.lower()}"
            if opts.llamacpp_in_process:
                llm = llamacpp_in_process(path, n_ctx, threads)
                engines[name] = {"run": llamacpp_runner(llm, prompt_ids)}
                llm.reset()
                llm.eval(prompt_ids)
                prefill_logits = torch.from_numpy(llm.scores[: opts.prompt_len].copy()).float()
                decode_logits = llamacpp_decode_logits(llm, prompt_ids, continuation)
            else:
                worker = LlamaCppProcess(path, threads=threads, n_ctx=n_ctx)
                workers.append(worker)
                engines[name] = {"run": lambda k, w=worker: w.run(prompt_ids, k)}
                rows = torch.from_numpy(worker.logits(prompt_ids, continuation)).float()
                prefill_logits, decode_logits = rows[: opts.prompt_len], rows[opts.prompt_len:]
            engines[name]["bytes"] = gguf_matmul_bytes(path)
            engines[name]["kl"], engines[name]["top1"] = divergence(ref_prefill, prefill_logits)
            engines[name]["kl_decode"], engines[name]["top1_decode"] = divergence(ref_decode, decode_logits)
    del ref_prefill, ref_decode

    try:
        time_engines(engines, n=n, reps=opts.reps)
    finally:
        for w in workers:
            w.close()

    S, L, H, D = opts.prompt_len, args.n_layers, args.n_heads, args.head_dim
    prefill_flops = 2 * args.num_params(embeddings=False) * S + 2 * args.vocab_size * args.dim \
        + 2 * 2 * L * H * D * S * (S + 1) / 2  # causal QK^T and PV
    prefill_bound = S / (prefill_flops / (peak * 1e9))  # tok/s, fp32 compute
    for name, e in engines.items():
        e["prefill"] = S / statistics.median(e["prefill_s"])
        e["decode"] = opts.new_tokens / statistics.median(e["decode_s"])
        e["bound"] = bw * 1e9 / e["bytes"]  # decode tok/s if weights streamed at full bandwidth

    print(f"{'':16}{'weights MB':>11}{'prefill tok/s':>15}{'decode tok/s':>14}{'decode bound':>14}"
          f"{'fraction':>10}{'KL prefill':>12}{'KL decode':>11}{'top-1 prefill':>15}{'top-1 decode':>14}")
    for name, e in engines.items():
        kl, kld = (f"{e[k]:.2e}" if k in e else "-" for k in ("kl", "kl_decode"))
        top1, top1d = (f"{e[k]:.3f}" if k in e else "-" for k in ("top1", "top1_decode"))
        print(f"{name:16}{e['bytes'] / 1e6:11.0f}{e['prefill']:15.1f}{e['decode']:14.2f}{e['bound']:14.2f}"
              f"{e['decode'] / e['bound']:10.3f}{kl:>12}{kld:>11}{top1:>15}{top1d:>14}")
    print(f"{'fp32 prefill bound':16}{'':11}{prefill_bound:15.1f}")

    herd, hf = engines["herd_fp32"], engines["hf_fp32"]
    figures: dict[str, object] = {
        "model": f"llama3.2-1b-shape-{args.n_layers}L",
        "threads": threads,
        "prompt_len": S,
        "new_tokens": opts.new_tokens,
        "reps": opts.reps,
        "bandwidth_gb_s": round(bw, 2),
        "matmul_peak_gflop_s": round(peak, 1),
        "decode_herd_tok_s": round(herd["decode"], 3),
        "decode_hf_tok_s": round(hf["decode"], 3),
        "prefill_herd_tok_s": round(herd["prefill"], 2),
        "prefill_hf_tok_s": round(hf["prefill"], 2),
        "decode_herd_over_hf": round(herd["decode"] / hf["decode"], 3),
        "prefill_herd_over_hf": round(herd["prefill"] / hf["prefill"], 3),
        "decode_roofline_fraction": round(herd["decode"] / herd["bound"], 3),
        "decode_roofline_fraction_hf": round(hf["decode"] / hf["bound"], 3),
        "prefill_roofline_fraction": round(herd["prefill"] / prefill_bound, 3),
        "prefill_roofline_fraction_hf": round(hf["prefill"] / prefill_bound, 3),
    }
    for name, e in engines.items():
        if name in ("herd_fp32", "hf_fp32"):
            continue
        figures[f"decode_{name}_tok_s"] = round(e["decode"], 3)
        figures[f"prefill_{name}_tok_s"] = round(e["prefill"], 2)
        figures[f"decode_{name}_roofline_fraction"] = round(e["decode"] / e["bound"], 3)
        figures[f"weights_{name}_mb"] = round(e["bytes"] / 1e6, 1)
        if "kl" in e:
            figures[f"kl_{name}_vs_fp32"] = float(f"{e['kl']:.3e}")
            figures[f"top1_{name}_vs_fp32"] = round(e["top1"], 4)
            figures[f"kl_decode_{name}_vs_fp32"] = float(f"{e['kl_decode']:.3e}")
            figures[f"top1_decode_{name}_vs_fp32"] = round(e["top1_decode"], 4)
    if opts.llamacpp:
        for suffix in ("", "_a8"):
            if f"herd_int8{suffix}" in engines:
                figures[f"decode_int8{suffix}_over_llamacpp_q8_0"] = round(
                    engines[f"herd_int8{suffix}"]["decode"] / engines["llamacpp_q8_0"]["decode"], 3)
                figures[f"decode_int4{suffix}_over_llamacpp_q4_0"] = round(
                    engines[f"herd_int4{suffix}"]["decode"] / engines["llamacpp_q4_0"]["decode"], 3)
        figures["decode_fp32_over_llamacpp_f32"] = round(herd["decode"] / engines["llamacpp_f32"]["decode"], 3)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
