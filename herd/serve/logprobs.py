"""Logprobs in the OpenAI shapes: chat's `content` list, the legacy completions format, and echoed
prompts in the latter (`echo: true` with `logprobs`).

The engine scores the prompt at prefill (`Request.prompt_logprobs`); this shapes those scores
as OpenAI and vLLM return them, so a harness that scores continuations through the API
(lm-eval's `local-completions`: prompt = context + continuation, `max_tokens: 0`, `echo: true`,
`logprobs: 1`) reads them where it expects them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from herd.serve.requests import Choice, PromptLogprob
from herd.tokenizer import Tokenizer


def token_text(tokenizer: Tokenizer, token: int) -> str:
    """A token's own text for logprobs (a partial UTF-8 character shows as U+FFFD, as OpenAI's does)."""
    return tokenizer.decode_single_token_bytes(token).decode("utf-8", errors="replace")


def chat_logprobs(tokenizer: Tokenizer, choice: Choice, start: int = 0) -> dict[str, Any] | None:
    """`{"content": [...]}` for the choice's tokens from `start` on (OpenAI chat format)."""
    if choice.logprobs is None:
        return None
    content = []
    for j in range(start, len(choice.tokens)):
        t = choice.tokens[j]
        entry: dict[str, Any] = {"token": token_text(tokenizer, t), "logprob": choice.logprobs[j],
                                 "bytes": list(tokenizer.decode_single_token_bytes(t)), "top_logprobs": []}
        if choice.top_logprobs is not None:
            entry["top_logprobs"] = [
                {"token": token_text(tokenizer, a), "logprob": lp, "bytes": list(tokenizer.decode_single_token_bytes(a))}
                for a, lp in choice.top_logprobs[j]
            ]
        content.append(entry)
    return {"content": content}


def completion_logprobs(tokenizer: Tokenizer, choice: Choice, start: int = 0, offset: int = 0,
                        special_ids: frozenset[int] = frozenset()) -> dict[str, Any] | None:
    """The legacy completions format: tokens, token_logprobs, top_logprobs, text_offset.
    `special_ids`: tokens the response text leaves out, so they take no room in text_offset."""
    if choice.logprobs is None:
        return None
    tokens, offsets = [], []
    for t in choice.tokens[start:]:
        tokens.append(token_text(tokenizer, t))
        offsets.append(offset)
        offset += 0 if t in special_ids else len(tokens[-1])
    top = None
    if choice.top_logprobs is not None:
        top = [{token_text(tokenizer, a): lp for a, lp in alts} for alts in choice.top_logprobs[start:]]
    return {"tokens": tokens, "token_logprobs": choice.logprobs[start:], "top_logprobs": top, "text_offset": offsets}


def echo_logprobs(tokenizer: Tokenizer, prompt: Sequence[int], entries: Sequence[PromptLogprob],
                  special_ids: frozenset[int] = frozenset()) -> tuple[dict[str, Any], int]:
    """The prompt's part of an echoed completion's legacy logprobs, and the text_offset where the
    completion's tokens continue. The first token's logprob and top_logprobs are null (nothing
    precedes it), as OpenAI and vLLM answer. Offsets start at 0 and run over the tokens' own
    texts, special tokens (left out of the echoed text, e.g. BOS) taking no room."""
    tokens, offsets, offset = [], [], 0
    for t in prompt:
        tokens.append(token_text(tokenizer, t))
        offsets.append(offset)
        offset += 0 if t in special_ids else len(tokens[-1])
    top = None
    if any(e.top_logprobs is not None for e in entries):
        top = [None if e.top_logprobs is None else {token_text(tokenizer, a): lp for a, lp in e.top_logprobs}
               for e in entries]
    return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries], "top_logprobs": top,
            "text_offset": offsets}, offset


def join_logprobs(first: dict[str, Any], then: dict[str, Any] | None) -> dict[str, Any]:
    """Two legacy logprobs objects one after the other (the echoed prompt's, then the completion's)."""
    if then is None:
        return first
    top = None
    if first["top_logprobs"] is not None or then["top_logprobs"] is not None:
        top = (first["top_logprobs"] or [None] * len(first["tokens"])) + (then["top_logprobs"] or
                                                                            [None] * len(then["tokens"]))
    return {"tokens": first["tokens"] + then["tokens"], "token_logprobs": first["token_logprobs"] +
            then["token_logprobs"], "top_logprobs": top, "text_offset": first["text_offset"] + then["text_offset"]}
