"""Speculative decoding returns exactly the target's greedy output, whatever the draft."""

import pytest
import torch

from herd.generate import GREEDY, generate
from herd.generate.speculative import speculative_generate
from herd.model import ModelArgs, build_model

RAGGED = [[5, 17, 3, 99, 42], [7, 1, 250, 33, 8, 19, 64, 2, 11], [200, 9]]


@pytest.fixture(scope="module")
def drafts(model):
    """A draft that agrees with the target part of the time (its head perturbed), and an unrelated one."""
    noisy = build_model(model.args, seed=0)
    noisy.load_state_dict(model.state_dict())
    with torch.no_grad():
        noisy.output.weight.add_(torch.randn(noisy.output.weight.shape, generator=torch.Generator().manual_seed(1)) * 0.3)
    small = build_model(ModelArgs.from_name("debug").replace(n_layers=1, dim=32, n_heads=2, n_kv_heads=1), seed=5)
    return {"noisy": noisy.eval(), "unrelated": small.eval()}


@pytest.mark.parametrize("num_draft", [1, 4])
@pytest.mark.parametrize("which", ["noisy", "unrelated"])
def test_output_is_the_targets_greedy_output(model, drafts, which, num_draft):
    want = generate(model, RAGGED, max_new_tokens=24, sampling=GREEDY)
    got = speculative_generate(model, drafts[which], RAGGED, max_new_tokens=24, num_draft=num_draft)
    assert [r.tokens for r in got] == [r.tokens for r in want]
    assert all(r.finish_reason == "length" for r in got)
    rates = [r.acceptance_rate for r in got]
    if which == "noisy":  # both paths of a round taken: some drafts accepted, some rolled back
        assert 0 < sum(r.accepted for r in got) < sum(r.drafted for r in got)
    assert all(0 <= x <= 1 for x in rates)


def test_draft_equal_to_target_accepts_everything(model):
    want = generate(model, RAGGED, max_new_tokens=20, sampling=GREEDY)
    got = speculative_generate(model, model, RAGGED, max_new_tokens=20, num_draft=4)
    assert [r.tokens for r in got] == [r.tokens for r in want]
    assert all(r.acceptance_rate == 1.0 for r in got)
    # Every round commits k + 1 tokens: 1 (prefill) + 19 more in rounds of 5 (4 + the last 4 of 3 + 1).
    assert all(r.target_forwards == 1 + 4 for r in got)


def test_stop_tokens_and_length_limit(successor_model):
    # The successor model emits previous + 1, so a prompt ending in 10 stops when 14 comes next.
    [got] = speculative_generate(successor_model, successor_model, [[3, 10]], max_new_tokens=50, num_draft=3,
                                 stop_tokens=[14])
    assert got.tokens == [11, 12, 13] and got.finish_reason == "stop" and got.stop_token == 14
    # Near the end of the context the rounds shrink so no position passes max_seq_len.
    L = successor_model.args.max_seq_len
    prompt = [i % 200 for i in range(L - 3)]
    [got] = speculative_generate(successor_model, successor_model, [prompt], max_new_tokens=10, num_draft=4)
    want = generate(successor_model, [prompt], max_new_tokens=10, sampling=GREEDY)[0]
    assert got.tokens == want.tokens and len(got.tokens) == 3 and got.finish_reason == "length"


def test_rejects_a_draft_with_another_vocabulary(model):
    other = build_model(ModelArgs.from_name("debug").replace(vocab_size=300), seed=0)
    with pytest.raises(ValueError, match="vocabulary"):
        speculative_generate(model, other, RAGGED, max_new_tokens=4)
