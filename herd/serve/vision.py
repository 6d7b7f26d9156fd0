"""Serving Llama 3.2 Vision: images ride in the same continuous batch as text.

The engine (`engine.py`) schedules rows and blocks and knows nothing of images; this module adds
what images need, beside it:

* `RequestImages`: a request's images, preprocessed (on the server's worker thread, not the
  engine's) and named by a SHA-256 of the tensors the model sees.
* `VisionEngine`: an `Engine` over an `Mllama`. At admission it runs the vision encoder and the
  projector for the request's images and each cross-attention layer's key/value projection once,
  and binds the result to the request's slots (every choice of it). Every prefill chunk and
  decode step of those rows then reuses them; nothing is recomputed per token.
* `VisionRows`: the `Transformer` surface the engine drives (`args`, `hidden`, `output`,
  `tok_embeddings`). A prefill forward (`RowCache`, one slot) attends to its row's own image
  keys/values; a decode forward over rows 0..B-1 pads every row's image tokens to the batch's
  largest image count (padding and image-less rows are masked out; a row that sees no image gets
  the reference's zeroed cross-attention output, so text-only requests decode exactly as on the
  text model). The padded batch tensors are rebuilt only when the set of bound rows changes.
* Prefix caching: the self-attention keys/values after an `<|image|>` token depend on the image
  (through cross-attention), so an image request's block-hash chain starts from a root that
  includes its images' digest (`Request.image_digest`, `pages.chain_root`). Two requests share
  blocks only if their tokens and their images are equal. Rooting the whole chain (rather than
  the first block at an image token) costs nothing in practice: a dialog with images has no
  system message, so the text before the first image is a few header tokens, less than a block.

Trade-off: the rows of a decode step are padded to the largest image count in the batch, so a
one-image row decoding beside a four-image row pays for four images' attention (masked). Exact,
and simple; a ragged kernel would avoid it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from herd.generate.vision import with_image_token
from herd.model.mllama import CrossKV, Mllama
from herd.model.vision_preprocess import ImageBatch, cross_attention_mask, preprocess_images
from herd.serve.engine import Engine, Request, RequestHandle
from herd.serve.pages import RowCache
from herd.serve.requests import RunningSeq

log = logging.getLogger(__name__)

MAX_IMAGES = 4  # per request, by default: each image's keys/values are n_cross x 2 x tiles x 1601 tokens per row


@dataclass(frozen=True)
class RequestImages:
    """One request's images as the model sees them (a one-prompt `ImageBatch`) and their digest."""

    batch: ImageBatch
    digest: bytes

    @property
    def count(self) -> int:
        return len(self.batch.num_tiles[0])


def prepare_images(images: Sequence[Any], *, tile_size: int, max_tiles: int) -> RequestImages:
    """Tile Pillow images (one request's, in the order of its `<|image|>` tokens) and name them.

    The digest covers the pixels, aspect-ratio ids and tile masks, i.e. everything the encoder
    reads: two encodings of the same picture share cache blocks, two different pictures never do."""
    if not images:
        raise ValueError("no images; a text-only request carries images=None")
    batch = preprocess_images([list(images)], tile_size=tile_size, max_tiles=max_tiles)
    h = hashlib.sha256(b"images:")
    for t in (batch.pixel_values, batch.aspect_ratio_ids, batch.aspect_ratio_mask):
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.contiguous().numpy().tobytes())
    return RequestImages(batch, h.digest())


@dataclass
class _Bound:
    """A slot's images: the cross-attention keys/values and which images each position sees."""

    kv: CrossKV  # k[j], v[j]: (1, K, M*T*n_tokens, D)
    mask: torch.Tensor  # (L, M, T) 0/1 for positions 0..L-1 of the row


class VisionRows:
    """An `Mllama` presented as the engine's `Transformer`, with per-slot images bound to it.

    `args` is the text model's (its `vocab_size` is the output head's, so grammars and logit_bias
    see the logits' width); the engine's request check lets the `<|image|>` id through (see
    `VisionEngine._check`)."""

    def __init__(self, model: Mllama, max_batch: int):
        self.model = model
        self.args = model.args.text
        self.image_token = self.args.vocab_size  # <|image|>: the first id past the text vocabulary
        self.tok_embeddings = model.text_model.tok_embeddings
        self.output = model.text_model.output
        self.engine_cache: Any = None  # the engine's KVCache: decode forwards cover its rows 0..B-1
        self.bound: list[_Bound | None] = [None] * max_batch
        self._padded: tuple[list[_Bound | None], CrossKV] | None = None  # (the rows' bindings, their padded kv)

    def image_ids(self, prompt: list[int]) -> list[int]:
        """A chat-format prompt with `<|image|>` at this model's id (see `with_image_token`)."""
        return with_image_token(prompt, self.model)

    def bind(self, slot: int, bound: _Bound | None) -> None:
        """Give a slot its request's images (None: a text-only request, or a free slot)."""
        if self.bound[slot] is not bound:
            self._padded = None  # rebuilt at the next decode step; never holds a finished request's images
        self.bound[slot] = bound

    def encode(self, images: RequestImages, prompt: Sequence[int], length: int) -> _Bound:
        """Run the encoder once for a request: its cross keys/values and its rows' visibility for
        positions 0..length-1 (generated tokens see what the prompt's last token saw)."""
        m = self.model
        weight = self.tok_embeddings.weight
        b = images.batch
        kv = m.encode_images(b.pixel_values.to(weight.device), b.aspect_ratio_ids.to(weight.device),
                             b.aspect_ratio_mask.to(weight.device))
        mask = cross_attention_mask([prompt], b.num_tiles, image_token=self.image_token,
                                    max_tiles=m.args.vision.max_num_tiles, length=length)[0]  # (L, M, T)
        mask[len(prompt):] = mask[len(prompt) - 1]
        return _Bound(kv, mask.to(weight.device))

    def hidden(self, tokens: torch.Tensor, *, pos: int | torch.Tensor = 0, cache=None, **kwargs: Any) -> torch.Tensor:
        B, S = tokens.shape
        if isinstance(cache, RowCache):  # a prefill chunk of one slot
            rows = [cache.slot]
        elif cache is not None and cache is self.engine_cache:  # a decode step over slots 0..B-1
            rows = list(range(B))
        else:
            raise AssertionError("VisionRows runs only the engine's row-cache prefill and its batched decode")
        bound = [self.bound[r] for r in rows]
        if all(b is None for b in bound):  # no image anywhere: the text model alone (cross layers skipped)
            return self.model.hidden(tokens, pos=pos, cache=cache, **kwargs)
        positions = (torch.arange(pos, pos + S, device=tokens.device).expand(B, S) if isinstance(pos, int)
                     else pos.expand(B, S))
        if len(rows) == 1:
            kv = bound[0].kv
        else:
            kv = self._padded_kv(bound)
        M, T = kv.n_images, kv.n_tiles
        xmask = torch.zeros(B, S, M, T, dtype=torch.int64, device=tokens.device)
        for i, b in enumerate(bound):
            if b is not None:
                at = positions[i].clamp(max=b.mask.shape[0] - 1)  # ride-along rows may sit past their end
                xmask[i, :, : b.mask.shape[1]] = b.mask[at]
        return self.model.hidden(tokens, cross_kv=kv, cross_attention_mask=xmask, pos=pos, cache=cache, **kwargs)

    def _padded_kv(self, bound: list[_Bound | None]) -> CrossKV:
        """Every row's image keys/values in one batch, padded with zeros to the most images (B, K, V, D)."""
        # The bindings themselves are the key (compared by identity, and kept alive by it: an id()
        # could be reused by a newer binding once an old one is freed).
        if self._padded is not None and len(self._padded[0]) == len(bound) and all(
                a is b for a, b in zip(self._padded[0], bound)):
            return self._padded[1]
        some = next(b for b in bound if b is not None)
        M = max(b.kv.n_images for b in bound if b is not None)
        T = some.kv.n_tiles
        per_image = some.kv.k[0].shape[2] // some.kv.n_images
        ks, vs = [], []
        for j in range(len(some.kv.k)):
            _, K, _, D = some.kv.k[j].shape
            k = some.kv.k[j].new_zeros(len(bound), K, M * per_image, D)  # (B, K, V, D)
            v = torch.zeros_like(k)
            for i, b in enumerate(bound):
                if b is not None:
                    n = b.kv.k[j].shape[2]
                    k[i, :, :n], v[i, :, :n] = b.kv.k[j][0], b.kv.v[j][0]
            ks.append(k)
            vs.append(v)
        kv = CrossKV(ks, vs, n_images=M, n_tiles=T)
        self._padded = (list(bound), kv)
        return kv


class VisionEngine(Engine):
    """Continuous batching for a Llama 3.2 Vision model: text-only and image requests in one batch.
    Prefill runs one chunk per forward (`VisionRows` binds a prefill to one slot's images).

    A request's images travel in `Request.images` (`prepare_images`), one per `<|image|>` token of
    its prompt, at most `max_images`. Other arguments as for `Engine`; compile, LoRA adapters, a
    draft model and tensor parallelism are not supported with images.
    """

    batch_prefill = False

    def __init__(self, model: Mllama, *, max_batch: int = 8, max_images: int = MAX_IMAGES, **kwargs: Any):
        for name in ("compile", "adapters", "draft", "mirror"):
            if kwargs.get(name):
                raise ValueError(f"a Llama 3.2 Vision engine does not support {name} yet; leave it out")
        if max_images < 1:
            raise ValueError(f"max_images must be at least 1, got {max_images}")
        rows = VisionRows(model, max_batch)
        super().__init__(rows, max_batch=max_batch, **kwargs)  # type: ignore[arg-type]
        rows.engine_cache = self.cache
        self.rows, self.max_images = rows, max_images

    def _check(self, r: Request) -> None:
        image = self.rows.image_token
        n_tokens = sum(1 for t in r.prompt if t == image)
        n_images = 0 if r.images is None else r.images.count
        if n_images > self.max_images:
            raise ValueError(f"the request has {n_images} images; this server takes at most {self.max_images} "
                             "per request")
        if n_tokens != n_images:
            raise ValueError(f"the prompt has {n_tokens} <|image|> tokens (id {image}) but the request carries "
                             f"{n_images} images; put one image token in the prompt for each image")
        if n_images:
            tiles = self.rows.model.args.vision
            shape = tuple(r.images.batch.pixel_values.shape)
            if shape[2:] != (tiles.max_num_tiles, 3, tiles.image_size, tiles.image_size):
                raise ValueError(f"the images were tiled as {shape[2:]}, this model takes (tiles, 3, size, size) = "
                                 f"{(tiles.max_num_tiles, 3, tiles.image_size, tiles.image_size)}; prepare them with "
                                 "prepare_images(tile_size=..., max_tiles=...) of this model's vision args")
        # The text checks, with the image ids (one past the text vocabulary) standing in as id 0.
        super()._check(dataclasses.replace(r, prompt=[0 if t == image else t for t in r.prompt], images=None))

    def _start(self, handle: RequestHandle, slots: list[int], names: list[bytes], hits: list[int]) -> None:
        super()._start(handle, slots, names, hits)
        r = handle.request
        bound = None
        if r.images is not None:
            try:
                bound = self.rows.encode(r.images, r.prompt, length=self.max_seq_len)
            except Exception:  # a failing encoder ends this request, never the engine
                log.exception("encoding the images of %s failed", handle.id)
                for slot in slots:
                    seq = self._slots[slot]
                    if seq is not None and seq.handle is handle:
                        self._finish(seq, "error", error="internal error while encoding the images")
                return
        for slot in slots:
            self.rows.bind(slot, bound)

    def _finish(self, seq: RunningSeq, reason, **kwargs: Any) -> None:
        super()._finish(seq, reason, **kwargs)
        if self._slots[seq.slot] is None:
            self.rows.bind(seq.slot, None)


def request_images(engine: Engine, urls: Sequence[str]) -> RequestImages | None:
    """A chat request's image URLs, decoded (`images.decode_data_url`, data URLs only) and tiled for
    the engine's model; None for none. APIError 400 for anything the client got wrong."""
    from herd.serve.fields import APIError
    from herd.serve.images import ImageError, decode_data_url

    if not urls:
        return None
    if not isinstance(engine, VisionEngine):
        raise APIError(400, "this model has no vision encoder; send text only, or serve a Llama 3.2 Vision "
                       "checkpoint", param="messages")
    if len(urls) > engine.max_images:
        raise APIError(400, f"the request has {len(urls)} images; this server takes at most {engine.max_images} per "
                       "request (herd serve --max-images)", param="messages")
    pictures = []
    for i, url in enumerate(urls):
        try:
            pictures.append(decode_data_url(url))
        except ImageError as e:
            raise APIError(400, f"image {i + 1} of {len(urls)}: {e}", param="messages") from None
    v = engine.rows.model.args.vision
    return prepare_images(pictures, tile_size=v.image_size, max_tiles=v.max_num_tiles)
