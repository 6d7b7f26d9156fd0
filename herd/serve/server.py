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
`Authorization: Bearer KEY`, and so do vLLM's /tokenize, /detokenize and /tokenizer_info (vLLM
leaves them open; they spend the server's CPU, so here they are not); /health and /metrics stay
open for probes, as in llama.cpp.
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
from herd.serve.logprobs import echo_logprobs, join_logprobs
from herd.serve.metrics import LatencyHistograms, prometheus_text
from herd.serve.protocol import (
    FINISH_REASONS,
    APIError,
    CommonParams,
    CompletionRequest,
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
from herd.serve.tokens_api import detokenize, tokenize, tokenizer_info
from herd.serve.vision import request_images
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
        self.latency = LatencyHistograms()
        engine.add_latency_observer(self.latency)

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
        text = prometheus_text(engine.metrics(), state.latency, state.responses, state.disconnects)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    def model_card(adapter: str | None = None) -> dict[str, Any]:
        card = {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "herd",
                "max_model_len": engine.max_seq_len}
        if adapter is not None:  # a LoRA adapter: a model of its own whose parent is the base
            card.update(id=adapter, parent=state.model_name, root=state.model_name)
        return card

    async def models(request: HTTPRequest) -> Response:
        state.check_auth(request)
        return JSONResponse({"object": "list", "data": [model_card(), *map(model_card, state.adapters)]})

    async def model(request: HTTPRequest) -> Response:
        state.check_auth(request)
        return JSONResponse(model_card(state.check_model(request.path_params["model_id"])))

    async def tokenize_route(request: HTTPRequest) -> Response:
        state.check_auth(request)
        raw = await _read_body(request, state)
        body = await asyncio.to_thread(
            lambda: tokenize(_parse_json(raw), tokenizer, state.fmt, max_model_len=engine.max_seq_len))
        return JSONResponse(body)

    async def tokenizer_info_route(request: HTTPRequest) -> Response:
        state.check_auth(request)
        return JSONResponse(tokenizer_info(tokenizer, state.fmt, max_model_len=engine.max_seq_len))

    async def detokenize_route(request: HTTPRequest) -> Response:
        state.check_auth(request)
        raw = await _read_body(request, state)
        return JSONResponse(await asyncio.to_thread(lambda: detokenize(_parse_json(raw), tokenizer)))

    async def chat(request: HTTPRequest) -> Any:
        state.check_auth(request)
        raw = await _read_body(request, state)

        def prepare(jobs: Jobs) -> CommonParams:  # on a worker thread
            req = parse_chat_request(_parse_json(raw), max_n=engine.max_batch)
            adapter = state.check_model(req.params.model)
            images = request_images(engine, req.images)  # decoded and tiled here, encoded by the engine
            prompt = chat_prompt(state.fmt, req)
            if images is not None:
                prompt = engine.rows.image_ids(prompt)  # type: ignore[attr-defined]
            limit = check_length(len(prompt), req.params.max_tokens, engine.max_seq_len)
            grammar = state.grammars.for_chat(state.fmt, req)
            jobs.submit([prompt], req.params, [limit], tools=bool(req.tools), grammar=grammar, adapter=adapter,
                        images=images)
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

        def prepare(jobs: Jobs) -> CompletionRequest:  # on a worker thread
            req = parse_completion_request(_parse_json(raw), max_n=engine.max_batch)
            adapter = state.check_model(req.params.model)
            prompts = [completion_prompt(tokenizer, p) for p in req.prompts]
            limits = [check_length(len(p), req.params.max_tokens, engine.max_seq_len) for p in prompts]
            jobs.submit(prompts, req.params, limits, tools=False, grammar=state.grammars.for_params(req.params),
                        adapter=adapter)
            return req

        jobs = Jobs(engine, tokenizer, state.special_ids, model=state.model_name)
        req = await start(jobs, prepare)
        if req.params.stream:
            return EventStream(_completion_stream(state, jobs, req), jobs, _on_gone(request))
        await collect(request.receive, jobs)
        return await asyncio.to_thread(lambda: JSONResponse(_completion_response(state, jobs, req)))

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
        Route("/v1/models/{model_id:path}", _endpoint(state, model), methods=["GET"]),
        Route("/tokenize", _endpoint(state, tokenize_route), methods=["POST"]),
        Route("/detokenize", _endpoint(state, detokenize_route), methods=["POST"]),
        Route("/tokenizer_info", _endpoint(state, tokenizer_info_route), methods=["GET"]),
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


def _echo(state: _State, jobs: Jobs, req: CompletionRequest, j: int) -> tuple[str, tuple[dict, int] | None]:
    """Prompt j's echoed text (as given, or its ids decoded) and, with logprobs, its scored tokens
    and where the completion's text offsets continue."""
    prompt = req.prompts[j]
    text = prompt if isinstance(prompt, str) else state.tokenizer.decode(
        [t for t in prompt if t not in state.special_ids])
    entries = jobs.handles[j].prompt_logprobs  # set at prefill, before the events that got us here
    lp = None if entries is None else echo_logprobs(state.tokenizer, jobs.prompts[j], entries, state.special_ids)
    return text, lp


def _completion_text_logprobs(state: _State, jobs: Jobs, req: CompletionRequest, j: int, out: Out, start: int = 0,
                              echo: bool = False) -> tuple[str, dict | None]:
    """The echo (when asked and `echo`) before the choice's logprobs from token `start` on."""
    def ours(offset: int = 0) -> dict | None:
        if start >= len(out.choice.tokens):
            return None
        return completion_logprobs(state.tokenizer, out.choice, start, offset, state.special_ids)

    if not (echo and req.params.echo):
        return "", ours()
    text, scored = _echo(state, jobs, req, j)
    if scored is None:
        return text, ours()
    prompt_lp, end = scored
    return text, join_logprobs(prompt_lp, ours(end))


def _completion_response(state: _State, jobs: Jobs, req: CompletionRequest) -> dict:
    """The text_completion object (on a worker thread, as `_chat_response`)."""
    choices, params = [], req.params
    for j, outs in enumerate(jobs.outs):
        for out in outs:
            _check_failed(out)
            echo, lp = _completion_text_logprobs(state, jobs, req, j, out, echo=True)
            choices.append({"index": j * params.n + out.choice.index, "text": echo + out.text.text,
                            "logprobs": lp, "finish_reason": _finish_reason(out)})
    return {"id": new_id("cmpl"), "object": "text_completion", "created": now(), "model": jobs.model,
            "choices": choices, "usage": usage(jobs.prompt_tokens, jobs.completion_tokens)}


async def _completion_stream(state: _State, jobs: Jobs, req: CompletionRequest) -> AsyncIterator[str]:
    cid, created, params = new_id("cmpl"), now(), req.params
    echoed: set[tuple[int, int]] = set()  # (prompt, choice) whose echo went out with its first chunk

    async def pieces(j: int, out: Out, first: bool) -> tuple[str, dict | None]:
        if first and params.echo:  # the prompt's logprobs grow with its length: built off the loop
            return await asyncio.to_thread(_completion_text_logprobs, state, jobs, req, j, out, out.lp_sent, True)
        return _completion_text_logprobs(state, jobs, req, j, out, out.lp_sent)

    def chunk(choice: dict) -> str:
        body = {"id": cid, "object": "text_completion", "created": created, "model": jobs.model,
                "choices": [choice]}
        if params.include_usage:
            body["usage"] = None
        return _sse(body)

    async for out, event, j in jobs.events():
        c = out.choice
        index = j * params.n + c.index
        first = (j, c.index) not in echoed
        echoed.add((j, c.index))
        if isinstance(event, TokenEvent):
            piece = out.text.feed(event.token)
            if piece or c.logprobs is not None or (first and params.echo):
                echo, lp = await pieces(j, out, first)
                out.lp_sent = len(c.tokens)
                yield chunk({"index": index, "text": echo + piece, "logprobs": lp, "finish_reason": None})
            continue
        if c.finish_reason in ("error", "cancelled"):
            message = c.error or "the request was cancelled"
            yield _sse({"error": {"message": message, "type": "server_error", "param": None, "code": 500}})
            continue
        rest = out.text.finish()
        echo, lp = await pieces(j, out, first)
        out.lp_sent = len(c.tokens)
        yield chunk({"index": index, "text": echo + rest, "logprobs": lp, "finish_reason": _finish_reason(out)})
    if params.include_usage:
        yield _sse({"id": cid, "object": "text_completion", "created": created, "model": jobs.model,
                    "choices": [], "usage": usage(jobs.prompt_tokens, jobs.completion_tokens)})
    yield "data: [DONE]\n\n"


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
