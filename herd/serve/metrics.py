"""The server's `/metrics` in the Prometheus text format: the engine's counters and gauges, and
latency histograms (time to first token, inter-token latency, end-to-end request time).

The histograms are `prometheus_client` objects on a registry of their own per app (not the
process-wide default), so two servers in one process (tests, benchmarks) never share or clash.
They are fed by the engine through `Engine.add_latency_observer`, at the same points where the
engine adds to its `*_sum` / `*_count` counters; the TTFT and request histograms keep the names
of the summaries they replace, so `herd_time_to_first_token_seconds_sum` / `_count` and
`herd_request_seconds_sum` / `_count` read as before and gain `_bucket` series.

Bucket edges (seconds) span a fast GPU's few milliseconds to a loaded CPU's minutes; percentiles
come from them with PromQL's `histogram_quantile`.
"""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from herd.serve.requests import EngineMetrics

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
INTER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
REQUEST_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)


class LatencyHistograms:
    """A `LatencyObserver` that records into Prometheus histograms."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.ttft = Histogram("herd_time_to_first_token_seconds", "Submission to the first token of any choice.",
                              buckets=TTFT_BUCKETS, registry=self.registry)
        self.itl = Histogram("herd_inter_token_latency_seconds", "Gap between two tokens of one choice.",
                             buckets=INTER_TOKEN_BUCKETS, registry=self.registry)
        self.e2e = Histogram("herd_request_seconds", "Submission to the end of the last choice (end to end).",
                             buckets=REQUEST_BUCKETS, registry=self.registry)

    def time_to_first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def inter_token(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def request(self, seconds: float) -> None:
        self.e2e.observe(seconds)

    def text(self) -> str:
        return generate_latest(self.registry).decode("utf-8")


def prometheus_text(m: EngineMetrics, latency: LatencyHistograms, responses: Mapping[int, int],
                    disconnects: Mapping[str, int]) -> str:
    """Everything `/metrics` shows: counters and gauges written here, then the histograms."""
    lines: list[str] = []

    def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP herd_{name} {help_text}")
        lines.append(f"# TYPE herd_{name} {kind}")
        for labels, value in samples:
            lines.append(f"herd_{name}{labels} {value}")

    metric("requests_submitted_total", "counter", "Requests accepted into the queue.", [("", m.requests_submitted_total)])
    metric("requests_rejected_total", "counter", "Requests refused because the queue was full (HTTP 503).",
           [("", m.requests_rejected_total)])
    metric("choices_finished_total", "counter", "Finished choices by finish reason.",
           [(f'{{reason="{r}"}}', v) for r, v in sorted(m.requests_finished_total.items())])
    metric("prompt_tokens_total", "counter", "Prompt tokens prefilled.", [("", m.prompt_tokens_total)])
    metric("generation_tokens_total", "counter", "Tokens generated.", [("", m.generation_tokens_total)])
    metric("prefills_total", "counter", "Prefill forwards.", [("", m.prefills_total)])
    metric("decode_steps_total", "counter", "Batched decode forwards.", [("", m.decode_steps_total)])
    metric("decode_rows_total", "counter", "Busy rows summed over decode steps (divide by steps: mean batch).",
           [("", m.decode_rows_total)])
    metric("prefill_seconds_total", "counter", "Time spent prefilling.", [("", float(m.prefill_seconds))])
    metric("decode_seconds_total", "counter", "Time spent in decode steps.", [("", float(m.decode_seconds))])
    metric("requests_running", "gauge", "Requests holding slots.", [("", m.requests_running)])
    metric("requests_waiting", "gauge", "Requests queued for slots.", [("", m.requests_waiting)])
    metric("slots_busy", "gauge", "Batch slots in use.", [("", m.slots_busy)])
    metric("slots_total", "gauge", "Batch slots (max_batch).", [("", m.slots_total)])
    metric("kv_cache_usage_ratio", "gauge", "Cache positions held by running sequences / capacity.",
           [("", float(m.kv_cache_tokens / m.kv_cache_capacity))])
    metric("prefill_tokens_total", "counter", "Prompt tokens run through the model (the rest hit the prefix cache).",
           [("", m.prefill_tokens_total)])
    metric("prefix_cache_queries_total", "counter", "Prompt tokens looked up in the prefix cache.",
           [("", m.prefix_cache_queries_total)])
    metric("prefix_cache_hits_total", "counter", "Prompt tokens found in the prefix cache.", [("", m.prefix_cache_hits_total)])
    metric("prefix_cache_hit_rate", "gauge", "Prefix cache hits / queries since start-up (tokens).",
           [("", m.prefix_cache_hits_total / max(m.prefix_cache_queries_total, 1))])
    metric("prefix_cache_evictions_total", "counter", "Cached KV blocks reused for other contents.",
           [("", m.prefix_cache_evictions_total)])
    metric("preemptions_total", "counter", "Sequences paused because no KV block was free.", [("", m.preemptions_total)])
    metric("kv_blocks_free", "gauge", "KV blocks a new sequence could get (empty, or cached and unreferenced).",
           [("", m.kv_blocks_free)])
    metric("kv_blocks_total", "gauge", f"KV blocks in the pool ({m.kv_block_size} tokens each).", [("", m.kv_blocks_total)])
    metric("spec_draft_tokens_total", "counter", "Speculative decoding: tokens the draft model proposed.",
           [("", m.spec_draft_tokens_total)])
    metric("spec_accepted_tokens_total", "counter", "Speculative decoding: draft tokens the model accepted.",
           [("", m.spec_accepted_tokens_total)])
    metric("http_responses_total", "counter", "HTTP responses by status code.",
           [(f'{{code="{code}"}}', v) for code, v in sorted(responses.items())])
    metric("client_disconnects_total", "counter", "Clients that went away before their answer was complete.",
           [(f'{{when="{when}"}}', v) for when, v in sorted(disconnects.items())])
    return "\n".join(lines) + "\n" + latency.text()
