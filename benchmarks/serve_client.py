"""Streaming OpenAI-API clients for serving benchmarks, and the statistics over what they saw.

Kept apart from the benchmark so its arithmetic is unit-tested (tests/unit/test_serve_bench_client.py)
with recorded timestamps and a tiny fake server, not trusted on sight. Definitions, as in vLLM's
`benchmark_serving`:

* throughput: completion tokens (the server's `usage`, not the number of chunks: a chunk may
  carry several tokens, or none while a stop string is pending) / wall time of the whole phase;
* TTFT: from sending a request to the first chunk with text;
* inter-token latency (ITL): the gaps between consecutive chunks with text, pooled over requests;
* TPOT: per request, (last text chunk - first text chunk) / (completion tokens - 1), which stays
  right when chunks bundle tokens.

Percentiles interpolate linearly between order statistics (numpy's default), so p50 of an even
count is the mean of the middle two.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import httpx


def percentile(values: Sequence[float], q: float) -> float:
    """The q-quantile (0 <= q <= 1) with linear interpolation; NaN for no values."""
    if not 0 <= q <= 1:
        raise ValueError(f"q must be in [0, 1], got {q}")
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass
class RequestRecord:
    """One streamed request: perf_counter times of sending and of every chunk that carried text."""

    sent: float
    chunks: list[float] = field(default_factory=list)
    done: float = math.nan
    prompt_tokens: int = 0
    completion_tokens: int = 0
    text: str = ""

    @property
    def ttft(self) -> float:
        return self.chunks[0] - self.sent if self.chunks else math.nan

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.chunks, self.chunks[1:])]

    @property
    def tpot(self) -> float:
        if len(self.chunks) < 2 or self.completion_tokens < 2:
            return math.nan
        return (self.chunks[-1] - self.chunks[0]) / (self.completion_tokens - 1)


@dataclass
class PhaseStats:
    clients: int
    requests: int
    completion_tokens: int
    prompt_tokens_mean: float
    seconds: float
    tokens_per_s: float
    ttft_p50_s: float
    ttft_p95_s: float
    ttft_p99_s: float
    itl_p50_s: float
    tpot_p50_s: float


def summarize(records: Sequence[RequestRecord], *, clients: int, wall_s: float) -> PhaseStats:
    if not records:
        raise ValueError("no requests finished in this phase")
    if wall_s <= 0:
        raise ValueError(f"wall time must be > 0, got {wall_s}")
    tokens = sum(r.completion_tokens for r in records)
    tpots = [r.tpot for r in records if not math.isnan(r.tpot)]
    return PhaseStats(
        clients=clients, requests=len(records), completion_tokens=tokens,
        prompt_tokens_mean=sum(r.prompt_tokens for r in records) / len(records), seconds=wall_s,
        tokens_per_s=tokens / wall_s,
        ttft_p50_s=percentile([r.ttft for r in records], 0.5), ttft_p95_s=percentile([r.ttft for r in records], 0.95),
        ttft_p99_s=percentile([r.ttft for r in records], 0.99),
        itl_p50_s=percentile([g for r in records for g in r.itls], 0.5), tpot_p50_s=percentile(tpots, 0.5))


async def stream_chat(client: httpx.AsyncClient, url: str, body: dict) -> RequestRecord:
    """POST a streamed chat completion to url + /v1/chat/completions and time its chunks.

    The server must report `usage` in the stream (`stream_options.include_usage`, set here):
    counting chunks instead would miscount whenever a chunk carries several tokens or none.
    """
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    rec = RequestRecord(sent=time.perf_counter())
    usage = None
    parts: list[str] = []
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as resp:
        if resp.status_code != 200:
            detail = (await resp.aread()).decode(errors="replace")[:500]
            raise RuntimeError(f"{url} answered {resp.status_code}: {detail}")
        async for line in resp.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            now = time.perf_counter()
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices") or ():
                text = (choice.get("delta") or {}).get("content")
                if text:
                    rec.chunks.append(now)
                    parts.append(text)
    rec.done = time.perf_counter()
    if usage is None:
        raise RuntimeError(f"{url} sent no usage in its stream; it must support stream_options.include_usage")
    rec.prompt_tokens, rec.completion_tokens = int(usage["prompt_tokens"]), int(usage["completion_tokens"])
    rec.text = "".join(parts)
    return rec


async def run_clients(clients: int, client_loop: Callable[[int, httpx.AsyncClient], Awaitable[list[RequestRecord]]],
                      *, timeout_s: float = 900.0) -> tuple[list[RequestRecord], float]:
    """Run `clients` concurrent loops, each on its own keep-alive connection; (their records, wall s)."""
    async def one(c: int) -> list[RequestRecord]:
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:
            return await client_loop(c, client)

    t0 = time.perf_counter()
    per_client = await asyncio.gather(*(one(c) for c in range(clients)))
    wall = time.perf_counter() - t0
    return [r for recs in per_client for r in recs], wall
