"""Batched prefill: several prompts' chunks in one forward give what each prompt gives alone, checked
against a forward without any cache (prompt logprobs) and `herd.generate.generate` per prompt
(greedy tokens and their logprobs), with ragged lengths, chunking and prefix hits."""

import random

import pytest
import torch

from herd.generate import GREEDY, KVCache, generate
from herd.serve import Engine, Request
from herd.serve.prefill import Chunk, RowsCache, group_chunks


def _tokens(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n,), generator=g).tolist()


def _alone(model, prompt, max_tokens):
    return generate(model, [prompt], max_new_tokens=max_tokens, sampling=GREEDY)[0].tokens


class _Forwards:
    """Counts the model's forwards (one embedding lookup each)."""

    def __init__(self, model):
        self.n = 0
        self._hook = model.tok_embeddings.register_forward_hook(self._count)

    def _count(self, *_):
        self.n += 1

    def close(self):
        self._hook.remove()


class _Seq:  # just what group_chunks and RowsCache read
    def __init__(self, slot):
        self.slot = slot


def test_groups_cover_every_chunk_and_bound_the_padding():
    rng = random.Random(0)
    for _ in range(200):
        lengths = [rng.choice([1, 2, 5, 16, 17, 40, 100]) for _ in range(rng.randint(1, 12))]
        chunks = [Chunk(_Seq(i), 0, [0] * n) for i, n in enumerate(lengths)]
        groups = group_chunks(chunks, max_padding=1.5)
        assert sorted(id(c) for g in groups for c in g) == sorted(id(c) for c in chunks)
        for g in groups:
            real = sum(len(c.tokens) for c in g)
            assert len(g) * max(len(c.tokens) for c in g) <= 1.5 * real or len(g) == 1
            assert [c.seq.slot for c in g] == sorted(c.seq.slot for c in g)
    same = [Chunk(_Seq(i), 0, [0] * 49) for i in range(16)]
    assert len(group_chunks(same)) == 1  # 16 prompts of one length: one forward
    assert len(group_chunks([Chunk(_Seq(0), 0, [0] * 100)] + same[:3])) == 2  # the long one alone


def test_rows_cache_writes_only_the_real_tokens_of_each_row(model):
    cache = KVCache(model.args, batch_size=4, max_seq_len=32)
    for t in (*cache.k, *cache.v):
        t.fill_(7.0)
    slots, lengths, starts = [3, 1], [2, 4], [5, 0]
    pos = torch.tensor([[5, 6, 6, 6], [0, 1, 2, 3]])
    rows = RowsCache(cache, slots, pos, lengths, kv_len=7)
    K, D = model.args.n_kv_heads, model.args.head_dim
    k = torch.arange(2 * K * 4 * D, dtype=torch.float32).view(2, K, 4, D)
    kc, vc = rows.update(0, k, -k, pos)
    assert kc.shape == (2, K, 7, D)
    for b, (slot, n, a) in enumerate(zip(slots, lengths, starts)):
        torch.testing.assert_close(cache.k[0][slot, :, a : a + n], k[b, :, :n])
        torch.testing.assert_close(cache.v[0][slot, :, a : a + n], -k[b, :, :n])
        untouched = torch.ones(32, dtype=torch.bool)
        untouched[a : a + n] = False
        assert (cache.k[0][slot][:, untouched] == 7.0).all()  # padding wrote nothing
        torch.testing.assert_close(kc[b], cache.k[0][slot, :, :7])
    assert (cache.k[0][[0, 2]] == 7.0).all()  # other rows untouched


def test_ragged_prompts_prefilled_together_equal_each_alone(model):
    prompts = [_tokens(n, 10 + n) for n in (9, 14, 11, 12)]
    engine = Engine(model, max_batch=4, max_seq_len=64, block_size=8)
    handles = [engine.submit(Request(p, 6, logprobs=True, prompt_logprobs=0)) for p in prompts]
    forwards = _Forwards(model)
    engine.step()  # admits all four: one batched prefill forward, then one decode forward
    forwards.close()
    assert forwards.n == 2
    assert engine.metrics().prefills_total == 4
    engine.run_until_idle()
    for p, h in zip(prompts, handles):
        res = h.result(0)
        with torch.no_grad():  # the reference: the whole prompt at once, no cache
            lsm = torch.log_softmax(model(torch.tensor([p])).float()[0], dim=-1)  # (S, V)
        want = lsm[:-1].gather(-1, torch.tensor(p[1:]).view(-1, 1)).squeeze(-1)
        got = torch.tensor([lp.logprob for lp in res.prompt_logprobs[1:]])
        assert res.prompt_logprobs[0].logprob is None
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
        choice = res.choices[0]
        assert choice.tokens == _alone(model, p, 6)
        torch.testing.assert_close(choice.logprobs[0], lsm[-1, choice.tokens[0]].item(), rtol=0, atol=1e-4)


def test_batched_prefill_with_prefix_hits_at_different_depths(model):
    system = _tokens(24, 20)  # three blocks of 8
    engine = Engine(model, max_batch=4, max_seq_len=96, block_size=8)
    engine.submit(Request(system + _tokens(3, 21), 4))
    engine.run_until_idle()  # the system prompt's blocks are cached now
    prompts = [system + _tokens(5, 22), system[:16] + _tokens(13, 23), _tokens(10, 24), system + _tokens(12, 25)]
    before = engine.metrics()
    handles = [engine.submit(Request(p, 8, logprobs=True)) for p in prompts]
    forwards = _Forwards(model)
    engine.step()
    forwards.close()
    after = engine.metrics()
    assert forwards.n == 2  # the four chunks (5, 13, 10 and 12 tokens, starting at 24, 16, 0, 24) in one forward
    assert after.prefix_cache_hits_total - before.prefix_cache_hits_total == 24 + 16 + 24
    engine.run_until_idle()
    cold = Engine(model, max_batch=1, max_seq_len=96, block_size=8, prefix_caching=False)
    for p, h in zip(prompts, handles):
        got = h.result(0).choices[0]
        assert got.tokens == _alone(model, p, 8)
        ref = cold.submit(Request(p, 8, logprobs=True))
        cold.run_until_idle()
        torch.testing.assert_close(got.logprobs, ref.result(0).choices[0].logprobs, rtol=0, atol=1e-4)


def test_the_budget_is_shared_by_the_batched_chunks(model):
    prompts = [_tokens(n, 30 + n) for n in (20, 7, 30)]
    engine = Engine(model, max_batch=3, max_seq_len=96, prefill_budget=16, block_size=8)
    handles = [engine.submit(Request(p, 5)) for p in prompts]
    done = []
    while engine.metrics().prefill_tokens_total < 57:
        before = engine.metrics().prefill_tokens_total
        engine.step()
        done.append(engine.metrics().prefill_tokens_total - before)
    assert done == [16, 16, 16, 9]  # oldest first: 16 of the first, then 4 + 7 + 5, then 16 and 9 of the last
    engine.run_until_idle()
    for p, h in zip(prompts, handles):
        assert h.result(0).choices[0].tokens == _alone(model, p, 5)


@pytest.mark.parametrize("n", [2, 3])
def test_choices_fork_after_a_batched_prefill(model, n):
    prompts = [_tokens(13, 40), _tokens(6, 41)]
    engine = Engine(model, max_batch=1 + n, max_seq_len=64, block_size=4)
    h = [engine.submit(Request(prompts[0], 5, n=n)), engine.submit(Request(prompts[1], 5))]
    engine.run_until_idle()
    assert all(c.tokens == _alone(model, prompts[0], 5) for c in h[0].result(0).choices)
    assert h[1].result(0).choices[0].tokens == _alone(model, prompts[1], 5)


def test_a_prefix_being_prefilled_is_waited_for_and_shared_not_recomputed(model):
    system = _tokens(40, 50)  # five blocks of 8, prefilled in chunks of 16 by the first request
    prompts = [system + _tokens(3, 51), system + _tokens(6, 52), system[:16] + _tokens(4, 53)]
    engine = Engine(model, max_batch=3, max_seq_len=96, block_size=8, prefill_budget=16)
    handles = [engine.submit(Request(p, 6)) for p in prompts]
    engine.step()
    # The first prompt prefills its first 16 tokens; the others wait, since their next block is in flight.
    assert engine.metrics().requests_running == 1 and engine.metrics().requests_waiting == 2
    engine.run_until_idle()
    m = engine.metrics()
    assert m.prefix_cache_hits_total == 40 + 16  # the second took all five system blocks, the third two
    assert m.prefill_tokens_total == len(prompts[0]) + 6 + 4
    for p, h in zip(prompts, handles):
        assert h.result(0).choices[0].tokens == _alone(model, p, 6)


def test_a_cancelled_prefill_releases_the_requests_waiting_for_its_blocks(model):
    system = _tokens(40, 60)
    engine = Engine(model, max_batch=2, max_seq_len=96, block_size=8, prefill_budget=8)
    first = engine.submit(Request(system + [1], 4))
    second = engine.submit(Request(system + [2, 3], 4))
    engine.step()
    assert engine.metrics().requests_waiting == 1
    first.cancel()
    engine.run_until_idle()
    assert second.result(0).choices[0].tokens == _alone(model, system + [2, 3], 4)
    assert engine.metrics().prefix_cache_hits_total == 8  # the one block the first had named before it went
