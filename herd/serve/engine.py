"""Continuous batching over the generation primitives: a bounded queue, fixed slots, paged KV blocks.

Design trade-offs:
* Blocks for memory and sharing, rows for attention. Keys and values are accounted in a pool of
  fixed-size blocks (`herd.serve.pages`): each running sequence (one choice of a request) holds
  a block table, full blocks are named by a chained hash of their tokens, and a newcomer whose
  prompt starts with cached blocks (a shared system prompt, the earlier turns of a chat) takes
  them by refcount and prefills only the rest. Attention, though, reads one contiguous row per
  slot of a static `KVCache` (max_batch x max_seq_len), as before: a hit copies its blocks into
  the row once, and a block is copied into the pool once, when it fills. Gathering every
  sequence's blocks into a contiguous view at every step was the alternative: for SmolLM2-135M
  at 16 sequences x 512 positions that copies 0.38 GB per step (0.75 GB of traffic, more than
  the 0.54 GB of fp32 weights the step reads; 2.1 s on this loaded CPU), and the fused CPU
  decode op and the compiled decoder read a `KVCache` row layout. The price is memory: the rows and the pool both exist (the pool's pages are
  committed as blocks are first used, and by default it can hold every slot's context, as the
  rows do; `num_blocks` bounds it), so paging buys sharing and an exact admission rule here,
  not a smaller footprint.
* Admission waits for blocks. A request starts when it gets slots for its n choices and blocks
  for its whole prompt (plus a private tail block per extra choice); until then it and everyone
  behind it wait (first come, first served, no starvation of large requests). It also waits while
  its next uncached block is being prefilled by a running prompt (a shared system prompt whose
  first request is still prefilling), then takes that block as a hit instead of recomputing it. A decoding
  sequence that needs a new block when none is free (after evicting unreferenced cached ones)
  pauses the youngest decoding sequence, which gives its blocks back (vLLM's preemption); its
  row keeps its keys and values, so it resumes without recomputation once blocks are free.
* Chunked prefill. Each step prefills at most `prefill_budget` prompt tokens (oldest prompt
  first; the chunks batched into as few forwards as padding allows, `herd.serve.prefill`) and then decodes every running sequence once, so a long prompt
  is spread over several steps while everyone else keeps getting a token per step. A prompt
  whose last chunk completes joins that same step's decode.
* n > 1 choices share the prompt: choice 0 prefills, the others then take its full blocks by
  refcount and copy its row; each owns its partial last block (copy-on-write at the fork).
* Per-row positions do the bookkeeping: a reused row needs no reset (the position mask hides
  whatever the previous owner left beyond the newcomer's position), and the decode step feeds
  rows 0..highest decoding row, the others riding along with a dummy token written where the
  row's next real write will replace it. Slots are handed out lowest first.
* The queue is bounded: `submit` raises `QueueFull` at once (the server answers 503).
* One thread owns the model and the cache and runs `step()`; other threads only submit and
  cancel, under a lock; a cancelled request frees its rows and blocks at the next step.
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

import torch

from herd.generate import KVCache, SamplingParams, decode_step
from herd.generate.adapters import AdapterSet
from herd.generate.compiled import CompiledDecoder
from herd.generate.processors import apply_processors
from herd.model.llama import Transformer
from herd.serve.decode_choice import DecodeChoice
from herd.serve.pages import BlockPool, BlockStore, block_hashes, chain_root
from herd.serve.prefill import PrefillSteps
from herd.serve.scoring import pick_tokens, token_logprobs
from herd.serve.tp import Leader
from herd.serve.speculative import DraftRunner, SpeculativeSteps

# The request and event types live in requests.py; re-exported: `from herd.serve.engine import Request` works.
from herd.serve.requests import (  # noqa: F401
    MAX_TOP_LOGPROBS,
    Choice,
    EngineMetrics,
    Event,
    FinishEvent,
    FinishReason,
    LatencyObserver,
    PromptLogprob,
    QueueFull,
    Request,
    RequestHandle,
    RequestResult,
    TokenEvent,
    check_engine_sizes,
    check_request,
)
from herd.serve.requests import SEQ_DECODE as _DECODE
from herd.serve.requests import SEQ_FORK as _FORK
from herd.serve.requests import SEQ_PAUSED as _PAUSED
from herd.serve.requests import SEQ_PREFILL as _PREFILL
from herd.serve.requests import RunningSeq as _Seq

log = logging.getLogger(__name__)

class Engine(SpeculativeSteps, PrefillSteps):
    """Continuous batching for one model. Drive it with `start()` (a background thread) or by
    calling `step()` yourself (tests); not both.

    max_batch: slots, i.e. sequences decoded together (a request with n choices takes n).
    max_queue: requests waiting for slots before `submit` raises `QueueFull`.
    max_seq_len: context per slot (prompt + new tokens); default the model's. The slots' rows hold
        2 * n_layers * max_batch * max_seq_len * n_kv_heads * head_dim elements.
    prefill_budget: prompt tokens prefilled per step (chunked: a longer prompt takes several steps,
        decoding everyone else's next token in each).
    block_size: positions per KV block, the unit of prefix sharing.
    num_blocks: blocks in the pool (the same size per block as the rows); default enough for
        every slot's whole context. At least one whole context.
    prefix_caching: reuse the blocks of earlier prompts (False: every prompt is prefilled whole).
    token_bytes: token id -> bytes, needed only for stop strings.
    compile: decode with the `torch.compile`d fixed-shape step over all `max_batch` rows
        (opt-in: it pays off on GPUs; on CPU eager was faster in our measurements).
    clock: the time source of every latency (tests pass a fake one).
    adapters: LoRA adapters attached to `model` (`herd.generate.adapters.load_adapters`); a
        request names one in `Request.adapter`, and rows of one decode step may use different ones.
        Prefix-cache blocks are per adapter (their keys and values differ).
    draft, num_draft: speculative decoding (`herd.serve.speculative`): a smaller model with the same
        vocabulary proposes up to num_draft tokens per row and step. Not with compile or adapters.
    mirror: tensor parallelism (`herd.serve.tp.Leader`): told every forward and KV copy before it
        runs, so follower ranks repeat them on their shards; a failed step is then fatal.
    decode_choice: decode each step on `model` or an equivalent twin (the GGUF file's int4 blocks),
        whichever `herd.serve.decode_choice.choose_decode` found faster at that batch size. Plain
        decode steps only: not with compile, adapters, a draft or a mirror.
    """

    def __init__(
        self,
        model: Transformer,
        *,
        max_batch: int = 8,
        max_queue: int = 64,
        max_seq_len: int | None = None,
        prefill_budget: int = 512,
        block_size: int = 16,
        num_blocks: int | None = None,
        prefix_caching: bool = True,
        token_bytes: Callable[[int], bytes] | None = None,
        compile: bool = False,
        clock: Callable[[], float] = time.perf_counter,
        adapters: AdapterSet | None = None,
        draft: Transformer | None = None,
        num_draft: int = 4,
        mirror: Leader | None = None,
        decode_choice: DecodeChoice | None = None,
    ):
        args = model.args
        max_seq_len = args.max_seq_len if max_seq_len is None else max_seq_len
        num_blocks = check_engine_sizes(args.max_seq_len, max_batch=max_batch, max_queue=max_queue,
                                        prefill_budget=prefill_budget, max_seq_len=max_seq_len,
                                        block_size=block_size, num_blocks=num_blocks)
        self.model = model
        self.max_batch, self.max_queue, self.max_seq_len = max_batch, max_queue, max_seq_len
        self.prefill_budget, self.token_bytes = prefill_budget, token_bytes
        weight = model.tok_embeddings.weight
        self.device = weight.device
        self.cache = KVCache(args, batch_size=max_batch, max_seq_len=max_seq_len, device=self.device, dtype=weight.dtype)
        self._compiled = CompiledDecoder(model, self.cache) if compile else None
        self.block_size = block_size
        self.pool = BlockPool(num_blocks, block_size, prefix_caching=prefix_caching)
        self._mirror = mirror
        if mirror is not None and (compile or adapters is not None):
            raise ValueError("tensor parallelism cannot yet serve LoRA adapters (--lora) or compile the decode "
                             "step (--compile); leave those out or run with --tp 1")
        self.store = BlockStore(self.cache, num_blocks, block_size) if mirror is None else mirror.store(
            self.cache, num_blocks, block_size)
        self._order = itertools.count()

        self._cond = threading.Condition()
        self._waiting: deque[RequestHandle] = deque()
        self._slots: list[_Seq | None] = [None] * max_batch
        self._ids = itertools.count()
        self._metrics = EngineMetrics(slots_total=max_batch, kv_cache_capacity=max_batch * max_seq_len,
                                      kv_blocks_total=num_blocks, kv_block_size=block_size)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._clock = clock
        if adapters is not None and (compile or adapters.model is not model):
            raise ValueError("compile=True cannot serve LoRA adapters (the compiled step has no per-row adapter "
                             "choice); leave out compile (--compile) or the adapters (--lora)" if compile else
                             "the adapters were attached to another model than the engine's")
        self.adapters = adapters
        if draft is not None and (compile or adapters is not None or mirror is not None):
            raise ValueError("a draft model (speculative decoding) cannot be combined with compile (--compile), "
                             "LoRA adapters (--lora) or tensor parallelism (--tp) yet; leave out one of them")
        self.draft = None if draft is None else DraftRunner(draft, target=model, max_batch=max_batch,
                                                            max_seq_len=max_seq_len, num_draft=num_draft)
        self._latency: list[LatencyObserver] = []
        if decode_choice is not None:
            if compile or adapters is not None or draft is not None or mirror is not None:
                raise ValueError("a decode twin (--q4-decode) cannot be combined with compile (--compile), LoRA "
                                 "adapters (--lora), a draft (--draft) or tensor parallelism (--tp); use --q4-decode never")
            if next(iter(decode_choice.models.values())) is not model:
                raise ValueError("the decode choice's main model is not the engine's model")
        self.decode_choice = decode_choice

    def add_latency_observer(self, observer: LatencyObserver) -> None:
        """Report every time to first token, inter-token gap and request latency to `observer`
        (called on the engine thread; call this before `start()`)."""
        self._latency.append(observer)

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
            handle = RequestHandle(f"req-{next(self._ids)}", request, on_event, clock=self._clock)
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
        m.kv_blocks_free = self.pool.num_free
        m.prefix_cache_evictions_total = self.pool.evictions
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
        if self._mirror is not None:  # after the thread: the followers' last instruction
            self._mirror.stop()
        self._finish_everything("cancelled")

    # ---- the engine thread ----------------------------------------------------------------------

    def step(self) -> bool:
        """One scheduling round: drop cancelled requests, admit newcomers, prefill up to
        `prefill_budget` prompt tokens, one decode step. Returns False when there was nothing to do."""
        with torch.inference_mode():
            reaped = self._reap_cancelled()
            admitted = self._admit()
            prefilled = self._prefill()
            self._reserve()
            decoded = self._decode()
        return reaped or admitted or prefilled or decoded

    def run_until_idle(self, max_steps: int = 100_000) -> None:
        """Step until no request is waiting or running (for tests and scripts without the thread)."""
        for _ in range(max_steps):
            if not self.step():
                return
        raise RuntimeError(f"still busy after {max_steps} steps")

    def _run(self) -> None:
        beat = None if self._mirror is None else self._mirror.heartbeat_s
        while True:
            with self._cond:
                idle = False
                while not idle and not self._stopping and not self._waiting and all(s is None for s in self._slots):
                    idle = not self._cond.wait(beat)  # timed out: only with a mirror
                if self._stopping:
                    return
            if idle:
                self._mirror.heartbeat()  # idle followers' collectives would otherwise time out
                continue
            try:
                self.step()
            except Exception:  # a failing forward must not kill the thread that serves everyone
                log.exception("engine step failed; failing the running requests")
                for seq in self._slots:
                    if seq is not None:
                        self._finish(seq, "error", error="internal error during decoding")
                if self._mirror is not None:  # the ranks' collectives are out of step: give up
                    with self._cond:
                        self._stopping = True  # submit refuses from now on
                    self._finish_everything("error")
                    self._mirror.abort()
                    return

    def _check(self, r: Request) -> None:
        check_request(r, vocab=self.model.args.vocab_size, max_seq_len=self.max_seq_len, max_batch=self.max_batch,
                      stop_strings_ok=self.token_bytes is not None)
        if r.adapter is not None and (self.adapters is None or r.adapter not in self.adapters):
            known = ", ".join(self.adapters.names) if self.adapters is not None else "none"
            raise ValueError(f"unknown LoRA adapter {r.adapter!r}; this engine has: {known}")
        if self._blocks_for(r) > self.pool.num_blocks:
            raise ValueError(
                f"the prompt and its {r.n} choices need {self._blocks_for(r)} KV blocks of {self.block_size} tokens "
                f"but the pool has {self.pool.num_blocks}; shorten the prompt, lower n or raise num_blocks"
            )

    def _emit(self, handle: RequestHandle, event: Event) -> None:
        try:
            handle._deliver(event)
        except Exception:  # a consumer's bug ends its own request, never the engine
            log.exception("event callback of %s failed; cancelling it", handle.id)
            handle.cancel()

    def _finish(self, seq: _Seq, reason: FinishReason, *, stop_token: int | None = None,
                stop_string: str | None = None, error: str | None = None) -> None:
        self._slots[seq.slot] = None
        self.pool.release(seq.blocks)
        seq.blocks = []
        handle = seq.handle
        with self._cond:
            m = self._metrics
            m.requests_finished_total[reason] = m.requests_finished_total.get(reason, 0) + 1
        self._emit(handle, FinishEvent(handle.id, seq.index, reason, stop_token, stop_string, error))
        if handle.done():
            total = handle.finished - handle.submitted
            ttft = None if handle.first_token is None else handle.first_token - handle.submitted
            with self._cond:
                m = self._metrics
                m.request_seconds_sum += total
                m.request_count += 1
                if ttft is not None:
                    m.time_to_first_token_seconds_sum += ttft
                    m.time_to_first_token_count += 1
            for observer in self._latency:
                if ttft is not None:
                    observer.time_to_first_token(ttft)
                observer.request(total)

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

    def _blocks_for(self, request: Request) -> int:
        """Blocks a request takes at admission: its prompt's, and a private tail block per extra choice."""
        S, bs = len(request.prompt), self.block_size
        return -(-S // bs) + (request.n - 1 if S % bs else 0)

    def _admit(self) -> bool:
        """Resume paused sequences (oldest first), then admit newcomers while slots and blocks last."""
        admitted = False
        for seq in sorted((s for s in self._slots if s is not None and s.state == _PAUSED), key=lambda s: s.order):
            if not self._resume(seq):
                return admitted  # first come, first served: nobody new starts while a paused one waits
            admitted = True
        while True:
            with self._cond:
                if not self._waiting:
                    break
                handle = self._waiting[0]
                r = handle.request
                free = [i for i, s in enumerate(self._slots) if s is None]
                # First come, first served: a request needing more slots or blocks than are free
                # waits, and so does everyone behind it (no starvation of large requests).
                if len(free) < r.n:
                    break
                # The last prompt token is always computed: its logits give the first new token.
                # Scored prompts (prompt_logprobs) compute every position: no prefix hits for them.
                reuse = self.pool.prefix_caching and r.prompt_logprobs is None
                names = block_hashes(r.prompt[: len(r.prompt) - 1], self.block_size,
                                     parent=chain_root(r.adapter, r.image_digest)) if reuse else []
                hits = self.pool.match(names)
                if self.pool.available_with(hits) < self._blocks_for(r) - len(hits):
                    break
                if len(hits) < len(names) and self._in_flight(names[len(hits)]):
                    break  # a running prompt is prefilling this block now: wait to share it, not recompute it
                self._waiting.popleft()
            self._start(handle, free[: r.n], names, hits)
            admitted = True
        return admitted

    def _in_flight(self, name: bytes) -> bool:
        """Whether a prompt being prefilled will name a block `name` (it is not in the pool yet). Four
        chats that open at once with the same long system prompt would otherwise each prefill it."""
        for seq in self._slots:
            if seq is not None and seq.state == _PREFILL:
                r = seq.handle.request
                prompt = r.prompt
                done = len(seq.names)
                if name in block_hashes(prompt[: len(prompt) - 1], self.block_size, start=done,
                                        parent=seq.names[-1] if done else chain_root(r.adapter, r.image_digest)):
                    return True
        return False

    def _start(self, handle: RequestHandle, slots: list[int], names: list[bytes], hits: list[int]) -> None:
        r = handle.request
        S, bs = len(r.prompt), self.block_size
        limit = min(r.max_tokens, self.max_seq_len - S)
        stop_bytes = tuple(s.encode("utf-8") for s in r.stop_strings)
        seqs = []
        for i, slot in enumerate(slots):
            generator = None
            if not r.sampling.greedy:
                seed = None if r.sampling.seed is None else r.sampling.seed + i
                generator = SamplingParams(seed=seed).make_generator(self.device)
            processors = [make() for make in r.logits_processors]
            seqs.append(_Seq(handle, i, slot, limit, generator, stop_bytes=stop_bytes, processors=processors,
                             order=next(self._order), state=_FORK))
        first = seqs[0]
        self.pool.acquire(hits)
        first.blocks = hits + self.pool.allocate(-(-S // bs) - len(hits))
        first.names, first.pos, first.state, first.forks = names[: len(hits)], len(hits) * bs, _PREFILL, seqs[1:]
        for seq in first.forks:  # each extra choice's private copy of the partial last prompt block
            seq.blocks = self.pool.allocate(1) if S % bs else []
        for seq in seqs:
            self._slots[seq.slot] = seq  # claimed before any forward, so a failure frees them
        self.store.load(self.cache, first.slot, hits)
        with self._cond:  # with prefix caching off, every token is a query and none a hit
            m = self._metrics
            m.prompt_tokens_total += S
            m.prefix_cache_queries_total += S
            m.prefix_cache_hits_total += len(hits) * bs

    def _resume(self, seq: _Seq) -> bool:
        """Blocks for positions 0..pos again (its row still holds every key and value)."""
        blocks = self.store.reacquire(self.pool, self.cache, seq.slot, seq.names, seq.pos // self.block_size + 1)
        if blocks is None:
            return False
        seq.blocks, seq.state = blocks, _DECODE
        return True

    def _commit(self, seq: _Seq) -> None:
        """Copy the sequence's newly full blocks (positions < pos) into the pool and name them."""
        bs, done = self.block_size, len(seq.names)
        if self.pool.prefix_caching and seq.pos // bs > done:
            r, a = seq.handle.request, done * bs
            S = len(r.prompt)  # the ids at positions a..pos-1: prompt, then generated tokens
            tokens = [*r.prompt[a : seq.pos], *seq.generated[max(a - S, 0) : max(seq.pos - S, 0)]]
            seq.names += self.store.commit(self.pool, self.cache, seq.slot, seq.blocks, seq.names, tokens,
                                           root=chain_root(r.adapter, r.image_digest))

    def _fork(self, first: _Seq, logits: torch.Tensor) -> None:
        """Choice 0's prompt is in: the other choices share its full blocks and copy its row, and all
        take their first token from the same logits."""
        S = first.pos
        full = first.blocks[: S // self.block_size]
        seqs = [first]
        for seq in first.forks:
            if self._slots[seq.slot] is not seq:
                continue
            self.pool.acquire(full)
            seq.blocks = full + seq.blocks
            seq.names = list(first.names)
            self.store.copy_row(self.cache, first.slot, seq.slot, S)
            seqs.append(seq)
        first.forks = []
        for seq in seqs:
            seq.state, seq.pos = _DECODE, S - 1  # _advance moves pos to S, where the first new token goes
        self._advance(seqs, logits.expand(len(seqs), -1))

    def _reserve(self) -> None:
        """Give every decoding sequence a block for the position it writes next. When none is free,
        the youngest decoding sequence gives its blocks back and pauses (vLLM preempts the same
        one); its row keeps its keys and values, so it resumes without recomputing anything."""
        bs = self.block_size
        for seq in sorted((s for s in self._slots if s is not None and s.state == _DECODE), key=lambda s: s.order):
            # A speculative step may commit up to k positions beyond pos: their blocks are held ahead.
            last = min(seq.pos + self._lookahead(seq), self.max_seq_len - 1)
            while seq.state == _DECODE and last // bs >= len(seq.blocks):
                while self.pool.num_free == 0 and seq.state == _DECODE:
                    victim = max((s for s in self._slots if s is not None and s.state == _DECODE and s.blocks),
                                 key=lambda s: s.order)
                    self.pool.release(victim.blocks)
                    victim.blocks, victim.state = [], _PAUSED
                    with self._cond:
                        self._metrics.preemptions_total += 1
                if seq.state == _DECODE:
                    seq.blocks += self.pool.allocate(1)

    def _decode(self) -> bool:
        running = [s for s in self._slots if s is not None and s.state == _DECODE]
        if not running:
            return False
        t0 = time.perf_counter()
        k = self._spec_k(running)
        if k:
            self._decode_speculative(running, k, t0)
            return True
        B = self.max_batch if self._compiled is not None else max(s.slot for s in running) + 1
        # Rows that are not decoding ride along with a dummy token. A free row writes it at position 0;
        # a busy one at its own pos, which nobody reads before the row's next real write replaces it.
        tokens, pos = [0] * B, [0] * B
        for s in self._slots[:B]:
            if s is not None:
                tokens[s.slot], pos[s.slot] = (s.pending if s.state == _DECODE else 0), s.pos
        if self.adapters is not None:  # multi-LoRA hook: each decoding row's adapter (other rows: the base)
            by_slot = {s.slot: s.handle.request.adapter for s in running}
            self.adapters.select([by_slot.get(i) for i in range(B)])
        tokens_t = torch.tensor(tokens, device=self.device)
        pos_t = torch.tensor(pos, device=self.device)
        if self._mirror is not None:
            self._mirror.decode(tokens, pos)
        if self._compiled is not None:
            logits = self._compiled(tokens_t, pos_t)  # (max_batch, V)
        else:
            model = self.model if self.decode_choice is None else self.decode_choice.pick(B)
            logits = decode_step(model, tokens_t, pos_t, self.cache)  # (B, V)
        rows = torch.tensor([s.slot for s in running], device=self.device)
        for s in running:  # the pending token's keys/values are in: pos + 1 positions done
            s.pos += 1
            self._commit(s)
            s.pos -= 1
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
        requests = [s.handle.request for s in seqs]
        chosen = pick_tokens(logits, requests, [s.generator for s in seqs])
        lps = token_logprobs(raw, requests, chosen)

        generated, now = 0, self._clock()
        for i, (s, t) in enumerate(zip(seqs, chosen)):
            lp, alts = lps.get(i, (None, None))
            generated += self._deliver(s, t, lp, alts, now)
        with self._cond:
            self._metrics.generation_tokens_total += generated
