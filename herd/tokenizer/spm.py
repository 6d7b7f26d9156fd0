"""Llama 1/2's SentencePiece `tokenizer.model` behind herd's tokenizer interface.

Trade-off: the `sentencepiece` library encodes, exactly as Meta's Llama 1/2 code does
(`sp_model.encode(s)`, then BOS/EOS by flag), rather than a conversion to HF `tokenizers`. The
model was trained on these ids, and the conversions differ at the edges: transformers 5's
`LlamaTokenizer` (Metaspace pre-tokenizer) collapses the dummy prefix into a leading space, so
" hi" becomes "▁hi" there and "▁▁hi" here and in sentencepiece, llama.cpp and the legacy
`tokenizer.json` Meta's HF repos ship. Special-token text is plain text unless allowed; allowed
special tokens split the text and each piece is encoded on its own, so each gets the dummy
prefix, as in HF's legacy Llama tokenizer and llama.cpp.

Decoding goes through a per-token byte table (`▁` is a space, `<0xNN>` a byte, control tokens
their text, as HF decodes them) so that `StreamDecoder` works; the one space of the dummy prefix
at the very start is dropped, as `sp.decode` and HF do.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from herd.tokenizer.base import Span, TableTokenizer, import_optional

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def is_sentencepiece_model(data: bytes) -> bool:
    """Whether `data` looks like a serialized SentencePiece ModelProto (not a tiktoken rank file).

    A ModelProto starts with field 1 (the pieces), wire type 2: the byte 0x0A. A tiktoken file
    starts with base64 text; neither of them starts the other way.
    """
    return data[:1] == b"\x0a"


class SentencePieceTokenizer(TableTokenizer):
    """A SentencePiece model with herd's encode/decode contract (see the module docstring)."""

    def __init__(
        self,
        model_proto: bytes,
        *,
        name: str = "sentencepiece",
        stop_tokens: Iterable[int] = (),
    ) -> None:
        spm = import_optional("sentencepiece", "a SentencePiece tokenizer.model")
        self.name = name
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(model_proto)
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{name} is not a valid SentencePiece model ({e}); re-download tokenizer.model") from e
        sp = self._sp
        self.n_words = sp.get_piece_size()
        self.bos_id = sp.bos_id() if sp.bos_id() >= 0 else None
        if sp.eos_id() < 0:
            raise ValueError(f"{name} has no end-of-sequence piece; generation would never stop")
        self.eos_id = sp.eos_id()
        self.pad_id = sp.pad_id() if sp.pad_id() >= 0 else None
        self.stop_tokens = tuple(dict.fromkeys([self.eos_id, *stop_tokens]))
        # Meta's Llama 1/2 generation code always starts with BOS.
        self.add_bos = self.bos_id is not None
        # With the dummy prefix "x" normalizes to "▁x", and decode drops the space it became.
        self.decode_strips_first_space = sp.normalize("x").startswith("▁")
        self._set_tables(
            {sp.id_to_piece(i): i for i in range(self.n_words) if sp.is_control(i) or sp.is_unknown(i)},
            [self._piece_bytes(i) for i in range(self.n_words)],
        )

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], *, stop_tokens: Iterable[int] = ()) -> SentencePieceTokenizer:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"SentencePiece model {str(path)!r} does not exist")
        data = path.read_bytes()
        if not is_sentencepiece_model(data):
            raise ValueError(
                f"{path} is not a SentencePiece model (Llama 3's tiktoken tokenizer.model is read by Tokenizer)"
            )
        return cls(data, name=str(path), stop_tokens=stop_tokens)

    def _piece_bytes(self, i: int) -> bytes:
        piece = self._sp.id_to_piece(i)
        if self._sp.is_byte(i):
            m = _BYTE_PIECE.fullmatch(piece)
            assert m is not None, piece  # sentencepiece names every byte piece <0xNN>
            return bytes([int(m.group(1), 16)])
        if self._sp.is_control(i) or self._sp.is_unknown(i):
            return piece.encode("utf-8")
        return piece.replace("▁", " ").encode("utf-8")

    def _plain_ids(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def _plain_batch(self, texts: list[str], num_threads: int) -> list[list[int]]:
        return self._sp.encode(texts, num_threads=num_threads)

    def _plain_with_spans(self, text: str) -> tuple[list[int], list[Span]]:
        proto: Any = self._sp.encode(text, out_type="proto")
        # sentencepiece reports UTF-8 byte offsets; the chat template works in characters.
        char_at = {}
        offset = 0
        for i, c in enumerate(text):
            char_at[offset] = i
            offset += len(c.encode("utf-8"))
        char_at[offset] = len(text)
        ids = [p.id for p in proto.pieces]
        spans = [(char_at.get(p.begin, 0), char_at.get(p.end, len(text))) for p in proto.pieces]
        return ids, spans
