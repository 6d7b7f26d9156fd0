"""The OpenAI API's error body and typed field access: the pieces every request parser shares
(`protocol.py` for completions and chat, `tokens_api.py` for /tokenize and /detokenize)."""

from __future__ import annotations

import math
from typing import Any


class APIError(Exception):
    """An error answered as `{"error": {"message", "type", "param", "code"}}` with HTTP `status`."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             408: "invalid_request_error", 413: "invalid_request_error", 500: "server_error",
             503: "unavailable_error"}

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


# ---- typed field access ----------------------------------------------------------------------------


def _type_name(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer", float: "number",
            type(None): "null"}.get(type(value), type(value).__name__)


def _get(body: dict, name: str, kind: str, default: Any = None, *, required: bool = False) -> Any:
    """body[name] checked against a JSON type: "string", "integer", "number", "boolean", "object", "array".
    A missing field or JSON null gives `default` (or a 400 when required)."""
    value = body.get(name)
    if value is None:
        if required:
            raise APIError(400, f"'{name}' is required", param=name)
        return default
    ok = {
        "string": isinstance(value, str),
        "integer": isinstance(value, int) and not isinstance(value, bool),
        # 1.0 is also an integer in JSON; json.loads gives a float for it, which must not fail "integer" fields.
        "number": isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
        "boolean": isinstance(value, bool),
        "object": isinstance(value, dict),
        "array": isinstance(value, list),
    }[kind]
    if not ok and kind == "integer" and isinstance(value, float) and value.is_integer():
        return int(value)
    if not ok:
        raise APIError(400, f"'{name}' must be {'an' if kind[0] in 'aeiou' else 'a'} {kind}, got {_type_name(value)}",
                       param=name)
    return value


def _in_range(name: str, value: float, lo: float, hi: float, *, lo_open: bool = False) -> None:
    if value < lo or value > hi or (lo_open and value == lo):
        lo_txt = f"({lo}" if lo_open else f"[{lo}"
        raise APIError(400, f"'{name}' must be in {lo_txt}, {hi}], got {value}", param=name)
