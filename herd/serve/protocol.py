"""The OpenAI API as data: request validation, chat prompts with tools, text with stop strings, responses.

No HTTP here (that is `server.py`), so every rule of the protocol is testable as a plain
function. The conventions followed are OpenAI's as vLLM and llama.cpp implement them
(`research/inference.md` section 4): nested `{"error": {...}}` bodies, `data: [DONE]`,
`stream_options.include_usage`, `content: null` beside `tool_calls`.

Trade-offs:
* Sampling defaults are the API's (temperature 1, top_p 1), not Meta's 0.6 / 0.9: a client
  written for the OpenAI API gets the behaviour it was written for.
* Unknown fields are ignored (clients send `user`, `metadata`, ...), but a known field of the
  wrong type is a 400, and so is a feature we do not implement (`suffix`, echo in chat), rather
  than silently generating something else. `response_format` and a forced `tool_choice` are
  enforced by a grammar (`herd.serve.grammar`).
* vLLM's extra body fields `top_k` (-1 or 0: no limit), `min_p`, `repetition_penalty` and
  `ignore_eos` (also llama.cpp's: generate through end-of-turn tokens, for fixed-length benchmarks) are
  accepted; penalties and `logit_bias` run as logits processors (`herd.generate.penalties`).
* Tools follow the Llama 3.1 JSON tool-calling format: their definitions go into the system
  prompt with the instruction to answer with `{"name": ..., "parameters": ...}`; a reply is
  parsed with `ChatFormat.decode_assistant_message`, which also reads the function-tag and
  pythonic-list formats and `<|python_tag|>` calls.
* Special tokens (ids of the tokenizer's special set) are left out of the text, as vLLM's
  `skip_special_tokens` default does; they still count in usage and logprobs.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from herd.generate import SamplingParams
from herd.generate.penalties import NO_PENALTIES, Penalties
# The logprobs shapes moved to logprobs.py; re-exported so `from herd.serve.protocol import ...` keeps working.
from herd.serve.logprobs import chat_logprobs, completion_logprobs, token_text  # noqa: F401
# So are the error type and the typed field readers, moved to fields.py (tokens_api.py shares them).
from herd.serve.fields import APIError, _get, _in_range, _type_name  # noqa: F401
from herd.serve.images import ImageError, split_image_parts
from herd.serve.requests import MAX_TOP_LOGPROBS, Choice
from herd.tokenizer import ChatFormat, ChatTemplate, Message, StreamDecoder, Tokenizer, ToolCall, llama31_system_prompt

# Stop strings are the client's to choose, and the server pays for them on every generated
# character of every choice (`StopFilter`, on the event loop) and every token's bytes (the
# engine's match, on the engine thread), so both their number and their length are capped.
# OpenAI takes at most 4; 16 leaves room for clients written for vLLM or llama.cpp (no limit
# there) that pass a model's several end-of-turn markers. Real stop strings are markers such as
# "\n\n", "User:" or a turn header, tens of characters at most; 1,000 characters is far beyond
# any of them, and keeps the per-request tables (16 x 1,000 entries) and the engine's per-token
# byte search (C speed over at most 16 x 4,000 bytes) small.
MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 1000  # characters per stop string


# ---- requests ----------------------------------------------------------------------------------------


@dataclass
class CommonParams:
    """The fields both endpoints share, validated. max_tokens None: up to the end of the context."""

    model: str | None
    max_tokens: int | None
    sampling: SamplingParams
    n: int
    stop: list[str]
    stream: bool
    include_usage: bool
    logprobs: bool
    top_logprobs: int
    response_format: JsonFormat | None = None
    penalties: Penalties = NO_PENALTIES
    echo: bool = False  # completions only: the prompt comes back in front of the text (and its logprobs)
    ignore_eos: bool = False  # the tokenizer's stop tokens do not end a choice (stop strings still do)


@dataclass
class JsonFormat:
    """`response_format` json_object / json_schema: the reply is JSON that validates against `schema`.
    strict: refuse schema keywords the grammar cannot enforce (False: ignore them, best effort)."""

    schema: dict | bool
    strict: bool = False
    name: str | None = None


@dataclass
class ChatRequest:
    params: CommonParams
    messages: list[Message]
    tools: list[dict] = field(default_factory=list)  # the "function" objects of the tools
    forced_tool: str | None = None  # tool_choice "required" (any tool: "") or the one function named
    images: list[str] = field(default_factory=list)  # image_url URLs, in the order of the IMAGE slots


@dataclass
class CompletionRequest:
    params: CommonParams
    prompts: list[str | list[int]]


_UNSUPPORTED_IF_SET = {"suffix": "", "functions": [], "function_call": "none"}


def _penalties(body: dict) -> Penalties:
    penalties = {name: float(_get(body, name, "number", 0.0)) for name in ("frequency_penalty", "presence_penalty")}
    for name, value in penalties.items():
        _in_range(name, value, -2.0, 2.0)
    repetition = float(_get(body, "repetition_penalty", "number", 1.0))
    if repetition <= 0:
        raise APIError(400, f"'repetition_penalty' must be > 0 (1 = off), got {repetition}", param="repetition_penalty")
    bias: dict[int, float] = {}
    for key, value in _get(body, "logit_bias", "object", {}).items():  # JSON keys are strings: {"50256": -100}
        problem = None if key.isascii() and key.isdigit() else "its key must be a token id written as a string"
        if problem is None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                or not -100 <= value <= 100):  # NaN fails the range too
            problem = f"its value must be a number in [-100, 100], got {value!r}"
        if problem:
            raise APIError(400, f"invalid entry {key!r} in 'logit_bias': {problem}", param="logit_bias")
        bias[int(key)] = float(value)
    return Penalties(penalties["frequency_penalty"], penalties["presence_penalty"], repetition, bias)


def check_logit_bias(penalties: Penalties, vocab_size: int) -> None:
    """A 400 for `logit_bias` ids outside the model's vocabulary (the parser does not know it)."""
    bad = [t for t in penalties.logit_bias if t >= vocab_size]
    if bad:
        raise APIError(400, f"'logit_bias' has token id {bad[0]}, outside this model's vocabulary (0..{vocab_size - 1})",
                       param="logit_bias")


def _common(body: dict, *, max_n: int, chat: bool) -> CommonParams:
    unsupported = {**_UNSUPPORTED_IF_SET, "echo": False} if chat else _UNSUPPORTED_IF_SET
    for name, neutral in unsupported.items():
        if body.get(name) not in (None, neutral):
            raise APIError(400, f"'{name}' is not supported by this server", param=name)
    response_format = _response_format(_get(body, "response_format", "object"))
    model = _get(body, "model", "string")
    max_tokens = _get(body, "max_completion_tokens", "integer") if chat else None
    if max_tokens is None:
        max_tokens = _get(body, "max_tokens", "integer")
    if max_tokens is not None and max_tokens < (1 if chat else 0):
        raise APIError(400, f"'max_tokens' must be >= {1 if chat else 0}, got {max_tokens}", param="max_tokens")
    temperature = float(_get(body, "temperature", "number", 1.0))
    _in_range("temperature", temperature, 0.0, 2.0)
    top_p = float(_get(body, "top_p", "number", 1.0))
    _in_range("top_p", top_p, 0.0, 1.0, lo_open=True)
    # Completions take max_tokens 0: scoring a prompt with echo + logprobs (lm-eval does).
    top_k = _get(body, "top_k", "integer", -1)
    if top_k < -1:
        raise APIError(400, f"'top_k' must be -1 or 0 (no limit) or >= 1, got {top_k}", param="top_k")
    min_p = float(_get(body, "min_p", "number", 0.0))
    _in_range("min_p", min_p, 0.0, 1.0)
    n = _get(body, "n", "integer", 1)
    _in_range("n", n, 1, max_n)
    best_of = _get(body, "best_of", "integer")
    if best_of is not None and best_of != n:
        raise APIError(400, "'best_of' other than n is not supported", param="best_of")
    seed = _get(body, "seed", "integer")
    if seed is not None:
        _in_range("seed", seed, 0, 2**63 - 1 - max_n)
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise APIError(400, "'stop' must be a string or an array of strings", param="stop")
    if len(stop) > MAX_STOP_STRINGS:
        raise APIError(400, f"'stop' takes at most {MAX_STOP_STRINGS} strings, got {len(stop)}", param="stop")
    if any(not 0 < len(s) <= MAX_STOP_LENGTH for s in stop):
        raise APIError(400, f"each 'stop' string must have 1 to {MAX_STOP_LENGTH} characters", param="stop")
    stream = _get(body, "stream", "boolean", False)
    options = _get(body, "stream_options", "object")
    if options is not None and not stream:
        raise APIError(400, "'stream_options' is only allowed when 'stream' is true", param="stream_options")
    include_usage = bool(_get(options or {}, "include_usage", "boolean", False))
    if chat:
        logprobs = _get(body, "logprobs", "boolean", False)
        top = _get(body, "top_logprobs", "integer", 0)
        if top and not logprobs:
            raise APIError(400, "'top_logprobs' requires 'logprobs' to be true", param="top_logprobs")
    else:  # completions: logprobs is the number of alternatives, and asks for the chosen tokens' too
        top = _get(body, "logprobs", "integer")
        logprobs = top is not None
        top = top or 0
    _in_range("top_logprobs" if chat else "logprobs", top, 0, MAX_TOP_LOGPROBS)
    sampling = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k if top_k > 0 else None, seed=seed,
                              min_p=min_p or None)
    echo = False if chat else _get(body, "echo", "boolean", False)
    ignore_eos = _get(body, "ignore_eos", "boolean", False)
    return CommonParams(model, max_tokens, sampling, n, stop, stream, include_usage, logprobs, top, response_format,
                        _penalties(body), echo, ignore_eos)


def _response_format(fmt: dict | None) -> JsonFormat | None:
    kind = (fmt or {}).get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return JsonFormat({"type": "object"})
    if kind != "json_schema":
        raise APIError(400, f"response_format type {kind!r} is not one of 'text', 'json_object', 'json_schema'",
                       param="response_format")
    spec = fmt.get("json_schema")
    schema = spec.get("schema", {}) if isinstance(spec, dict) else None  # absent: any JSON value, as OpenAI reads it
    if not (isinstance(spec, dict) and isinstance(spec.get("name"), str) and isinstance(schema, (dict, bool))
            and isinstance(spec.get("strict", False), (bool, type(None)))):
        raise APIError(400, "response_format json_schema needs 'json_schema': {'name': string, 'schema': object, "
                       "'strict': boolean}", param="response_format")
    return JsonFormat(schema, strict=bool(spec.get("strict")), name=spec["name"])


def _text_content(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise APIError(400, f"{where}: only text content parts ({{'type': 'text', 'text': ...}}) are supported",
                               param="messages")
            parts.append(part["text"])
        return "".join(parts)
    raise APIError(400, f"{where}: content must be a string or an array of text parts", param="messages")


def _tool_call_in(raw: Any, where: str) -> ToolCall:
    fn = raw.get("function") if isinstance(raw, dict) else None
    if not (isinstance(fn, dict) and isinstance(fn.get("name"), str) and isinstance(fn.get("arguments"), str)):
        raise APIError(400, f"{where}: a tool call needs function.name and function.arguments (a JSON string)",
                       param="messages")
    try:
        arguments = json.loads(fn["arguments"])
    except json.JSONDecodeError as e:
        raise APIError(400, f"{where}: function.arguments is not valid JSON: {e}", param="messages") from e
    if not isinstance(arguments, dict):
        raise APIError(400, f"{where}: function.arguments must encode a JSON object", param="messages")
    return ToolCall(fn["name"], arguments, call_id=raw.get("id"))


def parse_chat_request(body: Any, *, max_n: int) -> ChatRequest:
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {_type_name(body)}")
    params = _common(body, max_n=max_n, chat=True)
    raw_messages = _get(body, "messages", "array", required=True)
    if not raw_messages:
        raise APIError(400, "'messages' must not be empty", param="messages")
    messages, images = [], []
    for i, raw in enumerate(raw_messages):
        where = f"messages[{i}]"
        if not isinstance(raw, dict):
            raise APIError(400, f"{where} must be an object", param="messages")
        role = raw.get("role")
        if role not in ("system", "developer", "user", "assistant", "tool"):
            raise APIError(400, f"{where}: unknown role {role!r}; use system, user, assistant or tool", param="messages")
        content = raw.get("content")
        calls = []
        if role == "assistant" and raw.get("tool_calls"):
            if not isinstance(raw["tool_calls"], list):
                raise APIError(400, f"{where}: tool_calls must be an array", param="messages")
            calls = [_tool_call_in(c, where) for c in raw["tool_calls"]]
        if isinstance(content, list) and any(isinstance(p, dict) and p.get("type") == "image_url" for p in content):
            if role != "user":
                raise APIError(400, f"{where}: only user messages may hold images", param="messages")
            try:
                parts, urls = split_image_parts(content, where)
            except ImageError as e:
                raise APIError(400, str(e), param="messages") from None
            messages.append(Message(role="user", content=parts))
            images += urls
            continue
        text = "" if content is None and calls else _text_content(content, where)
        messages.append(Message(role="system" if role == "developer" else role, content=text, tool_calls=calls))
    tools = []
    raw_tools = _get(body, "tools", "array", [])
    for i, tool in enumerate(raw_tools):
        fn = tool.get("function") if isinstance(tool, dict) and tool.get("type", "function") == "function" else None
        if not (isinstance(fn, dict) and isinstance(fn.get("name"), str) and fn["name"]):
            raise APIError(400, f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ...}}}}", param="tools")
        tools.append(fn)
    choice, forced = body.get("tool_choice"), None
    if isinstance(choice, dict):
        forced = choice.get("function", {}).get("name") if isinstance(choice.get("function"), dict) else None
        if not isinstance(forced, str) or not forced:
            raise APIError(400, "tool_choice must name a function: {'type': 'function', 'function': {'name': ...}}",
                           param="tool_choice")
    if choice == "required" or forced:
        forced = forced or ""
        if not tools or (forced and forced not in {t["name"] for t in tools}):
            raise APIError(400, f"tool_choice asks for {f'the function {forced!r}' if forced else 'a tool call'} but "
                           "'tools' does not declare it", param="tool_choice")
    elif choice not in (None, "auto", "none"):
        raise APIError(400, "tool_choice must be 'auto', 'none', 'required' or {'type': 'function', 'function': "
                       "{'name': ...}}", param="tool_choice")
    if choice == "none":
        tools = []
    return ChatRequest(params, messages, tools, forced, images)


def parse_completion_request(body: Any, *, max_n: int) -> CompletionRequest:
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {_type_name(body)}")
    params = _common(body, max_n=max_n, chat=False)
    prompt = body.get("prompt")
    # str | list[str] | list[int] | list[list[int]], as OpenAI accepts.
    if isinstance(prompt, str):
        prompts: list[str | list[int]] = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = list(prompt)
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        prompts = [list(prompt)]
    elif (isinstance(prompt, list) and prompt and all(isinstance(p, list) and p for p in prompt)
          and all(isinstance(t, int) and not isinstance(t, bool) for p in prompt for t in p)):
        prompts = [list(p) for p in prompt]
    else:
        raise APIError(400, "'prompt' must be a string, an array of strings, or token ids (an array of integers "
                       "or of integer arrays), and not empty", param="prompt")
    return CompletionRequest(params, prompts)


# ---- prompts ----------------------------------------------------------------------------------------------


def tools_system_prompt(tools: Sequence[dict], instructions: str = "") -> str:
    """The system prompt that offers `tools` (OpenAI function objects) in the Llama 3.1 JSON format."""
    defs = "\n\n".join(json.dumps(t, indent=4) for t in tools)
    text = (
        "You can call functions. To call one, reply with nothing but a JSON object of the form "
        '{"name": function name, "parameters": dictionary of argument name and its value}. '
        "Do not use variables. When a function's result comes back, use it to answer the user's question.\n\n"
        f"These are the functions you can call:\n\n{defs}"
    )
    if instructions:
        text += "\n\n" + instructions
    return llama31_system_prompt(text)


def chat_prompt(fmt: ChatFormat | ChatTemplate | None, request: ChatRequest, *, add_generation_prompt: bool = True
                ) -> list[int]:
    """Token ids of the dialog (with an open assistant header unless told otherwise). Llama 3's format
    folds tools into the system turn; a checkpoint's own template receives them as its `tools` variable."""
    if fmt is None:
        raise APIError(400, "this model declares no chat template and its vocabulary is not Llama 3's, so it has "
                       "no chat format; use /v1/completions with a plain prompt", param="messages")
    messages = list(request.messages)
    if isinstance(fmt, ChatTemplate) and request.images:
        raise APIError(400, "image parts need the Llama 3 chat format (a Llama 3.2 Vision checkpoint with the Llama 3 "
                       "tokenizer); this model's own chat template is not used with images", param="messages")
    if isinstance(fmt, ChatTemplate):
        try:
            return fmt.encode_prompt(messages, tools=request.tools or None,  # no SFT mask: linear time
                                     add_generation_prompt=add_generation_prompt)
        except ValueError as e:
            raise APIError(400, f"cannot render the messages with the model's chat template: {e}",
                           param="messages") from e
    if request.tools:
        system = ""
        if messages and messages[0].role == "system":
            system = messages.pop(0).content
        messages.insert(0, Message(role="system", content=tools_system_prompt(request.tools, system)))
    try:
        return fmt.encode_dialog_prompt(messages, add_generation_prompt=add_generation_prompt).tokens
    except ValueError as e:  # e.g. several JSON tool calls in one assistant turn
        raise APIError(400, f"cannot encode the messages in the Llama {fmt.version} chat format: {e}",
                       param="messages") from e


def completion_prompt(tokenizer: Tokenizer, prompt: str | list[int]) -> list[int]:
    if isinstance(prompt, str):
        return tokenizer.encode(prompt, bos=tokenizer.add_bos, eos=False)
    if any(not 0 <= t < tokenizer.n_words for t in prompt):
        raise APIError(400, f"prompt token ids must be in 0..{tokenizer.n_words - 1}", param="prompt")
    return prompt


def check_length(prompt_len: int, max_tokens: int | None, context: int) -> int:
    """The max_tokens to generate: as asked, or up to the end of the context; a 400 if it cannot fit.
    With max_tokens 0 (scoring a prompt) the prompt may fill the whole context."""
    if max_tokens == 0 and prompt_len <= context:
        return 0
    if prompt_len >= context:
        raise APIError(400, f"the prompt is {prompt_len} tokens but this model's context is {context} tokens; "
                       "shorten the prompt", param="messages", code="context_length_exceeded")
    if max_tokens is None:
        return context - prompt_len
    if prompt_len + max_tokens > context:
        raise APIError(400, f"this model's context is {context} tokens, but {prompt_len + max_tokens} were requested "
                       f"({prompt_len} in the prompt, {max_tokens} for the completion); lower max_tokens",
                       param="max_tokens", code="context_length_exceeded")
    return max_tokens


# ---- output text ------------------------------------------------------------------------------------------


class StopStrings:
    """A request's stop strings, prepared once and shared by its choices' `StopFilter`s: each
    string's KMP failure function (`fail[k-1]`: the longest proper prefix of s[:k] that is also
    its suffix), so that a filter reads each generated character once per string."""

    def __init__(self, stops: Sequence[str]):
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        self.stops = list(stops)
        self.fail = [_failure_function(s) for s in self.stops]

    def __bool__(self) -> bool:
        return bool(self.stops)


def _failure_function(s: str) -> list[int]:
    fail = [0] * len(s)
    k = 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = fail[k - 1]
        if s[i] == s[k]:
            k += 1
        fail[i] = k
    return fail


class StopFilter:
    """Text in, text out: cut before the first stop string, holding back a tail that may still
    grow into one.

    Streaming matching (Knuth-Morris-Pratt): for each stop string the filter keeps the length of
    its longest prefix that the text ends with. A new piece costs amortized O(len(piece)) steps
    per stop string, whatever the strings' lengths; the held-back tail is the largest of those
    lengths; a match can only end inside the new piece, and of the matches ending there the one
    that starts first wins (so "abcd" beats "bc" when both complete in the same piece). The text
    released so far is kept as a list of pieces, joined when `text` is read.
    """

    def __init__(self, stops: Sequence[str] | StopStrings):
        self._stops = stops if isinstance(stops, StopStrings) else StopStrings(stops)
        self._state = [0] * len(self._stops.stops)
        self._released: list[str] = []
        self._held = ""  # text not released yet: a tail that may be the start of a stop string
        self.stopped = False

    @property
    def text(self) -> str:
        """Everything pushed so far, cut at a stop string once one is found."""
        if len(self._released) > 1:
            self._released = ["".join(self._released)]
        return (self._released[0] if self._released else "") + self._held

    def push(self, piece: str, *, final: bool = False) -> str:
        """Text that became final with `piece` ("" while it may still be a stop string's start);
        `final`: the end of the text, release everything (up to a stop string)."""
        if self.stopped:
            return ""
        buf = self._held + piece
        hold = 0
        if self._stops:
            base = len(self._held)  # piece starts at buf[base]; a match never starts before buf[0]
            cut = -1
            for i, (s, fail) in enumerate(zip(self._stops.stops, self._stops.fail)):
                k, n = self._state[i], len(s)
                for j, ch in enumerate(piece):
                    while k and s[k] != ch:
                        k = fail[k - 1]
                    if s[k] == ch:
                        k += 1
                        if k == n:  # s ends at buf[base + j]: its first occurrence, so its earliest start
                            start = base + j + 1 - n
                            if cut < 0 or start < cut:
                                cut = start
                            break
                self._state[i] = k
            if cut >= 0:
                buf, final = buf[:cut], True
                self.stopped = True
            if not final:
                hold = max(self._state)
        out, self._held = buf[: len(buf) - hold], buf[len(buf) - hold :]
        if out:
            self._released.append(out)
        return out


class TextAssembler:
    """One choice's tokens in, text out: complete UTF-8 characters only, special tokens skipped, cut
    before the first stop string, and holding back a tail that may still grow into one."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] | StopStrings, special_ids: frozenset[int]):
        self._decoder = StreamDecoder(tokenizer)
        self._filter = StopFilter(stop)
        self._special = special_ids

    @property
    def text(self) -> str:
        """Everything decoded so far (cut at a stop string once one is found)."""
        return self._filter.text

    @property
    def stopped(self) -> bool:
        return self._filter.stopped

    def feed(self, token: int) -> str:
        """Text that became final with this token ("" while it may still be a stop string's start)."""
        if self.stopped or token in self._special:
            return ""
        return self._filter.push(self._decoder.feed(token))

    def finish(self) -> str:
        """The rest of the text, at the end of the choice."""
        return self._filter.push("" if self.stopped else self._decoder.flush(), final=True)


# ---- tool calls out ----------------------------------------------------------------------------------------


def parse_tool_calls(fmt: ChatFormat | ChatTemplate, choice: Choice) -> list[dict[str, Any]]:
    """OpenAI `tool_calls` for a finished reply, or [] when it is plain text."""
    ids = choice.tokens + ([choice.stop_token] if choice.stop_token is not None else [])
    message = fmt.decode_assistant_message(ids)
    return [
        {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
         "function": {"name": call.name, "arguments": json.dumps(call.arguments)}}
        for call in message.tool_calls
    ]


def may_be_tool_call(tokenizer: Tokenizer, tokens: Sequence[int], special_ids: frozenset[int]) -> bool:
    """Whether a reply that starts with `tokens` could still turn out to be a tool call, so that a
    stream must hold its text back: it starts with <|python_tag|>, '{', '[' or '<' (after spaces)."""
    return ToolCallSniffer(tokenizer, special_ids)(tokens)


class ToolCallSniffer:
    """`may_be_tool_call` asked again after every token of one reply. The leading tokens that
    decode to blanks alone are decoded once, not at every later token: a reply of blanks only
    would otherwise cost a decode of the whole reply per token, quadratic in its length."""

    def __init__(self, tokenizer: Tokenizer, special_ids: frozenset[int]):
        self._tokenizer, self._special = tokenizer, special_ids
        self._blank = 0  # tokens[:_blank] decode to whitespace only (whole characters: U+FFFD is no blank)

    def __call__(self, tokens: Sequence[int]) -> bool:
        if tokens and tokens[0] == getattr(self._tokenizer, "python_tag_id", None):
            return True
        text = self._tokenizer.decode([t for t in tokens[self._blank :] if t not in self._special]).lstrip()
        if not text:
            self._blank = len(tokens)
        return not text or text[0] in "{[<"


# ---- response objects --------------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


FINISH_REASONS = {"stop": "stop", "length": "length"}
