"""Timing engines the same way in every benchmark: a run(n) callable per engine, interleaved reps.

run(n) generates n greedy tokens after a fixed prompt and returns (start, one timestamp as each
token becomes available): prefill time = stamps[0] - start, decode time = stamps[-1] - stamps[0].
Timing each token as it arrives (not the difference of two whole runs, each with its prefill)
keeps the prefill's noise out of the decode figure. llama.cpp's runner lives in its own process
(`llamacpp_client.LlamaCppProcess.run`) and times itself the same way.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from herd.generate import SamplingParams, generate_tokens

Runner = Callable[[int], tuple[float, list[float]]]


def herd_runner(model, prompt: list[int]) -> Runner:
    greedy = SamplingParams(temperature=0.0)

    def run(n: int) -> tuple[float, list[float]]:
        t0 = time.perf_counter()
        stamps = [time.perf_counter() for _ in generate_tokens(model, [prompt], max_new_tokens=n, sampling=greedy)]
        return t0, stamps

    return run


class _Stamps:
    """An HF streamer that only records when each token arrives (its first put is the prompt)."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def hf_runner(model, prompt: list[int] | torch.Tensor) -> Runner:
    ids = prompt if isinstance(prompt, torch.Tensor) else torch.tensor([prompt])

    def run(n: int) -> tuple[float, list[float]]:
        stamps = _Stamps()
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=0, streamer=stamps)
        return t0, stamps.times[1:]

    return run


def time_engines(engines: dict[str, dict], *, n: int, reps: int) -> None:
    """Warm each engine up, then run them in turn `reps` times; adds prefill_s / decode_s lists."""
    for e in engines.values():
        e["run"](2)  # first calls allocate, pick kernels, fault in mapped weights
        e["prefill_s"], e["decode_s"] = [], []
    for _ in range(reps):
        for name, e in engines.items():
            t0, stamps = e["run"](n)
            if len(stamps) != n:
                raise SystemExit(f"{name}: asked for {n} tokens, got {len(stamps)}")
            e["prefill_s"].append(stamps[0] - t0)
            e["decode_s"].append(stamps[-1] - stamps[0])
