"""Structured outputs for the server: `response_format` and a forced `tool_choice` as grammars.

`herd.generate.grammar` turns a JSON schema into token masks; this module decides which
grammar a request needs and builds the one compiler the server shares (on first use: building
the vocabulary costs about a second for 128K tokens, and most servers never need it).

A forced tool call is constrained to the call format the model's chat format asks for, so that
the reply parses into `tool_calls` by the same code that reads unforced calls:
* Llama 3 (`ChatFormat`): the JSON object `{"name": ..., "parameters": {...}}` of the system
  prompt `tools_system_prompt` writes;
* a checkpoint's own template: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` when
  it uses Hermes-style tags (Qwen, SmolLM3), else the bare JSON object when it renders
  `tool_calls`; a template with neither has no call format to force (400).
One call: "required" and a named function both produce exactly one.
"""

from __future__ import annotations

import json
import threading
from typing import Any

from herd.generate.grammar import JSON_OPTIONS, Grammar, GrammarCompiler
from herd.serve.protocol import APIError, ChatRequest, CommonParams
from herd.tokenizer import ChatFormat, ChatTemplate
from herd.tokenizer.base import TokenizerLike


class Grammars:
    """The server's grammar compiler, built once on first use; safe to call from worker threads."""

    def __init__(self, tokenizer: TokenizerLike, vocab_size: int):
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self._compiler: GrammarCompiler | None = None
        self._lock = threading.Lock()

    def compiler(self) -> GrammarCompiler:
        with self._lock:
            if self._compiler is None:
                try:
                    self._compiler = GrammarCompiler(self.tokenizer, self.vocab_size)
                except ImportError as e:
                    raise APIError(500, f"this server cannot enforce structured output: {e}") from e
            return self._compiler

    def for_params(self, params: CommonParams) -> Grammar | None:
        """The grammar of `response_format` (None for plain text)."""
        fmt = params.response_format
        if fmt is None:
            return None
        try:
            return self.compiler().json_schema(fmt.schema, strict=fmt.strict)
        except ValueError as e:
            raise APIError(400, f"response_format: {e}", param="response_format") from e

    def for_chat(self, fmt: ChatFormat | ChatTemplate | None, request: ChatRequest) -> Grammar | None:
        """A forced tool call's grammar if the request forces one, else `response_format`'s."""
        if request.forced_tool is None:
            return self.for_params(request.params)
        tools = [t for t in request.tools if request.forced_tool in ("", t["name"])]
        try:
            if isinstance(fmt, ChatTemplate):
                return self._template_call(fmt, tools)
            return self.compiler().json_schema(_call_schema(tools, "parameters"), strict=_strict(tools))
        except ValueError as e:
            raise APIError(400, f"cannot force a call of these tools: {e}", param="tools") from e

    def _template_call(self, fmt: ChatTemplate, tools: list[dict]) -> Grammar:
        schema = _call_schema(tools, "arguments")
        if "<tool_call>" in fmt.template:
            special = self.tokenizer.special_tokens
            open_, close = (f"<[{special[t]}]>" if t in special else json.dumps(t)
                            for t in ("<tool_call>", "</tool_call>"))
            options = {**JSON_OPTIONS, "lenient": not _strict(tools)}  # what json_schema() passes as overrides
            grammar = (f'start: {open_} "\\n" call "\\n" {close}\n'
                       f"call: %json {json.dumps({**schema, 'x-guidance': options})}\n")
            return self.compiler().lark(grammar)
        if "tool_calls" in fmt.template:
            return self.compiler().json_schema(schema, strict=_strict(tools))
        raise APIError(400, "this model's chat template has no tool-call format (no <tool_call> tags, no tool_calls), "
                       "so a tool call cannot be forced; use tool_choice 'auto'", param="tool_choice")


def _call_schema(tools: list[dict], arguments_key: str) -> dict[str, Any]:
    """One call of any of `tools`: {"name": <its name>, arguments_key: <its parameters>}."""
    options = [{"type": "object",
                "properties": {"name": {"const": t["name"]},
                               arguments_key: t.get("parameters") or {"type": "object"}},
                "required": ["name", arguments_key], "additionalProperties": False}
               for t in tools]
    return options[0] if len(options) == 1 else {"anyOf": options}


def _strict(tools: list[dict]) -> bool:
    return all(t.get("strict") is True for t in tools)
