"""The engine's vocabulary: what a request asks for, the events it produces, its handle and result, the metrics.

Split from `engine.py` so that the protocol and server layers (and readers) see the request and
event types without the scheduler; `herd.serve.engine` re-exports every name, so imports from
there keep working.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

from herd.generate import GREEDY, SamplingParams
from herd.generate.processors import ProcessorFactory

if TYPE_CHECKING:
    import torch

    from herd.generate.processors import LogitsProcessor
    from herd.serve.vision import RequestImages

FinishReason = Literal["stop", "length", "cancelled", "error"]
MAX_TOP_LOGPROBS = 20


class QueueFull(RuntimeError):
    """The waiting queue holds `max_queue` requests already; try again later (HTTP 503)."""


@dataclass(frozen=True)
class Request:
    """What to generate, in token ids.

    max_tokens: new tokens per choice; fewer when the context (the engine's max_seq_len) runs out.
        0 prefills the prompt and finishes every choice with "length" (scoring a prompt).
    sampling: temperature / top_p / top_k / seed; each choice draws from its own generator,
        seeded with seed + choice index (unseeded: a random seed per choice).
    n: independent choices for the same prompt; each occupies one slot.
    stop_tokens: ids that end a choice (not included in its tokens), e.g. eot and eom.
    stop_strings: text that ends a choice; the token completing it is included in the tokens
        (the server cuts the text at the match). Needs an engine built with `token_bytes`.
    logprobs: report log p(token) under the raw logits; top_logprobs: also the k most likely
        alternatives at each step (0..20).
    logits_processors: factories, each called once per choice, of processors that rewrite that
        choice's logits before its token is picked (see `herd.generate.processors`).
    prompt_logprobs: None, or report log p(prompt[i] | prompt[:i]) for every prompt position,
        computed at prefill, with this many top alternatives (0..20); see `PromptLogprob`.
    adapter: the name of a LoRA adapter the engine was built with (`adapters=`), or None for the
        base model.
    images: a Llama 3.2 Vision request's images (`herd.serve.vision.prepare_images`), one per
        `<|image|>` token of the prompt; only a `VisionEngine` takes them.
    """

    prompt: Sequence[int]
    max_tokens: int
    sampling: SamplingParams = GREEDY
    n: int = 1
    stop_tokens: Collection[int] = ()
    stop_strings: Sequence[str] = ()
    logprobs: bool = False
    top_logprobs: int = 0
    logits_processors: Sequence[ProcessorFactory] = ()
    prompt_logprobs: int | None = None
    adapter: str | None = None
    images: RequestImages | None = None

    @property
    def image_digest(self) -> bytes:
        """What the request's images add to its KV blocks' names (b"": none)."""
        return b"" if self.images is None else self.images.digest


@dataclass
class PromptLogprob:
    """One prompt position's score under the raw model: None for the first token (nothing precedes it)."""

    logprob: float | None
    top_logprobs: list[tuple[int, float]] | None = None


class LatencyObserver(Protocol):
    """Receives the engine's latency measurements, in seconds of the engine's clock (e.g. histograms)."""

    def time_to_first_token(self, seconds: float) -> None: ...

    def inter_token(self, seconds: float) -> None: ...

    def request(self, seconds: float) -> None: ...


@dataclass
class TokenEvent:
    """Choice `index` of request `request_id` produced `token`."""

    request_id: str
    index: int
    token: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


@dataclass
class FinishEvent:
    """Choice `index` ended. reason: "stop" (stop token or stop string), "length" (max_tokens or
    the context), "cancelled", or "error" (`error` says what failed)."""

    request_id: str
    index: int
    finish_reason: FinishReason
    stop_token: int | None = None
    stop_string: str | None = None
    error: str | None = None


Event = TokenEvent | FinishEvent


@dataclass
class Choice:
    """One choice's whole output, as the events delivered it."""

    index: int
    tokens: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    stop_token: int | None = None
    stop_string: str | None = None
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    error: str | None = None


@dataclass
class RequestResult:
    """A finished request. Times are seconds since `submit`: the first token of any choice, and the end.
    prompt_logprobs: one entry per prompt token when the request asked for them."""

    request_id: str
    prompt_tokens: int
    choices: list[Choice]
    time_to_first_token: float | None
    total_time: float
    prompt_logprobs: list[PromptLogprob] | None = None

    @property
    def completion_tokens(self) -> int:
        return sum(len(c.tokens) for c in self.choices)


class RequestHandle:
    """A submitted request: cancel it, or wait for its result. Safe to use from any thread.

    `prompt_logprobs` is set on the engine thread at prefill, before the first event is delivered,
    so a consumer that has seen any event of the request may read it."""

    def __init__(self, request_id: str, request: Request, on_event: Callable[[Event], None] | None,
                 clock: Callable[[], float] = time.perf_counter):
        self.id, self.request = request_id, request
        self._clock = clock
        self._on_event = on_event
        self._cancel = threading.Event()
        self._done = threading.Event()
        self._choices = [
            Choice(i, logprobs=[] if request.logprobs else None, top_logprobs=[] if request.top_logprobs else None)
            for i in range(request.n)
        ]
        self._unfinished = request.n
        self.submitted = clock()
        self.first_token: float | None = None
        self.finished: float | None = None
        self.prompt_logprobs: list[PromptLogprob] | None = None

    def cancel(self) -> None:
        """Ask the engine to stop this request; its slots are freed at the next step."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def done(self) -> bool:
        return self._done.is_set()

    def result(self, timeout: float | None = None) -> RequestResult:
        """Block until every choice has finished (TimeoutError after `timeout` seconds)."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} did not finish within {timeout} s")
        return RequestResult(
            request_id=self.id,
            prompt_tokens=len(self.request.prompt),
            choices=self._choices,
            time_to_first_token=None if self.first_token is None else self.first_token - self.submitted,
            total_time=self.finished - self.submitted,
            prompt_logprobs=self.prompt_logprobs,
        )

    # Called on the engine thread only.
    def _deliver(self, event: Event) -> None:
        choice = self._choices[event.index]
        if isinstance(event, TokenEvent):
            if self.first_token is None:
                self.first_token = self._clock()
            choice.tokens.append(event.token)
            if choice.logprobs is not None:
                choice.logprobs.append(event.logprob)
            if choice.top_logprobs is not None:
                choice.top_logprobs.append(event.top_logprobs)
        else:
            choice.finish_reason, choice.stop_token = event.finish_reason, event.stop_token
            choice.stop_string, choice.error = event.stop_string, event.error
            self._unfinished -= 1
        try:
            if self._on_event is not None:
                self._on_event(event)
        finally:  # a failing callback must not leave result() waiting forever
            if self._unfinished == 0 and not self._done.is_set():
                self.finished = self._clock()
                self._done.set()


def check_request(r: Request, *, vocab: int, max_seq_len: int, max_batch: int, stop_strings_ok: bool) -> None:
    """ValueError naming the first field of `r` an engine with these limits cannot run."""
    if len(r.prompt) == 0:
        raise ValueError("the prompt is empty; it needs at least one token")
    # Scoring a prompt (max_tokens 0) needs no room for a new token.
    if len(r.prompt) > max_seq_len or (len(r.prompt) == max_seq_len and r.max_tokens != 0):
        raise ValueError(
            f"the prompt has {len(r.prompt)} tokens but the context is {max_seq_len}, which leaves no room "
            "for a new token"
        )
    if any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab for t in r.prompt):
        raise ValueError(f"prompt token ids must be integers in 0..{vocab - 1}")
    if isinstance(r.max_tokens, bool) or not isinstance(r.max_tokens, int) or r.max_tokens < 0:
        raise ValueError(f"max_tokens must be an integer >= 0 (0: prefill only), got {r.max_tokens!r}")
    if isinstance(r.n, bool) or not isinstance(r.n, int) or not 1 <= r.n <= max_batch:
        raise ValueError(f"n must be an integer in 1..{max_batch} (one slot per choice), got {r.n!r}")
    if not 0 <= r.top_logprobs <= MAX_TOP_LOGPROBS:
        raise ValueError(f"top_logprobs must be in 0..{MAX_TOP_LOGPROBS}, got {r.top_logprobs}")
    if r.prompt_logprobs is not None and not 0 <= r.prompt_logprobs <= MAX_TOP_LOGPROBS:
        raise ValueError(f"prompt_logprobs must be None or in 0..{MAX_TOP_LOGPROBS}, got {r.prompt_logprobs}")
    if r.images is not None:
        raise ValueError("this model has no vision encoder; send text only, or serve a Llama 3.2 Vision checkpoint")
    if r.stop_strings:
        if not stop_strings_ok:
            raise ValueError("stop strings need an engine built with token_bytes= (e.g. the tokenizer's)")
        if any(not isinstance(s, str) or not s for s in r.stop_strings):
            raise ValueError("stop strings must be non-empty strings")


def check_engine_sizes(model_context: int, *, max_batch: int, max_queue: int, prefill_budget: int, max_seq_len: int,
                       block_size: int, num_blocks: int | None) -> int:
    """ValueError naming the first bad engine size; returns the number of KV blocks (default:
    every slot's whole context)."""
    for name, value in (("max_batch", max_batch), ("max_queue", max_queue), ("prefill_budget", prefill_budget),
                        ("max_seq_len", max_seq_len), ("block_size", block_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if max_seq_len < 2 or max_seq_len > model_context:
        raise ValueError(f"max_seq_len must be in 2..{model_context} (the model's context), got {max_seq_len}")
    per_context = -(-max_seq_len // block_size)
    num_blocks = max_batch * per_context if num_blocks is None else num_blocks
    if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < per_context:
        raise ValueError(f"num_blocks must be an integer >= {per_context} (one context of {max_seq_len} tokens in "
                         f"blocks of {block_size}; herd serve --kv-blocks), got {num_blocks!r}")
    return num_blocks


@dataclass
class EngineMetrics:
    """Counters since start-up (`*_total`, `*_seconds`) and gauges of the current state."""

    requests_submitted_total: int = 0
    requests_rejected_total: int = 0
    requests_finished_total: dict[str, int] = field(default_factory=dict)  # by finish reason of choices
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    prefills_total: int = 0
    decode_steps_total: int = 0
    decode_rows_total: int = 0  # busy rows summed over decode steps: / steps = mean batch
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    time_to_first_token_seconds_sum: float = 0.0
    time_to_first_token_count: int = 0
    request_seconds_sum: float = 0.0
    request_count: int = 0
    requests_running: int = 0
    requests_waiting: int = 0
    slots_busy: int = 0
    slots_total: int = 0
    kv_cache_tokens: int = 0  # positions held by running sequences
    kv_cache_capacity: int = 0
    prefill_tokens_total: int = 0  # prompt tokens run through the model (the rest came from the prefix cache)
    prefix_cache_queries_total: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits_total: int = 0  # ...of which found there (hit rate: hits / queries)
    prefix_cache_evictions_total: int = 0  # cached blocks reused for other contents
    preemptions_total: int = 0  # sequences that gave their blocks back because none were free
    kv_blocks_free: int = 0  # blocks a new sequence could get (empty or holding an evictable prefix)
    kv_blocks_total: int = 0
    kv_block_size: int = 0
    spec_draft_tokens_total: int = 0  # speculative decoding: tokens the draft proposed...
    spec_accepted_tokens_total: int = 0  # ...and those the model accepted (rate: accepted / draft)


# A sequence's state. Keys/values exist for positions < pos in its row, always.
SEQ_PREFILL = "prefill"  # prompt[pos:] is still to be prefilled (choice 0 of its request)
SEQ_FORK = "fork"  # choices 1..n-1, waiting for choice 0's prompt: they start from a copy of it
SEQ_DECODE = "decode"  # `pending` is fed at `pos` in the next decode step
SEQ_PAUSED = "paused"  # a decoding sequence that gave its blocks back (none were free); its row is intact


@dataclass
class RunningSeq:
    """One running choice in one slot: the engine's bookkeeping (engine.py schedules it)."""

    handle: RequestHandle
    index: int
    slot: int
    limit: int  # new tokens allowed
    generator: torch.Generator | None
    pending: int = 0  # the last sampled token, fed at the next decode step...
    pos: int = 0  # ...at this position
    count: int = 0  # tokens generated
    tail: bytearray = field(default_factory=bytearray)  # recent output bytes, for stop strings
    stop_bytes: tuple[bytes, ...] = ()  # the request's stop strings in UTF-8, encoded once
    processors: list[LogitsProcessor] = field(default_factory=list)  # this choice's own, stateful
    generated: list[int] = field(default_factory=list)  # tokens delivered so far
    last_token_at: float | None = None  # engine clock at the previous token, for inter-token latency
    prompt_lps: list[PromptLogprob] | None = None  # prompt logprobs so far, chunk by chunk
    order: int = 0  # admission order: the youngest sequence is paused first
    state: str = SEQ_DECODE
    blocks: list[int] = field(default_factory=list)  # block table: positions [i*bs, (i+1)*bs) live in blocks[i]
    names: list[bytes] = field(default_factory=list)  # chained names of its full blocks named so far
    forks: list[RunningSeq] = field(default_factory=list)  # choice 0 of n > 1: the choices waiting for its prompt

    def token_at(self, position: int) -> int:
        """The committed token id at `position` (prompt, then generated tokens)."""
        prompt = self.handle.request.prompt
        return prompt[position] if position < len(prompt) else self.generated[position - len(prompt)]
