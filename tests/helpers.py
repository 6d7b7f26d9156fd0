"""Model builders shared by the tests (import as `from tests.helpers import ...`).

Greedy comparisons between two decoding paths (batched and single-row, speculative and plain,
server and library) must not hinge on near-ties between the two best tokens, which a random
model is full of: its logits are nearly flat. `sharpened` scales the output head so the best
token wins by a margin far above the last-bit differences of the paths being compared.
"""

from __future__ import annotations

import torch

from herd.model import ModelArgs, build_model
from herd.model.llama import Transformer


def sharpened(model: Transformer, factor: float) -> Transformer:
    """`model` with its output head scaled by `factor` (in place), in eval mode."""
    with torch.no_grad():
        model.output.weight.mul_(factor)
    return model.eval()


def target_and_draft(args: ModelArgs, *, seed: int = 3, draft_seed: int = 4,
                     factor: float = 20.0) -> tuple[Transformer, Transformer]:
    """A sharpened target and a one-layer draft sharing its embeddings, first block and head, so
    the draft agrees with the target part of the time (neither always nor never)."""
    target = sharpened(build_model(args, seed=seed), factor)
    draft = build_model(args.replace(n_layers=1), seed=draft_seed)
    draft.load_state_dict({k: v for k, v in target.state_dict().items()
                           if not k.startswith(tuple(f"layers.{i}." for i in range(1, args.n_layers)))})
    return target, draft.eval()
