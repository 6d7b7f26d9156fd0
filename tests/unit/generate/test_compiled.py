"""The fixed-shape decode step, eager and under torch.compile, against the eager loop."""

import pytest
import torch

from herd.generate import GREEDY, KVCache, decode_step, generate, pad_prompts, prefill
from herd.generate.compiled import CompiledDecoder, static_decode_step
from herd.model import ModelArgs, build_model

RAGGED = [[5, 17, 3, 99, 42], [7, 1, 250, 33, 8, 19, 64, 2, 11], [200, 9]]


@pytest.mark.parametrize("prompts", [[RAGGED[1]], RAGGED], ids=["batch1", "ragged3"])
def test_static_step_equals_eager_step(model, prompts):
    # The static step attends over all 64 slots with a mask instead of the reached prefix; batch 1
    # is the case where eager skips the mask entirely.
    caches = [KVCache(model.args, batch_size=len(prompts), max_seq_len=64) for _ in range(2)]
    tokens, lengths = pad_prompts(prompts, device="cpu")
    for cache in caches:
        prefill(model, tokens, cache)
    fed = torch.tensor([p[0] for p in prompts])
    with torch.inference_mode():
        for j in range(4):
            eager = decode_step(model, fed, lengths + j, caches[0])
            static = static_decode_step(model, fed, lengths + j, caches[1])
            torch.testing.assert_close(static, eager, rtol=0, atol=1e-5)
            fed = eager.argmax(-1)


def test_kv_len_needs_a_cache(model):
    with pytest.raises(ValueError, match="needs cache"):
        model.hidden(torch.tensor([[1, 2]]), kv_len=8)


def test_compiled_decoding_equals_eager():
    # One graph (inductor, fullgraph: no breaks, hence no host syncs inside the step). One layer
    # keeps the C++ that inductor generates, and so the compile time, small.
    model = build_model(ModelArgs.from_name("debug").replace(n_layers=1), seed=0).eval()
    eager = generate(model, RAGGED, max_new_tokens=12, sampling=GREEDY)
    cache = KVCache(model.args, batch_size=len(RAGGED), max_seq_len=32)
    compiled = generate(model, RAGGED, max_new_tokens=12, sampling=GREEDY, cache=cache, compile=True)
    assert [r.tokens for r in compiled] == [r.tokens for r in eager]
    assert [r.finish_reason for r in compiled] == [r.finish_reason for r in eager]


def test_compiled_decoder_logits_match(model):
    cache, ref_cache = (KVCache(model.args, batch_size=2, max_seq_len=32) for _ in range(2))
    tokens, lengths = pad_prompts(RAGGED[:2], device="cpu")
    with torch.inference_mode():
        prefill(model, tokens, cache)
        prefill(model, tokens, ref_cache)
        step = CompiledDecoder(model, cache, backend="aot_eager")
        got = step(torch.tensor([3, 4]), lengths)
        want = decode_step(model, torch.tensor([3, 4]), lengths, ref_cache)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
