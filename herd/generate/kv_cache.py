"""A static key/value cache: one preallocated buffer per layer, one row per sequence.

Static buffers (sized once, never reallocated) keep decoding free of allocator churn and
give `torch.compile` fixed shapes. Each row is an independent sequence whose token at
position p lives in slot p, so rows of different lengths share one batch (ragged prompts,
continuous batching) and the model's position mask decides what each query may read.
"""

from __future__ import annotations

import torch

from herd.model.args import ModelArgs


class KVCache:
    def __init__(
        self,
        args: ModelArgs,
        *,
        batch_size: int,
        max_seq_len: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        n_layers: int | None = None,
    ):
        if batch_size <= 0 or max_seq_len <= 0:
            raise ValueError(f"KVCache needs batch_size > 0 and max_seq_len > 0, got {batch_size}, {max_seq_len}")
        if max_seq_len > args.max_seq_len:
            raise ValueError(
                f"KVCache max_seq_len {max_seq_len} exceeds the model's max_seq_len {args.max_seq_len}; "
                "lower it or build the model with a longer RoPE table"
            )
        self.batch_size, self.max_seq_len = batch_size, max_seq_len
        shape = (batch_size, args.n_kv_heads, max_seq_len, args.head_dim)  # (B, K, Lmax, D)
        n = args.n_layers if n_layers is None else n_layers
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n)]

    def update(
        self, layer_id: int, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, K, S, D) at positions pos (B or 1, S); return the whole buffers."""
        kc, vc = self.k[layer_id], self.v[layer_id]
        B = k.shape[0]
        if pos.shape[0] == 1:
            # Every row writes the same positions: one strided copy, no index tensors per row.
            kc[:B].index_copy_(2, pos[0], k.to(kc.dtype))
            vc[:B].index_copy_(2, pos[0], v.to(vc.dtype))
        else:
            rows = torch.arange(B, device=pos.device).unsqueeze(1)  # (B, 1)
            # Advanced indices split by a slice put their dims first: target is (B, S, K, D).
            kc[rows, :, pos] = k.transpose(1, 2).to(kc.dtype)
            vc[rows, :, pos] = v.transpose(1, 2).to(vc.dtype)
        return kc[:B], vc[:B]

    def reset(self) -> None:
        for t in (*self.k, *self.v):
            t.zero_()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))
