"""The Llama 3.2 Vision image encoder (ViT-H/14 with tiles): pure math, beside the text model.

Shapes: I images (batch x images per row), T tiles per image (max_num_tiles), P patches per tile
plus the class token (`n_tokens`: 1601 for the released 560 px tiles, 1025 for HF's default 448), N the
padded token count (1608; 1032), W width.

Design choices:
* Parameter names are Meta's (`conv1._linear`, `transformer.resblocks.N.attn.wq`, `ln_pre`, ...),
  so the reference checkpoint's names load unchanged. Two kinds of tensor have another *shape*
  than Meta's: the tile embeddings are stored as one table per aspect-ratio id, as HF stores them
  (`(n_ratios + 1, T, P or 1, W)`, row 0 for padding images), instead of Meta's `(T, T, ...)`
  grid. A table is what the forward indexes (no Python loop over images), HF loads bit-exactly,
  and Meta's grid converts into it exactly (`herd.model.mllama_io`).
* The patch "conv" is Meta's linear over unfolded patches: the same weights as a Conv2d with
  kernel = stride = patch, stored flat.
* Aspect ratio ids follow HF's processor: 1 + the index in `supported_aspect_ratios`, 0 for a
  padding image slot.
* The tile attention mask reproduces HF and Meta exactly, quirk included: a (query, key) pair is
  masked only when *both* are padding (a padded patch or a padding tile); real tokens still
  attend to padding keys. Masked pairs get finfo.min added, not -inf, so a fully padded image
  slot gives uniform attention rather than NaN, as in both references.
* Intermediate features are Meta's: the *input* of local layer i for each i in
  `intermediate_layers`. transformers 5.x (checked 5.3) records the *output* of layer i
  instead, one layer later than Meta's reference and than transformers 4.x after its fix
  (huggingface/transformers#40083); herd follows the reference the checkpoints were trained with.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from herd.model.vision_preprocess import supported_aspect_ratios

@dataclass
class VisionArgs:
    width: int = 1280
    n_layers: int = 32  # local encoder
    n_global_layers: int = 8
    n_heads: int = 16
    mlp_dim: int = 5120
    image_size: int = 560  # one tile's side in pixels
    patch_size: int = 14
    in_channels: int = 3
    max_num_tiles: int = 4
    norm_eps: float = 1e-5
    intermediate_layers: tuple[int, ...] = (3, 7, 15, 23, 30)
    # (rows, columns) per aspect ratio id - 1; None: every grid of <= max_num_tiles tiles, HF's default order
    aspect_ratios: tuple[tuple[int, int], ...] | None = None

    def __post_init__(self) -> None:
        if self.aspect_ratios is None:
            self.aspect_ratios = supported_aspect_ratios(self.max_num_tiles)
        self.intermediate_layers = tuple(int(i) for i in self.intermediate_layers)
        self.aspect_ratios = tuple((int(h), int(w)) for h, w in self.aspect_ratios)
        if self.width % self.n_heads:
            raise ValueError(f"vision width ({self.width}) must be divisible by n_heads ({self.n_heads})")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})")
        bad = [i for i in self.intermediate_layers if not 0 <= i < self.n_layers]
        if bad:
            raise ValueError(f"intermediate_layers {bad} are outside the {self.n_layers} local layers")
        too_big = [r for r in self.aspect_ratios if r[0] * r[1] > self.max_num_tiles or min(r) < 1]
        if too_big:
            raise ValueError(f"aspect ratios {too_big} need more than max_num_tiles={self.max_num_tiles} tiles")

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def n_tokens(self) -> int:
        """Tokens per tile: the patches plus the class token."""
        return self.n_patches + 1

    @property
    def n_padded(self) -> int:
        return 8 * math.ceil(self.n_tokens / 8)

    @property
    def output_dim(self) -> int:
        """Final features concatenated with every intermediate layer's (7680 for the real models)."""
        return self.width * (len(self.intermediate_layers) + 1)


class LinearPatchEmbed(nn.Module):
    """Patchify: unfold kernel=stride=patch windows, then one linear (a Conv2d stored flat)."""

    def __init__(self, in_channels: int, width: int, patch: int):
        super().__init__()
        self.patch = patch
        self._linear = nn.Linear(in_channels * patch * patch, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.unfold(x, kernel_size=self.patch, stride=self.patch)  # (B, C*p*p, P), channel-major like conv
        return self._linear(x.transpose(1, 2))  # (B, P, W)


class TileEmbedding(nn.Module):
    """A learned vector per (aspect ratio, tile) added to every token of the tile, tanh-gated."""

    def __init__(self, n_ratios: int, max_num_tiles: int, width: int):
        super().__init__()
        self.embedding = nn.Parameter(torch.zeros(n_ratios + 1, max_num_tiles, 1, width))
        self.gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, ar_ids: torch.Tensor) -> torch.Tensor:
        return x + self.embedding[ar_ids] * self.gate.tanh()  # (I, T, tokens, W)


class ImageAttention(nn.Module):
    def __init__(self, width: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.wq = nn.Linear(width, width, bias=False)
        self.wk = nn.Linear(width, width, bias=False)
        self.wv = nn.Linear(width, width, bias=False)
        self.wo = nn.Linear(width, width, bias=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, L, _ = x.shape
        q, k, v = (w(x).view(B, L, self.n_heads, -1).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, L, D)
        return self.wo(out.transpose(1, 2).reshape(B, L, -1))


class ImageFeedForward(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.c_proj = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))  # exact (erf) GELU, as nn.GELU() and HF's "gelu"


class ImageBlock(nn.Module):
    """Pre-LayerNorm ViT block; the global encoder's blocks scale both branches by tanh gates."""

    def __init__(self, args: VisionArgs, *, gated: bool):
        super().__init__()
        self.attn = ImageAttention(args.width, args.n_heads)
        self.ln_1 = nn.LayerNorm(args.width, eps=args.norm_eps)
        self.mlp = ImageFeedForward(args.width, args.mlp_dim)
        self.ln_2 = nn.LayerNorm(args.width, eps=args.norm_eps)
        self.gated = gated
        if gated:
            self.gate_attn = nn.Parameter(torch.zeros(1))
            self.gate_ffn = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        a = self.attn(self.ln_1(x), mask)
        if self.gated:
            a = a * self.gate_attn.tanh()
        x = x + a
        f = self.mlp(self.ln_2(x))
        if self.gated:
            f = f * self.gate_ffn.tanh()
        return x + f


class ImageTransformer(nn.Module):
    def __init__(self, args: VisionArgs, n_layers: int, *, gated: bool):
        super().__init__()
        self.resblocks = nn.ModuleList([ImageBlock(args, gated=gated) for _ in range(n_layers)])

    def forward(self, x: torch.Tensor, mask: torch.Tensor, keep: tuple[int, ...] = ()):
        kept = []
        for i, block in enumerate(self.resblocks):
            if i in keep:
                kept.append(x)  # the input of layer i (Meta's reference)
            x = block(x, mask)
        return x, kept


def tile_attention_mask(ar_mask: torch.Tensor, *, n_tokens: int, n_padded: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask (I, 1, T*N, T*N) over the tiles' padded tokens, as HF and Meta build it.

    A token is padding if its tile is a padding tile (ar_mask 0) or it is one of the N - n_tokens
    pad slots. A pair is masked (finfo.min) only when both query and key are padding, so real
    queries still see padded keys: the quirk of both references, kept for exact parity.
    (With no pad slots, n_tokens % 8 == 0, transformers' `[..., -0:] = 0` marks every token as
    padding and masks everything; herd marks only padding tiles. No released model has such a
    tile size: 560 px gives 1601 tokens, padded to 1608; 448 px 1025, padded to 1032.)
    """
    n_img, T = ar_mask.shape
    real = ar_mask.to(torch.bool).view(n_img, T, 1).expand(n_img, T, n_padded).clone()
    real[:, :, n_tokens:] = False
    pad = (~real).reshape(n_img, T * n_padded, 1).to(dtype)
    return (pad @ pad.transpose(1, 2) * torch.finfo(dtype).min).unsqueeze(1)


class VisionEncoder(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        self.args = args
        W, n_ratios = args.width, len(args.aspect_ratios)
        self.conv1 = LinearPatchEmbed(args.in_channels, W, args.patch_size)
        self.class_embedding = nn.Parameter(torch.zeros(W))
        self.positional_embedding = nn.Parameter(torch.zeros(args.n_tokens, W))
        # One (T, n_tokens, W) table per aspect ratio id; Meta stores a (T, T, n_tokens, W) grid.
        self.gated_positional_embedding = nn.Parameter(torch.zeros(n_ratios + 1, args.max_num_tiles, args.n_tokens, W))
        self.gated_positional_embedding_gate = nn.Parameter(torch.zeros(1))
        self.pre_tile_pos_embed = TileEmbedding(n_ratios, args.max_num_tiles, W)
        self.post_tile_pos_embed = TileEmbedding(n_ratios, args.max_num_tiles, W)
        self.ln_pre = nn.LayerNorm(W)
        self.ln_post = nn.LayerNorm(W)
        self.transformer = ImageTransformer(args, args.n_layers, gated=False)
        self.global_transformer = ImageTransformer(args, args.n_global_layers, gated=True)

    def forward(self, images: torch.Tensor, ar_ids: torch.Tensor, ar_mask: torch.Tensor) -> torch.Tensor:
        """images (B, M, T, C, H, W), ar_ids (B, M), ar_mask (B, M, T) -> (B, M, T, n_tokens, output_dim)."""
        a = self.args
        B, M, T, C, H, Wd = images.shape
        self._check(images, ar_ids, ar_mask)
        ar_ids = ar_ids.reshape(B * M)
        x = self.conv1(images.reshape(B * M * T, C, H, Wd).to(self.class_embedding.dtype))  # (I*T, P, W)
        x = self.pre_tile_pos_embed(x.view(B * M, T, a.n_patches, -1), ar_ids)  # (I, T, P, W)
        cls = self.class_embedding.expand(B * M, T, 1, -1)
        x = torch.cat([cls, x], dim=2)  # (I, T, n_tokens, W)
        g = self.gated_positional_embedding_gate.tanh()
        x = x + self.positional_embedding * (1 - g) + self.gated_positional_embedding[ar_ids] * g
        x = self.ln_pre(x)
        N = a.n_padded
        x = F.pad(x, (0, 0, 0, N - a.n_tokens))  # (I, T, N, W)
        mask = tile_attention_mask(ar_mask.reshape(B * M, T), n_tokens=a.n_tokens, n_padded=N, dtype=x.dtype)
        x, kept = self.transformer(x.view(B * M, T * N, -1), mask, a.intermediate_layers)
        x = self.ln_post(x)
        x = self.post_tile_pos_embed(x.view(B * M, T, N, -1), ar_ids)
        x, _ = self.global_transformer(x.view(B * M, T * N, -1), mask)
        inter = torch.stack(kept, dim=-1).view(B * M, T, N, -1)  # (I, T, N, W*k), W-major like Meta's stack
        x = torch.cat([x.view(B * M, T, N, -1), inter], dim=-1)[:, :, : a.n_tokens]  # drop the pad slots
        return x.reshape(B, M, T, a.n_tokens, -1)

    def _check(self, images: torch.Tensor, ar_ids: torch.Tensor, ar_mask: torch.Tensor) -> None:
        a = self.args
        B, M, T, C, H, W = images.shape
        if (C, H, W) != (a.in_channels, a.image_size, a.image_size) or T != a.max_num_tiles:
            raise ValueError(
                f"images must be (batch, images, {a.max_num_tiles} tiles, {a.in_channels}, {a.image_size}, "
                f"{a.image_size}), got {tuple(images.shape)}; preprocess with herd.model.vision_preprocess"
            )
        if tuple(ar_ids.shape) != (B, M) or tuple(ar_mask.shape) != (B, M, T):
            raise ValueError(
                f"aspect_ratio_ids must be (batch, images) = {(B, M)} and aspect_ratio_mask (batch, images, tiles) = "
                f"{(B, M, T)}; got {tuple(ar_ids.shape)} and {tuple(ar_mask.shape)}"
            )
        if ar_ids.device.type == "meta":  # shape checks only (e.g. a real-size model built without memory)
            return
        if int(ar_ids.min()) < 0 or int(ar_ids.max()) > len(a.aspect_ratios):
            raise ValueError(
                f"aspect_ratio_ids must lie in 0..{len(a.aspect_ratios)} (0 = padding image, k = aspect ratio "
                f"{a.aspect_ratios[0]} .. k-1 in supported order); got {ar_ids.tolist()}"
            )
