"""Checkpoint averaging ("model soup"): the weighted mean of models finetuned from one start.

The Llama 3 paper averages models from runs with different data or hyperparameters at each
post-training stage (§4.1.5, after Wortsman et al. 2022). Averaging only makes sense for
checkpoints that share an architecture and, in practice, a starting point; the shapes are
checked, the starting point cannot be and is the caller's responsibility.

Trade-off: checkpoints are loaded one at a time and accumulated into a float64 running sum
(`herd.train.average.WeightedMean`, the pretraining average's accumulator), so memory is one
float64 model plus the one being read, not N, at the cost of reading each file once in sequence.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from herd.model import Transformer, load_model
from herd.train.average import WeightedMean


@torch.no_grad()
def average_models(models: Sequence[Transformer], weights: Sequence[float] | None = None) -> Transformer:
    """A new model whose every parameter is sum_i w_i * models[i] (weights default to uniform, normalised)."""
    if not models:
        raise ValueError("nothing to average: pass at least one model")
    ws = _weights(len(models), weights)
    args = models[0].args
    for i, m in enumerate(models[1:], start=1):
        if m.args != args:
            raise ValueError(f"model {i} has a different shape ({m.args}) from model 0 ({args}); only models of one "
                             "architecture can be averaged")
    acc = WeightedMean()
    for w, m in zip(ws, models):
        acc.add(m.state_dict(), w)
    return _materialise(models[0], acc, in_place=False)


@torch.no_grad()
def average_model_dirs(paths: Sequence[str | os.PathLike], *, weights: Sequence[float] | None = None,
                       dtype: torch.dtype | None = None) -> Transformer:
    """Average model directories (HF or Meta; `herd.train.average_checkpoints` averages training checkpoints)."""
    if not paths:
        raise ValueError("nothing to average: pass at least one checkpoint directory")
    ws = _weights(len(paths), weights)
    first = load_model(paths[0], dtype=dtype)
    acc = WeightedMean()
    acc.add(first.state_dict(), ws[0])
    for w, path in zip(ws[1:], paths[1:]):
        m = load_model(path, dtype=dtype)
        if m.args != first.args:
            raise ValueError(f"{path} has a different shape from {paths[0]}; only one architecture can be averaged")
        acc.add(m.state_dict(), w)
        del m
    return _materialise(first, acc, in_place=True)  # `first` is ours: no third copy


def _weights(n: int, weights: Sequence[float] | None) -> list[float]:
    if weights is None:
        return [1.0 / n] * n
    if len(weights) != n or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weights must be {n} non-negative numbers with a positive sum, got {list(weights)}")
    total = float(sum(weights))
    return [w / total for w in weights]


def _materialise(template: Transformer, acc: WeightedMean, *, in_place: bool) -> Transformer:
    import copy

    out = template if in_place else copy.deepcopy(template)
    sd = out.state_dict()
    for k, v in acc.mean().items():
        sd[k].copy_(v.to(sd[k].dtype))
    out.tie_weights()
    return out
