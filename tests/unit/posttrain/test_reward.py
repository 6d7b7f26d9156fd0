import pytest
import torch

from herd.generate import SamplingParams, generate
from herd.posttrain.config import FinetuneOptimConfig
from herd.posttrain.data import PreferencePair
from herd.posttrain.rejection import prompts_from_dialogs, rejection_sample
from herd.posttrain.reward import (
    RewardModel,
    encode_ranked,
    load_reward_model,
    reward_accuracy,
    save_reward_model,
    score_dialogs,
    train_reward_model,
)
from herd.tokenizer import Message


def test_reward_reads_the_last_real_token_and_ignores_padding(tiny_model):
    rm = RewardModel(tiny_model()).eval()
    a, b = [1, 2, 3, 4], [5, 6]
    padded = torch.tensor([a, b + [9, 9]])
    with torch.no_grad():
        both = rm(padded, torch.tensor([4, 2]))
        alone = rm(torch.tensor([b]), torch.tensor([2]))
    assert both[1].item() == pytest.approx(alone.item(), abs=1e-5)
    assert score_dialogs(rm, [a, b]).tolist() == pytest.approx(both.tolist(), abs=1e-5)


def _pairs(n, offset=0):
    # The better response mentions "good"; with an edited response above it (edited > chosen > rejected).
    return [PreferencePair([Message("user", f"q{i + offset}")], Message("assistant", f"good {i}"),
                           Message("assistant", f"bad {i}"),
                           edited=Message("assistant", f"good good {i}") if i % 2 else None) for i in range(n)]


def test_reward_training_learns_a_held_out_ranking(fmt, tiny_model, tmp_path):
    rm = RewardModel(tiny_model(seed=3))
    train, held = encode_ranked(fmt, _pairs(48)), encode_ranked(fmt, _pairs(16, offset=100))
    assert [len(r.responses) for r in train[:2]] == [2, 3]
    result = train_reward_model(rm, train, FinetuneOptimConfig(lr=1e-2, steps=30, batch_size=8), val_items=held, log=None)
    assert result.val_accuracy_before == 0.0  # zero-initialised head: all rewards tie
    assert result.val_accuracy >= 0.9
    save_reward_model(rm, tmp_path / "rm")
    again = load_reward_model(tmp_path / "rm")
    assert reward_accuracy(again, held) == result.val_accuracy
    with pytest.raises(FileNotFoundError):
        load_reward_model(tmp_path)


class _LengthReward(RewardModel):
    """Reward = number of tokens: rejection sampling must keep the longest *finished* sample."""

    def forward(self, tokens, lengths):
        return lengths.float()


def test_rejection_sampling_keeps_the_best_finished_sample(fmt, tok, tiny_model):
    policy = tiny_model(seed=4)
    rm = _LengthReward(tiny_model())
    # Make eot likely so that some samples finish and some do not.
    with torch.no_grad():
        policy.output.weight[tok.eot_id] += 0.5 * policy.tok_embeddings.weight.mean(0)
    prompts = prompts_from_dialogs([[Message("user", "hi"), Message("assistant", "x")], [Message("user", "yo")]])
    assert prompts == [[Message("user", "hi")], [Message("user", "yo")]]
    out = rejection_sample(policy, rm, fmt, prompts, k=6, max_new_tokens=12,
                           sampling=SamplingParams(temperature=1.0, top_p=1.0, seed=0))
    for s in out:
        assert len(s.responses) == len(s.rewards) == 6
        eligible = [j for j in range(6) if s.finished[j]]
        if eligible:
            assert s.best in eligible and s.rewards[s.best] == max(s.rewards[j] for j in eligible)
            assert s.dialog[-1] == Message("assistant", s.responses[s.best])
        else:
            assert s.best is None and s.dialog is None
    with pytest.raises(ValueError, match="user"):
        rejection_sample(policy, rm, fmt, [[Message("user", "a"), Message("assistant", "b")]], k=2,
                         max_new_tokens=2, sampling=SamplingParams(temperature=0))


def test_rejection_candidates_come_from_the_policy_distribution(fmt, tok, tiny_model):
    """Greedy candidates equal `generate` one prompt at a time; sampled first tokens follow the
    policy's softmax; a seeded call repeats exactly."""
    policy = tiny_model(seed=4).eval()
    with torch.no_grad():
        policy.output.weight.mul_(6.0)  # a peaked distribution: the frequencies below test something
    rm = _LengthReward(tiny_model())
    prompts = [[Message("user", "hi")], [Message("user", "a longer question")]]
    greedy = rejection_sample(policy, rm, fmt, prompts, k=2, max_new_tokens=6, sampling=SamplingParams(temperature=0),
                              batch_size=1)
    for p, s in zip(prompts, greedy):
        [want] = generate(policy, [fmt.encode_dialog_prompt(p).tokens], max_new_tokens=6,
                          sampling=SamplingParams(temperature=0), stop_tokens=tok.stop_tokens)
        assert s.responses == [tok.decode(want.tokens)] * 2

    k = 400
    sampling = SamplingParams(temperature=1.0, top_p=1.0, seed=3)
    out = rejection_sample(policy, rm, fmt, prompts[:1], k=k, max_new_tokens=1, sampling=sampling, batch_size=1)
    ids = fmt.encode_dialog_prompt(prompts[0]).tokens
    with torch.no_grad():
        probs = torch.softmax(policy(torch.tensor([ids]))[0, -1].float(), dim=-1)
    mass: dict[str, float] = {}  # the probability of each one-token response text
    for t, pt in enumerate(probs.tolist()):
        text = "" if t in tok.stop_tokens else tok.decode([t])
        mass[text] = mass.get(text, 0.0) + pt
    for text, p in sorted(mass.items(), key=lambda kv: -kv[1])[:3]:
        freq = out[0].responses.count(text) / k
        assert abs(freq - p) < 4 * (p * (1 - p) / k) ** 0.5 + 1e-3, (text, p, freq)
    again = rejection_sample(policy, rm, fmt, prompts[:1], k=k, max_new_tokens=1, sampling=sampling, batch_size=1)
    assert again[0].responses == out[0].responses
