"""A real trained model end to end: SmolLM2-135M-Instruct from its Q4_1 GGUF, herd vs transformers.

Both read the same file and dequantize the same blocks to fp32 (transformers through its own
GGUF loader, the `smollm2_hf` fixture), so what is compared is the reading (names, q/k order,
config) and the model math, on weights a real training run produced.
"""

from __future__ import annotations

import pytest
import torch

from herd.generate import GREEDY, generate
from herd.model import load_model

pytest.importorskip("gguf")
pytest.importorskip("transformers")

PROMPTS = [
    ("What is the capital of France?", True),
    ("The three primary colors are", False),
    ("def fibonacci(n):\n", False),
]
NEW_TOKENS = 16  # each decode step of this 30-layer model costs ~0.1-1 s on a busy 2-core CPU
NEAR_TIE = 1e-3  # top-2 logit margin below which fp32 rounding may flip an argmax


@pytest.fixture(scope="module")
def herd_model(smollm2_gguf):
    return load_model(smollm2_gguf, dtype=torch.float32).eval()


def _ids(tokenizer, text: str, chat: bool) -> list[int]:
    if chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False).input_ids


def test_reads_the_real_config(herd_model):
    a = herd_model.args
    assert (a.n_layers, a.dim, a.n_heads, a.n_kv_heads, a.head_dim) == (30, 576, 9, 3, 64)
    assert (a.vocab_size, a.ffn_hidden_dim, a.rope_theta, a.rope_scaling) == (49152, 1536, 100000.0, None)
    assert a.tie_embeddings and herd_model.output.weight is herd_model.tok_embeddings.weight


def test_logits_match_transformers(herd_model, smollm2_hf):
    for text, chat in PROMPTS:
        ids = torch.tensor([_ids(smollm2_hf.tokenizer, text, chat)])
        with torch.no_grad():
            ours = herd_model(ids)[0]
            ref = smollm2_hf.model(ids).logits[0]
        assert (ours - ref).abs().max() < 1e-4, text


def test_greedy_continuations_match_transformers(herd_model, smollm2_hf):
    tok, hf = smollm2_hf.tokenizer, smollm2_hf.model
    prompts = [_ids(tok, text, chat) for text, chat in PROMPTS]
    ours = generate(herd_model, prompts, max_new_tokens=NEW_TOKENS, sampling=GREEDY)
    compared = 0
    for (text, _), prompt, result in zip(PROMPTS, prompts, ours):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=NEW_TOKENS,
                              min_new_tokens=NEW_TOKENS, eos_token_id=None, pad_token_id=tok.pad_token_id or 0)
        expected = out[0, len(prompt):].tolist()
        got = result.tokens
        diff = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), None)
        if diff is not None:  # allowed only where transformers itself sees a near-tie
            with torch.no_grad():
                top2 = hf(torch.tensor([prompt + expected[:diff]])).logits[0, -1].topk(2).values
            margin = float(top2[0] - top2[1])
            assert margin < NEAR_TIE, f"{text!r}: token {diff} differs with a clear margin {margin:.4f}"
        compared += len(got) if diff is None else diff
        if text.startswith("What is the capital"):
            assert "Paris" in tok.decode(expected)  # a real model, answering
    assert compared >= 2 * NEW_TOKENS  # most of the tokens were compared, not excused as ties
