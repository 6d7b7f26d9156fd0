"""The generation loop: one batched prefill, then one forward per step for the whole batch.

Design trade-off: ragged prompts are right-padded and prefilled together in a single
forward (one large matmul per layer, instead of Meta's loop that prefills only the shortest
prompt and teacher-forces the longer ones token by token). The padding is harmless: every row
then decodes at its *own* position, so a short row's first new token overwrites its first pad
slot, and the model's position mask hides the pad slots beyond a row's position until they are
overwritten in turn. Rows that finish early stay in the batch (their outputs are ignored and
they keep re-writing one slot) rather than being compacted out of the cache, which would copy
every layer's buffers; a serving engine should refill such rows with new requests instead.

Only token ids cross this module's boundary. Text appears only in `stream_text`, which needs a
tokenizer with `decode_single_token_bytes` (see `herd.tokenizer`).
"""

from __future__ import annotations

from collections.abc import Collection, Generator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import torch

from herd.generate.compiled import CompiledDecoder
from herd.generate.kv_cache import KVCache
from herd.generate.processors import LogitsProcessor, ProcessorFactory, accept_token, apply_processors
from herd.generate.sampling import SamplingParams, sample
from herd.model.llama import Transformer

FinishReason = Literal["stop", "length"]


@dataclass
class GenerationResult:
    """The outcome for one prompt.

    tokens: the new tokens, without the stop token.
    finish_reason: "stop" (a stop token was sampled) or "length" (max_new_tokens reached, or
        the model's max_seq_len: prompt + new tokens never exceed it).
    stop_token: which stop token ended the row (e.g. eot vs eom tells a finished answer from a
        tool call), None for "length".
    logprobs: with logprobs=True, log p(token | everything before it) under the model's raw
        logits (before temperature / top-p, as Meta reports them), one per entry of `tokens`.
    prompt_tokens / prompt_logprobs: with echo=True, the prompt; with echo and logprobs, each
        prompt token's log-probability given the tokens before it. The first prompt token has
        no prefix and gets None (Meta writes 0.0 there).
    """

    tokens: list[int]
    finish_reason: FinishReason
    stop_token: int | None = None
    logprobs: list[float] | None = None
    prompt_tokens: list[int] | None = None
    prompt_logprobs: list[float | None] | None = None


@dataclass
class StepEvent:
    """What one decode step produced, row by row (rows are in prompt order).

    tokens[i] is row i's new token, or None when the row produced none: it had already
    finished, or it sampled a stop token at this step. Concatenating a row's non-None tokens
    therefore gives exactly `GenerationResult.tokens`.
    finish_reasons[i] is set on the step at which row i finishes, else None.
    """

    step: int
    tokens: list[int | None]
    finish_reasons: list[FinishReason | None]
    logprobs: list[float | None] | None = None


@dataclass
class TextEvent:
    """`StepEvent` in text: texts[i] is the text row i completed at this step (often "")."""

    step: int
    texts: list[str]
    finish_reasons: list[FinishReason | None]


# ---- the two forward shapes ---------------------------------------------------------------


def pad_prompts(prompts: Sequence[Sequence[int]], *, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest prompt: (tokens (B, S) int64, lengths (B,) int64).

    The pad id is 0; any id works because a row never attends to its pad slots (see module doc).
    """
    lengths = [len(p) for p in prompts]
    tokens = torch.zeros(len(prompts), max(lengths), dtype=torch.long)  # (B, S)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = torch.tensor(p, dtype=torch.long)
    return tokens.to(device), torch.tensor(lengths, dtype=torch.long, device=device)


@torch.inference_mode()
def prefill(model: Transformer, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Write right-padded prompts (B, S) into cache slots 0..S-1; return hidden states (B, S, dim).

    Row i's next-token logits are `model.output(h[i, length_i - 1])`; its first decode step
    must then use position length_i.
    """
    return model.hidden(tokens, pos=0, cache=cache)  # (B, S, dim)


@torch.inference_mode()
def decode_step(model: Transformer, tokens: torch.Tensor, pos: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Feed one token per row, tokens (B,) at positions pos (B,); return fp32 logits (B, V)."""
    h = model.hidden(tokens.view(-1, 1), pos=pos.view(-1, 1), cache=cache)  # (B, 1, dim)
    return model.output(h[:, -1]).float()  # (B, V)


def _token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits)[target] without keeping a log_softmax copy of the logits: (...) fp32."""
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


# ---- the loop ------------------------------------------------------------------------------


def _check_prompts(prompts: Sequence[Sequence[int]], *, vocab_size: int, max_seq_len: int) -> None:
    if len(prompts) == 0:
        raise ValueError("prompts is empty; pass a list of token-id lists, e.g. [tokenizer.encode(s, bos=True, eos=False)]")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty; every prompt needs at least one token (usually BOS)")
        if len(p) >= max_seq_len:
            raise ValueError(
                f"prompt {i} has {len(p)} tokens but the model's max_seq_len is {max_seq_len}, which leaves "
                f"no room for a new token; shorten the prompt to at most {max_seq_len - 1} tokens"
            )
        lo, hi = min(p), max(p)
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"prompt {i} has token ids outside the vocabulary 0..{vocab_size - 1} (min {lo}, max {hi})")


def generate_tokens(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    sampling: SamplingParams = SamplingParams(),
    stop_tokens: Collection[int] = (),
    logprobs: bool = False,
    echo: bool = False,
    cache: KVCache | None = None,
    compile: bool = False,
    logits_processors: Sequence[ProcessorFactory] = (),
) -> Generator[StepEvent, None, list[GenerationResult]]:
    """Generate for a batch of prompts, yielding a `StepEvent` per step.

    The generator's return value (`StopIteration.value`, or `results = yield from ...`) is one
    `GenerationResult` per prompt; `generate` runs the loop and returns just that.

    max_new_tokens: per row; a row also stops when prompt + new tokens reach the model's
        max_seq_len (finish_reason "length").
    stop_tokens: ids that end a row (Llama 3 chat: `tokenizer.stop_tokens`, i.e. eot and eom;
        base models: eos). Empty: run to the length limit.
    cache: reuse a preallocated cache (batch_size >= len(prompts), long enough for the longest
        prompt + max_new_tokens, in the model's dtype); no reset is needed because each slot a
        row can see is written by this call before it is read. Default: a fresh cache of
        exactly the needed size. (There is no cache_dtype option: attention takes the cached
        keys as they are, and SDPA needs them in the query's dtype.)
    compile: decode with a `torch.compile`d fixed-shape step (`herd.generate.compiled`). Opt-in:
        it pays off on GPUs, while on CPU eager was faster in our measurements. The graph is
        specialised to the cache's shape, so pass the same `cache=` to reuse it across calls.
    logits_processors: factories called once per row, whose processors rewrite that row's logits
        before its token is drawn (a grammar mask, `herd.generate.grammar`); the contract is
        `herd.generate.processors`'s, as in the serving engine. Logprobs stay the raw model's.
    """
    args = model.args
    _check_prompts(prompts, vocab_size=args.vocab_size, max_seq_len=args.max_seq_len)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    weight = model.tok_embeddings.weight
    device = weight.device
    B = len(prompts)
    lengths_list = [len(p) for p in prompts]
    # Per-row budget: prompt + new tokens stay within the RoPE table / context length.
    limits = [min(max_new_tokens, args.max_seq_len - n) for n in lengths_list]
    total_len = max(n + lim for n, lim in zip(lengths_list, limits))

    if cache is None:
        cache = KVCache(args, batch_size=B, max_seq_len=total_len, device=device, dtype=weight.dtype)
    else:
        if cache.k[0].dtype != weight.dtype or cache.k[0].device != device:
            raise ValueError(
                f"the given KVCache is {cache.k[0].dtype} on {cache.k[0].device} but the model is {weight.dtype} "
                f"on {device}; build the cache with dtype= and device= matching the model"
            )
        if cache.batch_size < B or cache.max_seq_len < total_len:
            raise ValueError(
                f"the given KVCache holds {cache.batch_size} rows x {cache.max_seq_len} positions but this call "
                f"needs {B} x {total_len}; allocate a larger cache or lower max_new_tokens"
            )
    # Checks and allocation happen here, at the call; the loop runs lazily as events are pulled.
    return _generation_loop(
        model, prompts, limits=limits, cache=cache, sampling=sampling, stop_ids=set(stop_tokens),
        logprobs=logprobs, echo=echo, compile=compile,
        processors=[[make() for make in logits_processors] for _ in prompts],
    )


@torch.inference_mode()
def _generation_loop(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    *,
    limits: list[int],
    cache: KVCache,
    sampling: SamplingParams,
    stop_ids: set[int],
    logprobs: bool,
    echo: bool,
    compile: bool = False,
    processors: list[list[LogitsProcessor]],
) -> Generator[StepEvent, None, list[GenerationResult]]:
    device = model.tok_embeddings.weight.device
    B = len(prompts)
    generator = None if sampling.greedy else sampling.make_generator(device)
    decode = CompiledDecoder(model, cache) if compile else partial(decode_step, model, cache=cache)
    tokens, lengths = pad_prompts(prompts, device=device)  # (B, S), (B,)
    h = prefill(model, tokens, cache)  # (B, S, dim)
    rows = torch.arange(B, device=device)
    prompt_lp: list[list[float]] | None = None
    if echo and logprobs:
        all_logits = model.output(h).float()  # (B, S, V)
        logits = all_logits[rows, lengths - 1]  # (B, V)
        # Position t predicts token t + 1; pad positions are scored too and cut off below.
        prompt_lp = _token_logprobs(all_logits[:, :-1], tokens[:, 1:]).tolist()  # (B, S - 1)
        del all_logits
    else:
        # Only each row's last prompt position is needed: skip the (B, S, V) head matmul.
        logits = model.output(h[rows, lengths - 1]).float()  # (B, V)
    del h

    new: list[list[int]] = [[] for _ in range(B)]
    new_lp: list[list[float]] = [[] for _ in range(B)]
    finish: list[FinishReason | None] = [None] * B
    stopped_by: list[int | None] = [None] * B
    pos = [len(p) for p in prompts]  # where each row's next fed token goes

    for step in range(max(limits)):
        raw = logits
        if processors[0]:  # every row has the same factories
            logits = logits.clone()  # (B, V); logprobs stay those of `raw`
            for i in range(B):
                if finish[i] is None:
                    logits[i] = apply_processors(processors[i], logits[i], new[i])
        next_tok = sample(logits, sampling, generator)  # (B,)
        tok_list = next_tok.tolist()  # a host sync per step: stop checks and streaming need the ids
        logits = raw
        lp_list = _token_logprobs(logits, next_tok).tolist() if logprobs else None
        ev_tokens: list[int | None] = [None] * B
        ev_finish: list[FinishReason | None] = [None] * B
        ev_lp: list[float | None] | None = [None] * B if logprobs else None
        for i, t in enumerate(tok_list):
            if finish[i] is not None:
                continue
            accept_token(processors[i], t)
            if t in stop_ids:
                finish[i] = ev_finish[i] = "stop"
                stopped_by[i] = t
                continue
            new[i].append(t)
            ev_tokens[i] = t
            if lp_list is not None:
                new_lp[i].append(lp_list[i])
                ev_lp[i] = lp_list[i]
            if len(new[i]) == limits[i]:
                finish[i] = ev_finish[i] = "length"
        yield StepEvent(step=step, tokens=ev_tokens, finish_reasons=ev_finish, logprobs=ev_lp)
        if all(f is not None for f in finish):
            break
        # Finished rows are fed too (one forward for the whole batch) at their frozen position,
        # which stays inside the cache: pos <= length + limit - 1 < total_len.
        logits = decode(next_tok, torch.tensor(pos, device=device))  # (B, V)
        pos = [p + (f is None) for p, f in zip(pos, finish)]

    results = []
    for i, prompt in enumerate(prompts):
        assert finish[i] is not None, "every row finishes within max(limits) steps"
        result = GenerationResult(
            tokens=new[i], finish_reason=finish[i], stop_token=stopped_by[i], logprobs=new_lp[i] if logprobs else None
        )
        if echo:
            result.prompt_tokens = list(prompt)
            if prompt_lp is not None:
                result.prompt_logprobs = [None, *prompt_lp[i][: len(prompt) - 1]]
        results.append(result)
    return results


def generate(model: Transformer, prompts: Sequence[Sequence[int]], **kwargs: Any) -> list[GenerationResult]:
    """Run `generate_tokens` to the end and return one `GenerationResult` per prompt."""
    events = generate_tokens(model, prompts, **kwargs)
    while True:
        try:
            next(events)
        except StopIteration as done:
            return done.value


def stream_text(
    model: Transformer,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    *,
    stop_tokens: Collection[int] | None = None,
    **kwargs: Any,
) -> Generator[TextEvent, None, list[GenerationResult]]:
    """Like `generate_tokens`, but each step's new tokens as text, never splitting a UTF-8 character.

    tokenizer: needs `decode_single_token_bytes` (and `stop_tokens` when stop_tokens is None).
    Per row, the concatenated texts equal `tokenizer.decode(result.tokens)`; bytes of an
    unfinished character are held until a later token completes it, and flushed (as U+FFFD,
    like `decode`) when the row ends. Returns the `GenerationResult`s like `generate_tokens`.
    """
    # Imported here, not at the top: token-level generation must not depend on the tokenizer.
    from herd.tokenizer import StreamDecoder

    if stop_tokens is None:
        stop_tokens = tokenizer.stop_tokens
    events = generate_tokens(model, prompts, stop_tokens=stop_tokens, **kwargs)  # checks inputs now
    return _texts(events, [StreamDecoder(tokenizer) for _ in prompts])


def _texts(
    events: Generator[StepEvent, None, list[GenerationResult]], decoders: list[Any]
) -> Generator[TextEvent, None, list[GenerationResult]]:
    while True:
        try:
            event = next(events)
        except StopIteration as done:
            return done.value
        texts = []
        for decoder, token, reason in zip(decoders, event.tokens, event.finish_reasons):
            text = decoder.feed(token) if token is not None else ""
            if reason is not None:
                text += decoder.flush()
            texts.append(text)
        yield TextEvent(step=event.step, texts=texts, finish_reasons=event.finish_reasons)
