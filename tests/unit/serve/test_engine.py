"""The continuous-batching engine against `herd.generate.generate`, one request at a time."""

import threading
from functools import partial

import pytest
import torch

import herd.serve.engine as engine_module
from herd.generate import GREEDY, SamplingParams, generate
from herd.generate.compiled import CompiledDecoder
from herd.serve import Engine, FinishEvent, QueueFull, Request, TokenEvent


def _prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (int(torch.randint(1, 24, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def _alone(model, prompt, max_tokens, sampling=GREEDY, stop=(), **kw):
    return generate(model, [prompt], max_new_tokens=max_tokens, sampling=sampling, stop_tokens=stop, **kw)[0]


def test_batched_greedy_equals_generate_per_request(model):
    prompts = _prompts(7)
    budgets = [5, 17, 9, 30, 1, 12, 20]
    engine = Engine(model, max_batch=3, max_queue=16, max_seq_len=96)  # 7 requests through 3 slots
    handles = [engine.submit(Request(p, n, stop_tokens=(7, 200))) for p, n in zip(prompts, budgets)]
    engine.run_until_idle()
    for p, n, h in zip(prompts, budgets, handles):
        got, want = h.result(0).choices[0], _alone(model, p, n, stop=(7, 200))
        assert got.tokens == want.tokens
        assert got.finish_reason == want.finish_reason and got.stop_token == want.stop_token
    m = engine.metrics()
    assert sum(m.requests_finished_total.values()) == 7
    assert m.generation_tokens_total == sum(len(h.result(0).choices[0].tokens) for h in handles)
    assert m.slots_busy == 0 and m.requests_waiting == 0


def test_requests_joining_mid_flight_get_independent_answers(model):
    prompts = _prompts(4, seed=1)
    engine = Engine(model, max_batch=4, max_queue=4, max_seq_len=96)
    first = [engine.submit(Request(p, 24)) for p in prompts[:2]]
    for _ in range(6):
        engine.step()
    assert engine.metrics().slots_busy == 2
    late = [engine.submit(Request(p, 24)) for p in prompts[2:]]
    engine.step()  # admits both newcomers, then decodes all four rows together
    m = engine.metrics()
    assert m.slots_busy == 4 and m.decode_rows_total == 6 * 2 + 4
    engine.run_until_idle()
    for p, h in zip(prompts, first + late):
        assert h.result(0).choices[0].tokens == _alone(model, p, 24).tokens


def test_a_full_queue_rejects_at_once(model):
    engine = Engine(model, max_batch=1, max_queue=2, max_seq_len=64)
    engine.submit(Request([1, 2], 4))
    engine.submit(Request([3], 4))
    with pytest.raises(QueueFull):
        engine.submit(Request([4], 4))
    assert engine.metrics().requests_rejected_total == 1
    engine.step()  # the first request takes the slot and leaves the queue: room for one more
    engine.submit(Request([4], 4))
    engine.run_until_idle()


def test_cancellation_frees_the_slot_at_the_next_step(model):
    engine = Engine(model, max_batch=1, max_queue=4, max_seq_len=64)
    long = engine.submit(Request([1, 2, 3], 50))
    waiting = engine.submit(Request([9, 8], 5))
    doomed = engine.submit(Request([7], 5))
    for _ in range(3):
        engine.step()
    assert engine.metrics().slots_busy == 1 and not waiting.done()
    long.cancel()
    doomed.cancel()  # still in the queue: removed without ever running
    engine.step()
    assert long.done() and long.result(0).choices[0].finish_reason == "cancelled"
    assert len(long.result(0).choices[0].tokens) == 4  # the prefill's token, then one per decode step
    assert doomed.result(0).choices[0].finish_reason == "cancelled" and doomed.result(0).choices[0].tokens == []
    engine.run_until_idle()
    assert waiting.result(0).choices[0].tokens == _alone(model, [9, 8], 5).tokens


def test_per_request_seeds_are_reproducible(model):
    sampling = SamplingParams(temperature=1.0, top_p=0.95, seed=1234)
    prompt = [5, 6, 7]
    engine = Engine(model, max_batch=4, max_queue=8, max_seq_len=64)
    alone = engine.submit(Request(prompt, 16, sampling))
    engine.run_until_idle()
    # The same request again, now batched with others (one of them sampled with another seed).
    others = [engine.submit(Request(p, 16, SamplingParams(temperature=1.0, seed=9))) for p in _prompts(2, seed=3)]
    again = engine.submit(Request(prompt, 16, sampling, n=2))
    engine.run_until_idle()
    tokens = alone.result(0).choices[0].tokens
    assert again.result(0).choices[0].tokens == tokens  # choice i uses seed + i
    assert again.result(0).choices[1].tokens != tokens
    assert tokens == _alone(model, prompt, 16, sampling).tokens  # the same draws as generate's
    assert all(h.done() for h in others)


def test_n_choices_and_logprobs(model):
    prompt = [11, 22, 33, 44]
    engine = Engine(model, max_batch=4, max_queue=2, max_seq_len=64)
    h = engine.submit(Request(prompt, 10, n=3, logprobs=True, top_logprobs=3))
    engine.run_until_idle()
    want = _alone(model, prompt, 10, logprobs=True)
    for c in h.result(0).choices:  # greedy choices share the prompt's cache rows and agree
        assert c.tokens == want.tokens
        torch.testing.assert_close(c.logprobs, want.logprobs, rtol=0, atol=1e-4)
        for t, lp, top in zip(c.tokens, c.logprobs, c.top_logprobs):
            assert len(top) == 3 and top[0][0] == t and top[0][1] == pytest.approx(lp)
            assert top[0][1] >= top[1][1] >= top[2][1]


def test_stop_strings_match_token_bytes(successor_model):
    # Token t is the letter chr(ord('a') + t % 26); the successor model spells the alphabet.
    engine = Engine(successor_model, max_batch=2, max_queue=2, max_seq_len=64,
                    token_bytes=lambda t: bytes([ord("a") + t % 26]))
    h = engine.submit(Request([2], 20, stop_strings=("xyz", "fg")))  # 'c' -> d e f g: "fg" completes at g
    engine.run_until_idle()
    c = h.result(0).choices[0]
    assert c.tokens == [3, 4, 5, 6] and c.finish_reason == "stop" and c.stop_string == "fg"
    with pytest.raises(ValueError, match="token_bytes"):
        Engine(successor_model, max_seq_len=64).submit(Request([2], 5, stop_strings=("x",)))


def test_context_limit_and_bad_requests(successor_model):
    engine = Engine(successor_model, max_batch=2, max_queue=4, max_seq_len=16)
    h = engine.submit(Request(list(range(13)), 100))
    engine.run_until_idle()
    assert h.result(0).choices[0].tokens == [13, 14, 15] and h.result(0).choices[0].finish_reason == "length"
    for bad, match in [(Request([], 4), "empty"), (Request(list(range(16)), 4), "context"),
                       (Request([1], 4, n=3), "n must"), (Request([1, 256], 4), "token ids"),
                       (Request([1], -1), "max_tokens"), (Request([1], 1, prompt_logprobs=21), "prompt_logprobs")]:
        with pytest.raises(ValueError, match=match):
            engine.submit(bad)


def test_thread_events_and_a_failing_callback(model):
    engine = Engine(model, max_batch=4, max_queue=8, max_seq_len=64)
    engine.start()
    try:
        events = []
        good = engine.submit(Request([1, 2, 3], 8), on_event=events.append)

        def explode(event):
            raise RuntimeError("consumer bug")

        bad = engine.submit(Request([4, 5], 40), on_event=explode)
        results = {}

        def client(i):
            results[i] = engine.submit(Request([i + 1], 6)).result(timeout=60)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        r = good.result(timeout=60)
        assert bad.result(timeout=60).choices[0].finish_reason == "cancelled"  # only its own request ends
        assert [e.token for e in events if isinstance(e, TokenEvent)] == r.choices[0].tokens
        assert isinstance(events[-1], FinishEvent) and events[-1].finish_reason == "length"
        for i in range(4):
            assert results[i].choices[0].tokens == _alone(model, [i + 1], 6).tokens
        assert r.time_to_first_token is not None and r.total_time >= r.time_to_first_token
    finally:
        engine.stop()
    assert not engine.running
    with pytest.raises(RuntimeError):
        engine.submit(Request([1], 2))


def test_stop_cancels_what_is_left(model):
    engine = Engine(model, max_batch=1, max_queue=4, max_seq_len=64)
    a, b = engine.submit(Request([1], 30)), engine.submit(Request([2], 30))
    engine.step()
    engine.stop()
    assert a.result(0).choices[0].finish_reason == "cancelled" and b.result(0).choices[0].finish_reason == "cancelled"


def test_compiled_engine_equals_eager(model, monkeypatch):
    # The "eager" backend captures the same fixed-shape graph (fullgraph: no breaks) and runs it
    # without compiling it; inductor itself is checked in tests/unit/generate/test_compiled.py.
    monkeypatch.setattr(engine_module, "CompiledDecoder", partial(CompiledDecoder, backend="eager"))
    prompts = _prompts(3, seed=5)
    engine = Engine(model, max_batch=2, max_queue=4, max_seq_len=48, compile=True)
    handles = [engine.submit(Request(p, 10)) for p in prompts]
    engine.run_until_idle()
    for p, h in zip(prompts, handles):
        assert h.result(0).choices[0].tokens == _alone(model, p, 10).tokens


class _Ban:
    """Bans the token the raw greedy path would pick first, and records what it is told."""

    def __init__(self, banned):
        self.banned, self.seen, self.accepted = banned, [], []

    def __call__(self, logits, generated):
        self.seen.append(list(generated))
        logits[self.banned] = float("-inf")
        return logits

    def accept(self, token):
        self.accepted.append(token)


def test_logits_processors_rewrite_each_choice_and_see_its_own_tokens(model):
    prompt = _prompts(1, seed=3)[0]
    plain = _alone(model, prompt, 6).tokens
    made = []

    def factory():
        made.append(_Ban(plain[0]))
        return made[-1]

    engine = Engine(model, max_batch=4, max_seq_len=64)
    raw = engine.submit(Request(prompt, 6, logprobs=True))
    banned = engine.submit(Request(prompt, 6, n=2, logits_processors=(factory,), logprobs=True))
    engine.run_until_idle()
    assert raw.result(0).choices[0].tokens == plain  # the other request is untouched
    assert len(made) == 2  # one processor per choice
    for choice, proc in zip(banned.result(0).choices, made):
        assert plain[0] not in choice.tokens
        # Greedy over the rewritten logits: the banned token's runner-up comes first.
        with torch.no_grad():
            logits = model(torch.tensor([prompt])).float()[0, -1]
        logits[plain[0]] = float("-inf")
        assert choice.tokens[0] == int(logits.argmax())
        assert proc.accepted == choice.tokens
        assert proc.seen == [choice.tokens[:i] for i in range(len(choice.tokens))]
        # Reported logprobs are the raw model's, not the processed ones.
        with torch.no_grad():
            raw_lp = torch.log_softmax(model(torch.tensor([prompt])).float()[0, -1], -1)[choice.tokens[0]]
        assert abs(choice.logprobs[0] - float(raw_lp)) < 1e-4
