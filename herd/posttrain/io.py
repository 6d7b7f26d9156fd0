"""Atomic writes for post-training outputs: a reader sees the old file or directory, or the new one.

`herd.model.save_model` already writes checkpoints atomically; these helpers cover what sits
around them (adapters, reward heads, JSON reports). A saved model carries the tokenizer files
herd.tokenizer.export writes, so an output directory is usable by `herd generate` / `herd chat`,
transformers and vLLM directly.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from herd.io import give_default_mode
from herd.model import Transformer, save_model
from herd.tokenizer.files import checkpoint_tokenizer_files


def atomic_dir(dst: str | os.PathLike, write: Callable[[Path], None], *, overwrite: bool = True) -> Path:
    """Run write(tmp) in a temporary directory beside dst, then rename it to dst."""
    dst = Path(dst)
    if dst.exists() and not overwrite and (not dst.is_dir() or any(dst.iterdir())):
        raise FileExistsError(f"{dst} already exists; choose another output directory or allow overwriting")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent))
    try:
        write(tmp)
        give_default_mode(tmp)  # mkdtemp and safetensors make 0700/0600; publish with the usual modes
        if dst.exists():
            old = dst.with_name(f".{dst.name}.old-{uuid.uuid4().hex[:8]}")
            os.rename(dst, old)
            os.rename(tmp, dst)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


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
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp, metadata=dict(metadata or {}))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
