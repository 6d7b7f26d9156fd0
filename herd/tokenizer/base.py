"""What every herd tokenizer offers, whatever its engine (tiktoken, HF tokenizers, SentencePiece).

Trade-off: one structural `Protocol` instead of a base class. The Llama 3 `Tokenizer` keeps its
exact tiktoken implementation and satisfies the protocol by having the same members; the other
backends are separate classes with the same surface. Callers (generation, serving, SFT, eval)
type against `TokenizerLike` and never ask which engine they hold. What is specific to one
vocabulary (Llama 3's header and tool tokens) stays on that class and is used only by the code
that knows it has that vocabulary (`ChatFormat`).

Conventions shared by all backends:
* `encode` adds BOS/EOS only through its flags; `add_bos` says whether the checkpoint expects
  BOS before plain text (Llama 1/2/3 do, SmolLM2's GGUF says no).
* Special-token text in user strings is plain text unless `allowed_special` names it, so a user
  cannot end the assistant's turn by typing `<|im_end|>`.
* `decode` equals the UTF-8 decoding (invalid bytes -> U+FFFD) of the concatenated
  `decode_single_token_bytes`, except that a SentencePiece-style vocabulary drops the one space
  its dummy prefix put at the start (`decode_strips_first_space`); `StreamDecoder` does the same,
  so streamed text always equals `decode`.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Iterable, Sequence, Set
from types import ModuleType
from typing import Literal, Protocol, runtime_checkable

SpecialSet = Set[str] | Literal["all"]

MODELS_EXTRA_HINT = "pip install 'herd[models]'"


@runtime_checkable
class TokenizerLike(Protocol):
    """The tokenizer surface generation, serving, SFT and eval rely on."""

    n_words: int
    bos_id: int | None
    eos_id: int
    pad_id: int | None
    # Every id that ends generation: end of text, end of turn, end of message.
    stop_tokens: tuple[int, ...]
    add_bos: bool
    decode_strips_first_space: bool

    @property
    def special_tokens(self) -> dict[str, int]: ...

    def encode(
        self,
        s: str,
        *,
        bos: bool,
        eos: bool,
        allowed_special: SpecialSet = frozenset(),
        disallowed_special: SpecialSet = frozenset(),
    ) -> list[int]: ...

    def encode_batch(
        self,
        texts: Sequence[str],
        *,
        bos: bool,
        eos: bool,
        allowed_special: SpecialSet = frozenset(),
        disallowed_special: SpecialSet = frozenset(),
        num_threads: int = 8,
    ) -> list[list[int]]: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def decode_single_token_bytes(self, token_id: int) -> bytes: ...


def import_optional(module: str, purpose: str) -> ModuleType:
    """Import a `herd[models]` dependency where it is used, with an install hint when it is missing."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = module.split(".")[0]
        raise ImportError(f"{purpose} needs the '{top}' package: {MODELS_EXTRA_HINT}") from e


def gpt2_byte_decoder() -> dict[str, int]:
    """GPT-2's printable stand-in character -> the byte it stands for (byte-level BPE vocabularies).

    Printable Latin-1 bytes stand for themselves; the other 68 bytes (controls, space, 0x7F-0xA0,
    0xAD) are given the characters from U+0100 on, in byte order, so every token is printable.
    """
    direct = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {chr(b): b for b in direct}
    shifted = 0
    for b in range(256):
        if b not in direct:
            table[chr(256 + shifted)] = b
            shifted += 1
    return table


def check_special_names(names: SpecialSet, known: Iterable[str], arg: str) -> frozenset[str] | Literal["all"]:
    """Validate an allowed/disallowed special set against the tokenizer's names."""
    if names == "all":
        return "all"
    names = frozenset(names)
    unknown = names - set(known)
    if unknown:
        raise ValueError(
            f"{arg} names unknown special tokens {sorted(unknown)[:5]}; "
            "use names from the tokenizer's special_tokens, or 'all'"
        )
    return names


Span = tuple[int, int]


class TableTokenizer:
    """What the non-tiktoken backends share: the special-token policy, BOS/EOS flags, byte-table decoding.

    A subclass sets the `TokenizerLike` attributes, calls `_set_tables`, and supplies plain-text
    encoding (`_plain_ids`, `_plain_batch`, `_plain_with_spans`) and, where its engine can
    recognise every special token in one pass exactly as its reference does, `_one_pass_with_spans`.
    """

    name: str
    n_words: int
    bos_id: int | None
    eos_id: int
    pad_id: int | None
    stop_tokens: tuple[int, ...]
    add_bos: bool
    decode_strips_first_space: bool

    def _set_tables(self, special_tokens: dict[str, int], token_bytes: list[bytes]) -> None:
        assert len(token_bytes) == self.n_words
        self._special_tokens = dict(special_tokens)
        # Longest first, so that at each position the regex takes the longest special token.
        names = sorted(special_tokens, key=len, reverse=True)
        self._special_re = re.compile("|".join(map(re.escape, names))) if names else None
        self._token_bytes = token_bytes

    def _plain_ids(self, text: str) -> list[int]:
        raise NotImplementedError

    def _plain_batch(self, texts: list[str], num_threads: int) -> list[list[int]]:
        raise NotImplementedError

    def _plain_with_spans(self, text: str) -> tuple[list[int], list[Span]]:
        raise NotImplementedError

    def _one_pass_with_spans(self, text: str) -> tuple[list[int], list[Span]] | None:
        return None

    @property
    def special_tokens(self) -> dict[str, int]:
        """Special-token text -> id (a copy)."""
        return dict(self._special_tokens)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, n_words={self.n_words})"

    def encode(
        self,
        s: str,
        *,
        bos: bool,
        eos: bool,
        allowed_special: SpecialSet = frozenset(),
        disallowed_special: SpecialSet = frozenset(),
    ) -> list[int]:
        """Encode `s`; BOS/EOS only through the flags, special-token text is plain text unless allowed."""
        allowed = self._allowed(s, allowed_special, disallowed_special)
        ids = self._encode_spans(s, allowed, plain_spans=())[0] if allowed else self._plain_ids(s)
        return self._wrap(ids, bos=bos, eos=eos)

    def encode_batch(
        self,
        texts: Sequence[str],
        *,
        bos: bool,
        eos: bool,
        allowed_special: SpecialSet = frozenset(),
        disallowed_special: SpecialSet = frozenset(),
        num_threads: int = 8,
    ) -> list[list[int]]:
        """`encode` for many strings; plain text goes through the engine's own batch call."""
        allowed = [self._allowed(s, allowed_special, disallowed_special) for s in texts]
        if any(allowed):
            encoded = [
                self._encode_spans(s, a, plain_spans=())[0] if a else self._plain_ids(s)
                for s, a in zip(texts, allowed, strict=True)
            ]
        else:
            encoded = self._plain_batch(list(texts), num_threads)
        return [self._wrap(ids, bos=bos, eos=eos) for ids in encoded]

    def encode_template_text(self, text: str, *, plain_spans: Sequence[Span] = ()) -> tuple[list[int], list[Span]]:
        """Ids and character spans of rendered chat-template text: special-token text is recognised
        (as HF's apply_chat_template does) except where it overlaps `plain_spans`."""
        return self._encode_spans(text, "all", plain_spans=plain_spans)

    def _allowed(self, s: str, allowed_special: SpecialSet, disallowed_special: SpecialSet) -> frozenset[str] | str:
        allowed = check_special_names(allowed_special, self._special_tokens, "allowed_special")
        disallowed = check_special_names(disallowed_special, self._special_tokens, "disallowed_special")
        if disallowed == "all":
            disallowed = frozenset() if allowed == "all" else frozenset(self._special_tokens) - allowed
        if disallowed and self._special_re is not None:
            for m in self._special_re.finditer(s):
                if m.group() in disallowed:
                    raise ValueError(
                        f"the text contains the special token {m.group()!r}, which disallowed_special forbids; "
                        "pass it in allowed_special, or drop it from disallowed_special to encode it as text"
                    )
        return allowed

    def _encode_spans(
        self, text: str, allowed: frozenset[str] | str, *, plain_spans: Sequence[Span]
    ) -> tuple[list[int], list[Span]]:
        matches = list(self._special_re.finditer(text)) if allowed and self._special_re is not None else []
        plain = _overlapping(matches, plain_spans)
        keep = [m for i, m in enumerate(matches) if (allowed == "all" or m.group() in allowed) and i not in plain]
        if len(keep) == len(matches):
            # Every special-token text is to be recognised (or there is none): the engine's own
            # single pass, where it has one, is exactly what its reference computes.
            whole = self._one_pass_with_spans(text) if matches else self._plain_with_spans(text)
            if whole is not None:
                return whole
        # Split at the recognised special tokens and encode the text between them as plain text.
        ids: list[int] = []
        spans: list[Span] = []
        pos = 0
        for m in [*keep, None]:
            end = len(text) if m is None else m.start()
            if end > pos:
                piece_ids, piece_spans = self._plain_with_spans(text[pos:end])
                ids += piece_ids
                spans += [(pos + a, pos + b) for a, b in piece_spans]
            if m is not None:
                ids.append(self._special_tokens[m.group()])
                spans.append(m.span())
                pos = m.end()
        return ids, spans

    def _wrap(self, ids: list[int], *, bos: bool, eos: bool) -> list[int]:
        if bos:
            if self.bos_id is None:
                raise ValueError(f"{self.name} has no BOS token; encode with bos=False")
            ids = [self.bos_id, *ids]
        return [*ids, self.eos_id] if eos else list(ids)

    def decode(self, ids: Iterable[int]) -> str:
        """The tokens' bytes joined and decoded as UTF-8 (invalid bytes -> U+FFFD), special tokens as
        their text, less the dummy-prefix space for SentencePiece-style vocabularies."""
        ids = list(ids)
        if ids and not 0 <= min(ids) <= max(ids) < self.n_words:
            raise ValueError(self._bad_ids_message(ids))
        text = b"".join([self._token_bytes[i] for i in ids]).decode("utf-8", errors="replace")
        if self.decode_strips_first_space and text.startswith(" "):
            text = text[1:]
        return text

    def decode_single_token_bytes(self, token_id: int) -> bytes:
        """The raw bytes of one token (may be part of a multi-byte character)."""
        if not 0 <= token_id < self.n_words:
            raise ValueError(self._bad_ids_message([token_id]))
        return self._token_bytes[token_id]

    def _bad_ids_message(self, ids: list[int]) -> str:
        bad = [t for t in ids if not 0 <= t < self.n_words]
        return f"token ids {bad[:5]} are outside this vocabulary (0..{self.n_words - 1})"


def _overlapping(matches: Sequence[re.Match[str]], spans: Sequence[Span]) -> set[int]:
    """Indices of the matches (in text order, not overlapping each other, as finditer gives them)
    that overlap one of `spans`: in O((matches + spans) log spans), not matches x spans (a chat
    message can hold many special-token strings)."""
    out: set[int] = set()
    if not spans:
        return out
    spans = sorted(spans)
    j, reach = 0, -1  # reach: the furthest end among the spans that start before the current match ends
    for i, m in enumerate(matches):
        while j < len(spans) and spans[j][0] < m.end():
            reach = max(reach, spans[j][1])
            j += 1
        if reach > m.start():
            out.add(i)
    return out
