"""Pretraining: typed TOML configs, AdamW with warmup-cosine and batch ramps, stages (pretrain,
context extension, annealing with checkpoint averaging), DCP checkpoints that resume bit for bit."""

from herd.train.config import Config, load_config
from herd.train.export import export_checkpoint
from herd.train.trainer import StageResult, Trainer, TrainResult

__all__ = ["Config", "StageResult", "TrainResult", "Trainer", "export_checkpoint", "load_config"]
