"""Several LoRA adapters served on one base model, each row of a batch using its own (or none).

    adapters = load_adapters(model, {"support": "out/sft-lora", "sql": "hub/sql-lora"})
    adapters.select(["sql", None, "support"])   # before each forward: one name (or None) per row
    logits = decode_step(model, tokens, pos, cache)

Files: PEFT's layout, as `herd sft --lora.rank ...` and HF PEFT write it (adapter_config.json +
adapter_model.safetensors, keys `base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight`).
HF keeps wq/wk rows in rotate_half order, so lora_B of q_proj / k_proj is row-permuted into
herd's (Meta's) layout once at load, like the base weights; lora_A acts on inputs and is unchanged.
The base may be any checkpoint `herd.generate.loading` opens (HF, Meta, GGUF, herd quantize output):
an adapter is a pair of small matrices per module, whatever format the base weight is in.

Design trade-offs:
* The base weight is shared and untouched: each targeted linear becomes a `MultiLoRALinear` that
  calls the original module (nn.Linear, the CPU-kernel linear, int8 / int4 / fp8) and adds
  sum_j [row uses adapter j] * scale_j * (x A_j^T) B_j^T. Merging into the weights would be faster
  for one adapter but cannot give different rows different adapters, and would need a float
  copy of a quantized base.
* The per-row delta is computed for all adapters at once and masked: the A's of every adapter
  are stacked into one (N*R, in) matrix and the (scaled) B's into one (out, N*R), so a step is
  two small dense matmuls whatever the mix of adapters, with no gather of per-row weight copies
  and no Python loop over groups of rows. The cost grows with N*R (the total rank loaded), which
  is small for "a handful of adapters"; see benchmarks/multi_lora.py for the measurement against
  gathering A/B per row and grouping rows by adapter. Adapters of lower rank are zero-padded
  to the highest rank (exact: padded rows and columns contribute nothing).
* Which adapter each row uses is one shared `AdapterRows` object that every wrapped linear
  reads, set once per forward by the caller (the serving engine) rather than threaded through
  the model's forward: `herd.model` stays pure math.
* With no row on an adapter the wrapper costs one Python call and the fused CPU decode blocks
  (`herd.generate.fast_decode`) still run: their operands come from the wrapped base module and
  `AdapterRows.eager` sends a step to the eager block only while some row uses an adapter.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from herd.generate.fast_decode import kernel_weight
from herd.model.args import ModelArgs
from herd.model.keymap import permute_from_hf
from herd.model.llama import Transformer

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."
# PEFT target module name (HF's) -> herd's module name inside a block (or the head).
PEFT_TARGETS: dict[str, str] = {
    "q_proj": "attention.wq", "k_proj": "attention.wk", "v_proj": "attention.wv", "o_proj": "attention.wo",
    "gate_proj": "feed_forward.w1", "down_proj": "feed_forward.w2", "up_proj": "feed_forward.w3",
    "lm_head": "output",
}
# Config keys whose non-default value changes what the adapter computes in ways not implemented here.
_UNSUPPORTED = {
    "use_dora": (False, None), "fan_in_fan_out": (False, None), "modules_to_save": (None, []),
    "rank_pattern": ({}, None), "alpha_pattern": ({}, None), "bias": ("none", None),
    "megatron_config": (None,), "layer_replication": (None,),
}


@dataclass
class LoRAAdapter:
    """One adapter in herd's layout: module name -> (A (r, in), B (out, r)), B not yet scaled."""

    name: str
    path: Path
    rank: int
    alpha: float
    scale: float  # alpha / r, or alpha / sqrt(r) for rsLoRA
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]

    def delta(self, module: str) -> torch.Tensor:
        """The (out, in) update merging adds to `module`'s weight: scale * B @ A."""
        a, b = self.weights[module]
        return self.scale * (b.float() @ a.float())


def _peft_module(stem: str, where: Path) -> str:
    """'base_model.model.model.layers.3.self_attn.q_proj' -> 'layers.3.attention.wq'."""
    rest = stem.removeprefix(_PEFT_PREFIX)
    leaf = rest.rsplit(".", 1)[-1]
    if leaf not in PEFT_TARGETS:
        raise ValueError(f"{where}: adapter on {leaf!r} ({stem}); herd serves adapters on "
                         f"{', '.join(PEFT_TARGETS)} only (embeddings and norms are not supported)")
    if leaf == "lm_head":
        if rest != "lm_head":
            raise ValueError(f"{where}: unexpected key stem {stem!r}")
        return "output"
    parts = rest.split(".")
    if len(parts) != 5 or parts[:2] != ["model", "layers"] or not parts[2].isdigit():
        raise ValueError(f"{where}: unexpected key stem {stem!r} (expected "
                         f"{_PEFT_PREFIX}model.layers.N.self_attn.q_proj and the like)")
    return f"layers.{parts[2]}.{PEFT_TARGETS[leaf]}"


def read_adapter(path: str | os.PathLike[str], args: ModelArgs, *, name: str | None = None) -> LoRAAdapter:
    """Read a PEFT-layout LoRA adapter directory for a base model with `args`.

    Raises FileNotFoundError for a missing file and ValueError, naming the problem, for another PEFT
    method (DoRA, IA3, ...), options that change the math (fan_in_fan_out, modules_to_save, rank or
    alpha patterns, biases), unknown target modules and layers or shapes this base does not have.
    """
    from safetensors.torch import load_file

    path = Path(path).expanduser()
    if path.is_file() and path.name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        path = path.parent
    cfg_file, weights_file = path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS
    for f in (cfg_file, weights_file):
        if not f.is_file():
            raise FileNotFoundError(f"{f} does not exist; a LoRA adapter is a directory with {ADAPTER_CONFIG} and "
                                    f"{ADAPTER_WEIGHTS} (what `herd sft --lora.rank N` and PEFT's save_pretrained write)")
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_file} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{cfg_file} must hold a JSON object")
    kind = cfg.get("peft_type")
    if kind != "LORA":
        raise ValueError(f"{cfg_file}: peft_type is {kind!r}; only LoRA adapters (peft_type LORA) can be served")
    if cfg.get("use_dora"):
        raise ValueError(f"{cfg_file}: a DoRA adapter (use_dora: true); herd serves plain LoRA only "
                         "(merge it into the base with PEFT's merge_and_unload and serve the result)")
    for key, defaults in _UNSUPPORTED.items():
        if key in cfg and cfg[key] not in defaults:
            raise ValueError(f"{cfg_file}: {key} = {cfg[key]!r} is not supported (herd serves adapters with "
                             f"{key} = {defaults[0]!r}); merge this adapter into the base instead")
    try:
        rank, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{cfg_file} needs numeric 'r' and 'lora_alpha'") from None
    if rank < 1:
        raise ValueError(f"{cfg_file}: r must be >= 1, got {rank}")
    targets = cfg.get("target_modules")
    if isinstance(targets, list):
        unknown = sorted(set(targets) - set(PEFT_TARGETS))
        if unknown:
            raise ValueError(f"{cfg_file}: target_modules {unknown} are not supported; herd serves adapters on "
                             f"{', '.join(PEFT_TARGETS)}")
    scale = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank

    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in load_file(str(weights_file)).items():
        stem, _, kind_w = key.removesuffix(".weight").rpartition(".")
        if not key.endswith(".weight") or kind_w not in ("lora_A", "lora_B"):
            raise ValueError(f"{weights_file}: unexpected key {key!r} (a LoRA adapter holds only "
                             "<module>.lora_A.weight and <module>.lora_B.weight)")
        pairs.setdefault(_peft_module(stem, weights_file), {})[kind_w] = t
    if not pairs:
        raise ValueError(f"{weights_file} holds no adapter weights")

    expected = _module_shapes(args)
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for module, pair in sorted(pairs.items()):
        if set(pair) != {"lora_A", "lora_B"}:
            raise ValueError(f"{weights_file}: {module} has {sorted(pair)} but needs both lora_A and lora_B")
        if module not in expected:
            raise ValueError(f"{weights_file}: adapter for {module}, which this base model (n_layers "
                             f"{args.n_layers}) does not have; was it trained on another model?")
        a, b = pair["lora_A"], pair["lora_B"]
        n_out, n_in = expected[module]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(f"{weights_file}: {module} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; "
                             "expected (r, in) and (out, r)")
        if a.shape[1] != n_in or b.shape[0] != n_out:
            raise ValueError(f"{weights_file}: {module} maps {a.shape[1]} -> {b.shape[0]} features but this base "
                             f"model's maps {n_in} -> {n_out}; the adapter was trained on another base model")
        if module.endswith("attention.wq"):
            b = permute_from_hf(b, args.n_heads)
        elif module.endswith("attention.wk"):
            b = permute_from_hf(b, args.n_kv_heads)
        out[module] = (a, b)
    ranks = {a.shape[0] for a, _ in out.values()}
    if ranks != {rank}:
        raise ValueError(f"{weights_file}: lora_A ranks {sorted(ranks)} disagree with r = {rank} in {ADAPTER_CONFIG}")
    return LoRAAdapter(name or path.name, path, rank, alpha, scale, out)


def _module_shapes(args: ModelArgs) -> dict[str, tuple[int, int]]:
    """(out, in) of every linear an adapter may target."""
    hd = args.head_dim
    ffn = args.ffn_hidden_dim
    per_layer = {
        "attention.wq": (args.n_heads * hd, args.dim), "attention.wk": (args.n_kv_heads * hd, args.dim),
        "attention.wv": (args.n_kv_heads * hd, args.dim), "attention.wo": (args.dim, args.n_heads * hd),
        "feed_forward.w1": (ffn, args.dim), "feed_forward.w2": (args.dim, ffn), "feed_forward.w3": (ffn, args.dim),
    }
    shapes = {f"layers.{i}.{m}": s for i in range(args.n_layers) for m, s in per_layer.items()}
    shapes["output"] = (args.vocab_size, args.dim)
    return shapes


# ---- the batched multi-adapter linear --------------------------------------------------------------------


class AdapterRows:
    """Which adapter each row of the next forward uses; one object shared by every wrapped linear.

    `slots` is None when no row uses an adapter (the base path), else a (B, N) mask, or, when every
    row uses the same adapter, that adapter's index in `uniform` (no mask needed, any batch shape).
    """

    def __init__(self, names: Sequence[str]):
        self.names = tuple(names)
        self.index = {n: i for i, n in enumerate(self.names)}
        self.mask: torch.Tensor | None = None  # (B, N) float, 1 where row b uses adapter j
        self.uniform: int | None = None
        self.eager = False  # read by FusedDecodeBlock: True while some row needs the adapters' math

    def clear(self) -> None:
        self.mask, self.uniform, self.eager = None, None, False


@dataclass
class _Stack:
    """One linear's adapters, stacked: A (N*R, in) and scaled B (out, N*R); zeros where absent."""

    a: torch.Tensor
    b: torch.Tensor
    rank: int  # R, the padded rank


class MultiLoRALinear(nn.Module):
    """A base linear (any module mapping in_features -> out_features) plus N LoRA adapters, each
    row of the input picking one of them (or none) through the shared `AdapterRows`."""

    def __init__(self, base: nn.Module, rows: AdapterRows, a: torch.Tensor, b: torch.Tensor, rank: int):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.adapter_rows = rows
        self.register_buffer("lora_a", a, persistent=False)  # (N*R, in)
        self.register_buffer("lora_b", b, persistent=False)  # (out, N*R), scale folded in
        self.rank = rank

    def kernel_weight(self):
        """The base's kernel operands: the fused decode block runs the base math when no row uses an
        adapter (`AdapterRows.eager` sends it to the eager block otherwise)."""
        return kernel_weight(self.base)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        rows = self.adapter_rows
        if rows.uniform is not None:
            R, j = self.rank, rows.uniform
            h = torch.nn.functional.linear(x.to(self.lora_a.dtype), self.lora_a[j * R : (j + 1) * R])  # (..., R)
            return out + torch.nn.functional.linear(h, self.lora_b[:, j * R : (j + 1) * R]).to(out.dtype)
        if rows.mask is None:
            return out
        B, N = rows.mask.shape
        x3 = x.reshape(B, -1, self.in_features).to(self.lora_a.dtype)  # (B, S, in)
        h = torch.nn.functional.linear(x3, self.lora_a)  # (B, S, N*R): every adapter's projection
        h = (h.view(B, -1, N, self.rank) * rows.mask.view(B, 1, N, 1)).view(B, -1, N * self.rank)
        delta = torch.nn.functional.linear(h, self.lora_b)  # (B, S, out): only each row's own adapter
        return out + delta.view(out.shape).to(out.dtype)

    def extra_repr(self) -> str:
        n = self.lora_a.shape[0] // self.rank
        return f"in={self.in_features}, out={self.out_features}, adapters={n}, rank={self.rank}"


class AdapterSet:
    """The adapters attached to one model: `select` sets each row's adapter before a forward."""

    def __init__(self, model: Transformer, adapters: Sequence[LoRAAdapter], rows: AdapterRows):
        self.model, self.adapters, self.rows = model, tuple(adapters), rows

    @property
    def names(self) -> tuple[str, ...]:
        return self.rows.names

    def __contains__(self, name: object) -> bool:
        return name in self.rows.index

    def select(self, names: Sequence[str | None]) -> None:
        """One adapter name (or None: the base model) per row of the next forward."""
        rows = self.rows
        if all(n is None for n in names):
            rows.clear()
            return
        unknown = sorted({n for n in names if n is not None and n not in rows.index})
        if unknown:
            raise ValueError(f"unknown LoRA adapters {unknown}; attached: {', '.join(rows.names)}")
        first = names[0]
        if all(n == first for n in names):
            rows.mask, rows.uniform, rows.eager = None, rows.index[first], True
            return
        mask = torch.zeros(len(names), len(rows.names), device=self.device, dtype=self.dtype)
        for i, n in enumerate(names):
            if n is not None:
                mask[i, rows.index[n]] = 1.0
        rows.mask, rows.uniform, rows.eager = mask, None, True

    def select_all(self, name: str | None) -> None:
        """Every row (whatever the batch) uses `name` (None: the base model)."""
        self.select([name])

    def clear(self) -> None:
        self.rows.clear()

    @property
    def device(self) -> torch.device:
        return self.model.tok_embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.tok_embeddings.weight.dtype


def attach_adapters(model: Transformer, adapters: Sequence[LoRAAdapter]) -> AdapterSet:
    """Wrap every linear some adapter targets in a `MultiLoRALinear`, in place; returns the set.

    Apply after quantization / `apply_cpu_kernels` / `apply_fast_decode` (the wrapper calls whatever
    module it finds). Adapters of a model are attached once, all together.
    """
    if not adapters:
        raise ValueError("attach_adapters needs at least one adapter")
    names = [a.name for a in adapters]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"adapter names must be unique; {dupes} appear more than once")
    if any(isinstance(m, MultiLoRALinear) for m in model.modules()):
        raise ValueError("the model has adapters attached already; attach all adapters in one call")
    shapes = _module_shapes(model.args)
    rows = AdapterRows(names)
    R = max(a.rank for a in adapters)
    N = len(adapters)
    weight = model.tok_embeddings.weight
    dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
    targeted = sorted({m for a in adapters for m in a.weights})
    for module_name in targeted:
        base = model.get_submodule(module_name)
        n_out, n_in = shapes[module_name]
        if getattr(base, "in_features", None) != n_in or getattr(base, "out_features", None) != n_out:
            raise ValueError(f"{module_name} of this model is {type(base).__name__} without in/out features "
                             f"{n_in} -> {n_out}; adapters cannot be attached to it")
        a_all = torch.zeros(N * R, n_in, dtype=dtype, device=weight.device)
        b_all = torch.zeros(n_out, N * R, dtype=dtype, device=weight.device)
        for j, adapter in enumerate(adapters):
            if module_name in adapter.weights:
                a, b = adapter.weights[module_name]
                r = a.shape[0]
                a_all[j * R : j * R + r] = a.to(dtype)
                b_all[:, j * R : j * R + r] = (b.float() * adapter.scale).to(dtype)
        parent_name, _, leaf = module_name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, leaf, MultiLoRALinear(base, rows, a_all, b_all, R))
    return AdapterSet(model, adapters, rows)


def load_adapters(model: Transformer, paths: Mapping[str, str | os.PathLike[str]]) -> AdapterSet:
    """Read each named adapter directory for `model` and attach them all."""
    return attach_adapters(model, [read_adapter(p, model.args, name=n) for n, p in paths.items()])
