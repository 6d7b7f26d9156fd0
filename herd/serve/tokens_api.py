"""vLLM's `/tokenize` and `/detokenize`, as data: parse a request, answer it.

Shapes as vLLM serves them: tokenize takes `prompt` (with `add_special_tokens`, default true:
the tokenizer's BOS) or `messages` (the chat format applied, `add_generation_prompt` default
true; `add_special_tokens` default false, since the chat format brings its own BOS) and answers
`{"count", "max_model_len", "tokens"}` (plus `token_strs` when `return_token_strs` is true);
detokenize takes `tokens` and answers `{"prompt"}`. Errors are the OpenAI-style 400s of
`protocol.APIError`.
"""

from __future__ import annotations

from typing import Any

from herd.serve.fields import APIError, _get, _type_name
from herd.serve.protocol import chat_prompt, parse_chat_request, token_text
from herd.tokenizer import ChatFormat, ChatTemplate, Tokenizer


def tokenize(body: Any, tokenizer: Tokenizer, fmt: ChatFormat | ChatTemplate | None, *, max_model_len: int
             ) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {_type_name(body)}")
    has_prompt, has_messages = body.get("prompt") is not None, body.get("messages") is not None
    if has_prompt == has_messages:
        raise APIError(400, "give exactly one of 'prompt' (a string) or 'messages' (a chat)", param="prompt")
    if has_prompt:
        prompt = _get(body, "prompt", "string")
        special = _get(body, "add_special_tokens", "boolean", True)
        tokens = tokenizer.encode(prompt, bos=special and tokenizer.add_bos, eos=False)
    else:
        generation = _get(body, "add_generation_prompt", "boolean", True)
        special = _get(body, "add_special_tokens", "boolean", False)
        chat = parse_chat_request({"messages": body["messages"], "tools": body.get("tools")}, max_n=1)
        tokens = chat_prompt(fmt, chat, add_generation_prompt=generation)
        if special and tokenizer.add_bos and tokenizer.bos_id is not None and tokens[:1] != [tokenizer.bos_id]:
            tokens = [tokenizer.bos_id, *tokens]
    out: dict[str, Any] = {"count": len(tokens), "max_model_len": max_model_len, "tokens": tokens}
    if _get(body, "return_token_strs", "boolean", False):
        out["token_strs"] = [token_text(tokenizer, t) for t in tokens]
    return out


def detokenize(body: Any, tokenizer: Tokenizer) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {_type_name(body)}")
    tokens = _get(body, "tokens", "array", required=True)
    if any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < tokenizer.n_words for t in tokens):
        raise APIError(400, f"'tokens' must be token ids, integers in 0..{tokenizer.n_words - 1}", param="tokens")
    return {"prompt": tokenizer.decode(tokens)}


def tokenizer_info(tokenizer: Tokenizer, fmt: ChatFormat | ChatTemplate | None, *, max_model_len: int
                   ) -> dict[str, Any]:
    """vLLM's `/tokenizer_info`: the special tokens' text and the chat template, which lm-eval's
    `local-completions` reads to use this server's `/tokenize` instead of a local tokenizer."""

    def text(token: int | None) -> str | None:
        return None if token is None else token_text(tokenizer, token)

    return {"tokenizer_class": type(tokenizer).__name__, "bos_token": text(tokenizer.bos_id),
            "eos_token": text(tokenizer.eos_id), "pad_token": text(getattr(tokenizer, "pad_id", None)),
            "model_max_length": max_model_len, "add_bos_token": bool(tokenizer.add_bos),
            "chat_template": fmt.template if isinstance(fmt, ChatTemplate) else None}
