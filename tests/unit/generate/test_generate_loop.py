"""The generation loop against full recomputation and single-prompt runs."""

import pytest
import torch

from herd.generate import (
    GREEDY,
    KVCache,
    SamplingParams,
    decode_step,
    generate,
    generate_tokens,
    pad_prompts,
    prefill,
)

RAGGED = [[5, 17, 3, 99, 42], [7, 1, 250, 33, 8, 19, 64, 2, 11], [200, 9]]


def _rand_tokens(n, seed):
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("prompts", [[RAGGED[1]], RAGGED], ids=["batch1", "ragged3"])
def test_incremental_decode_equals_full_forward(model, prompts):
    steps = 6
    conts = [_rand_tokens(steps, seed=i) for i in range(len(prompts))]  # tokens fed after each prompt
    B = len(prompts)
    cache = KVCache(model.args, batch_size=B, max_seq_len=64)
    tokens, lengths = pad_prompts(prompts, device="cpu")
    h = prefill(model, tokens, cache)  # (B, S, dim)
    incremental = [model.output(h[torch.arange(B), lengths - 1]).float()]  # per step: (B, V)
    for j in range(steps):
        fed = torch.tensor([c[j] for c in conts])
        incremental.append(decode_step(model, fed, lengths + j, cache))
    incremental = torch.stack(incremental, dim=1)  # (B, steps + 1, V)

    for i, (prompt, cont) in enumerate(zip(prompts, conts)):
        with torch.no_grad():
            full = model(torch.tensor([prompt + cont]))[0]  # (len + steps, V), no cache, this row alone
        expected = full[len(prompt) - 1 :]  # logits predicting each token after the prompt
        torch.testing.assert_close(incremental[i], expected, rtol=0, atol=1e-5)


def test_ragged_greedy_equals_each_prompt_alone(model):
    batched = generate(model, RAGGED, max_new_tokens=32, sampling=GREEDY)
    for prompt, got in zip(RAGGED, batched):
        alone = generate(model, [prompt], max_new_tokens=32, sampling=GREEDY)[0]
        assert got.tokens == alone.tokens
        assert len(got.tokens) == 32 and got.finish_reason == "length" and got.stop_token is None


def test_greedy_matches_argmax_of_full_forward(model):
    # Independent of the cache entirely: re-run the whole sequence each step.
    prompt = RAGGED[0]
    got = generate(model, [prompt], max_new_tokens=12, sampling=GREEDY)[0].tokens
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert got == seq[len(prompt) :]


def test_stop_token_ends_only_its_row(successor_model):
    # The successor model emits prev + 1, so row 0 (ends in 10) samples 14 at step 3, while
    # row 1 (ends in 100) never meets a stop token and row 2 (ends in 12) meets 14 at step 1.
    prompts = [[3, 10], [1, 2, 100], [12]]
    events = generate_tokens(successor_model, prompts, max_new_tokens=8, sampling=GREEDY, stop_tokens=[14, 255])
    seen = []
    while True:
        try:
            seen.append(next(events))
        except StopIteration as done:
            results = done.value
            break
    assert [r.tokens for r in results] == [[11, 12, 13], list(range(101, 109)), [13]]
    assert [r.finish_reason for r in results] == ["stop", "length", "stop"]
    assert [r.stop_token for r in results] == [14, None, 14]
    assert len(seen) == 8  # the unfinished row keeps the loop going
    assert seen[3].tokens[0] is None and seen[3].finish_reasons[0] == "stop"
    assert seen[1].finish_reasons[2] == "stop" and all(e.tokens[2] is None for e in seen[1:])
    for i, r in enumerate(results):  # events carry exactly the result tokens
        assert [e.tokens[i] for e in seen if e.tokens[i] is not None] == r.tokens


def test_stop_at_first_step_gives_empty_tokens(successor_model):
    r = generate(successor_model, [[7]], max_new_tokens=5, sampling=GREEDY, stop_tokens={8})[0]
    assert r.tokens == [] and r.finish_reason == "stop" and r.stop_token == 8


def test_early_stopped_rows_do_not_disturb_others(model):
    # Row 0 stops at its third token; the other rows must still equal their solo runs, i.e.
    # feeding the finished row at its frozen position leaves their cache rows alone.
    solo = [generate(model, [p], max_new_tokens=20, sampling=GREEDY)[0].tokens for p in RAGGED]
    stop = solo[0][2]
    assert all(stop not in s for s in solo[1:]), "pick another stop token for this seed"
    batched = generate(model, RAGGED, max_new_tokens=20, sampling=GREEDY, stop_tokens=[stop])
    assert batched[0].tokens == solo[0][: solo[0].index(stop)] and batched[0].finish_reason == "stop"
    assert [r.tokens for r in batched[1:]] == solo[1:]


def test_max_seq_len_caps_generation(model):
    n = model.args.max_seq_len - 5
    r = generate(model, [[1] * n, [2, 3]], max_new_tokens=9, sampling=GREEDY)
    assert len(r[0].tokens) == 5 and r[0].finish_reason == "length"
    assert len(r[1].tokens) == 9 and r[1].finish_reason == "length"


def test_logprobs_and_echo_match_full_forward(model):
    # T != 1: logprobs must come from the raw logits, not the temperature-scaled ones
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=0)
    results = generate(model, RAGGED, max_new_tokens=10, sampling=params, logprobs=True, echo=True)
    for prompt, r in zip(RAGGED, results):
        assert r.prompt_tokens == prompt
        seq = prompt + r.tokens
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([seq]))[0], dim=-1)  # (len, V)
        expected = logp[:-1].gather(-1, torch.tensor(seq[1:]).unsqueeze(-1)).squeeze(-1)  # log p(seq[t] | seq[:t])
        got_prompt = torch.tensor(r.prompt_logprobs[1:], dtype=torch.float32)
        assert r.prompt_logprobs[0] is None
        torch.testing.assert_close(got_prompt, expected[: len(prompt) - 1], rtol=0, atol=1e-5)
        torch.testing.assert_close(torch.tensor(r.logprobs), expected[len(prompt) - 1 :], rtol=0, atol=1e-5)


def test_logprobs_without_echo(model):
    r = generate(model, [RAGGED[0]], max_new_tokens=4, sampling=GREEDY, logprobs=True)[0]
    assert r.prompt_tokens is None and r.prompt_logprobs is None and len(r.logprobs) == 4
    seq = RAGGED[0] + r.tokens
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([seq]))[0], dim=-1)
    expected = [float(logp[len(RAGGED[0]) - 1 + j, t]) for j, t in enumerate(r.tokens)]
    assert r.logprobs == pytest.approx(expected, abs=1e-5)
    assert generate(model, [RAGGED[0]], max_new_tokens=2, sampling=GREEDY)[0].logprobs is None


def test_seeded_sampling_is_reproducible_and_seed_dependent(model):
    def run(seed):
        return [r.tokens for r in generate(model, RAGGED, max_new_tokens=16,
                                           sampling=SamplingParams(temperature=1.0, top_p=0.95, seed=seed))]

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_given_cache_is_reused_without_reset(model):
    cache = KVCache(model.args, batch_size=4, max_seq_len=64)
    first = generate(model, RAGGED, max_new_tokens=8, sampling=GREEDY, cache=cache)
    # the cache now holds stale keys of other prompts; a new call must not see them
    again = generate(model, RAGGED[::-1], max_new_tokens=8, sampling=GREEDY, cache=cache)
    assert [r.tokens for r in again] == [r.tokens for r in first][::-1]
    with pytest.raises(ValueError, match="larger cache"):
        generate(model, RAGGED, max_new_tokens=100, sampling=GREEDY, cache=cache)
    with pytest.raises(ValueError, match="matching the model"):
        generate(model, RAGGED, max_new_tokens=8, sampling=GREEDY,
                 cache=KVCache(model.args, batch_size=4, max_seq_len=64, dtype=torch.bfloat16))


@pytest.mark.parametrize(
    "prompts, kwargs, match",
    [
        ([], {}, "prompts is empty"),
        ([[1, 2], []], {}, "prompt 1 is empty"),
        ([[1] * 256], {}, r"prompt 0 has 256 tokens but the model's max_seq_len is 256.*at most 255"),
        ([[1, 256]], {}, "outside the vocabulary"),
        ([[1]], {"max_new_tokens": 0}, "max_new_tokens"),
    ],
)
def test_bad_inputs_raise_at_the_call(model, prompts, kwargs, match):
    # generate_tokens checks eagerly: the error comes from the call, not from the first next()
    with pytest.raises(ValueError, match=match):
        generate_tokens(model, prompts, **{"max_new_tokens": 4, **kwargs})


class _OnlyOdd:
    """A stateful processor: allows odd ids only, and records what it was told and shown."""

    def __init__(self):
        self.accepted, self.seen = [], []

    def __call__(self, logits, generated):
        self.seen.append(list(generated))
        logits[0::2] = float("-inf")
        return logits

    def accept(self, token):
        self.accepted.append(token)


def test_logits_processors_constrain_each_row_and_logprobs_stay_raw(model):
    made = []

    def factory():
        made.append(_OnlyOdd())
        return made[-1]

    prompts = RAGGED[:2]
    results = generate(model, prompts, max_new_tokens=5, sampling=GREEDY, logprobs=True, logits_processors=(factory,))
    assert len(made) == 2  # one processor per row
    for prompt, r, p in zip(prompts, results, made):
        assert all(t % 2 == 1 for t in r.tokens) and p.accepted == r.tokens
        assert p.seen == [r.tokens[:k] for k in range(len(r.tokens))]
        seq = prompt + r.tokens
        with torch.no_grad():
            logits = model(torch.tensor([seq]))[0, len(prompt) - 1 : -1]  # (5, V)
        odd = logits.clone()
        odd[:, 0::2] = float("-inf")
        assert r.tokens == odd.argmax(-1).tolist()  # greedy over the allowed ids
        raw = torch.log_softmax(logits, -1).gather(-1, torch.tensor(r.tokens).unsqueeze(-1)).squeeze(-1)
        torch.testing.assert_close(torch.tensor(r.logprobs), raw, rtol=0, atol=1e-5)
