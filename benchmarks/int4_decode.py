"""herd int4 decode against llama.cpp Q4_0 on SmolLM2-135M-Instruct, interleaved in one run.

The quick check behind issue 13's int4 target: `benchmarks/real_model.py` measures every engine
and perplexity (minutes); this measures only decode tok/s of herd int4 (exact and int8
activations, optionally int8 a8 as a control) and llama.cpp Q4_0 (its own process), engines
interleaved repetition by repetition, and prints medians and the ratios. It reuses the files
real_model.py writes into --work-dir (run that once first). Engines "int4_rows" / "int4_a8_rows"
keep the row layout (no repack into tiles), for before/after figures in the same run.

    python benchmarks/int4_decode.py --reps 5
    python benchmarks/int4_decode.py --engines int4_a8,q4_0 --new-tokens 128
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from llamacpp_client import LlamaCppProcess  # noqa: E402

from herd.generate import SamplingParams, generate_tokens  # noqa: E402
from herd.generate.fast_decode import apply_fast_decode  # noqa: E402
from herd.generate.loading import load_for_inference  # noqa: E402
from herd.quant import QuantConfig, apply_cpu_kernels, quantize  # noqa: E402
from herd.tokenizer import Message  # noqa: E402

# name -> (scheme, activations); a "_rows" suffix skips the int4 repack (the row layout, as before it).
HERD = {"int4": ("int4", "float"), "int4_a8": ("int4", "int8"), "int8_a8": ("int8", "int8")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--engines", default="int4,int4_a8,q4_0")
    ap.add_argument("--work-dir", default="runs/bench-real-model")
    opts = ap.parse_args()
    torch.set_num_threads(opts.threads)
    work = Path(opts.work_dir)
    hf_dir, gguf = work / "smollm2-fp32-hf", work / "smollm2-Q4_0.gguf"
    if not hf_dir.is_dir() or not gguf.is_file():
        raise SystemExit(f"{work} lacks the converted model: run benchmarks/real_model.py once first")
    loaded = load_for_inference(hf_dir, cpu_kernels=False)
    prompt = loaded.chat.encode_dialog_prompt([Message(role="user", content="What is the capital of France?")]).tokens
    greedy = SamplingParams(temperature=0.0)
    runs, workers = {}, []
    for name in opts.engines.split(","):
        if name == "q4_0":
            w = LlamaCppProcess(gguf, threads=opts.threads, n_ctx=256)
            workers.append(w)
            runs[name] = lambda n, w=w: w.run(prompt, n)
            continue
        scheme, act = HERD[name.removesuffix("_rows")]
        model = load_for_inference(hf_dir, cpu_kernels=False).model
        quantize(model, QuantConfig(scheme, activations=act))
        if not name.endswith("_rows"):
            apply_cpu_kernels(model)
        apply_fast_decode(model)

        def run(n, model=model):
            t0 = time.perf_counter()
            return t0, [time.perf_counter() for _ in generate_tokens(model, [prompt], max_new_tokens=n, sampling=greedy)]

        runs[name] = run
    n = 1 + opts.new_tokens
    decode: dict[str, list[float]] = {k: [] for k in runs}
    try:
        for r in runs.values():
            r(4)
        for _ in range(opts.reps):
            for name, r in runs.items():
                _, stamps = r(n)
                decode[name].append(opts.new_tokens / (stamps[-1] - stamps[0]))
                gc.collect()
    finally:
        for w in workers:
            w.close()
    med = {k: statistics.median(v) for k, v in decode.items()}
    for k, v in decode.items():
        print(f"{k:10} median {med[k]:7.1f} tok/s   reps {', '.join(f'{x:.1f}' for x in v)}")
    out = {f"decode_{k}_tok_s": round(v, 1) for k, v in med.items()}
    if "q4_0" in med:
        for k, v in med.items():
            if k != "q4_0":
                out[f"{k}_over_q4_0"] = round(v / med["q4_0"], 3)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
