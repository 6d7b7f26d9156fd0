"""The serving benchmark's client and statistics (benchmarks/serve_client.py): percentiles against
numpy, the per-request and per-phase arithmetic against values worked out by hand from recorded
timestamps, and the SSE parsing against a fake streaming server (httpx.MockTransport)."""

import asyncio
import importlib.util
import json
import math
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

_path = Path(__file__).resolve().parents[2] / "benchmarks" / "serve_client.py"
_spec = importlib.util.spec_from_file_location("herd_bench_serve_client", _path)
sc = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = sc  # dataclasses look their module up there
_spec.loader.exec_module(sc)


def test_percentile_matches_numpys_linear_interpolation():
    assert sc.percentile([4.0, 1.0, 3.0, 2.0], 0.5) == 2.5  # the middle two's mean
    assert sc.percentile([4.0, 1.0, 3.0, 2.0], 0.25) == 1.75
    assert sc.percentile([7.0], 0.95) == 7.0
    assert math.isnan(sc.percentile([], 0.5))
    rng = np.random.default_rng(0)
    for n in (2, 5, 16, 101):
        xs = rng.exponential(size=n).tolist()
        for q in (0, 0.5, 0.95, 1):
            assert sc.percentile(xs, q) == pytest.approx(float(np.percentile(xs, 100 * q)), abs=1e-12)
    with pytest.raises(ValueError, match="q must be"):
        sc.percentile([1.0], 95)


def _records():
    a = sc.RequestRecord(sent=0.0, chunks=[0.5, 0.6, 0.8, 1.1], prompt_tokens=10, completion_tokens=4)
    b = sc.RequestRecord(sent=1.0, chunks=[1.2, 1.6], prompt_tokens=20, completion_tokens=3)  # a chunk of 2 tokens
    c = sc.RequestRecord(sent=2.0, chunks=[3.0, 3.1, 3.2, 3.3], prompt_tokens=30, completion_tokens=4)
    return a, b, c


def test_request_figures_by_hand():
    a, b, c = _records()
    assert (a.ttft, b.ttft, c.ttft) == pytest.approx((0.5, 0.2, 1.0))
    assert a.itls == pytest.approx([0.1, 0.2, 0.3]) and b.itls == pytest.approx([0.4])
    # TPOT divides by the tokens, not the chunks: b's 0.4 s covers 2 token gaps.
    assert (a.tpot, b.tpot, c.tpot) == pytest.approx((0.2, 0.2, 0.1))
    assert math.isnan(sc.RequestRecord(sent=0.0, chunks=[1.0], completion_tokens=1).tpot)


def test_phase_summary_by_hand():
    s = sc.summarize(_records(), clients=3, wall_s=4.0)
    assert (s.requests, s.completion_tokens, s.prompt_tokens_mean) == (3, 11, 20.0)
    assert s.tokens_per_s == pytest.approx(11 / 4.0)
    assert s.ttft_p50_s == pytest.approx(0.5)  # TTFTs 0.2, 0.5, 1.0
    assert s.ttft_p95_s == pytest.approx(0.5 + 0.9 * 0.5)  # position 1.9 between 0.5 and 1.0
    assert s.ttft_p99_s == pytest.approx(0.5 + 0.98 * 0.5)  # position 1.98
    assert s.itl_p50_s == pytest.approx(0.1)  # pooled gaps 0.1 x4, 0.2, 0.3, 0.4
    assert s.tpot_p50_s == pytest.approx(0.2)
    with pytest.raises(ValueError, match="no requests"):
        sc.summarize([], clients=1, wall_s=1.0)


def _sse(events):
    return "".join(f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n" for e in events).encode()


def _fake_server(events, status=200):
    seen = []

    def handler(request):
        seen.append(json.loads(request.content))
        if status != 200:
            return httpx.Response(status, json={"error": {"message": "bad max_tokens"}})
        return httpx.Response(200, content=_sse(events), headers={"content-type": "text/event-stream"})

    return httpx.MockTransport(handler), seen


def _stream(transport, body):
    async def go():
        async with httpx.AsyncClient(transport=transport) as client:
            return await sc.stream_chat(client, "http://fake", body)

    return asyncio.run(go())


def test_stream_chat_reads_text_chunks_and_usage_from_a_fake_server():
    delta = lambda text: {"choices": [{"index": 0, "delta": {"content": text}}]}  # noqa: E731
    events = [{"choices": [{"index": 0, "delta": {"role": "assistant"}}]}, delta("Hel"), delta(""), delta("lo"),
              {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3}}, "[DONE]"]
    transport, seen = _fake_server(events)
    rec = _stream(transport, {"messages": [], "max_tokens": 3})
    assert rec.text == "Hello" and len(rec.chunks) == 2  # the role chunk and the empty one carry no text
    assert (rec.prompt_tokens, rec.completion_tokens) == (7, 3)
    assert rec.sent <= rec.chunks[0] <= rec.chunks[1] <= rec.done
    assert seen[0]["stream"] is True and seen[0]["stream_options"] == {"include_usage": True}


def test_stream_chat_errors_name_the_problem():
    transport, _ = _fake_server([{"choices": [{"index": 0, "delta": {"content": "x"}}]}, "[DONE]"])
    with pytest.raises(RuntimeError, match="no usage"):
        _stream(transport, {})
    transport, _ = _fake_server([], status=400)
    with pytest.raises(RuntimeError, match="400.*bad max_tokens"):
        _stream(transport, {})


def test_run_clients_runs_every_loop_concurrently_and_pools_their_records():
    started = []

    async def loop(c, client):
        started.append(c)
        await asyncio.sleep(0)  # every loop starts before any finishes: they run concurrently
        assert len(started) == 3
        return [sc.RequestRecord(sent=float(c))] * (c + 1)

    records, wall = asyncio.run(sc.run_clients(3, loop))
    assert sorted(r.sent for r in records) == [0.0, 1.0, 1.0, 2.0, 2.0, 2.0] and wall >= 0
