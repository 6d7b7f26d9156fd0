"""Continuous batching over the generation primitives: a bounded queue, fixed slots, one KV cache.

Design trade-offs:
* Slots, not pages. The engine owns one static `KVCache` of `max_batch` rows x `max_seq_len`
  positions; each running sequence (one choice of a request) owns one row. Memory is bounded
  and known at start-up, at the price of reserving a whole context per sequence (vLLM's paged
  blocks share memory between requests; here a short request leaves most of its row unused).
* Newcomers join between decode steps. A new request is prefilled alone into its free row
  (through a view of that row as the cache) while the other rows keep their state, then takes
  part in the next batched decode step. Nothing else runs during a prefill (no chunked
  prefill), so a long prompt delays everyone's next token by its prefill time; at most
  `prefill_budget` prompt tokens are prefilled between two decode steps (always at least one
  request), so a burst of arrivals cannot stall the running requests for long.
* Per-row positions do the bookkeeping: a reused row needs no reset (the position mask hides
  whatever the previous owner left beyond the newcomer's position), and the decode step feeds
  rows 0..highest busy row, free rows in between riding along with a dummy token. Slots are
  handed out lowest first to keep that range short.
* The queue is bounded: `submit` raises `QueueFull` at once rather than letting a backlog
  (and everyone's latency) grow without limit; the server answers 503.
* One thread owns the model and the cache and runs `step()`; other threads only submit and
  cancel, under a lock. A cancelled request (e.g. its client disconnected) frees its rows at
  the next step. Events are delivered by callback on the engine thread, in order.
* Token ids only. Stop strings are matched on the bytes of the generated tokens (`token_bytes`,
  e.g. `Tokenizer.decode_single_token_bytes`), which finds exactly the matches the decoded text
  has, so text stays the server's business.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from herd.generate import KVCache, SamplingParams, decode_step, sample
from herd.generate.adapters import AdapterSet
from herd.generate.compiled import CompiledDecoder
from herd.generate.processors import LogitsProcessor, accept_token, apply_processors
from herd.model.llama import Transformer

# The request and event types live in requests.py; re-exported: `from herd.serve.engine import Request` works.
from herd.serve.requests import (  # noqa: F401
    MAX_TOP_LOGPROBS,
    Choice,
    EngineMetrics,
    Event,
    FinishEvent,
    FinishReason,
    QueueFull,
    Request,
    RequestHandle,
    RequestResult,
    TokenEvent,
)

log = logging.getLogger(__name__)

@dataclass
class _Seq:
    """One running choice in one slot."""

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


class _RowCache:
    """The model's `Cache` protocol over one row of a KVCache: prefill a newcomer into its slot
    while the other rows keep their contents."""

    def __init__(self, cache: KVCache, slot: int):
        self.cache, self.slot = cache, slot

    def update(self, layer_id: int, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor):
        assert k.shape[0] == 1 and pos.shape[0] == 1, "a row cache takes one sequence"
        kc = self.cache.k[layer_id][self.slot : self.slot + 1]  # (1, K, Lmax, D), a view into the cache
        vc = self.cache.v[layer_id][self.slot : self.slot + 1]
        kc.index_copy_(2, pos[0], k.to(kc.dtype))
        vc.index_copy_(2, pos[0], v.to(vc.dtype))
        return kc, vc


class Engine:
    """Continuous batching for one model. Drive it with `start()` (a background thread) or by
    calling `step()` yourself (tests); not both.

    max_batch: slots, i.e. sequences decoded together (a request with n choices takes n).
    max_queue: requests waiting for slots before `submit` raises `QueueFull`.
    max_seq_len: context per slot (prompt + new tokens); default the model's. Cache memory is
        2 * n_layers * max_batch * max_seq_len * n_kv_heads * head_dim elements.
    prefill_budget: prompt tokens prefilled between two decode steps (at least one request).
    token_bytes: token id -> bytes, needed only for stop strings.
    compile: decode with the `torch.compile`d fixed-shape step over all `max_batch` rows
        (opt-in: it pays off on GPUs; on CPU eager was faster in our measurements).
    adapters: LoRA adapters attached to `model` (`herd.generate.adapters.load_adapters`); a
        request names one in `Request.adapter`, and rows of one decode step may use different ones.
    """

    def __init__(
        self,
        model: Transformer,
        *,
        max_batch: int = 8,
        max_queue: int = 64,
        max_seq_len: int | None = None,
        prefill_budget: int = 2048,
        token_bytes: Callable[[int], bytes] | None = None,
        compile: bool = False,
        adapters: AdapterSet | None = None,
    ):
        args = model.args
        max_seq_len = args.max_seq_len if max_seq_len is None else max_seq_len
        for name, value in (("max_batch", max_batch), ("max_queue", max_queue), ("prefill_budget", prefill_budget),
                            ("max_seq_len", max_seq_len)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if max_seq_len < 2 or max_seq_len > args.max_seq_len:
            raise ValueError(f"max_seq_len must be in 2..{args.max_seq_len} (the model's context), got {max_seq_len}")
        self.model = model
        self.max_batch, self.max_queue, self.max_seq_len = max_batch, max_queue, max_seq_len
        self.prefill_budget, self.token_bytes = prefill_budget, token_bytes
        weight = model.tok_embeddings.weight
        self.device = weight.device
        self.cache = KVCache(args, batch_size=max_batch, max_seq_len=max_seq_len, device=self.device, dtype=weight.dtype)
        if adapters is not None and compile:
            raise ValueError("compile=True cannot serve LoRA adapters (the compiled step has no per-row adapter "
                             "choice); leave out compile (--compile) or the adapters (--lora)")
        if adapters is not None and adapters.model is not model:
            raise ValueError("the adapters were attached to another model than the engine's")
        self.adapters = adapters
        self._compiled = CompiledDecoder(model, self.cache) if compile else None

        self._cond = threading.Condition()
        self._waiting: deque[RequestHandle] = deque()
        self._slots: list[_Seq | None] = [None] * max_batch
        self._ids = itertools.count()
        self._metrics = EngineMetrics(slots_total=max_batch, kv_cache_capacity=max_batch * max_seq_len)
        self._thread: threading.Thread | None = None
        self._stopping = False

    # ---- any thread ---------------------------------------------------------------------------

    def submit(self, request: Request, *, on_event: Callable[[Event], None] | None = None) -> RequestHandle:
        """Queue a request. Raises ValueError for a malformed request and `QueueFull` when the
        queue is full. `on_event` is called on the engine thread for every `TokenEvent` and
        `FinishEvent`, in order; it must be quick and must not raise (a raising callback
        cancels its request)."""
        self._check(request)
        with self._cond:
            if self._stopping:
                raise RuntimeError("the engine has been stopped")
            if len(self._waiting) >= self.max_queue:
                self._metrics.requests_rejected_total += 1
                raise QueueFull(f"{len(self._waiting)} requests are waiting already (max_queue {self.max_queue})")
            handle = RequestHandle(f"req-{next(self._ids)}", request, on_event)
            self._waiting.append(handle)
            self._metrics.requests_submitted_total += 1
            self._cond.notify()
        return handle

    def metrics(self) -> EngineMetrics:
        """A snapshot of the counters and gauges."""
        with self._cond:
            m = EngineMetrics(**{k: (dict(v) if isinstance(v, dict) else v) for k, v in vars(self._metrics).items()})
            m.requests_waiting = len(self._waiting)
        busy = [s for s in self._slots if s is not None]  # read without the lock: a snapshot may be a step old
        m.slots_busy = len(busy)
        m.requests_running = len({id(s.handle) for s in busy})
        m.kv_cache_tokens = sum(s.pos + 1 for s in busy)
        return m

    @property
    def running(self) -> bool:
        """Whether the engine thread is alive (`start()` was called and it has not stopped)."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Run `step()` on a daemon thread until `stop()`."""
        if self._thread is not None:
            raise RuntimeError("the engine is already running")
        self._thread = threading.Thread(target=self._run, name="herd-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 30.0) -> None:
        """Stop the thread; every unfinished request ends with finish_reason "cancelled"."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise RuntimeError(f"the engine thread did not stop within {timeout} s")
        self._finish_everything("cancelled")

    # ---- the engine thread ----------------------------------------------------------------------

    def step(self) -> bool:
        """One scheduling round: drop cancelled requests, admit newcomers, one decode step.
        Returns False when there was nothing to do."""
        with torch.inference_mode():
            reaped = self._reap_cancelled()
            admitted = self._admit()
            decoded = self._decode()
        return reaped or admitted or decoded

    def run_until_idle(self, max_steps: int = 100_000) -> None:
        """Step until no request is waiting or running (for tests and scripts without the thread)."""
        for _ in range(max_steps):
            if not self.step():
                return
        raise RuntimeError(f"still busy after {max_steps} steps")

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._waiting and all(s is None for s in self._slots):
                    self._cond.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception:  # a failing forward must not kill the thread that serves everyone
                log.exception("engine step failed; failing the running requests")
                for seq in self._slots:
                    if seq is not None:
                        self._finish(seq, "error", error="internal error during decoding")

    def _check(self, r: Request) -> None:
        vocab = self.model.args.vocab_size
        if len(r.prompt) == 0:
            raise ValueError("the prompt is empty; it needs at least one token")
        if len(r.prompt) >= self.max_seq_len:
            raise ValueError(
                f"the prompt has {len(r.prompt)} tokens but the context is {self.max_seq_len}, which leaves no room "
                "for a new token"
            )
        if any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab for t in r.prompt):
            raise ValueError(f"prompt token ids must be integers in 0..{vocab - 1}")
        if isinstance(r.max_tokens, bool) or not isinstance(r.max_tokens, int) or r.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {r.max_tokens!r}")
        if isinstance(r.n, bool) or not isinstance(r.n, int) or not 1 <= r.n <= self.max_batch:
            raise ValueError(f"n must be an integer in 1..{self.max_batch} (one slot per choice), got {r.n!r}")
        if not 0 <= r.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be in 0..{MAX_TOP_LOGPROBS}, got {r.top_logprobs}")
        if r.adapter is not None and (self.adapters is None or r.adapter not in self.adapters):
            known = ", ".join(self.adapters.names) if self.adapters is not None else "none"
            raise ValueError(f"unknown LoRA adapter {r.adapter!r}; this engine has: {known}")
        if r.stop_strings:
            if self.token_bytes is None:
                raise ValueError("stop strings need an engine built with token_bytes= (e.g. the tokenizer's)")
            if any(not isinstance(s, str) or not s for s in r.stop_strings):
                raise ValueError("stop strings must be non-empty strings")

    def _emit(self, handle: RequestHandle, event: Event) -> None:
        try:
            handle._deliver(event)
        except Exception:  # a consumer's bug ends its own request, never the engine
            log.exception("event callback of %s failed; cancelling it", handle.id)
            handle.cancel()

    def _finish(self, seq: _Seq, reason: FinishReason, *, stop_token: int | None = None,
                stop_string: str | None = None, error: str | None = None) -> None:
        self._slots[seq.slot] = None
        handle = seq.handle
        with self._cond:
            m = self._metrics
            m.requests_finished_total[reason] = m.requests_finished_total.get(reason, 0) + 1
        self._emit(handle, FinishEvent(handle.id, seq.index, reason, stop_token, stop_string, error))
        if handle.done():
            with self._cond:
                m = self._metrics
                m.request_seconds_sum += handle.finished - handle.submitted
                m.request_count += 1
                if handle.first_token is not None:
                    m.time_to_first_token_seconds_sum += handle.first_token - handle.submitted
                    m.time_to_first_token_count += 1

    def _finish_unstarted(self, handle: RequestHandle, reason: FinishReason) -> None:
        with self._cond:
            m = self._metrics
            m.requests_finished_total[reason] = m.requests_finished_total.get(reason, 0) + handle.request.n
        for i in range(handle.request.n):
            self._emit(handle, FinishEvent(handle.id, i, reason))

    def _finish_everything(self, reason: FinishReason) -> None:
        for seq in self._slots:
            if seq is not None:
                self._finish(seq, reason)
        with self._cond:
            waiting, self._waiting = list(self._waiting), deque()
        for handle in waiting:
            self._finish_unstarted(handle, reason)

    def _reap_cancelled(self) -> bool:
        reaped = False
        for seq in self._slots:
            if seq is not None and seq.handle.cancelled:
                self._finish(seq, "cancelled")
                reaped = True
        with self._cond:
            gone = [h for h in self._waiting if h.cancelled]
            for h in gone:
                self._waiting.remove(h)
        for h in gone:
            self._finish_unstarted(h, "cancelled")
        return reaped or bool(gone)

    def _admit(self) -> bool:
        budget, admitted = self.prefill_budget, False
        while True:
            with self._cond:
                if not self._waiting:
                    break
                handle = self._waiting[0]
                free = [i for i, s in enumerate(self._slots) if s is None]
                # First come, first served: a request needing more slots than are free waits, and
                # so does everyone behind it (no starvation of large-n requests).
                if len(free) < handle.request.n or (admitted and len(handle.request.prompt) > budget):
                    break
                self._waiting.popleft()
            self._start(handle, free[: handle.request.n])
            budget -= len(handle.request.prompt)
            admitted = True
        return admitted

    def _start(self, handle: RequestHandle, slots: list[int]) -> None:
        r = handle.request
        S = len(r.prompt)
        limit = min(r.max_tokens, self.max_seq_len - S)
        stop_bytes = tuple(s.encode("utf-8") for s in r.stop_strings)
        seqs = []
        for i, slot in enumerate(slots):
            generator = None
            if not r.sampling.greedy:
                seed = None if r.sampling.seed is None else r.sampling.seed + i
                generator = SamplingParams(seed=seed).make_generator(self.device)
            processors = [make() for make in r.logits_processors]
            seqs.append(_Seq(handle, i, slot, limit, generator, stop_bytes=stop_bytes, processors=processors))
        for seq in seqs:
            self._slots[seq.slot] = seq  # claimed before the forward, so a failure frees them
        t0 = time.perf_counter()
        try:
            tokens = torch.tensor([list(r.prompt)], dtype=torch.long, device=self.device)  # (1, S)
            if self.adapters is not None:  # multi-LoRA hook: the prefill row's adapter
                self.adapters.select([r.adapter])
            h = self.model.hidden(tokens, pos=0, cache=_RowCache(self.cache, slots[0]))  # (1, S, dim)
            logits = self.model.output(h[:, -1]).float()  # (1, V)
            for slot in slots[1:]:  # n > 1: the other choices share the prompt's keys/values
                for buf in (*self.cache.k, *self.cache.v):
                    buf[slot, :, :S] = buf[slots[0], :, :S]
        except Exception:
            log.exception("prefill of %s failed", handle.id)
            for seq in seqs:
                self._finish(seq, "error", error="internal error during prefill")
            return
        with self._cond:
            m = self._metrics
            m.prefills_total += 1
            m.prompt_tokens_total += S
            m.prefill_seconds += time.perf_counter() - t0
        for seq in seqs:
            seq.pos = S - 1  # _advance moves it to S, where the first new token goes
        self._advance(seqs, logits.expand(len(seqs), -1))

    def _decode(self) -> bool:
        running = [s for s in self._slots if s is not None]
        if not running:
            return False
        t0 = time.perf_counter()
        B = self.max_batch if self._compiled is not None else max(s.slot for s in running) + 1
        tokens, pos = [0] * B, [0] * B  # free rows: token 0 at position 0 of their own row, never read
        for s in running:
            tokens[s.slot], pos[s.slot] = s.pending, s.pos
        tokens_t = torch.tensor(tokens, device=self.device)
        pos_t = torch.tensor(pos, device=self.device)
        if self.adapters is not None:  # multi-LoRA hook: each row's adapter (free rows: the base)
            names: list[str | None] = [None] * B
            for s in running:
                names[s.slot] = s.handle.request.adapter
            self.adapters.select(names)
        if self._compiled is not None:
            logits = self._compiled(tokens_t, pos_t)  # (max_batch, V)
        else:
            logits = decode_step(self.model, tokens_t, pos_t, self.cache)  # (B, V)
        rows = torch.tensor([s.slot for s in running], device=self.device)
        self._advance(running, logits[rows])
        with self._cond:
            m = self._metrics
            m.decode_steps_total += 1
            m.decode_rows_total += len(running)
            m.decode_seconds += time.perf_counter() - t0
        return True

    def _advance(self, seqs: list[_Seq], logits: torch.Tensor) -> None:
        """Sample each sequence's next token from its row of logits (R, V) and deliver it."""
        raw = logits  # logprobs are reported under the model's own logits
        if any(s.processors for s in seqs):
            logits = logits.float().clone()  # (R, V); the prefill's rows are an expand of one
            for i, s in enumerate(seqs):
                if s.processors:
                    logits[i] = apply_processors(s.processors, logits[i], s.generated)
        greedy = [i for i, s in enumerate(seqs) if s.handle.request.sampling.greedy]
        chosen: list[int] = [0] * len(seqs)
        if greedy:
            picks = logits[greedy].argmax(dim=-1).tolist() if len(greedy) < len(seqs) else logits.argmax(-1).tolist()
            for i, t in zip(greedy, picks):
                chosen[i] = t
        for i, s in enumerate(seqs):
            if s.generator is not None:
                chosen[i] = int(sample(logits[i : i + 1], s.handle.request.sampling, s.generator))
        want_lp = [i for i, s in enumerate(seqs) if s.handle.request.logprobs or s.handle.request.top_logprobs]
        lps: dict[int, tuple[float, list[tuple[int, float]] | None]] = {}
        if want_lp:
            lsm = torch.log_softmax(raw[want_lp].float(), dim=-1)  # (R', V)
            picked = lsm.gather(-1, torch.tensor([chosen[i] for i in want_lp], device=lsm.device).view(-1, 1))
            k = max(seqs[i].handle.request.top_logprobs for i in want_lp)
            top = torch.topk(lsm, k, dim=-1) if k else None
            for j, i in enumerate(want_lp):
                alts = None
                kk = seqs[i].handle.request.top_logprobs
                if kk:
                    alts = list(zip(top.indices[j, :kk].tolist(), top.values[j, :kk].tolist()))
                lps[i] = (float(picked[j]), alts)

        generated = 0
        for i, (s, t) in enumerate(zip(seqs, chosen)):
            r = s.handle.request
            if s.processors:
                accept_token(s.processors, t)
            if t in r.stop_tokens:
                self._finish(s, "stop", stop_token=t)
                continue
            s.count += 1
            s.generated.append(t)
            generated += 1
            lp, alts = lps.get(i, (None, None))
            self._emit(s.handle, TokenEvent(s.handle.id, s.index, t, lp if r.logprobs else None, alts))
            if r.stop_strings:
                hit = self._match_stop(s, t)
                if hit is not None:
                    self._finish(s, "stop", stop_string=hit)
                    continue
            if s.count == s.limit:
                self._finish(s, "length")
                continue
            s.pending, s.pos = t, s.pos + 1
        with self._cond:
            self._metrics.generation_tokens_total += generated

    def _match_stop(self, s: _Seq, token: int) -> str | None:
        new = self.token_bytes(token)
        s.tail += new
        found = None
        best = len(s.tail)
        for stop, b in zip(s.handle.request.stop_strings, s.stop_bytes):
            # Only matches that end inside the new bytes are new.
            at = s.tail.find(b, max(0, len(s.tail) - len(new) - len(b) + 1))
            if 0 <= at < best:
                found, best = stop, at
        longest = max(map(len, s.stop_bytes))
        del s.tail[: max(0, len(s.tail) - (longest - 1))]
        return found
