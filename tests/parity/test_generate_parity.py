"""Greedy generation token-for-token against HF transformers on a tiny random Llama."""

import pytest
import torch

import herd
from herd.generate import GREEDY, generate
from herd.model import ModelArgs

transformers = pytest.importorskip("transformers")

ARGS = ModelArgs.from_name("debug")  # GQA, llama3 rope scaling, ffn rounding: all exercised


def _hf_model():
    a = ARGS
    cfg = transformers.LlamaConfig(
        vocab_size=a.vocab_size, hidden_size=a.dim, intermediate_size=a.ffn_hidden_dim,
        num_hidden_layers=a.n_layers, num_attention_heads=a.n_heads, num_key_value_heads=a.n_kv_heads,
        max_position_embeddings=a.max_seq_len, rms_norm_eps=a.norm_eps, tie_word_embeddings=False,
        rope_theta=a.rope_theta,
        rope_scaling=dict(rope_type="llama3", factor=a.rope_scaling.factor,
                          low_freq_factor=a.rope_scaling.low_freq_factor,
                          high_freq_factor=a.rope_scaling.high_freq_factor,
                          original_max_position_embeddings=a.rope_scaling.original_max_seq_len),
        initializer_range=0.1,  # larger than HF's 0.02 so attention and MLP matter, not just the embedding
        bos_token_id=None, eos_token_id=None, pad_token_id=0,
        attn_implementation="eager", dtype=torch.float32,
    )
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        hf.lm_head.weight.mul_(20.0)  # peaked logits: greedy paths do not hinge on near-ties
    return hf


PROMPTS = [[1, 45, 99, 7, 200, 13, 62], [3, 18], [128, 4, 77, 250, 9, 31, 5, 66, 90, 101, 2]]


def test_greedy_32_tokens_identical_to_hf(tmp_path):
    hf = _hf_model()
    hf.save_pretrained(tmp_path)
    ours = herd.load_model(tmp_path).eval()  # HF safetensors -> herd, q/k rows un-permuted
    assert ours.args.rope_scaling == ARGS.rope_scaling and ours.args.ffn_hidden_dim == ARGS.ffn_hidden_dim
    results = generate(ours, PROMPTS, max_new_tokens=32, sampling=GREEDY)
    for prompt, r in zip(PROMPTS, results):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=32,
                              min_new_tokens=32, eos_token_id=None, pad_token_id=0)
        expected = out[0, len(prompt):].tolist()
        assert len(expected) == 32
        assert r.tokens == expected, f"prompt {prompt}: first difference at {_first_diff(r.tokens, expected)}"
        # The comparison means something only if no step was a near-tie for either model.
        with torch.no_grad():
            top2 = hf(torch.tensor([prompt + expected])).logits[0, len(prompt) - 1 : -1].topk(2, dim=-1).values
        assert float((top2[:, 0] - top2[:, 1]).min()) > 1e-3
    assert len({tuple(r.tokens) for r in results}) == len(PROMPTS), "degenerate model: all prompts give the same output"


def _first_diff(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
