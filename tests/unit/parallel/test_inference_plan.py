"""`herd plan --inference` against hand computation for Llama 3.1 405B.

405B: 126 layers, dim 16384, 128 query / 8 KV heads of 128, FFN 53248, vocabulary 128256.
Per layer: wq + wo 2 * 16384 * 16384, wk + wv 2 * 16384 * 1024, FFN 3 * 16384 * 53248, two norms.
"""

import json

import pytest

from herd.cli import main
from herd.model import ModelArgs
from herd.parallel.inference_plan import InferenceLayout, inference_plan

L405 = ModelArgs.from_name("llama3.1-405b")
LAYER = 2 * 16384 * 16384 + 2 * 16384 * 1024 + 3 * 16384 * 53248 + 2 * 16384  # 3,187,703,808
VOCAB = 128256 * 16384
FFN = 3 * 16384 * 53248


def test_fp8_on_one_node_of_8():
    p = inference_plan(L405, InferenceLayout(tp=8, weights="fp8", context=8192, batch=8))
    [stage] = p.stages
    # Every parameter one byte (the final norm kept at two): ~405 GB over 8 GPUs.
    assert p.weight_bytes_total == 126 * LAYER + 2 * VOCAB + 2 * 16384
    assert 405e9 < p.weight_bytes_total < 406e9
    assert stage.weights == p.weight_bytes_total / 8
    assert p.kv_per_token_total == 2 * 126 * 8 * 128 * 2 == 516096  # K and V, bf16
    assert stage.kv_per_token == 516096 // 8  # one KV head per GPU
    assert stage.kv_cache == 64512 * 8192 * 8
    assert stage.logits == 8 * 128256 * 4
    assert stage.total == stage.weights + stage.kv_cache + stage.logits


def test_bf16_over_two_nodes_with_pipeline():
    p = inference_plan(L405, InferenceLayout(tp=8, pp=2, context=131072, weights="bf16", kv="bf16"))
    first, last = p.stages
    assert (first.layers, last.layers) == (63, 63)
    assert first.weights == (63 * LAYER + VOCAB) * 2 / 8
    assert last.weights == (63 * LAYER + VOCAB + 16384) * 2 / 8  # the head and the final norm
    assert p.busiest is last and p.gpus == 16
    assert last.kv_per_token == 2 * 63 * 1 * 128 * 2


def test_paper_fp8_rule_keeps_attention_and_the_end_layers_in_bf16():
    bf16 = inference_plan(L405, InferenceLayout(tp=8, weights="bf16"))
    paper = inference_plan(L405, InferenceLayout(tp=8, weights="fp8-ffn"))
    assert bf16.weight_bytes_total - paper.weight_bytes_total == 124 * FFN  # one byte saved per inner FFN weight


def test_kv_heads_must_split_evenly():
    with pytest.raises(ValueError, match="tp 16 does not divide n_kv_heads=8"):
        inference_plan(L405, InferenceLayout(tp=16))
    with pytest.raises(ValueError, match="unknown weight format"):
        InferenceLayout(weights="fp4")


def test_cli(capsys):
    assert main(["plan", "--inference", "--model", "llama3.1-405b", "--tp", "8", "--weights", "fp8", "--batch", "8",
                 "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["gpus"] == 8 and d["stages"][0]["kv_per_token"] == 64512
    assert main(["plan", "--inference", "--model", "llama3.1-405b", "--tp", "8", "--weights", "fp8"]) == 0
    out = capsys.readouterr().out
    assert "405.9 GB in all" in out and "63.0 KiB/token per GPU" in out and "fits in 74.5 GiB" in out
    assert main(["plan", "--model", "llama3.1-405b", "--tp", "8"]) == 2
    assert "pass --inference" in capsys.readouterr().err
