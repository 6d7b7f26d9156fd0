"""Serving: a continuous-batching engine over `herd.generate` and an OpenAI-compatible HTTP server.

`engine` (the scheduler) and `requests` (its request, event and result types) need only torch;
`server`, `jobs` and `metrics` need the `serve` extra (starlette, uvicorn, prometheus-client) and
are imported where used.
"""

from herd.serve.engine import Engine
from herd.serve.requests import (
    Choice,
    EngineMetrics,
    FinishEvent,
    QueueFull,
    Request,
    RequestHandle,
    RequestResult,
    TokenEvent,
)

__all__ = [
    "Choice",
    "Engine",
    "EngineMetrics",
    "FinishEvent",
    "QueueFull",
    "Request",
    "RequestHandle",
    "RequestResult",
    "TokenEvent",
]
