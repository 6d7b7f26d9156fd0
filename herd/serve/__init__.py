"""Serving: a continuous-batching engine over `herd.generate` and an OpenAI-compatible HTTP server.

`engine` needs only torch; `server` needs the `serve` extra (starlette, uvicorn) and is imported
where used.
"""

from herd.serve.engine import (
    Choice,
    Engine,
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
