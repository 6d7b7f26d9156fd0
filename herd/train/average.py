"""Checkpoint averaging (Polyak averaging of the annealing phase, Llama 3 paper §3.4.3).

The average is a plain arithmetic mean of each weight over N training checkpoints, accumulated
in float64 so the result does not depend on the order of summation at fp32 precision, then
cast back to the model's dtype. Only the model tensors are read from each checkpoint (DCP
loads a subset of keys), so the optimizer state is never materialised.

`WeightedMean` is the one accumulator of the project: post-training's model soups
(`herd.posttrain.soup`) average model directories through it too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from herd.model import ModelArgs, Transformer, build_model
from herd.train.checkpoint import load_model_weights, verify


class WeightedMean:
    """sum_i w_i * state_i / sum_i w_i over state dicts added one at a time, in float64.

    Memory is one float64 copy of a model however many are averaged; the float64 sum makes the
    result independent of the order of the additions at the precision of the stored weights.
    """

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] | None = None
        self.total_weight = 0.0

    @torch.no_grad()
    def add(self, state: Mapping[str, torch.Tensor], weight: float = 1.0) -> None:
        if self.sums is None:
            self.sums = {k: v.double() * weight for k, v in state.items()}
        else:
            if set(state) != set(self.sums):
                raise ValueError("the checkpoints to average hold different tensors; only one architecture can be "
                                 "averaged")
            for k, v in state.items():
                self.sums[k] += v.double() * weight
        self.total_weight += weight

    def mean(self) -> dict[str, torch.Tensor]:
        """The float64 mean; cast it to the model's dtype when loading."""
        assert self.sums is not None and self.total_weight > 0, "nothing added"
        return {k: v / self.total_weight for k, v in self.sums.items()}


@torch.no_grad()
def average_checkpoints(paths: Sequence[str | Path], args: ModelArgs, *, device: str | torch.device = "cpu"
                        ) -> Transformer:
    """A model whose every parameter is the mean of that parameter over the checkpoints at `paths`."""
    if not paths:
        raise ValueError("average_checkpoints needs at least one checkpoint")
    model = build_model(args, device=device, init=False)
    acc = WeightedMean()
    for path in paths:
        _, problem = verify(Path(path))
        if problem:
            raise ValueError(f"cannot average checkpoint {path}: {problem}")
        load_model_weights(path, model)
        acc.add(model.state_dict())
    model.load_state_dict({k: v.to(model.tok_embeddings.weight.dtype) for k, v in acc.mean().items()})
    return model
