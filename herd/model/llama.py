"""The Llama 3 / 3.1 / 3.2 decoder: pure math, one screen per part.

Shapes: B batch, S query length, L key length (cache), H query heads, K kv heads, D head dim.

Design choices:
* Parameter names are Meta's checkpoint names, so `consolidated.*.pth` loads with strict=True.
* No distributed code, device choice or I/O here; parallelism, compile, checkpointing and
  quantization are applied from outside (`herd.parallel`, `herd.quant`).
* Attention is one call to SDPA with `enable_gqa`: on CPU it dispatches to the flash kernel
  and avoids materialising repeated K/V (10x faster than repeat_interleave at long context);
  query head h uses KV head h // n_rep, the same grouping as Meta's `repeat_kv`.
* Inference state is explicit: a cache object (`herd.generate.KVCache` or anything with the
  same `update`) is passed in; `cache=None` means training / full recomputation.
* Positions are per row (B, S). Ragged batches, continuous batching and packed documents all
  reduce to "which key positions may this query see", built once per forward as one mask.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from herd.model.args import ModelArgs
from herd.model.rope import apply_rotary_emb, precompute_freqs_cis


class Cache(Protocol):
    def update(
        self, layer_id: int, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, K, S, D) at positions pos (B or 1, S); return all keys/values (B, K, Lmax, D)."""
        ...


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32, round to the input dtype, *then* scale: Meta's (and HF's) order.
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class Attention(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.layer_id = layer_id
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, mask: AttentionMask, cache: Cache | None):
        B, S, _ = x.shape
        q = self.wq(x).view(B, S, -1, self.head_dim)  # (B, S, H, D); -1 lets TP shard heads
        k = self.wk(x).view(B, S, -1, self.head_dim)  # (B, S, K, D)
        v = self.wv(x).view(B, S, -1, self.head_dim)
        q, k = apply_rotary_emb(q, freqs_cis), apply_rotary_emb(k, freqs_cis)  # K is cached post-RoPE
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H|K, S, D)
        if cache is not None:
            k, v = cache.update(self.layer_id, k, v, mask.pos)  # (B, K, Lmax, D)
            k, v = k[:, :, : mask.kv_len], v[:, :, : mask.kv_len]  # (B, K, L, D)
        out = self.attend(q, k, v, mask)  # (B, H, S, D)
        return self.wo(out.transpose(1, 2).reshape(B, S, -1))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
        """Scores and weighted values: q (B, H, S, D) over k, v (B, K, L, D) -> (B, H, S, D).

        The one seam for attention applied from outside: context parallelism replaces it per
        module to attend local queries over keys gathered from other ranks.
        """
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask.mask, is_causal=mask.is_causal, enable_gqa=q.shape[1] != k.shape[1]
        )


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)  # gate
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)  # down
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)  # up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.attention = Attention(layer_id, args)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, freqs_cis, mask, cache):
        h = x + self.attention(self.attention_norm(x), freqs_cis, mask, cache)
        return h + self.feed_forward(self.ffn_norm(h))


class AttentionMask:
    """Which keys each query may see, computed once per forward and shared by all layers.

    `mask` is None with `is_causal=True` for the common training case (SDPA's fastest path),
    None with `is_causal=False` when every query sees every cached key (single-row decode with
    kv_len = position + 1), else a boolean (B, 1, S, L) tensor: key slot <= query slot, and the
    same document. `fixed_len`: kv_len was chosen by the caller (e.g. the whole static cache),
    so it may exceed the positions and the mask is always built.
    """

    def __init__(
        self, pos: torch.Tensor, *, kv_len: int, doc_ids: torch.Tensor | None, cached: bool, from_zero: bool = False,
        fixed_len: bool = False,
    ):
        self.pos, self.kv_len = pos, kv_len  # pos: (B or 1, S)
        S = pos.shape[1]
        self.is_causal, self.mask = False, None
        if doc_ids is None and (not cached or from_zero):
            self.is_causal = True  # every row's queries are positions 0..S-1 over keys 0..S-1
        elif cached and not fixed_len and pos.shape[0] == 1 and S == 1:
            pass  # the newest token of a single sequence sees all kv_len cached keys
        else:
            # With a cache, slot p holds position p; without one, keys are the tokens themselves
            # and causality is by index (positions may restart at document starts).
            q_slot = pos if cached else torch.arange(S, device=pos.device).unsqueeze(0)
            key_slot = torch.arange(kv_len, device=pos.device)
            mask = key_slot.view(1, 1, kv_len) <= q_slot.unsqueeze(-1)  # (B, S, L)
            if doc_ids is not None:
                mask = mask & (doc_ids.unsqueeze(-1) == doc_ids.unsqueeze(1))
            self.mask = mask.unsqueeze(1)  # (B, 1, S, L)


def positions_from_doc_ids(doc_ids: torch.Tensor) -> torch.Tensor:
    """Positions that restart at 0 where the document id changes: (B, S) -> (B, S)."""
    B, S = doc_ids.shape
    idx = torch.arange(S, device=doc_ids.device).expand(B, S)
    is_start = torch.ones_like(doc_ids, dtype=torch.bool)
    is_start[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    start = torch.where(is_start, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - start


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        # A ModuleDict keeps the checkpoint names "layers.N" even after pipeline stages delete some.
        self.layers = nn.ModuleDict({str(i): TransformerBlock(i, args) for i in range(args.n_layers)})
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.register_buffer("freqs_cis", self._rope_table(), persistent=False)  # (max_seq_len, D/2)

    def _rope_table(self, device=None) -> torch.Tensor:
        a = self.args
        return precompute_freqs_cis(a.head_dim, a.max_seq_len, a.rope_theta, a.rope_scaling, device=device)

    def hidden(
        self,
        tokens: torch.Tensor,
        *,
        pos: torch.Tensor | int | None = None,
        cache: Cache | None = None,
        doc_ids: torch.Tensor | None = None,
        kv_len: int | None = None,
    ) -> torch.Tensor:
        """Final-normed hidden states (B, S, dim), before the output head.

        pos: positions of `tokens`, (B, S) or (1, S) or the int start of a shared range;
             default 0..S-1, or restarting at each document when `doc_ids` is given.
        cache: KV cache to read and extend (inference). None: attend within `tokens` only.
        doc_ids: (B, S) document id per token for packed training; attention never crosses
             a change of id. Not combinable with a cache.
        kv_len: with a cache, attend over its first kv_len slots (masked by position). Default:
             the furthest position + 1, which reads `pos` on the host. A fixed value (the cache
             length) keeps shapes static and the step free of host syncs, for torch.compile.
        """
        B, S = tokens.shape
        if doc_ids is not None and cache is not None:
            raise ValueError("doc_ids (packed training) cannot be combined with a KV cache")
        if pos is None:
            pos = positions_from_doc_ids(doc_ids) if doc_ids is not None else 0
        from_zero = isinstance(pos, int) and pos == 0  # an int 0: a fresh prefill, SDPA's causal fast path applies
        if isinstance(pos, int):
            pos = torch.arange(pos, pos + S, device=tokens.device).unsqueeze(0)  # (1, S)
        fixed_len = kv_len is not None
        if fixed_len and cache is None:
            raise ValueError("kv_len sets how much of a KV cache to read; it needs cache=")
        if not fixed_len:  # the cache is read up to the furthest position any row has reached
            kv_len = int(pos.max()) + 1 if cache is not None else S
        mask = AttentionMask(pos, kv_len=kv_len, doc_ids=doc_ids, cached=cache is not None, from_zero=from_zero,
                             fixed_len=fixed_len)
        freqs_cis = self.freqs_cis[pos]  # (B or 1, S, D/2)

        h = self.tok_embeddings(tokens)  # (B, S, dim)
        for layer in self.layers.values():
            h = layer(h, freqs_cis, mask, cache)
        return self.norm(h)

    def forward(self, tokens: torch.Tensor, **kwargs) -> torch.Tensor:
        """Logits (B, S, vocab) in fp32; keyword arguments as in `hidden`."""
        return self.output(self.hidden(tokens, **kwargs)).float()

    # ---- materialisation -----------------------------------------------------------------

    def tie_weights(self) -> None:
        """Re-point output at the embedding (needed after load_state_dict(assign=True))."""
        if self.args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def init_rope(self) -> None:
        """(Re)build the RoPE table on the parameters' device, e.g. after `to_empty`."""
        self.freqs_cis = self._rope_table(self.freqs_cis.device)

    def _apply(self, fn, recurse=True):
        # `.to(torch.bfloat16)` would cast the complex64 table to real bf16 (dropping the
        # imaginary part), and `to_empty` leaves it uninitialised. The table is a pure function
        # of args, so rebuild it in fp32 complex on whatever device it moved to.
        table = self._buffers.pop("freqs_cis")
        try:
            super()._apply(fn, recurse)
        finally:
            self._buffers["freqs_cis"] = table
        device = fn(torch.zeros((), device=table.device)).device  # where fn sends tensors
        self.freqs_cis = self._rope_table(device)
        return self

    @torch.no_grad()
    def init_weights(self, *, generator: torch.Generator | None = None) -> None:
        """Random initialisation for training from scratch.

        Normal(0, 0.02) for input projections, and 0.02 / sqrt(2 * n_layers) for the two
        projections that write into the residual stream (wo, w2), so the residual variance does
        not grow with depth (GPT-2's rule). Untied embeddings are N(0, 1) like torchtitan; a tied
        matrix must also serve as the output head, so it gets the output scale dim**-0.5.
        """
        a = self.args
        std, out_std = 0.02, 0.02 / (2 * a.n_layers) ** 0.5
        for layer in self.layers.values():
            for lin in (layer.attention.wq, layer.attention.wk, layer.attention.wv, layer.feed_forward.w1,
                        layer.feed_forward.w3):
                nn.init.normal_(lin.weight, std=std, generator=generator)
            for lin in (layer.attention.wo, layer.feed_forward.w2):
                nn.init.normal_(lin.weight, std=out_std, generator=generator)
            layer.attention_norm.weight.fill_(1.0)
            layer.ffn_norm.weight.fill_(1.0)
        self.norm.weight.fill_(1.0)
        if a.tie_embeddings:
            nn.init.normal_(self.tok_embeddings.weight, std=a.dim**-0.5, generator=generator)
        else:
            nn.init.normal_(self.tok_embeddings.weight, std=1.0, generator=generator)
            nn.init.normal_(self.output.weight, std=a.dim**-0.5, generator=generator)
        self.init_rope()


def build_model(
    args: ModelArgs,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    init: bool = True,
    seed: int | None = None,
) -> Transformer:
    """Build on the meta device (no memory), then materialise on `device` in `dtype`.

    With init=False the parameters are left uninitialised (to be filled by a checkpoint); the
    RoPE table is always computed.
    """
    with torch.device("meta"):
        model = Transformer(args)
    model.to_empty(device=device)
    model.to(dtype)
    model.tie_weights()
    if init:
        gen = None
        if seed is not None:
            gen = torch.Generator(device=device).manual_seed(seed)
        model.init_weights(generator=gen)
    else:
        model.init_rope()
    return model
