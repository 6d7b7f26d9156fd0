"""Meta's consolidated checkpoints: `params.json` + `consolidated.NN.pth`, any model-parallel degree.

Every Meta release splits its weights the same way across model-parallel (MP) files (fairscale's
column/row-parallel layers, `_MP_SPLIT_DIM`), with three exceptions this module handles:

* Replicated KV heads. A file holds whole KV heads, so with more files than KV heads (the 405B
  "bf16-mp16" release: 16 files, 8 KV heads) file f holds a copy of KV head f // copies, and
  `params.json` counts the copies (`n_kv_heads: 16` in sku_list.py), because Meta's Attention
  needs `n_kv_heads // mp_size >= 1`. herd loads the true model: copies are checked equal and kept
  once. When params.json already gives fewer KV heads than files, the copies are certain and a
  mismatch is an error; when it counts the copies, herd finds them by comparing the files (equal
  copies in every layer are the same model with fewer heads, so merging them is exact).
* The token embedding: Llama 3 splits it along the vocabulary (dim 0, VocabParallelEmbedding),
  Llama 1/2 along the model width (dim 1, ParallelEmbedding). The per-file shape decides:
  only a dim-0 split keeps `dim` columns, so with `dim` known there is no ambiguity.
* `vocab_size: -1` in Llama 1/2's params.json: the embedding's rows give it.

Meta's quantized layouts (405B "fp8-mixed", 3.2 int4 QLoRA / SpinQuant) are refused with a message
naming the bf16 release and `herd quantize` instead.

Design trade-off: the merge reads every file (memory-mapped) and concatenates, rather than
resharding lazily per tensor; one state dict then goes through the same checks as HF's. Finding
unmarked KV copies costs one comparison per file pair, which stops at the first differing layer
for ordinary checkpoints.
"""

from __future__ import annotations

import json
import pickle
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from herd.model.args import ModelArgs
from herd.model.checks import ConfigFields, check_against_weights
from herd.model.keymap import _equal, args_from_meta_params, meta_params_from_args

META_PARAMS = "params.json"
META_FIELDS = ConfigFields(
    file=META_PARAMS, n_layers="n_layers", dim="dim", n_heads="n_heads", n_kv_heads="n_kv_heads",
    ffn_hidden_dim="FFN width (multiple_of, ffn_dim_multiplier)", vocab_size="vocab_size", max_seq_len="max_seq_len",
)
_FP8_SCALES_RE = re.compile(r"^fp8_scales_\d+\.pt$")
_FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)

# Llama 2's Meta files carry a precomputed `rope.freqs`; it holds no weights and is recomputed.
_IGNORED_META_KEYS = ("rope.freqs",)

# Dimension along which Meta's model-parallel files split each weight (fairscale Column/Row
# ParallelLinear and VocabParallelEmbedding); None means replicated in every file. herd writes
# the embedding the Llama 3 way (dim 0) and reads either.
_MP_SPLIT_DIM: dict[str, int | None] = {
    "wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "tok_embeddings": 0,
    "wo": 1, "w2": 1,
    "attention_norm": None, "ffn_norm": None, "norm": None,
}
_KV = ("wk", "wv")
_EMB = "tok_embeddings.weight"


def _module_name(key: str) -> str:
    """"layers.0.attention.wq.weight" -> "wq"; "norm.weight" -> "norm"."""
    parts = key.split(".")
    return parts[-2] if len(parts) >= 2 else key


# ---- reading -------------------------------------------------------------------------------


def torch_load(path: Path) -> dict[str, torch.Tensor]:
    """One consolidated.NN.pth, memory-mapped, tensors only (no pickled code)."""
    try:
        # weights_only: the unpickler accepts tensors and plain containers only, never code.
        sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"refusing to load {path}: it contains Python objects other than tensors, and unpickling them "
            "could run code. Re-save it as a plain state dict of tensors."
        ) from e
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"{path} is not a readable PyTorch checkpoint (truncated or corrupt?): {e}") from e
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path} must hold a flat dict of tensors (a state dict)")
    for key in _IGNORED_META_KEYS:
        sd.pop(key, None)
    return sd


def check_not_fp8(root: Path, shards: Sequence[dict[str, torch.Tensor]]) -> None:
    """Refuse Meta's "fp8-mixed" layout (405B): fp8 FFN weights plus fp8_scales_{rank}.pt."""
    scales = sorted(p.name for p in root.iterdir() if _FP8_SCALES_RE.match(p.name))
    fp8 = next((k for sd in shards for k, t in sd.items() if t.dtype in _FP8_DTYPES), None)
    if not scales and fp8 is None:
        return
    found = f"{scales[0]}" if scales else f"{fp8} in float8"
    raise ValueError(
        f"{root} is Meta's FP8 checkpoint (the Llama 3.1 405B 'fp8-mixed' release: feed-forward weights of "
        f"the inner layers stored as float8 e4m3 with row scales in fp8_scales_{{rank}}.pt; found {found}). "
        "herd does not read this layout. Download the bf16 release instead (Llama3.1-405B:bf16-mp8 or "
        "bf16-mp16) and, for fp8 inference, run `herd quantize --scheme fp8` on it: the same FFN-only, "
        "row-wise rule with first and last layers kept in bf16"
    )


def _embedding_split_dim(pieces: Sequence[torch.Tensor], dim: int, files: Sequence[Path]) -> int:
    cols = pieces[0].shape[-1]
    if cols == dim:
        return 0  # Llama 3: each file holds a slice of the vocabulary (also the single-file case)
    if cols * len(pieces) == dim:
        return 1  # Llama 1/2: each file holds a slice of the model width
    listing = ", ".join(f"{f.name}: {tuple(p.shape)}" for f, p in zip(files, pieces))
    raise ValueError(
        f"cannot tell how {_EMB} is split across the {len(pieces)} model-parallel files ({listing}): with "
        f"dim={dim} each file should hold either {dim} columns (Llama 3, split by vocabulary) or "
        f"{dim}/{len(pieces)} columns (Llama 1/2, split by width); params.json does not describe these weights"
    )


def _embedding_rows(shards: Sequence[dict[str, torch.Tensor]], dim: int, files: Sequence[Path]) -> int | None:
    pieces = [sd[_EMB] for sd in shards if _EMB in sd]
    if len(pieces) != len(shards) or pieces[0].dim() != 2:
        return None  # reported by the key / shape checks later
    if len(pieces) == 1:
        return pieces[0].shape[0]  # nothing split; a wrong dim is check_against_weights' to name
    split = _embedding_split_dim(pieces, dim, files)
    return sum(p.shape[0] for p in pieces) if split == 0 else pieces[0].shape[0]


def _kv_pieces(shards: Sequence[dict[str, torch.Tensor]], key: str) -> list[torch.Tensor]:
    return [sd[key] for sd in shards if key in sd]


def _groups_equal(shards: Sequence[dict[str, torch.Tensor]], n_layers: int, copies: int) -> bool:
    """Whether every run of `copies` consecutive files holds equal wk and wv in every layer."""
    for layer in range(n_layers):
        for name in _KV:
            pieces = _kv_pieces(shards, f"layers.{layer}.attention.{name}.weight")
            if len(pieces) != len(shards):
                return False
            for f, p in enumerate(pieces):
                if f % copies and not _equal(p, pieces[f - f % copies]):
                    return False
    return True


def _kv_copies(shards: Sequence[dict[str, torch.Tensor]], args: ModelArgs) -> int:
    """How many consecutive files hold the same KV head (1: no replication)."""
    n_files = len(shards)
    wk = shards[0].get("layers.0.attention.wk.weight")
    # Meta replicates only whole heads, one per file, and only with more files than KV heads.
    if n_files == 1 or wk is None or wk.dim() != 2 or wk.shape[0] != args.head_dim:
        return 1
    if args.n_kv_heads < n_files:  # params.json (or herd) gives the true count: copies are certain
        if n_files % args.n_kv_heads:
            raise ValueError(
                f"{n_files} model-parallel files with one KV head each cannot hold {args.n_kv_heads} KV heads: "
                "Meta copies each head into the same number of files; check n_kv_heads in params.json"
            )
        return n_files // args.n_kv_heads
    # params.json counts the copies (405B mp16 says 16): find the largest run of equal files.
    for copies in range(n_files // 2, 1, -1):
        if n_files % copies == 0 and args.n_heads % (n_files // copies) == 0 and \
                _groups_equal(shards, args.n_layers, copies):
            return copies
    return 1


def meta_args(
    params: dict[str, Any], shards: Sequence[dict[str, torch.Tensor]], files: Sequence[Path], *, config_file: Path
) -> tuple[ModelArgs, int]:
    """(ModelArgs of the true model, KV copies per head) for a Meta directory's params and files."""
    check_not_fp8(config_file.parent, shards)
    dim = params.get("model", params).get("dim")
    try:
        rows = _embedding_rows(shards, dim, files) if isinstance(dim, int) and dim > 0 else None
        args = args_from_meta_params(params, vocab_size=rows)
    except ValueError as e:
        raise ValueError(f"{config_file}: {e}") from e
    herd = params.get("model", params).get("herd") or {}
    tied = herd.get("tie_embeddings")
    if tied is None:
        # Meta's 3.2 1B/3B files store output.weight as a copy of the embedding; equality is the tie.
        tied = all(_equal(sd.get("output.weight"), sd.get(_EMB)) for sd in shards)
    copies = _kv_copies(shards, args)
    if copies > 1:
        args = args.replace(n_kv_heads=len(shards) // copies)
    # Before anything is merged or built: a params.json of 10**9 layers must fail here, at once.
    check_against_weights(args, _merged_shapes(shards, args.dim, copies), META_FIELDS, source=config_file.parent)
    return args.replace(tie_embeddings=bool(tied)), copies


def _merged_shapes(shards: Sequence[dict[str, torch.Tensor]], dim: int, copies: int) -> dict[str, tuple[int, ...]]:
    """The shape each tensor will have once the files are merged, from the per-file shapes alone.

    Tensors whose files disagree are left out; merge_shards names them.
    """
    n = len(shards)
    out: dict[str, tuple[int, ...]] = {}
    for key, t in shards[0].items():
        if any(key not in sd or sd[key].shape != t.shape for sd in shards):
            continue
        shape = list(t.shape)
        name = _module_name(key)
        split = _MP_SPLIT_DIM.get(name)
        if key == _EMB and len(shape) == 2:
            split = 0 if shape[1] == dim else 1
        if n > 1 and split is not None and split < len(shape):
            shape[split] *= n // copies if name in _KV else n
        out[key] = tuple(shape)
    return out


def _dedup_kv(key: str, pieces: list[torch.Tensor], files: Sequence[Path], copies: int) -> list[torch.Tensor]:
    for f, p in enumerate(pieces):
        first = f - f % copies
        if not _equal(p, pieces[first]):
            raise ValueError(
                f"{files[f].name} and {files[first].name} should hold the same copy of KV head {f // copies} "
                f"({key}: {len(files)} model-parallel files for {len(files) // copies} KV heads, so each head is "
                f"stored in {copies} consecutive files), but the copies differ: n_kv_heads in params.json is "
                "wrong, or the files are corrupt or come from different checkpoints"
            )
    return pieces[::copies]


def merge_shards(
    shards: Sequence[dict[str, torch.Tensor]], files: Sequence[Path], args: ModelArgs, *, kv_copies: int = 1
) -> dict[str, torch.Tensor]:
    """Concatenate Meta model-parallel files into one state dict, keeping replicated KV heads once."""
    if len(shards) == 1:
        return dict(shards[0])
    keys = set(shards[0])
    for sd, path in zip(shards[1:], files[1:]):
        if set(sd) != keys:
            diff = sorted(set(sd) ^ keys)
            raise ValueError(f"{path} and {files[0]} hold different keys: {', '.join(diff[:5])}")
    merged: dict[str, torch.Tensor] = {}
    for key in shards[0]:
        pieces = [sd[key] for sd in shards]
        shapes = {tuple(p.shape) for p in pieces}
        if len(shapes) != 1:
            listing = ", ".join(f"{f.name}: {tuple(p.shape)}" for f, p in zip(files, pieces))
            raise ValueError(
                f"model-parallel shards disagree on the shape of {key!r} ({listing}); the files are from "
                "different checkpoints"
            )
        name = _module_name(key)
        if name in _KV and kv_copies > 1:
            pieces = _dedup_kv(key, pieces, files, kv_copies)
        split = _embedding_split_dim(pieces, args.dim, files) if key == _EMB else _MP_SPLIT_DIM.get(name)
        merged[key] = pieces[0] if split is None else torch.cat(pieces, dim=split)
    return merged


def read_meta(
    params: dict[str, Any], files: Sequence[Path], *, config_file: Path
) -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    """ModelArgs and the merged state dict (herd names = Meta names) of a Meta directory."""
    shards = [torch_load(p) for p in files]
    args, copies = meta_args(params, shards, files, config_file=config_file)
    sd = merge_shards(shards, files, args, kv_copies=copies)
    if args.tie_embeddings:
        head, emb = sd.get("output.weight"), sd.get(_EMB)
        if head is not None and emb is not None and not _equal(head, emb):
            raise ValueError(
                f"{config_file} says tie_embeddings but output.weight differs from {_EMB}; "
                "set herd.tie_embeddings to false"
            )
        if emb is not None:
            sd["output.weight"] = emb  # one tensor, not two equal copies
    return args, sd


# ---- writing -------------------------------------------------------------------------------


def split_meta(sd: dict[str, torch.Tensor], args: ModelArgs, num_shards: int) -> list[dict[str, torch.Tensor]]:
    """Split a state dict into Meta's model-parallel files; KV heads are copied when files > heads."""
    if num_shards == 1:
        # Meta stores a tied 3.2 output as its own copy; torch.save would otherwise save one
        # storage under two names, which Meta's strict loader accepts but other tools may not.
        return [{k: v.clone() if k == "output.weight" and args.tie_embeddings else v for k, v in sd.items()}]
    for what, n in (("n_heads", args.n_heads), ("vocab_size", args.vocab_size),
                    ("FFN hidden size", args.ffn_hidden_dim)):
        if n % num_shards != 0:
            raise ValueError(f"cannot split into {num_shards} model-parallel files: {what} ({n}) is not divisible")
    kv = args.n_kv_heads
    if kv % num_shards != 0 and num_shards % kv != 0:
        raise ValueError(
            f"cannot split {kv} KV heads into {num_shards} model-parallel files: use a number of files that "
            f"divides {kv}, or a multiple of it (each KV head is then copied into consecutive files, as Meta does)"
        )
    copies = max(num_shards // kv, 1)
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(num_shards)]
    for key, t in sd.items():
        name = _module_name(key)
        split = _MP_SPLIT_DIM[name]
        if name in _KV and copies > 1:
            pieces = [head for head in t.chunk(kv, dim=0) for _ in range(copies)]  # file f: head f // copies
        else:
            pieces = [t] * num_shards if split is None else list(t.chunk(num_shards, dim=split))
        for shard, piece in zip(shards, pieces):
            # clone: a chunk is a view, and torch.save writes a view's whole underlying storage.
            shard[key] = piece.clone()
    return shards


def meta_params(args: ModelArgs, num_shards: int) -> dict[str, Any]:
    """params.json for `num_shards` files. With copied KV heads, n_kv_heads counts the copies (as
    Meta's 405B mp16 release does, so Meta's loader gives each rank one) and herd.n_kv_heads the truth."""
    params = meta_params_from_args(args)
    if num_shards > args.n_kv_heads:
        params["n_kv_heads"] = num_shards
        params["herd"]["n_kv_heads"] = args.n_kv_heads
    return params


def write_meta(tmp: Path, args: ModelArgs, sd: dict[str, torch.Tensor], *, num_shards: int) -> None:
    shards = split_meta(sd, args, num_shards)
    with open(tmp / META_PARAMS, "w") as f:
        json.dump(meta_params(args, num_shards), f, indent=2)
        f.write("\n")
    for i, shard in enumerate(shards):
        torch.save(shard, tmp / f"consolidated.{i:02d}.pth")


__all__ = ["check_not_fp8", "merge_shards", "meta_args", "meta_params", "read_meta", "split_meta", "torch_load",
           "write_meta"]
