"""GGUF files (llama.cpp's format) of architecture `llama`: read into herd, written from herd.

Design trade-off: reading dequantizes every tensor to float with the `gguf` package (llama.cpp's
own Python code), so a GGUF file becomes the one float `Transformer` like any other checkpoint
and shares its checks. A 4-bit file therefore grows about eight times once loaded; F32, F16
and BF16 tensors stay views of the memory-mapped file. Reusing quantized blocks without loss
belongs to `herd.quant`, which `model/` may not import, so this module only hands out the raw
blocks (`gguf_raw_tensors`).

The header comes from `herd.gguf_header`, not `gguf.GGUFReader`, whose numpy view per vocabulary
string costs seconds (2.5 s for SmolLM2); each tensor is a view of one memory map, shaped from the
`gguf` package's block table as GGUFReader shapes it, so `gguf.quants.dequantize` sees the same
arrays. `describe_gguf` reads no tensor data but `rope_freqs`.

Facts the code relies on (llama.cpp's `convert_hf_to_gguf.py`, class LlamaModel, and
transformers' GGUF loader `modeling_gguf_pytorch_utils.py`):
* q/k rows: the converter undoes HF's rotate_half permutation, so GGUF stores Meta's
  interleaved pairs, which is herd's own order; nothing is permuted either way (transformers
  re-applies HF's permutation when it reads a GGUF).
* Llama 3.1 RoPE scaling is not in the metadata: the converter writes `rope_freqs.weight`, one
  divisor per frequency pair (1 for short wavelengths, `factor` for long ones, a blend between)
  and llama.cpp divides the rotation angles by it. herd recovers a `RopeScaling` from those
  divisors and keeps it only if it reproduces them. (transformers ignores the tensor.)
* A tied output head is a missing `output.weight`; llama.cpp then reuses `token_embd`.
* Writing (`gguf_write.py`, re-exported here) follows the converter and `llama-quantize`; the
  tensor-name table both directions share is `gguf_names.py`.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from herd.gguf_header import GGUFHeader, read_gguf_header
from herd.model.args import ModelArgs, RopeScaling
from herd.model.checks import ConfigFields, check_against_weights, check_context_length
from herd.model.formats import (
    CheckpointInfo,
    _expected_shapes,
    _materialize,
)
from herd.model.gguf_names import ARCH, ROPE_FREQS, gguf_name, gguf_package, herd_name
from herd.model.gguf_write import write_gguf
from herd.model.keymap import _ffn_params_for
from herd.model.llama import Transformer
from herd.model.rope import rope_frequencies

_MAGIC = b"GGUF"
_LLAMA3_ORIGINAL_CONTEXT = 8192  # what llama.cpp's converter assumes when computing rope_freqs
GGUF_FIELDS = ConfigFields(
    file="the metadata", n_layers=f"{ARCH}.block_count", dim=f"{ARCH}.embedding_length",
    n_heads=f"{ARCH}.attention.head_count", n_kv_heads=f"{ARCH}.attention.head_count_kv",
    ffn_hidden_dim=f"{ARCH}.feed_forward_length", vocab_size=f"{ARCH}.vocab_size",
    max_seq_len=f"{ARCH}.context_length", tensor_name=gguf_name,
)


# ---- reading -------------------------------------------------------------------------------


@dataclass(frozen=True)
class GGUFCheckpoint:
    """A GGUF file read into herd's terms.

    state_dict: herd/Meta names, float tensors (quantized types dequantized to float32; F32,
        F16 and BF16 as stored, sharing the file's memory map). A tied head has no entry.
    tensor_types: herd name -> GGML type name as stored ("Q4_1", "F32", ...).
    metadata: the file's key-value fields as plain Python values (header fields left out).
    """

    path: Path
    args: ModelArgs
    state_dict: dict[str, torch.Tensor]
    tensor_types: dict[str, str]
    metadata: dict[str, Any]


@dataclass(frozen=True)
class RawTensor:
    """A tensor's blocks exactly as stored, for lossless requantization.

    type: GGML type name; shape: (rows, cols) in torch order, counted in elements;
    data: uint8 array of the raw bytes, one row of blocks per tensor row (read-only memory map).
    """

    type: str
    shape: tuple[int, ...]
    data: np.ndarray


@dataclass(frozen=True)
class _Tensor:
    """Where one tensor's bytes lie in the file; nothing of them is read."""

    name: str
    type: Any  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # torch order (GGUF lists dimensions innermost first), counted in values
    offset: int  # absolute byte position in the file
    nbytes: int


def _open(path: str | os.PathLike) -> GGUFHeader:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    if path.is_dir():
        raise ValueError(f"{path} is a directory; pass the .gguf file itself")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != _MAGIC:
        raise ValueError(
            f"{path} is not a GGUF file (it starts with {magic!r}, not {_MAGIC!r}); herd loads .gguf files and "
            "HF or Meta checkpoint directories"
        )
    return read_gguf_header(path)


def _locate(header: GGUFHeader, source: Path) -> dict[str, _Tensor]:
    """Every tensor's type, torch shape and byte range, checked against the file's size."""
    gguf = gguf_package()
    out: dict[str, _Tensor] = {}
    for info in header.tensors:
        try:
            kind = gguf.GGMLQuantizationType(info.type)
        except ValueError:
            raise ValueError(
                f"{source}: tensor {info.name} has GGML type {info.type}, which the installed gguf package does not "
                "know; upgrade gguf, or re-quantize the file (e.g. Q8_0 or Q4_K_M)"
            ) from None
        block, block_bytes = gguf.GGML_QUANT_SIZES[kind]
        dims = info.dims or (1,)  # a 0-d tensor holds one value
        nbytes = math.prod(dims) // block * block_bytes
        bad = f"{source} is not a readable GGUF file (truncated or corrupt?): tensor {info.name}"
        if dims[0] % block:
            raise ValueError(f"{bad} has rows of {dims[0]} values, not whole {kind.name} blocks of {block}")
        if info.offset + nbytes > header.file_size:
            raise ValueError(f"{bad} ends at byte {info.offset + nbytes} but the file has {header.file_size} bytes")
        out[info.name] = _Tensor(info.name, kind, tuple(reversed(dims)), info.offset, nbytes)
    return out


def _array(raw: np.ndarray, t: _Tensor) -> np.ndarray:
    """A tensor's bytes (uint8, exactly `t.nbytes`) as GGUFReader shapes them and `gguf.quants.dequantize`
    takes them: F32 / F16 as float arrays in torch order, every other type as uint8 rows of blocks."""
    Q = gguf_package().GGMLQuantizationType
    if t.type == Q.F32:
        return raw.view(np.float32).reshape(t.shape)
    if t.type == Q.F16:
        return raw.view(np.float16).reshape(t.shape)
    block, block_bytes = gguf_package().GGML_QUANT_SIZES[t.type]
    return raw.reshape(*t.shape[:-1], t.shape[-1] // block * block_bytes)  # (rows..., bytes per row)


def _weights(source: Path, tensors: Mapping[str, _Tensor], *, writable: bool) -> list[tuple[str, _Tensor, np.ndarray]]:
    """(herd name, tensor, view of one memory map) per weight; rope_freqs (in args.rope_scaling) has no herd name."""
    # "c" (copy-on-write) gives writable arrays, so torch can share them without a copy or a
    # warning, while the file itself is never modified. Plain ndarray views of the map (it stays
    # alive through .base): gguf's dequantizer slices each tensor thousands of times, and np.memmap's
    # bookkeeping per slice costs a quarter of a second on SmolLM2.
    mm = np.memmap(source, dtype=np.uint8, mode="c" if writable else "r").view(np.ndarray)
    return [(key, t, _array(mm[t.offset : t.offset + t.nbytes], t))
            for name, t in tensors.items() if (key := herd_name(name)) is not None]


def _metadata(header: GGUFHeader, *, summarize_arrays: bool = False) -> dict[str, Any]:
    if not summarize_arrays:
        return dict(header.metadata)
    return {key: f"<{len(v)} x {header.types[key][-1]}>" if isinstance(v, list) and len(v) > 16 else v
            for key, v in header.metadata.items()}


def _f32(value: float) -> float:
    # GGUF stores float32; keep what the writer meant (1e-05, not 9.999999747378752e-06).
    return float(str(np.float32(value)))


def _args_from_metadata(meta: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]],
                        divisors: np.ndarray | None, source: Path) -> ModelArgs:
    arch = meta.get("general.architecture")
    if arch != ARCH:
        raise ValueError(
            f"{source} has architecture {arch!r}; herd reads only {ARCH!r} GGUF files (Llama 1/2/3 and models "
            "built the same way)"
        )

    def get(key: str, default: Any = ...) -> Any:
        value = meta.get(f"{ARCH}.{key}", default)
        if value is ...:
            raise ValueError(f"{source} has no {ARCH}.{key} in its metadata; the file is incomplete")
        if isinstance(value, list):
            raise ValueError(f"{source}: {ARCH}.{key} has one value per layer; herd needs the same value in every layer")
        return value

    if get("expert_count", 0):
        raise ValueError(
            f"{source} is a mixture-of-experts model ({ARCH}.expert_count = {get('expert_count')}, e.g. Mixtral); "
            "herd implements dense Llama models only"
        )
    # llama.cpp applies a linear position scale whenever a factor is present (type or not).
    scaling_type = get("rope.scaling.type", "linear")
    linear = get("rope.scale_linear", None) or get("rope.scaling.factor", None)
    if scaling_type not in ("none", "linear") or linear not in (None, 0.0, 1.0):
        raise ValueError(
            f"{source} uses {scaling_type!r} RoPE scaling (factor {linear}); herd implements Llama 3.1's "
            "scaling only (the rope_freqs.weight tensor)"
        )
    dim, n_heads = int(get("embedding_length")), int(get("attention.head_count"))
    head_dim = int(get("attention.key_length", dim // n_heads))  # llama.cpp's default
    for key in ("attention.value_length", "rope.dimension_count"):
        if int(get(key, head_dim)) != head_dim:
            raise ValueError(
                f"{source}: {ARCH}.{key} = {get(key)} differs from the key length {head_dim}; herd needs equal "
                "key, value and rotary dimensions"
            )
    emb = shapes.get("token_embd.weight")
    if emb is None or len(emb) != 2:
        raise ValueError(f"{source} has no 2-D token_embd.weight tensor")
    vocab_size = int(get("vocab_size", emb[0]))
    if vocab_size != emb[0]:
        raise ValueError(f"{source}: {ARCH}.vocab_size = {vocab_size} but token_embd.weight has {emb[0]} rows")
    theta = _f32(get("rope.freq_base", 10000.0))  # llama.cpp's default when the key is absent
    context = int(get("context_length"))
    check_context_length(context, field=f"{ARCH}.context_length", file=str(source))
    try:
        multiple_of, multiplier = _ffn_params_for(dim, int(get("feed_forward_length")))
        scaling = None
        if divisors is not None:
            scaling = _rope_scaling_from_divisors(divisors, head_dim=head_dim, theta=theta, source=source,
                                                  original=get("rope.scaling.original_context_length", None))
        return ModelArgs(
            dim=dim,
            n_layers=int(get("block_count")),
            n_heads=n_heads,
            n_kv_heads=int(get("attention.head_count_kv", n_heads)),
            vocab_size=vocab_size,
            multiple_of=multiple_of,
            ffn_dim_multiplier=multiplier,
            norm_eps=_f32(get("attention.layer_norm_rms_epsilon")),
            rope_theta=theta,
            rope_scaling=scaling,
            max_seq_len=context,
            tie_embeddings="output.weight" not in shapes,
            head_dim_override=head_dim if head_dim * n_heads != dim else None,
        )
    except ValueError as e:
        if str(e).startswith(str(source)):
            raise
        raise ValueError(f"{source}: {e}") from e


def _rope_scaling_from_divisors(divisors: np.ndarray, *, head_dim: int, theta: float, source: Path,
                                original: int | None) -> RopeScaling | None:
    """The `RopeScaling` whose frequencies equal llama.cpp's (unscaled / divisor), or an error.

    The rule only sees original_max_seq_len / {low, high}_freq_factor, so one of the three is
    free. Llama 3.1/3.2 use low 1 and high 4: try those first and solve for the context length
    (from the blended pairs, or any length that sorts the unblended ones right), then, with the
    context length fixed, fit low and high to the blended pairs.
    """
    d = torch.from_numpy(np.asarray(divisors, dtype=np.float32).copy())
    if d.shape != (head_dim // 2,) or not torch.isfinite(d).all() or (d <= 0).any():
        raise ValueError(
            f"{source}: {ROPE_FREQS} has shape {tuple(d.shape)} (needs ({head_dim // 2},) positive finite values, "
            "one per rotary pair)"
        )
    if torch.allclose(d, torch.ones_like(d), rtol=0, atol=1e-6):
        return None
    freqs = rope_frequencies(head_dim, theta, None)
    target = freqs / d
    factor = float(f"{float(d.max()):.6g}")  # 8.000001 from float32 division is the 8 it was meant as
    tol = 1e-6 * factor
    unit, full = (d - 1).abs() <= 1e-6, (d - factor).abs() <= tol
    band = ~(unit | full)
    smooth = (1 / d[band].double() - 1 / factor) / (1 - 1 / factor)  # 0 at the long end, 1 at the short end
    f = freqs.double()
    default = int(original or _LLAMA3_ORIGINAL_CONTEXT)

    def fits(scaling: RopeScaling) -> bool:
        return torch.allclose(rope_frequencies(head_dim, theta, scaling), target, rtol=1e-5, atol=0)

    candidates: list[tuple[float, float, int]] = []
    if band.any():  # x = original * f / (2 pi) = low + smooth * (high - low), with low 1, high 4
        estimates = 2 * math.pi * (1 + 3 * smooth) / f[band]
        candidates.append((1.0, 4.0, round(float(estimates.median()))))
    else:  # any length with x > 4 on the unscaled pairs and x < 1 on the scaled ones fits
        lo = float(8 * math.pi / f[unit].min()) if unit.any() else 0.0
        hi = float(2 * math.pi / f[full].max()) if full.any() else math.inf
        choices = [default] + [2 ** k for k in range(64)] + [math.floor(lo) + 1]
        candidates += [(1.0, 4.0, c) for c in choices if lo < c < hi][:1]
    if int(band.sum()) >= 2:  # general low / high at the given (or converter's) context length
        x = f[band] * default / (2 * math.pi)
        slope, low = np.polyfit(smooth.numpy(), x.numpy(), 1)
        candidates.append((float(f"{low:.6g}"), float(f"{low + slope:.6g}"), default))
    for low, high, orig in candidates:
        try:
            scaling = RopeScaling(factor=factor, low_freq_factor=low, high_freq_factor=high, original_max_seq_len=orig)
        except ValueError:
            continue
        if fits(scaling):
            return scaling
    raise ValueError(
        f"{source}: {ROPE_FREQS} does not follow Llama 3.1's RoPE scaling rule (divisor 1 for short "
        "wavelengths, one constant factor for long ones, a linear blend in between), so herd cannot "
        f"reproduce it; divisors: {[round(float(v), 4) for v in d]}"
    )


def _check_shapes(args: ModelArgs, shapes: Mapping[str, tuple[int, ...]], source: Path) -> None:
    # The metadata's shape fields first: a block_count of 10**9 must not reach _expected_shapes.
    herd_shapes = {key: shape for name, shape in shapes.items() if (key := herd_name(name)) is not None}
    check_against_weights(args, herd_shapes, GGUF_FIELDS, source=source)
    expected = {gguf_name(k): tuple(s) for k, s in _expected_shapes(args).items()
                if not (k == "output.weight" and args.tie_embeddings)}
    unknown = sorted(n for n in shapes if n not in expected and n != ROPE_FREQS)
    if unknown:
        raise ValueError(
            f"{source} holds tensors a Llama model does not have: {', '.join(unknown[:5])}; it is not a plain "
            "Llama model, or its llama.block_count is wrong"
        )
    missing = [n for n in expected if n not in shapes]
    if missing:
        raise ValueError(f"{source} lacks {len(missing)} tensor(s) of a Llama model: {', '.join(missing[:5])}")
    for name, shape in expected.items():
        if shapes[name] != shape:
            raise ValueError(
                f"{source}: {name} has shape {shapes[name]} but the metadata (llama.embedding_length, "
                f"feed_forward_length, attention.head_count*, vocab_size) implies {shape}"
            )


def _dequantize(t: _Tensor, data: np.ndarray, source: Path) -> torch.Tensor:
    gguf = gguf_package()
    Q = gguf.GGMLQuantizationType
    if t.type in (Q.F32, Q.F16):  # already (rows, cols) of the right dtype: share the memory map
        return torch.from_numpy(data)
    if t.type == Q.BF16:  # stored as bytes; reinterpret pairs of them as bfloat16
        return torch.from_numpy(data).view(torch.bfloat16)
    try:
        values = gguf.quants.dequantize(data, t.type)
    except NotImplementedError as e:
        raise ValueError(
            f"{source}: tensor {t.name} has type {t.type.name}, which the installed gguf package cannot "
            "dequantize; upgrade gguf, or re-quantize the file (e.g. Q8_0 or Q4_K_M)"
        ) from e
    return torch.from_numpy(values)


def _scan(path: str | os.PathLike, *, summarize_arrays: bool = False):
    """Read the header, derive ModelArgs, check shapes; of the tensor data only rope_freqs is read."""
    source = Path(path)
    header = _open(source)
    meta = _metadata(header, summarize_arrays=summarize_arrays)
    tensors = _locate(header, source)
    shapes = {name: t.shape for name, t in tensors.items()}
    divisors = None
    if ROPE_FREQS in tensors:
        freqs = tensors[ROPE_FREQS]
        raw = np.fromfile(source, dtype=np.uint8, count=freqs.nbytes, offset=freqs.offset)
        divisors = np.array(gguf_package().quants.dequantize(_array(raw, freqs), freqs.type), dtype=np.float32).reshape(-1)
    args = _args_from_metadata(meta, shapes, divisors, source)
    _check_shapes(args, shapes, source)
    return meta, tensors, args


def read_gguf(path: str | os.PathLike) -> GGUFCheckpoint:
    """Read a llama-architecture GGUF file: ModelArgs from its metadata, weights dequantized to float."""
    source = Path(path)
    meta, tensors, args = _scan(source)
    sd: dict[str, torch.Tensor] = {}
    types: dict[str, str] = {}
    for key, t, data in _weights(source, tensors, writable=True):
        sd[key] = _dequantize(t, data, source)
        types[key] = t.type.name
    return GGUFCheckpoint(path=source, args=args, state_dict=sd, tensor_types=types, metadata=meta)


def gguf_raw_tensors(path: str | os.PathLike) -> dict[str, RawTensor]:
    """Every weight's stored blocks, keyed by herd name, without dequantizing.

    GGUF's q/k rows are already in herd's (Meta's) order, so no rows need permuting. A tied
    head has no `output.weight` entry. The arrays are read-only views of the memory-mapped file.
    """
    source = Path(path)
    _, tensors, _ = _scan(source)
    return {key: RawTensor(type=t.type.name, shape=t.shape, data=data.view(np.uint8))
            for key, t, data in _weights(source, tensors, writable=False)}


def load_gguf(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    max_seq_len: int | None = None,
) -> Transformer:
    """A herd Transformer from a GGUF file (what `load_model` does for a .gguf path).

    dtype=None keeps the embedding's stored float type: float32 for F32 and for every quantized
    type (they are dequantized to float32), float16 / bfloat16 for F16 / BF16.
    """
    ckpt = read_gguf(path)
    args = ckpt.args if max_seq_len is None else ckpt.args.replace(max_seq_len=max_seq_len)
    return _materialize(args, ckpt.state_dict, dtype=dtype, device=device, source=ckpt.path)


def describe_gguf(path: str | os.PathLike) -> CheckpointInfo:
    """What `herd info file.gguf` prints: args, tensor types, size; no tensor is dequantized."""
    source = Path(path)
    meta, tensors, args = _scan(source, summarize_arrays=True)
    counts = Counter(t.type.name for t in tensors.values())
    summary = ", ".join(f"{name} ({n})" for name, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    return CheckpointInfo(path=source, format="gguf", args=args, config=meta, files=(source.name,), dtype=summary,
                          num_params=args.num_params(), bytes_on_disk=source.stat().st_size)


__all__ = [
    "GGUFCheckpoint",
    "RawTensor",
    "describe_gguf",
    "gguf_name",
    "gguf_raw_tensors",
    "herd_name",
    "load_gguf",
    "read_gguf",
    "write_gguf",
]
