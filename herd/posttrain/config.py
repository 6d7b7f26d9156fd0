"""Configs of the post-training commands: one small dataclass per concern, read from TOML.

`herd sft configs/sft_debug.toml --optim.lr 1e-4 --lora.rank 8` reads the file, then applies
`--section.key value` overrides, the same syntax as `herd train`. Unknown sections and keys are
errors that list the valid ones; values are parsed to the declared type of their field.

Trade-off: each command's config is its own dataclass tree (SFTConfig, DPOConfig, ...) that
reuses the shared sections (model, optim, lora, output) instead of one big job config with
every section optional. A file can then only contain what its command reads, and a typo in a
DPO config is caught even if the same key would be valid for distillation. Override parsing
and the TOML -> dataclass coercion are `herd.config`'s: one loader, so every command
reports unknown keys and wrong types with the same messages.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeVar

from herd.config import build, parse_overrides, read_toml, set_field
from herd.train.config import OptimConfig

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

    def validate(self) -> None:
        if self.lr <= 0 or self.steps < 0 or self.batch_size < 1 or self.warmup_steps < 0:
            raise ValueError(f"optim needs lr > 0, steps >= 0, batch_size >= 1, warmup_steps >= 0; got {self}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas must be two numbers in [0, 1), got {self.betas}")
        if self.grad_clip < 0:
            raise ValueError(f"optim.grad_clip must be >= 0 (0 disables clipping), got {self.grad_clip}")


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
    batch_size: int = 8  # prompts decoded together by the engine (batch_size * k slots); also the scoring batch
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
    cfg = build(cls, read_toml(path))
    for key, text in parse_overrides(overrides):
        parts = key.split(".")
        sections = {f.name for f in dataclasses.fields(cfg)}
        if len(parts) != 2 or parts[0] not in sections:
            raise ValueError(f"--{key}: unknown section {parts[0]!r}; valid sections: {', '.join(sorted(sections))}")
        set_field(getattr(cfg, parts[0]), parts[1], text, key)
    validate(cfg)
    return cfg


# Sizes that only make sense above zero, in whichever section they appear.
_POSITIVE = ("seq_len", "max_len", "k", "max_new_tokens", "batch_size", "log_every", "calibration_batches")


def validate(cfg: object) -> None:
    """Range checks of a loaded config; raises ValueError naming the key."""
    for section in dataclasses.fields(cfg):
        value = getattr(cfg, section.name)
        for name in _POSITIVE:
            if hasattr(value, name) and getattr(value, name) <= 0:
                raise ValueError(f"{section.name}.{name} must be a positive integer, got {getattr(value, name)}")
        if isinstance(value, FinetuneOptimConfig):
            value.validate()
