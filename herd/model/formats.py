"""Checkpoint formats: Meta `consolidated.*.pth` <-> herd <-> Hugging Face safetensors.

herd's parameter names are Meta's, so a Meta checkpoint needs no renaming and the only HF
knowledge in the code base is here: one key table (`_KEY_MAP`) and the q/k row permutation
that turns Meta's interleaved RoPE pairs into HF's rotate_half halves.

Design trade-off: conversion works on whole state dicts (read everything, rename, permute,
check, then `load_state_dict(assign=True)` into a model built on the meta device) rather than
streaming tensor by tensor. That keeps one code path and one set of error checks for both
formats. Memory stays near one copy of the weights because safetensors and
`torch.load(mmap=True)` map the files instead of reading them; the copies that remain are
the permuted wq/wk, a dtype change, and concatenating Meta model-parallel shards.

Conventions where the formats disagree (see shared/research/llama3-reference.md §1, §3):
* Tied embeddings: HF omits `lm_head.weight`; Meta stores `output.weight` as a copy of the
  embedding. Both are read; on save each format gets what its own loader expects.
* params.json has no RoPE scaling factor, no context length and no head_dim. herd writes
  those under a `"herd"` key, which Meta's `ModelArgs` ignores (it skips unknown keys). A
  top-level `max_seq_len` would not be safe: Meta's `Llama3.build` passes `max_seq_len=`
  itself and `**params` would then raise a duplicate-keyword TypeError.
* config.json has no `multiple_of`/`ffn_dim_multiplier`, only the resulting
  `intermediate_size`; `_ffn_params_for` recovers a pair that reproduces it exactly.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import safetensors
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from herd.model.args import PRESETS, ModelArgs, RopeScaling
from herd.model.llama import Transformer

Format = Literal["hf", "meta"]

HF_CONFIG = "config.json"
HF_GENERATION_CONFIG = "generation_config.json"
HF_WEIGHTS = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"
META_PARAMS = "params.json"
_META_SHARD_RE = re.compile(r"^consolidated\.(\d+)\.pth$")
# Files that are not weights but make a converted directory usable (tokenizers).
_SIDE_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
DEFAULT_SHARD_SIZE = 5_000_000_000  # bytes; HF's default max_shard_size ("5GB")

# ---- the key map ---------------------------------------------------------------------------

# herd/Meta name -> HF name; "{}" is the layer index. The only place HF names appear.
_KEY_MAP: dict[str, str] = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "layers.{}.attention.wq.weight": "model.layers.{}.self_attn.q_proj.weight",
    "layers.{}.attention.wk.weight": "model.layers.{}.self_attn.k_proj.weight",
    "layers.{}.attention.wv.weight": "model.layers.{}.self_attn.v_proj.weight",
    "layers.{}.attention.wo.weight": "model.layers.{}.self_attn.o_proj.weight",
    "layers.{}.feed_forward.w1.weight": "model.layers.{}.mlp.gate_proj.weight",
    "layers.{}.feed_forward.w2.weight": "model.layers.{}.mlp.down_proj.weight",
    "layers.{}.feed_forward.w3.weight": "model.layers.{}.mlp.up_proj.weight",
    "layers.{}.attention_norm.weight": "model.layers.{}.input_layernorm.weight",
    "layers.{}.ffn_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
}
_KEY_MAP_INV = {hf: herd for herd, hf in _KEY_MAP.items()}
_LAYER_RE = re.compile(r"(?<=layers\.)(\d+)(?=\.)")

# Keys older checkpoints carry that hold no weights: Llama 2's precomputed `rope.freqs`
# (Meta) and the `rotary_emb.inv_freq` buffers of old HF converters. Both are recomputed.
_IGNORED_META_KEYS = ("rope.freqs",)
_IGNORED_HF_SUFFIX = "rotary_emb.inv_freq"

# Dimension along which Meta's model-parallel files split each weight (fairscale Column/Row
# ParallelLinear and VocabParallelEmbedding); None means replicated in every file.
_MP_SPLIT_DIM: dict[str, int | None] = {
    "wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "tok_embeddings": 0,
    "wo": 1, "w2": 1,
    "attention_norm": None, "ffn_norm": None, "norm": None,
}

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _module_name(key: str) -> str:
    """"layers.0.attention.wq.weight" -> "wq"; "norm.weight" -> "norm"."""
    parts = key.split(".")
    return parts[-2] if len(parts) >= 2 else key


def _rename(key: str, table: Mapping[str, str]) -> str | None:
    template = _LAYER_RE.sub("{}", key, count=1)
    if template not in table:
        return None
    layer = _LAYER_RE.search(key)
    return table[template].format(layer.group(1)) if layer else table[template]


def hf_key(key: str) -> str:
    """HF name of a herd/Meta parameter name; ValueError for a name outside the model."""
    out = _rename(key, _KEY_MAP)
    if out is None:
        raise ValueError(f"{key!r} is not a Llama parameter name (expected e.g. 'layers.0.attention.wq.weight')")
    return out


def herd_key(key: str) -> str | None:
    """herd/Meta name of an HF parameter name, or None for a name the key map does not know."""
    return _rename(key, _KEY_MAP_INV)


# ---- the q/k permutation -------------------------------------------------------------------


def permute_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the rows of a Meta wq/wk (n_heads * hd, dim) into HF's rotate_half layout.

    Meta rotates interleaved pairs (2j, 2j+1) of each head; HF rotates (j, j + hd/2). So within
    each head, HF row j is Meta row 2j and HF row j + hd/2 is Meta row 2j + 1. q and k get the
    same reordering, so q.k (and the model) is unchanged.
    """
    rows, cols = _check_qk_rows(w, n_heads)
    hd = rows // n_heads
    return w.reshape(n_heads, hd // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def permute_from_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of `permute_to_hf`: HF rotate_half rows back to Meta's interleaved rows."""
    rows, cols = _check_qk_rows(w, n_heads)
    hd = rows // n_heads
    return w.reshape(n_heads, 2, hd // 2, cols).transpose(1, 2).reshape(rows, cols)


def _check_qk_rows(w: torch.Tensor, n_heads: int) -> tuple[int, int]:
    if w.dim() != 2 or w.shape[0] % (2 * n_heads) != 0:
        raise ValueError(
            f"cannot permute a q/k weight of shape {tuple(w.shape)} for {n_heads} heads: rows must be "
            "n_heads * head_dim with an even head_dim"
        )
    return w.shape[0], w.shape[1]


def to_hf_state_dict(state_dict: Mapping[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """herd/Meta state dict -> HF names and rotate_half q/k rows; a tied output is left out."""
    sd = _permute_qk(dict(state_dict), args, permute_to_hf)
    # HF re-ties lm_head to embed_tokens on load and does not store it.
    return {hf_key(k): t for k, t in sd.items() if not (k == "output.weight" and args.tie_embeddings)}


def from_hf_state_dict(state_dict: Mapping[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """HF state dict -> herd/Meta names and interleaved q/k rows.

    Old `rotary_emb.inv_freq` buffers are dropped; other unknown keys are kept under their own
    name so the caller's key check can report them. A tied model gets `output.weight` as the
    embedding tensor itself (a `lm_head.weight` in the file must then equal the embedding).
    """
    return _permute_qk(_rename_from_hf(state_dict, args), args, permute_from_hf)


def _permute_qk(
    sd: dict[str, torch.Tensor], args: ModelArgs, fn: Callable[[torch.Tensor, int], torch.Tensor]
) -> dict[str, torch.Tensor]:
    out = dict(sd)
    for key, t in sd.items():
        if key.endswith("attention.wq.weight"):
            out[key] = fn(t, args.n_heads)
        elif key.endswith("attention.wk.weight"):
            out[key] = fn(t, args.n_kv_heads)
    return out


def _rename_from_hf(state_dict: Mapping[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    out = {herd_key(k) or k: t for k, t in state_dict.items() if not k.endswith(_IGNORED_HF_SUFFIX)}
    if args.tie_embeddings and "tok_embeddings.weight" in out:
        emb = out["tok_embeddings.weight"]
        head = out.get("output.weight")
        if head is not None and not _equal(head, emb):
            raise ValueError(
                f"config says tie_word_embeddings=true but {hf_key('output.weight')} differs from "
                f"{hf_key('tok_embeddings.weight')}; set tie_word_embeddings to false in {HF_CONFIG}"
            )
        out["output.weight"] = emb
    return out


# ---- HF config.json ------------------------------------------------------------------------

_HF_REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


def args_from_hf_config(config: Mapping[str, Any]) -> ModelArgs:
    """ModelArgs for an HF Llama config.json dict.

    Optional fields get transformers' own defaults (LlamaConfig), so herd reads a config the
    way transformers does. Fields that would change the math in ways herd does not implement
    (biases, another activation, partial rotary, other RoPE types) are errors.
    """
    missing = [k for k in _HF_REQUIRED if config.get(k) is None]
    if missing:
        raise ValueError(
            f"HF config is missing {', '.join(missing)}; a Llama config.json needs {', '.join(_HF_REQUIRED)}"
        )
    model_type = config.get("model_type", "llama")
    if model_type != "llama":
        raise ValueError(f"HF config has model_type {model_type!r}; herd loads only model_type 'llama'")
    if config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"HF config has hidden_act {config['hidden_act']!r}; Llama 3 uses 'silu'")
    for flag in ("attention_bias", "mlp_bias"):
        if config.get(flag):
            raise ValueError(f"HF config sets {flag}=true; Llama 3 has no biases and herd does not implement them")

    dim, n_heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    max_pos = int(config.get("max_position_embeddings", 2048))
    head_dim = config.get("head_dim")
    multiple_of, multiplier = _ffn_params_for(dim, int(config["intermediate_size"]))
    theta, scaling = _rope_from_hf(config, max_pos)
    return ModelArgs(
        dim=dim,
        n_layers=int(config["num_hidden_layers"]),
        n_heads=n_heads,
        n_kv_heads=int(config.get("num_key_value_heads") or n_heads),
        vocab_size=int(config["vocab_size"]),
        multiple_of=multiple_of,
        ffn_dim_multiplier=multiplier,
        norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_seq_len=max_pos,
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        head_dim_override=int(head_dim) if head_dim is not None and int(head_dim) * n_heads != dim else None,
    )


def _rope_from_hf(config: Mapping[str, Any], max_pos: int) -> tuple[float, RopeScaling | None]:
    # transformers 4.x writes rope_theta + rope_scaling; 5.x folds both into rope_parameters.
    # When both are present, transformers lets rope_scaling win, so do the same.
    rope = config.get("rope_scaling") or config.get("rope_parameters") or {}
    if not isinstance(rope, Mapping):
        raise ValueError(f"HF config rope_scaling/rope_parameters must be an object, got {rope!r}")
    theta = float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
    if float(rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))) != 1.0:
        raise ValueError("HF config sets partial_rotary_factor != 1; Llama 3 rotates the whole head")
    rope_type = rope.get("rope_type", rope.get("type"))
    if rope_type in (None, "default"):
        return theta, None
    if rope_type != "llama3":
        raise ValueError(
            f"HF config has rope_type {rope_type!r}, which herd does not implement; supported: "
            "'default' (no scaling, Llama 3) and 'llama3' (Llama 3.1 / 3.2 scaling)"
        )
    missing = [k for k in ("factor", "low_freq_factor", "high_freq_factor") if rope.get(k) is None]
    if missing:
        raise ValueError(f"HF config rope_type 'llama3' is missing {', '.join(missing)}")
    scaling = RopeScaling(
        factor=float(rope["factor"]),
        low_freq_factor=float(rope["low_freq_factor"]),
        high_freq_factor=float(rope["high_freq_factor"]),
        # transformers falls back to max_position_embeddings when this is absent.
        original_max_seq_len=int(rope.get("original_max_position_embeddings", max_pos)),
    )
    return theta, scaling


def _ffn_params_for(dim: int, hidden: int) -> tuple[int, float | None]:
    """(multiple_of, ffn_dim_multiplier) that make Meta's FFN rule give exactly `hidden`.

    config.json only stores the result, and many pairs produce it. A published shape (8B's
    1024 / 1.3, ...) is preferred so real checkpoints convert back into Meta's own params.json.
    Otherwise pick multiple_of = hidden and the multiplier hidden / int(8 * dim / 3): the
    truncation can only land on hidden or hidden - 1, and rounding up to a multiple of hidden
    gives hidden either way. Exact for every width, at the price of unusual-looking values.
    """
    if hidden <= 1:
        raise ValueError(f"intermediate_size must be > 1, got {hidden}")
    for preset in PRESETS.values():
        if preset.dim == dim and preset.ffn_hidden_dim == hidden:
            return preset.multiple_of, preset.ffn_dim_multiplier
    base = int(2 * (4 * dim) / 3)
    multiplier = None if base == hidden else hidden / base
    # A throwaway ModelArgs applies the one copy of Meta's rule; head_dim_override only keeps
    # its RoPE checks out of the way for odd dims.
    probe = ModelArgs(dim=dim, n_layers=1, n_heads=1, multiple_of=hidden, ffn_dim_multiplier=multiplier,
                      head_dim_override=2)
    if probe.ffn_hidden_dim != hidden:
        raise ValueError(
            f"intermediate_size {hidden} cannot be reproduced by Meta's FFN rule for hidden_size {dim}"
        )
    return hidden, multiplier


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _default_token_ids(args: ModelArgs) -> tuple[int | None, int | None]:
    # ModelArgs has no token ids; they belong to the tokenizer. For the real Llama 3 vocabulary
    # use <|begin_of_text|> / <|end_of_text|>; a custom vocabulary gets none rather than ids
    # that point at the wrong tokens.
    return (128000, 128001) if args.vocab_size == 128256 else (None, None)


def hf_config_from_args(
    args: ModelArgs,
    *,
    dtype: torch.dtype = torch.bfloat16,
    bos_token_id: int | None = None,
    eos_token_id: int | list[int] | None = None,
) -> dict[str, Any]:
    """A config.json dict that transformers (4.46+ and 5.x) loads as LlamaForCausalLM.

    Written in the 4.x form (rope_theta + rope_scaling, torch_dtype), which 5.x still reads.
    Token ids default to Llama 3's when the vocabulary is Llama 3's (see `_default_token_ids`).
    """
    default_bos, default_eos = _default_token_ids(args)
    scaling = args.rope_scaling
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.dim,
        "intermediate_size": args.ffn_hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "rope_scaling": None if scaling is None else {
            "rope_type": "llama3",
            "factor": scaling.factor,
            "low_freq_factor": scaling.low_freq_factor,
            "high_freq_factor": scaling.high_freq_factor,
            "original_max_position_embeddings": scaling.original_max_seq_len,
        },
        "max_position_embeddings": args.max_seq_len,
        "tie_word_embeddings": args.tie_embeddings,
        "vocab_size": args.vocab_size,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
        "torch_dtype": _dtype_name(dtype),
        "bos_token_id": default_bos if bos_token_id is None else bos_token_id,
        "eos_token_id": default_eos if eos_token_id is None else eos_token_id,
    }


# ---- Meta params.json ----------------------------------------------------------------------

_META_KEYS = {
    "dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier", "norm_eps",
    "rope_theta", "use_scaled_rope", "max_batch_size", "max_seq_len",
    "vision_chunk_size", "vision_max_num_chunks", "vision_num_cross_attention_layers",
}
_HERD_KEYS = {"rope_scaling", "max_seq_len", "tie_embeddings", "head_dim"}


def _is_llama32_small(dim: int, n_layers: int) -> bool:
    return (dim, n_layers) in ((2048, 16), (3072, 28))


def args_from_meta_params(params: Mapping[str, Any]) -> ModelArgs:
    """ModelArgs for a Meta params.json dict (optionally nested under "model").

    Values herd wrote under "herd" (exact rope scaling, context length, ties, head_dim) win;
    otherwise the scaling factor and context length follow the published models.
    """
    params = params.get("model", params)
    herd = params.get("herd") or {}
    unknown = sorted(set(params) - _META_KEYS - {"herd"})
    if "quantization_args" in unknown or "lora_args" in unknown:
        raise ValueError("params.json describes a quantized / LoRA checkpoint; herd loads only bf16/fp16/fp32 weights")
    if unknown:
        raise ValueError(
            f"params.json has keys herd does not know: {', '.join(unknown)}; remove them if they do not "
            "change the model"
        )
    if params.get("vision_chunk_size", -1) > 0 or params.get("vision_num_cross_attention_layers", -1) > 0:
        raise ValueError("params.json describes a vision model (Llama 3.2 11B/90B); herd implements text models only")
    unknown_herd = sorted(set(herd) - _HERD_KEYS)
    if unknown_herd:
        raise ValueError(f"params.json 'herd' section has unknown keys: {', '.join(unknown_herd)}")
    missing = [k for k in ("dim", "n_layers", "n_heads", "vocab_size") if params.get(k) in (None, -1)]
    if missing:
        raise ValueError(f"params.json is missing {', '.join(missing)}")

    dim, n_layers = int(params["dim"]), int(params["n_layers"])
    use_scaled = bool(params.get("use_scaled_rope", False))
    if "rope_scaling" in herd:
        scaling = None if herd["rope_scaling"] is None else RopeScaling(**herd["rope_scaling"])
        if "use_scaled_rope" in params and use_scaled != (scaling is not None):
            raise ValueError("params.json: use_scaled_rope disagrees with herd.rope_scaling; fix one of them")
    elif use_scaled:
        # params.json carries no factor and Meta's code hard-codes 8, but Meta confirmed 32 is
        # right for Llama 3.2 1B/3B (meta-llama/llama-models#166), as their HF configs say.
        scaling = RopeScaling(factor=32.0 if _is_llama32_small(dim, n_layers) else 8.0)
    else:
        scaling = None
    # Published context lengths: 8192 for Llama 3, 131072 for the scaled 3.1 / 3.2 models.
    default_len = params.get("max_seq_len") or (131072 if use_scaled else 8192)
    n_heads = int(params["n_heads"])
    head_dim = herd.get("head_dim")
    return ModelArgs(
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=int(params.get("n_kv_heads") or n_heads),
        vocab_size=int(params["vocab_size"]),
        multiple_of=int(params.get("multiple_of", 256)),
        ffn_dim_multiplier=params.get("ffn_dim_multiplier"),
        norm_eps=float(params.get("norm_eps", 1e-5)),
        rope_theta=float(params.get("rope_theta", 500000.0)),
        rope_scaling=scaling,
        max_seq_len=int(herd.get("max_seq_len", default_len)),
        tie_embeddings=bool(herd.get("tie_embeddings", False)),
        head_dim_override=int(head_dim) if head_dim is not None else None,
    )


def meta_params_from_args(args: ModelArgs) -> dict[str, Any]:
    """params.json dict: Meta's fields, plus herd's exact values under "herd" (ignored by Meta)."""
    params: dict[str, Any] = {
        "dim": args.dim,
        "n_layers": args.n_layers,
        "n_heads": args.n_heads,
        "n_kv_heads": args.n_kv_heads,
        "vocab_size": args.vocab_size,
        "multiple_of": args.multiple_of,
        "ffn_dim_multiplier": args.ffn_dim_multiplier,
        "norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "use_scaled_rope": args.rope_scaling is not None,
    }
    herd: dict[str, Any] = {
        "rope_scaling": None if args.rope_scaling is None else dataclasses.asdict(args.rope_scaling),
        "max_seq_len": args.max_seq_len,
        "tie_embeddings": args.tie_embeddings,
    }
    if args.head_dim_override is not None:
        # Meta's ModelArgs has no head_dim, so its own loader cannot build such a model.
        herd["head_dim"] = args.head_dim_override
    params["herd"] = herd
    return params


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


def _read_safetensors(files: Iterable[Path]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            # safe_open maps the file (copy-on-write) instead of reading it into memory.
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for key in f.keys():
                    if key in out:
                        raise ValueError(f"tensor {key!r} appears in more than one shard (again in {path})")
                    out[key] = f.get_tensor(key)
        except safetensors.SafetensorError as e:
            raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from e
    return out


def _read_hf(loc: _Located, args: ModelArgs) -> dict[str, torch.Tensor]:
    raw = _read_safetensors(loc.weight_files)
    if loc.index_file is not None:
        listed = set(_read_json(loc.index_file)["weight_map"])
        if listed != set(raw):
            diff = sorted(listed ^ set(raw))
            raise ValueError(f"{loc.index_file} does not match its shards; differing keys: {', '.join(diff[:5])}")
    _check_vocab(raw.get(hf_key("tok_embeddings.weight")), args, loc.config_file)
    sd = _rename_from_hf(raw, args)
    _check_state_dict(sd, args, source=loc.root)  # before permuting, so bad shapes name their key
    return _permute_qk(sd, args, permute_from_hf)


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
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


def _merge_meta_shards(shards: list[dict[str, torch.Tensor]], files: list[Path]) -> dict[str, torch.Tensor]:
    """Concatenate Meta model-parallel files into one state dict (see `_MP_SPLIT_DIM`)."""
    if len(shards) == 1:
        return shards[0]
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
        split = _MP_SPLIT_DIM.get(_module_name(key))
        merged[key] = pieces[0] if split is None else torch.cat(pieces, dim=split)
    return merged


def _equal(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return a is not None and b is not None and a.shape == b.shape and torch.equal(a, b)


def _meta_is_tied(shards: list[dict[str, torch.Tensor]], hint: bool | None) -> bool:
    if hint is not None:  # herd wrote it
        return bool(hint)
    # Meta's 3.2 1B/3B files store output.weight as a copy of the embedding; equality is the tie.
    return all(_equal(sd.get("output.weight"), sd.get("tok_embeddings.weight")) for sd in shards)


def _meta_args(loc: _Located, shards: list[dict[str, torch.Tensor]]) -> ModelArgs:
    params = _read_json(loc.config_file)
    try:
        args = args_from_meta_params(params)
    except ValueError as e:
        raise ValueError(f"{loc.config_file}: {e}") from e
    herd = params.get("model", params).get("herd") or {}
    tied = _meta_is_tied(shards, herd.get("tie_embeddings"))
    return args.replace(tie_embeddings=tied)


def _read_meta(loc: _Located) -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    shards = [_torch_load(p) for p in loc.weight_files]
    args = _meta_args(loc, shards)
    sd = _merge_meta_shards(shards, list(loc.weight_files))
    _check_vocab(sd.get("tok_embeddings.weight"), args, loc.config_file)
    if args.tie_embeddings:
        head, emb = sd.get("output.weight"), sd.get("tok_embeddings.weight")
        if head is not None and emb is not None and not _equal(head, emb):
            raise ValueError(
                f"{loc.config_file} says tie_embeddings but output.weight differs from tok_embeddings.weight; "
                "set herd.tie_embeddings to false"
            )
        if emb is not None:
            sd["output.weight"] = emb  # one tensor, not two equal copies
    return args, sd


def _check_vocab(emb: torch.Tensor | None, args: ModelArgs, config_file: Path) -> None:
    if emb is not None and emb.shape[0] != args.vocab_size:
        raise ValueError(
            f"vocab mismatch: {config_file.name} says vocab_size={args.vocab_size} but the embedding has "
            f"{emb.shape[0]} rows; fix vocab_size in {config_file}"
        )


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
    """Load an HF (safetensors) or Meta (consolidated.NN.pth) checkpoint directory.

    dtype=None keeps the checkpoint's dtype (that of the embedding). max_seq_len overrides the
    length the RoPE table covers (131072 for 3.1/3.2, which costs ~64 MiB for head_dim 128).
    """
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


def _atomic_dir(dst: Path, write: Callable[[Path], None], *, overwrite: bool) -> None:
    """Run write(tmp) on a temp directory beside dst, then rename it into place.

    A reader never sees a half-written checkpoint under dst: either the old one, nothing (for
    the instant between two renames when overwriting), or the complete new one.
    """
    if dst.exists() and not overwrite:
        if not dst.is_dir() or any(dst.iterdir()):
            raise FileExistsError(f"{dst} already exists; pass overwrite=True or choose another path")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent))
    try:
        write(tmp)
        if dst.exists():
            old = dst.with_name(f".{dst.name}.old-{uuid.uuid4().hex[:8]}")
            os.rename(dst, old)
            os.rename(tmp, dst)
            if old.is_dir():
                shutil.rmtree(old)
            else:
                old.unlink()
        else:
            os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
    tmp: Path, args: ModelArgs, sd: dict[str, torch.Tensor], *, shard_size: int, token_ids: tuple[Any, Any] | None
) -> None:
    dtype = sd["tok_embeddings.weight"].dtype
    bos, eos = token_ids if token_ids is not None else (None, None)
    config = hf_config_from_args(args, dtype=dtype, bos_token_id=bos, eos_token_id=eos)
    _write_json(tmp / HF_CONFIG, config)
    generation = {"_from_model_config": True}
    generation.update({k: config[k] for k in ("bos_token_id", "eos_token_id") if config[k] is not None})
    _write_json(tmp / HF_GENERATION_CONFIG, generation)

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


def _split_meta(sd: dict[str, torch.Tensor], args: ModelArgs, num_shards: int) -> list[dict[str, torch.Tensor]]:
    if num_shards == 1:
        # Meta stores a tied 3.2 output as its own copy; torch.save would otherwise save one
        # storage under two names, which Meta's strict loader accepts but other tools may not.
        return [{k: v.clone() if k == "output.weight" and args.tie_embeddings else v for k, v in sd.items()}]
    for what, n in (("n_heads", args.n_heads), ("n_kv_heads", args.n_kv_heads), ("vocab_size", args.vocab_size),
                    ("FFN hidden size", args.ffn_hidden_dim)):
        if n % num_shards != 0:
            # Meta duplicates KV heads when MP > n_kv_heads (405B mp16); herd does not write that layout.
            raise ValueError(f"cannot split into {num_shards} model-parallel files: {what} ({n}) is not divisible")
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(num_shards)]
    for key, t in sd.items():
        split = _MP_SPLIT_DIM[_module_name(key)]
        # clone: a chunk is a view, and torch.save writes a view's whole underlying storage.
        pieces = [t] * num_shards if split is None else list(t.chunk(num_shards, dim=split))
        for shard, piece in zip(shards, pieces):
            shard[key] = piece.clone()
    return shards


def _write_meta(tmp: Path, args: ModelArgs, sd: dict[str, torch.Tensor], *, num_shards: int) -> None:
    _write_json(tmp / META_PARAMS, meta_params_from_args(args))
    for i, shard in enumerate(_split_meta(sd, args, num_shards)):
        torch.save(shard, tmp / f"consolidated.{i:02d}.pth")


def save_model(
    model: Transformer,
    path: str | os.PathLike,
    *,
    format: Format = "hf",
    shard_size: int = DEFAULT_SHARD_SIZE,
    num_shards: int = 1,
    overwrite: bool = False,
) -> Path:
    """Write `model` as an HF or Meta checkpoint directory at `path`, atomically.

    hf: config.json, generation_config.json and model.safetensors, or numbered shards plus
        model.safetensors.index.json when the weights exceed `shard_size` bytes.
    meta: params.json and consolidated.00.pth .. consolidated.{num_shards-1}.pth, split the way
        Meta's model-parallel files are.
    """
    return _save(model, Path(path), format=format, shard_size=shard_size, num_shards=num_shards,
                 overwrite=overwrite, token_ids=None, side_files=())


def _save(
    model: Transformer,
    dst: Path,
    *,
    format: Format,
    shard_size: int,
    num_shards: int,
    overwrite: bool,
    token_ids: tuple[Any, Any] | None,
    side_files: Iterable[Path],
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
            _write_hf(tmp, args, sd, shard_size=shard_size, token_ids=token_ids)
        else:
            _write_meta(tmp, args, sd, num_shards=num_shards)
        for f in side_files:
            shutil.copy2(f, tmp / f.name)

    _atomic_dir(dst, write, overwrite=overwrite)
    return dst


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    to: Format,
    shard_size: int = DEFAULT_SHARD_SIZE,
    num_shards: int = 1,
    overwrite: bool = False,
) -> Path:
    """Convert a checkpoint directory to `to` format (`herd convert SRC DST --to hf|meta`).

    Weights keep their dtype. Tokenizer files beside the weights are copied; for an HF source
    its token ids (and generation_config.json when writing HF) carry over, since ModelArgs
    does not hold them.
    """
    loc = _locate(src)
    model = load_model(loc.root)
    token_ids = None
    side = [loc.root / n for n in _SIDE_FILES if (loc.root / n).is_file()]
    if loc.format == "hf":
        config = _read_json(loc.config_file)
        token_ids = (config.get("bos_token_id"), config.get("eos_token_id"))
        if to == "hf" and (loc.root / HF_GENERATION_CONFIG).is_file():
            side.append(loc.root / HF_GENERATION_CONFIG)
    return _save(model, Path(dst), format=to, shard_size=shard_size, num_shards=num_shards,
                 overwrite=overwrite, token_ids=token_ids, side_files=side)


# ---- describe ------------------------------------------------------------------------------

_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "BF16": "bfloat16", "F16": "float16",
                       "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "I8": "int8", "U8": "uint8"}


@dataclass(frozen=True)
class CheckpointInfo:
    """What `herd info PATH` prints; read from headers and configs without loading the weights."""

    path: Path
    format: Format
    args: ModelArgs
    config: dict[str, Any]  # config.json or params.json as stored
    files: tuple[str, ...]  # weight files, relative to path
    dtype: str  # dtype of the token embedding, e.g. "bfloat16"
    num_params: int  # unique parameters (a tied output head counted once)
    bytes_on_disk: int  # weight files + config (+ index)


def describe(path: str | os.PathLike) -> CheckpointInfo:
    """Format, config, dtype and size of a checkpoint directory."""
    loc = _locate(path)
    config = _read_json(loc.config_file)
    if loc.format == "hf":
        try:
            args = args_from_hf_config(config)
        except ValueError as e:
            raise ValueError(f"{loc.config_file}: {e}") from e
        emb_key = hf_key("tok_embeddings.weight")
        dtype = None
        for f in loc.weight_files:
            try:
                with safe_open(str(f), framework="pt") as h:
                    if emb_key in h.keys():
                        raw = h.get_slice(emb_key).get_dtype()
                        dtype = _SAFETENSORS_DTYPES.get(raw, raw)
            except safetensors.SafetensorError as e:
                raise ValueError(f"{f} is not a readable safetensors file (truncated or corrupt?): {e}") from e
    else:
        shards = [_torch_load(p) for p in loc.weight_files]  # mmap: only the tie check touches data
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
    "args_from_hf_config",
    "args_from_meta_params",
    "convert",
    "describe",
    "from_hf_state_dict",
    "hf_config_from_args",
    "hf_key",
    "herd_key",
    "load_model",
    "meta_params_from_args",
    "permute_from_hf",
    "permute_to_hf",
    "save_model",
    "to_hf_state_dict",
]
