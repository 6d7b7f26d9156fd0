"""The one weighted-mean accumulator (pretraining's checkpoint average and post-training's soups)."""

import pytest
import torch

from herd.train.average import WeightedMean


def test_the_mean_is_accumulated_in_float64():
    # In fp32, 1e8 + 1 == 1e8: an fp32 running sum returns 0 here instead of 1/3.
    acc = WeightedMean()
    for v in (1e8, 1.0, -1e8):
        acc.add({"w": torch.tensor([v], dtype=torch.float32)})
    assert acc.mean()["w"].item() == pytest.approx(1 / 3, rel=1e-12)


def test_weights_are_normalised_by_their_sum():
    acc = WeightedMean()
    acc.add({"w": torch.tensor([2.0])}, 3.0)
    acc.add({"w": torch.tensor([6.0])}, 1.0)
    assert acc.mean()["w"].item() == pytest.approx((3 * 2 + 6) / 4)


def test_different_tensors_are_refused():
    acc = WeightedMean()
    acc.add({"a": torch.zeros(1)})
    with pytest.raises(ValueError, match="different tensors"):
        acc.add({"b": torch.zeros(1)})
