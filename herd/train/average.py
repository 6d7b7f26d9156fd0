"""Checkpoint averaging (Polyak averaging of the annealing phase, Llama 3 paper §3.4.3).

The average is a plain arithmetic mean of each weight over N training checkpoints, accumulated
in float64 so the result does not depend on the order of summation at fp32 precision, then
cast back to the model's dtype. Only the model tensors are read from each checkpoint (DCP
loads a subset of keys), so the optimizer state is never materialised.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from herd.model import ModelArgs, Transformer, build_model
from herd.train.checkpoint import load_model_weights, verify


@torch.no_grad()
def average_checkpoints(paths: Sequence[str | Path], args: ModelArgs, *, device: str | torch.device = "cpu"
                        ) -> Transformer:
    """A model whose every parameter is the mean of that parameter over the checkpoints at `paths`."""
    if not paths:
        raise ValueError("average_checkpoints needs at least one checkpoint")
    model = build_model(args, device=device, init=False)
    sums: dict[str, torch.Tensor] | None = None
    for path in paths:
        _, problem = verify(Path(path))
        if problem:
            raise ValueError(f"cannot average checkpoint {path}: {problem}")
        load_model_weights(path, model)
        state = model.state_dict()
        if sums is None:
            sums = {k: v.double().clone() for k, v in state.items()}
        else:
            for k, v in state.items():
                sums[k] += v.double()
    assert sums is not None
    model.load_state_dict({k: (v / len(paths)).to(model.tok_embeddings.weight.dtype) for k, v in sums.items()})
    return model
