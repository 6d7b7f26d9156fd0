"""Choosing the tokenizer and chat format a checkpoint declares.

Trade-off: the choice is made from the files alone, in a fixed order, never from the model's
name. Llama 3 vocabularies always end at herd's exact tiktoken `Tokenizer` and Meta's
`ChatFormat`, whichever file they came in (tiktoken `tokenizer.model`, `tokenizer.json` or
GGUF metadata); everything else goes through HF `tokenizers` or `sentencepiece` and renders the
checkpoint's own chat template. Directory lookup order:

1. `tokenizer.model` when it is a tiktoken rank file (Meta's Llama 3 layout);
2. `tokenizer.json` (HF layout, any vocabulary; carries added tokens a fine-tune may have);
3. `tokenizer.model` when it is SentencePiece (Meta's Llama 1/2 layout);
4. `original/tokenizer.model` (HF repos keep Meta's file there), either kind;
5. the bundled Llama 3 tokenizer when the model's vocabulary is exactly Llama 3's size.

A `.gguf` file carries its own vocabulary and template. A tokenizer may be smaller than the
model's embedding (HF checkpoints pad it to a multiple of 64 or 128) but never larger; a tiktoken
vocabulary must match exactly, as before.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any
from herd.tokenizer.base import TokenizerLike
from herd.tokenizer.chat import ChatFormat
from herd.tokenizer.gguf_vocab import (
    LLAMA3_BOS,
    gguf_tokenizer,
    llama3_from_byte_level,
    llama3_layout_base,
    read_gguf_metadata,
)
from herd.tokenizer.hf import (
    HFTokenizer,
    chat_template_from_config,
    declared_eos_ids,
    load_json,
    read_tokenizer_json,
    token_text,
    tokenizer_config,
)
from herd.tokenizer.spm import SentencePieceTokenizer, is_sentencepiece_model
from herd.tokenizer.template import ChatTemplate
from herd.tokenizer.tokenizer import PAT_STR, Tokenizer, llama3_tokenizer_path

LLAMA3_VOCAB = 128_256
# The names HF passes to templates (PreTrainedTokenizerBase.SPECIAL_TOKENS_ATTRIBUTES).
TEMPLATE_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def load_tokenizer(
    path: str | os.PathLike[str], explicit: str | os.PathLike[str] | None = None, *, vocab_size: int
) -> TokenizerLike:
    """The tokenizer for the checkpoint at `path` (a directory or a .gguf file), or `explicit` when given.

    `explicit` may be a directory, a .gguf file, a tokenizer.json, or a tokenizer.model of either
    kind. The stop tokens include every eos id the checkpoint declares.
    """
    path = Path(path)
    if explicit is not None:
        tok = tokenizer_from_path(explicit)
    elif path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{path} is a file; pass the checkpoint directory or a .gguf file")
        tok = gguf_tokenizer(path)
    elif path.is_dir():
        tok = _from_directory(path, vocab_size=vocab_size)
    else:
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if tok.n_words > vocab_size or (isinstance(tok, Tokenizer) and tok.n_words != vocab_size):
        raise ValueError(
            f"tokenizer has {tok.n_words} tokens but the model's vocabulary is {vocab_size}; "
            "pass the tokenizer the model was trained with (--tokenizer PATH)"
        )
    if path.is_dir():
        # Generation must stop at every end id the checkpoint declares (generation_config.json's
        # list, config.json), also when the tokenizer came from elsewhere.
        declared = [i for i in declared_eos_ids(path) if 0 <= i < tok.n_words]
        tok.stop_tokens = tuple(dict.fromkeys([*tok.stop_tokens, *declared]))
    return tok


def tokenizer_from_path(path: str | os.PathLike[str]) -> TokenizerLike:
    """A tokenizer from one file (.gguf, tokenizer.json, tiktoken or SentencePiece tokenizer.model) or a directory."""
    path = Path(path)
    if path.is_dir():
        found = _from_directory(path, vocab_size=None)
        if found is None:
            raise FileNotFoundError(f"no tokenizer.json or tokenizer.model in {path}; pass the tokenizer file itself")
        return found
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer {str(path)!r} does not exist")
    if path.suffix == ".gguf":
        return gguf_tokenizer(path)
    if path.suffix == ".json":
        return _from_tokenizer_json(path)
    with path.open("rb") as f:
        head = f.read(64)
    if is_sentencepiece_model(head):
        return SentencePieceTokenizer.from_file(path)
    return Tokenizer.from_file(path)


def _from_directory(directory: Path, *, vocab_size: int | None) -> TokenizerLike | None:
    model, json_file = directory / "tokenizer.model", directory / "tokenizer.json"
    kind = _model_kind(model)
    if kind == "tiktoken":
        return Tokenizer.from_file(model)
    if json_file.is_file():
        return _from_tokenizer_json(json_file)
    if kind == "sentencepiece":
        return SentencePieceTokenizer.from_file(model)
    original = directory / "original" / "tokenizer.model"
    kind = _model_kind(original)
    if kind == "tiktoken":
        return Tokenizer.from_file(original)
    if kind == "sentencepiece":
        return SentencePieceTokenizer.from_file(original)
    if vocab_size is None:
        return None
    if vocab_size == LLAMA3_VOCAB:
        return Tokenizer.from_file(llama3_tokenizer_path())
    raise FileNotFoundError(
        f"no tokenizer.json or tokenizer.model in {directory} (or its original/ folder) and the model's "
        f"vocabulary ({vocab_size}) is not Llama 3's; pass --tokenizer PATH"
    )


def _model_kind(path: Path) -> str | None:
    if not path.is_file():
        return None
    with path.open("rb") as f:
        return "sentencepiece" if is_sentencepiece_model(f.read(64)) else "tiktoken"


def _from_tokenizer_json(file: Path) -> TokenizerLike:
    engine = read_tokenizer_json(file)
    n_base = engine.get_vocab_size(with_added_tokens=False)
    bos = engine.token_to_id(LLAMA3_BOS)
    if (
        bos == n_base
        and _splits_like_llama3(engine)
        and llama3_layout_base(engine.id_to_token, bos, engine.get_vocab_size(with_added_tokens=True))
    ):
        # Llama 3 (or a herd-trained vocabulary) in HF's layout: back to tiktoken ranks
        # (rank = id) and herd's exact tokenizer.
        return llama3_from_byte_level(engine.get_vocab(with_added_tokens=False), n_base)
    return HFTokenizer.from_pretrained(file, engine=engine)


def _splits_like_llama3(engine: Any) -> bool:
    # HF's Llama 3 tokenizer.json: Split(Llama 3 regex, isolated), then ByteLevel without a regex.
    pre = engine.pre_tokenizer
    if pre is None:
        return False
    state = json.loads(pre.__getstate__())
    parts = state.get("pretokenizers", [state]) if state.get("type") == "Sequence" else [state]
    return any(p.get("type") == "Split" and p.get("pattern", {}).get("Regex") == PAT_STR for p in parts)


def read_chat_template(path: str | os.PathLike[str]) -> str | None:
    """The chat template a checkpoint declares: GGUF `tokenizer.chat_template`, else chat_template.jinja,
    tokenizer_config.json's `chat_template`, or chat_template.json beside the weights; None if none."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        return read_gguf_metadata(path, prefixes=("tokenizer.chat_template",)).get("tokenizer.chat_template")
    directory = path if path.is_dir() else path.parent
    if (directory / "chat_template.jinja").is_file():
        return (directory / "chat_template.jinja").read_text(encoding="utf-8")
    template = chat_template_from_config(tokenizer_config(directory))
    if template is None and (directory / "chat_template.json").is_file():
        template = chat_template_from_config(load_json(directory / "chat_template.json"))
    return template


def is_llama30_template(template: str) -> bool:
    """Meta's Llama 3.0 template: Llama 3 headers, and none of 3.1's ipython / eom / date block."""
    if "<|start_header_id|>" not in template:
        return False
    return not any(part in template for part in ("ipython", "<|eom_id|>", "Cutting Knowledge"))


def chat_format_for(path: str | os.PathLike[str], tokenizer: TokenizerLike) -> ChatFormat | ChatTemplate:
    """The chat format for the checkpoint at `path`: Meta's ChatFormat for a Llama 3 vocabulary (3.1,
    or 3.0 when the declared template is Meta's 3.0 one), else the checkpoint's own chat template."""
    template = read_chat_template(path)
    if isinstance(tokenizer, Tokenizer):
        version = "3.0" if template is not None and is_llama30_template(template) else "3.1"
        return ChatFormat(tokenizer, version=version)
    if template is None:
        raise ValueError(
            f"{path} declares no chat template (chat_template.jinja, tokenizer_config.json's chat_template, or "
            "GGUF tokenizer.chat_template) and its vocabulary is not Llama 3's, so herd does not know how to "
            "write a dialog for it; add the model's template, or use plain text generation"
        )
    path = Path(path)
    directory = path if path.is_dir() else path.parent
    declared = {} if path.suffix == ".gguf" else tokenizer_config(directory)
    variables = {k: token_text(declared.get(k)) for k in TEMPLATE_TOKEN_NAMES if token_text(declared.get(k))}
    return ChatTemplate(template, tokenizer, variables=variables)  # type: ignore[arg-type]
