"""Post-training: SFT, reward models, rejection sampling, DPO, LoRA/QLoRA, distillation, pruning, soups.

Every stage works on an ordinary `herd.model.Transformer` and writes ordinary checkpoints (plus
PEFT-layout adapters for LoRA); `herd sft|rm|rs|dpo|distill|prune` run them from TOML configs.
"""

from herd.posttrain.data import (
    PreferencePair,
    read_chat_jsonl,
    read_preference_jsonl,
    write_chat_jsonl,
    write_preference_jsonl,
)
from herd.posttrain.distill import kd_loss, kd_loss_topk, train_distill
from herd.posttrain.dpo import dpo_loss, encode_pairs, preference_accuracy, train_dpo
from herd.posttrain.lora import apply_lora, load_adapter, merge_lora, save_adapter
from herd.posttrain.nf4 import NF4Weight
from herd.posttrain.prune import activation_importance, prune_model
from herd.posttrain.rejection import rejection_sample
from herd.posttrain.reward import RewardModel, bradley_terry_loss, ranking_loss, train_reward_model
from herd.posttrain.sft import linear_cross_entropy, train_sft
from herd.posttrain.soup import average_model_dirs, average_models

__all__ = [
    "NF4Weight",
    "PreferencePair",
    "RewardModel",
    "activation_importance",
    "apply_lora",
    "average_model_dirs",
    "average_models",
    "bradley_terry_loss",
    "dpo_loss",
    "encode_pairs",
    "kd_loss",
    "kd_loss_topk",
    "linear_cross_entropy",
    "load_adapter",
    "merge_lora",
    "preference_accuracy",
    "prune_model",
    "ranking_loss",
    "read_chat_jsonl",
    "read_preference_jsonl",
    "rejection_sample",
    "save_adapter",
    "train_distill",
    "train_dpo",
    "train_reward_model",
    "train_sft",
    "write_chat_jsonl",
    "write_preference_jsonl",
]
