"""The tokenizer files that make an exported checkpoint work outside herd.

HF `transformers` (and vLLM, which loads through it) needs `tokenizer.json`,
`tokenizer_config.json` with a chat template, and every stop id in `generation_config.json`;
llama.cpp needs the vocabulary in the GGUF's `tokenizer.ggml.*` metadata. herd's own tokenizer
is a tiktoken rank file, which neither reads. This module writes, from one source (a tiktoken
rank file, or a checkpoint directory that already has HF tokenizer files), what each of them
needs.

Trade-off: the HF files are *generated* from the rank file rather than asked of transformers'
`TikTokenConverter`, whose result they reproduce (same vocabulary strings, same merges in the
same order), because the converter lives in `transformers` and herd's export must not need it.
The chat template is herd's (Meta's reference) 3.1 format, not HF's official 3.1 template; see
`LLAMA31_CHAT_TEMPLATE` for exactly what it reproduces.

`tokenizers` (tokenizer.json) is imported where used: it is in the `models` extra. A GGUF
source's keys come from `herd.gguf_header` (plain Python, no `gguf` package needed).

Layouts: an HF directory never has a tiktoken file at its root, since llama.cpp's converter and
transformers read a root `tokenizer.model` as SentencePiece; it goes to `original/tokenizer.model`,
where Meta's HF repositories keep it and where herd looks for it. A Meta directory keeps it at
the root, as Meta's releases do. A SentencePiece `tokenizer.model` (Llama 1/2) belongs at the root
in both.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from herd.tokenizer.gguf_vocab import PRE_TOKENIZERS, read_gguf_metadata
from herd.tokenizer.hf import load_json
from herd.tokenizer.tokenizer import NUM_SPECIAL_TOKENS, PAT_STR, Tokenizer

Layout = Literal["hf", "meta"]

RANK_FILE = "tokenizer.model"
ORIGINAL_RANK_FILE = "original/tokenizer.model"
# HF tokenizer files copied as they are from a source directory that has them.
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
GENERATION_CONFIG = "generation_config.json"

_MISSING_EXTRA = "pip install 'herd[models]'"
# A tiktoken rank file starts with `<base64> <rank>`; a SentencePiece model is a binary protobuf.
_RANK_LINE = re.compile(rb"[A-Za-z0-9+/]+=*[ \t]+\d+\r?\n?")


# ---- byte-level strings ----------------------------------------------------------------------


def _byte_chars() -> list[str]:
    """GPT-2's byte-to-unicode table: byte b is written as chars[b].

    Printable Latin-1 bytes stand for themselves; the other 68 get U+0100, U+0101, ... in byte
    order, so every token is printable text (space is "Ġ", newline "Ċ"). HF's ByteLevel and
    llama.cpp's "gpt2" vocabularies both use this table.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = [""] * 256
    for b in printable:
        chars[b] = chr(b)
    for i, b in enumerate(b for b in range(256) if not chars[b]):
        chars[b] = chr(256 + i)
    return chars


_BYTE_CHARS = _byte_chars()


def byte_level_text(token: bytes) -> str:
    """A token's bytes as the byte-level string HF tokenizer.json and GGUF vocabularies store."""
    return "".join(_BYTE_CHARS[b] for b in token)


def _base_tokens(tokenizer: Tokenizer) -> list[bytes]:
    """The rank-ordered token bytes (ranks 0..n_base-1; the special tokens follow them)."""
    return [tokenizer.decode_single_token_bytes(i) for i in range(tokenizer.bos_id)]


def _merges(tokens: Sequence[bytes]) -> list[tuple[bytes, bytes]]:
    """Merges that make HF's BPE reproduce tiktoken, recovered from the ranks alone.

    The result HF's TikTokenConverter produces: every way to write a token as two tokens,
    ordered by the rank of the token they make (tiktoken merges the pair whose concatenation has
    the lowest rank), splits of one token ordered by their left, then right part's rank.
    """
    rank = {t: r for r, t in enumerate(tokens)}
    merges: list[tuple[bytes, bytes]] = []
    for token in tokens:
        splits = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in rank and token[i:] in rank]
        splits.sort(key=lambda lr: (rank[lr[0]], rank[lr[1]]))
        merges.extend(splits)
    return merges


def _special_tokens(tokenizer: Tokenizer) -> list[str]:
    """The 256 special tokens' text in id order."""
    special = sorted(tokenizer.special_tokens.items(), key=lambda kv: kv[1])
    assert [i for _, i in special] == list(range(tokenizer.bos_id, tokenizer.n_words))
    return [name for name, _ in special]


# ---- HF tokenizer.json -----------------------------------------------------------------------


def hf_tokenizer_json(tokenizer: Tokenizer) -> str:
    """An HF `tokenizer.json` that encodes exactly as herd's tiktoken `tokenizer` does.

    Byte-level BPE with the Llama 3 split regex and `ignore_merges` (a pre-token that is itself
    a token is emitted whole, as tiktoken does), the 256 special tokens as added special
    tokens, and a post-processor that prepends <|begin_of_text|> as Meta's HF tokenizers do.
    Not reproduced: herd's (Meta's) cut of runs longer than 25,000 characters, and HF's
    reading of special-token text inside input as the special token.
    """
    try:
        from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
        from tokenizers import Tokenizer as HFTokenizer
    except ImportError:
        raise ImportError(f"writing tokenizer.json needs Hugging Face tokenizers: `{_MISSING_EXTRA}`") from None
    tokens = _base_tokens(tokenizer)
    vocab = {byte_level_text(t): r for r, t in enumerate(tokens)}
    merges = [(byte_level_text(a), byte_level_text(b)) for a, b in _merges(tokens)]
    hf = HFTokenizer(models.BPE(vocab, merges, fuse_unk=False, ignore_merges=True))
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PAT_STR), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in _special_tokens(tokenizer)])
    bos = "<|begin_of_text|>"
    hf.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),  # offsets only; keeps them on the original text
        processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1", special_tokens=[(bos, tokenizer.bos_id)]
        ),
    ])
    return hf.to_str(pretty=False)


# ---- chat template ---------------------------------------------------------------------------

# herd's Llama 3.1 chat format (`ChatFormat(tok, version="3.1")`, Meta's llama-models reference)
# as a jinja2 template for HF `apply_chat_template`, vLLM and llama.cpp. It is not HF's official
# Llama 3.1 template: that one adds a "Cutting Knowledge Date / Today Date" block to every system
# prompt and renders `tools` itself; Meta's ChatFormat adds nothing (herd's
# `llama31_system_prompt` writes that block when asked). Rendered and tokenized by HF it gives
# herd's ids for system, user, assistant and tool/ipython turns, assistant
# `stop_reason: "end_of_message"` (<|eom_id|>), builtin tool calls (brave_search, wolfram_alpha,
# photogen, code_interpreter) and one custom call in herd's default JSON form, with or without
# the generation prompt. Not covered: the function_tag and python_list tool formats; non-ASCII
# tool-call arguments (written raw here, as \\u escapes by herd, because llama.cpp's renderer has
# no tojson(ensure_ascii=...)); special-token text typed inside content, which HF reads as the
# special token and herd as plain text; and joins where HF's one-pass BPE merges across pieces
# herd encodes apart: a content that starts with a line break (joined to the header's "\n\n"),
# and a user turn's RAG `context` after a content ending in punctuation or whitespace.
# Tool definitions go in the system message as herd's format expects; passing `tools` is refused.
LLAMA31_CHAT_TEMPLATE = (
    "{%- if tools is defined and tools -%}"
    "{{- raise_exception('this chat template (herd\\'s Llama 3.1 format) does not render tool definitions; "
    "describe the tools in the system message') -}}"
    "{%- endif -%}"
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- set role = 'ipython' if message['role'] == 'tool' else message['role'] -%}"
    "{%- if role not in ['system', 'user', 'assistant', 'ipython'] -%}"
    "{{- raise_exception('unknown role ' + role + '; use system, user, assistant, tool or ipython') -}}"
    "{%- endif -%}"
    "{{- '<|start_header_id|>' + role + '<|end_header_id|>\\n\\n' -}}"
    "{%- set calls = message['tool_calls'] if message['tool_calls'] is defined and message['tool_calls'] else [] -%}"
    "{%- set builtin = ['brave_search', 'wolfram_alpha', 'photogen', 'code_interpreter'] -%}"
    "{%- if calls -%}"
    "{%- set first = calls[0]['function'] if calls[0]['function'] is defined else calls[0] -%}"
    "{%- if calls | length > 1 -%}"
    "{{- raise_exception('herd\\'s Llama 3.1 format carries one tool call per message') -}}"
    "{%- endif -%}"
    "{%- if first['name'] in builtin -%}{{- '<|python_tag|>' -}}{%- endif -%}"
    "{%- endif -%}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- elif message['content'] is iterable -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- if message['context'] is defined and message['context'] is not none -%}"
    "{{- '\\n\\n' + message['context'] -}}"
    "{%- endif -%}"
    "{%- if calls -%}"
    "{%- set args = first['arguments'] if first['arguments'] is defined else first['parameters'] -%}"
    "{%- if first['name'] == 'code_interpreter' -%}"
    "{{- args['code'] -}}"
    "{%- elif first['name'] in builtin -%}"
    "{{- first['name'] + '.call(query=\"' + args['query'] + '\")' -}}"
    "{%- else -%}"
    "{{- '{\"type\": \"function\", \"name\": ' + first['name'] | tojson + ', \"parameters\": ' -}}"
    "{{- (args if args is string else args | tojson) + '}' -}}"
    "{%- endif -%}"
    "{%- endif -%}"
    "{%- if message['stop_reason'] is defined and message['stop_reason'] == 'end_of_message' -%}"
    "{{- '<|eom_id|>' -}}"
    "{%- else -%}"
    "{{- '<|eot_id|>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}"
    "{%- endif -%}"
)


# ---- HF configs ------------------------------------------------------------------------------


def tokenizer_config(tokenizer: Tokenizer, *, model_max_length: int) -> dict[str, Any]:
    """`tokenizer_config.json` for `hf_tokenizer_json(tokenizer)`: fast tokenizer, Llama 3 tokens, 3.1 template.

    eos_token is <|end_of_text|>, herd's `Tokenizer.eos_id` (what `encode(eos=True)` appends);
    generation stops on <|eom_id|> and <|eot_id|> as well because generation_config.json lists
    them. Decoding keeps spaces as they are (`clean_up_tokenization_spaces` False), as tiktoken does.
    """
    if model_max_length <= 0:
        raise ValueError(f"model_max_length must be positive, got {model_max_length}")
    names = {v: k for k, v in tokenizer.special_tokens.items()}
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": names[tokenizer.bos_id],
        "eos_token": names[tokenizer.eos_id],
        "pad_token": names[tokenizer.pad_id],
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": model_max_length,
        "chat_template": LLAMA31_CHAT_TEMPLATE,
    }


def generation_config(eos_ids: Sequence[int], bos_id: int | None, *, pad_id: int | None = None) -> dict[str, Any]:
    """`generation_config.json` declaring every stop id (HF generate and vLLM stop on each).

    A single id is written as a plain int, several as a list, as HF's own files do.
    """
    eos = list(dict.fromkeys(int(i) for i in eos_ids))  # unique, order kept
    if not eos:
        raise ValueError("eos_ids is empty; a model needs at least one stop token")
    config: dict[str, Any] = {"bos_token_id": bos_id, "eos_token_id": eos[0] if len(eos) == 1 else eos}
    if pad_id is not None:
        config["pad_token_id"] = pad_id
    return config


def _json_bytes(data: Any) -> bytes:
    return (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


# ---- a checkpoint's tokenizer files ----------------------------------------------------------


def _is_rank_file(data: bytes) -> bool:
    return _RANK_LINE.fullmatch(data.split(b"\n", 1)[0] + b"\n") is not None


def _rank_file_in(path: Path) -> Path | None:
    """A tiktoken rank file: `path` itself, or tokenizer.model in the directory or its original/."""
    candidates = [path] if path.is_file() else [path / RANK_FILE, path / ORIGINAL_RANK_FILE]
    for p in candidates:
        if p.is_file():
            with open(p, "rb") as f:
                if _is_rank_file(f.read(256)):
                    return p
    return None


def _check_source(source: str | os.PathLike[str]) -> Path:
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(
            f"tokenizer source {str(path)!r} does not exist; pass a tiktoken rank file (tokenizer.model) "
            "or a checkpoint directory with tokenizer files"
        )
    if path.suffix == ".gguf":
        raise ValueError(
            f"{path} is a GGUF file: its tokenizer lives in its metadata. For a GGUF output use "
            "gguf_tokenizer_metadata(path); for HF files, load it with transformers' "
            "AutoTokenizer.from_pretrained(dir, gguf_file=...) and save_pretrained"
        )
    return path


def tokenizer_files(
    source: str | os.PathLike[str], *, layout: Layout = "hf", model_max_length: int | None = None
) -> dict[str, bytes]:
    """Relative path -> bytes of every tokenizer file a `layout` checkpoint directory needs.

    source: a tiktoken rank file (Llama 3's or one herd trained), or a checkpoint directory.
      * A rank file (also a directory's root or original/ tokenizer.model) gives, for "hf",
        tokenizer.json, tokenizer_config.json (with the 3.1 chat template),
        special_tokens_map.json and original/tokenizer.model; for "meta", the root
        tokenizer.model that Meta's directories have.
      * A directory with HF tokenizer files (tokenizer.json, tokenizer_config.json,
        special_tokens_map.json, chat_template.jinja) gets them copied as they are, a
        SentencePiece tokenizer.model (Llama 1/2) at the root, and a rank file where `layout`
        keeps it.
    model_max_length: for tokenizer_config.json (use the model's max_seq_len); None reads
      131072, Llama 3.1's context.
    """
    if layout not in ("hf", "meta"):
        raise ValueError(f"layout must be 'hf' or 'meta', got {layout!r}")
    path = _check_source(source)
    rank_file = _rank_file_in(path)
    if path.is_file() and rank_file is None and path.suffix != ".model":
        raise ValueError(
            f"{path} is neither a tiktoken rank file nor a SentencePiece .model file; to copy HF tokenizer "
            "files (tokenizer.json, ...) pass the directory that holds them"
        )
    has_hf_files = path.is_dir() and any((path / n).is_file() for n in HF_TOKENIZER_FILES)
    files: dict[str, bytes] = {}
    if has_hf_files:
        files.update({n: (path / n).read_bytes() for n in HF_TOKENIZER_FILES if (path / n).is_file()})
    elif rank_file is not None and layout == "hf":
        max_length = 131072 if model_max_length is None else model_max_length
        files.update(_generated_hf_files(rank_file, max_length))
    if rank_file is not None:
        files[ORIGINAL_RANK_FILE if layout == "hf" else RANK_FILE] = rank_file.read_bytes()
    elif path.is_file() or (path / RANK_FILE).is_file():
        # Not a rank file: SentencePiece (Llama 1/2), whose place is the root in both layouts.
        files[RANK_FILE] = (path if path.is_file() else path / RANK_FILE).read_bytes()
    if not files:
        raise FileNotFoundError(
            f"no tokenizer found in {path}: expected tokenizer.json / tokenizer_config.json, or a "
            "tokenizer.model (tiktoken ranks at the root or in original/, or SentencePiece at the root)"
        )
    return files


def _generated_hf_files(rank_file: Path, model_max_length: int) -> dict[str, bytes]:
    # Cached on the file's contents: one run exports the same vocabulary many times (every
    # post-training stage), and the Llama 3 tokenizer.json takes seconds to build.
    key = (hashlib.sha256(rank_file.read_bytes()).hexdigest(), model_max_length)
    if key not in _HF_FILES_CACHE:
        tok = Tokenizer.from_file(rank_file)
        config = tokenizer_config(tok, model_max_length=model_max_length)
        special_map = {k: config[k] for k in ("bos_token", "eos_token", "pad_token")}
        _HF_FILES_CACHE.clear()  # one vocabulary at a time: the Llama 3 files are 8 MB
        _HF_FILES_CACHE[key] = {
            "tokenizer.json": hf_tokenizer_json(tok).encode("utf-8"),
            "tokenizer_config.json": _json_bytes(config),
            "special_tokens_map.json": _json_bytes(special_map),
        }
    return dict(_HF_FILES_CACHE[key])


_HF_FILES_CACHE: dict[tuple[str, int], dict[str, bytes]] = {}


def stop_token_ids(tokenizer: Tokenizer) -> list[int]:
    """<|end_of_text|>, <|eom_id|>, <|eot_id|>: every id herd's generation stops on."""
    return list(tokenizer.stop_tokens)


def generation_config_of(source: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The generation config a checkpoint written with `source`'s tokenizer should declare.

    A directory's own generation_config.json (else config.json's ids) is kept, sampling
    defaults included; with a tiktoken vocabulary the stop ids are extended to all of
    <|end_of_text|>, <|eom_id|> and <|eot_id|> (a fine-tuned chat model ends its turns with
    <|eot_id|>, and HF/vLLM stop only on declared ids). None when nothing declares any id.
    """
    path = _check_source(source)
    config: dict[str, Any] = {}
    if path.is_dir():
        for name in ("config.json", GENERATION_CONFIG):  # the generation config wins
            if (path / name).is_file():
                data = load_json(path / name)
                keys = data if name == GENERATION_CONFIG else ("bos_token_id", "eos_token_id")
                config.update({k: data[k] for k in keys if data.get(k) is not None})
    rank_file = _rank_file_in(path)
    if rank_file is not None:
        tok = Tokenizer.from_file(rank_file)
        declared = config.get("eos_token_id", [])
        declared = declared if isinstance(declared, list) else [declared]
        config.update(generation_config([*declared, *stop_token_ids(tok)], config.get("bos_token_id", tok.bos_id)))
    return config or None


# ---- GGUF tokenizer metadata -----------------------------------------------------------------

# llama.cpp's token types (llama_token_type / gguf.TokenType).
GGUF_NORMAL, GGUF_CONTROL, GGUF_USER_DEFINED, GGUF_UNUSED = 1, 3, 4, 5

# HF Split pre-tokenizer regex -> llama.cpp pre type (tokenizer.ggml.pre). llama.cpp hard-codes
# one regex per type in llama-vocab.cpp; "llama-bpe"'s is exactly Llama 3's (the contractions
# spelled out case by case instead of (?i:...)), "qwen2"'s the same with single digits.
_SPLIT_PRE_TYPES = {
    PAT_STR: "llama-bpe",
    PAT_STR.replace(r"\p{N}{1,3}", r"\p{N}"): "qwen2",
}


def gguf_tokenizer_metadata(
    source: Tokenizer | str | os.PathLike[str], *, vocab_size: int | None = None
) -> dict[str, Any]:
    """The `tokenizer.*` GGUF keys llama.cpp needs, as plain Python values.

    source: herd's tiktoken `Tokenizer`; a rank file or a checkpoint directory (its
    tokenizer.json + tokenizer_config.json when it has them, else its tiktoken file); or a
    `.gguf` file, whose `tokenizer.*` keys are carried over as they are (pre type included).
    vocab_size: the model's embedding rows; the token list is padded to it with unused
    `[PAD<i>]` tokens (llama.cpp wants one token per row), as llama.cpp's converter does.

    Ids are to be written as UINT32, `token_type` as an INT32 array, flags as BOOL (see
    `add_gguf_tokenizer_metadata`).
    """
    if isinstance(source, Tokenizer):
        meta = _tiktoken_metadata(source)
    else:
        path = Path(source)
        if path.suffix == ".gguf" and path.is_file():
            return _gguf_source_metadata(path, vocab_size=vocab_size)
        path = _check_source(path)
        if path.is_dir() and (path / "tokenizer.json").is_file():
            meta = _tokenizer_json_metadata(path)
        elif (rank_file := _rank_file_in(path)) is not None:
            meta = _tiktoken_metadata(Tokenizer.from_file(rank_file))
        else:
            raise ValueError(
                f"no byte-level BPE vocabulary in {path}: GGUF export needs a tiktoken rank file or an HF "
                "tokenizer.json (SentencePiece vocabularies such as Llama 1/2's are not supported yet)"
            )
    return _pad_vocab(meta, vocab_size)


def add_gguf_tokenizer_metadata(writer: Any, metadata: Mapping[str, Any]) -> None:
    """Write `gguf_tokenizer_metadata`'s keys to a `gguf.GGUFWriter` with the types llama.cpp reads."""
    for key, value in metadata.items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)  # token ids; llama.cpp refuses a signed type here
        elif isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, list):
            writer.add_array(key, value)  # str -> STRING, int -> INT32, float -> FLOAT32
        else:
            raise ValueError(f"GGUF key {key}: cannot write a value of type {type(value).__name__}")


def _tiktoken_metadata(tokenizer: Tokenizer) -> dict[str, Any]:
    tokens = _base_tokens(tokenizer)
    n_special = len(_special_tokens(tokenizer))
    assert n_special == NUM_SPECIAL_TOKENS
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "llama-bpe",
        "tokenizer.ggml.tokens": [byte_level_text(t) for t in tokens] + _special_tokens(tokenizer),
        "tokenizer.ggml.token_type": [GGUF_NORMAL] * len(tokens) + [GGUF_CONTROL] * n_special,
        "tokenizer.ggml.merges": [f"{byte_level_text(a)} {byte_level_text(b)}" for a, b in _merges(tokens)],
        "tokenizer.ggml.bos_token_id": tokenizer.bos_id,
        "tokenizer.ggml.eos_token_id": tokenizer.eos_id,
        "tokenizer.ggml.eot_token_id": tokenizer.eot_id,
        "tokenizer.ggml.eom_token_id": tokenizer.eom_id,
        "tokenizer.ggml.padding_token_id": tokenizer.pad_id,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.chat_template": LLAMA31_CHAT_TEMPLATE,
    }


def _pre_type(pre: Any, *, clean_up_spaces: bool, where: Path) -> str:
    """llama.cpp's name for an HF byte-level pre-tokenizer; refuses any it would split differently."""
    parts = pre.get("pretokenizers", []) if isinstance(pre, dict) and pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") if isinstance(p, dict) else None for p in parts]
    byte_level = parts[-1] if kinds and kinds[-1] == "ByteLevel" else None
    if byte_level is not None and not byte_level.get("add_prefix_space", False):
        regex = byte_level.get("use_regex", True)
        if kinds == ["ByteLevel"] and regex:
            return "gpt-2"
        if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and regex:
            # StarCoder's split; llama.cpp's "smollm" differs from "starcoder" only in not
            # cleaning spaces on decode, which tokenizer_config says.
            return "starcoder" if clean_up_spaces else "smollm"
        if kinds == ["Split", "ByteLevel"] and not regex:
            split = parts[0]
            pattern = split.get("pattern", {}).get("Regex")
            if split.get("behavior") == "Isolated" and not split.get("invert") and pattern in _SPLIT_PRE_TYPES:
                return _SPLIT_PRE_TYPES[pattern]
        splits = parts[:-1]
        if splits and not regex and all(k == "Split" and p.get("behavior") == "Isolated" and not p.get("invert")
                                        for k, p in zip(kinds, splits)):
            # The chain herd itself builds from a GGUF vocabulary (gguf_vocab.PRE_TOKENIZERS): one
            # isolated Split per llama.cpp regex, in order; names sharing a chain are told apart
            # by the decode clean-up as above, else the canonical one is taken.
            chain = tuple(p.get("pattern", {}).get("Regex") for p in splits)
            names = [name for name, (regexes, _) in PRE_TOKENIZERS.items() if regexes == chain]
            if "smollm" in names:
                return "starcoder" if clean_up_spaces else "smollm"
            if names:
                return next((n for n in ("gpt-2", "llama-bpe", "qwen2", "default") if n in names), names[0])
    raise ValueError(
        f"{where}: the pre-tokenizer {json.dumps(pre)[:300]} is not one herd can name for llama.cpp "
        "(known: Llama 3's split regex = llama-bpe, Qwen2's = qwen2, digits + GPT-2 = smollm/starcoder, "
        "GPT-2's = gpt-2); convert this checkpoint with llama.cpp's convert_hf_to_gguf.py instead"
    )


def _token_name(value: Any) -> str | None:
    # tokenizer_config.json writes special tokens as a string or as an AddedToken dict.
    return value.get("content") if isinstance(value, dict) else value


def _tokenizer_json_metadata(directory: Path) -> dict[str, Any]:
    where = directory / "tokenizer.json"
    data = load_json(where)
    model = data.get("model", {})
    if model.get("type") != "BPE":
        raise ValueError(f"{where}: GGUF export supports byte-level BPE vocabularies; this model is {model.get('type')!r}")
    config = load_json(directory / "tokenizer_config.json") if (directory / "tokenizer_config.json").is_file() else {}
    pre = _pre_type(data.get("pre_tokenizer"), clean_up_spaces=bool(config.get("clean_up_tokenization_spaces")),
                    where=where)
    ids: dict[str, int] = dict(model["vocab"])
    types = dict.fromkeys(ids.values(), GGUF_NORMAL)
    for added in data.get("added_tokens", []):
        ids[added["content"]] = added["id"]
        types[added["id"]] = GGUF_CONTROL if added.get("special") else GGUF_USER_DEFINED
    n = max(ids.values()) + 1
    tokens: list[str | None] = [None] * n
    for text, i in ids.items():
        tokens[i] = text
    token_types = [types.get(i, GGUF_UNUSED) for i in range(n)]
    meta: dict[str, Any] = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": [t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)],
        "tokenizer.ggml.token_type": token_types,
        "tokenizer.ggml.merges": [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])],
    }
    for key, name in (("bos", config.get("bos_token")), ("eos", config.get("eos_token")),
                      ("padding", config.get("pad_token")), ("unknown", config.get("unk_token")),
                      ("eot", "<|eot_id|>"), ("eom", "<|eom_id|>")):
        name = _token_name(name)
        if name in ids:
            meta[f"tokenizer.ggml.{key}_token_id"] = ids[name]
    add_bos = config.get("add_bos_token")
    if add_bos is None:  # a fast tokenizer adds BOS through its post-processor
        add_bos = _prepends(data.get("post_processor"), _token_name(config.get("bos_token")))
    meta["tokenizer.ggml.add_bos_token"] = bool(add_bos)
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: llama.cpp reads the default one here
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if (directory / "chat_template.jinja").is_file():
        template = (directory / "chat_template.jinja").read_text(encoding="utf-8")
    if template:
        meta["tokenizer.chat_template"] = template
    return meta


def _prepends(post: Any, token: str | None) -> bool:
    """Whether an HF post-processor puts `token` first in a single sequence."""
    steps = post.get("processors", []) if isinstance(post, dict) and post.get("type") == "Sequence" else [post]
    for step in steps:
        if isinstance(step, dict) and step.get("type") == "TemplateProcessing":
            first = (step.get("single") or [{}])[0]
            return token is not None and first.get("SpecialToken", {}).get("id") == token
    return False


def _gguf_source_metadata(path: Path, *, vocab_size: int | None) -> dict[str, Any]:
    meta = read_gguf_metadata(path, prefixes=("tokenizer.",))
    if "tokenizer.ggml.tokens" not in meta:
        raise ValueError(f"{path} has no tokenizer.ggml.tokens; it carries no vocabulary to copy")
    return _pad_vocab(meta, vocab_size)


def _pad_vocab(meta: dict[str, Any], vocab_size: int | None) -> dict[str, Any]:
    tokens = meta["tokenizer.ggml.tokens"]
    if vocab_size is None or vocab_size == len(tokens):
        return meta
    if vocab_size < len(tokens):
        raise ValueError(
            f"the vocabulary has {len(tokens)} tokens but the model only {vocab_size} embedding rows; "
            "pass the tokenizer the model was trained with"
        )
    extra = range(len(tokens), vocab_size)
    meta["tokenizer.ggml.tokens"] = [*tokens, *(f"[PAD{i}]" for i in extra)]
    if "tokenizer.ggml.token_type" in meta:
        meta["tokenizer.ggml.token_type"] = [*meta["tokenizer.ggml.token_type"], *(GGUF_UNUSED for _ in extra)]
    if "tokenizer.ggml.scores" in meta:
        meta["tokenizer.ggml.scores"] = [*meta["tokenizer.ggml.scores"], *(0.0 for _ in extra)]
    return meta
