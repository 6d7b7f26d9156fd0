import pytest
import torch

from herd.posttrain.nf4 import MAX_HALF_GAP, NF4_LEVELS, NF4Weight, nf4_linear

# The NF4 code book as published with QLoRA (bitsandbytes), to 7 digits.
PUBLISHED = [-1.0, -0.6961928, -0.5250731, -0.3949175, -0.2844414, -0.1847734, -0.0910500, 0.0,
             0.0795803, 0.1609302, 0.2461123, 0.3379152, 0.4407098, 0.5626170, 0.7229568, 1.0]


def test_levels_are_the_published_code_book():
    assert NF4_LEVELS.tolist() == pytest.approx(PUBLISHED, abs=1e-6)
    assert MAX_HALF_GAP == pytest.approx((1 - 0.6961928) / 2, abs=1e-6)


@pytest.mark.parametrize("shape", [(64, 64), (96, 200), (1, 64 * 300)])
def test_round_trip_error_is_within_the_documented_bound(shape):
    w = torch.randn(shape) * 0.02
    w[0, :5] = torch.tensor([0.3, -0.3, 0.0, 1e-9, -1e-9])  # outliers and near-zeros in one block
    q = NF4Weight(w)
    err = (w - q.dequantize()).abs().reshape(-1, 64)
    s = w.reshape(-1, 64).abs().amax(1)
    groups = (s - s.mean()).abs()
    group_absmax = torch.nn.functional.pad(groups, (0, (-len(s)) % 256)).reshape(-1, 256).amax(1)
    bound = MAX_HALF_GAP * s + group_absmax.repeat_interleave(256)[: len(s)] / 254
    assert (err <= bound.unsqueeze(1) * (1 + 1e-5) + 1e-9).all()
    assert q.dequantize().shape == w.shape
    # Storage: 4 bits per weight + 1 byte per block of 64 + 4 bytes per 256 blocks + the mean.
    n = w.numel()
    assert q.nbytes() == n // 2 + n // 64 + 4 * -(-(n // 64) // 256) + 4


def test_zero_block_and_dtype():
    w = torch.zeros(4, 64, dtype=torch.bfloat16)
    q = NF4Weight(w)
    assert q.dequantize().dtype == torch.bfloat16 and torch.equal(q.dequantize(), w)
    with pytest.raises(ValueError, match="multiple of the block size"):
        NF4Weight(torch.zeros(3, 5))


def test_nf4_linear_gradients_match_the_dequantised_weight():
    w = torch.randn(48, 64)
    q = NF4Weight(w)
    x = torch.randn(3, 5, 64, requires_grad=True)
    y = nf4_linear(x, q)
    (y**2).sum().backward()
    gx = x.grad.clone()
    x.grad = None
    dense = q.dequantize()
    y2 = x @ dense.T
    (y2**2).sum().backward()
    torch.testing.assert_close(y, y2)
    torch.testing.assert_close(gx, x.grad)
