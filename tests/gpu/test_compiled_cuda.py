"""Compiled decoding on CUDA (CUDA graphs through torch.compile's "reduce-overhead") equals eager."""

import pytest
import torch

from herd.generate import GREEDY, KVCache, generate
from herd.model import ModelArgs, build_model
from herd.serve import Engine, Request

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

RAGGED = [[5, 17, 3, 99, 42], [7, 1, 250, 33, 8, 19, 64, 2, 11], [200, 9]]


@pytest.fixture(scope="module")
def model():
    m = build_model(ModelArgs.from_name("debug"), seed=0, device="cuda")
    with torch.no_grad():  # sharper distributions: greedy comparisons do not hinge on near-ties
        m.tok_embeddings.weight.mul_(0.1)
        for layer in m.layers.values():
            for w in (layer.attention.wq, layer.attention.wk, layer.attention.wo, layer.feed_forward.w2):
                w.weight.mul_(4.0)
        m.output.weight.mul_(3.0)
    return m.eval()


def test_compiled_generate_equals_eager_on_cuda(model):
    eager = generate(model, RAGGED, max_new_tokens=24, sampling=GREEDY)
    cache = KVCache(model.args, batch_size=len(RAGGED), max_seq_len=64, device="cuda")
    for _ in range(2):  # the second call replays the recorded graph
        compiled = generate(model, RAGGED, max_new_tokens=24, sampling=GREEDY, cache=cache, compile=True)
        assert [r.tokens for r in compiled] == [r.tokens for r in eager]


def test_compiled_engine_equals_eager_on_cuda(model):
    prompts = [[i + 1] * (3 + i) for i in range(6)]
    results = {}
    for compile in (False, True):
        engine = Engine(model, max_batch=4, max_queue=8, max_seq_len=64, compile=compile)
        handles = [engine.submit(Request(p, 12)) for p in prompts[:3]]
        for _ in range(4):
            engine.step()
        handles += [engine.submit(Request(p, 12)) for p in prompts[3:]]  # join mid-flight
        engine.run_until_idle()
        results[compile] = [h.result(0).choices[0].tokens for h in handles]
    assert results[True] == results[False]
    for p, got in zip(prompts, results[True]):
        assert got == generate(model, [p], max_new_tokens=12, sampling=GREEDY)[0].tokens
