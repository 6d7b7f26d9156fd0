"""Any HF `tokenizers` vocabulary (tokenizer.json, or one built from GGUF metadata) behind herd's interface.

Trade-off: the HF `tokenizers` engine does the encoding (its BPE, normalizers, pre-tokenizers
and added-token matching are the reference for these vocabularies, so ids equal HF's by
construction), while herd keeps two things to itself:

* Special tokens. HF recognises special-token text anywhere in its input; herd's interface
  treats it as plain text unless asked (`allowed_special`), so the engine is held twice, once
  with `encode_special_tokens` on (specials are plain text) and once off. Two copies instead of
  toggling one flag keep concurrent callers from seeing each other's setting.
* Decoding. Every token's bytes are computed once from the decoder chain the file declares
  (GPT-2 byte table for byte-level BPE, `▁` and `<0xNN>` for SentencePiece-style BPE), so
  `decode_single_token_bytes` exists for `StreamDecoder` and `decode` is the same bytes joined.
  Only chains made of ByteLevel / ByteFallback / Replace("▁", " ") / Metaspace / Fuse / Strip
  are understood; anything else (WordPiece, CTC) is refused with a clear message.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from herd.tokenizer.base import Span, TableTokenizer, gpt2_byte_decoder, import_optional

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def load_json(path: Path) -> dict[str, Any]:
    """Read a checkpoint's JSON object file; a broken file gets a message naming it."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); re-download or re-save the checkpoint") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, not {type(data).__name__}")
    return data


def token_text(value: Any) -> str | None:
    """A token as tokenizer_config.json / special_tokens_map.json write it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def declared_eos_ids(directory: Path) -> list[int]:
    """The eos ids a checkpoint declares in generation_config.json and config.json (in that order)."""
    ids: list[int] = []
    for name in ("generation_config.json", "config.json"):
        path = directory / name
        if not path.is_file():
            continue
        value = load_json(path).get("eos_token_id")
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, int) and v not in ids:
                ids.append(v)
    return ids


def chat_template_from_config(config: dict[str, Any]) -> str | None:
    """tokenizer_config.json's `chat_template`: a string, or a list of named templates ('default' wins)."""
    value = config.get("chat_template")
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default")
    return value if isinstance(value, str) else None


def read_tokenizer_json(file: str | os.PathLike[str]) -> Any:
    """tokenizer.json as a `tokenizers.Tokenizer`, with a clear message when it is missing or broken."""
    tokenizers = import_optional("tokenizers", "reading tokenizer.json")
    file = Path(file)
    if not file.is_file():
        raise FileNotFoundError(f"no tokenizer.json at {file}; pass a checkpoint directory that has one")
    try:
        return tokenizers.Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises a bare Exception for every parse error
        raise ValueError(
            f"{file} is not a valid tokenizer.json ({e}); re-download it, or re-save the tokenizer "
            "with transformers' save_pretrained"
        ) from e


def tokenizer_config(directory: Path) -> dict[str, Any]:
    """special_tokens_map.json overlaid with tokenizer_config.json (the config wins), {} if neither exists."""
    config: dict[str, Any] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        if (directory / name).is_file():
            config.update(load_json(directory / name))
    return config


def _component(obj: Any) -> dict[str, Any] | None:
    # tokenizers' components serialise to their tokenizer.json form through __getstate__.
    return None if obj is None else json.loads(obj.__getstate__())


def _flatten(component: dict[str, Any] | None) -> list[dict[str, Any]]:
    if component is None:
        return []
    if component.get("type") == "Sequence":
        parts = component.get("decoders") or component.get("processors") or []
        return [leaf for part in parts for leaf in _flatten(part)]
    return [component]


class HFTokenizer(TableTokenizer):
    """A `tokenizers.Tokenizer` with herd's encode/decode contract (see the module docstring)."""

    def __init__(
        self,
        tokenizer: Any,
        *,
        bos_id: int | None,
        eos_id: int,
        pad_id: int | None = None,
        stop_tokens: Iterable[int] = (),
        add_bos: bool,
        name: str = "tokenizers",
    ) -> None:
        tokenizers = import_optional("tokenizers", "an HF tokenizer.json or GGUF vocabulary")
        self.name = name
        self.n_words = tokenizer.get_vocab_size(with_added_tokens=True)
        stop_tokens = list(stop_tokens)
        for what, i in (("bos", bos_id), ("eos", eos_id), ("pad", pad_id), *(("stop", s) for s in stop_tokens)):
            if i is not None and not 0 <= i < self.n_words:
                raise ValueError(f"{name}: {what} token id {i} is outside the vocabulary (0..{self.n_words - 1})")
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self.stop_tokens = tuple(dict.fromkeys([eos_id, *stop_tokens]))
        self.add_bos = add_bos
        added = tokenizer.get_added_tokens_decoder()
        token_bytes, self.decode_strips_first_space = _token_bytes_table(tokenizer, set(added), name)
        self._set_tables({t.content: i for i, t in sorted(added.items()) if t.special}, token_bytes)
        # One engine per setting (module docstring); from_str copies the whole pipeline.
        self._plain = tokenizers.Tokenizer.from_str(tokenizer.to_str())
        self._plain.encode_special_tokens = True
        self._special = tokenizer
        self._special.encode_special_tokens = False

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str], *, engine: Any = None) -> HFTokenizer:
        """Load tokenizer.json (a file, or a checkpoint directory holding one) with the files beside it.

        tokenizer_config.json / special_tokens_map.json name bos/eos/pad and `add_bos_token`;
        generation_config.json and config.json add their eos ids to `stop_tokens`. `engine` is
        the file already read by `read_tokenizer_json`, to avoid reading it twice.
        """
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        tok = engine if engine is not None else read_tokenizer_json(file)
        directory = file.parent
        config = tokenizer_config(directory)

        def token_id(key: str) -> int | None:
            text = token_text(config.get(key))
            if text is None:
                return None
            i = tok.token_to_id(text)
            if i is None:
                raise ValueError(f"{directory}: {key} {text!r} is not in tokenizer.json's vocabulary")
            return i

        declared = declared_eos_ids(directory)
        eos_id = token_id("eos_token")
        if eos_id is None:
            if not declared:
                raise ValueError(
                    f"{directory} declares no end-of-sequence token (eos_token in tokenizer_config.json or "
                    "eos_token_id in generation_config.json / config.json); add one"
                )
            eos_id = declared[0]
        bos_id = token_id("bos_token")
        add_bos = config.get("add_bos_token")
        if not isinstance(add_bos, bool):
            add_bos = bos_id is not None and _post_processor_starts_with(tok, bos_id)
        return cls(
            tok,
            bos_id=bos_id,
            eos_id=eos_id,
            pad_id=token_id("pad_token"),
            stop_tokens=declared,
            add_bos=add_bos,
            name=str(file),
        )

    def to_tokenizer_json(self) -> str:
        """The engine as an HF `tokenizer.json` (special tokens recognised, as HF loads it)."""
        return self._special.to_str()

    def _plain_ids(self, text: str) -> list[int]:
        return self._plain.encode(text, add_special_tokens=False).ids

    def _plain_batch(self, texts: list[str], num_threads: int) -> list[list[int]]:
        del num_threads  # the engine sizes its own thread pool (RAYON_NUM_THREADS)
        return [e.ids for e in self._plain.encode_batch(texts, add_special_tokens=False)]

    def _plain_with_spans(self, text: str) -> tuple[list[int], list[Span]]:
        enc = self._plain.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    def _one_pass_with_spans(self, text: str) -> tuple[list[int], list[Span]]:
        # HF's own added-token matching: lstrip/rstrip flags and SentencePiece prefixes as HF has them.
        enc = self._special.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets


def _post_processor_starts_with(tok: Any, bos_id: int) -> bool:
    """Whether the post-processor (what HF adds with add_special_tokens=True) starts single texts with BOS."""
    for proc in _flatten(_component(tok.post_processor)):
        if proc.get("type") == "TemplateProcessing":
            first = (proc.get("single") or [{}])[0]
            special = first.get("SpecialToken", {}).get("id")
            ids = proc.get("special_tokens", {}).get(special, {}).get("ids", [])
            return ids[:1] == [bos_id]
    return False


def _token_bytes_table(tok: Any, added_ids: set[int], name: str) -> tuple[list[bytes], bool]:
    """Every token's bytes under the file's decoder chain, and whether decode drops a leading space."""
    chain = _flatten(_component(tok.decoder))
    kinds = {d.get("type") for d in chain}
    unsupported = kinds - {"ByteLevel", "ByteFallback", "Fuse", "Replace", "Metaspace", "Strip"}
    if unsupported or not kinds:
        raise ValueError(
            f"{name}: decoder {sorted(unsupported) or 'none'} is not supported; herd reads byte-level BPE "
            "(ByteLevel) and SentencePiece-style (Metaspace / ByteFallback) vocabularies"
        )
    spaces = "Metaspace" in kinds or any(
        d.get("type") == "Replace" and d.get("pattern", {}).get("String") == "▁" and d.get("content") == " "
        for d in chain
    )
    strips = any(
        (
            d.get("type") == "Metaspace"
            and (d.get("prepend_scheme", "always") != "never")
            and d.get("add_prefix_space", True)
        )
        or (d.get("type") == "Strip" and d.get("content") == " " and d.get("start", 0) >= 1)
        for d in chain
    )
    byte_level = gpt2_byte_decoder() if "ByteLevel" in kinds else None
    byte_fallback = "ByteFallback" in kinds
    table = []
    for i in range(tok.get_vocab_size(with_added_tokens=True)):
        piece = tok.id_to_token(i)
        if piece is None:
            raise ValueError(f"{name}: token id {i} has no token (the vocabulary has holes); herd needs ids 0..n-1")
        byte = _BYTE_PIECE.fullmatch(piece) if byte_fallback and i not in added_ids else None
        if byte is not None:
            table.append(bytes([int(byte.group(1), 16)]))
            continue
        if spaces:
            piece = piece.replace("▁", " ")
        if byte_level is not None and all(c in byte_level for c in piece):
            table.append(bytes(byte_level[c] for c in piece))
        else:
            # As HF's ByteLevel decoder does: a token with a character outside the byte table
            # (an added token such as "<｜begin▁of▁sentence｜>") is its own UTF-8 text.
            table.append(piece.encode("utf-8"))
    return table, strips
