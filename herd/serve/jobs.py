"""The engine requests behind one HTTP request: submitted from a worker thread, their events carried
onto the event loop, cancelled when the client goes away.

The engine calls back on its own thread; `loop.call_soon_threadsafe` moves each event into the
request's asyncio queue, which the route (or its event stream) reads. Whatever happens to the
HTTP side (an error, a disconnect, a stream that ends early) cancels what was submitted, which
frees the slots at the engine's next step.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from starlette.types import Receive, Scope, Send

from herd.generate.grammar import Grammar
from herd.serve.engine import Engine
from herd.serve.protocol import APIError, CommonParams, StopStrings, TextAssembler, ToolCallSniffer, check_logit_bias
from herd.serve.requests import Choice, FinishEvent, QueueFull, Request, RequestHandle, TokenEvent
from herd.tokenizer import Tokenizer

log = logging.getLogger(__name__)
T = TypeVar("T")


class ClientGone(Exception):
    """The client disconnected before its answer was complete (args[0]: when, a metrics label)."""


@dataclass
class Out:
    """What the server knows of one choice: the engine's output so far and its text."""

    choice: Choice
    text: TextAssembler
    mode: str = "text"  # with tools: "undecided" -> "text" or "tool"
    held: list[str] = field(default_factory=list)  # text not yet sent while a tool call is possible
    lp_sent: int = 0  # tokens whose logprobs were streamed
    sniffer: ToolCallSniffer | None = None  # while "undecided"


class Jobs:
    """The engine requests behind one HTTP request (one per prompt), with their events on one queue.

    Made on the event loop (the queue belongs to it); `submit` may run on any thread."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer, special_ids: frozenset[int], *, model: str = ""):
        self.engine, self.tokenizer, self.special_ids = engine, tokenizer, special_ids
        self.model = model  # the model id the responses carry: the base model's, or the adapter's
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, TokenEvent | FinishEvent]] = asyncio.Queue()
        self.prompts: list[list[int]] = []
        self.n = 1
        self.handles: list[RequestHandle] = []
        self.outs: list[list[Out]] = []

    def submit(self, prompts: list[list[int]], params: CommonParams, max_tokens: list[int], *, tools: bool,
               grammar: Grammar | None = None, adapter: str | None = None, images: Any = None) -> None:
        """Queue one engine request per prompt (APIError 503 when the queue is full, 400 when the
        engine refuses one; what was queued before is cancelled). grammar: every choice's output
        is constrained to it (structured output). adapter: a LoRA adapter's name, which is also
        the model id the responses carry. images: the `RequestImages` of a one-prompt chat request."""
        tok, special = self.tokenizer, self.special_ids
        if adapter is not None:
            self.model = adapter
        self.prompts, self.n = prompts, params.n
        stops = StopStrings(params.stop)  # prepared once for every choice
        check_logit_bias(params.penalties, self.engine.model.args.vocab_size)
        # Echo with logprobs scores the prompt itself (the legacy completions format).
        prompt_logprobs = params.top_logprobs if params.echo and params.logprobs else None
        # The grammar's mask runs last, so nothing after it can lift a token it forbids.
        grammar_processors = (grammar.processor,) if grammar is not None else ()
        loop, queue = self.loop, self.queue
        try:
            for j, (prompt, limit) in enumerate(zip(prompts, max_tokens)):
                # Each prompt's choices are made just before it is queued: a request of many prompts
                # that the queue cannot take ends at the first refusal, having built little.
                self.outs.append([
                    Out(Choice(i, logprobs=[] if params.logprobs else None,
                               top_logprobs=[] if params.top_logprobs else None),
                        TextAssembler(tok, stops, special), "undecided" if tools else "text",
                        sniffer=ToolCallSniffer(tok, special) if tools else None)
                    for i in range(params.n)])
                stop_tokens = () if params.ignore_eos else tok.stop_tokens
                request = Request(prompt, limit, params.sampling, params.n, stop_tokens, params.stop,
                                  params.logprobs, params.top_logprobs,
                                  logits_processors=(*params.penalties.factories(prompt), *grammar_processors),
                                  prompt_logprobs=prompt_logprobs, adapter=adapter, images=images)

                def deliver(event, j=j):
                    try:
                        loop.call_soon_threadsafe(queue.put_nowait, (j, event))
                    except RuntimeError:  # the loop is closed (the server stopped): nobody will read this
                        self.cancel()

                self.handles.append(self.engine.submit(request, on_event=deliver))
        except QueueFull as e:
            self.cancel()
            raise APIError(503, f"the server is busy ({e}); retry later", code="queue_full") from e
        except ValueError as e:
            self.cancel()
            raise APIError(400, str(e)) from e

    def cancel(self) -> None:
        for h in self.handles:
            h.cancel()

    async def events(self) -> AsyncIterator[tuple[Out, TokenEvent | FinishEvent, int]]:
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


async def start(jobs: Jobs, prepare: Callable[[Jobs], T]) -> T:
    """Run `prepare` (parse the body, render and tokenize the prompt, `jobs.submit`) on a worker
    thread: its cost grows with the request, and the loop must keep serving everyone else."""
    work = asyncio.ensure_future(asyncio.to_thread(prepare, jobs))
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:  # the thread runs on: what it submits must not run unobserved
        work.add_done_callback(lambda _: jobs.cancel())
        raise
    except BaseException:
        jobs.cancel()  # whatever was submitted before the failure
        raise


async def watch_disconnect(receive: Receive, jobs: Jobs) -> None:
    """Cancel the jobs when the client goes away (also returns once the response is complete)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            jobs.cancel()
            return


class EventStream:
    """A server-sent-events response that cancels its engine requests when the client goes away
    (noticed while waiting for tokens, not only on the next write; then `on_gone()`) or the
    stream ends early."""

    def __init__(self, chunks: AsyncIterator[str], jobs: Jobs, on_gone: Callable[[], None]):
        self.chunks, self.jobs, self.on_gone = chunks, jobs, on_gone
        self.status_code = 200  # counted by the server as a response

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]})

        async def pump() -> None:
            async for chunk in self.chunks:
                await send({"type": "http.response.body", "body": chunk.encode("utf-8"), "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        pumping = asyncio.ensure_future(pump())
        watching = asyncio.ensure_future(watch_disconnect(receive, self.jobs))
        try:
            done, _ = await asyncio.wait({pumping, watching}, return_when=asyncio.FIRST_COMPLETED)
            if watching in done and pumping not in done:
                self.on_gone()
        finally:
            self.jobs.cancel()  # a no-op for requests that finished
            for task in (pumping, watching):
                task.cancel()
            await asyncio.gather(pumping, watching, return_exceptions=True)
            await self.chunks.aclose()
        if pumping.done() and not pumping.cancelled() and pumping.exception() is not None:
            log.error("stream failed", exc_info=pumping.exception())


async def collect(receive: Receive, jobs: Jobs) -> None:
    """Run every choice to its end, cancelling them if the client disconnects meanwhile (then
    `ClientGone`: nobody is left to answer)."""
    watching = asyncio.ensure_future(watch_disconnect(receive, jobs))
    try:
        async for out, event, _ in jobs.events():
            if isinstance(event, TokenEvent):
                out.text.feed(event.token)
            else:
                out.text.finish()
    finally:
        jobs.cancel()
        gone = watching.done() and not watching.cancelled()  # the response has not started: a real disconnect
        watching.cancel()
        await asyncio.gather(watching, return_exceptions=True)
    if gone:
        raise ClientGone("while_generating")
