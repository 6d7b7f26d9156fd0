"""Configs of the post-training commands: one small dataclass per concern, read from TOML.

`herd sft configs/sft_debug.toml --optim.lr 1e-4 --lora.rank 8` reads the file, then applies
`--section.key value` overrides, the same syntax as `herd train`. Unknown sections and keys are
errors that list the valid ones; values are parsed to the declared type of their field.

Trade-off: each command's config is its own dataclass tree (SFTConfig, DPOConfig, ...) that
reuses the shared sections (model, optim, lora, output) instead of one big job config with
every section optional. A file can then only contain what its command reads, and a typo in a
DPO config is caught even if the same key would be valid for distillation. Override parsing is
`herd.train.config`'s; the TOML -> dataclass coercion is repeated here (about 60 lines) because
the trainer's is private to its one Config tree.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from herd.train.config import OptimConfig, parse_overrides  # the same --section.key VALUE syntax as herd train

T = TypeVar("T")


# ---- shared sections ---------------------------------------------------------------------------


@dataclass
class StartModelConfig:
    """The checkpoint a post-training stage starts from (pretraining's `[model]` is a shape instead)."""

    path: str = ""  # checkpoint directory (HF or Meta), with tokenizer.model beside it
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"  # CPU: fp32 (bf16 matmuls are slow without AVX-512 BF16)
    device: str = "cpu"
    tokenizer: str = ""  # "" = tokenizer.model beside the weights


@dataclass
class FinetuneOptimConfig(OptimConfig):
    """Pretraining's AdamW settings plus what a post-training run keeps in the same section: its
    length, batch size and warmup-cosine schedule (pretraining has [schedule] and [[stages]])."""

    lr: float = 1e-5  # the paper's SFT and DPO learning rate (§4.1); LoRA runs want ~1e-4
    weight_decay: float = 0.0
    steps: int = 100
    batch_size: int = 8  # rows (SFT: packed rows; DPO/RM: pairs) per step
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1  # cosine floor as a fraction of lr
    seed: int = 0


@dataclass
class LoRAConfig:
    rank: int = 0  # 0 = full finetuning; > 0 = LoRA adapters of this rank
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["wq", "wk", "wv", "wo", "w1", "w2", "w3"])
    quantize_base: bool = False  # QLoRA: frozen base weights in NF4
    merge: bool = True  # save a merged full checkpoint as well as the adapters


@dataclass
class OutputConfig:
    dir: str = "runs/posttrain"
    format: Literal["hf", "meta"] = "hf"
    log_every: int = 10


# ---- per-command configs -------------------------------------------------------------------------


@dataclass
class ChatDataConfig:
    train: str = ""  # chat JSONL
    seq_len: int = 512  # packed row length; longer dialogs are cut
    val_fraction: float = 0.0  # dialogs held out for a validation loss


@dataclass
class SFTConfig:
    model: StartModelConfig = field(default_factory=StartModelConfig)
    data: ChatDataConfig = field(default_factory=ChatDataConfig)
    optim: FinetuneOptimConfig = field(default_factory=FinetuneOptimConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    output: OutputConfig = field(default_factory=OutputConfig)


@dataclass
class PreferenceDataConfig:
    train: str = ""  # preference JSONL
    max_len: int = 512  # prompt + response tokens; longer rows are cut from the end
    val_fraction: float = 0.1  # pairs held out for preference accuracy


@dataclass
class RewardConfig:
    model: StartModelConfig = field(default_factory=StartModelConfig)
    data: PreferenceDataConfig = field(default_factory=PreferenceDataConfig)
    optim: FinetuneOptimConfig = field(default_factory=FinetuneOptimConfig)
    output: OutputConfig = field(default_factory=OutputConfig)


@dataclass
class DPOSection:
    beta: float = 0.1  # paper §4.1.2
    nll_coef: float = 0.2  # NLL on the chosen response, paper §4.1.2
    mask_formatting: bool = True  # headers and eot/eom out of the log-probs (paper §4.1.2)
    precompute_reference: bool = False  # reference log-probs once up front; the reference is then freed
    reference: str = ""  # reference checkpoint; "" = the starting policy


@dataclass
class DPOConfig:
    model: StartModelConfig = field(default_factory=StartModelConfig)
    data: PreferenceDataConfig = field(default_factory=PreferenceDataConfig)
    dpo: DPOSection = field(default_factory=DPOSection)
    optim: FinetuneOptimConfig = field(default_factory=FinetuneOptimConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    output: OutputConfig = field(default_factory=OutputConfig)


@dataclass
class RejectionSection:
    prompts: str = ""  # chat JSONL; each dialog up to its last user turn is a prompt
    reward_model: str = ""  # directory written by `herd rm`
    k: int = 4  # samples per prompt
    max_new_tokens: int = 128
    temperature: float = 0.8
    top_p: float = 0.95
    batch_size: int = 8  # prompts per generation batch (each expanded to k rows)
    seed: int = 0


@dataclass
class RejectionConfig:
    model: StartModelConfig = field(default_factory=StartModelConfig)
    rs: RejectionSection = field(default_factory=RejectionSection)
    output: OutputConfig = field(default_factory=OutputConfig)


@dataclass
class DistillSection:
    teacher: str = ""  # teacher checkpoint (same tokenizer as the student)
    temperature: float = 2.0
    alpha: float = 0.5  # weight of the KL term; 1 - alpha on cross-entropy with the data
    top_k: int = 0  # > 0: keep only the teacher's top-k logits per position (cached to disk)
    cache_dir: str = ""  # directory for teacher_topk.safetensors; "" = output.dir


@dataclass
class DistillConfig:
    model: StartModelConfig = field(default_factory=StartModelConfig)  # the student
    data: ChatDataConfig = field(default_factory=ChatDataConfig)
    distill: DistillSection = field(default_factory=DistillSection)
    optim: FinetuneOptimConfig = field(default_factory=FinetuneOptimConfig)
    output: OutputConfig = field(default_factory=OutputConfig)


@dataclass
class PruneSection:
    n_layers: int = 0  # layers to keep (0 = all)
    n_heads: int = 0  # query heads to keep (0 = all; a multiple of n_kv_heads)
    ffn_hidden_dim: int = 0  # FFN channels to keep (0 = all)
    dim: int = 0  # embedding channels to keep (0 = all)
    calibration_batches: int = 8  # packed rows of calibration data scored for importance


@dataclass
class PruneConfig:
    model: StartModelConfig = field(default_factory=StartModelConfig)
    data: ChatDataConfig = field(default_factory=ChatDataConfig)  # calibration + distillation data
    prune: PruneSection = field(default_factory=PruneSection)
    distill: DistillSection = field(default_factory=DistillSection)  # teacher "" = the unpruned model
    optim: FinetuneOptimConfig = field(default_factory=FinetuneOptimConfig)  # steps 0 = prune only
    output: OutputConfig = field(default_factory=OutputConfig)


# ---- loading ----------------------------------------------------------------------------------------


def load_config(cls: type[T], path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> T:
    """Read TOML `path` into `cls` (None: defaults), then apply `--section.key value` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} not found (presets live in configs/*.toml)")
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path}: not valid TOML: {e}") from None
    cfg = build(cls, data)
    for key, text in parse_overrides(overrides):
        _apply_override(cfg, key, text)
    return cfg


def build(cls: type[T], data: Any, prefix: str = "") -> T:
    """A dataclass tree from a TOML-shaped dict; unknown keys and wrong types are ValueErrors."""
    if not isinstance(data, dict):
        raise ValueError(f"{prefix or 'config'}: expected a table, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(data) - set(hints))
    if unknown:
        where = f"[{prefix}]" if prefix else "the top level"
        raise ValueError(f"unknown key {prefix + '.' if prefix else ''}{unknown[0]} in {where}; valid keys: "
                         f"{', '.join(hints)}")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        kwargs[name] = build(tp, value, key) if dataclasses.is_dataclass(tp) else _coerce(value, tp, key)
    return cls(**kwargs)


def _apply_override(cfg: Any, key: str, text: str) -> None:
    parts = key.split(".")
    sections = {f.name for f in dataclasses.fields(cfg)}
    if len(parts) != 2 or parts[0] not in sections:
        raise ValueError(f"--{key}: unknown section {parts[0]!r}; valid sections: {', '.join(sorted(sections))}")
    target = getattr(cfg, parts[0])
    hints = typing.get_type_hints(type(target))
    if parts[1] not in hints:
        raise ValueError(f"--{key}: unknown key {parts[1]!r}; valid keys: {', '.join(hints)}")
    tp = hints[parts[1]]
    setattr(target, parts[1], _coerce(_parse_text(text, tp), tp, key))


def _strip_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _parse_text(text: str, tp: Any) -> Any:
    base = _strip_optional(tp)
    if base is str or typing.get_origin(base) is Literal:
        return text
    if typing.get_origin(base) is list and not text.lstrip().startswith("["):
        return [x.strip() for x in text.split(",") if x.strip()]  # --lora.targets wq,wv
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # reported by _coerce as the wrong type


def _coerce(value: Any, tp: Any, key: str) -> Any:
    base = _strip_optional(tp)
    if value is None and base is not tp:
        return None
    origin = typing.get_origin(base)
    if origin is Literal:
        choices = typing.get_args(base)
        if value not in choices:
            raise ValueError(f"{key}: {value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ValueError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(base)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if base is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{key}: expected true or false, got {value!r}")
        return value
    if base is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{key}: expected an integer, got {value!r}")
        return value
    if base is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if base is str:
        if not isinstance(value, str):
            raise ValueError(f"{key}: expected a string, got {value!r}")
        return value
    raise AssertionError(f"config field {key} has unsupported type {tp}")
