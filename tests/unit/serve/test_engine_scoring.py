"""The engine's prompt scoring (prompt_logprobs, max_tokens 0), its penalties hook and its latency
observations, each against a reference computed directly."""

import pytest
import torch

import herd.serve.scoring as scoring_module
from herd.generate.penalties import Penalties
from herd.model import ModelArgs, build_model
from herd.serve import Engine, Request


def _direct_logprobs(model, prompt):
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([prompt])).float(), dim=-1)[0]  # (S, V)


@pytest.mark.parametrize("prefill_budget", [512, 3])  # 3: the prompt is prefilled (and scored) in 4 chunks
@pytest.mark.parametrize("k", [0, 3])
def test_prompt_logprobs_equal_log_softmax_of_the_model(model, monkeypatch, k, prefill_budget):
    monkeypatch.setattr(scoring_module, "PROMPT_LOGPROB_CHUNK", 4)  # several head chunks for a 11-token prompt
    prompt = [5, 17, 200, 3, 3, 90, 41, 7, 7, 7, 255]
    engine = Engine(model, max_batch=2, max_seq_len=64, prefill_budget=prefill_budget)
    h = engine.submit(Request(prompt, 2, n=2, prompt_logprobs=k))
    engine.run_until_idle()
    res = h.result(0)
    lsm = _direct_logprobs(model, prompt)
    got = res.prompt_logprobs
    assert len(got) == len(prompt) and got[0].logprob is None and got[0].top_logprobs is None
    want = [lsm[i - 1, prompt[i]].item() for i in range(1, len(prompt))]
    torch.testing.assert_close(torch.tensor([e.logprob for e in got[1:]]), torch.tensor(want), atol=1e-4, rtol=0)
    for i, e in enumerate(got[1:], start=1):
        if k == 0:
            assert e.top_logprobs is None
            continue
        ids, lps = zip(*e.top_logprobs)
        assert list(ids) == lsm[i - 1].topk(k).indices.tolist()
        torch.testing.assert_close(torch.tensor(lps), lsm[i - 1].topk(k).values, atol=1e-4, rtol=0)
    assert all(len(c.tokens) == 2 for c in res.choices)  # and both choices still generated


def test_max_tokens_zero_prefills_only_and_may_fill_the_context(model):
    engine = Engine(model, max_batch=2, max_seq_len=16)
    full = list(range(1, 17))  # exactly the context: fine for scoring, nothing is generated
    h = engine.submit(Request(full, 0, n=2, prompt_logprobs=0))
    engine.run_until_idle()
    res = h.result(0)
    assert [c.finish_reason for c in res.choices] == ["length", "length"] and all(not c.tokens for c in res.choices)
    assert len(res.prompt_logprobs) == 16 and res.time_to_first_token is None
    m = engine.metrics()
    assert m.prefills_total == 1 and m.generation_tokens_total == 0 and m.slots_busy == 0
    with pytest.raises(ValueError, match="no room"):
        engine.submit(Request(full, 1))
    with pytest.raises(ValueError, match="no room"):
        engine.submit(Request([*full, 1], 0))


def test_logit_bias_through_the_engine_forces_a_token_and_logprobs_stay_raw(model):
    engine = Engine(model, max_batch=1, max_seq_len=64)
    forced = Penalties(logit_bias={42: 100.0})
    h = engine.submit(Request([1, 2, 3], 3, logprobs=True, logits_processors=forced.factories([1, 2, 3])))
    engine.run_until_idle()
    c = h.result(0).choices[0]
    assert c.tokens == [42, 42, 42]
    lsm = _direct_logprobs(model, [1, 2, 3, 42, 42])
    want = [lsm[2, 42].item(), lsm[3, 42].item(), lsm[4, 42].item()]  # under the model, not the biased logits
    torch.testing.assert_close(torch.tensor(c.logprobs), torch.tensor(want), atol=1e-4, rtol=0)


def test_frequency_penalty_through_the_engine_matches_a_hand_loop():
    # The default init's logits are close together, so a penalty of this size changes the path.
    model = build_model(ModelArgs.from_name("debug"), seed=0).eval()
    prompt, steps, freq, pres = [9, 8, 7], 6, -1.0, -2.0  # negative: favour repeats, which this model never makes
    engine = Engine(model, max_batch=1, max_seq_len=64)
    pen = Penalties(frequency=freq, presence=pres)
    h = engine.submit(Request(prompt, steps, logits_processors=pen.factories(prompt)))
    engine.run_until_idle()
    seq = list(prompt)
    for _ in range(steps):  # the reference: full forward, OpenAI's formula written out, argmax
        with torch.no_grad():
            logits = model(torch.tensor([seq]))[0, -1].float()
        out = seq[len(prompt):]
        for t in set(out):
            logits[t] -= out.count(t) * freq + pres
        seq.append(int(logits.argmax()))
    assert h.result(0).choices[0].tokens == seq[len(prompt):]
    plain = engine.submit(Request(prompt, steps))
    engine.run_until_idle()
    assert plain.result(0).choices[0].tokens != seq[len(prompt):]  # the penalty did change the output


class _Recorder:
    def __init__(self):
        self.ttft, self.itl, self.e2e = [], [], []

    def time_to_first_token(self, s):
        self.ttft.append(s)

    def inter_token(self, s):
        self.itl.append(s)

    def request(self, s):
        self.e2e.append(s)


def test_latency_observations_on_a_fake_clock(model):
    now = [100.0]
    engine = Engine(model, max_batch=2, max_seq_len=64, clock=lambda: now[0])
    rec = _Recorder()
    engine.add_latency_observer(rec)
    h = engine.submit(Request([1, 2, 3], 4))  # submitted at 100.0
    now[0] = 100.3
    engine.step()  # prefill + first token at 100.3, then the second token's decode in the same step
    for t in (100.35, 100.55):
        now[0] = t
        engine.step()
    assert h.done()
    assert rec.ttft == [pytest.approx(0.3)] and rec.e2e == [pytest.approx(0.55)]
    assert rec.itl == pytest.approx([0.0, 0.05, 0.2])  # token 2 came in the same step as token 1
    assert h.result(0).time_to_first_token == pytest.approx(0.3)


def test_a_scored_prompt_is_never_served_from_the_prefix_cache(model):
    # The cached blocks hold keys and values, not the logprobs of their positions: a request that
    # asks for prompt logprobs must compute every position even when its prefix is cached.
    prompt = list(range(1, 40))
    engine = Engine(model, max_batch=2, max_seq_len=64, block_size=4)
    engine.submit(Request(prompt, 1))
    engine.run_until_idle()
    before = engine.metrics().prefill_tokens_total
    h = engine.submit(Request(prompt, 1, prompt_logprobs=0))
    engine.run_until_idle()
    assert engine.metrics().prefill_tokens_total - before == len(prompt)
    lsm = _direct_logprobs(model, prompt)
    got = [e.logprob for e in h.result(0).prompt_logprobs[1:]]
    want = [lsm[i - 1, prompt[i]].item() for i in range(1, len(prompt))]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=1e-4, rtol=0)
