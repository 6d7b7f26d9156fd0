"""The Llama 3 model family: hyperparameters, presets, the forward pass and checkpoint formats."""

from herd.model.args import PRESETS, ModelArgs, RopeScaling
from herd.model.llama import Transformer, build_model

__all__ = ["PRESETS", "ModelArgs", "RopeScaling", "Transformer", "build_model"]
