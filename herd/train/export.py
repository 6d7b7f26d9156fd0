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
