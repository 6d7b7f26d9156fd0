"""Llama 3.2 Vision (11B / 90B): the image encoder feeding gated cross-attention layers that are
interleaved into an unchanged Llama 3.1 text model.

Shapes: B batch, S text length, M images per row, T tiles, V = M*T*n_tokens image tokens.

Design choices:
* The text part reuses `herd.model.llama` as is (TransformerBlock, RMSNorm, FeedForward, RoPE,
  AttentionMask); only the layer loop lives here. Meta's numbering is kept: self-attention layers
  `text_model.layers.0..n-1` plus `text_model.cross_attention_layers.0..k-1`, cross layer j running
  just before self layer `fusion_schedule[j]` (3, 7, ..., 31 for 11B). HF numbers one list of
  n + k layers; cross layer j is HF layer `fusion_schedule[j] + j` (3, 8, 13, ...).
* The 8 extra token ids (vocab..vocab+7, `<|image|>` = 128256 among them) come from Meta's
  `learnable_embedding`; HF stores them as the last 8 rows of `embed_tokens`.
* Cross-attention keys/values depend only on the images, so `encode_images` computes them once
  per request (`CrossKV`) and every prefill/decode step reuses them; self-attention uses the usual
  KV cache. No RoPE on cross-attention; q and k get a per-head RMSNorm.
* Text rows that see no image (before the first `<|image|>`): Meta's reference zeroes both the
  attention output and the MLP output of every cross layer for such a row, so it is computed
  exactly as by the text-only model. transformers (checked 5.3) zeroes only the MLP output and lets
  the row attend to every image token (the mask row becomes all-zero), so its logits for those rows
  (and later rows, through self-attention) differ; herd follows Meta.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from herd.model.args import ModelArgs, RopeScaling
from herd.model.llama import AttentionMask, Cache, FeedForward, RMSNorm, TransformerBlock
from herd.model.rope import precompute_freqs_cis
from herd.model.vision import VisionArgs, VisionEncoder

IMAGE_TOKEN_ID = 128256  # <|image|> in model input (the tokenizer's 128011 is remapped here)
N_LEARNABLE_TOKENS = 8


@dataclass
class MllamaArgs:
    text: ModelArgs
    vision: VisionArgs = field(default_factory=VisionArgs)
    n_cross_layers: int = 8

    def __post_init__(self) -> None:
        if not 0 < self.n_cross_layers <= self.text.n_layers:
            raise ValueError(
                f"n_cross_layers must be in 1..{self.text.n_layers} (one per self-attention layer at most), "
                f"got {self.n_cross_layers}"
            )

    @property
    def fusion_schedule(self) -> list[int]:
        """The self-attention layer each cross layer precedes: Meta's uniform spread from the top."""
        n, k = self.text.n_layers, self.n_cross_layers
        step = math.ceil(n / k)
        return list(range(n))[::-1][::step][:k][::-1]

    @property
    def hf_cross_layers(self) -> list[int]:
        """Cross layers' indices in HF's single list of n + k decoder layers."""
        return [layer + j for j, layer in enumerate(self.fusion_schedule)]

    def num_params(self) -> int:
        with torch.device("meta"):
            model = Mllama(self)
        return sum(p.numel() for p in model.parameters())


_VISION_11B = VisionArgs()  # ViT-H/14, 32 local + 8 global layers, 560 px tiles, 4 tiles

PRESETS: dict[str, MllamaArgs] = {
    "llama3.2-11b-vision": MllamaArgs(
        text=ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, multiple_of=1024, ffn_dim_multiplier=1.3,
                       rope_scaling=RopeScaling(factor=8.0), max_seq_len=131072),
        vision=_VISION_11B, n_cross_layers=8,
    ),
    "llama3.2-90b-vision": MllamaArgs(
        text=ModelArgs(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, multiple_of=4096, ffn_dim_multiplier=1.3,
                       rope_scaling=RopeScaling(factor=8.0), max_seq_len=131072),
        vision=_VISION_11B, n_cross_layers=20,
    ),
}


@dataclass
class CrossKV:
    """Per-request image keys/values for every cross-attention layer: k[j], v[j] are (B, K, V, D)."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    n_images: int
    n_tiles: int


class CrossAttention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.head_dim = args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.q_norm = RMSNorm(args.head_dim, args.norm_eps)
        self.k_norm = RMSNorm(args.head_dim, args.norm_eps)

    def kv(self, image_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, V, _ = image_tokens.shape
        k = self.k_norm(self.wk(image_tokens).view(B, V, -1, self.head_dim)).transpose(1, 2)  # (B, K, V, D)
        v = self.wv(image_tokens).view(B, V, -1, self.head_dim).transpose(1, 2)
        return k, v

    def forward(self, x, k, v, mask: torch.Tensor, row_mask: torch.Tensor) -> torch.Tensor:
        B, S, _ = x.shape
        q = self.q_norm(self.wq(x).view(B, S, -1, self.head_dim)).transpose(1, 2)  # (B, H, S, D)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])
        out = out * row_mask  # rows that see no image contribute nothing (Meta)
        return self.wo(out.transpose(1, 2).reshape(B, S, -1))


class CrossAttentionBlock(nn.Module):
    """Gated cross-attention + gated SwiGLU; both gates start at 0, so a fresh block is the identity."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = CrossAttention(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.gate_attn = nn.Parameter(torch.zeros(1))
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.gate_ffwd = nn.Parameter(torch.zeros(1))

    def forward(self, x, k, v, mask, row_mask):
        h = x + self.gate_attn.tanh() * self.attention(self.attention_norm(x), k, v, mask, row_mask)
        f = self.feed_forward(self.ffn_norm(h)) * row_mask[:, 0]  # (B, S, dim) * (B, S, 1)
        return h + self.gate_ffwd.tanh() * f


def cross_attention_masks(
    cross_mask: torch.Tensor, n_tokens: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, S, M, T) 0/1 tile visibility -> additive mask (B, 1, S, V) and row mask (B, 1, S, 1).

    Each tile's n_tokens image tokens share its bit. A row that sees no tile at all gets a zero
    additive row (so attention stays finite) and row mask 0 (so its output is dropped).
    """
    B, S, M, T = cross_mask.shape
    visible = cross_mask.to(torch.bool).repeat_interleave(n_tokens, dim=3).reshape(B, 1, S, M * T * n_tokens)
    row = visible.any(dim=-1, keepdim=True)  # (B, 1, S, 1)
    additive = torch.zeros(visible.shape, dtype=dtype, device=visible.device)
    additive.masked_fill_(~visible & row, torch.finfo(dtype).min)
    return additive, row.to(dtype)


class VisionModel(nn.Module):
    def __init__(self, args: MllamaArgs):
        super().__init__()
        self.vision_encoder = VisionEncoder(args.vision)
        self.vision_projection = nn.Linear(args.vision.output_dim, args.text.dim, bias=True)

    def forward(self, images, ar_ids, ar_mask) -> torch.Tensor:
        x = self.vision_projection(self.vision_encoder(images, ar_ids, ar_mask))  # (B, M, T, n_tokens, dim)
        return x.reshape(x.shape[0], -1, x.shape[-1])  # (B, V, dim)


class TextModel(nn.Module):
    def __init__(self, args: MllamaArgs):
        super().__init__()
        t = args.text
        self.args = args
        self.tok_embeddings = nn.Embedding(t.vocab_size, t.dim)
        self.learnable_embedding = nn.Embedding(N_LEARNABLE_TOKENS, t.dim)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(i, t) for i in range(t.n_layers)})
        self.cross_attention_layers = nn.ModuleDict(
            {str(j): CrossAttentionBlock(t) for j in range(args.n_cross_layers)}
        )
        self.norm = RMSNorm(t.dim, t.norm_eps)
        self.output = nn.Linear(t.dim, t.vocab_size, bias=False)
        self.register_buffer("freqs_cis", self._rope_table(), persistent=False)
        self._cross_before = {layer: j for j, layer in enumerate(args.fusion_schedule)}

    def _rope_table(self, device=None) -> torch.Tensor:
        t = self.args.text
        return precompute_freqs_cis(t.head_dim, t.max_seq_len, t.rope_theta, t.rope_scaling, device=device)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        vocab = self.tok_embeddings.num_embeddings
        on_meta = tokens.device.type == "meta"  # shape checks only: a meta tensor has no values
        if not on_meta and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab + N_LEARNABLE_TOKENS):
            raise ValueError(f"token ids must lie in 0..{vocab + N_LEARNABLE_TOKENS - 1} (vocab + 8 image/extra "
                             f"tokens); got {int(tokens.min())}..{int(tokens.max())}")
        new = tokens >= vocab
        h = self.tok_embeddings(tokens.clamp(max=vocab - 1))
        extra = self.learnable_embedding((tokens - vocab).clamp(min=0)).to(h.dtype)
        return torch.where(new.unsqueeze(-1), extra, h)  # (B, S, dim)


class Mllama(nn.Module):
    def __init__(self, args: MllamaArgs):
        super().__init__()
        self.args = args
        self.vision_model = VisionModel(args)
        self.text_model = TextModel(args)

    def encode_images(self, images: torch.Tensor, aspect_ratio_ids: torch.Tensor,
                      aspect_ratio_mask: torch.Tensor) -> CrossKV:
        """Run the vision encoder once and project each cross layer's keys/values (reused every step)."""
        tokens = self.vision_model(images, aspect_ratio_ids, aspect_ratio_mask)  # (B, V, dim)
        kvs = [layer.attention.kv(tokens) for layer in self.text_model.cross_attention_layers.values()]
        return CrossKV([k for k, _ in kvs], [v for _, v in kvs], n_images=images.shape[1], n_tiles=images.shape[2])

    def hidden(
        self,
        tokens: torch.Tensor,
        *,
        cross_kv: CrossKV | None = None,
        cross_attention_mask: torch.Tensor | None = None,
        pos: int | torch.Tensor = 0,
        cache: Cache | None = None,
    ) -> torch.Tensor:
        """Final-normed hidden states (B, S, dim).

        cross_kv: from `encode_images`; None runs the text model alone (cross layers skipped, as
            both references do for a text-only request).
        cross_attention_mask: (B, S, M, T), 1 where the token may see that image tile; the rows
            of exactly these S tokens (for a decode step, the new token's row).
        pos: int start position or (B|1, S) positions; cache: self-attention KV cache
            (`herd.generate.KVCache` built with the text args), None to attend within `tokens`.
        """
        t = self.text_model
        B, S = tokens.shape
        from_zero = isinstance(pos, int) and pos == 0
        if isinstance(pos, int):
            pos = torch.arange(pos, pos + S, device=tokens.device).unsqueeze(0)
        kv_len = int(pos.max()) + 1 if cache is not None else S
        mask = AttentionMask(pos, kv_len=kv_len, doc_ids=None, cached=cache is not None, from_zero=from_zero)
        freqs_cis = t.freqs_cis[pos]
        h = t.embed(tokens)
        xmask = row_mask = None
        if cross_kv is not None:
            want = (B, S, cross_kv.n_images, cross_kv.n_tiles)
            if cross_attention_mask is None or tuple(cross_attention_mask.shape) != want:
                got = None if cross_attention_mask is None else tuple(cross_attention_mask.shape)
                raise ValueError(f"cross_attention_mask must be (batch, tokens, images, tiles) = {want} with images; "
                                 f"got {got}")
            xmask, row_mask = cross_attention_masks(cross_attention_mask, self.args.vision.n_tokens, h.dtype)
        for i, layer in t.layers.items():
            j = t._cross_before.get(int(i))
            if j is not None and cross_kv is not None:
                h = t.cross_attention_layers[str(j)](h, cross_kv.k[j], cross_kv.v[j], xmask, row_mask)
            h = layer(h, freqs_cis, mask, cache)
        return t.norm(h)

    def forward(
        self,
        tokens: torch.Tensor,
        *,
        images: torch.Tensor | None = None,
        aspect_ratio_ids: torch.Tensor | None = None,
        aspect_ratio_mask: torch.Tensor | None = None,
        cross_attention_mask: torch.Tensor | None = None,
        cross_kv: CrossKV | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """Logits (B, S, vocab) in fp32. With `images`, encodes them first (see `encode_images`);
        for decoding pass the request's `cross_kv` instead. Other keywords as in `hidden`."""
        if images is not None and cross_kv is not None:
            raise ValueError("pass either images (encoded now) or cross_kv (encoded earlier), not both")
        if images is not None:
            if aspect_ratio_ids is None or aspect_ratio_mask is None:
                raise ValueError("images need aspect_ratio_ids (batch, images) and aspect_ratio_mask (batch, images, "
                                 "tiles) from the image preprocessing")
            cross_kv = self.encode_images(images, aspect_ratio_ids, aspect_ratio_mask)
        h = self.hidden(tokens, cross_kv=cross_kv, cross_attention_mask=cross_attention_mask, **kwargs)
        return self.text_model.output(h).float()

    # ---- materialisation -----------------------------------------------------------------

    def _apply(self, fn, recurse=True):
        # As in llama.Transformer: the complex RoPE table is a pure function of args; rebuild it
        # (fp32 complex) on wherever fn sends tensors instead of letting .to(dtype) mangle it.
        t = self.text_model
        table = t._buffers.pop("freqs_cis")
        try:
            super()._apply(fn, recurse)
        finally:
            t._buffers["freqs_cis"] = table
        t.freqs_cis = t._rope_table(fn(torch.zeros((), device=table.device)).device)
        return self

    @torch.no_grad()
    def init_weights(self, *, generator: torch.Generator | None = None, std: float = 0.02) -> None:
        """Random weights for tests and from-scratch experiments: N(0, std) matrices and embeddings,
        unit norms, zero biases, and gates at 0 except the global encoder's (pi/4, HF's init)
        so every path is exercised."""
        for name, p in self.named_parameters():
            if name.endswith(("norm.weight", "ln_1.weight", "ln_2.weight", "ln_pre.weight", "ln_post.weight")):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            elif name.endswith(("gate", "gate_attn", "gate_ffwd", "gate_ffn")):
                p.fill_(math.pi / 4 if "global_transformer" in name else 0.0)
            else:
                p.normal_(0.0, std, generator=generator)


def build_mllama(args: MllamaArgs, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 init: bool = True, seed: int | None = None) -> Mllama:
    """Build on the meta device, then materialise; init=False leaves weights for a checkpoint."""
    with torch.device("meta"):
        model = Mllama(args)
    model.to_empty(device=device)
    model.to(dtype)
    if init:
        gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
        model.init_weights(generator=gen)
    return model
