"""Step plans (herd.serve.tp): a follower replaying rank 0's plans ends with rank 0's rows and blocks.

One process plays both sides: an engine with a `Leader` whose messages go to a list, and a second
engine's model, rows and blocks (no scheduler of its own) replaying them. The workload exercises
every op: concurrent requests with chunked prefill, a request joining mid-flight, n = 2 (a fork
copying a row), prompt logprobs (the head over spans), a prefix-cache hit (blocks loaded into a
row) and preemption (blocks saved again on resume).
"""

import pytest
import torch

from herd.generate import SamplingParams
from herd.serve import Engine, Request
from herd.serve.tp import COPY, DECODE, LOAD, PREFILL, SAVE, STOP, Follower, Leader, _ops

SIZES = dict(max_batch=3, max_seq_len=32, prefill_budget=6, block_size=4, num_blocks=10)
GREEDY = SamplingParams(temperature=0.0)


def _zero_store(engine):
    for t in (*engine.store.k, *engine.store.v):  # torch.empty: unwritten blocks would differ
        t.zero_()


def _head_calls(model, log):
    """Record the row count of every output-head call (each is an all-gather under TP)."""
    return model.output.register_forward_hook(lambda m, inp, out: log.append(tuple(inp[0].shape)))


def _workload(engine):
    shared = [1, 9, 17, 25, 33, 41, 49, 57, 65, 73, 81]  # 11 tokens: 2 full blocks of 4 to share
    a = engine.submit(Request(prompt=shared + [5], max_tokens=4, sampling=GREEDY))
    engine.run_until_idle()
    e = engine.submit(Request(prompt=shared + [6, 7], max_tokens=12, sampling=GREEDY))  # a prefix hit
    b = engine.submit(Request(prompt=[3, 4, 5], max_tokens=16, sampling=SamplingParams(temperature=0.8, seed=7)))
    engine.step()
    engine.step()
    c = engine.submit(Request(prompt=[7, 8, 9, 10, 11, 12, 13, 14, 15], max_tokens=10, n=2, sampling=GREEDY))
    d = engine.submit(Request(prompt=[20, 21, 22, 23, 24, 25, 26], max_tokens=3, prompt_logprobs=2, sampling=GREEDY))
    engine.run_until_idle()
    return [h.result() for h in (a, b, c, d, e)]


@pytest.fixture(scope="module")
def recorded(model):
    messages, head = [], []
    leader = Leader(messages.append)
    engine = Engine(model, **SIZES, mirror=leader)
    _zero_store(engine)
    hook = _head_calls(model, head)
    try:
        results = _workload(engine)
    finally:
        hook.remove()
    engine.stop()  # sends STOP
    return engine, leader, messages, head, results


def _follower(model):
    f = Engine(model, **SIZES)
    _zero_store(f)
    return Follower(f.model, f.cache, f.store), f


def test_the_workload_uses_every_op(recorded):
    engine, leader, messages, _, results = recorded
    codes = [code for m in messages for code, _ in _ops(m)]
    for op in (LOAD, SAVE, COPY, PREFILL, DECODE):
        assert op in codes, f"op {op} never ran; the workload no longer covers it"
    m = engine.metrics()
    assert m.prefix_cache_hits_total >= 8 and m.preemptions_total >= 1
    assert all(r.choices[0].finish_reason in ("length", "stop") for r in results)
    assert results[3].prompt_logprobs is not None


def test_replay_reproduces_rows_and_blocks(recorded, model):
    engine, leader, messages, head, _ = recorded
    follower, f = _follower(model)
    follower_head = []
    hook = _head_calls(model, follower_head)
    try:
        alive = [follower.replay(m) for m in messages]
    finally:
        hook.remove()
    assert alive == [True] * (len(messages) - 1) + [False]  # the last message is STOP
    # The same head calls (collectives under TP) in the same order, and the same state.
    assert follower_head == head
    for name in ("k", "v"):
        for mine, theirs in zip(getattr(f.cache, name), getattr(engine.cache, name)):
            assert torch.equal(mine, theirs)
        for mine, theirs in zip(getattr(f.store, name), getattr(engine.store, name)):
            assert torch.equal(mine, theirs)
    assert engine.cache.k[0].abs().sum() > 0 and engine.store.k[0].abs().sum() > 0


def test_the_copies_matter(recorded, model):
    """Dropping the plans' copies (only the forwards replayed) leaves different blocks and rows:
    the equality above is not one the forwards alone would give."""
    engine, _, messages, _, _ = recorded
    follower, f = _follower(model)
    for m in messages:
        forwards = [x for code, a in _ops(m) if code in (PREFILL, DECODE, STOP) for x in (code, *a)]
        follower.replay(forwards)
    same_store = all(torch.equal(a, b) for a, b in zip(f.store.k, engine.store.k))
    same_rows = all(torch.equal(a, b) for a, b in zip(f.cache.k, engine.cache.k))
    assert not (same_store and same_rows)


def test_one_message_per_forward_carries_every_copy(recorded):
    """The design's claim: copies ride with the next forward, so messages = forwards + STOP."""
    _, leader, messages, _, _ = recorded
    forwards = sum(1 for m in messages for code, _ in _ops(m) if code in (PREFILL, DECODE))
    copies = sum(1 for m in messages for code, _ in _ops(m) if code in (LOAD, SAVE, COPY))
    assert leader.messages == len(messages) == forwards + 1
    assert leader.copies == copies > 0


def test_stop_is_sent_once_and_heartbeats_replay_as_nothing(model):
    messages = []
    leader = Leader(messages.append)
    leader.heartbeat()
    leader.stop()
    leader.stop()
    assert messages == [[6], [STOP]]
    follower, _ = _follower(model)
    assert follower.replay(messages[0]) and not follower.replay(messages[1])


def test_corrupt_plans_are_refused_with_a_reason(model):
    follower, _ = _follower(model)
    with pytest.raises(ValueError, match="unknown op code 99"):
        follower.replay([99])
    with pytest.raises(ValueError, match="truncated"):
        follower.replay([PREFILL, 0, 0, 5, 1, 0, 1, 2])


def test_engine_refuses_what_tp_serving_cannot_do(model):
    with pytest.raises(ValueError, match="--compile"):
        Engine(model, **SIZES, compile=True, mirror=Leader(lambda m: None))


def test_a_failed_step_aborts_without_telling_the_followers_to_stop(model, monkeypatch):
    """The followers may be inside the failed forward's collectives: no further message (not even
    STOP) may follow, the requests end with an error, and new ones are refused."""

    class Recorder(Leader):
        aborts = 0

        def abort(self):  # the real one SIGINTs this process to stop the server
            self.aborted = True
            Recorder.aborts += 1

    messages = []
    leader = Recorder(messages.append)
    engine = Engine(model, **SIZES, mirror=leader)

    def broken(*args, **kwargs):
        raise RuntimeError("a collective failed")

    monkeypatch.setattr(engine.model, "hidden", broken)
    engine.start()
    running = engine.submit(Request(prompt=[1, 2, 3], max_tokens=4))
    result = running.result(timeout=60)
    engine._thread.join(60)
    assert not engine.running and Recorder.aborts == 1
    assert result.choices[0].finish_reason == "error"
    with pytest.raises(RuntimeError, match="stopped"):
        engine.submit(Request(prompt=[1, 2], max_tokens=1))
    sent = len(messages)
    engine.stop()
    assert len(messages) == sent == 1  # the failed prefill's plan, and no STOP after it
