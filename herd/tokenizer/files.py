"""Tokenizer files for a checkpoint written from a tokenizer already in memory.

`export.tokenizer_files` works from files on disk (a rank file, or a directory whose HF files it
copies). A GGUF file has neither: its vocabulary lives in the GGUF metadata, which herd reads into
a tokenizer object (`gguf_tokenizer`). Converting such a file to an HF or Meta directory needs the
files written *from that object*: the HF `tokenizers` engine serialises itself to tokenizer.json,
and a Llama 3 vocabulary (which GGUF loading turns back into herd's tiktoken `Tokenizer`) gets the
same generated files as any rank file. The chat template travels as the checkpoint declared it.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

from herd.tokenizer.base import TokenizerLike
from herd.tokenizer.export import (
    ORIGINAL_RANK_FILE,
    RANK_FILE,
    generation_config,
    generation_config_of,
    hf_tokenizer_json,
    tokenizer_config,
    tokenizer_files,
)
from herd.tokenizer.gguf_vocab import gguf_tokenizer, read_gguf_metadata
from herd.tokenizer.hf import HFTokenizer
from herd.tokenizer.resolve import read_chat_template
from herd.tokenizer.tokenizer import Tokenizer



def _json_bytes(data: Any) -> bytes:
    return (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def rank_file_bytes(tokenizer: Tokenizer) -> bytes:
    """A tiktoken rank file (`<base64 token> <rank>` per line) for `tokenizer`'s base vocabulary."""
    lines = (f"{base64.b64encode(tokenizer.decode_single_token_bytes(i)).decode()} {i}\n"
             for i in range(tokenizer.bos_id))
    return "".join(lines).encode("ascii")


def files_for_tokenizer(
    tokenizer: TokenizerLike, *, layout: str, chat_template: str | None, model_max_length: int
) -> tuple[dict[str, bytes], dict[str, Any]]:
    """(relative path -> bytes, generation config) for a checkpoint directory of `layout` ("hf"/"meta").

    A tiktoken vocabulary gets herd's generated HF files (Meta's 3.1 template) and its rank file
    (original/ in HF layout, root in Meta's); an HF-engine vocabulary gets tokenizer.json, a
    tokenizer_config.json naming its special tokens and `chat_template`, and
    special_tokens_map.json. The generation config declares every stop id.
    """
    if layout not in ("hf", "meta"):
        raise ValueError(f"layout must be 'hf' or 'meta', got {layout!r}")
    gen = generation_config(list(tokenizer.stop_tokens), tokenizer.bos_id, pad_id=tokenizer.pad_id)
    if isinstance(tokenizer, Tokenizer):
        files = {ORIGINAL_RANK_FILE if layout == "hf" else RANK_FILE: rank_file_bytes(tokenizer)}
        if layout == "hf":
            config = tokenizer_config(tokenizer, model_max_length=model_max_length)
            files["tokenizer.json"] = hf_tokenizer_json(tokenizer).encode("utf-8")
            files["tokenizer_config.json"] = _json_bytes(config)
            files["special_tokens_map.json"] = _json_bytes({k: config[k] for k in ("bos_token", "eos_token", "pad_token")})
        return files, gen
    if not isinstance(tokenizer, HFTokenizer):
        raise ValueError(
            f"cannot write tokenizer files for a {type(tokenizer).__name__} held only in memory; convert from "
            "the checkpoint directory that has its tokenizer.model instead"
        )
    names = {i: t for t, i in tokenizer.special_tokens.items()}
    special = {key: names[i] for key, i in (("bos_token", tokenizer.bos_id), ("eos_token", tokenizer.eos_id),
                                             ("pad_token", tokenizer.pad_id)) if i is not None and i in names}
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "add_bos_token": tokenizer.add_bos,
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": model_max_length,
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    files = {
        "tokenizer.json": tokenizer.to_tokenizer_json().encode("utf-8"),
        "tokenizer_config.json": _json_bytes(config),
        "special_tokens_map.json": _json_bytes(special),
    }
    return files, gen


def checkpoint_tokenizer_files(
    source: str | os.PathLike[str], *, layout: str, model_max_length: int
) -> tuple[dict[str, bytes], dict[str, Any] | None]:
    """(files, generation config) for a `layout` directory whose tokenizer comes from `source`:
    a checkpoint directory or tokenizer file (`export.tokenizer_files`: copied, or generated from a
    rank file), or a `.gguf` file (generated from the vocabulary it declares, with its template)."""
    path = Path(source)
    if path.suffix == ".gguf" and path.is_file():
        return files_for_tokenizer(gguf_tokenizer(path), layout=layout, chat_template=read_chat_template(path),
                                   model_max_length=model_max_length)
    files = tokenizer_files(path, layout=layout, model_max_length=model_max_length)  # type: ignore[arg-type]
    return files, generation_config_of(path)


def gguf_tokenizer_files(path: str | os.PathLike[str]) -> dict[str, bytes]:
    """HF tokenizer files plus generation_config.json for a directory made from the GGUF at `path`
    (e.g. `herd quantize file.gguf out`), with the file's own context length as model_max_length."""
    context = read_gguf_metadata(path, prefixes=("llama.context_length",)).get("llama.context_length", 131072)
    files, generation = checkpoint_tokenizer_files(path, layout="hf", model_max_length=int(context))
    if generation is not None:
        files["generation_config.json"] = _json_bytes(generation)
    return files
