"""llama.cpp in a process of its own, driven over stdin/stdout: the way its users run it.

The benchmarks compare herd with llama.cpp (through llama-cpp-python) in one run, interleaving
the engines repetition by repetition because these machines are noisy. Loading llama.cpp into
the torch process made its prefill 12-15% slower (two OpenMP runtimes and two thread pools
competing, torch's allocator and page cache state), so it runs here instead: this script
imports llama_cpp and numpy only, never torch. Every time it reports is measured inside this
process, so the pipe adds nothing to a figure.

Protocol: one JSON object per line each way. Start-up prints {"ready": true, ...}. Commands:

  {"cmd": "run", "prompt": [ids], "n": N}
      greedy: prefill the prompt, then N-1 one-token decode steps. Returns "prefill_s" (start
      to the first token's logits), "stamps" (seconds since start, one per token) and
      "cpu_stamps" (the same in this process's CPU time: with threads=1 a measure that other
      load on a shared machine barely moves).
  {"cmd": "logits", "prompt": [ids], "continuation": [ids], "out": "file.npy"}
      saves (len(prompt) + len(continuation), V) float32 logits: the prompt's rows from one
      prefill, the continuation's from one-token decode steps (the decode path).
  {"cmd": "nll", "windows": [[ids, first_scored], ...]}
      teacher-forced negative log-likelihood, summed in float64 over each window's tokens from
      `first_scored` on (herd.eval.perplexity's windows), and how many tokens were scored.
  {"cmd": "quit"}

    python benchmarks/llamacpp_worker.py --model file.gguf --threads 2 --n-ctx 512
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np


def _log_softmax_rows(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


class Worker:
    def __init__(self, model: str, threads: int, n_ctx: int, n_batch: int):
        from llama_cpp import Llama

        self.llm = Llama(model_path=model, n_ctx=n_ctx, n_batch=n_batch, n_threads=threads,
                         n_threads_batch=threads, logits_all=True, verbose=False)

    def run(self, prompt: list[int], n: int) -> dict:
        llm = self.llm
        llm.reset()
        t0, c0 = time.perf_counter(), time.process_time()
        llm.eval(prompt)  # the prompt's last row of logits gives the first new token
        stamps, cpu = [time.perf_counter() - t0], [time.process_time() - c0]
        for _ in range(n - 1):
            tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            llm.eval([tok])
            stamps.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        return {"prefill_s": stamps[0], "stamps": stamps, "cpu_stamps": cpu}

    def logits(self, prompt: list[int], continuation: list[int], out: str) -> dict:
        llm = self.llm
        llm.reset()
        llm.eval(prompt)
        for tok in continuation:
            llm.eval([tok])
        np.save(out, np.asarray(llm.scores[: len(prompt) + len(continuation)], dtype=np.float32))
        return {"rows": len(prompt) + len(continuation)}

    def nll(self, windows: list) -> dict:
        llm = self.llm
        total, count = 0.0, 0
        for ids, first_scored in windows:
            llm.reset()
            llm.eval(ids[:-1])  # position t predicts ids[t + 1]
            logp = _log_softmax_rows(np.asarray(llm.scores[: len(ids) - 1]))
            start = max(first_scored - 1, 0)
            targets = np.asarray(ids[1:])[start:]
            total += float(-logp[np.arange(start, len(ids) - 1), targets].sum())
            count += len(targets)
        return {"nll_sum": total, "count": count}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--n-ctx", type=int, default=2048)
    ap.add_argument("--n-batch", type=int, default=512)
    opts = ap.parse_args()
    worker = Worker(opts.model, opts.threads, opts.n_ctx, opts.n_batch)
    torch_loaded = "torch" in sys.modules
    print(json.dumps({"ready": True, "torch_loaded": torch_loaded, "n_vocab": worker.llm.n_vocab()}), flush=True)
    for line in sys.stdin:
        msg = json.loads(line)
        cmd = msg.pop("cmd")
        if cmd == "quit":
            break
        reply = getattr(worker, cmd)(**msg)
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
