"""Names and numbers shared by every checkpoint format: Meta <-> herd <-> HF.

herd's parameter names are Meta's, so a Meta checkpoint needs no renaming and the only HF
knowledge in the code base is here: one key table (`_KEY_MAP`), the q/k row permutation that
turns Meta's interleaved RoPE pairs into HF's rotate_half halves, and the translation of HF's
`config.json` and Meta's `params.json` into `ModelArgs`. No file I/O happens here: the
directory formats (`formats.py`) and GGUF (`gguf.py`) read files and call these functions on
what they read, so every format shares one set of names, one permutation and one set of checks.

Conventions where the formats disagree (see shared/research/llama3-reference.md §1, §3):
* params.json has no RoPE scaling factor, no context length and no head_dim. herd writes
  those under a `"herd"` key, which Meta's `ModelArgs` ignores (it skips unknown keys). A
  top-level `max_seq_len` would not be safe: Meta's `Llama3.build` passes `max_seq_len=`
  itself and `**params` would then raise a duplicate-keyword TypeError.
* config.json has no `multiple_of`/`ffn_dim_multiplier`, only the resulting
  `intermediate_size`; `_ffn_params_for` recovers a pair that reproduces it exactly.
* Llama 1/2 params.json says `vocab_size: -1` (the reader passes the embedding's rows) and has no
  `rope_theta` (10000 then, as their code hard-codes; never Llama 3's 500000).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any

import torch

from herd.model.args import PRESETS, ModelArgs, RopeScaling
from herd.model.checks import ConfigFields, check_context_length

HF_CONFIG = "config.json"
# The `rotary_emb.inv_freq` buffers of old HF converters hold no weights; they are recomputed.
_IGNORED_HF_SUFFIX = "rotary_emb.inv_freq"

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


HF_FIELDS = ConfigFields(
    file=HF_CONFIG, n_layers="num_hidden_layers", dim="hidden_size", n_heads="num_attention_heads",
    n_kv_heads="num_key_value_heads", ffn_hidden_dim="intermediate_size", vocab_size="vocab_size",
    max_seq_len="max_position_embeddings", tensor_name=hf_key,
)


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
    if config.get("model_type") == "mllama":
        raise ValueError("HF config is a Llama 3.2 Vision model (model_type 'mllama'), which the text-model loaders "
                         "cannot build; load it with herd.model.mllama_io.load_mllama(path)")
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
    check_context_length(max_pos, field="max_position_embeddings", file="HF config")
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
        # The 4.x form this dict follows. Without a version, transformers 5 takes any local
        # directory for one of Mistral's with a broken regex and warns on every tokenizer load.
        "transformers_version": "4.46.0",
    }


# ---- Meta params.json ----------------------------------------------------------------------

_META_KEYS = {
    "dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier", "norm_eps",
    "rope_theta", "use_scaled_rope", "max_batch_size", "max_seq_len",
    "vision_chunk_size", "vision_max_num_chunks", "vision_num_cross_attention_layers",
}
# n_kv_heads: the true count when herd wrote copies of each KV head (more files than KV heads).
_HERD_KEYS = {"rope_scaling", "max_seq_len", "tie_embeddings", "head_dim", "n_kv_heads"}
# Llama 1 and 2 params.json have no rope_theta; their code hard-codes 10000 (as HF's converter
# assumes). Llama 3 files always state 500000, so a missing key never means Llama 3.
_DEFAULT_META_THETA = 10000.0
_CODE_LLAMA_THETA = 1e6


def _is_llama32_small(dim: int, n_layers: int) -> bool:
    return (dim, n_layers) in ((2048, 16), (3072, 28))


def _quantized_params_error(params: Mapping[str, Any]) -> str:
    quant = params.get("quantization_args") or {}
    scheme = quant.get("scheme") if isinstance(quant, Mapping) else None
    if scheme is not None and "fp8" in str(scheme).lower():
        return ("params.json describes Meta's FP8 checkpoint (quantization_args scheme "
                f"{scheme!r}); herd does not read it. Download the bf16 release of the same model and run "
                "`herd quantize --scheme fp8` on it")
    what = f"scheme {scheme!r}" if scheme is not None else "quantization_args"
    lora = " with a QLoRA adaptor (lora_args)" if params.get("lora_args") else ""
    return (f"params.json describes one of Meta's quantized checkpoints ({what}{lora}: int4 weights with int8 "
            "activations, as in the Llama 3.2 QLoRA / SpinQuant releases); herd does not read that layout. "
            "Download the bf16 release of the same model and run `herd quantize --scheme int4` (or int8) on it")


def _default_meta_context(params: Mapping[str, Any], use_scaled: bool) -> int:
    """Published context length when params.json does not say (it never does in Meta's files)."""
    if use_scaled:
        return 131072  # Llama 3.1 / 3.2
    theta = params.get("rope_theta")
    if theta is None:
        # Llama 1 (norm_eps 1e-6) or Llama 2 (1e-5); llama.cpp's converter tells them apart the same way.
        return 2048 if float(params.get("norm_eps", 1e-5)) < 1e-5 else 4096
    if float(theta) == _CODE_LLAMA_THETA:
        return 16384  # Code Llama, as HF's converter and llama.cpp set it
    return 8192  # Llama 3


def args_from_meta_params(params: Mapping[str, Any], *, vocab_size: int | None = None) -> ModelArgs:
    """ModelArgs for a Meta params.json dict (optionally nested under "model").

    Values herd wrote under "herd" (exact rope scaling, context length, ties, head_dim, true KV
    head count) win; otherwise the scaling factor and context length follow the published models.
    Llama 1/2 files say `vocab_size: -1` (the tokenizer decides): then `vocab_size` is used,
    which the checkpoint reader takes from the embedding's rows.
    """
    params = params.get("model", params)
    herd = params.get("herd") or {}
    unknown = sorted(set(params) - _META_KEYS - {"herd"})
    if "quantization_args" in unknown or "lora_args" in unknown:
        raise ValueError(_quantized_params_error(params))
    if unknown:
        raise ValueError(
            f"params.json has keys herd does not know: {', '.join(unknown)}; remove them if they do not "
            "change the model"
        )
    if params.get("vision_chunk_size", -1) > 0 or params.get("vision_num_cross_attention_layers", -1) > 0:
        raise ValueError("params.json describes a Llama 3.2 Vision model (11B/90B), which the text-model loaders "
                         "cannot build; load it with herd.model.mllama_io.load_mllama(path)")
    unknown_herd = sorted(set(herd) - _HERD_KEYS)
    if unknown_herd:
        raise ValueError(f"params.json 'herd' section has unknown keys: {', '.join(unknown_herd)}")
    missing = [k for k in ("dim", "n_layers", "n_heads") if params.get(k) in (None, -1)]
    if missing:
        raise ValueError(f"params.json is missing {', '.join(missing)}")
    vocab = params.get("vocab_size")
    if vocab in (None, -1):
        if vocab_size is None:
            raise ValueError(
                "params.json has vocab_size -1 (Llama 1/2 leave it to the tokenizer); pass vocab_size, the "
                "number of rows of tok_embeddings.weight"
            )
        vocab = vocab_size

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
    for field, value in (("max_seq_len", params.get("max_seq_len")), ("herd.max_seq_len", herd.get("max_seq_len"))):
        if value is not None:
            check_context_length(int(value), field=field, file="params.json")
    default_len = params.get("max_seq_len") or _default_meta_context(params, use_scaled)
    n_heads = int(params["n_heads"])
    head_dim = herd.get("head_dim")
    return ModelArgs(
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=int(herd.get("n_kv_heads") or params.get("n_kv_heads") or n_heads),
        vocab_size=int(vocab),
        multiple_of=int(params.get("multiple_of", 256)),
        ffn_dim_multiplier=params.get("ffn_dim_multiplier"),
        norm_eps=float(params.get("norm_eps", 1e-5)),
        rope_theta=float(params.get("rope_theta", _DEFAULT_META_THETA)),
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


def _equal(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return a is not None and b is not None and a.shape == b.shape and torch.equal(a, b)


__all__ = [
    "args_from_hf_config",
    "args_from_meta_params",
    "from_hf_state_dict",
    "hf_config_from_args",
    "hf_key",
    "herd_key",
    "meta_params_from_args",
    "permute_from_hf",
    "permute_to_hf",
    "to_hf_state_dict",
]
