"""Which weights run a decode step: one model's, or an equivalent twin's, picked per batch size.

Why: a GGUF file of Q4_1 blocks dequantized to fp32 streams 5x the bytes per decode step that its
int4 blocks do, and herd's fused decode op reads both formats. Which is faster depends on the rows:
one row is bound by the weight stream (int4 wins; SmolLM2-135M at one thread, quiet machine: 22
against 36 ms), sixteen rows by arithmetic, where unpacking int4 for every row costs more than
the bytes it saves (313 against 178 ms there), and where the line falls moves with the CPU and
with what else is running. So both are held (the int4 layers add a fifth of the fp32 model's
bytes; embedding, norms and head are shared) and each batch size is timed once at start-up on
the engine's own cache; every later step of that size runs on the faster one.

Both must compute the same function (`herd.generate.loading.q4_decode_twin` builds the int4 twin
from the same blocks the fp32 model was dequantized from), so a sequence's tokens do not depend on
how many others share its steps, up to fp32 rounding order. Prefill always runs the main model:
at prompt sizes MKL's GEMM over fp32 beats the int4 kernels (49 tokens: 259 against 403 ms).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from herd.generate import KVCache, decode_step
from herd.model.llama import Transformer

MODES = ("auto", "always", "never")


@dataclass
class DecodeChoice:
    """models: name -> model (the first is the main one); by_rows: batch size -> the name that
    decodes it; timings_ms: batch size -> name -> best step time measured (empty unless timed)."""

    models: dict[str, Transformer]
    by_rows: dict[int, str]
    timings_ms: dict[int, dict[str, float]]

    def pick(self, rows: int) -> Transformer:
        """The model for a step of `rows` rows: the choice at the smallest measured size >= rows."""
        sizes = sorted(self.by_rows)
        size = next((s for s in sizes if s >= rows), sizes[-1])
        return self.models[self.by_rows[size]]

    def describe(self) -> str:
        return ", ".join(f"{b} rows: {self.by_rows[b]}" + (
            " (" + " / ".join(f"{n} {ms:.0f} ms" for n, ms in self.timings_ms[b].items()) + ")"
            if b in self.timings_ms else "") for b in sorted(self.by_rows))


def batch_sizes(max_batch: int) -> list[int]:
    """Powers of two up to max_batch, and max_batch itself."""
    out = [b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256) if b < max_batch]
    return [*out, max_batch]


def choose_decode(models: Mapping[str, Transformer], cache: KVCache, *, mode: str = "auto", repeats: int = 5,
                  sizes: Sequence[int] | None = None,
                  timer: Callable[[], float] = time.perf_counter) -> DecodeChoice:
    """Which of `models` (name -> model; the first is the main one, the second its twin) decodes each
    batch size. mode "auto": time `repeats` decode steps of each at each size on `cache` (whose rows
    it writes at position 0, which a newcomer's prefill overwrites before anyone reads it) and take
    the one with the faster best step (on a shared CPU the minimum is the figure other processes
    disturb least: with the median of 3, one run picked fp32 at 2 rows between int4 wins at 1 and 4); "always": the twin at every size; "never": the main model only."""
    if mode not in MODES:
        raise ValueError(f"unknown decode choice {mode!r}; use one of {', '.join(MODES)}")
    names = list(models)
    if not names or (mode != "never" and len(names) < 2):
        raise ValueError(f"decode choice {mode!r} needs a main model and its twin, got {names}")
    sizes = list(sizes or batch_sizes(cache.batch_size))
    if max(sizes) > cache.batch_size:
        raise ValueError(f"batch sizes {sizes} exceed the cache's {cache.batch_size} rows")
    if mode != "auto":
        name = names[1] if mode == "always" else names[0]
        return DecodeChoice(dict(models), {b: name for b in sizes}, {})
    timings: dict[int, dict[str, float]] = {}
    with torch.inference_mode():
        for b in sizes:
            tokens = torch.zeros(b, dtype=torch.long, device=cache.k[0].device)
            pos = torch.zeros(b, dtype=torch.long, device=cache.k[0].device)
            timings[b] = {}
            for name, model in models.items():
                decode_step(model, tokens, pos, cache)  # first call: kernel plans, allocator
                times = []
                for _ in range(repeats):
                    t0 = timer()
                    decode_step(model, tokens, pos, cache)
                    times.append(timer() - t0)
                timings[b][name] = 1000 * min(times)
    by_rows = {b: min(t, key=t.__getitem__) for b, t in timings.items()}
    return DecodeChoice(dict(models), by_rows, timings)
