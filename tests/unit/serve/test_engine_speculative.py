"""Speculative decoding in the engine: greedy answers equal `generate` per request whatever the draft,
blocks are named from committed tokens only, sampled requests complete and repeat under a seed."""

from collections import Counter

import pytest
import torch

from herd.generate import GREEDY, SamplingParams, generate
from herd.model import ModelArgs, build_model
from herd.serve import Engine, Request
from herd.serve.metrics import LatencyHistograms, prometheus_text
from herd.serve.pages import block_hashes


def _tokens(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n,), generator=g).tolist()


def _alone(model, prompt, max_tokens, **kw):
    return generate(model, [prompt], max_new_tokens=max_tokens, sampling=GREEDY, **kw)[0]


@pytest.fixture(scope="module")
def noisy(model):
    """The target with a perturbed head: it agrees with the target part of the time."""
    m = build_model(model.args, seed=0)
    m.load_state_dict(model.state_dict())
    with torch.no_grad():
        m.output.weight.add_(torch.randn(m.output.weight.shape, generator=torch.Generator().manual_seed(1)) * 0.3)
    return m.eval()


def _check_blocks(engine):
    """Every named block of a running sequence holds its committed tokens' name and the keys its row
    holds for them (a block saved while a draft's stale key sat in the row would differ by O(1); a
    block another sequence computed for the same prefix, found again on resuming, only by rounding)."""
    bs = engine.block_size
    for s in engine._slots:
        if s is None or not s.names:
            continue
        committed = [*s.handle.request.prompt, *s.generated]
        n = len(s.names)
        assert n * bs <= s.pos and s.names == block_hashes(committed[: n * bs], bs)
        for layer in range(len(engine.cache.k)):
            for i, b in enumerate(s.blocks[:n]):
                row = engine.cache.k[layer][s.slot, :, i * bs : (i + 1) * bs]
                assert float((engine.store.k[layer][b] - row).abs().max()) < 1e-4


@pytest.mark.parametrize("which", ["self", "noisy"])
def test_greedy_answers_equal_generate_with_any_draft(model, noisy, which):
    draft = model if which == "self" else noisy
    prompts = [_tokens(n, 20 + i) for i, n in enumerate([5, 19, 3, 33, 9])]
    budgets = [10, 20, 6, 16, 12]
    engine = Engine(model, max_batch=3, max_queue=8, max_seq_len=96, block_size=8, draft=draft, num_draft=3)
    handles = [engine.submit(Request(p, n, stop_tokens=(7, 200))) for p, n in zip(prompts, budgets)]
    for _ in range(500):
        busy = engine.step()
        _check_blocks(engine)
        if not busy:
            break
    for p, n, h in zip(prompts, budgets, handles):
        got, want = h.result(0).choices[0], _alone(model, p, n, stop_tokens=(7, 200))
        assert got.tokens == want.tokens and got.finish_reason == want.finish_reason
    m = engine.metrics()
    assert m.spec_draft_tokens_total > 0
    if which == "self":
        assert m.spec_accepted_tokens_total == m.spec_draft_tokens_total
        assert m.decode_steps_total < m.generation_tokens_total / 2  # several tokens per target forward
    else:
        assert 0 < m.spec_accepted_tokens_total < m.spec_draft_tokens_total
    assert m.generation_tokens_total == sum(len(h.result(0).choices[0].tokens) for h in handles)
    assert sum(engine.pool.refs) == 0
    text = prometheus_text(m, LatencyHistograms(), {}, {})
    assert f"herd_spec_draft_tokens_total {m.spec_draft_tokens_total}" in text
    assert f"herd_spec_accepted_tokens_total {m.spec_accepted_tokens_total}" in text


def test_rows_with_logprobs_or_processors_decode_plainly_beside_speculating_rows(model, noisy):
    def ban_seven():
        def processor(logits, generated):
            logits[7] = float("-inf")
            return logits
        return processor

    prompts = [_tokens(6, 30), _tokens(11, 31), _tokens(4, 32)]
    requests = [Request(prompts[0], 10, logprobs=True, top_logprobs=2), Request(prompts[1], 10),
                Request(prompts[2], 10, logits_processors=(ban_seven,))]
    results = []
    for draft in (None, noisy):
        engine = Engine(model, max_batch=3, max_seq_len=64, draft=draft)
        handles = [engine.submit(r) for r in requests]
        engine.run_until_idle()
        results.append([h.result(0).choices[0] for h in handles])
    plain, spec = results
    for a, b in zip(plain, spec):
        assert a.tokens == b.tokens
    torch.testing.assert_close(spec[0].logprobs, plain[0].logprobs, rtol=0, atol=1e-4)
    assert spec[1].tokens == _alone(model, prompts[1], 10).tokens
    assert 7 not in spec[2].tokens


def test_a_tiny_pool_pauses_and_prefix_hits_stay_exact(model, noisy):
    # 12 blocks of 4 for 4 slots: sequences give blocks back (lookahead included) and resume.
    engine = Engine(model, max_batch=4, max_queue=16, max_seq_len=48, block_size=4, num_blocks=12, prefill_budget=8,
                    draft=noisy, num_draft=3)
    system = _tokens(8, 9)
    prompts = [system + _tokens(1 + i % 5, 10 + i) for i in range(8)]
    handles = [engine.submit(Request(p, 12 + i, stop_tokens=(7,))) for i, p in enumerate(prompts)]
    for _ in range(2000):
        busy = engine.step()
        engine.pool.check()
        tables = Counter(b for s in engine._slots if s is not None for b in s.blocks)
        assert all(engine.pool.refs[b] == tables[b] for b in range(12))
        _check_blocks(engine)
        if not busy:
            break
    m = engine.metrics()
    assert m.preemptions_total > 0 and m.prefix_cache_hits_total > 0 and m.spec_accepted_tokens_total > 0
    for i, (p, h) in enumerate(zip(prompts, handles)):
        assert h.result(0).choices[0].tokens == _alone(model, p, 12 + i, stop_tokens=(7,)).tokens
    # The next turn of a finished conversation reuses blocks named from its reply, and stays exact.
    history = prompts[0] + handles[0].result(0).choices[0].tokens + _tokens(3, 40)
    turn = engine.submit(Request(history, 6))
    engine.run_until_idle()
    assert turn.result(0).choices[0].tokens == _alone(model, history, 6).tokens


def test_the_end_of_the_context_falls_back_to_plain_steps(model, noisy):
    engine = Engine(model, max_batch=2, max_seq_len=40, block_size=8, draft=noisy, num_draft=4)
    long, short = _tokens(30, 50), _tokens(5, 51)
    handles = [engine.submit(Request(long, 50)), engine.submit(Request(short, 30))]
    engine.run_until_idle()
    assert handles[0].result(0).choices[0].tokens == _alone(model, long, 10).tokens  # 40 - 30 positions
    assert handles[0].result(0).choices[0].finish_reason == "length"
    assert handles[1].result(0).choices[0].tokens == _alone(model, short, 30).tokens


def test_sampled_requests_complete_and_repeat_under_a_seed(model, noisy):
    params = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=5)
    runs = []
    for _ in range(2):
        engine = Engine(model, max_batch=4, max_seq_len=64, draft=noisy, num_draft=3)
        h = engine.submit(Request(_tokens(7, 60), 12, sampling=params, n=3))
        g = engine.submit(Request(_tokens(3, 61), 10))  # a greedy request in the same batch
        engine.run_until_idle()
        runs.append(([c.tokens for c in h.result(0).choices], g.result(0).choices[0].tokens))
        assert all(len(c.tokens) == 12 and c.finish_reason == "length" for c in h.result(0).choices)
        assert engine.metrics().spec_draft_tokens_total > 0
    assert runs[0] == runs[1]
    assert len({tuple(t) for t in runs[0][0]}) > 1  # choices draw from their own generators
    assert runs[0][1] == _alone(model, _tokens(3, 61), 10).tokens


def test_bad_drafts_and_combinations_are_refused(model):
    other = build_model(ModelArgs.from_name("debug").replace(vocab_size=300), seed=0)
    with pytest.raises(ValueError, match="vocabulary"):
        Engine(model, max_seq_len=64, draft=other)
    short = build_model(ModelArgs.from_name("debug").replace(max_seq_len=32), seed=0)
    with pytest.raises(ValueError, match="context"):
        Engine(model, max_seq_len=64, draft=short)
    with pytest.raises(ValueError, match="compile"):
        Engine(model, max_seq_len=64, draft=model, compile=True)
    with pytest.raises(ValueError, match="num_draft"):
        Engine(model, max_seq_len=64, draft=model, num_draft=0)
