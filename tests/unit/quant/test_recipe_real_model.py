"""The default int4 recipe on a real trained model: SmolLM2-135M-Instruct keeps its next-token choices.

Random-weight KL bounds never showed what an int4 output head does to a trained model: on 4,096
held-out Wikipedia tokens, int4 at group 32 agrees with fp32's top-1 on 84.8% of positions with
an int4 head and 98.0% with the default int8 head. The reference weights are the Q4_1 file
dequantized, so the blocks at group 32 are requantized almost exactly and what this test sees is
mostly the head's format: the regression it guards. Measured on these prompts (one sequence,
fp32's top-1 as the reference): default recipe 0.989, int4 head 0.904.
"""

from __future__ import annotations

import copy

import torch

from herd.model import build_model
from herd.quant import Int4Linear, Int8Linear, QuantConfig, quantize

PROMPTS = [
    "The llama is a domesticated South American camelid, widely used as a meat and pack animal by Andean "
    "cultures since the pre-Columbian era. Llamas are social animals and live with others as a herd.",
    "<|im_start|>user\nWhat is the capital of France, and which river runs through it?<|im_end|>\n"
    "<|im_start|>assistant\nThe capital of France is Paris. The Seine runs through the city.",
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n\n"
    "print([fibonacci(i) for i in range(10)])",
    "Photosynthesis is the process by which green plants use sunlight, water and carbon dioxide to make "
    "glucose and oxygen. It takes place mainly in the chloroplasts of leaf cells.",
]


def _top1(model, ids) -> torch.Tensor:
    with torch.inference_mode():
        return model(ids)[0].argmax(-1)


def test_default_int4_recipe_keeps_the_next_token_choices(smollm2_hf, smol_float):
    args, sd = smol_float
    base = build_model(args, init=False)
    base.load_state_dict(sd)
    base.eval()
    ids = smollm2_hf.tokenizer("\n\n".join(PROMPTS), return_tensors="pt").input_ids  # one forward
    ref = _top1(base, ids)

    model = base  # quantized in place: the float model is not needed again
    head = copy.deepcopy(base.output)
    report = quantize(model, QuantConfig("int4"))
    assert report.head == "int8" and isinstance(model.output, Int8Linear)
    assert {m.group_size for m in model.modules() if isinstance(m, Int4Linear)} == {32}
    agree = float((_top1(model, ids) == ref).float().mean())

    # head="same" differs from the default only in the head (test_quantize checks the blocks).
    model.output = Int4Linear.from_linear(head, group_size=32)
    agree_same = float((_top1(model, ids) == ref).float().mean())
    print(f"top-1 agreement on {ref.numel()} positions: default {agree:.3f}, head int4 {agree_same:.3f}")
    assert agree >= 0.96
    assert agree_same <= agree - 0.05  # what the int8 head buys
