"""Llama 3 chat formats: a dialog to tokens (with the SFT loss mask), and a model reply back.

Trade-off: we build the token list piece by piece, as Meta's `ChatFormat` does, rather than
rendering a template string and tokenizing it (HF's `apply_chat_template`). Each piece (role,
"\\n\\n", content, RAG context, each tool call) goes through its own `encode` call exactly where
Meta makes one, so ids match Meta's even where BPE across a join could merge differently; user
text can never turn into special tokens; and the assistant mask falls out of the construction
instead of being recovered from character offsets. The cost is that HF's templates, which add
text of their own (the 3.1 date block), are matched only when that text is supplied explicitly
(see `llama31_system_prompt`).

Two versions, chosen explicitly because they disagree on the same input:
* "3.0": the llama3 repository. Content is `.strip()`ed; no ipython role, tools or <|eom_id|>.
* "3.1": llama-models, used for Llama 3.1, 3.2 and 3.3. Content is not stripped; `tool` is
  written as the `ipython` header; tool calls, <|python_tag|> and <|eom_id|>.

Images (Llama 3.2 Vision): a message's content may be a list of text pieces and `IMAGE` slots;
each slot is written as the `<|image|>` token, id 128256, one past the text vocabulary (the
vision model's embedding table has 8 extra rows; Meta's reference swaps its reserved 128011 for
128256 the same way before the model sees it). As in the released checkpoints' template, a
dialog with images has no system message (it is refused, not silently dropped).
"""

from __future__ import annotations

import ast
import datetime
import json
import keyword
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from herd.tokenizer.tokenizer import Tokenizer

Role = Literal["system", "user", "assistant", "ipython", "tool"]
StopReason = Literal["end_of_turn", "end_of_message", "out_of_tokens"]
ToolFormat = Literal["json", "function_tag", "python_list"]
ChatVersion = Literal["3.0", "3.1"]

ROLES: tuple[str, ...] = ("system", "user", "assistant", "ipython", "tool")
STOP_REASONS: tuple[str, ...] = ("end_of_turn", "end_of_message", "out_of_tokens")
TOOL_FORMATS: tuple[str, ...] = ("json", "function_tag", "python_list")
CHAT_VERSIONS: tuple[str, ...] = ("3.0", "3.1")
QUERY_TOOLS: tuple[str, ...] = ("brave_search", "wolfram_alpha", "photogen")
CODE_INTERPRETER = "code_interpreter"
BUILTIN_TOOLS: tuple[str, ...] = (*QUERY_TOOLS, CODE_INTERPRETER)


IMAGE_TOKEN_ID = 128256  # <|image|> in Llama 3.2 Vision's model input


@dataclass(frozen=True)
class ImageSlot:
    """Where an image sits in a message's content (`IMAGE`); the pixels travel separately."""

    def __repr__(self) -> str:
        return "IMAGE"


IMAGE = ImageSlot()
ContentPart = str | ImageSlot


def content_json(content: str | list[ContentPart]) -> str | list[dict[str, str]]:
    """Content as JSON / chat templates spell it: a string, or [{"type": "image"}, {"type": "text", ...}]."""
    if isinstance(content, str):
        return content
    return [{"type": "image"} if isinstance(p, ImageSlot) else {"type": "text", "text": p} for p in content]


def parse_content(value: Any) -> str | list[ContentPart]:
    """The inverse of `content_json`; a clear error for anything else."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise ValueError(f"message content must be a string or a list of parts, got {type(value).__name__}")
    parts: list[ContentPart] = []
    for part in value:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "image" and set(part) == {"type"}:
            parts.append(IMAGE)
        elif kind == "text" and isinstance(part.get("text"), str) and set(part) == {"type", "text"}:
            parts.append(part["text"])
        else:
            raise ValueError(f'a content part must be {{"type": "text", "text": STR}} or {{"type": "image"}}, got {part!r}')
    return parts


@dataclass
class ToolCall:
    """One call: `arguments` is {"query": str} for search-like builtins, {"code": str} for
    code_interpreter, and any JSON object for custom tools. `call_id` is not part of the text
    format, so a decoded call has `call_id=None`."""

    name: str
    arguments: dict[str, Any]
    call_id: str | None = None


@dataclass
class Message:
    """One turn. `tool_calls` and `stop_reason` belong to assistant turns, `context` (RAG text)
    to user turns. `stop_reason="end_of_message"` ends the turn with <|eom_id|> (the model
    waits for a tool result); anything else with <|eot_id|>."""

    role: Role
    content: str | list[ContentPart]
    tool_calls: list[ToolCall] = field(default_factory=list)
    stop_reason: StopReason = "end_of_turn"
    context: str | None = None

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(
                f"unknown role {self.role!r}; use one of {', '.join(ROLES)} ('tool' is written as ipython)"
            )
        if isinstance(self.content, (list, tuple)):
            bad = [type(p).__name__ for p in self.content if not isinstance(p, (str, ImageSlot))]
            if bad:
                raise ValueError(f"message content parts must be text or IMAGE, got {bad[0]}")
            if self.images and self.role != "user":
                raise ValueError(f"only user messages carry images (got role {self.role!r})")
            self.content = list(self.content)
        elif not isinstance(self.content, str):
            raise ValueError(f"message content must be a str or a list of text and IMAGE parts, "
                             f"got {type(self.content).__name__}")
        if self.stop_reason not in STOP_REASONS:
            raise ValueError(f"unknown stop_reason {self.stop_reason!r}; use one of {', '.join(STOP_REASONS)}")
        if self.role != "assistant" and (self.tool_calls or self.stop_reason != "end_of_turn"):
            raise ValueError(f"only assistant messages carry tool_calls or a stop_reason (got role {self.role!r})")
        if self.role != "user" and self.context is not None:
            raise ValueError(f"only user messages carry RAG context (got role {self.role!r})")

    @property
    def images(self) -> int:
        """How many IMAGE slots the content holds."""
        return 0 if isinstance(self.content, str) else sum(isinstance(p, ImageSlot) for p in self.content)

    @property
    def text(self) -> str:
        """The content's text, image slots left out."""
        return self.content if isinstance(self.content, str) else "".join(p for p in self.content if isinstance(p, str))


@dataclass
class ChatTokens:
    """Token ids plus the SFT loss mask: True on assistant bodies and their <|eot_id|>/<|eom_id|>,
    the tokens a fine-tuned model must learn to produce; False on BOS and every header."""

    tokens: list[int] = field(default_factory=list)
    assistant_mask: list[bool] = field(default_factory=list)

    def _append(self, ids: Sequence[int], *, trained: bool) -> None:
        self.tokens.extend(ids)
        self.assistant_mask.extend([trained] * len(ids))


class ChatFormat:
    """Encode dialogs and decode replies in the Llama 3.0 or 3.1+ chat format."""

    def __init__(self, tokenizer: Tokenizer, *, version: ChatVersion, tool_format: ToolFormat = "json") -> None:
        if version not in CHAT_VERSIONS:
            raise ValueError(
                f"unknown chat format version {version!r}; use '3.0' for Llama 3 and '3.1' for Llama 3.1, 3.2 and 3.3"
            )
        if tool_format not in TOOL_FORMATS:
            raise ValueError(f"unknown tool_format {tool_format!r}; use one of {', '.join(TOOL_FORMATS)}")
        self.tokenizer = tokenizer
        self.version = version
        self.tool_format = tool_format

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, bos=False, eos=False)

    def encode_header(self, role: Role) -> list[int]:
        """<|start_header_id|>role<|end_header_id|> followed by "\\n\\n"."""
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; use one of {', '.join(ROLES)}")
        tok = self.tokenizer
        ids = [tok.start_header_id]
        ids += self._encode("ipython" if role == "tool" else role)
        ids.append(tok.end_header_id)
        return ids + self._encode("\n\n")

    def encode_message(self, message: Message) -> ChatTokens:
        """Header, body, terminator; the mask is True on the body and terminator of assistant turns."""
        out = ChatTokens()
        out._append(self.encode_header(message.role), trained=False)
        body = self._encode_body_30(message) if self.version == "3.0" else self._encode_body_31(message)
        out._append(body, trained=message.role == "assistant")
        return out

    def encode_dialog_prompt(self, messages: Sequence[Message], *, add_generation_prompt: bool = True) -> ChatTokens:
        """BOS + every message (+ an open assistant header for the model to complete).

        For inference keep `add_generation_prompt=True` (Meta always adds it); for SFT on a
        dialog that ends with the assistant's answer pass False.
        """
        if any(m.images for m in messages) and any(m.role == "system" for m in messages):
            raise ValueError("Llama 3.2 Vision takes no system message in a dialog with images (its template refuses "
                             "one); put the instructions in the user turn")
        out = ChatTokens()
        out._append([self.tokenizer.bos_id], trained=False)
        for message in messages:
            encoded = self.encode_message(message)
            out.tokens += encoded.tokens
            out.assistant_mask += encoded.assistant_mask
        if add_generation_prompt:
            out._append(self.encode_header("assistant"), trained=False)
        return out

    def _encode_body_30(self, message: Message) -> list[int]:
        if message.role in ("ipython", "tool") or message.tool_calls or message.context is not None:
            raise ValueError(
                "the Llama 3.0 chat format has no ipython role, tool calls or RAG context; "
                "use ChatFormat(..., version='3.1') or put the text in the content"
            )
        if message.stop_reason == "end_of_message":
            raise ValueError("Llama 3.0 has no <|eom_id|> (id 128008 is a reserved token there); use end_of_turn")
        if message.images:
            raise ValueError("the Llama 3.0 chat format has no images; use version='3.1' (Llama 3.2 Vision)")
        return self._encode(message.text.strip()) + [self.tokenizer.eot_id]

    def _encode_body_31(self, message: Message) -> list[int]:
        tok = self.tokenizer
        ids = []
        # Meta's reference changed its mind here: the first llama-models release tagged every tool
        # call, the current one only code_interpreter. We follow the documented model output
        # (llama3_1/prompt_format.md, and HF's 3.1 template): builtin calls start with
        # <|python_tag|>, <function=...> calls do not. A JSON custom call is tagged only when the
        # system prompt says "Environment: ipython", which a single message cannot see, so custom
        # calls are never tagged here.
        if message.tool_calls and message.tool_calls[0].name in BUILTIN_TOOLS:
            ids.append(tok.python_tag_id)
        if isinstance(message.content, str):
            ids += self._encode(message.content)
        else:  # each text piece its own encode call, as Meta's reference does around media items
            for part in message.content:
                ids += [IMAGE_TOKEN_ID] if isinstance(part, ImageSlot) else self._encode(part)
        if message.context is not None:
            ids += self._encode("\n\n")
            ids += self._encode(message.context)
        for text in self._tool_call_texts(message.tool_calls):
            ids += self._encode(text)
        ids.append(tok.eom_id if message.stop_reason == "end_of_message" else tok.eot_id)
        return ids

    def _tool_call_texts(self, calls: Sequence[ToolCall]) -> list[str]:
        if not calls:
            return []
        if any(c.name in BUILTIN_TOOLS for c in calls):
            if len(calls) > 1:
                raise ValueError(
                    f"a builtin tool call ({', '.join(BUILTIN_TOOLS)}) must be the only call in its message; "
                    "split the calls into separate assistant messages"
                )
            return [_builtin_call_text(calls[0])]
        if self.tool_format == "json":
            if len(calls) > 1:
                raise ValueError(
                    "the JSON tool format carries one call per message; use tool_format='python_list' "
                    "or 'function_tag' for several calls, or split them into separate messages"
                )
            call = calls[0]
            return [_json_dumps({"type": "function", "name": call.name, "parameters": call.arguments}, call)]
        if self.tool_format == "function_tag":
            for call in calls:
                if not call.name or ">" in call.name:
                    raise ValueError(f"tool name {call.name!r} cannot be written as <function=NAME>; avoid '>'")
            return [f"<function={c.name}>{_json_dumps(c.arguments, c)}</function>" for c in calls]
        # python_list: the 3.2 zero-shot format. Several calls share one list (Meta writes one list
        # per call, which its own decoder cannot read back beyond the first).
        return ["[" + ", ".join(_python_call_text(c) for c in calls) + "]"]

    def decode_assistant_message(self, reply: Sequence[int] | str) -> Message:
        """Parse a model reply (token ids, or text with special tokens written out) into a Message.

        A trailing <|eot_id|> (or <|end_of_text|>) means end_of_turn, <|eom_id|> end_of_message,
        neither out_of_tokens. A leading assistant header is skipped. Tool calls are recognised
        in every format `encode_message` writes; a <|python_tag|> reply that is no known call
        is code for code_interpreter. Anything else is plain text, returned unchanged.
        """
        if isinstance(reply, str):
            body, python_tag, stop_reason = self._split_reply_text(reply)
        else:
            body, python_tag, stop_reason = self._split_reply_tokens(list(reply))
        calls = _parse_tool_calls(body, python_tag=python_tag)
        return Message("assistant", "" if calls else body, tool_calls=calls, stop_reason=stop_reason)

    def _split_reply_tokens(self, ids: list[int]) -> tuple[str, bool, StopReason]:
        # Working on ids, not text, keeps a literal "<|eot_id|>" typed inside a reply apart from
        # the real token.
        tok = self.tokenizer
        header = self.encode_header("assistant")
        if ids[: len(header)] == header:
            ids = ids[len(header) :]
        python_tag = bool(ids) and ids[0] == tok.python_tag_id
        if python_tag:
            ids = ids[1:]
        stop_reason: StopReason = "out_of_tokens"
        if ids and ids[-1] in (tok.eot_id, tok.eos_id):
            stop_reason, ids = "end_of_turn", ids[:-1]
        elif ids and ids[-1] == tok.eom_id:
            stop_reason, ids = "end_of_message", ids[:-1]
        return tok.decode(ids), python_tag, stop_reason

    def _split_reply_text(self, text: str) -> tuple[str, bool, StopReason]:
        header = "<|start_header_id|>assistant<|end_header_id|>\n\n"
        text = text.removeprefix(header)
        python_tag = text.startswith("<|python_tag|>")
        text = text.removeprefix("<|python_tag|>")
        stop_reason: StopReason = "out_of_tokens"
        for terminator, reason in _TERMINATORS:
            if text.endswith(terminator):
                stop_reason, text = reason, text[: -len(terminator)]
                break
        return text, python_tag, stop_reason


def llama31_system_prompt(
    instructions: str = "",
    *,
    today: datetime.date | None = None,
    builtin_tools: Sequence[str] = (),
    custom_tools: bool = False,
) -> str:
    """The Llama 3.1 system-prompt block Meta's prompt templates put before the instructions.

    `Environment: ipython` when any tool is available (it alone enables code_interpreter),
    `Tools:` listing the other builtins, then the knowledge cut-off and today's date. Never
    added automatically: pass the result as the system message's content.
    """
    unknown = [t for t in builtin_tools if t not in BUILTIN_TOOLS]
    if unknown:
        raise ValueError(f"unknown builtin tools {unknown}; builtins are {', '.join(BUILTIN_TOOLS)}")
    today = today or datetime.date.today()
    lines = []
    if builtin_tools or custom_tools:
        lines.append("Environment: ipython")
    listed = [t for t in builtin_tools if t != CODE_INTERPRETER]
    if listed:
        lines.append("Tools: " + ", ".join(listed))
    lines.append("Cutting Knowledge Date: December 2023")
    # Meta formats with strftime("%d %B %Y"); the month name is spelled out here because %B
    # follows the process locale and the model was trained on English.
    lines.append(f"Today Date: {today.day:02d} {_MONTHS[today.month - 1]} {today.year}")
    text = "\n".join(lines) + "\n"
    if instructions:
        text += "\n" + instructions + "\n"
    return text


_MONTHS = (
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
)  # fmt: skip


def _json_dumps(value: Any, call: ToolCall) -> str:
    try:
        # json.dumps' defaults (ASCII escapes, ", " and ": ") are what Meta writes.
        return json.dumps(value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"arguments of tool call {call.name!r} must be JSON values: {e}") from e


def _builtin_call_text(call: ToolCall) -> str:
    if call.name == CODE_INTERPRETER:
        if set(call.arguments) != {"code"} or not isinstance(call.arguments["code"], str):
            raise ValueError(f"code_interpreter takes arguments {{'code': str}}, got {call.arguments!r}")
        return call.arguments["code"]
    if set(call.arguments) != {"query"} or not isinstance(call.arguments["query"], str):
        raise ValueError(f"{call.name} takes arguments {{'query': str}}, got {call.arguments!r}")
    # Written without escaping, as Meta does; the decoder matches the closing '")' at the very end.
    return f'{call.name}.call(query="{call.arguments["query"]}")'


def _python_call_text(call: ToolCall) -> str:
    if not call.name.isidentifier() or keyword.iskeyword(call.name):
        raise ValueError(f"tool name {call.name!r} is not a Python identifier, required by tool_format='python_list'")
    for name in call.arguments:
        if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
            raise ValueError(f"argument name {name!r} of tool {call.name!r} is not a Python identifier")
    args = ", ".join(f"{k}={_python_literal(v, call)}" for k, v in call.arguments.items())
    return f"{call.name}({args})"


def _python_literal(value: Any, call: ToolCall) -> str:
    # Meta's writer puts strings in bare double quotes and dicts as {k=v}; we keep the double
    # quotes (same text for ordinary strings) but escape, and write dicts as Python dicts, so
    # that every argument parses back with ast.literal_eval.
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if value is None or isinstance(value, (bool, int)):
        return repr(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"tool {call.name!r}: {value} has no Python-literal form")
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_python_literal(v, call) for v in value) + "]"
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise ValueError(f"tool {call.name!r}: dict keys in arguments must be strings")
        items = (f"{json.dumps(k, ensure_ascii=False)}: {_python_literal(v, call)}" for k, v in value.items())
        return "{" + ", ".join(items) + "}"
    raise ValueError(f"tool {call.name!r}: cannot write an argument of type {type(value).__name__}")


_TERMINATORS: tuple[tuple[str, StopReason], ...] = (
    ("<|eot_id|>", "end_of_turn"),
    # A model that ends with end_of_text (a stop token) has ended its turn as well.
    ("<|end_of_text|>", "end_of_turn"),
    ("<|eom_id|>", "end_of_message"),
)
_BUILTIN_CALL = re.compile(r"(?P<name>brave_search|wolfram_alpha|photogen)\.call\(query=\"(?P<query>.*)\"\)", re.DOTALL)
_FUNCTION_TAG = re.compile(r"<function=(?P<name>[^>]+)>")
_JSON = json.JSONDecoder()


def _parse_tool_calls(body: str, *, python_tag: bool) -> list[ToolCall]:
    text = body.strip()
    if not text:
        return []
    calls = _parse_function_tags(text) or _parse_json_call(text) or _parse_python_list(text)
    if calls:
        return calls
    builtin = _BUILTIN_CALL.fullmatch(text)
    if builtin:
        return [ToolCall(builtin["name"], {"query": builtin["query"]})]
    if python_tag:
        return [ToolCall(CODE_INTERPRETER, {"code": body})]
    return []


def _parse_function_tags(text: str) -> list[ToolCall] | None:
    calls, pos = [], 0
    while pos < len(text):
        tag = _FUNCTION_TAG.match(text, pos)
        if tag is None:
            return None
        try:
            arguments, pos = _JSON.raw_decode(text, tag.end())
        except (json.JSONDecodeError, RecursionError):
            return None
        if not isinstance(arguments, dict):
            return None
        if text.startswith("</function>", pos):
            pos += len("</function>")
        elif pos != len(text):
            return None  # only the last call may lack its closing tag (models sometimes drop it)
        calls.append(ToolCall(tag["name"], arguments))
        while pos < len(text) and text[pos].isspace():
            pos += 1
    return calls


def _parse_json_call(text: str) -> list[ToolCall] | None:
    if not text.startswith("{"):
        return None
    try:
        obj = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return None
    # Plain JSON replies must stay text: require exactly the call's keys.
    if not isinstance(obj, dict) or not set(obj) <= {"type", "name", "parameters"}:
        return None
    if obj.get("type", "function") != "function" or not isinstance(obj.get("name"), str):
        return None
    if not isinstance(obj.get("parameters"), dict):
        return None
    return [ToolCall(obj["name"], obj["parameters"])]


def _parse_python_list(text: str) -> list[ToolCall] | None:
    if not (text.startswith("[") and text.endswith("]")):
        return None
    try:
        tree = ast.parse(text, mode="eval").body
    except (SyntaxError, ValueError, RecursionError):
        return None
    if not isinstance(tree, ast.List) or not tree.elts:
        return None
    calls = []
    for node in tree.elts:
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.args):
            return None
        if any(kw.arg is None for kw in node.keywords):  # **kwargs
            return None
        try:
            arguments = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords}
        except (ValueError, TypeError, SyntaxError, RecursionError):
            return None
        calls.append(ToolCall(node.func.id, arguments))
    return calls
