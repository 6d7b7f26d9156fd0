"""Checkpoint directories: Meta `consolidated.*.pth` and Hugging Face safetensors, read and written.

The names, the q/k permutation and the config translation live in `keymap.py`; this module
finds the files, reads and checks them, and writes them atomically.

Design trade-off: conversion works on whole state dicts (read everything, rename, permute,
check, then `load_state_dict(assign=True)` into a model built on the meta device) rather than
streaming tensor by tensor. That keeps one code path and one set of error checks for both
formats. Memory stays near one copy of the weights because safetensors and
`torch.load(mmap=True)` map the files instead of reading them; the copies that remain are
the permuted wq/wk, a dtype change, and concatenating Meta model-parallel shards.

Tied embeddings: HF omits `lm_head.weight`; Meta stores `output.weight` as a copy of the
embedding. Both are read; on save each format gets what its own loader expects.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import safetensors
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from herd.io import atomic_dir, write_files
from herd.model.args import ModelArgs
from herd.model.checks import check_against_weights
from herd.model.keymap import (
    _IGNORED_HF_SUFFIX,
    HF_CONFIG,
    HF_FIELDS,
    _dtype_name,
    _permute_qk,
    _rename_from_hf,
    args_from_hf_config,
    herd_key,
    hf_config_from_args,
    hf_key,
    permute_from_hf,
    to_hf_state_dict,
)
from herd.model.llama import Transformer
from herd.model.meta import META_PARAMS, meta_args, read_meta, torch_load, write_meta

Format = Literal["hf", "meta"]

HF_GENERATION_CONFIG = "generation_config.json"
HF_WEIGHTS = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"
_META_SHARD_RE = re.compile(r"^consolidated\.(\d+)\.pth$")
# Files that are not weights but make a directory usable (tokenizers), copied as they are.
TOKENIZER_FILES = ("tokenizer.model", "original/tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "chat_template.jinja")
DEFAULT_SHARD_SIZE = 5_000_000_000  # bytes; HF's default max_shard_size ("5GB")

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


# ---- detection -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Located:
    format: Format
    root: Path
    config_file: Path
    weight_files: tuple[Path, ...]
    index_file: Path | None = None


def _locate(path: str | os.PathLike) -> _Located:
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"checkpoint directory {root} does not exist")
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is a file; pass the checkpoint directory that contains it")
    names = {p.name for p in root.iterdir()}
    if "quant_config.json" in names:  # written by herd.quant, which model/ must not import
        raise ValueError(f"{root} is a quantized checkpoint (`herd quantize`); load it with "
                         "herd.quant.load_quantized(path)")
    meta_shards = sorted(n for n in names if _META_SHARD_RE.match(n))
    is_hf = HF_CONFIG in names and (HF_WEIGHTS in names or HF_INDEX in names)
    is_meta = META_PARAMS in names and bool(meta_shards)
    if is_hf and is_meta:
        raise ValueError(f"{root} holds both an HF and a Meta checkpoint; move one of them into its own directory")
    if is_hf:
        if HF_INDEX in names:
            index_file = root / HF_INDEX
            return _Located("hf", root, root / HF_CONFIG, _index_files(index_file), index_file)
        return _Located("hf", root, root / HF_CONFIG, (root / HF_WEIGHTS,))
    if is_meta:
        numbers = [int(_META_SHARD_RE.match(n).group(1)) for n in meta_shards]
        if numbers != list(range(len(numbers))):
            raise FileNotFoundError(
                f"{root}: Meta shards must be numbered consolidated.00.pth .. consolidated.{len(numbers) - 1:02d}.pth "
                f"without gaps; found {', '.join(meta_shards)}"
            )
        return _Located("meta", root, root / META_PARAMS, tuple(root / n for n in meta_shards))
    found = ", ".join(sorted(names)[:8]) or "nothing"
    hint = ""
    if HF_CONFIG in names:
        hint = (f" (has {HF_CONFIG} but no {HF_WEIGHTS} / {HF_INDEX}; .bin weights are not supported, "
                "re-save with safetensors)")
    elif META_PARAMS in names:
        hint = f" (has {META_PARAMS} but no consolidated.NN.pth)"
    raise FileNotFoundError(
        f"{root} is not a checkpoint directory{hint}: expected either HF files ({HF_CONFIG} + {HF_WEIGHTS}, "
        f"or {HF_CONFIG} + {HF_INDEX} + its shards) or Meta files ({META_PARAMS} + consolidated.00.pth ...); "
        f"found: {found}"
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); the file is corrupt or truncated") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _index_files(index_file: Path) -> tuple[Path, ...]:
    weight_map = _read_json(index_file).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index_file} has no 'weight_map'; it should map every tensor name to its shard file")
    files = sorted(set(weight_map.values()))
    missing = [f for f in files if not (index_file.parent / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{index_file} points at shard files that do not exist: {', '.join(missing[:5])}; "
            "download the missing shards or regenerate the index"
        )
    return tuple(index_file.parent / f for f in files)


# ---- reading -------------------------------------------------------------------------------


def _safetensors_header(files: Iterable[Path]) -> dict[str, tuple[tuple[int, ...], str]]:
    """Name -> (shape, safetensors dtype) of every tensor, from the files' headers only."""
    out: dict[str, tuple[tuple[int, ...], str]] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for key in f.keys():
                    if key in out:
                        raise ValueError(f"tensor {key!r} appears in more than one shard (again in {path})")
                    info = f.get_slice(key)  # a lazy view: nothing of the data is read
                    out[key] = (tuple(info.get_shape()), info.get_dtype())
        except safetensors.SafetensorError as e:
            raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from e
    return out


def _read_safetensors(files: Iterable[Path]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            # safe_open maps the file (copy-on-write) instead of reading it into memory.
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for key in f.keys():
                    out[key] = f.get_tensor(key)
        except safetensors.SafetensorError as e:
            raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from e
    return out


def _check_hf_header(loc: _Located, args: ModelArgs) -> dict[str, tuple[tuple[int, ...], str]]:
    """The shards' headers, checked against the index and config.json before any tensor is mapped."""
    header = _safetensors_header(loc.weight_files)
    if loc.index_file is not None:
        listed = set(_read_json(loc.index_file)["weight_map"])
        if listed != set(header):
            diff = sorted(listed ^ set(header))
            raise ValueError(f"{loc.index_file} does not match its shards; differing keys: {', '.join(diff[:5])}")
    shapes = {herd_key(k) or k: shape for k, (shape, _) in header.items() if not k.endswith(_IGNORED_HF_SUFFIX)}
    check_against_weights(args, shapes, HF_FIELDS, source=loc.root)
    return header


def _read_hf(loc: _Located, args: ModelArgs) -> dict[str, torch.Tensor]:
    _check_hf_header(loc, args)  # first: a config of 10**9 layers must not reach _check_state_dict
    sd = _rename_from_hf(_read_safetensors(loc.weight_files), args)
    _check_state_dict(sd, args, source=loc.root)  # before permuting, so bad shapes name their key
    return _permute_qk(sd, args, permute_from_hf)


def _meta_args(loc: _Located, shards: list[dict[str, torch.Tensor]]) -> ModelArgs:
    return meta_args(_read_json(loc.config_file), shards, loc.weight_files, config_file=loc.config_file)[0]


def _read_meta(loc: _Located) -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    # Meta's layouts (any model-parallel degree, replicated KV heads, Llama 1/2) live in meta.py.
    return read_meta(_read_json(loc.config_file), loc.weight_files, config_file=loc.config_file)


def _expected_shapes(args: ModelArgs) -> dict[str, torch.Size]:
    with torch.device("meta"):
        model = Transformer(args)
    return {k: v.shape for k, v in model.state_dict().items()}


def _check_state_dict(sd: Mapping[str, torch.Tensor], args: ModelArgs, *, source: object) -> None:
    expected = _expected_shapes(args)
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {', '.join(missing[:4])}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:4])}")
        raise ValueError(
            f"{source} does not match its config: {'; '.join(parts)}. Check that the config file belongs "
            "to these weights (n_layers, tie_embeddings) and that the checkpoint is complete"
        )
    for key, shape in expected.items():
        if sd[key].shape != shape:
            raise ValueError(
                f"{source}: shape mismatch for {key}: the config implies {tuple(shape)}, the checkpoint has "
                f"{tuple(sd[key].shape)}; the config file does not describe these weights"
            )
        if sd[key].dtype not in _FLOAT_DTYPES:
            raise ValueError(
                f"{source}: {key} has dtype {sd[key].dtype}; herd loads float32/bfloat16/float16 weights only "
                "(quantized checkpoints are not supported)"
            )


# ---- load ----------------------------------------------------------------------------------


def load_model(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    max_seq_len: int | None = None,
) -> Transformer:
    """Load an HF (safetensors) or Meta (consolidated.NN.pth) checkpoint directory, or a .gguf file.

    dtype=None keeps the checkpoint's dtype (that of the embedding; float32 for a quantized GGUF).
    max_seq_len overrides the length the RoPE table covers (131072 for 3.1/3.2, which costs ~64 MiB
    for head_dim 128).
    """
    if Path(path).is_file():  # a single file can only be GGUF; gguf.py checks its magic
        from herd.model.gguf import load_gguf
        return load_gguf(path, dtype=dtype, device=device, max_seq_len=max_seq_len)
    loc = _locate(path)
    if loc.format == "hf":
        config = _read_json(loc.config_file)
        try:
            args = args_from_hf_config(config)
        except ValueError as e:
            raise ValueError(f"{loc.config_file}: {e}") from e
        sd = _read_hf(loc, args)
    else:
        args, sd = _read_meta(loc)
    if max_seq_len is not None:
        args = args.replace(max_seq_len=max_seq_len)
    return _materialize(args, sd, dtype=dtype, device=device, source=loc.root)


def _materialize(
    args: ModelArgs,
    sd: dict[str, torch.Tensor],
    *,
    dtype: torch.dtype | None,
    device: torch.device | str,
    source: object,
) -> Transformer:
    if args.tie_embeddings and "output.weight" not in sd and "tok_embeddings.weight" in sd:
        sd = {**sd, "output.weight": sd["tok_embeddings.weight"]}
    _check_state_dict(sd, args, source=source)
    dtype = dtype or sd["tok_embeddings.weight"].dtype
    # .to() is a no-op for tensors already right, so mmap-backed weights stay mapped.
    cast = {k: v.to(device=device, dtype=dtype) for k, v in sd.items()}
    if args.tie_embeddings:
        cast["output.weight"] = cast["tok_embeddings.weight"]
    with torch.device("meta"):
        model = Transformer(args)
    model.load_state_dict(cast, strict=True, assign=True)
    model.tie_weights()
    # The RoPE table was built on the meta device; give it a real device, then recompute it.
    model.freqs_cis = torch.empty(0, device=device)
    model.init_rope()
    return model


# ---- save ----------------------------------------------------------------------------------


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")


def _model_state(model: Transformer) -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    args = model.args
    if args.tie_embeddings and model.output.weight is not model.tok_embeddings.weight:
        raise ValueError("model.args.tie_embeddings is set but output.weight is not tied; call model.tie_weights()")
    state = model.state_dict()
    if args.tie_embeddings:
        state.pop("output.weight", None)  # copied once below, not twice off an accelerator
    sd = {k: v.detach().cpu() for k, v in state.items()}
    if args.tie_embeddings and "tok_embeddings.weight" in sd:
        sd["output.weight"] = sd["tok_embeddings.weight"]
    _check_state_dict(sd, args, source="save_model")
    return args, sd


def _write_hf(
    tmp: Path, args: ModelArgs, sd: dict[str, torch.Tensor], *, shard_size: int, generation: Mapping[str, Any] | None
) -> None:
    dtype = sd["tok_embeddings.weight"].dtype
    gen = dict(generation) if generation is not None else {"_from_model_config": True}
    # config.json declares the same stop ids: some loaders read only it.
    config = hf_config_from_args(args, dtype=dtype, bos_token_id=gen.get("bos_token_id"),
                                 eos_token_id=gen.get("eos_token_id"))
    _write_json(tmp / HF_CONFIG, config)
    gen.update({k: config[k] for k in ("bos_token_id", "eos_token_id") if config[k] is not None})
    _write_json(tmp / HF_GENERATION_CONFIG, gen)

    tensors = {k: v.contiguous() for k, v in to_hf_state_dict(sd, args).items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > shard_size:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    metadata = {"format": "pt"}  # transformers checks this to know the tensors are PyTorch's
    if len(shards) == 1:
        save_file(shards[0], str(tmp / HF_WEIGHTS), metadata=metadata)
        return
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(tmp / name), metadata=metadata)
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    _write_json(tmp / HF_INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})


def _write_meta(tmp: Path, args: ModelArgs, sd: dict[str, torch.Tensor], *, num_shards: int) -> None:
    write_meta(tmp, args, sd, num_shards=num_shards)


def save_model(
    model: Transformer,
    path: str | os.PathLike,
    *,
    format: Format = "hf",
    shard_size: int = DEFAULT_SHARD_SIZE,
    num_shards: int = 1,
    overwrite: bool = False,
    extra_files: Mapping[str, bytes] | None = None,
    generation_config: Mapping[str, Any] | None = None,
) -> Path:
    """Write `model` as an HF or Meta checkpoint directory at `path`, atomically.

    hf: config.json, generation_config.json and model.safetensors, or numbered shards plus
        model.safetensors.index.json when the weights exceed `shard_size` bytes.
    meta: params.json and consolidated.00.pth .. consolidated.{num_shards-1}.pth, split the way
        Meta's model-parallel files are (KV heads copied when num_shards > n_kv_heads, see meta.py).
    extra_files: relative path -> bytes written inside the directory before it appears (the
        tokenizer files from herd.tokenizer.export.tokenizer_files).
    generation_config: generation_config.json (hf); its bos/eos ids go into config.json too.
    """
    return _save(model, Path(path), format=format, shard_size=shard_size, num_shards=num_shards,
                 overwrite=overwrite, generation=generation_config, extra_files=extra_files or {})


def _save(
    model: Transformer,
    dst: Path,
    *,
    format: Format,
    shard_size: int,
    num_shards: int,
    overwrite: bool,
    generation: Mapping[str, Any] | None,
    extra_files: Mapping[str, bytes],
) -> Path:
    if format not in ("hf", "meta"):
        raise ValueError(f"format must be 'hf' or 'meta', got {format!r}")
    if shard_size <= 0 or num_shards <= 0:
        raise ValueError(f"shard_size and num_shards must be positive, got {shard_size} and {num_shards}")
    if format == "hf" and num_shards != 1:
        raise ValueError("num_shards is for Meta's model-parallel layout; HF shards are sized with shard_size")
    args, sd = _model_state(model)

    def write(tmp: Path) -> None:
        if format == "hf":
            _write_hf(tmp, args, sd, shard_size=shard_size, generation=generation)
        else:
            _write_meta(tmp, args, sd, num_shards=num_shards)
        write_files(tmp, extra_files)

    atomic_dir(dst, write, overwrite=overwrite)
    return dst


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    to: Format,
    shard_size: int = DEFAULT_SHARD_SIZE,
    num_shards: int = 1,
    overwrite: bool = False,
    extra_files: Mapping[str, bytes] | None = None,
    generation_config: Mapping[str, Any] | None = None,
) -> Path:
    """Convert a checkpoint directory to `to` format (`herd convert SRC DST --to hf|meta`).

    Weights keep their dtype. Tokenizer files beside the weights are copied unless
    `extra_files` gives the files to write; an HF source's token ids and generation_config.json
    carry over (ModelArgs does not hold them) unless `generation_config` replaces them.
    """
    loc = _locate(src)
    model = load_model(loc.root)
    if extra_files is None:
        extra_files = {n: (loc.root / n).read_bytes() for n in TOKENIZER_FILES if (loc.root / n).is_file()}
    if generation_config is None and loc.format == "hf":
        config = _read_json(loc.config_file)
        generation_config = {k: config[k] for k in ("bos_token_id", "eos_token_id") if config.get(k) is not None}
        if (loc.root / HF_GENERATION_CONFIG).is_file():
            generation_config.update(_read_json(loc.root / HF_GENERATION_CONFIG))
    return _save(model, Path(dst), format=to, shard_size=shard_size, num_shards=num_shards,
                 overwrite=overwrite, generation=generation_config, extra_files=extra_files)


# ---- describe ------------------------------------------------------------------------------

_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "BF16": "bfloat16", "F16": "float16",
                       "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "I8": "int8", "U8": "uint8"}


@dataclass(frozen=True)
class CheckpointInfo:
    """What `herd info PATH` prints; read from headers and configs without loading the weights."""

    path: Path
    format: Literal["hf", "meta", "gguf"]
    args: ModelArgs
    config: dict[str, Any]  # config.json or params.json as stored; a GGUF's metadata (long arrays summarized)
    files: tuple[str, ...]  # weight files, relative to path
    dtype: str  # dtype of the token embedding, e.g. "bfloat16"; GGUF: tensor types, "Q4_1 (210), F32 (61)"
    num_params: int  # unique parameters (a tied output head counted once)
    bytes_on_disk: int  # weight files + config (+ index)


def describe(path: str | os.PathLike) -> CheckpointInfo:
    """Format, config, dtype and size of a checkpoint directory or a .gguf file."""
    if Path(path).is_file():
        from herd.model.gguf import describe_gguf
        return describe_gguf(path)
    loc = _locate(path)
    config = _read_json(loc.config_file)
    if loc.format == "hf":
        try:
            args = args_from_hf_config(config)
        except ValueError as e:
            raise ValueError(f"{loc.config_file}: {e}") from e
        emb = _check_hf_header(loc, args).get(hf_key("tok_embeddings.weight"))
        dtype = None if emb is None else _SAFETENSORS_DTYPES.get(emb[1], emb[1])
    else:
        shards = [torch_load(p) for p in loc.weight_files]  # mmap: only the tie / KV-copy checks read data
        args = _meta_args(loc, shards)
        emb = shards[0].get("tok_embeddings.weight")
        dtype = _dtype_name(emb.dtype) if emb is not None else None
    if dtype is None:
        raise ValueError(f"{loc.root}: no token embedding found in {', '.join(f.name for f in loc.weight_files)}")
    counted = [loc.config_file, *loc.weight_files] + ([loc.index_file] if loc.index_file else [])
    return CheckpointInfo(
        path=loc.root,
        format=loc.format,
        args=args,
        config=config,
        files=tuple(f.name for f in loc.weight_files),
        dtype=dtype,
        num_params=args.num_params(),
        bytes_on_disk=sum(f.stat().st_size for f in counted),
    )


__all__ = [
    "CheckpointInfo",
    "convert",
    "describe",
    "load_model",
    "save_model",
]
