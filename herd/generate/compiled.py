"""Decoding with `torch.compile`: one fixed-shape step over the whole static cache.

Trade-off: the eager step reads only the cache prefix that some row has reached
(`kv_len = max(pos) + 1`, one host sync per step), the cheapest attention there is. A compiled
graph wants fixed shapes and no host syncs, so this step attends over *all* slots of the static
cache and lets the position mask hide the ones not yet written: more attention work, in
exchange for a single graph that never recompiles as sequences grow and that CUDA graphs can
replay. On a GPU that removes the per-kernel launch overhead that dominates small-batch
decoding (gpt-fast's ~4x). On CPU inductor's code was slower than eager in our measurements
(`research/inference.md` section 3.2), so compiling is opt-in and eager stays the default.

Sampling stays outside the graph: it needs a `torch.Generator`, which a graph cannot take,
and greedy argmax costs nothing next to the forward.
"""

from __future__ import annotations

import torch

from herd.generate.kv_cache import KVCache
from herd.model.llama import Transformer


def static_decode_step(model: Transformer, tokens: torch.Tensor, pos: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """`decode_step` with every shape fixed by the cache: tokens (B,), pos (B,) -> fp32 logits (B, V).

    Equal to `decode_step` up to float rounding (the extra, masked keys add exact zeros to the
    softmax, but the kernels see a longer key axis).
    """
    h = model.hidden(tokens.view(-1, 1), pos=pos.view(-1, 1), cache=cache, kv_len=cache.max_seq_len)  # (B, 1, dim)
    return model.output(h[:, -1]).float()  # (B, V)


class CompiledDecoder:
    """`static_decode_step` for one model and one cache, compiled on the first call.

    mode: `torch.compile` mode. Default: "reduce-overhead" (CUDA graphs) on CUDA, inductor's
        default elsewhere. With CUDA graphs the cache buffers are marked as static addresses
        (they are mutated in place every step, which CUDA graphs allow only for static inputs)
        and the logits are cloned, since a replay overwrites its output buffer.
    backend: the `torch.compile` backend; "aot_eager" traces the same graph without code
        generation (tests use it to check the graph captures whole, in a fraction of the time).

    The first call compiles (seconds on CPU, more on GPU); later calls with the same batch size
    reuse the graph. The batch size is the number of rows fed, at most `cache.batch_size`.
    """

    def __init__(self, model: Transformer, cache: KVCache, *, mode: str | None = None, backend: str = "inductor"):
        device = cache.k[0].device
        if mode is None and device.type == "cuda" and backend == "inductor":
            mode = "reduce-overhead"
        self.model, self.cache, self.mode = model, cache, mode
        self.cudagraphs = mode in ("reduce-overhead", "max-autotune")  # the modes that use CUDA graphs
        if self.cudagraphs:
            for t in (*cache.k, *cache.v):
                torch._dynamo.mark_static_address(t)
        # fullgraph: a graph break would hide a host sync, which this path exists to avoid.
        self._step = torch.compile(static_decode_step, fullgraph=True, dynamic=False, mode=mode, backend=backend)

    def __call__(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """tokens (B,) int64 at positions pos (B,) int64 -> fp32 logits (B, V)."""
        if self.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
            return self._step(self.model, tokens, pos, self.cache).clone()
        return self._step(self.model, tokens, pos, self.cache)
