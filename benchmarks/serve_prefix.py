"""Prefix caching on a multi-turn chat workload: time to first token with and without it, one run.

The workload is what a chat server sees: `--conversations` users talk at once, each for
`--turns` turns, and every turn's prompt is the chat template over one long shared system
prompt plus the whole conversation so far (the replies re-rendered as text, as a client sends
them back). Without prefix caching every turn prefills all of that again; with it, the system
prompt and the earlier turns come from cached KV blocks and only the new tail is prefilled.
The engine runs in this process on its own thread (the same `Engine` `herd serve` drives),
with the model loaded as `herd serve` loads it (CPU kernels on).

    python benchmarks/serve_prefix.py                  # SmolLM2-135M-Instruct, 4 conversations x 4 turns
    python benchmarks/serve_prefix.py --turns 2 --max-tokens 8   # a quick smoke run

Per mode: time to first token p50 / p99 over all turns, completion tokens per second over the
phase, prompt tokens and the tokens actually prefilled. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

import torch

from herd.generate.loading import load_for_inference
from herd.serve import Engine, Request
from herd.tokenizer import Message

SYSTEM = ("You are the help desk assistant of the Andean Textile Cooperative. Rule {i}: answer politely, "
          "cite the cooperative's policy number {i} when it applies, never invent prices, and keep each answer "
          "short unless the customer asks for detail about wool grades, dyeing or shipping. ")
QUESTIONS = ["What is alpaca wool?", "How do you dye it?", "How long does shipping take?", "Can I return a scarf?",
             "What is the difference between llama and alpaca fibre?", "Do you sell yarn by weight?"]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run_mode(lm, args, prefix_caching: bool) -> dict:
    engine = Engine(lm.model, max_batch=args.conversations, max_queue=64, max_seq_len=args.context,
                    prefill_budget=args.prefill_chunk, block_size=args.block_size, prefix_caching=prefix_caching)
    engine.start()
    system = "".join(SYSTEM.format(i=i) for i in range(1, args.system_rules + 1))
    ttfts: list[float] = []
    tokens = [0]
    lock = threading.Lock()
    errors: list[BaseException] = []

    def conversation(c: int) -> None:
        try:
            messages = [Message(role="system", content=system)]
            for t in range(args.turns):
                messages.append(Message(role="user", content=f"(user {c}) {QUESTIONS[(c + t) % len(QUESTIONS)]}"))
                prompt = lm.chat.encode_dialog_prompt(messages).tokens
                result = engine.submit(Request(prompt, args.max_tokens, stop_tokens=lm.stop_tokens)).result(600)
                reply = result.choices[0].tokens
                with lock:
                    ttfts.append(result.time_to_first_token)
                    tokens[0] += len(reply)
                messages.append(Message(role="assistant", content=lm.tokenizer.decode(reply)))
        except BaseException as e:  # reported after the other threads finish
            errors.append(e)

    try:
        engine.submit(Request(lm.encode_text("warm up"), 2)).result(600)  # first-call costs out of the figures
        before = engine.metrics()
        threads = [threading.Thread(target=conversation, args=(c,)) for c in range(args.conversations)]
        t0 = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        wall = time.perf_counter() - t0
        m = engine.metrics()
    finally:
        engine.stop()
    if errors:
        raise RuntimeError(f"{len(errors)} conversation(s) failed: {errors[0]!r}")
    queries = m.prefix_cache_queries_total - before.prefix_cache_queries_total
    return {"prefix_caching": prefix_caching, "requests": len(ttfts), "seconds": round(wall, 2),
            "ttft_p50_s": round(percentile(ttfts, 0.5), 3), "ttft_p99_s": round(percentile(ttfts, 0.99), 3),
            "ttft_mean_s": round(statistics.fmean(ttfts), 3), "completion_tokens": tokens[0],
            "tokens_per_s": round(tokens[0] / wall, 2),
            "prompt_tokens": m.prompt_tokens_total - before.prompt_tokens_total,
            "prefilled_tokens": m.prefill_tokens_total - before.prefill_tokens_total,
            "hit_rate": round((m.prefix_cache_hits_total - before.prefix_cache_hits_total) / queries, 3) if queries else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="checkpoint (default: SmolLM2-135M-Instruct from herd's model cache)")
    p.add_argument("--conversations", type=int, default=4, help="concurrent conversations (= engine slots)")
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=24, help="new tokens per reply at most")
    p.add_argument("--system-rules", type=int, default=12, help="rules in the shared system prompt (~45 tokens each)")
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--prefill-chunk", type=int, default=512)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model is None:
        from herd.model.zoo import smollm2_path

        args.model = smollm2_path()
    lm = load_for_inference(args.model)
    rows = [run_mode(lm, args, prefix_caching=False), run_mode(lm, args, prefix_caching=True)]
    for r in rows:
        print(f"prefix caching {'on ' if r['prefix_caching'] else 'off'}: ttft p50 {r['ttft_p50_s']:.3f} s p99 "
              f"{r['ttft_p99_s']:.3f} s, {r['tokens_per_s']:.1f} tok/s, prefilled {r['prefilled_tokens']} of "
              f"{r['prompt_tokens']} prompt tokens", flush=True)
    off, on = rows
    summary = {"model": str(args.model).rsplit("/", 1)[-1], "threads": torch.get_num_threads(),
               "conversations": args.conversations, "turns": args.turns, "max_tokens": args.max_tokens,
               "block_size": args.block_size, "prefill_chunk": args.prefill_chunk,
               "ttft_p50_speedup": round(off["ttft_p50_s"] / on["ttft_p50_s"], 2),
               "ttft_p99_speedup": round(off["ttft_p99_s"] / on["ttft_p99_s"], 2),
               "throughput_ratio": round(on["tokens_per_s"] / off["tokens_per_s"], 2), "results": rows}
    summary["target_5x_met"] = summary["ttft_p50_speedup"] >= 5
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
