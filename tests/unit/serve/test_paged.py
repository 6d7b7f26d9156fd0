"""Paged KV blocks: the pool's invariants, and the engine's prefix cache, chunked prefill and
pausing checked against `herd.generate.generate` per request alone."""

import random
from collections import Counter

import pytest
import torch

from herd.generate import GREEDY, generate
from herd.serve import Engine, Request
from herd.serve.pages import BlockPool, block_hashes


def _alone(model, prompt, max_tokens, **kw):
    return generate(model, [prompt], max_new_tokens=max_tokens, sampling=GREEDY, **kw)[0]


def _tokens(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n,), generator=g).tolist()


# ---- the pool on its own ----------------------------------------------------------------------


def test_block_names_chain_over_the_whole_prefix():
    a, b = _tokens(40, 0), _tokens(40, 1)
    names = block_hashes(a, 16)
    assert len(names) == 2 and len(set(names)) == 2  # only full blocks are named
    assert block_hashes(a[:32] + b[32:], 16) == names  # the partial tail does not count
    assert block_hashes(b[:16] + a[16:], 16)[1] != names[1]  # same block, other parent: another name
    assert block_hashes(a[16:], 16, start=0, parent=names[0]) == names[1:]  # resumable from a parent


def test_pool_invariants_under_random_use():
    rng = random.Random(0)
    pool = BlockPool(12, 4)
    tables: list[list[int]] = []
    for step in range(2000):
        op = rng.random()
        if op < 0.4:  # a sequence arrives: share what is cached, allocate the rest
            names = block_hashes([rng.randrange(3) for _ in range(4 * rng.randint(1, 4))], 4)
            hits = pool.match(names)
            need = len(names) - len(hits)
            if pool.available_with(hits) >= need:
                before = {b: pool.refs[b] for b in hits}
                pool.acquire(hits)
                table = hits + pool.allocate(need)
                assert all(pool.refs[b] == before[b] + 1 for b in hits)
                assert len(set(table)) == len(table)
                for block, name in zip(table, names):
                    pool.name(block, name)
                tables.append(table)
        elif tables:
            pool.release(tables.pop(rng.randrange(len(tables))))
        pool.check()
        held = sum(len(t) for t in tables)
        assert sum(pool.refs) == held and pool.num_free >= pool.num_blocks - held
    for t in tables:
        pool.release(t)
    pool.check()
    assert pool.num_free == pool.num_blocks and pool.evictions > 0


def test_eviction_takes_empty_blocks_first_then_the_least_recently_used():
    pool = BlockPool(4, 2)
    names = [bytes([i]) * 32 for i in range(3)]
    a, b, c = (pool.allocate(1) for _ in range(3))
    for blocks, name in zip((a, b, c), names):
        pool.name(blocks[0], name)
    pool.release(b)
    pool.release(a)
    pool.release(c)  # LRU order now: b, a, c (one empty block left)
    d = pool.allocate(1)
    assert d not in (a, b, c) and pool.evictions == 0  # the never-named block goes first
    assert pool.match(names[:1]) == a
    pool.acquire(a)  # a hit: a leaves the LRU list and cannot be evicted
    assert pool.allocate(1) == b and pool.match(names[1:2]) == []  # b was the oldest
    assert pool.allocate(1) == c and pool.evictions == 2
    assert pool.num_free == 0 and pool.refs[a[0]] == 1
    pool.check()
    with pytest.raises(AssertionError):
        pool.allocate(1)
    pool.release(a)
    with pytest.raises(AssertionError, match="released more often"):
        pool.release(a)


# ---- the engine ----------------------------------------------------------------------------


def test_a_shared_system_prompt_prefills_only_the_tail_with_the_same_logits(model):
    system = _tokens(48, 2)  # three blocks of 16
    first, second = system + _tokens(7, 3), system + _tokens(5, 4)
    warm = Engine(model, max_batch=2, max_seq_len=96, block_size=16)
    cold = Engine(model, max_batch=2, max_seq_len=96, block_size=16, prefix_caching=False)
    for engine in (warm, cold):
        engine.submit(Request(first, 30))
        engine.step()  # the first prompt is in (its full blocks named) and it keeps row 0 while...
    before = warm.metrics().prefill_tokens_total
    hit = warm.submit(Request(second, 8, logprobs=True, top_logprobs=5))  # ...this one reads them in row 1
    miss = cold.submit(Request(second, 8, logprobs=True, top_logprobs=5))
    warm.step()
    assert [s.slot for s in warm._slots if s is not None] == [0, 1]
    warm.run_until_idle()
    cold.run_until_idle()
    m = warm.metrics()
    assert m.prefill_tokens_total - before == 5  # the 48 shared tokens came from the cache
    assert cold.metrics().prefill_tokens_total == len(first) + len(second)
    assert m.prefix_cache_queries_total == len(first) + len(second) and m.prefix_cache_hits_total == 48
    got, want = hit.result(0).choices[0], miss.result(0).choices[0]
    assert got.tokens == want.tokens == _alone(model, second, 8).tokens
    torch.testing.assert_close(got.logprobs, want.logprobs, rtol=0, atol=1e-5)
    for a, b in zip(got.top_logprobs, want.top_logprobs):
        assert [t for t, _ in a] == [t for t, _ in b]
        torch.testing.assert_close([lp for _, lp in a], [lp for _, lp in b], rtol=0, atol=1e-5)


def test_the_next_chat_turn_reuses_the_generated_reply(model):
    engine = Engine(model, max_batch=1, max_seq_len=128, block_size=8)
    turn1 = _tokens(21, 5)
    reply = engine.submit(Request(turn1, 20))
    engine.run_until_idle()
    history = turn1 + reply.result(0).choices[0].tokens + _tokens(6, 6)
    before = engine.metrics()
    turn2 = engine.submit(Request(history, 10))
    engine.run_until_idle()
    after = engine.metrics()
    # The reply's last token was never fed back, so the cache holds positions 0..39 at most: 5 blocks.
    assert after.prefix_cache_hits_total - before.prefix_cache_hits_total == 40
    assert after.prefill_tokens_total - before.prefill_tokens_total == len(history) - 40
    assert turn2.result(0).choices[0].tokens == _alone(model, history, 10).tokens


def test_chunked_prefill_spreads_a_long_prompt_while_others_keep_decoding(model):
    engine = Engine(model, max_batch=2, max_seq_len=160, prefill_budget=16, block_size=16)
    short = engine.submit(Request(_tokens(5, 7), 30))
    engine.step()
    long_prompt = _tokens(100, 8)
    events = []
    long = engine.submit(Request(long_prompt, 5), on_event=events.append)
    counts = []
    for _ in range(7):  # ceil(100 / 16) steps of prefill
        before = engine.metrics().generation_tokens_total
        engine.step()
        counts.append(engine.metrics().generation_tokens_total - before)
    # The short request got a token in every step; the long one its first token in the 7th.
    assert counts == [1] * 6 + [3]  # 7th step: the long prompt's first token, then both decode
    m = engine.metrics()
    assert m.prefills_total == 1 + 7 and m.prefill_tokens_total == 5 + 100
    engine.run_until_idle()
    assert long.result(0).choices[0].tokens == _alone(model, long_prompt, 5).tokens
    assert short.result(0).choices[0].tokens == _alone(model, _tokens(5, 7), 30).tokens


def test_a_tiny_pool_pauses_the_youngest_and_every_answer_stays_exact(model):
    # 12 blocks of 4 = one 48-token context for 4 slots: sequences must give blocks back and wait.
    engine = Engine(model, max_batch=4, max_queue=16, max_seq_len=48, block_size=4, num_blocks=12, prefill_budget=8)
    system = _tokens(8, 9)
    prompts = [system + _tokens(1 + i % 5, 10 + i) for i in range(8)]
    handles = [engine.submit(Request(p, 20 + i, stop_tokens=(7,))) for i, p in enumerate(prompts)]
    for _ in range(2000):
        busy = engine.step()
        engine.pool.check()
        tables = Counter(b for s in engine._slots if s is not None for b in s.blocks)
        assert all(engine.pool.refs[b] == tables[b] for b in range(12))  # refcount = tables holding it
        if not busy:
            break
    m = engine.metrics()
    assert m.preemptions_total > 0 and m.prefix_cache_evictions_total > 0 and m.prefix_cache_hits_total > 0
    for i, (p, h) in enumerate(zip(prompts, handles)):
        assert h.result(0).choices[0].tokens == _alone(model, p, 20 + i, stop_tokens=(7,)).tokens
    assert m.kv_blocks_free == 12 and sum(engine.pool.refs) == 0


def test_out_of_blocks_pauses_the_youngest_which_resumes_without_recomputing(model):
    # 4 blocks of 4 = one 16-token context; two 4-token prompts fill all 4 blocks by position 7.
    engine = Engine(model, max_batch=2, max_seq_len=16, block_size=4, num_blocks=4)
    pa, pb = _tokens(4, 15), _tokens(4, 16)
    a, b = engine.submit(Request(pa, 8)), engine.submit(Request(pb, 8))
    for _ in range(4):
        engine.step()
    assert engine.metrics().kv_blocks_free == 0 and engine.metrics().preemptions_total == 0
    seq_a, seq_b = engine._slots
    engine.step()  # a (older) needs a third block: b, the youngest, gives its two back and pauses
    assert seq_b.state == "paused" and seq_b.blocks == [] and seq_a.state == "decode" and len(seq_a.blocks) == 3
    assert engine.metrics().preemptions_total == 1
    frozen = len(seq_b.generated)
    prefilled = engine.metrics().prefill_tokens_total
    while not a.done():
        engine.step()
        assert len(seq_b.generated) == frozen  # b makes no progress while a holds the blocks...
    engine.run_until_idle()
    assert engine.metrics().prefill_tokens_total == prefilled  # ...and resumes from its row, recomputing nothing
    assert a.result(0).choices[0].tokens == _alone(model, pa, 8).tokens
    assert b.result(0).choices[0].tokens == _alone(model, pb, 8).tokens
    engine.pool.check()


def test_a_request_waits_until_its_blocks_are_free(model):
    engine = Engine(model, max_batch=2, max_seq_len=32, block_size=4, num_blocks=8)
    a = engine.submit(Request(_tokens(20, 11), 4))  # 5 blocks for its prompt
    b = engine.submit(Request(_tokens(16, 12), 4))  # 4 more: only 3 left while a runs
    engine.step()
    m = engine.metrics()
    assert m.requests_running == 1 and m.requests_waiting == 1 and m.kv_blocks_free == 2  # 5 + 1 for its first new token
    engine.run_until_idle()
    assert a.result(0).choices[0].tokens == _alone(model, _tokens(20, 11), 4).tokens
    assert b.result(0).choices[0].tokens == _alone(model, _tokens(16, 12), 4).tokens
    with pytest.raises(ValueError, match="KV blocks"):
        engine.submit(Request(_tokens(30, 13), 1, n=2))  # 8 + 1 blocks can never fit in 8
    with pytest.raises(ValueError, match="num_blocks must be"):
        Engine(model, max_seq_len=32, block_size=4, num_blocks=7)


def test_choices_share_the_prompt_blocks_and_own_their_tails(model):
    prompt = _tokens(37, 14)  # two full blocks of 16 and a partial one
    engine = Engine(model, max_batch=3, max_seq_len=96, block_size=16)
    h = engine.submit(Request(prompt, 12, n=3, logprobs=True))
    engine.step()
    seqs = [s for s in engine._slots if s is not None]
    assert len(seqs) == 3
    shared = seqs[0].blocks[:2]
    assert all(s.blocks[:2] == shared for s in seqs) and all(engine.pool.refs[b] == 3 for b in shared)
    tails = [s.blocks[2] for s in seqs]
    assert len(set(tails)) == 3 and all(engine.pool.refs[b] == 1 for b in tails)
    engine.run_until_idle()
    want = _alone(model, prompt, 12, logprobs=True)
    for c in h.result(0).choices:
        assert c.tokens == want.tokens
        torch.testing.assert_close(c.logprobs, want.logprobs, rtol=0, atol=1e-4)
    assert sum(engine.pool.refs) == 0


@pytest.mark.slow  # loads SmolLM2-135M (and may build the CPU kernels on first use)
def test_the_real_model_through_hits_and_the_fused_decode_equals_generate(smollm2_gguf):
    from herd.generate.loading import load_for_inference
    from herd.tokenizer import Message

    lm = load_for_inference(smollm2_gguf)  # as herd serve loads it: CPU kernels and the fused decode block
    system = Message(role="system", content="You are a geography tutor. Answer in one short sentence. " * 4)
    prompts = [lm.chat.encode_dialog_prompt([system, Message(role="user", content=q)]).tokens
               for q in ("What is the capital of France?", "What is the capital of Peru?")]
    engine = Engine(lm.model, max_batch=2, max_seq_len=256, block_size=16, prefill_budget=32)
    handles = [engine.submit(Request(p, 12, stop_tokens=lm.stop_tokens)) for p in prompts]
    engine.run_until_idle()
    again = engine.submit(Request(prompts[1], 12, stop_tokens=lm.stop_tokens))
    engine.run_until_idle()
    m = engine.metrics()
    # The second request waits while the first prefills the system prompt's blocks, then takes
    # them as hits; the repeat hits on all its whole blocks but the one holding its last token.
    names = [block_hashes(p[: len(p) - 1], 16) for p in prompts]
    shared = next(i for i, (a, b) in enumerate(zip(*names)) if a != b)
    assert shared > 0 and m.prefix_cache_hits_total == shared * 16 + (len(prompts[1]) - 1) // 16 * 16
    for p, h in zip(prompts + prompts[1:], handles + [again]):
        assert h.result(0).choices[0].tokens == _alone(lm.model, p, 12, stop_tokens=lm.stop_tokens).tokens
