"""Sampling against hand-computed distributions and a plain loop statement of Meta's top-p rule."""

import math

import pytest
import torch

from herd.generate import GREEDY, SamplingParams, sample, truncated_probs


def _meta_top_p_keep(probs: list[float], p: float) -> set[int]:
    """Meta's rule written out: walk tokens by descending probability, keep a token while the
    mass strictly before it is <= p."""
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    keep, before = set(), 0.0
    for i in order:
        if before > p:
            break
        keep.add(i)
        before += probs[i]
    return keep


def _logits_of(probs: list[float]) -> torch.Tensor:
    return torch.tensor(probs, dtype=torch.float64).log().float().unsqueeze(0)  # (1, V)


def test_temperature_zero_is_argmax():
    logits = torch.randn(6, 1000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample(logits, GREEDY), logits.argmax(-1))
    # top_p / top_k / seed are irrelevant when greedy
    assert torch.equal(sample(logits, SamplingParams(temperature=0, top_p=0.1, top_k=5, seed=3)), logits.argmax(-1))


# Dyadic probabilities are exact in fp32, so the boundary cases (before-mass == p) are exact too.
# Sorted: 1/2 (id 1), 1/4 (id 4), 1/8 (id 3), 3/32 (id 2), 1/32 (id 0); before-masses 0, .5, .75, .875, .96875.
_DYADIC = [0.03125, 0.5, 0.09375, 0.125, 0.25]


@pytest.mark.parametrize(
    "top_p, kept",
    [(0.4, {1}), (0.5, {1, 4}), (0.7, {1, 4}), (0.75, {1, 4, 3}), (0.875, {1, 4, 3, 2}), (0.97, {0, 1, 2, 3, 4})],
)
def test_top_p_keeps_exactly_metas_set(top_p, kept):
    assert _meta_top_p_keep(_DYADIC, top_p) == kept  # the table above agrees with the rule
    params = SamplingParams(temperature=1.0, top_p=top_p)
    probs = truncated_probs(_logits_of(_DYADIC), params)[0]
    assert set(torch.nonzero(probs).flatten().tolist()) == kept
    expected = torch.tensor([_DYADIC[i] if i in kept else 0.0 for i in range(5)])
    torch.testing.assert_close(probs, expected / expected.sum(), rtol=0, atol=1e-6)
    # the draws never leave the kept set, and reach all of it
    draws = sample(_logits_of(_DYADIC).expand(4000, -1), params, torch.Generator().manual_seed(0))
    assert set(draws.tolist()) == kept


def test_top_p_matches_loop_rule_on_random_distributions():
    gen = torch.Generator().manual_seed(1)
    for trial in range(20):
        logits = torch.randn(1, 50, generator=gen) * 2
        p = float(torch.rand(1, generator=gen)) * 0.98 + 0.01
        probs = torch.softmax(logits, -1)[0].tolist()
        got = set(torch.nonzero(truncated_probs(logits, SamplingParams(temperature=1.0, top_p=p))[0]).flatten().tolist())
        assert got == _meta_top_p_keep(probs, p), f"trial {trial}, top_p {p}"


def test_top_k_one_equals_greedy():
    logits = torch.randn(16, 300, generator=torch.Generator().manual_seed(2))
    for seed in range(3):
        params = SamplingParams(temperature=1.5, top_p=1.0, top_k=1, seed=seed)
        assert torch.equal(sample(logits, params, params.make_generator("cpu")), logits.argmax(-1))


def test_top_k_then_top_p_on_renormalised_top_k():
    probs = [0.4, 0.3, 0.2, 0.1]
    # top_k=2 leaves (4/7, 3/7); top_p=0.5 then keeps only the first (before-mass of the second is 4/7 > 0.5)
    got = truncated_probs(_logits_of(probs), SamplingParams(temperature=1.0, top_k=2, top_p=0.5))[0]
    torch.testing.assert_close(got, torch.tensor([1.0, 0.0, 0.0, 0.0]))
    got = truncated_probs(_logits_of(probs), SamplingParams(temperature=1.0, top_k=3, top_p=1.0))[0]
    torch.testing.assert_close(got, torch.tensor([4 / 9, 3 / 9, 2 / 9, 0.0]))


def test_same_seed_same_tokens_different_seed_differs():
    logits = torch.randn(64, 100, generator=torch.Generator().manual_seed(3))
    params = [SamplingParams(temperature=1.0, top_p=0.95, seed=s) for s in (7, 7, 8)]
    a, b, c = (sample(logits, p, p.make_generator("cpu")) for p in params)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_unseeded_generators_differ():
    p = SamplingParams(temperature=1.0, top_p=1.0)
    logits = torch.zeros(64, 100)
    assert not torch.equal(sample(logits, p, p.make_generator("cpu")), sample(logits, p, p.make_generator("cpu")))


@pytest.mark.parametrize(
    "temperature, top_p, expected",
    [
        # before-masses 0, .4, .7, .9: top_p .75 keeps three tokens
        (1.0, 0.75, [4 / 9, 3 / 9, 2 / 9, 0.0]),
        # T = 0.5 squares and renormalises first: (.16, .09, .04, .01)/.3; before-masses 0, .533, .833
        (0.5, 0.75, [16 / 25, 9 / 25, 0.0, 0.0]),
        (2.0, 1.0, [math.sqrt(x) / sum(math.sqrt(y) for y in (0.4, 0.3, 0.2, 0.1)) for x in (0.4, 0.3, 0.2, 0.1)]),
    ],
)
def test_empirical_frequencies_match_truncated_distribution(temperature, top_p, expected):
    n = 40000
    params = SamplingParams(temperature=temperature, top_p=top_p, seed=0)
    logits = _logits_of([0.4, 0.3, 0.2, 0.1]).expand(n, -1)  # (n, 4): n independent draws in one call
    counts = torch.bincount(sample(logits, params, params.make_generator("cpu")), minlength=4).double()
    exp = torch.tensor(expected, dtype=torch.float64) * n
    assert torch.all(counts[exp == 0] == 0)
    nz = exp > 0
    chi2 = float(((counts[nz] - exp[nz]) ** 2 / exp[nz]).sum())
    # 99.9th percentile of chi-square with <= 3 degrees of freedom is 16.3
    assert chi2 < 16.3, (counts.tolist(), exp.tolist())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=0), "top_k"),
    ],
)
def test_invalid_params_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_sample_rejects_wrong_rank():
    with pytest.raises(ValueError, match="batch, vocab"):
        sample(torch.zeros(2, 3, 4), GREEDY)
