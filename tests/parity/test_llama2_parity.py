"""Llama 2-shaped models in Meta's and HF's files: herd against transformers' LlamaForCausalLM.

One set of random weights (Meta names, Meta's interleaved q/k rows) is written three ways, each
built here without herd's writers:
* Meta, 1 file, and Meta, 2 model-parallel files, with params.json as the Llama 2 release writes
  it (`vocab_size: -1`, no `rope_theta`) and the embedding split along its width (dim 1), as
  Llama 2's ParallelEmbedding did, plus the `rope.freqs` buffer those files carry;
* HF, with Llama-2-7b-hf's config.json keys (no rope_theta, no head_dim) and q/k rows permuted
  the way HF's convert_llama_weights_to_hf.py does.
transformers reads the HF copy; herd reads all three. A Llama 3 default anywhere (theta 500000,
vocab from params.json) moves herd's logits far beyond the tolerance.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import save_file  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

from herd.model import load_model  # noqa: E402

TOL = 1e-4  # fp32
VOCAB = 32000
SHAPES = {
    # Llama 2 7B/13B-like: multi-head attention, FFN from multiple_of alone (int(2*256/3)=170 -> 192).
    "mha": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=None, multiple_of=32, ffn_dim_multiplier=None,
                hidden=192),
    # Llama 2 70B-like: GQA and a multiplier (int(1.3*170)=221 -> 256).
    "gqa": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=64, ffn_dim_multiplier=1.3, hidden=256),
}


def _random_meta_weights(shape: dict, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    d, hd = shape["dim"], shape["dim"] // shape["n_heads"]
    kv = (shape["n_kv_heads"] or shape["n_heads"]) * hd

    def w(*size):  # unit-scale activations, so a wrong RoPE or norm moves the logits visibly
        return torch.randn(*size, generator=gen) * size[-1] ** -0.5

    sd = {"tok_embeddings.weight": torch.randn(VOCAB, d, generator=gen) * d ** -0.25,
          "norm.weight": 1.0 + 0.2 * torch.randn(d, generator=gen), "output.weight": w(VOCAB, d)}
    for i in range(shape["n_layers"]):
        p = f"layers.{i}."
        sd |= {p + "attention.wq.weight": w(d, d), p + "attention.wk.weight": w(kv, d),
               p + "attention.wv.weight": w(kv, d), p + "attention.wo.weight": w(d, d),
               p + "feed_forward.w1.weight": w(shape["hidden"], d), p + "feed_forward.w2.weight": w(d, shape["hidden"]),
               p + "feed_forward.w3.weight": w(shape["hidden"], d),
               p + "attention_norm.weight": 1.0 + 0.2 * torch.randn(d, generator=gen),
               p + "ffn_norm.weight": 1.0 + 0.2 * torch.randn(d, generator=gen)}
    return sd


def _write_meta_llama2(path: Path, sd: dict[str, torch.Tensor], shape: dict, n_files: int) -> Path:
    path.mkdir()
    params = {"dim": shape["dim"], "multiple_of": shape["multiple_of"], "n_heads": shape["n_heads"],
              "n_layers": shape["n_layers"], "norm_eps": 1e-05, "vocab_size": -1}
    if shape["n_kv_heads"]:  # as in Llama 2 70B's params.json
        params |= {"ffn_dim_multiplier": shape["ffn_dim_multiplier"], "n_kv_heads": shape["n_kv_heads"]}
    (path / "params.json").write_text(json.dumps(params))
    hd = shape["dim"] // shape["n_heads"]
    for r in range(n_files):
        shard = {"rope.freqs": 1.0 / 10000.0 ** (torch.arange(0, hd, 2).float() / hd)}
        for key, t in sd.items():
            name = key.split(".")[-2]
            # Llama 2's layers: ParallelEmbedding and row-parallel wo/w2 split dim 1; column-parallel dim 0.
            dim = None if t.dim() == 1 else 1 if name in ("tok_embeddings", "wo", "w2") else 0
            shard[key] = (t if dim is None else t.chunk(n_files, dim=dim)[r]).clone()
        torch.save(shard, path / f"consolidated.{r:02d}.pth")
    return path


def _hf_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    # convert_llama_weights_to_hf.py: view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2)
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def _write_hf_llama2(path: Path, sd: dict[str, torch.Tensor], shape: dict) -> Path:
    path.mkdir()
    n_kv = shape["n_kv_heads"] or shape["n_heads"]
    config = {"architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
              "hidden_size": shape["dim"], "initializer_range": 0.02, "intermediate_size": shape["hidden"],
              "max_position_embeddings": 4096, "model_type": "llama", "num_attention_heads": shape["n_heads"],
              "num_hidden_layers": shape["n_layers"], "num_key_value_heads": n_kv, "pretraining_tp": 1,
              "rms_norm_eps": 1e-05, "rope_scaling": None, "tie_word_embeddings": False,
              "torch_dtype": "float32", "use_cache": True, "vocab_size": VOCAB}
    (path / "config.json").write_text(json.dumps(config))
    names = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
             "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
             "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj", "feed_forward.w3": "mlp.up_proj",
             "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
    hf = {"model.embed_tokens.weight": sd["tok_embeddings.weight"], "model.norm.weight": sd["norm.weight"],
          "lm_head.weight": sd["output.weight"]}
    for i in range(shape["n_layers"]):
        for meta, name in names.items():
            t = sd[f"layers.{i}.{meta}.weight"]
            if meta == "attention.wq":
                t = _hf_permute(t, shape["n_heads"])
            elif meta == "attention.wk":
                t = _hf_permute(t, n_kv)
            hf[f"model.layers.{i}.{name}.weight"] = t.contiguous()
    save_file(hf, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module", params=sorted(SHAPES))
def llama2(request, tmp_path_factory):
    """(shape, {layout: dir}, tokens, transformers' logits from the HF copy)."""
    shape = SHAPES[request.param]
    sd = _random_meta_weights(shape, seed=sorted(SHAPES).index(request.param))
    root = tmp_path_factory.mktemp(f"llama2-{request.param}")
    dirs = {"meta-1": _write_meta_llama2(root / "meta1", sd, shape, 1),
            "meta-2": _write_meta_llama2(root / "meta2", sd, shape, 2),
            "hf": _write_hf_llama2(root / "hf", sd, shape)}
    hf = LlamaForCausalLM.from_pretrained(dirs["hf"], attn_implementation="eager", dtype=torch.float32).eval()
    # Positions up to 96 so that theta 10000 vs 500000 changes the rotation a lot.
    tokens = torch.randint(0, VOCAB, (2, 96), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = hf(tokens).logits.float()
    return shape, dirs, tokens, expected


@pytest.mark.parametrize("layout", ["meta-1", "meta-2", "hf"])
def test_llama2_logits_match_transformers(llama2, layout):
    shape, dirs, tokens, expected = llama2
    model = load_model(dirs[layout])
    a = model.args
    assert (a.vocab_size, a.rope_theta, a.norm_eps, a.rope_scaling) == (VOCAB, 10000.0, 1e-5, None)
    assert a.n_kv_heads == (shape["n_kv_heads"] or shape["n_heads"]) and a.ffn_hidden_dim == shape["hidden"]
    assert not a.tie_embeddings
    with torch.no_grad():
        got = model(tokens)
    assert (got - expected).abs().max().item() < TOL


def test_llama2_meta_layouts_hold_the_same_weights(llama2):
    _, dirs, _, _ = llama2
    one, two = load_model(dirs["meta-1"]).state_dict(), load_model(dirs["meta-2"]).state_dict()
    assert one.keys() == two.keys()
    assert all(torch.equal(one[k], two[k]) for k in one)
    assert load_model(dirs["meta-2"]).args.max_seq_len == 4096  # Llama 2's context (norm_eps 1e-5)
