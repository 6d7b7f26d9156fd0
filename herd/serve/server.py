"""An OpenAI-compatible HTTP server over the engine (starlette + uvicorn, the `serve` extra).

Threads: uvicorn's event loop reads requests, turns tokens into text and writes responses;
the engine's own thread runs the model. Tokens cross over through `loop.call_soon_threadsafe`
into one asyncio queue per HTTP request, so a slow client never blocks the batch (its events
wait in its queue) and the loop never waits on a forward. Work that grows with the size of a
request runs on worker threads (`asyncio.to_thread`), never on the loop: parsing the JSON body,
validating it, rendering and tokenizing the prompt, submitting it, and building a whole
(non-streamed) response with its logprobs. What stays on the loop is per token and small: a
token's text through `TextAssembler` (amortized constant work per character and stop string)
and its chunk.

Failure rules: every error is an OpenAI-style JSON body (`protocol.APIError`); an unexpected
exception in a route is logged and answered 500, never raised into uvicorn; a full engine
queue is a 503 at once; a client that disconnects (streaming or not) cancels its request,
which frees its slots at the engine's next step. A client that goes away is a normal event: one
log line at info level and a count in `herd_client_disconnects_total`, no traceback and no 500.
A request body must arrive within `body_timeout` seconds of the headers (408 and the connection
closed otherwise), so a client that sends part of a body and stalls holds nothing for long. The
server binds 127.0.0.1 unless told otherwise, and with an API key every /v1 route needs
`Authorization: Bearer KEY` (/health and /metrics stay open for probes, as in llama.cpp).
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
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from herd.serve.engine import Engine
from herd.serve.grammar import Grammars
from herd.serve.jobs import ClientGone, EventStream, Jobs, Out, collect, start
from herd.serve.protocol import (
    FINISH_REASONS,
    APIError,
    CommonParams,
    chat_logprobs,
    chat_prompt,
    check_length,
    completion_logprobs,
    completion_prompt,
    new_id,
    now,
    parse_chat_request,
    parse_completion_request,
    parse_tool_calls,
    usage,
)
from herd.serve.requests import TokenEvent
from herd.tokenizer import ChatFormat, ChatTemplate, Tokenizer

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 8 * 2**20
# Seconds from the request's headers to the end of its body: the whole body, not the gap between
# reads, so a client trickling a byte now and then is cut off too. 60 s lets MAX_BODY_BYTES through
# a link of about 1 Mbit/s; real requests are far smaller.
BODY_TIMEOUT = 60.0


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


# ---- the application ----------------------------------------------------------------------------------------


class _State:
    def __init__(self, engine: Engine, tokenizer: Tokenizer, *, model_name: str, api_key: str | None,
                 chat: ChatFormat | ChatTemplate | str | None):
        self.engine, self.tokenizer, self.model_name, self.api_key = engine, tokenizer, model_name, api_key
        # LoRA adapters the engine serves, each a model id of its own (OpenAI's fine-tuned models, `parent` the base).
        self.adapters: tuple[str, ...] = engine.adapters.names if engine.adapters is not None else ()
        if model_name in self.adapters:
            raise ValueError(f"the model name {model_name!r} is also an adapter's name; rename one of them")
        # A str is a Llama 3 ChatFormat version; None: the model declares no chat format (completions only).
        self.fmt = ChatFormat(tokenizer, version=chat) if isinstance(chat, str) else chat
        self.special_ids = frozenset(tokenizer.special_tokens.values())
        self.grammars = Grammars(tokenizer, engine.model.args.vocab_size)  # structured output, built on first use
        self.created = now()
        self.responses: Counter[int] = Counter()
        self.disconnects: Counter[str] = Counter()  # clients gone before their answer: by when
        self.body_timeout = BODY_TIMEOUT
        self.started = time.time()

    def check_auth(self, request: HTTPRequest) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise APIError(401, "invalid or missing API key; send 'Authorization: Bearer KEY'", code="invalid_api_key")

    def check_model(self, model: str | None) -> str | None:
        """The LoRA adapter a request's `model` names: None for the base model (or no name)."""
        if model is None or model == self.model_name:
            return None
        if model in self.adapters:
            return model
        served = ", ".join(f"'{m}'" for m in (self.model_name, *self.adapters))
        raise APIError(404, f"the model '{model}' does not exist; this server serves {served}",
                       param="model", code="model_not_found")


async def _read_body(request: HTTPRequest, state: _State) -> bytes:
    """The request body, within MAX_BODY_BYTES (413) and `state.body_timeout` seconds (408)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise APIError(413, f"the request body is larger than {MAX_BODY_BYTES} bytes")
    raw = bytearray()
    try:
        async with asyncio.timeout(state.body_timeout):
            async for piece in request.stream():
                raw += piece
                if len(raw) > MAX_BODY_BYTES:
                    raise APIError(413, f"the request body is larger than {MAX_BODY_BYTES} bytes")
    except TimeoutError:
        raise APIError(408, f"the request body did not arrive within {state.body_timeout:g} s "
                       f"({len(raw)} bytes came)", code="request_timeout") from None
    except ClientDisconnect:
        raise ClientGone("while_sending_the_body") from None
    return bytes(raw)


def _parse_json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from e


def _client_gone(state: _State, path: str, when: str) -> None:
    state.disconnects[when] += 1
    log.info("client disconnected from %s %s; its request is dropped", path, when.replace("_", " "))


def _endpoint(state: _State, fn: Callable[[HTTPRequest], Any]) -> Callable[[HTTPRequest], Any]:
    async def handle(request: HTTPRequest) -> Any:
        try:
            response = await fn(request)
        except ClientGone as e:  # nobody to answer: uvicorn drops what is sent to a closed connection
            _client_gone(state, request.url.path, e.args[0])
            return Response(status_code=499)  # nginx's "client closed request"; never sent, not counted
        except APIError as e:
            # 408: the rest of the body may still come, and must not be read as the next request.
            headers = {"connection": "close"} if e.status == 408 else None
            response = JSONResponse(e.body(), status_code=e.status, headers=headers)
        except Exception:  # no request may take the server down; the traceback goes to the log
            log.exception("unhandled error in %s %s", request.method, request.url.path)
            response = JSONResponse(APIError(500, "internal server error").body(), status_code=500)
        state.responses[response.status_code] += 1
        return response

    return handle


def build_app(engine: Engine, tokenizer: Tokenizer, *, model_name: str, api_key: str | None = None,
              chat: ChatFormat | ChatTemplate | str | None = "3.1", body_timeout: float = BODY_TIMEOUT) -> Starlette:
    """The ASGI app. The engine must be started (or stepped) by the caller, who also stops it.
    body_timeout: seconds a client has to send its whole request body once the headers are in."""
    if not body_timeout > 0:
        raise ValueError(f"body_timeout must be > 0 seconds, got {body_timeout!r}")
    state = _State(engine, tokenizer, model_name=model_name, api_key=api_key, chat=chat)
    state.body_timeout = float(body_timeout)

    def _on_gone(request: HTTPRequest) -> Callable[[], None]:
        return lambda: _client_gone(state, request.url.path, "while_streaming")

    async def health(request: HTTPRequest) -> Response:
        if not engine.running:
            raise APIError(503, "the engine is not running")
        return JSONResponse({"status": "ok"})

    async def metrics(request: HTTPRequest) -> Response:
        return PlainTextResponse(_prometheus(engine, state), media_type="text/plain; version=0.0.4")

    async def models(request: HTTPRequest) -> Response:
        state.check_auth(request)
        base = {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "herd",
                "max_model_len": engine.max_seq_len}
        return JSONResponse({"object": "list", "data": [base, *(
            {**base, "id": name, "parent": state.model_name, "root": state.model_name} for name in state.adapters)]})

    async def chat(request: HTTPRequest) -> Any:
        state.check_auth(request)
        raw = await _read_body(request, state)

        def prepare(jobs: Jobs) -> CommonParams:  # on a worker thread
            req = parse_chat_request(_parse_json(raw), max_n=engine.max_batch)
            adapter = state.check_model(req.params.model)
            prompt = chat_prompt(state.fmt, req)
            limit = check_length(len(prompt), req.params.max_tokens, engine.max_seq_len)
            grammar = state.grammars.for_chat(state.fmt, req)
            jobs.submit([prompt], req.params, [limit], tools=bool(req.tools), grammar=grammar, adapter=adapter)
            return req.params

        jobs = Jobs(engine, tokenizer, state.special_ids, model=state.model_name)
        params = await start(jobs, prepare)
        if params.stream:
            return EventStream(_chat_stream(state, jobs, params), jobs, _on_gone(request))
        await collect(request.receive, jobs)
        return await asyncio.to_thread(lambda: JSONResponse(_chat_response(state, jobs)))

    async def completions(request: HTTPRequest) -> Any:
        state.check_auth(request)
        raw = await _read_body(request, state)

        def prepare(jobs: Jobs) -> CommonParams:  # on a worker thread
            req = parse_completion_request(_parse_json(raw), max_n=engine.max_batch)
            adapter = state.check_model(req.params.model)
            prompts = [completion_prompt(tokenizer, p) for p in req.prompts]
            limits = [check_length(len(p), req.params.max_tokens, engine.max_seq_len) for p in prompts]
            jobs.submit(prompts, req.params, limits, tools=False, grammar=state.grammars.for_params(req.params),
                        adapter=adapter)
            return req.params

        jobs = Jobs(engine, tokenizer, state.special_ids, model=state.model_name)
        params = await start(jobs, prepare)
        if params.stream:
            return EventStream(_completion_stream(state, jobs, params), jobs, _on_gone(request))
        await collect(request.receive, jobs)
        return await asyncio.to_thread(lambda: JSONResponse(_completion_response(state, jobs, params)))

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


def _finish_reason(out: Out) -> str:
    return FINISH_REASONS.get(out.choice.finish_reason, "stop")


def _check_failed(out: Out) -> None:
    if out.choice.finish_reason == "error":
        raise APIError(500, f"generation failed: {out.choice.error}")
    if out.choice.finish_reason == "cancelled":
        raise APIError(503, "the request was cancelled (the server is shutting down)")


def _chat_response(state: _State, jobs: Jobs) -> dict:
    """The chat.completion object (on a worker thread: its logprobs grow with max_tokens x top_logprobs)."""
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
    return {"id": new_id("chatcmpl"), "object": "chat.completion", "created": now(), "model": jobs.model,
            "choices": choices, "usage": usage(jobs.prompt_tokens, jobs.completion_tokens)}


async def _chat_stream(state: _State, jobs: Jobs, params: CommonParams) -> AsyncIterator[str]:
    cid, created = new_id("chatcmpl"), now()

    def chunk(choices: list[dict], **extra: Any) -> str:
        body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": jobs.model,
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
            if out.mode == "undecided":  # everything held so far is blank
                out.held.append(piece)
                if out.sniffer(c.tokens):
                    if piece.strip() or c.tokens[0] == getattr(state.tokenizer, "python_tag_id", None):
                        out.mode = "tool"
                    continue
                out.mode, piece, out.held = "text", "".join(out.held), []
            elif out.mode == "tool":
                out.held.append(piece)
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
        rest = "".join(out.held) + out.text.finish()
        reason = _finish_reason(out)
        # A held reply is parsed, and its logprobs built, off the loop: both grow with its length.
        if out.mode != "text":
            calls = await asyncio.to_thread(parse_tool_calls, state.fmt, c)
            if calls:
                deltas = [{"index": k, **call} for k, call in enumerate(calls)]
                yield chunk([{"index": c.index, "delta": {"tool_calls": deltas}, "logprobs": None,
                              "finish_reason": None}])
                rest, reason = "", "tool_calls"
        if rest or (c.logprobs is not None and out.lp_sent < len(c.tokens)):
            if out.mode == "text":  # a few tokens' worth: streamed text sends its logprobs as it goes
                lp = chat_logprobs(state.tokenizer, c, out.lp_sent)
            else:
                lp = await asyncio.to_thread(chat_logprobs, state.tokenizer, c, out.lp_sent)
            out.lp_sent = len(c.tokens)
            yield chunk([{"index": c.index, "delta": {"content": rest}, "logprobs": lp, "finish_reason": None}])
        yield chunk([{"index": c.index, "delta": {}, "logprobs": None, "finish_reason": reason}])
    if params.include_usage:
        yield _sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": jobs.model,
                    "choices": [], "usage": usage(jobs.prompt_tokens, jobs.completion_tokens)})
    yield "data: [DONE]\n\n"


# ---- completions -----------------------------------------------------------------------------------------------


def _completion_response(state: _State, jobs: Jobs, params: CommonParams) -> dict:
    """The text_completion object (on a worker thread, as `_chat_response`)."""
    choices = []
    for j, outs in enumerate(jobs.outs):
        for out in outs:
            _check_failed(out)
            choices.append({"index": j * params.n + out.choice.index, "text": out.text.text,
                            "logprobs": completion_logprobs(state.tokenizer, out.choice),
                            "finish_reason": _finish_reason(out)})
    return {"id": new_id("cmpl"), "object": "text_completion", "created": now(), "model": jobs.model,
            "choices": choices, "usage": usage(jobs.prompt_tokens, jobs.completion_tokens)}


async def _completion_stream(state: _State, jobs: Jobs, params: CommonParams) -> AsyncIterator[str]:
    cid, created = new_id("cmpl"), now()

    def chunk(choice: dict) -> str:
        body = {"id": cid, "object": "text_completion", "created": created, "model": jobs.model,
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
        yield _sse({"id": cid, "object": "text_completion", "created": created, "model": jobs.model,
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
    metric("client_disconnects_total", "counter", "Clients that went away before their answer was complete.",
           [(f'{{when="{when}"}}', v) for when, v in sorted(state.disconnects.items())])
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
    body_timeout: float = BODY_TIMEOUT,
) -> None:
    """Start the engine and serve until interrupted (Ctrl-C); the engine is stopped on the way out."""
    app = build_app(engine, tokenizer, model_name=model_name, api_key=api_key, chat=chat, body_timeout=body_timeout)
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
