"""Serving throughput and latency of `herd serve` for 1, 4 and 16 concurrent clients on loopback.

A small random model (real Llama 3 vocabulary, so the real tokenizer applies) is saved to a
temporary directory and served by `python -m herd serve` in a subprocess, exactly as a user
would start it; the clients run in this process, one thread and one keep-alive connection each,
and send streamed chat-free completions back to back. What is measured:

* throughput: completion tokens (from each response's `usage`) / wall time of the whole phase
* latency: per request, from sending to the last byte; time to first token: to the first text chunk
* p50 / p99 over the phase's requests (with a few dozen requests p99 is close to the maximum)
* every phase runs `--rounds` times, in alternating order, and the summary takes the median

The target (issue 6): 16 clients get at least 4x the aggregate throughput of 1, which is what
continuous batching buys: one decode step reads the weights once for every running request.

    python benchmarks/serve.py                     # dim 512, 4 layers (~78 M params), 48 tokens per request
    python benchmarks/serve.py --max-tokens 16 --rounds 1   # quicker smoke run

The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

import herd
from herd.model import ModelArgs, build_model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def one_request(client: httpx.Client, url: str, prompt: str, max_tokens: int) -> tuple[float, float, int]:
    """(latency s, time to first token s, completion tokens) of one streamed completion."""
    body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first, tokens = None, 0
    with client.stream("POST", url + "/v1/completions", json=body) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif first is None and chunk["choices"] and chunk["choices"][0]["text"]:
                first = time.perf_counter() - t0
    latency = time.perf_counter() - t0
    return latency, first if first is not None else latency, tokens


def phase(url: str, clients: int, requests_per_client: int, max_tokens: int) -> dict:
    results: list[tuple[float, float, int]] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def client_loop(c: int) -> None:
        try:
            with httpx.Client(timeout=600) as client:
                for r in range(requests_per_client):
                    # Distinct prompts: no two requests share a cache row's contents.
                    prompt = f"Client {c} request {r}: the llama walked across the high plateau and"
                    out = one_request(client, url, prompt, max_tokens)
                    with lock:
                        results.append(out)
        except BaseException as e:  # reported below, after the other threads have finished
            errors.append(e)

    threads = [threading.Thread(target=client_loop, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} client(s) failed: {errors[0]!r}")
    latencies = [r[0] for r in results]
    ttfts = [r[1] for r in results]
    tokens = sum(r[2] for r in results)
    return {"clients": clients, "requests": len(results), "completion_tokens": tokens, "seconds": round(wall, 3),
            "tokens_per_s": round(tokens / wall, 2),
            "latency_p50_s": round(percentile(latencies, 0.5), 3), "latency_p99_s": round(percentile(latencies, 0.99), 3),
            "ttft_p50_s": round(percentile(ttfts, 0.5), 3), "ttft_p99_s": round(percentile(ttfts, 0.99), 3),
            "latency_mean_s": round(statistics.fmean(latencies), 3)}


def measured_phase(url: str, clients: int, requests_per_client: int, max_tokens: int) -> dict:
    """`phase`, plus the server's own view from /metrics: mean batch and time per decode step."""
    before = scrape(url)
    row = phase(url, clients, requests_per_client, max_tokens)
    after = scrape(url)
    steps = max(after["herd_decode_steps_total"] - before["herd_decode_steps_total"], 1)
    row["mean_batch"] = round((after["herd_decode_rows_total"] - before["herd_decode_rows_total"]) / steps, 2)
    row["decode_step_ms"] = round(1000 * (after["herd_decode_seconds_total"] - before["herd_decode_seconds_total"])
                                  / steps, 2)
    return row


def scrape(url: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, value = line.split()
            out[name] = float(value)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=48, help="new tokens per request")
    p.add_argument("--requests", type=int, default=8, help="requests per client: this / clients, at least 2")
    p.add_argument("--rounds", type=int, default=2,
                   help="repeat the phases, in alternating order, so that load from other processes hits all alike")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--device", default="cpu", help="the server's torch device")
    p.add_argument("--compile", action="store_true", help="serve with the torch.compile'd decode step")
    p.add_argument("--tokenizer", help="tiktoken rank file (default: the Llama 3 tokenizer herd finds)")
    p.add_argument("--server-cpus", help="pin the server to these CPUs with taskset, e.g. 0,1 (clients stay free)")
    p.add_argument("--server-threads", type=int,
                   help="torch threads of the server (OMP_NUM_THREADS); on an oversubscribed machine 1 avoids "
                        "OpenMP barrier stalls in every batched matmul")
    args = p.parse_args()

    margs = ModelArgs(dim=args.dim, n_layers=args.layers, n_heads=8, n_kv_heads=2, vocab_size=128256,
                      multiple_of=256, max_seq_len=1024, tie_embeddings=True)
    model = build_model(margs, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "bench"
        herd.save_model(model, ckpt, format="hf")
        del model
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "herd", "serve", str(ckpt), "--port", str(port), "--max-batch",
               str(args.max_batch), "--max-queue", "256", "--model-name", "bench", "--device", args.device]
        cmd += ["--compile"] * args.compile + (["--tokenizer", args.tokenizer] if args.tokenizer else [])
        if args.server_cpus:
            cmd = ["taskset", "-c", args.server_cpus, *cmd]
        log = open(Path(tmp) / "server.log", "w")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if args.server_threads:
            env["OMP_NUM_THREADS"] = str(args.server_threads)
        server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.monotonic() + 300
            while True:
                try:
                    if httpx.get(url + "/health", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the server did not come up:\n" + (Path(tmp) / "server.log").read_text())
                time.sleep(0.2)
            with httpx.Client(timeout=600) as warm:  # first-call costs (allocator, kernels) out of the figures
                one_request(warm, url, "warm up", 4)
            rows = []
            for r in range(args.rounds):
                for clients in args.clients if r % 2 == 0 else args.clients[::-1]:
                    row = measured_phase(url, clients, max(2, args.requests // clients), args.max_tokens)
                    rows.append({"round": r, **row})
                    print(f"round {r} {clients:>3} clients: {row['tokens_per_s']:8.1f} tok/s   latency p50"
                          f" {row['latency_p50_s']:.2f} s p99 {row['latency_p99_s']:.2f} s   ttft p50 {row['ttft_p50_s']:.2f} s"
                          f"   mean batch {row['mean_batch']:.1f}   step {row['decode_step_ms']:.1f} ms", flush=True)
        finally:
            server.terminate()
            server.wait(30)
            log.close()

    tps = {c: statistics.median(r["tokens_per_s"] for r in rows if r["clients"] == c) for c in args.clients}
    summary = {"model": f"random-dim{args.dim}-{args.layers}L-vocab128256-fp32", "params": margs.num_params(),
               "device": args.device, "compile": args.compile, "server_cpus": args.server_cpus or f"all {os.cpu_count()}",
               "server_threads": args.server_threads or "default",
               "max_batch": args.max_batch, "max_tokens": args.max_tokens,
               "median_tokens_per_s": {str(c): round(v, 2) for c, v in tps.items()}, "results": rows}
    if 1 in tps and 16 in tps:
        summary["speedup_16_over_1"] = round(tps[16] / tps[1], 2)
        summary["target_4x_met"] = summary["speedup_16_over_1"] >= 4
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
