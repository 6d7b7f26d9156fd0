"""Inference: explicit KV cache, sampling and the generation loop."""

from herd.generate.generate import (
    GenerationResult,
    StepEvent,
    TextEvent,
    decode_step,
    generate,
    generate_tokens,
    pad_prompts,
    prefill,
    stream_text,
)
from herd.generate.kv_cache import KVCache
from herd.generate.sampling import GREEDY, SamplingParams, sample, truncated_probs

__all__ = [
    "GREEDY",
    "GenerationResult",
    "KVCache",
    "SamplingParams",
    "StepEvent",
    "TextEvent",
    "decode_step",
    "generate",
    "generate_tokens",
    "pad_prompts",
    "prefill",
    "sample",
    "stream_text",
    "truncated_probs",
]
