"""Inference: explicit KV cache, sampling and the generation loop."""

from herd.generate.kv_cache import KVCache

__all__ = ["KVCache"]
