"""Reading a checkpoint one slice at a time, for loaders that must not hold every weight at once.

A tensor-parallel rank needs rows (or columns) of each matrix, never the whole model. This module
opens any checkpoint `load_model` accepts and answers `read(name, dim, start, stop)`: the slice
`[start:stop]` along `dim` of one herd-named weight, in herd's layout, as a fresh tensor. What each
format makes possible:

* HF safetensors: `safe_open(...).get_slice` reads only the requested rows. A column slice is
  read a block of rows at a time (safetensors reads the byte span a slice covers, which for
  columns is the whole block) and copied out, so at most one block is held beyond the slice.
  The q/k rows of a
  whole-head slice are permuted from HF's rotate_half order on the slice itself (the permutation
  stays inside each head), so no full wq/wk is ever built.
* Meta consolidated files: `torch.load(mmap=True)` maps every file; a slice is cut from the mapped
  model-parallel pieces and only those bytes are copied. Model-parallel files are not merged:
  the pieces that overlap the slice are narrowed and concatenated, and KV heads Meta copied into
  several files are taken once. Page cache is shared by all ranks on a node; process memory holds
  only the slice.
* GGUF: F32/F16/BF16 tensors are views of one memory map and are sliced like Meta's. Quantized
  tensors are stored in blocks along each row, so one whole matrix is dequantized at a time, sliced
  and dropped: the peak is one float matrix beyond the rank's shard, never the whole model.

The checks are the full loaders' (config against the headers' shapes) before any data is read.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from herd.model.args import ModelArgs
from herd.model.keymap import _IGNORED_HF_SUFFIX, args_from_hf_config, herd_key, permute_from_hf

# A reader takes (dim, start, stop) with dim None meaning the whole tensor.
_Reader = Callable[[int | None, int, int], torch.Tensor]


@dataclass
class SlicedCheckpoint:
    """A checkpoint's ModelArgs and one slice reader per herd parameter name.

    A tied head has no entry of its own: `read("output.weight", ...)` reads the embedding.
    """

    args: ModelArgs
    source: Path
    format: str
    _readers: dict[str, _Reader] = field(repr=False)
    _keep: list = field(repr=False)  # open files and maps the readers use
    _shapes: dict[str, tuple[int, ...]] = field(repr=False)

    def names(self) -> list[str]:
        return sorted(self._readers)

    def shape(self, name: str) -> tuple[int, ...]:
        """The full tensor's shape, from the headers (no data read)."""
        return self._shapes[self._resolve(name)]

    def read(self, name: str, dim: int | None = None, start: int = 0, stop: int = 0) -> torch.Tensor:
        """Rows/columns [start:stop) along `dim` (0 or 1) of `name`, or the whole tensor for dim None."""
        if dim is not None and not 0 <= start < stop:
            raise ValueError(f"slice [{start}:{stop}) of {name} is empty or negative")
        return self._readers[self._resolve(name)](dim, start, stop)

    def _resolve(self, name: str) -> str:
        if name == "output.weight" and name not in self._readers and self.args.tie_embeddings:
            name = "tok_embeddings.weight"
        if name not in self._readers:
            raise ValueError(f"{self.source} has no tensor {name!r}; the checkpoint is incomplete "
                             f"(it holds {len(self._readers)} tensors)")
        return name


def _narrow(t: torch.Tensor, dim: int | None, start: int, stop: int) -> torch.Tensor:
    """A copy of the slice (never a view: a view would keep the whole mapped tensor alive)."""
    if dim is None:
        return t.clone(memory_format=torch.contiguous_format)
    if stop > t.shape[dim]:
        raise ValueError(f"slice [{start}:{stop}) along dim {dim} exceeds a tensor of shape {tuple(t.shape)}")
    return t.narrow(dim, start, stop - start).clone(memory_format=torch.contiguous_format)


# ---- HF safetensors ------------------------------------------------------------------------


def _open_hf(loc, args: ModelArgs) -> SlicedCheckpoint:
    from herd.model.formats import _check_hf_header

    header = _check_hf_header(loc, args)  # names, shapes, config: checked before any data is read
    handles = {p: safe_open(str(p), framework="pt", device="cpu") for p in loc.weight_files}
    readers: dict[str, _Reader] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for path, f in handles.items():
        for key in f.keys():
            if key.endswith(_IGNORED_HF_SUFFIX):
                continue
            name = herd_key(key) or key
            heads = args.n_heads if name.endswith("attention.wq.weight") else (
                args.n_kv_heads if name.endswith("attention.wk.weight") else None)
            readers[name] = _hf_reader(f, key, heads, args.head_dim)
            shapes[name] = header[key][0]
    return SlicedCheckpoint(args, loc.root, "hf", readers, list(handles.values()), shapes)


def _hf_reader(f, key: str, heads: int | None, head_dim: int) -> _Reader:
    def read(dim: int | None, start: int, stop: int) -> torch.Tensor:
        sl = f.get_slice(key)
        shape = sl.get_shape()
        if dim is not None and stop > shape[dim]:
            raise ValueError(f"slice [{start}:{stop}) along dim {dim} exceeds {key} of shape {tuple(shape)}")
        if dim is None:
            t = sl[:]
        elif dim == 0:
            t = sl[start:stop]  # exactly these rows' bytes
        else:
            # safetensors reads a column slice as the byte span from its first to its last value (the
            # whole matrix) and then views it; a block of rows at a time bounds that to the block.
            t = torch.cat([_own(sl[r : r + _ROW_BLOCK, start:stop]) for r in range(0, shape[0], _ROW_BLOCK)])
        if heads is not None:  # q/k: undo HF's rotate_half order, head by head
            if dim == 0 and (start % head_dim or stop % head_dim):
                raise ValueError(f"a slice of {key} must hold whole heads of {head_dim} rows, got [{start}:{stop})")
            t = permute_from_hf(t, t.shape[0] // head_dim)
        return _own(t)
    return read


_ROW_BLOCK = 512  # rows per read of a column slice: 16 MiB of a 405B bf16 wo


def _own(t: torch.Tensor) -> torch.Tensor:
    """`t` in storage of its own size."""
    return t if t.untyped_storage().nbytes() == t.numel() * t.element_size() and t.is_contiguous() else t.clone(
        memory_format=torch.contiguous_format)


# ---- Meta consolidated.NN.pth ---------------------------------------------------------------


def _open_meta(loc) -> SlicedCheckpoint:
    from herd.model.formats import _read_json
    from herd.model.meta import _EMB, _IGNORED_META_KEYS, _KV, _MP_SPLIT_DIM, _embedding_split_dim, _module_name, \
        meta_args, torch_load

    shards = [torch_load(p) for p in loc.weight_files]  # memory-mapped: nothing is read yet
    args, copies = meta_args(_read_json(loc.config_file), shards, loc.weight_files, config_file=loc.config_file)
    readers: dict[str, _Reader] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for key in shards[0]:
        if key in _IGNORED_META_KEYS:
            continue
        pieces = [sd[key] for sd in shards]
        if len({tuple(p.shape) for p in pieces}) != 1:
            raise ValueError(f"model-parallel shards in {loc.root} disagree on the shape of {key!r}; the files "
                             "are from different checkpoints")
        name = _module_name(key)
        if name in _KV and copies > 1:
            pieces = pieces[::copies]  # Meta stored each KV head in `copies` files
        split = _embedding_split_dim(pieces, args.dim, loc.weight_files) if key == _EMB else _MP_SPLIT_DIM.get(name)
        if len(pieces) == 1:
            split = None
        readers[key] = _pieces_reader(pieces, split)
        shape = list(pieces[0].shape)
        if split is not None:
            shape[split] *= len(pieces)
        shapes[key] = tuple(shape)
    if args.tie_embeddings:
        readers.pop("output.weight", None)  # equal to the embedding (meta_args checked): read that
        shapes.pop("output.weight", None)
    return SlicedCheckpoint(args, loc.root, "meta", readers, shards, shapes)


def _pieces_reader(pieces: list[torch.Tensor], split: int | None) -> _Reader:
    """Slices of the tensor the pieces make when concatenated along `split`, without concatenating them."""
    def read(dim: int | None, start: int, stop: int) -> torch.Tensor:
        if split is None:
            return _narrow(pieces[0], dim, start, stop)
        if dim is None:
            return torch.cat(pieces, dim=split)  # the caller asked for everything
        if dim != split:  # every piece contributes its part of the slice
            return torch.cat([_narrow(p, dim, start, stop) for p in pieces], dim=split)
        size = pieces[0].shape[split]
        if stop > size * len(pieces):
            raise ValueError(f"slice [{start}:{stop}) along dim {dim} exceeds {size * len(pieces)}")
        parts = []
        for i, p in enumerate(pieces):  # only the files that overlap [start, stop) are touched
            lo, hi = max(start, i * size), min(stop, (i + 1) * size)
            if lo < hi:
                parts.append(_narrow(p, dim, lo - i * size, hi - i * size))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=split)
    return read


# ---- GGUF ----------------------------------------------------------------------------------


def _open_gguf(path: Path) -> SlicedCheckpoint:
    from herd.model.gguf import _dequantize, _scan, _weights

    _, tensors, args = _scan(path)
    readers: dict[str, _Reader] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for key, t, data in _weights(path, tensors, writable=True):
        readers[key] = _gguf_reader(t, data, path, _dequantize)
        shapes[key] = tuple(t.shape)
    return SlicedCheckpoint(args, path, "gguf", readers, [], shapes)


def _gguf_reader(t, data, path: Path, dequantize) -> _Reader:
    def read(dim: int | None, start: int, stop: int) -> torch.Tensor:
        full = dequantize(t, data, path)  # a view of the map for float types; one matrix otherwise
        return _narrow(full, dim, start, stop)
    return read


# ---- entry ---------------------------------------------------------------------------------


def open_sliced(path: str | os.PathLike) -> SlicedCheckpoint:
    """Open an HF or Meta checkpoint directory or a .gguf file for slice-by-slice reading."""
    from herd.model.formats import _locate, _read_json

    path = Path(path)
    if path.is_file():
        return _open_gguf(path)
    loc = _locate(path)
    if loc.format == "meta":
        return _open_meta(loc)
    try:
        args = args_from_hf_config(_read_json(loc.config_file))
    except ValueError as e:
        raise ValueError(f"{loc.config_file}: {e}") from e
    return _open_hf(loc, args)
