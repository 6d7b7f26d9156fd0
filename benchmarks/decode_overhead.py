"""Per-token overhead of herd's decode on a small real model, in measures that survive a busy machine.

SmolLM2-135M is small enough (int8 weights ~140 MB) that the matmuls take only a few ms per token
and the ~1,000 small ATen ops around them show. Wall-clock tok/s on a 2-core machine shared with
other jobs moves by tens of percent from run to run, so this script reports what contention
barely moves:

* CPU time per decode token at one thread (`time.thread_time` around herd's steps; llama.cpp's
  `process_time` inside its own process, `benchmarks/llamacpp_worker.py` with threads=1),
  median over repetitions, for herd's eager path ("eager") and its fused decode with the
  weights in huge pages ("fused", `herd.generate.fast_decode.apply_fast_decode`), and for
  llama.cpp at F32 / Q8_0 / Q4_0 on the same weights, interleaved repetition by repetition;
  "*_speed_vs_llamacpp" is llama.cpp's time / herd's, per repetition, median (> 1: herd faster);
* the same for a prefill of the prompt, per prompt token;
* "gemv_floor_ms": the GEMV kernels alone per token (every linear's op called in model order,
  minus the cost of a call), and "non_gemv_share" = 1 - floor / decode time: the overhead;
* `torch.profiler` self-CPU time split into the GEMV kernels (`herd_cpu::linear_*`), the fused
  block op, and everything else, plus the op dispatches per token.

The GGUF files are written from the same fp32 weights with the `gguf` package into --gguf-dir
(tokenizer fields copied from the original SmolLM2 GGUF), once.

    python benchmarks/decode_overhead.py --hf /tmp/smol/hf-fp32 --gguf-dir /tmp/perf-gguf

The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent))  # this checkout's herd, not an installed one

from herd.generate import KVCache
from herd.generate.generate import decode_step, prefill
from herd.model import load_model
from herd.quant import QuantConfig, apply_cpu_kernels, quantize

GGUF_NAMES = {"attention.wq": "attn_q", "attention.wk": "attn_k", "attention.wv": "attn_v",
              "attention.wo": "attn_output", "feed_forward.w1": "ffn_gate", "feed_forward.w2": "ffn_down",
              "feed_forward.w3": "ffn_up"}


def write_gguf(model, path: Path, qtype: str, tokenizer_from: Path) -> None:
    """herd's weights as a llama.cpp GGUF; 2-D weights in `qtype`, KV fields copied from `tokenizer_from`."""
    import gguf
    import numpy as np

    qt = getattr(gguf.GGMLQuantizationType, qtype)
    src = gguf.GGUFReader(str(tokenizer_from))
    w = gguf.GGUFWriter(str(path.with_suffix(".tmp")), "llama")
    skip = {"general.architecture", "general.file_type", "general.quantization_version"}
    for name, field in src.fields.items():
        if name.startswith("GGUF.") or name in skip:
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(name, field.contents(), vtype, sub_type=sub)
    w.add_file_type({"F32": gguf.LlamaFileType.ALL_F32, "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                     "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[qtype])

    def add(name: str, t: torch.Tensor) -> None:
        x = t.detach().float().contiguous().numpy()
        if x.ndim == 2 and qt != gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, gguf.quants.quantize(x, qt), raw_dtype=qt)
        else:
            w.add_tensor(name, x.astype(np.float32))

    assert model.args.tie_embeddings
    add("token_embd.weight", model.tok_embeddings.weight)  # tied: also the output head
    add("output_norm.weight", model.norm.weight)
    for i, layer in model.layers.items():
        add(f"blk.{i}.attn_norm.weight", layer.attention_norm.weight)
        add(f"blk.{i}.ffn_norm.weight", layer.ffn_norm.weight)
        for src_name, dst in GGUF_NAMES.items():
            add(f"blk.{i}.{dst}.weight", layer.get_submodule(src_name).weight)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    path.with_suffix(".tmp").rename(path)


# ---- herd -----------------------------------------------------------------------------------


CLOCK = time.thread_time  # --threads > 1: time.perf_counter (the other threads' time is not in thread_time)


def herd_cpu_per_token(model, prompt: list[int], n: int, step) -> tuple[float, float]:
    """(prefill s per prompt token, decode s per token), greedy, on CLOCK."""
    S = len(prompt)
    cache = KVCache(model.args, batch_size=1, max_seq_len=S + n + 1)
    t0 = CLOCK()
    h = prefill(model, torch.tensor([prompt]), cache)
    tok = model.output(h[:, -1]).argmax(-1)
    t1 = CLOCK()
    for i in range(n):
        tok = step(model, tok, torch.tensor([S + i]), cache).argmax(-1)
    t2 = CLOCK()
    return (t1 - t0) / S, (t2 - t1) / n


def gemv_floor_ms(model, reps: int = 5) -> float:
    """CPU ms per token of the decode GEMVs alone: every linear's kernel op called directly, in model
    order (so the weights stream from memory as in decode), minus the measured cost of an op call.
    What a step costs beyond this is the overhead: the small ops, the Python, the dispatch."""
    from herd.kernels import cpu_kernels
    from herd.quant.linear import Int4Linear, Int8Linear

    ops = cpu_kernels()
    calls = []
    for mod in model.modules():  # duck-typed on the quant modules, so it also runs on older herd
        a8 = getattr(mod, "activations", "float") == "int8"
        if isinstance(mod, Int8Linear):
            x = torch.randn(1, mod.in_features)
            calls.append((ops.linear_int8_a8 if a8 else ops.linear_int8, (x, mod.weight, mod.scale)))
        elif isinstance(mod, Int4Linear):
            x = torch.randn(1, mod.in_features)
            calls.append((ops.linear_int4_a8 if a8 else ops.linear_int4,
                          (x, mod.weight, mod.scales, mod.mins, mod.group_size)))
        elif isinstance(mod, torch.nn.Linear):
            calls.append((ops.linear_f32, (torch.randn(1, mod.in_features), mod.weight)))
    tiny = (torch.randn(1, 8), torch.randn(1, 8))
    best = call = 1e9
    for _ in range(reps):
        t = CLOCK()
        for fn, a in calls:
            fn(*a)
        best = min(best, CLOCK() - t)
        t = CLOCK()
        for _ in calls:
            ops.linear_f32(*tiny)
        call = min(call, CLOCK() - t)
    return 1e3 * (best - call)


def profile_decode(model, prompt: list[int], n: int, step) -> dict:
    """Self-CPU shares of one thread's decode steps: GEMV kernels, fused block, the rest."""
    from torch.profiler import ProfilerActivity, profile

    S = len(prompt)
    cache = KVCache(model.args, batch_size=1, max_seq_len=S + n + 1)
    h = prefill(model, torch.tensor([prompt]), cache)
    tok = model.output(h[:, -1]).argmax(-1)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(n):
            tok = step(model, tok, torch.tensor([S + i]), cache).argmax(-1)
    gemv = block = other = 0.0
    calls = 0
    for e in prof.key_averages():
        if e.key.startswith("herd_cpu::linear") or e.key.startswith("herd_cpu::dequantize"):
            gemv += e.self_cpu_time_total
        elif e.key.startswith("herd_cpu::"):
            block += e.self_cpu_time_total
        else:
            other += e.self_cpu_time_total
        calls += e.count
    total = gemv + block + other
    return {"gemv_share": round(gemv / total, 3), "fused_share": round(block / total, 3),
            "other_share": round(other / total, 3), "ops_per_token": round(calls / n)}


PAIRS = {"fp32": "F32", "int8": "Q8_0", "int8_a8": "Q8_0", "int4_a8": "Q4_0", "int4": "Q4_0"}
CONFIGS = {"int8": QuantConfig("int8"), "int8_a8": QuantConfig("int8", activations="int8"),
           "int4": QuantConfig("int4"), "int4_a8": QuantConfig("int4", activations="int8")}


def herd_engine(fp32, name: str):
    model = copy.deepcopy(fp32)
    if name == "fp32":
        apply_cpu_kernels(model)
    else:
        quantize(model, CONFIGS[name])
    return model


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hf", default="/tmp/smol/hf-fp32")
    ap.add_argument("--gguf-dir", type=Path, default=Path("/tmp/perf-gguf"))
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--no-llamacpp", action="store_true")
    ap.add_argument("--engines", default="fp32,int8,int8_a8,int4_a8")
    ap.add_argument("--threads", type=int, default=1, help="> 1: wall-clock times (noisy on a shared machine)")
    ap.add_argument("--paths", default="eager,fused", help="eager: the plain model; fused: apply_fast_decode")
    opts = ap.parse_args()
    global CLOCK
    torch.set_num_threads(opts.threads)
    if opts.threads > 1:
        CLOCK = time.perf_counter
    from herd.model.zoo import smollm2_path

    fp32 = load_model(opts.hf).eval()
    prompt = [1] + [(i * 7919) % 49000 + 100 for i in range(36)]  # 37 tokens
    result: dict = {"threads": opts.threads, "clock": CLOCK.__name__, "prompt_tokens": len(prompt), "decode_tokens": opts.tokens}
    for name in opts.engines.split(","):
        models = {path: herd_engine(fp32, name) for path in opts.paths.split(",")}
        if "fused" in models:
            from herd.generate.fast_decode import apply_fast_decode

            apply_fast_decode(models["fused"])  # with the weights in huge pages
        lc = None
        if not opts.no_llamacpp:
            from llamacpp_client import LlamaCppProcess

            qtype = PAIRS[name]
            path = opts.gguf_dir / f"smollm2-{qtype}.gguf"
            if not path.exists():
                opts.gguf_dir.mkdir(parents=True, exist_ok=True)
                write_gguf(fp32, path, qtype, smollm2_path())
            lc = LlamaCppProcess(path, threads=opts.threads, n_ctx=256)
        rows: dict[str, dict[str, list[float]]] = {}
        # Interleaved repetition by repetition, so a busy spell slows every engine alike.
        for rep in range(opts.reps + 1):
            for path_name, model in models.items():
                p, d = herd_cpu_per_token(model, prompt, opts.tokens if rep else 4, decode_step)
                if rep:
                    r = rows.setdefault(path_name, {"prefill": [], "decode": []})
                    r["prefill"].append(p)
                    r["decode"].append(d)
            if lc is not None:
                reply = lc._call("run", prompt=prompt, n=opts.tokens + 1)
                c = reply["cpu_stamps"] if opts.threads == 1 else reply["stamps"]
                if rep:
                    r = rows.setdefault("llamacpp", {"prefill": [], "decode": []})
                    r["prefill"].append(c[0] / len(prompt))
                    r["decode"].append((c[-1] - c[0]) / opts.tokens)
        if lc is not None:
            lc.close()
        out = {}
        for path_name, r in rows.items():
            out[path_name] = {"prefill_ms_per_tok": round(1e3 * statistics.median(r["prefill"]), 3),
                              "decode_ms_per_tok": round(1e3 * statistics.median(r["decode"]), 3)}
            if "llamacpp" in rows and path_name != "llamacpp":
                # herd's speed relative to llama.cpp's (> 1: herd faster), per repetition, median
                for k in ("prefill", "decode"):
                    ratios = [b / a for a, b in zip(r[k], rows["llamacpp"][k])]
                    out[path_name][f"{k}_speed_vs_llamacpp"] = round(statistics.median(ratios), 3)
        for path_name, model in models.items():
            out[path_name].update(profile_decode(model, prompt, 16, decode_step))
            floor = gemv_floor_ms(model)
            out[path_name]["gemv_floor_ms"] = round(floor, 3)
            out[path_name]["non_gemv_share"] = round(1 - floor / out[path_name]["decode_ms_per_tok"], 3)
        result[name] = out
        print(name, json.dumps(out), flush=True)
        del models
    print(json.dumps(result))


if __name__ == "__main__":
    main()
