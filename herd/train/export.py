"""Training checkpoint -> an inference checkpoint directory (HF safetensors or Meta consolidated).

The weights go through herd.model.formats.save_model, so an export loads in `herd generate` and
in transformers exactly as a converted Meta/HF checkpoint does. The run's tokenizer.model (the
trainer copies it into the run directory at start) becomes the tokenizer files of the target
layout (herd.tokenizer.export): for HF, tokenizer.json, tokenizer_config.json with the 3.1 chat
template and original/tokenizer.model; for Meta, the root tokenizer.model. config.json and
generation_config.json declare every stop id. The directory appears atomically: written under a
temporary name, tokenizer included, then renamed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from herd.model import ModelArgs, Transformer, build_model, save_model
from herd.tokenizer.export import generation_config_of, tokenizer_files
from herd.train.checkpoint import COMPLETE, Checkpointer, SavedCheckpoint, load_model_weights, verify

TOKENIZER_FILE = "tokenizer.model"


def resolve_checkpoint(path: str | Path) -> SavedCheckpoint:
    """A checkpoint directory itself, or a run directory / its checkpoints/ (-> the newest good one)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; pass a run directory (job.out_dir) or one of its "
                                "checkpoints/step-NNNNNNNN directories")
    if (path / COMPLETE).exists() or path.name.startswith("step-"):
        meta, problem = verify(path)
        if meta is None:
            raise ValueError(f"checkpoint {path} is unusable: {problem}")
        return SavedCheckpoint(path, int(meta["step"]), meta)
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    found = Checkpointer(root, keep_last=1, log=lambda msg: print(f"herd export: {msg}")).latest()
    if found is None:
        raise FileNotFoundError(f"no complete checkpoint under {root}")
    return found


def model_args_of(ckpt: SavedCheckpoint) -> ModelArgs:
    return ModelArgs(**ckpt.meta["model_args"])


def save_inference_model(model: Transformer, dst: str | Path, *, format: Literal["hf", "meta"],
                         tokenizer: str | Path | None, overwrite: bool = False) -> Path:
    """save_model plus the tokenizer files of `format` made from `tokenizer` (a rank file or a
    checkpoint directory), appearing at `dst` in one rename."""
    files = {} if tokenizer is None else tokenizer_files(tokenizer, layout=format,
                                                          model_max_length=model.args.max_seq_len)
    generation = None if tokenizer is None else generation_config_of(tokenizer)
    return save_model(model, dst, format=format, overwrite=overwrite, extra_files=files,
                      generation_config=generation)


def export_checkpoint(src: str | Path, dst: str | Path, *, format: Literal["hf", "meta"] = "hf",
                      tokenizer: str | Path | None = None, overwrite: bool = False) -> Path:
    """`herd export`: the model of a training checkpoint as an HF or Meta directory with its tokenizer."""
    if format not in ("hf", "meta"):
        raise ValueError(f"format must be 'hf' or 'meta', got {format!r}")
    ckpt = resolve_checkpoint(src)
    if tokenizer is None:
        run_dir = ckpt.path.parent.parent  # <out_dir>/checkpoints/step-N
        candidate = run_dir / TOKENIZER_FILE
        if not candidate.is_file():
            raise FileNotFoundError(f"no {TOKENIZER_FILE} in the run directory {run_dir} (the run had no "
                                    "data.tokenizer); pass --tokenizer PATH")
        tokenizer = candidate
    elif not Path(tokenizer).is_file():
        raise FileNotFoundError(f"tokenizer file {tokenizer} not found")
    model = build_model(model_args_of(ckpt), init=False)
    load_model_weights(ckpt.path, model)
    return save_inference_model(model, dst, format=format, tokenizer=tokenizer, overwrite=overwrite)


def convert_checkpoint(src: str | Path, dst: str | Path, *, to: Literal["hf", "meta", "gguf"],
                       qtype: str = "F16", num_shards: int = 1, overwrite: bool = False) -> Path:
    """`herd convert`: any checkpoint (HF or Meta directory, .gguf file) to an HF or Meta directory or
    a GGUF file, with the tokenizer files (or GGUF tokenizer metadata and chat template) the target
    needs to work in transformers, vLLM and llama.cpp.

    qtype: the GGUF weight type ("F32", "F16", "Q8_0", "Q4_0"); ignored for directories, whose
    weights keep the source's dtype (a quantized GGUF source is dequantized to fp32).
    """
    from herd.model import load_model
    from herd.model.gguf import write_gguf
    from herd.tokenizer import load_tokenizer, read_chat_template
    from herd.tokenizer.export import gguf_tokenizer_metadata
    from herd.tokenizer.files import checkpoint_tokenizer_files, files_for_tokenizer

    if to not in ("hf", "meta", "gguf"):
        raise ValueError(f"to must be 'hf', 'meta' or 'gguf', got {to!r}")
    src, dst = Path(src), Path(dst)
    if not src.exists():
        raise FileNotFoundError(f"{src} does not exist; pass a checkpoint directory or a .gguf file")
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} already exists; pass --overwrite (overwrite=True) or choose another path")
    model = load_model(src)
    tokenizer = load_tokenizer(src, vocab_size=model.args.vocab_size)
    if to == "gguf":
        # A GGUF source keeps its own tokenizer keys; a directory's tokenizer.json / rank file, or
        # the bundled Llama 3 file a tokenizer-less 128K checkpoint resolves to, is converted.
        source = src if src.suffix == ".gguf" or _has_tokenizer_files(src) else tokenizer
        meta = gguf_tokenizer_metadata(source, vocab_size=model.args.vocab_size)
        template = read_chat_template(src)
        if template is not None and "tokenizer.chat_template" not in meta:
            meta["tokenizer.chat_template"] = template
        return write_gguf(model, dst, qtype=qtype, tokenizer_metadata=meta, name=src.stem)
    if src.suffix == ".gguf" or _has_tokenizer_files(src):
        files, generation = checkpoint_tokenizer_files(src, layout=to, model_max_length=model.args.max_seq_len)
    else:  # e.g. a 128K-vocabulary checkpoint without tokenizer files: the one load_tokenizer found
        files, generation = files_for_tokenizer(tokenizer, layout=to, chat_template=read_chat_template(src),
                                                model_max_length=model.args.max_seq_len)
    return save_model(model, dst, format=to, num_shards=num_shards, overwrite=overwrite, extra_files=files,
                      generation_config=generation)


def _has_tokenizer_files(directory: Path) -> bool:
    names = ("tokenizer.json", "tokenizer.model", "original/tokenizer.model")
    return directory.is_dir() and any((directory / n).is_file() for n in names)
