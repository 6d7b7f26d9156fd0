"""Llama 3.2 Vision preprocessing equals HF's MllamaImageProcessor and processor masks exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from herd.model import vision_preprocess as vp

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

mllama_ip = pytest.importorskip("transformers.models.mllama.image_processing_mllama")
mllama_proc = pytest.importorskip("transformers.models.mllama.processing_mllama")


def _image(h: int, w: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": None, "LA": 2}[mode]
    shape = (h, w) if channels is None else (h, w, channels)
    return Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8), mode=mode)


def _hf(images, tile: int, max_tiles: int):
    proc = mllama_ip.MllamaImageProcessor(size={"height": tile, "width": tile}, max_image_tiles=max_tiles,
                                          image_mean=list(vp.CLIP_MEAN), image_std=list(vp.CLIP_STD))
    return proc.preprocess(images, return_tensors="pt")


def test_supported_aspect_ratios_are_the_references_in_its_order():
    assert vp.supported_aspect_ratios(4) == tuple(mllama_ip.get_all_supported_aspect_ratios(4))
    assert vp.supported_aspect_ratios(4) == ((1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (3, 1), (4, 1))
    with pytest.raises(ValueError, match="positive"):
        vp.supported_aspect_ratios(0)


@pytest.mark.parametrize("max_tiles", [1, 2, 4, 6])
def test_best_grid_and_fitted_size_equal_the_reference_on_a_sweep(max_tiles):
    tile = 56
    sizes = [(1, 1), (10, 300), (300, 10), (56, 56), (57, 56), (56, 112), (112, 56), (100, 250), (250, 100),
             (560, 560), (33, 70), (224, 1000), (1000, 224), (111, 167), (168, 168), (60, 170)]
    for h, w in sizes:
        want = tuple(int(x) for x in mllama_ip.get_optimal_tiled_canvas(h, w, max_tiles, tile))
        rows, cols = vp.best_grid(h, w, max_tiles=max_tiles, tile_size=tile)
        assert (rows * tile, cols * tile) == want, (h, w)
        assert vp.fitted_size(h, w, *want, tile) == tuple(
            int(x) for x in mllama_ip.get_image_size_fit_to_canvas(h, w, *want, tile)), (h, w)


@pytest.mark.parametrize("size,mode", [((40, 40), "RGB"), ((30, 100), "RGB"), ((100, 30), "RGBA"),
                                       ((200, 130), "L"), ((56, 112), "LA"), ((500, 90), "RGB")])
def test_one_image_equals_hf_tensor_for_tensor(size, mode):
    tile, max_tiles = 56, 4
    img = _image(*size, mode=mode, seed=sum(size))
    ours = vp.preprocess_images([[img]], tile_size=tile, max_tiles=max_tiles)
    hf = _hf([[img]], tile, max_tiles)
    assert ours.pixel_values.dtype == hf["pixel_values"].dtype == torch.float32
    assert torch.equal(ours.pixel_values, hf["pixel_values"])
    assert torch.equal(ours.aspect_ratio_ids, hf["aspect_ratio_ids"])
    assert torch.equal(ours.aspect_ratio_mask, hf["aspect_ratio_mask"])
    assert ours.num_tiles == hf["num_tiles"]


def test_a_batch_with_different_image_counts_equals_hf():
    tile, max_tiles = 56, 4
    batch = [[_image(60, 170, seed=1), _image(120, 40, mode="RGBA", seed=2)], [_image(300, 300, seed=3)]]
    ours = vp.preprocess_images(batch, tile_size=tile, max_tiles=max_tiles)
    hf = _hf(batch, tile, max_tiles)
    for key in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask"):
        assert torch.equal(getattr(ours, key), hf[key]), key
    assert ours.num_tiles == hf["num_tiles"]
    assert ours.aspect_ratio_ids[1, 1] == 0 and ours.aspect_ratio_mask[1, 1].tolist() == [1, 0, 0, 0]


def test_the_released_tile_size_on_a_wide_photo_sized_image():
    img = _image(480, 640, seed=7)
    ours = vp.preprocess_images([[img]])
    hf = _hf([[img]], vp.TILE_SIZE, vp.MAX_TILES)
    assert torch.equal(ours.pixel_values, hf["pixel_values"])
    assert ours.num_tiles == [[2]] and ours.aspect_ratio_ids.tolist() == [[2]]  # grid 1 x 2


def test_transparent_pixels_become_white_not_black():
    img = Image.new("RGBA", (56, 56), (0, 0, 0, 0))
    t = vp.preprocess_image(img, tile_size=56, max_tiles=1)
    white = (1.0 - np.array(vp.CLIP_MEAN, dtype=np.float32)) / np.array(vp.CLIP_STD, dtype=np.float32)
    torch.testing.assert_close(t.pixels[0, :, 0, 0], torch.from_numpy(white), rtol=0, atol=1e-6)


@pytest.mark.parametrize("ids", [
    [5, 9, 1, 2, 3],
    [9, 1, 2, 9, 4, 5, 6],
    [1, 9, 9, 2, 3, 9, 4],
    [9, 9, 9],
    [1, 2, 9],
])
def test_cross_attention_spans_and_mask_equal_the_reference(ids):
    img = 9
    want_sparse = mllama_proc.get_cross_attention_token_mask(ids, img)
    spans = vp.image_spans(ids, img)
    ref = [[a, len(ids) if b == -1 else b] for a, b in want_sparse]
    assert [list(s) for s in spans] == ref
    tiles = [[(k % 4) + 1 for k in range(len(spans))]]
    # The processor passes rows already padded to the batch length, so length == len(ids) there.
    ours = vp.cross_attention_mask([ids], tiles, image_token=img, max_tiles=4)
    want = mllama_proc.convert_sparse_cross_attention_mask_to_dense([want_sparse], tiles, 4, len(ids))
    assert np.array_equal(ours.numpy(), want)
    longer = vp.cross_attention_mask([ids], tiles, image_token=img, max_tiles=4, length=len(ids) + 2)
    assert longer[:, len(ids):].sum() == 0 and torch.equal(longer[:, : len(ids)], ours)


def test_bad_inputs_name_the_problem():
    with pytest.raises(TypeError, match="PIL"):
        vp.preprocess_image(np.zeros((4, 4, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="2 <\\|image\\|> tokens but 1 images"):
        vp.cross_attention_mask([[9, 1, 9]], [[1]], image_token=9)
    with pytest.raises(ValueError, match="no images"):
        vp.preprocess_images([[], []])
    with pytest.raises(ValueError, match="std"):
        vp.preprocess_image(_image(8, 8), std=(0.1, 0.0, 0.1))
