"""LoRA and QLoRA on herd's Transformer, and adapters in PEFT's file layout.

`apply_lora` swaps the targeted `nn.Linear`s (by Meta name: wq wk wv wo w1 w2 w3 output) for
`LoRALinear`, which keeps the frozen base weight under the same name (`...wq.weight`) and adds
`lora_a` (r, in) and `lora_b` (out, r); y = x W^T + (alpha / r) * (x A^T) B^T. B starts at
zero, so a fresh adapter leaves the model unchanged. With `quantize_base=True` the base weight
is stored as NF4 (`herd.posttrain.nf4`) instead: QLoRA.

Trade-off: adapters are module swaps applied from outside, not flags in the model code, so
`herd.model` stays pure math and the same swap works on any `Transformer`. The price is that
a model with adapters is no longer a plain `Transformer` state dict; `merge_lora` folds them
back in (dequantising an NF4 base) before `save_model`, and `save_adapter` writes the
adapters alone.

PEFT layout: `adapter_config.json` + `adapter_model.safetensors` with keys
`base_model.model.<HF module>.lora_A.weight` / `.lora_B.weight`, HF module names from the one
key map in `herd.model.formats`. HF stores wq/wk rows in rotate_half order, so lora_B of wq and
wk is row-permuted exactly like the base weight (lora_A acts on inputs and is unchanged).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from herd.model import Transformer
from herd.model.keymap import hf_key, herd_key, permute_from_hf, permute_to_hf
from herd.posttrain.io import atomic_dir, save_tensors
from herd.posttrain.nf4 import NF4Weight, nf4_linear

LORA_TARGETS: tuple[str, ...] = ("wq", "wk", "wv", "wo", "w1", "w2", "w3", "output")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."


class LoRALinear(nn.Module):
    """A frozen linear map (full precision or NF4) plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear, *, rank: int, alpha: float, dropout: float = 0.0,
                 quantize_base: bool = False) -> None:
        super().__init__()
        if rank < 0:
            raise ValueError(f"LoRA rank must be >= 0 (0 = no update), got {rank}")
        if base.bias is not None:
            raise ValueError("LoRALinear wraps bias-free linears only (Llama has no biases)")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.alpha = rank, alpha
        self.scale = alpha / rank if rank > 0 else 0.0
        dtype, device = base.weight.dtype, base.weight.device
        if quantize_base:
            self.weight_nf4 = NF4Weight(base.weight)
            self.weight = None
        else:
            self.weight_nf4 = None
            self.weight = base.weight
            self.weight.requires_grad_(False)
        self.lora_a = nn.Parameter(torch.empty(rank, self.in_features, dtype=dtype, device=device))
        self.lora_b = nn.Parameter(torch.zeros(self.out_features, rank, dtype=dtype, device=device))
        if rank > 0:
            # PEFT's (and torch.nn.Linear's) default for A; B = 0 makes the initial update exactly zero.
            nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.disabled = False  # True: behave as the base layer (the DPO reference without a second model)

    def base_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        if self.weight_nf4 is not None:
            return self.weight_nf4.dequantize(dtype)
        return self.weight if dtype is None else self.weight.to(dtype)

    def delta(self) -> torch.Tensor:
        """The update (out, in) that merging adds to the base weight."""
        return (self.lora_b @ self.lora_a) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = nf4_linear(x, self.weight_nf4) if self.weight_nf4 is not None else F.linear(x, self.weight)
        if self.rank == 0 or self.disabled:
            return out
        h = F.linear(self.dropout(x), self.lora_a)  # (..., r)
        # One fused addmm instead of matmul, scale and add: one (N, out) temporary fewer.
        flat = torch.addmm(out.reshape(-1, self.out_features), h.reshape(-1, self.rank), self.lora_b.t(),
                           alpha=self.scale)
        return flat.view(out.shape)

    def extra_repr(self) -> str:
        base = "nf4" if self.weight_nf4 is not None else "full"
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, alpha={self.alpha}, base={base}"


@dataclass
class LoRASpec:
    """What `apply_lora` did, as saved in adapter_config.json."""

    targets: tuple[str, ...]
    rank: int
    alpha: float
    dropout: float
    quantize_base: bool
    modules: tuple[str, ...]  # herd module names that carry adapters, e.g. "layers.0.attention.wq"


def _target_modules(model: Transformer, targets: Sequence[str]) -> list[tuple[str, nn.Module, str]]:
    unknown = sorted(set(targets) - set(LORA_TARGETS))
    if unknown or not targets:
        raise ValueError(f"unknown LoRA targets {unknown or list(targets)}; choose from {', '.join(LORA_TARGETS)}")
    if "output" in targets and model.args.tie_embeddings:
        raise ValueError(
            "this model ties output to tok_embeddings, so an adapter on output would untie them; "
            "leave 'output' out of the targets"
        )
    found = []
    for name, module in model.named_modules():
        parent_name, _, leaf = name.rpartition(".")
        if leaf in targets and isinstance(module, (nn.Linear, LoRALinear)):
            found.append((parent_name, model.get_submodule(parent_name) if parent_name else model, leaf))
    return found


def apply_lora(
    model: Transformer,
    targets: Sequence[str],
    rank: int,
    alpha: float,
    *,
    dropout: float = 0.0,
    quantize_base: bool = False,
) -> LoRASpec:
    """Freeze `model` and add adapters to every linear named in `targets`, in place.

    Only lora_a / lora_b stay trainable. `quantize_base` stores the targeted base weights in NF4
    (QLoRA); pick all seven block linears as targets to quantise the whole decoder.
    """
    if getattr(model, "lora_spec", None) is not None:
        raise ValueError("the model already has LoRA adapters; merge_lora(model) before applying new ones")
    found = _target_modules(model, targets)
    for p in model.parameters():
        p.requires_grad_(False)
    modules = []
    for parent_name, parent, leaf in found:
        lora = LoRALinear(getattr(parent, leaf), rank=rank, alpha=alpha, dropout=dropout,
                          quantize_base=quantize_base)
        setattr(parent, leaf, lora)
        modules.append(f"{parent_name}.{leaf}" if parent_name else leaf)
    spec = LoRASpec(tuple(targets), rank, alpha, dropout, quantize_base, tuple(modules))
    model.lora_spec = spec
    return spec


@contextlib.contextmanager
def lora_disabled(model: nn.Module) -> Iterator[None]:
    """Inside the block the model computes with its base weights only (adapters skipped)."""
    modules = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for m in modules:
        m.disabled = True
    try:
        yield
    finally:
        for m in modules:
            m.disabled = False


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for n, p in model.named_parameters() if n.endswith(("lora_a", "lora_b"))]


@torch.no_grad()
def merge_lora(model: Transformer) -> Transformer:
    """Fold every adapter into its base weight and restore plain `nn.Linear`s (full precision).

    An NF4 base is dequantised to its original dtype first, so a QLoRA model comes back as an
    ordinary checkpoint (the quantisation error of the base stays in it).
    """
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            dtype = module.weight_nf4.dtype if module.weight_nf4 is not None else module.weight.dtype
            merged = module.base_weight(torch.float32) + module.delta().float()
            linear = nn.Linear(module.in_features, module.out_features, bias=False, device=merged.device, dtype=dtype)
            linear.weight.copy_(merged)
            parent_name, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, leaf, linear)
    model.lora_spec = None
    for p in model.parameters():
        p.requires_grad_(True)
    return model


# ---- PEFT-compatible adapter files -------------------------------------------------------------


def _peft_module(module: str) -> str:
    """herd module name -> PEFT key stem ("layers.0.attention.wq" -> "base_model.model.model.layers.0.self_attn.q_proj")."""
    return _PEFT_PREFIX + hf_key(module + ".weight").removesuffix(".weight")


def adapter_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """The adapters under PEFT's key names, wq / wk lora_B rows in HF's rotate_half order."""
    args = model.args
    out = {}
    for name, module in model.named_modules():
        if not isinstance(module, LoRALinear):
            continue
        b = module.lora_b.detach()
        if name.endswith("attention.wq") and module.rank > 0:
            b = permute_to_hf(b, args.n_heads)
        elif name.endswith("attention.wk") and module.rank > 0:
            b = permute_to_hf(b, args.n_kv_heads)
        stem = _peft_module(name)
        out[f"{stem}.lora_A.weight"] = module.lora_a.detach()
        out[f"{stem}.lora_B.weight"] = b
    return out


def save_adapter(model: Transformer, path: str | os.PathLike, *, base_model: str | None = None) -> Path:
    """Write adapter_config.json + adapter_model.safetensors that `peft.PeftModel.from_pretrained` loads
    on the HF export of the base model (`herd convert ... --to hf`)."""
    spec: LoRASpec | None = getattr(model, "lora_spec", None)
    if spec is None:
        raise ValueError("the model has no LoRA adapters to save; call apply_lora first")
    hf_targets = sorted({hf_key(m + ".weight").removesuffix(".weight").rsplit(".", 1)[-1] for m in spec.modules})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "target_modules": hf_targets,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "modules_to_save": None,
    }
    tensors = adapter_state_dict(model)

    def write(tmp: Path) -> None:
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        # PEFT warns about unknown config keys, so herd's own note rides in the safetensors metadata.
        save_tensors(tmp / ADAPTER_WEIGHTS, tensors,
                     metadata={"format": "pt", "herd_quantize_base": str(spec.quantize_base).lower()})

    return atomic_dir(path, write)


def load_adapter(model: Transformer, path: str | os.PathLike, *, quantize_base: bool | None = None) -> LoRASpec:
    """Add the adapters saved at `path` (herd or PEFT-written, PEFT layout) to `model`, in place."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    cfg_file, weights = path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS
    for f in (cfg_file, weights):
        if not f.is_file():
            raise FileNotFoundError(f"{f} is missing; an adapter directory holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
    cfg = json.loads(cfg_file.read_text())
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{cfg_file}: peft_type is {cfg.get('peft_type')!r}; only LORA adapters load here")
    if cfg.get("use_rslora") or cfg.get("use_dora"):
        raise ValueError(f"{cfg_file}: rsLoRA / DoRA adapters are not supported")
    tensors = load_file(str(weights))
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        stem, _, kind = key.removesuffix(".weight").rpartition(".")
        name = herd_key(stem.removeprefix(_PEFT_PREFIX) + ".weight")
        if kind not in ("lora_A", "lora_B") or name is None:
            raise ValueError(f"{weights}: unexpected key {key!r} (expected ...<module>.lora_A.weight / lora_B.weight)")
        modules.setdefault(name.removesuffix(".weight"), {})[kind] = t
    targets = sorted({m.rsplit(".", 1)[-1] for m in modules}, key=LORA_TARGETS.index)
    with safe_open(str(weights), framework="pt") as f:
        saved_quant = (f.metadata() or {}).get("herd_quantize_base") == "true"
    quant = saved_quant if quantize_base is None else quantize_base
    spec = apply_lora(model, targets, int(cfg["r"]), float(cfg["lora_alpha"]),
                      dropout=float(cfg.get("lora_dropout", 0.0)), quantize_base=quant)
    missing = sorted(set(spec.modules) - set(modules))
    if missing:
        raise ValueError(f"{weights} has no adapters for {missing[:3]}; it was saved for other layers")
    args = model.args
    with torch.no_grad():
        for name, pair in modules.items():
            module = model.get_submodule(name)
            b = pair["lora_B"]
            if name.endswith("attention.wq") and module.rank > 0:
                b = permute_from_hf(b, args.n_heads)
            elif name.endswith("attention.wk") and module.rank > 0:
                b = permute_from_hf(b, args.n_kv_heads)
            if pair["lora_A"].shape != module.lora_a.shape or b.shape != module.lora_b.shape:
                raise ValueError(f"{weights}: adapter shapes for {name} do not match this model")
            module.lora_a.copy_(pair["lora_A"])
            module.lora_b.copy_(b)
    return spec


def model_bytes(model: nn.Module) -> int:
    """Bytes held by parameters and buffers (tied tensors counted once; the RoPE table excluded)."""
    seen, total = set(), 0
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if name.endswith("freqs_cis") or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total
