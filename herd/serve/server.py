"""An OpenAI-compatible HTTP server over the engine (starlette + uvicorn, the `serve` extra).

Threads: uvicorn's event loop parses requests, turns tokens into text and writes responses;
the engine's own thread runs the model. Tokens cross over through `loop.call_soon_threadsafe`
into one asyncio queue per HTTP request, so a slow client never blocks the batch (its events
wait in its queue) and the loop never waits on a forward.

Failure rules: every error is an OpenAI-style JSON body (`protocol.APIError`); an unexpected
exception in a route is logged and answered 500, never raised into uvicorn; a full engine
queue is a 503 at once; a client that disconnects (streaming or not) cancels its request,
which frees its slots at the engine's next step. The server binds 127.0.0.1 unless told
otherwise, and with an API key every /v1 route needs `Authorization: Bearer KEY` (/health and
/metrics stay open for probes, as in llama.cpp).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import socket
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from herd.serve.engine import Choice, Engine, FinishEvent, QueueFull, Request, RequestHandle, TokenEvent
from herd.serve.protocol import (
    FINISH_REASONS,
    APIError,
    CommonParams,
    TextAssembler,
    chat_logprobs,
    chat_prompt,
    check_length,
    completion_logprobs,
    completion_prompt,
    may_be_tool_call,
    new_id,
    now,
    parse_chat_request,
    parse_completion_request,
    parse_tool_calls,
    usage,
)
from herd.tokenizer import ChatFormat, ChatTemplate, Tokenizer

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 8 * 2**20


# ---- one HTTP request's engine requests -----------------------------------------------------------------


@dataclass
class _Out:
    """What the server knows of one choice: the engine's output so far and its text."""

    choice: Choice
    text: TextAssembler
    mode: str = "text"  # with tools: "undecided" -> "text" or "tool"
    held: str = ""  # text not yet sent while a tool call is possible
    lp_sent: int = 0  # tokens whose logprobs were streamed


class _Jobs:
    """The engine requests behind one HTTP request (one per prompt), with their events on one queue."""

    def __init__(self, state: _State, prompts: list[list[int]], params: CommonParams, max_tokens: list[int],
                 *, tools: bool):
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, TokenEvent | FinishEvent]] = asyncio.Queue()
        self.prompts, self.n = prompts, params.n
        self.handles: list[RequestHandle] = []
        self.outs = [
            [_Out(Choice(i, logprobs=[] if params.logprobs else None, top_logprobs=[] if params.top_logprobs else None),
                  TextAssembler(state.tokenizer, params.stop, state.special_ids), "undecided" if tools else "text")
             for i in range(params.n)]
            for _ in prompts
        ]
        try:
            for j, (prompt, limit) in enumerate(zip(prompts, max_tokens)):
                request = Request(prompt, limit, params.sampling, params.n, state.tokenizer.stop_tokens, params.stop,
                                  params.logprobs, params.top_logprobs)

                def deliver(event, j=j):
                    loop.call_soon_threadsafe(self.queue.put_nowait, (j, event))

                self.handles.append(state.engine.submit(request, on_event=deliver))
        except QueueFull as e:
            self.cancel()
            raise APIError(503, f"the server is busy ({e}); retry later", code="queue_full") from e
        except ValueError as e:
            self.cancel()
            raise APIError(400, str(e)) from e

    def cancel(self) -> None:
        for h in self.handles:
            h.cancel()

    async def events(self) -> AsyncIterator[tuple[_Out, TokenEvent | FinishEvent, int]]:
        """(choice state, event, prompt index) until every choice has finished; records each event."""
        left = len(self.prompts) * self.n
        while left:
            j, event = await self.queue.get()
            out = self.outs[j][event.index]
            c = out.choice
            if isinstance(event, TokenEvent):
                c.tokens.append(event.token)
                if c.logprobs is not None:
                    c.logprobs.append(event.logprob)
                if c.top_logprobs is not None:
                    c.top_logprobs.append(event.top_logprobs or [])
            else:
                c.finish_reason, c.stop_token, c.error = event.finish_reason, event.stop_token, event.error
                left -= 1
            yield out, event, j

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def completion_tokens(self) -> int:
        return sum(len(o.choice.tokens) for outs in self.outs for o in outs)


async def _watch_disconnect(receive: Receive, jobs: _Jobs) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            jobs.cancel()
            return


class _EventStream:
    """A server-sent-events response that cancels its engine requests when the client goes away
    (noticed while waiting for tokens, not only on the next write) or the stream ends early."""

    def __init__(self, chunks: AsyncIterator[str], jobs: _Jobs):
        self.chunks, self.jobs = chunks, jobs
        self.status_code = 200

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]})

        async def pump() -> None:
            async for chunk in self.chunks:
                await send({"type": "http.response.body", "body": chunk.encode("utf-8"), "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        pumping = asyncio.ensure_future(pump())
        watching = asyncio.ensure_future(_watch_disconnect(receive, self.jobs))
        try:
            await asyncio.wait({pumping, watching}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.jobs.cancel()  # a no-op for requests that finished
            for task in (pumping, watching):
                task.cancel()
            await asyncio.gather(pumping, watching, return_exceptions=True)
            await self.chunks.aclose()
        if pumping.done() and not pumping.cancelled() and pumping.exception() is not None:
            log.error("stream failed", exc_info=pumping.exception())


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


# ---- the application ----------------------------------------------------------------------------------------


class _State:
    def __init__(self, engine: Engine, tokenizer: Tokenizer, *, model_name: str, api_key: str | None,
                 chat: ChatFormat | ChatTemplate | str | None):
        self.engine, self.tokenizer, self.model_name, self.api_key = engine, tokenizer, model_name, api_key
        # A str is a Llama 3 ChatFormat version; None: the model declares no chat format (completions only).
        self.fmt = ChatFormat(tokenizer, version=chat) if isinstance(chat, str) else chat
        self.special_ids = frozenset(tokenizer.special_tokens.values())
        self.created = now()
        self.responses: Counter[int] = Counter()
        self.started = time.time()

    def check_auth(self, request: HTTPRequest) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise APIError(401, "invalid or missing API key; send 'Authorization: Bearer KEY'", code="invalid_api_key")

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"the model '{model}' does not exist; this server serves '{self.model_name}'",
                           param="model", code="model_not_found")


async def _json_body(request: HTTPRequest) -> Any:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise APIError(413, f"the request body is larger than {MAX_BODY_BYTES} bytes")
    raw = bytearray()
    async for piece in request.stream():
        raw += piece
        if len(raw) > MAX_BODY_BYTES:
            raise APIError(413, f"the request body is larger than {MAX_BODY_BYTES} bytes")
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from e


def _endpoint(state: _State, fn: Callable[[HTTPRequest], Any]) -> Callable[[HTTPRequest], Any]:
    async def handle(request: HTTPRequest) -> Any:
        try:
            response = await fn(request)
        except APIError as e:
            response = JSONResponse(e.body(), status_code=e.status)
        except Exception:  # no request may take the server down; the traceback goes to the log
            log.exception("unhandled error in %s %s", request.method, request.url.path)
            response = JSONResponse(APIError(500, "internal server error").body(), status_code=500)
        state.responses[response.status_code] += 1
        return response

    return handle


def build_app(engine: Engine, tokenizer: Tokenizer, *, model_name: str, api_key: str | None = None,
              chat: ChatFormat | ChatTemplate | str | None = "3.1") -> Starlette:
    """The ASGI app. The engine must be started (or stepped) by the caller, who also stops it."""
    state = _State(engine, tokenizer, model_name=model_name, api_key=api_key, chat=chat)

    async def health(request: HTTPRequest) -> Response:
        if not engine.running:
            raise APIError(503, "the engine is not running")
        return JSONResponse({"status": "ok"})

    async def metrics(request: HTTPRequest) -> Response:
        return PlainTextResponse(_prometheus(engine, state), media_type="text/plain; version=0.0.4")

    async def models(request: HTTPRequest) -> Response:
        state.check_auth(request)
        return JSONResponse({"object": "list", "data": [
            {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "herd",
             "max_model_len": engine.max_seq_len}]})

    async def chat(request: HTTPRequest) -> Any:
        state.check_auth(request)
        req = parse_chat_request(await _json_body(request), max_n=engine.max_batch)
        state.check_model(req.params.model)
        prompt = chat_prompt(state.fmt, req)
        limit = check_length(len(prompt), req.params.max_tokens, engine.max_seq_len)
        jobs = _Jobs(state, [prompt], req.params, [limit], tools=bool(req.tools))
        if req.params.stream:
            return _EventStream(_chat_stream(state, jobs, req.params), jobs)
        return JSONResponse(await _chat_response(state, request, jobs, req.params))

    async def completions(request: HTTPRequest) -> Any:
        state.check_auth(request)
        req = parse_completion_request(await _json_body(request), max_n=engine.max_batch)
        state.check_model(req.params.model)
        prompts = [completion_prompt(tokenizer, p) for p in req.prompts]
        limits = [check_length(len(p), req.params.max_tokens, engine.max_seq_len) for p in prompts]
        jobs = _Jobs(state, prompts, req.params, limits, tools=False)
        if req.params.stream:
            return _EventStream(_completion_stream(state, jobs, req.params), jobs)
        return JSONResponse(await _completion_response(state, request, jobs, req.params))

    async def http_error(request: HTTPRequest, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        status = exc.status_code
        state.responses[status] += 1
        return JSONResponse({"error": {"message": str(exc.detail), "type": "invalid_request_error", "param": None,
                                       "code": None}}, status_code=status)

    routes = [
        Route("/health", _endpoint(state, health), methods=["GET"]),
        Route("/metrics", _endpoint(state, metrics), methods=["GET"]),
        Route("/v1/models", _endpoint(state, models), methods=["GET"]),
        Route("/v1/chat/completions", _endpoint(state, chat), methods=["POST"]),
        Route("/v1/completions", _endpoint(state, completions), methods=["POST"]),
    ]
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error})


# ---- chat ----------------------------------------------------------------------------------------------------


def _finish_reason(out: _Out) -> str:
    return FINISH_REASONS.get(out.choice.finish_reason, "stop")


def _check_failed(out: _Out) -> None:
    if out.choice.finish_reason == "error":
        raise APIError(500, f"generation failed: {out.choice.error}")
    if out.choice.finish_reason == "cancelled":
        raise APIError(503, "the request was cancelled (the server is shutting down)")


async def _collect(request: HTTPRequest, jobs: _Jobs) -> None:
    """Run every choice to its end, cancelling them if the client disconnects meanwhile."""
    watching = asyncio.ensure_future(_watch_disconnect(request.receive, jobs))
    try:
        async for out, event, _ in jobs.events():
            if isinstance(event, TokenEvent):
                out.text.feed(event.token)
            else:
                out.text.finish()
    finally:
        jobs.cancel()
        watching.cancel()
        await asyncio.gather(watching, return_exceptions=True)


async def _chat_response(state: _State, request: HTTPRequest, jobs: _Jobs, params: CommonParams) -> dict:
    await _collect(request, jobs)
    choices = []
    for out in jobs.outs[0]:
        _check_failed(out)
        message: dict[str, Any] = {"role": "assistant", "content": out.text.text}
        reason = _finish_reason(out)
        if out.mode != "text":
            calls = parse_tool_calls(state.fmt, out.choice)
            if calls:
                message, reason = {"role": "assistant", "content": None, "tool_calls": calls}, "tool_calls"
        choices.append({"index": out.choice.index, "message": message,
                        "logprobs": chat_logprobs(state.tokenizer, out.choice), "finish_reason": reason})
    return {"id": new_id("chatcmpl"), "object": "chat.completion", "created": now(), "model": state.model_name,
            "choices": choices, "usage": usage(jobs.prompt_tokens, jobs.completion_tokens)}


async def _chat_stream(state: _State, jobs: _Jobs, params: CommonParams) -> AsyncIterator[str]:
    cid, created = new_id("chatcmpl"), now()

    def chunk(choices: list[dict], **extra: Any) -> str:
        body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": state.model_name,
                "choices": choices, **extra}
        if params.include_usage:
            body.setdefault("usage", None)
        return _sse(body)

    for i in range(params.n):
        yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None}])
    async for out, event, _ in jobs.events():
        c = out.choice
        if isinstance(event, TokenEvent):
            piece = out.text.feed(event.token)
            if out.mode == "undecided":
                out.held += piece
                if may_be_tool_call(state.tokenizer, c.tokens, state.special_ids):
                    if out.held.strip() or c.tokens[0] == getattr(state.tokenizer, "python_tag_id", None):
                        out.mode = "tool"
                    continue
                out.mode, piece, out.held = "text", out.held, ""
            elif out.mode == "tool":
                out.held += piece
                continue
            if piece or c.logprobs is not None:
                lp = chat_logprobs(state.tokenizer, c, out.lp_sent)
                out.lp_sent = len(c.tokens)
                yield chunk([{"index": c.index, "delta": {"content": piece}, "logprobs": lp, "finish_reason": None}])
            continue
        # The choice finished.
        if c.finish_reason in ("error", "cancelled"):
            message = c.error or "the request was cancelled"
            yield _sse({"error": {"message": message, "type": "server_error", "param": None, "code": 500}})
            continue
        rest = out.held + out.text.finish()
        reason = _finish_reason(out)
        if out.mode != "text":
            calls = parse_tool_calls(state.fmt, c)
            if calls:
                deltas = [{"index": k, **call} for k, call in enumerate(calls)]
                yield chunk([{"index": c.index, "delta": {"tool_calls": deltas}, "logprobs": None,
                              "finish_reason": None}])
                rest, reason = "", "tool_calls"
        if rest or (c.logprobs is not None and out.lp_sent < len(c.tokens)):
            lp = chat_logprobs(state.tokenizer, c, out.lp_sent)
            out.lp_sent = len(c.tokens)
            yield chunk([{"index": c.index, "delta": {"content": rest}, "logprobs": lp, "finish_reason": None}])
        yield chunk([{"index": c.index, "delta": {}, "logprobs": None, "finish_reason": reason}])
    if params.include_usage:
        yield _sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": state.model_name,
                    "choices": [], "usage": usage(jobs.prompt_tokens, jobs.completion_tokens)})
    yield "data: [DONE]\n\n"


# ---- completions -----------------------------------------------------------------------------------------------


async def _completion_response(state: _State, request: HTTPRequest, jobs: _Jobs, params: CommonParams) -> dict:
    await _collect(request, jobs)
    choices = []
    for j, outs in enumerate(jobs.outs):
        for out in outs:
            _check_failed(out)
            choices.append({"index": j * params.n + out.choice.index, "text": out.text.text,
                            "logprobs": completion_logprobs(state.tokenizer, out.choice),
                            "finish_reason": _finish_reason(out)})
    return {"id": new_id("cmpl"), "object": "text_completion", "created": now(), "model": state.model_name,
            "choices": choices, "usage": usage(jobs.prompt_tokens, jobs.completion_tokens)}


async def _completion_stream(state: _State, jobs: _Jobs, params: CommonParams) -> AsyncIterator[str]:
    cid, created = new_id("cmpl"), now()

    def chunk(choice: dict) -> str:
        body = {"id": cid, "object": "text_completion", "created": created, "model": state.model_name,
                "choices": [choice]}
        if params.include_usage:
            body["usage"] = None
        return _sse(body)

    async for out, event, j in jobs.events():
        c = out.choice
        index = j * params.n + c.index
        if isinstance(event, TokenEvent):
            piece = out.text.feed(event.token)
            if piece or c.logprobs is not None:
                lp = completion_logprobs(state.tokenizer, c, out.lp_sent)
                out.lp_sent = len(c.tokens)
                yield chunk({"index": index, "text": piece, "logprobs": lp, "finish_reason": None})
            continue
        if c.finish_reason in ("error", "cancelled"):
            message = c.error or "the request was cancelled"
            yield _sse({"error": {"message": message, "type": "server_error", "param": None, "code": 500}})
            continue
        rest = out.text.finish()
        lp = completion_logprobs(state.tokenizer, c, out.lp_sent) if out.lp_sent < len(c.tokens) else None
        out.lp_sent = len(c.tokens)
        yield chunk({"index": index, "text": rest, "logprobs": lp, "finish_reason": _finish_reason(out)})
    if params.include_usage:
        yield _sse({"id": cid, "object": "text_completion", "created": created, "model": state.model_name,
                    "choices": [], "usage": usage(jobs.prompt_tokens, jobs.completion_tokens)})
    yield "data: [DONE]\n\n"


# ---- metrics ----------------------------------------------------------------------------------------------------


def _prometheus(engine: Engine, state: _State) -> str:
    m = engine.metrics()
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
    metric("time_to_first_token_seconds", "summary", "Submission to first token.",
           [("_sum", float(m.time_to_first_token_seconds_sum)), ("_count", m.time_to_first_token_count)])
    metric("request_seconds", "summary", "Submission to the end of the last choice.",
           [("_sum", float(m.request_seconds_sum)), ("_count", m.request_count)])
    metric("requests_running", "gauge", "Requests holding slots.", [("", m.requests_running)])
    metric("requests_waiting", "gauge", "Requests queued for slots.", [("", m.requests_waiting)])
    metric("slots_busy", "gauge", "Batch slots in use.", [("", m.slots_busy)])
    metric("slots_total", "gauge", "Batch slots (max_batch).", [("", m.slots_total)])
    metric("kv_cache_usage_ratio", "gauge", "Cache positions held by running sequences / capacity.",
           [("", float(m.kv_cache_tokens / m.kv_cache_capacity))])
    metric("http_responses_total", "counter", "HTTP responses by status code.",
           [(f'{{code="{code}"}}', v) for code, v in sorted(state.responses.items())])
    return "\n".join(lines) + "\n"


# ---- running it ----------------------------------------------------------------------------------------------------


def serve(
    engine: Engine,
    tokenizer: Tokenizer,
    *,
    model_name: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    chat: ChatFormat | ChatTemplate | str | None = "3.1",
    log_level: str = "info",
) -> None:
    """Start the engine and serve until interrupted (Ctrl-C); the engine is stopped on the way out."""
    app = build_app(engine, tokenizer, model_name=model_name, api_key=api_key, chat=chat)
    engine.start()
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
    finally:
        engine.stop()


class ServerThread:
    """Serve an app on a background thread at a free loopback port; a context manager that always
    shuts the server down. For tests and benchmarks.

        with ServerThread(app) as server:
            client = openai.OpenAI(base_url=server.url + "/v1", api_key="x")
    """

    def __init__(self, app: Any, *, host: str = "127.0.0.1", start_timeout: float = 30.0):
        self.app, self.host, self.start_timeout = app, host, start_timeout
        self.port = 0
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> ServerThread:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, 0))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_level="warning", lifespan="off", timeout_graceful_shutdown=2)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + self.start_timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.__exit__(None, None, None)
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: Any) -> None:
        assert self._server is not None and self._thread is not None
        self._server.should_exit = True
        self._thread.join(10)
        if self._thread.is_alive():
            self._server.force_exit = True
            self._thread.join(5)
