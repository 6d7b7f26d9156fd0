"""Checkpoint configs checked against the weights' headers before any model is built.

A config file (config.json, params.json, GGUF metadata) is a handful of numbers that a corrupt
download or a hostile file can set to anything, while the tensor shapes listed in a safetensors,
.pth or GGUF header are what the weights really are. Building the model first and comparing its
state dict afterwards let `num_hidden_layers = 10**9` build a billion meta-device blocks (a hang)
before any check ran. So each reader lists the shapes from the headers (no tensor data is read),
and `check_against_weights` compares the fields that set shapes (layer count, width, heads, KV
heads, FFN width, vocabulary) with them first, naming the field in the format's own spelling.
The per-tensor comparison against a meta-device model follows in the readers, cheap by then.

The context length sets no weight shape, only the RoPE table, so it gets a bound instead
(`check_context_length`, `args.MAX_SEQ_LEN`). Why a bound rather than a table grown lazily to
the positions used: the table is a buffer indexed by position inside the forward pass, and
growing it there would put data-dependent allocation into model math (and break torch.compile
and CUDA graphs), while max_seq_len also sizes KV caches and generation limits elsewhere; a
value no real model has is better refused where it is read, with the field named.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from herd.model.args import MAX_SEQ_LEN, ModelArgs

_LAYER = re.compile(r"^layers\.(\d+)\.")


@dataclass(frozen=True)
class ConfigFields:
    """How one checkpoint format spells the config values that set shapes, for error messages.

    tensor_name turns a herd parameter name into the format's own (what its header lists).
    """

    file: str
    n_layers: str
    dim: str
    n_heads: str
    n_kv_heads: str
    ffn_hidden_dim: str
    vocab_size: str
    max_seq_len: str
    tensor_name: Callable[[str], str] = lambda key: key


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def check_context_length(value: int, *, field: str, file: str) -> None:
    """Refuse a context length beyond MAX_SEQ_LEN, naming the config field."""
    if value > MAX_SEQ_LEN:
        table = value * 64 * 8  # head_dim 128: 64 complex64 rotations per position
        raise ValueError(
            f"{file} says {field} = {value}, more positions than any real model has (herd's limit is 2**24 = "
            f"{MAX_SEQ_LEN}; at head_dim 128 the RoPE table alone would need {_bytes(table)}); set {field} to "
            "the model's real context length"
        )


def check_against_weights(
    args: ModelArgs, shapes: Mapping[str, tuple[int, ...]], fields: ConfigFields, *, source: object
) -> None:
    """ValueError naming the config field where `args` disagrees with the weights' shapes.

    shapes: herd parameter name -> shape, as the headers list them (a tied head may be absent).
    Only the shape-setting fields are compared here; which tensors exist and every tensor's full
    shape are the readers' later checks, which are only safe once the layer count is known to be
    the weights' own.
    """

    def refuse(field: str, value: int, weights: str) -> None:
        raise ValueError(
            f"{source}: {fields.file} says {field} = {value} but {weights}; the config does not describe these "
            f"weights (fix {field})"
        )

    layers = {int(m.group(1)) for key in shapes if (m := _LAYER.match(key))}
    n_layers = max(layers) + 1 if layers else 0
    if len(layers) != n_layers:
        # Else one stray `layers.999999999.*` tensor would make 10**9 layers look like the weights'.
        gap = next(i for i, layer in enumerate(sorted(layers)) if i != layer)
        raise ValueError(
            f"{source}: the weights' layers are not numbered 0 .. {n_layers - 1} without gaps (no tensor of layer "
            f"{gap}); the checkpoint is incomplete or corrupt"
        )
    if args.n_layers != n_layers:
        refuse(fields.n_layers, args.n_layers,
               f"the weights hold {n_layers} layers (numbered 0 .. {n_layers - 1})" if n_layers
               else "the weights hold no layers")

    def size(key: str, axis: int) -> tuple[str, int] | None:
        shape = shapes.get(key)
        return (fields.tensor_name(key), shape[axis]) if shape is not None and len(shape) > axis else None

    # The width from the final norm first: it is never split across Meta's model-parallel files,
    # while how the embedding was split is itself inferred from dim.
    emb = "tok_embeddings.weight"
    if (got := size("norm.weight", 0) or size(emb, 1)) and got[1] != args.dim:
        refuse(fields.dim, args.dim, f"{got[0]} is {got[1]} wide")
    if (got := size(emb, 0)) and got[1] != args.vocab_size:
        refuse(fields.vocab_size, args.vocab_size, f"{got[0]} has {got[1]} rows")
    hd = args.head_dim
    if (got := size("layers.0.attention.wq.weight", 0)) and got[1] != args.n_heads * hd:
        refuse(fields.n_heads, args.n_heads,
               f"{got[0]} has {got[1]} rows, not {args.n_heads} heads x head_dim {hd}")
    if (got := size("layers.0.attention.wk.weight", 0)) and got[1] != args.n_kv_heads * hd:
        # head_dim usually follows from dim / n_heads, so a wrong n_heads shows up here: name both.
        derived = "" if args.head_dim_override else f" = {fields.dim} / {fields.n_heads}; check {fields.n_heads} too"
        refuse(fields.n_kv_heads, args.n_kv_heads,
               f"{got[0]} has {got[1]} rows, {got[1] / hd:g} heads of head_dim {hd}{derived}")
    if (got := size("layers.0.feed_forward.w1.weight", 0)) and got[1] != args.ffn_hidden_dim:
        refuse(fields.ffn_hidden_dim, args.ffn_hidden_dim, f"{got[0]} has {got[1]} rows")


__all__ = ["ConfigFields", "check_against_weights", "check_context_length"]
