"""Greedy generation with images (herd.generate.vision) against transformers' generate, token for token."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
Image = pytest.importorskip("PIL.Image")

from herd.generate.sampling import SamplingParams  # noqa: E402
from herd.generate.vision import generate_with_images  # noqa: E402
from herd.model.vision_preprocess import cross_attention_mask, preprocess_images  # noqa: E402
from tests.parity.test_mllama_parity import IMG, hf_twin, randomized, tiny_args  # noqa: E402


def pictures(seed: int, sizes):
    gen = torch.Generator().manual_seed(seed)
    return [Image.fromarray((torch.rand(h, w, 3, generator=gen) * 255).to(torch.uint8).numpy()) for h, w in sizes]


def test_greedy_with_images_equals_transformers_generate():
    model = randomized(tiny_args(), seed=21)
    hf = hf_twin(model)
    prompts = [[IMG, 101, 102, 103], [IMG, 111, IMG, 112, 113, 114, 115]]  # ragged, one and two images
    per_row = [pictures(1, [(30, 60)]), pictures(2, [(60, 20), (28, 28)])]
    batch = preprocess_images(per_row, tile_size=28, max_tiles=2)
    results = generate_with_images(model, prompts, batch, max_new_tokens=6, sampling=SamplingParams(temperature=0))
    for b, (prompt, imgs) in enumerate(zip(prompts, per_row)):
        one = preprocess_images([imgs], tile_size=28, max_tiles=2)
        ids = torch.tensor([prompt])
        xmask = cross_attention_mask([prompt], one.num_tiles, image_token=IMG, max_tiles=2)
        with torch.no_grad():
            out = hf.generate(input_ids=ids, pixel_values=one.pixel_values, aspect_ratio_ids=one.aspect_ratio_ids,
                              aspect_ratio_mask=one.aspect_ratio_mask, cross_attention_mask=xmask,
                              max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert results[b].tokens == out[0, len(prompt):].tolist()


def test_prompt_and_image_count_must_agree():
    model = randomized(tiny_args(), seed=22)
    batch = preprocess_images([pictures(3, [(28, 28)])], tile_size=28, max_tiles=2)
    with pytest.raises(ValueError, match="1 images"):
        generate_with_images(model, [[IMG, 5, IMG, 6]], batch, max_new_tokens=2)
    with pytest.raises(ValueError, match="2 prompts but images for 1"):
        generate_with_images(model, [[IMG, 5], [IMG, 6]], batch, max_new_tokens=2)
