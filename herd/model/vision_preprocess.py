"""Llama 3.2 Vision image preprocessing: best-fit tiling, resize, pad, normalize, aspect-ratio ids.

The vision encoder sees an image as up to `max_tiles` square tiles of `tile_size` pixels (560 for
the released models). The steps, which must match the checkpoint's training exactly (HF's
`MllamaImageProcessor` is the reference the tests hold this module to, tensor for tensor):

1. Convert to RGB; a transparent image is composited onto white first.
2. Choose the tile grid (rows x columns, at most `max_tiles` tiles): for each grid, the largest
   scale that fits the image into it without distortion is min(canvas_h / h, canvas_w / w). The
   smallest scale >= 1 wins (the least upscaling); if none is >= 1, the largest (the least
   downscaling). Ties go to the grid of smallest area, then to the earlier grid in
   `supported_aspect_ratios` order.
3. Resize (Pillow bilinear, on the 8-bit image) so the image fits the grid's canvas with its
   aspect ratio kept; each side is first clamped to [tile_size, canvas side].
4. Pad with zeros at the bottom and right to the full canvas, scale to [0, 1] and normalize with
   the CLIP mean and std (in float32, the reference's arithmetic).
5. Cut the canvas into tiles, row by row.

Per image this gives (tiles, 3, tile, tile) pixels, its grid (rows, columns), its aspect-ratio id
(1 + the grid's index in `supported_aspect_ratios`; 0 pads the batch) and its tile mask. The
text side's cross-attention mask (which tokens see which image's tiles) is
`cross_attention_mask`: an `<|image|>` token's image is seen by the tokens from it up to the
next image token that is not directly after it, or to the end.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

# Llama 3.2 Vision's preprocessor_config.json (11B and 90B alike).
TILE_SIZE = 560
MAX_TILES = 4
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@lru_cache(maxsize=16)
def supported_aspect_ratios(max_tiles: int) -> tuple[tuple[int, int], ...]:
    """Every grid of at most max_tiles tiles, as (rows, columns), in the order the ids count them.

    The order is the reference's: the first number runs slowest. Aspect-ratio id i + 1 is the
    i-th entry; a checkpoint's tile embeddings are indexed by these ids, so the order is part of
    the model, not a detail.
    """
    if max_tiles < 1:
        raise ValueError(f"max_tiles must be a positive number of tiles, got {max_tiles}")
    return tuple((a, b) for a in range(1, max_tiles + 1) for b in range(1, max_tiles + 1) if a * b <= max_tiles)


def best_grid(height: int, width: int, *, max_tiles: int = MAX_TILES, tile_size: int = TILE_SIZE) -> tuple[int, int]:
    """(rows, columns) of the canvas an image of height x width pixels is fitted into (rule 2)."""
    best: tuple[float, int, tuple[int, int]] | None = None  # (scale, area, grid)
    scales = []
    for rows, cols in supported_aspect_ratios(max_tiles):
        scale = min((rows * tile_size) / height, (cols * tile_size) / width)
        scales.append((scale, (rows, cols)))
    ups = [s for s, _ in scales if s >= 1]
    chosen = min(ups) if ups else max(s for s, _ in scales)
    for scale, (rows, cols) in scales:
        if scale == chosen:
            area = rows * cols
            if best is None or area < best[1]:
                best = (scale, area, (rows, cols))
    assert best is not None
    return best[2]


def fitted_size(height: int, width: int, canvas_h: int, canvas_w: int, tile_size: int) -> tuple[int, int]:
    """(height, width) the image is resized to inside a canvas (rule 3)."""
    target_w = min(max(width, tile_size), canvas_w)
    target_h = min(max(height, tile_size), canvas_h)
    scale_h, scale_w = target_h / height, target_w / width
    if scale_w < scale_h:
        return min(math.floor(height * scale_w) or 1, target_h), target_w
    return target_h, min(math.floor(width * scale_h) or 1, target_w)


def to_rgb(image):
    """A Pillow image in RGB; transparency is composited onto white (not dropped to black)."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL.Image.Image, got {type(image).__name__}; open files with PIL.Image.open")
    if image.mode == "RGB":
        return image
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


@dataclass
class ImageTiles:
    """One preprocessed image: pixels (tiles, 3, tile, tile) float32 and its grid (rows, columns)."""

    pixels: torch.Tensor
    grid: tuple[int, int]

    @property
    def num_tiles(self) -> int:
        return self.grid[0] * self.grid[1]


def preprocess_image(image, *, tile_size: int = TILE_SIZE, max_tiles: int = MAX_TILES,
                     mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> ImageTiles:
    """Tile one Pillow image (steps 1-5 of the module docstring)."""
    from PIL import Image

    if tile_size < 1:
        raise ValueError(f"tile_size must be a positive number of pixels, got {tile_size}")
    if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
        raise ValueError(f"mean and std need 3 values (R, G, B) and std > 0; got mean={list(mean)}, std={list(std)}")
    rgb = to_rgb(image)
    width, height = rgb.size
    if width < 1 or height < 1:
        raise ValueError(f"the image is empty ({width} x {height} pixels)")
    rows, cols = best_grid(height, width, max_tiles=max_tiles, tile_size=tile_size)
    new_h, new_w = fitted_size(height, width, rows * tile_size, cols * tile_size, tile_size)
    if (new_w, new_h) != (width, height):
        rgb = rgb.resize((new_w, new_h), resample=Image.Resampling.BILINEAR)
    canvas = np.zeros((3, rows * tile_size, cols * tile_size), dtype=np.float32)
    # 8-bit values scaled in float64 then rounded to float32, as the reference rescales.
    canvas[:, :new_h, :new_w] = (np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1).astype(np.float64)
                                 * (1 / 255)).astype(np.float32)
    m = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
    s = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)
    canvas = (canvas - m) / s  # padding is normalized too: zeros become -mean / std
    tiles = canvas.reshape(3, rows, tile_size, cols, tile_size).transpose(1, 3, 0, 2, 4)
    return ImageTiles(torch.from_numpy(np.ascontiguousarray(tiles.reshape(rows * cols, 3, tile_size, tile_size))),
                      (rows, cols))


@dataclass
class ImageBatch:
    """Model inputs for a batch of prompts, each with its own list of images.

    pixel_values: (B, max_images, max_tiles, 3, tile, tile) float32, zeros where there is no tile.
    aspect_ratio_ids: (B, max_images) int64, 0 where there is no image.
    aspect_ratio_mask: (B, max_images, max_tiles) int64, 1 for an image's tiles. Tile 0 is 1 even
        for a missing image (the reference pads missing images as 1 x 1 grids).
    num_tiles: tiles per image, per prompt.
    """

    pixel_values: torch.Tensor
    aspect_ratio_ids: torch.Tensor
    aspect_ratio_mask: torch.Tensor
    num_tiles: list[list[int]]


def preprocess_images(images: Sequence[Sequence], *, tile_size: int = TILE_SIZE, max_tiles: int = MAX_TILES,
                      mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> ImageBatch:
    """Preprocess `images[b]`, the images of prompt b (possibly none), into one padded batch."""
    if not images:
        raise ValueError("no prompts: pass one list of images per prompt")
    done = [[preprocess_image(im, tile_size=tile_size, max_tiles=max_tiles, mean=mean, std=std) for im in row]
            for row in images]
    n_images = max(len(row) for row in done)
    if n_images == 0:
        raise ValueError("no images in any prompt; a text-only batch needs no image inputs")
    B = len(done)
    pixels = torch.zeros(B, n_images, max_tiles, 3, tile_size, tile_size)
    ids = torch.zeros(B, n_images, dtype=torch.int64)
    mask = torch.zeros(B, n_images, max_tiles, dtype=torch.int64)
    mask[:, :, 0] = 1
    ratios = supported_aspect_ratios(max_tiles)
    for b, row in enumerate(done):
        for i, t in enumerate(row):
            pixels[b, i, : t.num_tiles] = t.pixels
            ids[b, i] = ratios.index(t.grid) + 1
            mask[b, i, : t.num_tiles] = 1
    return ImageBatch(pixels, ids, mask, [[t.num_tiles for t in row] for row in done])


def image_spans(tokens: Sequence[int], image_token: int) -> list[tuple[int, int]]:
    """[start, end) of the tokens that see each image, one span per `<|image|>` token in order.

    An image is seen from its own token up to the next image token; images whose tokens are
    adjacent (a group, e.g. `<|image|><|image|>`) are all seen until the group's span ends.
    """
    where = [i for i, t in enumerate(tokens) if t == image_token]
    spans = [[a, b] for a, b in zip(where, where[1:] + [len(tokens)])]
    end = len(tokens)
    for span in reversed(spans):
        if span[1] == span[0] + 1:  # directly followed by another image token
            span[1] = end
        end = span[1]
    return [(a, b) for a, b in spans]


def cross_attention_mask(tokens: Sequence[Sequence[int]], num_tiles: Sequence[Sequence[int]], *, image_token: int,
                         max_tiles: int = MAX_TILES, length: int | None = None) -> torch.Tensor:
    """(B, length, max_images, max_tiles) int64: 1 where token t of prompt b sees tile k of image i.

    Tokens before a prompt's first image see nothing (the model then zeroes their cross-attention
    MLP output), nor do positions past len(tokens[b]) when `length` is longer. The last image of a
    prompt is seen up to len(tokens[b]): pass the padded rows to have padding see it, as the
    reference processor does with its padded ids. (Given a longer `length`, the reference lets a
    prompt's padding see its image when it has exactly one image and not when it has several;
    here padding past len(tokens[b]) never sees one. Padding outputs are never used.)
    """
    if len(tokens) != len(num_tiles):
        raise ValueError(f"{len(tokens)} prompts but image tile counts for {len(num_tiles)}")
    length = max(len(t) for t in tokens) if length is None else length
    n_images = max((len(n) for n in num_tiles), default=0)
    out = torch.zeros(len(tokens), length, max(n_images, 1), max_tiles, dtype=torch.int64)
    for b, (row, tiles) in enumerate(zip(tokens, num_tiles)):
        spans = image_spans(row, image_token)
        if len(spans) != len(tiles):
            raise ValueError(f"prompt {b} has {len(spans)} <|image|> tokens but {len(tiles)} images; "
                             "put one image token in the text for each image")
        for i, ((start, end), n) in enumerate(zip(spans, tiles)):
            out[b, start:min(end, length), i, :n] = 1
    return out
