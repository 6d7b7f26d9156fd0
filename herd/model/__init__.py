"""The Llama 3 model family: hyperparameters, presets, the forward pass and checkpoint formats."""

from herd.model.args import PRESETS, ModelArgs, RopeScaling
from herd.model.formats import CheckpointInfo, convert, describe, load_model, save_model
from herd.model.llama import Transformer, build_model

__all__ = [
    "PRESETS",
    "CheckpointInfo",
    "ModelArgs",
    "RopeScaling",
    "Transformer",
    "build_model",
    "convert",
    "describe",
    "load_model",
    "save_model",
]
