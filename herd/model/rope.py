"""Rotary position embeddings exactly as Meta computes them.

Pairs are *interleaved* (x[2i], x[2i+1]) and treated as one complex number, the rotation is
done in fp32 complex arithmetic, and the result is cast back to the activation dtype once.
That single rounding is what makes bf16 outputs equal Meta's reference; HF's layout
(rotate_half on permuted q/k rows, with cos/sin already rounded to bf16) differs in the last
bit for about a sixth of the elements. HF checkpoints are un-permuted on load instead
(`keymap.py`), so one RoPE serves both.

The table is complex64. A plain `module.to(torch.bfloat16)` would cast it to *real* bf16 (torch
drops the imaginary part with only a warning), so `Transformer._apply` (llama.py) takes the
table out of every move or cast and rebuilds it in fp32 complex on the new device: the angles
are never rounded to the weights' dtype.
"""

from __future__ import annotations

import math

import torch

from herd.model.args import RopeScaling


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    """Per-pair inverse wavelengths, (head_dim // 2,) fp32, with the 3.1 scaling applied."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32)[: head_dim // 2] / head_dim))
    if scaling is None:
        return freqs
    # Llama 3.1 scaling: long wavelengths (low frequencies) are slowed by `factor`, short ones
    # kept, and the band between the two thresholds blended linearly in 1/wavelength.
    low_freq_wavelen = scaling.original_max_seq_len / scaling.low_freq_factor
    high_freq_wavelen = scaling.original_max_seq_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / freqs
    scaled = torch.where(wavelen > low_freq_wavelen, freqs / scaling.factor, freqs)
    smooth = (scaling.original_max_seq_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    blended = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    in_band = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(in_band, blended, scaled)


def precompute_freqs_cis(
    head_dim: int, max_seq_len: int, theta: float, scaling: RopeScaling | None, *, device=None
) -> torch.Tensor:
    """Unit complex rotations for every position: (max_seq_len, head_dim // 2) complex64."""
    freqs = rope_frequencies(head_dim, theta, scaling).to(device)
    t = torch.arange(max_seq_len, dtype=torch.float32, device=device)
    angles = torch.outer(t, freqs)  # (S, D/2)
    # torch.polar, not cos/sin: the two differ by an ulp in ~5% of entries and Meta uses polar.
    return torch.polar(torch.ones_like(angles), angles)


def apply_rotary_emb(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, S, H, D) by freqs_cis (B or 1, S, D/2); returns x's dtype."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))  # (B, S, H, D/2)
    out = torch.view_as_real(xc * freqs_cis.unsqueeze(2)).flatten(3)  # (B, S, H, D)
    return out.type_as(x)
