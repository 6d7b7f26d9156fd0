"""A GGUF file's vocabulary (`tokenizer.ggml.*`) as a herd tokenizer, tokenizing as llama.cpp does.

The metadata comes from `herd.gguf_header`, the bottom layer's plain-Python reader of the GGUF
header, which `herd.model` shares: `gguf.GGUFReader` builds a numpy view per string and takes
seconds for a vocabulary; the header reader takes hundredths of a second and never touches the
tensors.

Two vocabulary models are built (llama.cpp's names):
* `gpt2`: byte-level BPE. llama.cpp splits text with a list of regexes chosen by
  `tokenizer.ggml.pre`, each applied to the pieces the previous one left (matches and the gaps
  between them both become pieces), then maps bytes through GPT-2's table. That is HF's
  `Split(..., "isolated")` chained, then `ByteLevel(use_regex=False)`. Unknown pre types are
  refused: guessing a regex silently changes the ids a model sees.
* `llama`: SentencePiece-style BPE with scores and `<0xNN>` byte tokens. HF BPE reproduces it with
  merges ranked by the merged piece's score; like llama.cpp (and HF's legacy Llama tokenizer), a
  `▁` is put before the text and again after every special token when `add_space_prefix` is set.

A Llama 3 vocabulary (`<|begin_of_text|>` at 128000) is turned back into tiktoken ranks
(rank = id) and gets herd's exact Llama 3 `Tokenizer`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from herd.gguf_header import read_gguf_header
from herd.tokenizer.base import gpt2_byte_decoder, import_optional
from herd.tokenizer.hf import HFTokenizer
from herd.tokenizer.tokenizer import NUM_SPECIAL_TOKENS, Tokenizer

LLAMA3_N_BASE = 128_000
LLAMA3_BOS = "<|begin_of_text|>"
# Special tokens every Llama 3 release puts at the same offsets after the base tokens (3.0 and
# 3.1 name other slots differently).
LLAMA3_ANCHORS = {
    0: LLAMA3_BOS,
    1: "<|end_of_text|>",
    6: "<|start_header_id|>",
    7: "<|end_header_id|>",
    9: "<|eot_id|>",
}
LLAMA3_PRE = ("llama3", "llama-v3", "llama-bpe")

# llama.cpp's token types (llama_token_type in gguf / llama-vocab).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# tokenizer.ggml.pre -> (regexes applied in turn, ignore_merges), from llama.cpp's llama-vocab.cpp.
# llama.cpp writes the contractions of the Llama 3 / Qwen2 patterns as '[sS] etc.; (?i:) is the same.
PRE_TOKENIZERS: dict[str, tuple[tuple[str, ...], bool]] = {
    "default": ((r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"), False),
    "gpt-2": ((_GPT2,), False),
    "phi-2": ((_GPT2,), False),
    "mpt": ((_GPT2,), False),
    "olmo": ((_GPT2,), False),
    "smollm": ((r"\p{N}", _GPT2), False),
    "starcoder": ((r"\p{N}", _GPT2), False),
    "refact": ((r"\p{N}", _GPT2), False),
    "llama3": ((_LLAMA3,), True),
    "llama-v3": ((_LLAMA3,), True),
    "llama-bpe": ((_LLAMA3,), True),
    "dbrx": ((_LLAMA3,), False),
    "smaug-bpe": ((_LLAMA3,), False),
    "qwen2": ((_QWEN2,), False),
    "stablelm2": ((_QWEN2,), False),
}

def read_gguf_metadata(
    path: str | os.PathLike[str], *, prefixes: tuple[str, ...] = ("tokenizer.", "general.")
) -> dict[str, Any]:
    """The key/value metadata of a GGUF file whose keys start with one of `prefixes`."""
    return read_gguf_header(path, prefixes=prefixes).metadata


@dataclass(frozen=True)
class GGUFVocab:
    """The tokenizer part of a GGUF file's metadata."""

    model: str  # "gpt2" (byte-level BPE) or "llama" (SentencePiece-style)
    pre: str | None
    tokens: list[str]
    token_types: list[int]
    scores: list[float] | None
    merges: list[str] | None
    bos_id: int | None
    eos_id: int | None
    unk_id: int | None
    pad_id: int | None
    stop_ids: tuple[int, ...]  # eos, eot, eom: every id that ends a turn
    add_bos: bool
    add_space_prefix: bool
    chat_template: str | None

    @classmethod
    def from_metadata(cls, meta: dict[str, Any], *, name: str = "GGUF") -> GGUFVocab:
        model = meta.get("tokenizer.ggml.model")
        tokens = meta.get("tokenizer.ggml.tokens")
        if model is None or not isinstance(tokens, list) or not tokens:
            raise ValueError(f"{name} has no tokenizer.ggml.model / tokenizer.ggml.tokens; it carries no vocabulary")
        if model not in ("gpt2", "llama"):
            raise ValueError(
                f"{name}: tokenizer model {model!r} is not supported; herd reads 'gpt2' (byte-level BPE) and "
                "'llama' (SentencePiece) vocabularies"
            )
        n = len(tokens)
        types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * n
        if len(types) != n:
            raise ValueError(f"{name}: {len(types)} token types for {n} tokens")

        def token_id(key: str) -> int | None:
            value = meta.get(f"tokenizer.ggml.{key}")
            if value is None:
                return None
            if not 0 <= value < n:
                raise ValueError(f"{name}: tokenizer.ggml.{key} = {value} is outside the vocabulary (0..{n - 1})")
            return int(value)

        eos = token_id("eos_token_id")
        stops = tuple(
            dict.fromkeys(i for i in (eos, token_id("eot_token_id"), token_id("eom_token_id")) if i is not None)
        )
        pre = meta.get("tokenizer.ggml.pre")
        # llama.cpp's defaults when the flags are absent: SentencePiece and Llama 3 add BOS.
        default_bos = model == "llama" or pre in LLAMA3_PRE
        add_bos = meta.get("tokenizer.ggml.add_bos_token", default_bos)
        return cls(
            model=model,
            pre=pre,
            tokens=tokens,
            token_types=list(types),
            scores=meta.get("tokenizer.ggml.scores"),
            merges=meta.get("tokenizer.ggml.merges"),
            bos_id=token_id("bos_token_id"),
            eos_id=eos,
            unk_id=token_id("unknown_token_id"),
            pad_id=token_id("padding_token_id"),
            stop_ids=stops,
            add_bos=bool(add_bos),
            add_space_prefix=bool(meta.get("tokenizer.ggml.add_space_prefix", model == "llama")),
            chat_template=meta.get("tokenizer.chat_template"),
        )


def read_gguf_vocab(path: str | os.PathLike[str]) -> GGUFVocab:
    return GGUFVocab.from_metadata(read_gguf_metadata(path), name=str(path))


def gguf_tokenizer(path: str | os.PathLike[str]) -> Tokenizer | HFTokenizer:
    """The tokenizer a GGUF file declares: herd's Llama 3 Tokenizer for a Llama 3 vocabulary, else HF-built."""
    return tokenizer_from_vocab(read_gguf_vocab(path), name=str(path))


def tokenizer_from_vocab(vocab: GGUFVocab, *, name: str = "GGUF") -> Tokenizer | HFTokenizer:
    if vocab.eos_id is None:
        raise ValueError(f"{name} declares no tokenizer.ggml.eos_token_id; generation would never stop")
    n_base = vocab.tokens.index(LLAMA3_BOS) if LLAMA3_BOS in vocab.tokens else None
    if (
        vocab.model == "gpt2"
        and vocab.pre in LLAMA3_PRE
        and llama3_layout_base(_at(vocab.tokens), n_base, len(vocab.tokens))
    ):
        tok = llama3_from_byte_level({t: i for i, t in enumerate(vocab.tokens[:n_base])}, n_base)
        tok.stop_tokens = tuple(dict.fromkeys(tok.stop_tokens + vocab.stop_ids))
        return tok
    tokenizers = import_optional("tokenizers", "a GGUF vocabulary")
    if vocab.model == "gpt2":
        tok = _byte_level_bpe(tokenizers, vocab, name)
    else:
        tok = _sentencepiece_bpe(tokenizers, vocab, name)
    specials, user = [], []
    for text, kind in zip(vocab.tokens, vocab.token_types, strict=True):
        # llama.cpp matches control and unknown tokens in text only when asked (parse_special),
        # user-defined ones always: HF's special and ordinary added tokens.
        if kind in (CONTROL, UNKNOWN):
            specials.append(tokenizers.AddedToken(text, special=True, normalized=False))
        elif kind == USER_DEFINED:
            user.append(tokenizers.AddedToken(text, special=False, normalized=False))
    tok.add_special_tokens(specials)
    tok.add_tokens(user)
    if tok.get_vocab_size(with_added_tokens=True) != len(vocab.tokens):
        raise ValueError(f"{name}: the vocabulary has duplicate tokens; herd needs one id per token text")
    return HFTokenizer(
        tok,
        bos_id=vocab.bos_id,
        eos_id=vocab.eos_id,
        pad_id=vocab.pad_id,
        stop_tokens=vocab.stop_ids,
        add_bos=vocab.add_bos,
        name=name,
    )


def llama3_layout_base(token_at: Callable[[int], str | None], n_base: int | None, n_total: int) -> int | None:
    """`n_base` when the vocabulary has Llama 3's layout (byte-level tokens 0..n_base-1, then its 256
    special tokens, <|begin_of_text|> first), else None. Meta's vocabularies have 128,000 base
    tokens; the small ones herd trains (train_bpe.py) have the same layout with fewer."""
    if n_base is None or n_total < n_base + NUM_SPECIAL_TOKENS:
        return None
    return n_base if all(token_at(n_base + k) == name for k, name in LLAMA3_ANCHORS.items()) else None


def llama3_from_byte_level(base_vocab: Mapping[str, int], n_base: int = LLAMA3_N_BASE) -> Tokenizer:
    """herd's Llama 3 Tokenizer from a byte-level BPE vocabulary's base tokens (rank = id).

    Tokens after the 256 Llama 3 special tokens (3.2 Vision's <|image|> at 128256) are not part of
    the text tokenizer and are dropped; a model whose embedding has them fails the size check.
    """
    table = gpt2_byte_decoder()
    ranks: dict[bytes, int] = {}
    for text, i in base_vocab.items():
        if i >= n_base:
            continue
        try:
            ranks[bytes(table[c] for c in text)] = i
        except KeyError:
            raise ValueError(
                f"token {i} ({text!r}) is not byte-level BPE text; this is not a Llama 3-style vocabulary"
            ) from None
    if len(ranks) != n_base:
        raise ValueError(f"expected {n_base} distinct base tokens before <|begin_of_text|>, found {len(ranks)}")
    return Tokenizer(ranks, name="llama3" if n_base == LLAMA3_N_BASE else f"bpe{n_base}")


def _at(tokens: Sequence[str]) -> Callable[[int], str | None]:
    return lambda i: tokens[i] if 0 <= i < len(tokens) else None


def _byte_level_bpe(tokenizers: Any, vocab: GGUFVocab, name: str) -> Any:
    # Files written before llama.cpp recorded the pre type get its "default" (llama.cpp warns
    # that quality suffers; the ids still equal what llama.cpp gave the model).
    pre = "default" if vocab.pre is None else vocab.pre
    if pre not in PRE_TOKENIZERS:
        raise ValueError(
            f"{name}: pre-tokenizer {vocab.pre!r} (tokenizer.ggml.pre) is not supported; herd knows "
            f"{', '.join(sorted(PRE_TOKENIZERS))}. Use the model's tokenizer.json instead (pass --tokenizer)"
        )
    if not vocab.merges:
        raise ValueError(f"{name}: a byte-level BPE vocabulary needs tokenizer.ggml.merges, and this file has none")
    regexes, ignore_merges = PRE_TOKENIZERS[pre]
    merges = []
    for line in vocab.merges:
        parts = line.split(" ")
        if len(parts) != 2:
            raise ValueError(f"{name}: merge {line!r} is not 'left right'")
        merges.append((parts[0], parts[1]))
    model = tokenizers.models.BPE(
        {t: i for i, t in enumerate(vocab.tokens)},
        merges,
        ignore_merges=ignore_merges,
    )
    tok = tokenizers.Tokenizer(model)
    pre = tokenizers.pre_tokenizers
    tok.pre_tokenizer = pre.Sequence(
        [pre.Split(tokenizers.Regex(r), behavior="isolated") for r in regexes]
        + [pre.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.decoder = tokenizers.decoders.ByteLevel()
    return tok


def _sentencepiece_bpe(tokenizers: Any, vocab: GGUFVocab, name: str) -> Any:
    if vocab.scores is None or len(vocab.scores) != len(vocab.tokens):
        raise ValueError(
            f"{name}: a SentencePiece ('llama') vocabulary needs one tokenizer.ggml.scores entry per token"
        )
    ids = {t: i for i, t in enumerate(vocab.tokens)}
    mergeable = [i for i, k in enumerate(vocab.token_types) if k in (NORMAL, USER_DEFINED)]
    model = tokenizers.models.BPE(
        ids,
        sentencepiece_merges(vocab.tokens, vocab.scores, mergeable),
        unk_token=None if vocab.unk_id is None else vocab.tokens[vocab.unk_id],
        fuse_unk=True,
        byte_fallback=True,
    )
    tok = tokenizers.Tokenizer(model)
    norm, dec = tokenizers.normalizers, tokenizers.decoders
    steps = [norm.Replace(" ", "▁")]
    if vocab.add_space_prefix:
        steps.insert(0, norm.Prepend("▁"))
    tok.normalizer = norm.Sequence(steps)
    decoders = [dec.Replace("▁", " "), dec.ByteFallback(), dec.Fuse()]
    if vocab.add_space_prefix:
        decoders.append(dec.Strip(" ", 1, 0))
    tok.decoder = dec.Sequence(decoders)
    return tok


def sentencepiece_merges(tokens: list[str], scores: list[float], mergeable: list[int]) -> list[tuple[str, str]]:
    """BPE merges equivalent to SentencePiece's "merge the pair whose result scores highest".

    Every way to cut a mergeable piece into two pieces of the vocabulary is a merge, ranked by the
    piece's score (higher first); cuts of one piece keep left-to-right order.
    """
    vocab = set(tokens)
    ranked = []
    for i in mergeable:
        piece = tokens[i]
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((-scores[i], i, cut, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]
