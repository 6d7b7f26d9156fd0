"""herd against transformers' LlamaForCausalLM, through real checkpoint files.

Three tiny random configurations, one per release: 3.0 (no scaling, untied, GQA), 3.1 (llama3
scaling, factor 8) and 3.2 (tied embeddings, explicit head_dim, factor 32). The scaled ones use
a small original context (32) and 96-token inputs, so positions run past it and the kept, the
blended and the slowed RoPE bands are all exercised (a test below checks the scaling matters).

Weights are redrawn at unit scale (norms around 1, not exactly 1) so that a swapped norm, a
missing permutation or a wrong RoPE band moves the logits by far more than the tolerance.
"""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402

import herd  # noqa: E402
from herd.model import RopeScaling, load_model, save_model  # noqa: E402

TOL = 1e-4  # fp32; observed differences are ~1e-6 (torch.polar vs cos/sin, op order)
SEQ = 96
SCALING = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 32}

CONFIGS = {
    "3.0": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=320, rope_theta=500000.0, max_position_embeddings=128,
                tie_word_embeddings=False),
    # theta 10000 with head_dim 16: wavelengths 6.3 (kept), 19.9 (blended), 63+ (slowed).
    "3.1": dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=320, rope_theta=10000.0, max_position_embeddings=256,
                rope_scaling={**SCALING, "factor": 8.0}, tie_word_embeddings=False),
    # head_dim 32 != 64 / 4; theta 5e5: wavelengths 6.3 (kept), 14.3 (blended), 32.5+ (slowed).
    "3.2": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=32, vocab_size=320, rope_theta=500000.0,
                max_position_embeddings=256, rope_scaling={**SCALING, "factor": 32.0}, tie_word_embeddings=True),
}


def _randomize(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():  # a tied matrix is listed once
            if p.dim() == 1:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * p.shape[1] ** -0.25)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * p.shape[1] ** -0.5)


def _hf_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits.float()


def _herd_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def reference(request, tmp_path_factory):
    """(name, HF model, its checkpoint dir, tokens, HF logits)."""
    name = request.param
    torch.manual_seed(0)
    config = LlamaConfig(**CONFIGS[name], rms_norm_eps=1e-5, attn_implementation="eager")
    hf = LlamaForCausalLM(config).eval()
    _randomize(hf, seed=sorted(CONFIGS).index(name))
    path = tmp_path_factory.mktemp(f"hf-{name}")
    hf.save_pretrained(path)
    tokens = torch.randint(0, config.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(1))
    return name, hf, path, tokens, _hf_logits(hf, tokens)


def test_hf_checkpoint_loads_with_same_logits(reference):
    name, _, path, tokens, expected = reference
    model = herd.load_model(path)
    assert model.args.tie_embeddings == CONFIGS[name]["tie_word_embeddings"]
    assert expected.abs().max() > 1.0  # the logits are not tiny, so TOL is a real bound
    assert (_herd_logits(model, tokens) - expected).abs().max() <= TOL


def test_rope_configuration_is_load_bearing(reference):
    name, _, path, tokens, expected = reference
    model = load_model(path)
    # With the wrong scaling (none for 3.1/3.2, some for 3.0, 3.1's factor on a 3.2 model) herd
    # would disagree with HF, so the parity above really checks the frequencies and the factor.
    if name == "3.0":
        assert model.args.rope_scaling is None
        wrong = [model.args.replace(rope_scaling=RopeScaling(factor=8.0, original_max_seq_len=32))]
    else:
        wrong = [model.args.replace(rope_scaling=None)]
    if name == "3.2":
        wrong.append(model.args.replace(rope_scaling=RopeScaling(factor=8.0, original_max_seq_len=32)))
    for args in wrong:
        model.args = args
        model.init_rope()
        assert (_herd_logits(model, tokens) - expected).abs().max() > 1e-2


def test_meta_two_file_round_trip(reference, tmp_path):
    _, _, path, tokens, expected = reference
    model = load_model(path)
    save_model(model, tmp_path / "meta", format="meta", num_shards=2)
    assert sorted(p.name for p in (tmp_path / "meta").iterdir()) == [
        "consolidated.00.pth", "consolidated.01.pth", "params.json"]
    again = load_model(tmp_path / "meta")
    assert again.args == model.args
    logits = _herd_logits(again, tokens)
    assert torch.equal(logits, _herd_logits(model, tokens))
    assert (logits - expected).abs().max() <= TOL


def test_herd_hf_output_loads_in_transformers_unchanged(reference, tmp_path):
    _, hf, path, tokens, expected = reference
    save_model(load_model(path), tmp_path / "out")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    assert back.config.tie_word_embeddings == hf.config.tie_word_embeddings
    assert back.config.rope_parameters == hf.config.rope_parameters
    ours, theirs = back.state_dict(), hf.state_dict()
    assert ours.keys() == theirs.keys()
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key
    assert (_hf_logits(back, tokens) - expected).abs().max() <= TOL


def test_sharded_hf_checkpoints(reference, tmp_path):
    _, hf, _, tokens, expected = reference
    # Written by transformers: index + several shards, loaded by herd.
    hf.save_pretrained(tmp_path / "theirs", max_shard_size="40KB")
    index = json.loads((tmp_path / "theirs" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    model = load_model(tmp_path / "theirs")
    assert (_herd_logits(model, tokens) - expected).abs().max() <= TOL
    # Written by herd: loaded by transformers.
    save_model(model, tmp_path / "ours", shard_size=40_000)
    index = json.loads((tmp_path / "ours" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="eager").eval()
    assert (_hf_logits(back, tokens) - expected).abs().max() <= TOL
