"""Inference: explicit KV cache, sampling and the generation loop."""

from herd.generate.compiled import CompiledDecoder, static_decode_step
from herd.generate.fast_decode import apply_fast_decode, remove_fast_decode
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
from herd.generate.speculative import (
    SpeculativeResult,
    SpeculativeStep,
    accept_drafts,
    speculative_generate,
    speculative_tokens,
)

__all__ = [
    "GREEDY",
    "CompiledDecoder",
    "GenerationResult",
    "KVCache",
    "SamplingParams",
    "SpeculativeResult",
    "SpeculativeStep",
    "StepEvent",
    "TextEvent",
    "accept_drafts",
    "apply_fast_decode",
    "decode_step",
    "generate",
    "generate_tokens",
    "pad_prompts",
    "prefill",
    "remove_fast_decode",
    "sample",
    "speculative_generate",
    "speculative_tokens",
    "static_decode_step",
    "stream_text",
    "truncated_probs",
]
