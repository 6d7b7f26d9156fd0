"""Atomic writes for post-training outputs: a reader sees the old file or directory, or the new one.

`herd.model.save_model` already writes checkpoints atomically; these helpers cover what sits
around them (adapters, reward heads, JSON reports). A saved model carries the tokenizer files
herd.tokenizer.export writes, so an output directory is usable by `herd generate` / `herd chat`,
transformers and vLLM directly.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from herd.io import atomic_dir as _atomic_dir
from herd.io import atomic_path
from herd.model import Transformer, save_model
from herd.tokenizer.files import checkpoint_tokenizer_files


def atomic_dir(dst: str | os.PathLike, write: Callable[[Path], None], *, overwrite: bool = True) -> Path:
    """herd.io.atomic_dir, replacing by default: post-training stages rewrite their outputs on rerun."""
    return _atomic_dir(dst, write, overwrite=overwrite)


def tokenizer_file(model_dir: str | os.PathLike) -> Path | None:
    """Where a checkpoint's tokenizer comes from: a .gguf file itself, else the directory when it
    holds tokenizer files (tokenizer.json, tokenizer.model, original/tokenizer.model), else None."""
    model_dir = Path(model_dir)
    if model_dir.suffix == ".gguf" and model_dir.is_file():
        return model_dir
    names = ("tokenizer.json", "tokenizer.model", "original/tokenizer.model")
    return model_dir if model_dir.is_dir() and any((model_dir / n).is_file() for n in names) else None


def save_checkpoint(
    model: Transformer, path: str | os.PathLike, *, format: str = "hf", tokenizer: str | os.PathLike | None = None
) -> Path:
    """save_model with the tokenizer files of `format` made from `tokenizer` (a rank file, a
    checkpoint directory or a .gguf file), so the directory is complete on its own from the moment
    it appears."""
    files, generation = {}, None
    if tokenizer is not None:
        files, generation = checkpoint_tokenizer_files(tokenizer, layout=format,
                                                       model_max_length=model.args.max_seq_len)
    return save_model(model, path, format=format, overwrite=True, extra_files=files,  # type: ignore[arg-type]
                      generation_config=generation)


def save_tensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], *,
                 metadata: Mapping[str, str] | None = None) -> Path:
    """safetensors file written atomically (contiguous CPU copies of the tensors)."""
    from safetensors.torch import save_file

    path = Path(path)
    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata=dict(metadata or {}))
    return path
