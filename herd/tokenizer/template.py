"""A checkpoint's jinja2 chat template, rendered as HF's `apply_chat_template` renders it.

Trade-off: unlike `ChatFormat`, which builds Llama 3's tokens piece by piece, a template is
rendered to one string and tokenized in one pass, because that is what every HF-trained model
saw and the only way to equal HF's ids when text around a message merges across its edge
(Llama 2's "[INST] " + content). The environment is HF's: jinja2's immutable sandbox with
`trim_blocks` and `lstrip_blocks`, the loop-controls extension, a `{% generation %}` tag,
`raise_exception`, `strftime_now`, and a `tojson` that does not escape HTML; the variables are
`messages`, `tools`, `documents`, `add_generation_prompt` and the special-token strings.

The rendered string is tokenized with special-token text recognised (HF's
`add_special_tokens=False` call) except where that text came from a message: a user typing
`<|im_end|>` must not end the turn. Those places are found by rendering a second time with the
special-token text in the messages defused (its first character swapped for a private-use one,
same length): an occurrence present in the first rendering and absent from the second came from a
message, and stays plain text. Ordinary dialogs, with no special-token text in messages, are
tokenized in exactly HF's single pass. A template that changes message text (so the two
renderings differ in length) while a message holds special-token text is refused.

The SFT assistant mask comes from `{% generation %}` blocks when the template has them (as HF's
`return_assistant_tokens_mask`); otherwise from rendering prefixes: an assistant turn is the text
between the dialog before it rendered with the generation prompt and the dialog through it, and
its tokens are trained up to and including the first stop token (ChatML's newline after
`<|im_end|>` is the template's text, not the model's).
"""

from __future__ import annotations

import datetime
import json
import re
import threading
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from herd.tokenizer.base import Span, TokenizerLike, import_optional
from herd.tokenizer.chat import ChatTokens, Message, StopReason, ToolCall, content_json

_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
_DEFUSED = "\ue000"  # private use: never the first character of a special token
_TOOL_CALL_TAG = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


class TemplateTokenizer(TokenizerLike, Protocol):
    """A tokenizer that can encode rendered template text with character spans (HFTokenizer, SentencePieceTokenizer)."""

    def encode_template_text(self, text: str, *, plain_spans: Sequence[Span] = ()) -> tuple[list[int], list[Span]]: ...


class ChatTemplate:
    """Encode dialogs with a checkpoint's chat template and decode replies; the surface of `ChatFormat`."""

    def __init__(
        self, template: str, tokenizer: TemplateTokenizer, *, variables: Mapping[str, Any] | None = None
    ) -> None:
        jinja2 = import_optional("jinja2", "rendering a chat template")
        if not hasattr(tokenizer, "encode_template_text"):
            raise ValueError(
                f"{type(tokenizer).__name__} cannot tokenize chat templates; Llama 3 vocabularies use ChatFormat"
            )
        self.template = template
        self.tokenizer = tokenizer
        self._environment, self._tracker = _environment(jinja2)
        try:
            self._compiled = self._environment.from_string(template)
        except jinja2.TemplateSyntaxError as e:
            raise ValueError(
                f"the chat template does not parse (line {e.lineno}: {e.message}); fix or replace it"
            ) from e
        self.has_generation_blocks = bool(_GENERATION_TAG.search(template))
        names = {i: text for text, i in tokenizer.special_tokens.items()}
        # HF passes the tokenizer's named special tokens; `variables` (a checkpoint's declared
        # names, or anything else the template reads) overrides them.
        self.variables: dict[str, Any] = {}
        for key, i in (
            ("bos_token", tokenizer.bos_id),
            ("eos_token", tokenizer.eos_id),
            ("pad_token", tokenizer.pad_id),
        ):
            if i is not None:
                self.variables[key] = names.get(i) or tokenizer.decode_single_token_bytes(i).decode("utf-8", "replace")
        self.variables.update(variables or {})
        specials = sorted(tokenizer.special_tokens, key=len, reverse=True)
        self._special_re = re.compile("|".join(map(re.escape, specials))) if specials else None
        self._jinja_error = jinja2.TemplateError
        self._lock = threading.Lock()

    def render(
        self,
        messages: Sequence[Message | Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> str:
        """The template's text for `messages` (what HF's apply_chat_template(tokenize=False) returns)."""
        return self._render([message_dict(m) for m in messages], add_generation_prompt, tools)[0]

    def encode_dialog_prompt(
        self,
        messages: Sequence[Message | Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> ChatTokens:
        """Token ids of the rendered dialog and the SFT mask (True on assistant replies and their end-of-turn token).

        For inference keep `add_generation_prompt=True`; for SFT on a dialog that ends with the
        assistant's answer pass False. No BOS is added beyond what the template writes.
        """
        dicts = [message_dict(m) for m in messages]
        text, generated = self._render(dicts, add_generation_prompt, tools, track=self.has_generation_blocks)
        ids, spans = self.tokenizer.encode_template_text(
            text, plain_spans=self._message_specials(dicts, text, add_generation_prompt, tools)
        )
        mask = [False] * len(ids)
        if self.has_generation_blocks:
            for a, b in generated:
                for k, (s, e) in enumerate(spans):
                    if (s < b and e > a) or a <= s < b:
                        mask[k] = True
        else:
            stops = set(self.tokenizer.stop_tokens)
            for a, b in self._assistant_spans(dicts, text, tools):
                for k, (s, _) in enumerate(spans):
                    if a <= s < b:
                        mask[k] = True
                        if ids[k] in stops:
                            break
        return ChatTokens(tokens=ids, assistant_mask=mask)

    def encode_prompt(
        self, messages: Sequence[Message | Mapping[str, Any]], *, tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
    ) -> list[int]:
        """The ids of `encode_dialog_prompt(messages, tools=tools).tokens` (generation prompt added),
        without the SFT mask: what inference needs, in time linear in the dialog. The mask of a
        template without `{% generation %}` blocks renders the dialog up to every assistant turn,
        which is quadratic in the number of turns (a server must not do that for a client's dialog).
        """
        dicts = [message_dict(m) for m in messages]
        text, _ = self._render(dicts, add_generation_prompt, tools)
        ids, _ = self.tokenizer.encode_template_text(
            text, plain_spans=self._message_specials(dicts, text, add_generation_prompt, tools))
        return ids

    def decode_assistant_message(self, reply: Sequence[int] | str) -> Message:
        """Parse a model reply (ids, or text) into a Message: a trailing stop token means end_of_turn.

        Tool calls are read where the template's convention is recognisable: `<tool_call>{json}</tool_call>`
        (Hermes, Qwen, SmolLM3) or a bare JSON call object / list when the template renders
        `tool_calls`. Anything else is plain content.
        """
        stop_reason: StopReason = "out_of_tokens"
        if isinstance(reply, str):
            text = reply
            for token in self._stop_texts():
                if text.endswith(token):
                    text, stop_reason = text[: -len(token)], "end_of_turn"
                    break
        else:
            ids = list(reply)
            if ids and ids[-1] in self.tokenizer.stop_tokens:
                ids, stop_reason = ids[:-1], "end_of_turn"
            text = self.tokenizer.decode(ids)
        content, calls = self._parse_tool_calls(text)
        return Message("assistant", content, tool_calls=calls, stop_reason=stop_reason)

    # -- rendering ------------------------------------------------------------------------------

    def _render(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool,
        tools: Sequence[Mapping[str, Any]] | None,
        *,
        track: bool = False,
    ) -> tuple[str, list[Span]]:
        variables = {
            **self.variables,
            "messages": messages,
            "tools": None if tools is None else list(tools),
            "documents": None,
            "add_generation_prompt": add_generation_prompt,
        }
        try:
            if not track:
                return self._compiled.render(**variables), []
            with self._lock:  # the tracker's state lives on the environment, shared by this template
                chunks: list[str] = []
                ranges: list[Span] = []
                with self._tracker(chunks, ranges):
                    for chunk in self._compiled.generate(**variables):
                        chunks.append(chunk)
                return "".join(chunks), ranges
        except self._jinja_error as e:
            raise ValueError(f"the chat template refused this dialog: {e}") from e

    def _message_specials(
        self,
        messages: list[dict[str, Any]],
        text: str,
        add_generation_prompt: bool,
        tools: Sequence[Mapping[str, Any]] | None,
    ) -> list[Span]:
        """Where special-token text in `text` came from the messages (module docstring)."""
        regex = self._special_re
        if regex is None or not any(regex.search(t) for m in messages for t in _message_texts(m)):
            return []
        defuse = lambda s: regex.sub(lambda m: _DEFUSED + m.group()[1:], s)  # noqa: E731
        defused, _ = self._render([_map_texts(m, defuse) for m in messages], add_generation_prompt, tools)
        if len(defused) != len(text):
            found = next(regex.search(t).group() for m in messages for t in _message_texts(m) if regex.search(t))
            raise ValueError(
                f"a message contains the special-token text {found!r} and this chat template rewrites message text, "
                "so herd cannot keep that text plain; remove it from the message"
            )
        return [m.span() for m in regex.finditer(text) if defused[m.start() : m.end()] != m.group()]

    def _assistant_spans(
        self, messages: list[dict[str, Any]], text: str, tools: Sequence[Mapping[str, Any]] | None
    ) -> list[Span]:
        spans = []
        for i, message in enumerate(messages):
            if message.get("role") != "assistant":
                continue
            try:
                before, _ = self._render(messages[:i], True, tools)
                through, _ = self._render(messages[: i + 1], False, tools)
            except ValueError as e:
                raise ValueError(
                    f"cannot find the assistant's tokens in message {i}: rendering the dialog up to it failed ({e}); "
                    "mark assistant text in the template with {% generation %}...{% endgeneration %}"
                ) from e
            if not (through.startswith(before) and text.startswith(through)):
                raise ValueError(
                    f"this chat template renders the dialog up to message {i} differently from the whole dialog, "
                    "so herd cannot tell which tokens are the assistant's; mark assistant text in the template "
                    "with {% generation %}...{% endgeneration %}"
                )
            spans.append((len(before), len(through)))
        return spans

    # -- replies --------------------------------------------------------------------------------

    def _stop_texts(self) -> list[str]:
        names = {i: text for text, i in self.tokenizer.special_tokens.items()}
        return [names[i] for i in self.tokenizer.stop_tokens if i in names]

    def _parse_tool_calls(self, text: str) -> tuple[str, list[ToolCall]]:
        if "<tool_call>" in self.template and "<tool_call>" in text:
            calls = [_json_call(m.group(1)) for m in _TOOL_CALL_TAG.finditer(text)]
            if calls and all(c is not None for c in calls):
                return _TOOL_CALL_TAG.sub("", text).strip(), calls  # type: ignore[return-value]
        if "tool_calls" in self.template:
            stripped = text.strip()
            if stripped.startswith(("{", "[")):
                try:
                    value = json.loads(stripped)
                except (json.JSONDecodeError, RecursionError):
                    value = None
                objs = value if isinstance(value, list) else [value]
                calls = [_json_call(o) for o in objs]
                if objs and all(c is not None for c in calls):
                    return "", calls  # type: ignore[return-value]
        return text, []


def message_dict(message: Message | Mapping[str, Any]) -> dict[str, Any]:
    """A herd Message as the dict HF templates read (tool calls in HF's {"type", "function"} form)."""
    if isinstance(message, Mapping):
        if "role" not in message:
            raise ValueError(f"a chat message needs a 'role', got keys {sorted(message)}")
        return dict(message)
    if message.context is not None:
        raise ValueError(
            "RAG context is a Llama 3.1 ChatFormat field; put the text in the message content for a chat template"
        )
    out: dict[str, Any] = {"role": "tool" if message.role == "ipython" else message.role, "content": content_json(message.content)}
    if message.tool_calls:
        out["tool_calls"] = [
            {
                "type": "function",
                "function": {"name": c.name, "arguments": c.arguments},
                **({"id": c.call_id} if c.call_id else {}),
            }
            for c in message.tool_calls
        ]
    return out


def _message_texts(message: dict[str, Any]) -> list[str]:
    content = message.get("content")
    if isinstance(content, str):
        return [content]
    if isinstance(content, list):
        return [p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
    return []


def _map_texts(message: dict[str, Any], fn: Any) -> dict[str, Any]:
    out = dict(message)
    content = message.get("content")
    if isinstance(content, str):
        out["content"] = fn(content)
    elif isinstance(content, list):
        out["content"] = [
            {**p, "text": fn(p["text"])} if isinstance(p, dict) and isinstance(p.get("text"), str) else p
            for p in content
        ]
    return out


def _json_call(value: Any) -> ToolCall | None:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except (json.JSONDecodeError, RecursionError):
            return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):  # OpenAI style: the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except (json.JSONDecodeError, RecursionError):
            return None
    if not isinstance(arguments, dict) or not set(value) <= {"name", "arguments", "parameters", "type", "id"}:
        return None
    return ToolCall(value["name"], arguments)


def _environment(jinja2: Any) -> tuple[Any, Any]:
    """HF's chat-template environment (transformers' chat_template_utils), one per ChatTemplate."""
    from jinja2 import nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        # {% generation %}...{% endgeneration %}: renders its body and, while tracking, records
        # the character range it occupies in the output streamed so far.
        tags = {"generation"}

        def __init__(self, environment: Any) -> None:
            super().__init__(environment)
            self.chunks: list[str] | None = None
            self.ranges: list[Span] | None = None

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_track", []), [], [], body).set_lineno(lineno)

        def _track(self, caller: Any) -> str:
            text = caller()
            if self.chunks is not None and self.ranges is not None:
                start = sum(map(len, self.chunks))
                self.ranges.append((start, start + len(text)))
            return text

    class Tracking:
        def __init__(self, ext: Generation, chunks: list[str], ranges: list[Span]) -> None:
            self.ext, self.chunks, self.ranges = ext, chunks, ranges

        def __enter__(self) -> None:
            self.ext.chunks, self.ext.ranges = self.chunks, self.ranges

        def __exit__(self, *exc: object) -> None:
            self.ext.chunks = self.ext.ranges = None

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(
        x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
    ) -> str:
        # jinja2's own tojson escapes <, >, & and ' for HTML; templates expect plain JSON.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    ext = next(e for e in env.extensions.values() if isinstance(e, Generation))
    return env, lambda chunks, ranges: Tracking(ext, chunks, ranges)
