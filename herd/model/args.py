"""Model hyperparameters, the named Llama 1 / 2 / 3 presets, and exact parameter / FLOP counts.

Presets are data: one dict of plain `ModelArgs` values, checked against Meta's published
`params.json` files and HF `config.json` files (see `shared/research/llama3-reference.md` §1;
Llama 1/2 from their own params.json and config.json).
The FFN width is not stored; it is derived with Meta's rule from `multiple_of` and
`ffn_dim_multiplier`, so a preset can never disagree with the checkpoint it describes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

# Longest context herd accepts. max_seq_len sizes the RoPE table (max_seq_len x head_dim/2
# complex64: 8 GiB here at head_dim 128) and bounds KV caches; no published model comes near it
# (Llama 3.1: 2**17; the longest open contexts, ~10M tokens, are below 2**24), so a larger value
# is a corrupt or hostile config, refused before terabytes are asked for.
MAX_SEQ_LEN = 2**24


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1 frequency scaling ("rope_type": "llama3" in HF configs).

    Wavelengths shorter than `original_max_seq_len / high_freq_factor` keep their frequency,
    those longer than `original_max_seq_len / low_freq_factor` are divided by `factor`, and the
    band in between is interpolated smoothly.
    """

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_seq_len: int = 8192

    def __post_init__(self) -> None:
        if self.factor <= 0:
            raise ValueError(f"rope scaling factor must be > 0, got {self.factor}")
        if not 0 < self.low_freq_factor < self.high_freq_factor:
            raise ValueError(
                "rope scaling needs 0 < low_freq_factor < high_freq_factor, got "
                f"{self.low_freq_factor} and {self.high_freq_factor}"
            )
        if self.original_max_seq_len <= 0:
            raise ValueError(f"original_max_seq_len must be > 0, got {self.original_max_seq_len}")


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None means plain multi-head attention (= n_heads)
    vocab_size: int = 128256
    multiple_of: int = 1024
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | None = None
    max_seq_len: int = 8192  # longest position the RoPE table covers
    tie_embeddings: bool = False  # Llama 3.2 1B/3B share tok_embeddings and output
    head_dim_override: int | None = field(default=None, repr=False)  # only if != dim // n_heads

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = RopeScaling(**self.rope_scaling)
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelArgs.{name} must be a positive integer, got {getattr(self, name)}")
        if self.max_seq_len > MAX_SEQ_LEN:
            raise ValueError(
                f"ModelArgs.max_seq_len = {self.max_seq_len} is longer than any model's context (herd's limit is "
                f"2**24 = {MAX_SEQ_LEN} positions; the RoPE table is max_seq_len x head_dim/2 complex numbers); "
                "pass the model's real context length"
            )
        if self.n_heads % self.n_kv_heads != 0:
            raise ValueError(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads}) for "
                "grouped-query attention"
            )
        if self.head_dim_override is None and self.dim % self.n_heads != 0:
            raise ValueError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if self.head_dim % 2 != 0:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for rotary embeddings")

    @property
    def head_dim(self) -> int:
        return self.head_dim_override or self.dim // self.n_heads

    @property
    def n_rep(self) -> int:
        """How many query heads share one KV head."""
        return self.n_heads // self.n_kv_heads

    @property
    def ffn_hidden_dim(self) -> int:
        # Meta's FeedForward rule: start from 4*dim, take 2/3 (SwiGLU has three matrices),
        # apply the multiplier, round up to multiple_of. Each int() truncation matters:
        # 1B gives int(1.5 * 5461) = 8191 -> 8192.
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    @classmethod
    def from_name(cls, name: str, **overrides) -> ModelArgs:
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; valid presets: {', '.join(sorted(PRESETS))}")
        return dataclasses.replace(PRESETS[name], **overrides)

    def replace(self, **changes) -> ModelArgs:
        return dataclasses.replace(self, **changes)

    # ---- sizes -------------------------------------------------------------------------

    def _layer_params(self) -> int:
        d, hd = self.dim, self.head_dim
        attn = d * self.n_heads * hd * 2 + d * self.n_kv_heads * hd * 2  # wq, wo, wk, wv
        ffn = 3 * d * self.ffn_hidden_dim
        return attn + ffn + 2 * d  # two RMSNorm weights

    def num_params(self, *, embeddings: bool = True) -> int:
        """Unique parameters; a tied output matrix is counted once.

        With `embeddings=False` the token embedding and an untied output head are left out
        (the "non-embedding" count used for FLOP estimates).
        """
        n = self.n_layers * self._layer_params() + self.dim  # + final norm
        if embeddings:
            n += self.vocab_size * self.dim * (1 if self.tie_embeddings else 2)
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward) at sequence length `seq_len`.

        6 * N for the matmuls, with N the parameters touched by matmuls (all but the
        embedding lookup and norms; the output head is a matmul even when tied), plus the
        attention score and value products: 2 matmuls * 2 FLOPs * 3 (fwd + bwd)
        * n_layers * n_heads * head_dim * seq_len. This is the convention torchtitan and the
        PaLM paper use for MFU; causal masking is not discounted.
        """
        if seq_len <= 0:
            raise ValueError(f"seq_len must be > 0, got {seq_len}")
        matmul_params = self.num_params(embeddings=False) + self.vocab_size * self.dim
        attention = 12 * self.n_layers * self.n_heads * self.head_dim * seq_len
        return 6 * matmul_params + attention

    def kv_cache_bytes_per_token(self, *, bytes_per_element: int = 2) -> int:
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * bytes_per_element


_LLAMA31_SCALING = RopeScaling(factor=8.0)
# Meta's reference code hard-codes factor 8 everywhere, but Meta confirmed 32 is right for
# 3.2 1B/3B (meta-llama/llama-models#166) and HF/torchtune configs use 32.
_LLAMA32_SCALING = RopeScaling(factor=32.0)

PRESETS: dict[str, ModelArgs] = {
    "llama3-8b": ModelArgs(
        dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, multiple_of=1024, ffn_dim_multiplier=1.3,
        max_seq_len=8192,
    ),
    "llama3-70b": ModelArgs(
        dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, multiple_of=4096, ffn_dim_multiplier=1.3,
        max_seq_len=8192,
    ),
    "llama3.1-8b": ModelArgs(
        dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, multiple_of=1024, ffn_dim_multiplier=1.3,
        rope_scaling=_LLAMA31_SCALING, max_seq_len=131072,
    ),
    "llama3.1-70b": ModelArgs(
        dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, multiple_of=4096, ffn_dim_multiplier=1.3,
        rope_scaling=_LLAMA31_SCALING, max_seq_len=131072,
    ),
    "llama3.1-405b": ModelArgs(
        dim=16384, n_layers=126, n_heads=128, n_kv_heads=8, multiple_of=4096, ffn_dim_multiplier=1.2,
        rope_scaling=_LLAMA31_SCALING, max_seq_len=131072,
    ),
    "llama3.2-1b": ModelArgs(
        dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, multiple_of=256, ffn_dim_multiplier=1.5,
        rope_scaling=_LLAMA32_SCALING, max_seq_len=131072, tie_embeddings=True,
    ),
    "llama3.2-3b": ModelArgs(
        dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, multiple_of=256, ffn_dim_multiplier=1.0,
        rope_scaling=_LLAMA32_SCALING, max_seq_len=131072, tie_embeddings=True,
    ),
    # Llama 1 and 2: SentencePiece vocabulary of 32,000, RoPE theta 10,000, no scaling, untied.
    # Shapes from Meta's params.json files (Llama 1 norm_eps 1e-6, Llama 2 1e-5) and the HF
    # config.json intermediate sizes 11008 / 13824 / 17920 / 22016 / 28672.
    "llama1-7b": ModelArgs(
        dim=4096, n_layers=32, n_heads=32, vocab_size=32000, multiple_of=256, norm_eps=1e-6, rope_theta=10000.0,
        max_seq_len=2048,
    ),
    "llama1-13b": ModelArgs(
        dim=5120, n_layers=40, n_heads=40, vocab_size=32000, multiple_of=256, norm_eps=1e-6, rope_theta=10000.0,
        max_seq_len=2048,
    ),
    "llama1-33b": ModelArgs(
        dim=6656, n_layers=60, n_heads=52, vocab_size=32000, multiple_of=256, norm_eps=1e-6, rope_theta=10000.0,
        max_seq_len=2048,
    ),
    "llama1-65b": ModelArgs(
        dim=8192, n_layers=80, n_heads=64, vocab_size=32000, multiple_of=256, norm_eps=1e-6, rope_theta=10000.0,
        max_seq_len=2048,
    ),
    "llama2-7b": ModelArgs(
        dim=4096, n_layers=32, n_heads=32, vocab_size=32000, multiple_of=256, norm_eps=1e-5, rope_theta=10000.0,
        max_seq_len=4096,
    ),
    "llama2-13b": ModelArgs(
        dim=5120, n_layers=40, n_heads=40, vocab_size=32000, multiple_of=256, norm_eps=1e-5, rope_theta=10000.0,
        max_seq_len=4096,
    ),
    "llama2-70b": ModelArgs(
        dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, vocab_size=32000, multiple_of=4096,
        ffn_dim_multiplier=1.3, norm_eps=1e-5, rope_theta=10000.0, max_seq_len=4096,
    ),
    # Tiny but structurally complete: GQA (n_rep=2), 3.1 scaling, odd-ish FFN rounding.
    # Runs a forward pass in milliseconds on CPU; the tests use it.
    "debug": ModelArgs(
        dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=32,
        ffn_dim_multiplier=1.3, rope_scaling=RopeScaling(factor=8.0, original_max_seq_len=64),
        max_seq_len=256,
    ),
}
