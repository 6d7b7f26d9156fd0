"""Writing a herd model as a llama.cpp GGUF file (`write_gguf`; also importable from `herd.model.gguf`).

Follows llama.cpp's converter at F32 / F16 / Q8_0 (every matrix, embedding included, in the file's
type; norms and `rope_freqs` in F32) and `llama-quantize` at Q4_0, which keeps the output head
(the embedding when tied) at more bits: Q6_K there, Q8_0 here because the `gguf` package cannot
write K-quants (Q8_0 is also llama.cpp's own fallback for that tensor). Llama 3.1 RoPE scaling is
written as llama.cpp expects it, a `rope_freqs.weight` tensor of per-pair divisors, and a tied
head as a missing `output.weight`. Tensors are quantized and written one at a time, so memory
holds one tensor's blocks rather than the whole file's.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from numbers import Integral, Real
from pathlib import Path
from typing import Any

import numpy as np
import torch

from herd.io import atomic_path
from herd.model.args import ModelArgs
from herd.model.formats import _model_state
from herd.model.gguf_names import ARCH, ROPE_FREQS, gguf_name, gguf_package
from herd.model.llama import Transformer
from herd.model.rope import rope_frequencies

# qtype -> general.file_type (llama.cpp's LlamaFileType numbers)
_FILE_TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q8_0": 7}

# The tokenizer keys a writer accepts and their GGUF value types. llama.cpp reads each with
# one exact type (token_type must be an int32 array, ids uint32, flags bool), so nothing is
# inferred from the Python value.
_TOKENIZER_KEYS: dict[str, str] = {
    "tokenizer.ggml.model": "str",
    "tokenizer.ggml.pre": "str",
    "tokenizer.ggml.tokens": "str[]",
    "tokenizer.ggml.token_type": "int32[]",
    "tokenizer.ggml.scores": "float32[]",
    "tokenizer.ggml.merges": "str[]",
    "tokenizer.ggml.bos_token_id": "id",
    "tokenizer.ggml.eos_token_id": "id",
    "tokenizer.ggml.eot_token_id": "id",
    "tokenizer.ggml.eom_token_id": "id",
    "tokenizer.ggml.padding_token_id": "id",
    "tokenizer.ggml.unknown_token_id": "id",
    "tokenizer.ggml.add_bos_token": "bool",
    "tokenizer.ggml.add_eos_token": "bool",
    "tokenizer.ggml.add_space_prefix": "bool",
    "tokenizer.chat_template": "str",
}


def _is_int(v: Any) -> bool:
    return isinstance(v, Integral) and not isinstance(v, bool)


def _check_tokenizer_metadata(meta: Mapping[str, Any], vocab_size: int) -> list[tuple[str, Any, str]]:
    """Validated (key, value, kind) triples; ValueError naming the first bad entry."""
    unknown = sorted(set(meta) - set(_TOKENIZER_KEYS))
    if unknown:
        raise ValueError(f"tokenizer_metadata has unknown keys {', '.join(unknown)}; allowed: {', '.join(_TOKENIZER_KEYS)}")
    out = []
    for key, value in meta.items():
        kind = _TOKENIZER_KEYS[key]
        if kind.endswith("[]"):
            if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)) or not value:
                raise ValueError(f"tokenizer_metadata[{key!r}] must be a non-empty list, got {type(value).__name__}")
            item_ok = {"str[]": lambda v: isinstance(v, str),
                       "int32[]": lambda v: _is_int(v) and -2**31 <= v < 2**31,
                       "float32[]": lambda v: isinstance(v, Real) and not isinstance(v, bool)}[kind]
            bad = [i for i, v in enumerate(value) if not item_ok(v)]
            if bad:
                raise ValueError(f"tokenizer_metadata[{key!r}] must hold {kind[:-2]} values only; entry {bad[0]} "
                                 f"is {value[bad[0]]!r}")
            if key != "tokenizer.ggml.merges" and len(value) != vocab_size:
                raise ValueError(
                    f"tokenizer_metadata[{key!r}] has {len(value)} entries but the model's vocabulary has {vocab_size} "
                    "tokens; llama.cpp needs one entry per embedding row"
                )
            value = list(value)
        elif kind == "id":
            if not _is_int(value) or not 0 <= value < vocab_size:
                raise ValueError(f"tokenizer_metadata[{key!r}] must be a token id in [0, {vocab_size}), got {value!r}")
            value = int(value)
        elif kind == "bool" and not isinstance(value, bool):
            raise ValueError(f"tokenizer_metadata[{key!r}] must be True or False, got {value!r}")
        elif kind == "str" and not isinstance(value, str):
            raise ValueError(f"tokenizer_metadata[{key!r}] must be a string, got {type(value).__name__}")
        out.append((key, value, kind))
    return out


def _tensor_type(key: str, t: torch.Tensor, args: ModelArgs, qtype: str) -> str:
    if t.dim() == 1:
        return "F32"  # llama.cpp's norm code handles F32 only
    is_head = key == "output.weight" or (key == "tok_embeddings.weight" and args.tie_embeddings)
    want = "Q8_0" if qtype == "Q4_0" and is_head else qtype
    if want in ("Q4_0", "Q8_0") and t.shape[-1] % 32 != 0:
        want = "F16"  # rows must be whole 32-value blocks; the converter falls back the same way
    return want


def write_gguf(
    model: Transformer,
    path: str | os.PathLike,
    *,
    qtype: str = "F32",
    tokenizer_metadata: Mapping[str, Any] | None = None,
    name: str | None = None,
) -> Path:
    """Write `model` as a llama.cpp GGUF file at `path`, atomically (herd.io.atomic_path).

    qtype: "F32", "F16", "Q8_0" or "Q4_0" for the 2-D weights; norms stay F32. At Q4_0 the
    output head (the embedding when tied) is Q8_0, as llama-quantize keeps it at 6+ bits; a
    matrix whose rows are not whole 32-value blocks falls back to F16.
    tokenizer_metadata: `tokenizer.ggml.*` / `tokenizer.chat_template` keys with plain Python
    values (see `_TOKENIZER_KEYS`). llama.cpp refuses a file without a vocabulary; herd reads
    one either way.
    """
    if qtype not in _FILE_TYPES:
        raise ValueError(f"qtype must be one of {', '.join(_FILE_TYPES)}, got {qtype!r}")
    args, sd = _model_state(model)
    tokenizer = _check_tokenizer_metadata(tokenizer_metadata or {}, args.vocab_size)
    gguf = gguf_package()
    Q = gguf.GGMLQuantizationType
    tensors: dict[str, tuple[Any, torch.Tensor]] = {}  # GGUF name -> (GGML type, float tensor), file order
    if args.rope_scaling is not None:
        # llama.cpp divides each pair's angle by its entry: unscaled / scaled frequency.
        unscaled = rope_frequencies(args.head_dim, args.rope_theta, None)
        tensors[ROPE_FREQS] = (Q.F32, unscaled / rope_frequencies(args.head_dim, args.rope_theta, args.rope_scaling))
    for key, t in sd.items():
        if not (key == "output.weight" and args.tie_embeddings):  # llama.cpp reuses token_embd then
            tensors[gguf_name(key)] = (Q[_tensor_type(key, t, args, qtype)], t)

    dst = Path(path)
    with atomic_path(dst) as tmp:
        w = gguf.GGUFWriter(tmp, ARCH)
        try:
            _add_metadata(w, args, qtype=qtype, tokenizer=tokenizer, name=name)
            # Declare every tensor first, then quantize and write one at a time, so memory holds
            # one tensor's blocks rather than the whole file's (what GGUFWriter.add_tensor would do).
            for gname, (kind, t) in tensors.items():
                block, size = gguf.GGML_QUANT_SIZES[kind]
                w.add_tensor_info(gname, tuple(t.shape), np.dtype(np.float32), t.numel() // block * size,
                                  raw_dtype=kind)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            for kind, t in tensors.values():
                w.write_tensor_data(gguf.quants.quantize(t.detach().float().contiguous().numpy(), kind))
        finally:
            w.close()  # before atomic_path renames (or deletes) the file
    return dst


def _add_metadata(w, args: ModelArgs, *, qtype: str, tokenizer: list[tuple[str, Any, str]], name: str | None) -> None:
    gguf = gguf_package()
    T = gguf.GGUFValueType
    w.add_type("model")
    if name is not None:
        w.add_name(name)
    w.add_file_type(_FILE_TYPES[qtype])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(args.max_seq_len)
    w.add_embedding_length(args.dim)
    w.add_block_count(args.n_layers)
    w.add_feed_forward_length(args.ffn_hidden_dim)
    w.add_head_count(args.n_heads)
    w.add_head_count_kv(args.n_kv_heads)
    w.add_key_length(args.head_dim)
    w.add_value_length(args.head_dim)
    w.add_rope_dimension_count(args.head_dim)
    w.add_rope_freq_base(args.rope_theta)
    w.add_layer_norm_rms_eps(args.norm_eps)
    w.add_vocab_size(args.vocab_size)
    kinds = {"str": (T.STRING, None), "bool": (T.BOOL, None), "id": (T.UINT32, None),
             "str[]": (T.ARRAY, T.STRING), "int32[]": (T.ARRAY, T.INT32), "float32[]": (T.ARRAY, T.FLOAT32)}
    for key, value, kind in tokenizer:
        vtype, sub = kinds[kind]
        w.add_key_value(key, value, vtype, sub_type=sub)


__all__ = ["write_gguf"]
