"""Penalties, logit_bias and min_p against values worked out by hand on small logits vectors."""

import math

import pytest
import torch

from herd.generate import SamplingParams, sample
from herd.generate.penalties import (
    FrequencyPresencePenalty,
    LogitBias,
    Penalties,
    RepetitionPenalty,
)
from herd.generate.processors import apply_processors
from herd.generate.sampling import truncated_probs


def test_logit_bias_adds_to_the_named_ids_only():
    p = LogitBias(torch.tensor([1, 3]), torch.tensor([5.0, -100.0]))
    out = p(torch.tensor([0.5, 1.0, -2.0, 4.0]), [])
    assert out.tolist() == [0.5, 6.0, -2.0, -96.0]


def test_repetition_penalty_divides_positive_and_multiplies_negative_over_prompt_and_output():
    p = RepetitionPenalty(2.0, torch.tensor([0, 2]))
    logits = torch.tensor([4.0, 4.0, -1.0, -1.0, 3.0])
    # Seen: 0 and 2 (prompt) and 4 (generated); 1 and 3 are untouched.
    assert p(logits.clone(), [4]).tolist() == [2.0, 4.0, -2.0, -1.0, 1.5]
    # A later step folds in the newly generated token 3 and keeps the earlier ones.
    assert p(logits.clone(), [4, 3]).tolist() == [2.0, 4.0, -2.0, -2.0, 1.5]


def test_frequency_and_presence_follow_openais_formula():
    # logit[j] -= count[j] * frequency + (count[j] > 0) * presence, counts over the generated tokens.
    p = FrequencyPresencePenalty(frequency=0.5, presence=1.0)
    logits = torch.zeros(4)
    assert p(logits.clone(), []).tolist() == [0.0, 0.0, 0.0, 0.0]
    assert p(logits.clone(), [2, 2, 1]).tolist() == [0.0, -1.5, -2.0, 0.0]
    assert p(logits.clone(), [2, 2, 1, 2]).tolist() == [0.0, -1.5, -2.5, 0.0]  # incremental counting
    negative = FrequencyPresencePenalty(frequency=-1.0, presence=0.0)  # a negative penalty encourages repeats
    assert negative(logits.clone(), [3]).tolist() == [0.0, 0.0, 0.0, 1.0]


def test_factories_run_in_vllms_order_and_each_choice_has_its_own_state():
    pen = Penalties(frequency=1.0, repetition=2.0, logit_bias={0: 2.0})
    factories = pen.factories(prompt=[0])
    a = [make() for make in factories]
    b = [make() for make in factories]
    logits = torch.tensor([2.0, 1.0, 1.0])
    # bias: [4, 1, 1]; repetition over prompt {0} and output {1}: [2, 0.5, 1]; frequency over output: [2, -0.5, 1]
    assert apply_processors(a, logits.clone(), [1]).tolist() == [2.0, -0.5, 1.0]
    assert apply_processors(b, logits.clone(), []).tolist() == [2.0, 1.0, 1.0]  # b saw no output
    assert Penalties().factories([1, 2]) == [] and not Penalties().active


@pytest.mark.parametrize("kwargs, match", [
    ({"frequency": 2.5}, "frequency"), ({"presence": -3}, "presence"), ({"repetition": 0.0}, "repetition"),
    ({"repetition": float("nan")}, "repetition"), ({"logit_bias": {1: 101}}, r"\[-100, 100\]"),
    ({"logit_bias": {-1: 1}}, "token ids"),
])
def test_invalid_penalties_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Penalties(**kwargs)


def test_min_p_keeps_tokens_above_a_fraction_of_the_top_probability():
    # probs after temperature 1: [0.5, 0.3, 0.15, 0.05]; min_p 0.4 keeps p >= 0.2: the first two.
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    got = truncated_probs(logits, SamplingParams(temperature=1.0, top_p=1.0, min_p=0.4))
    torch.testing.assert_close(got, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    # Temperature first: at T=2 the probabilities flatten to sqrt(p) / sum and min_p acts on those.
    flat = probs.sqrt() / probs.sqrt().sum()
    keep = flat >= 0.5 * flat.max()
    want = torch.where(keep, flat, 0.0)
    got = truncated_probs(logits, SamplingParams(temperature=2.0, top_p=1.0, min_p=0.5))
    torch.testing.assert_close(got, want / want.sum())
    assert keep.sum() == 3  # sqrt(0.15)/sqrt(0.5) = 0.55 survives, sqrt(0.05)/sqrt(0.5) = 0.32 does not


def test_min_p_then_top_p_on_what_min_p_kept():
    # min_p 0.25 drops 0.05 -> renormalised [0.526, 0.316, 0.158]; top_p 0.6: mass before the 2nd is
    # 0.526 <= 0.6 so it stays, before the 3rd is 0.842 > 0.6 so it goes.
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    got = truncated_probs(logits, SamplingParams(temperature=1.0, top_p=0.6, min_p=0.25))
    torch.testing.assert_close(got, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))


def test_unset_min_p_leaves_metas_path_bit_identical():
    logits = torch.randn(3, 97, generator=torch.Generator().manual_seed(0))
    base = SamplingParams(temperature=0.8, top_p=0.9, seed=5)
    for off in (None, 0.0):
        other = SamplingParams(temperature=0.8, top_p=0.9, seed=5, min_p=off)
        assert torch.equal(truncated_probs(logits, base), truncated_probs(logits, other))
        g1, g2 = base.make_generator("cpu"), other.make_generator("cpu")
        assert all(torch.equal(sample(logits, base, g1), sample(logits, other, g2)) for _ in range(20))


@pytest.mark.parametrize("value", [-0.1, 1.5, math.nan])
def test_min_p_out_of_range_raises(value):
    with pytest.raises(ValueError, match="min_p"):
        SamplingParams(min_p=value)
