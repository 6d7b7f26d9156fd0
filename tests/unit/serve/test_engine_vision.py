"""The serving engine with Llama 3.2 Vision: mixed batches of image and text-only requests decode
exactly as each request alone does through `generate_with_images` (or the text model alone), and
the prefix cache never hands one image's keys/values to another image's request."""

from __future__ import annotations

import pytest
import torch

from herd.generate import GREEDY, generate
from herd.generate.vision import _TextOnly, generate_with_images
from herd.model.args import ModelArgs
from herd.model.vision_preprocess import preprocess_images
from herd.serve.engine import Engine, Request
from herd.serve.vision import VisionEngine, prepare_images
from tests.helpers import tiny_vision_model

Image = pytest.importorskip("PIL.Image")

VOCAB = 256
IMG = VOCAB  # <|image|>: the first id past the text vocabulary
TILE, TILES = 28, 2


@pytest.fixture(scope="module")
def model():
    m = tiny_vision_model(seed=3, vocab_size=VOCAB, n_layers=3, n_cross_layers=2, context=96)
    with torch.no_grad():
        m.text_model.output.weight.mul_(4.0)  # a sharper head: no near-ties between the paths compared
    return m


def _picture(seed: int, h: int, w: int):
    gen = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(h, w, 3, generator=gen) * 255).to(torch.uint8).numpy())


def _alone(model, prompt, images, max_tokens):
    """The reference: this request alone, through the library's generation with images (or without)."""
    kw = dict(max_new_tokens=max_tokens, sampling=GREEDY, logprobs=True)
    if images:
        batch = preprocess_images([images], tile_size=TILE, max_tiles=TILES)
        return generate_with_images(model, [prompt], batch, image_token=IMG, **kw)[0]
    return generate(_TextOnly(model), [prompt], **kw)[0]


def _request(prompt, images, max_tokens, **kw):
    prepared = prepare_images(images, tile_size=TILE, max_tiles=TILES) if images else None
    return Request(prompt, max_tokens, GREEDY, logprobs=True, images=prepared, **kw)


def _run(engine, requests):
    handles = [engine.submit(r) for r in requests]
    engine.run_until_idle()
    return [h.result() for h in handles]


def test_a_mixed_batch_decodes_each_row_as_the_request_alone(model):
    """One image (2 tiles), two images (1 and 2 tiles), text only, and text before a late image,
    decoded together (rows with different image counts padded in one decode batch)."""
    cases = [
        ([1, IMG, 5, 6, 7], [_picture(0, 40, 20)]),
        ([1, IMG, IMG, 9, 8, 7, 6], [_picture(1, 20, 20), _picture(2, 20, 50)]),
        ([1, 4, 4, 2, 9, 3], []),
        ([1, 2, 3, 4, 5, 6, 7, 8, IMG, 11, 12], [_picture(3, 30, 30)]),
    ]
    engine = VisionEngine(model, max_batch=4, max_seq_len=64, prefill_budget=6, block_size=4)
    results = _run(engine, [_request(p, im, 10) for p, im in cases])
    for (prompt, images), got in zip(cases, results):
        want = _alone(model, prompt, images, 10)
        assert got.choices[0].tokens == want.tokens
        assert torch.allclose(torch.tensor(got.choices[0].logprobs), torch.tensor(want.logprobs), atol=1e-4)
    # The images matter: the same text with another picture (or none) takes another path.
    assert _alone(model, cases[0][0], [_picture(9, 40, 20)], 10).tokens != results[0].choices[0].tokens
    assert _alone(model, cases[0][0][:1] + cases[0][0][2:], [], 10).tokens != results[0].choices[0].tokens


def test_n_choices_share_the_images_and_sampling_runs(model):
    prompt, images = [1, IMG, 5, 6], [_picture(4, 28, 28)]
    engine = VisionEngine(model, max_batch=3, max_seq_len=64, block_size=4)
    [got] = _run(engine, [Request(prompt, 6, GREEDY, n=2, images=prepare_images(images, tile_size=TILE,
                                                                                   max_tiles=TILES))])
    want = _alone(model, prompt, images, 6).tokens
    assert [c.tokens for c in got.choices] == [want, want]


def test_prefix_cache_hits_only_with_the_same_images(model):
    prompt = [1, 2, IMG, *range(10, 30)]  # 23 tokens: five full blocks of 4 before the last token
    first, second = [_picture(5, 30, 40)], [_picture(6, 30, 40)]
    engine = VisionEngine(model, max_batch=2, max_seq_len=64, block_size=4)
    [a] = _run(engine, [_request(prompt, first, 5)])
    hits = engine.metrics().prefix_cache_hits_total
    [b] = _run(engine, [_request(prompt, second, 5)])  # same tokens, another image: no block reused
    assert engine.metrics().prefix_cache_hits_total == hits
    assert b.choices[0].tokens == _alone(model, prompt, second, 5).tokens
    [c] = _run(engine, [_request(prompt, first, 5)])  # the first image again: its blocks come back
    assert engine.metrics().prefix_cache_hits_total == hits + 20
    assert c.choices[0].tokens == a.choices[0].tokens == _alone(model, prompt, first, 5).tokens
    assert torch.allclose(torch.tensor(c.choices[0].logprobs), torch.tensor(a.choices[0].logprobs), atol=1e-5)
    [d] = _run(engine, [_request(prompt[:2] + [3] + prompt[3:], None, 5)])  # text-only: its own chain
    assert d.choices[0].tokens == _alone(model, prompt[:2] + [3] + prompt[3:], [], 5).tokens


def test_requests_the_engine_refuses(model):
    engine = VisionEngine(model, max_batch=2, max_seq_len=64, max_images=1)
    pic = _picture(7, 20, 20)
    with pytest.raises(ValueError, match="2 <|image|> tokens .* 1 images"):
        engine.submit(_request([1, IMG, IMG, 3], [pic], 2))
    with pytest.raises(ValueError, match="at most 1 per request"):
        engine.submit(_request([1, IMG, IMG, 3], [pic, pic], 2))
    with pytest.raises(ValueError, match="1 <|image|> tokens .* 0 images"):
        engine.submit(Request([1, IMG, 3], 2))
    with pytest.raises(ValueError, match="token ids must be integers in 0..255"):
        engine.submit(Request([1, IMG + 1, 3], 2))
    wrong = prepare_images([pic], tile_size=14, max_tiles=TILES)
    with pytest.raises(ValueError, match="tiled as"):
        engine.submit(Request([1, IMG, 3], 2, images=wrong))
    with pytest.raises(ValueError, match="does not support compile"):
        VisionEngine(model, compile=True)


def test_a_text_engine_refuses_images():
    from herd.model import build_model

    text = build_model(ModelArgs.from_name("debug"), seed=0)
    engine = Engine(text, max_batch=1)
    images = prepare_images([_picture(8, 20, 20)], tile_size=TILE, max_tiles=TILES)
    with pytest.raises(ValueError, match="this model has no vision encoder"):
        engine.submit(Request([1, 2, 3], 2, images=images))


def test_the_encoder_runs_once_per_request(model, monkeypatch):
    """The cross-attention keys/values are computed at admission and reused by every chunk and step."""
    calls = []
    encode = model.encode_images
    monkeypatch.setattr(model, "encode_images", lambda *a, **k: calls.append(1) or encode(*a, **k))
    engine = VisionEngine(model, max_batch=2, max_seq_len=64, prefill_budget=3, block_size=4)
    prompt = [1, 2, IMG, 4, 5, 6, 7, 8]
    results = _run(engine, [_request(prompt, [_picture(10, 20, 30)], 8), _request([1, 2, 3], None, 8),
                            _request(prompt, [_picture(11, 30, 20)], 8, n=2)])
    assert len(calls) == 2  # two image requests (one with two choices), three prefill chunks each, 8 steps
    assert all(len(c.tokens) == 8 for r in results for c in r.choices)
