"""Checkpoint formats: the q/k permutation, configs, round trips, shard layout and every error.

Logit parity against transformers lives in tests/parity/test_hf_parity.py; here the checks are
on tensors and files, using the `debug` preset (GQA, 3.1 scaling) and a tied variant with an
explicit head_dim.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from herd.model import PRESETS, ModelArgs, RopeScaling, build_model, convert, describe, load_model, save_model
from herd.model import formats as F
from herd.model import keymap as K
from herd.model.rope import apply_rotary_emb, precompute_freqs_cis

DEBUG = PRESETS["debug"]
TIED = DEBUG.replace(  # 3.2-style: tied, head_dim 32 != dim / n_heads, factor 32
    tie_embeddings=True, head_dim_override=32, rope_scaling=RopeScaling(factor=32.0, original_max_seq_len=64)
)


def _model(args: ModelArgs = DEBUG, dtype: torch.dtype = torch.float32, seed: int = 0):
    return build_model(args, dtype=dtype, seed=seed)


def _assert_same_weights(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), key


def _same_args_but_ffn_rule(a: ModelArgs, b: ModelArgs) -> bool:
    # config.json stores only the FFN width, not the (multiple_of, multiplier) that made it.
    strip = dict(multiple_of=1, ffn_dim_multiplier=None)
    return a.ffn_hidden_dim == b.ffn_hidden_dim and a.replace(**strip) == b.replace(**strip)


def _rewrite_safetensors(path: Path, edit) -> None:
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


# ---- the permutation -----------------------------------------------------------------------


@pytest.mark.parametrize("n_heads, hd", [(1, 2), (2, 8), (4, 16)])
def test_permutation_matches_the_index_statement(n_heads, hd):
    cols = 3
    meta = torch.arange(n_heads * hd * cols, dtype=torch.float32).reshape(n_heads * hd, cols)
    hf = K.permute_to_hf(meta, n_heads)
    for h in range(n_heads):
        for j in range(hd // 2):
            assert torch.equal(hf[h * hd + j], meta[h * hd + 2 * j])
            assert torch.equal(hf[h * hd + j + hd // 2], meta[h * hd + 2 * j + 1])
    assert torch.equal(K.permute_from_hf(hf, n_heads), meta)
    assert torch.equal(K.permute_to_hf(K.permute_from_hf(meta, n_heads), n_heads), meta)


def test_permutation_turns_interleaved_rope_into_rotate_half():
    # The reason for the permutation: Meta's interleaved rotation of (W x) equals HF's
    # rotate_half rotation of (W_hf x), up to the same row reordering, so q.k is unchanged.
    n_heads, hd, dim, S = 2, 8, 5, 7
    gen = torch.Generator().manual_seed(0)
    wq, wk, x = (torch.randn(n_heads * hd, dim, generator=gen), torch.randn(n_heads * hd, dim, generator=gen),
                 torch.randn(1, S, dim, generator=gen))
    freqs = precompute_freqs_cis(hd, S, 10000.0, None)
    q_meta = apply_rotary_emb((x @ wq.T).view(1, S, n_heads, hd), freqs[None])
    k_meta = apply_rotary_emb((x @ wk.T).view(1, S, n_heads, hd), freqs[None])

    angles = torch.cat([freqs.angle(), freqs.angle()], dim=-1)  # (S, hd): HF's cat(freqs, freqs)
    cos, sin = angles.cos()[None, :, None], angles.sin()[None, :, None]

    def rotate_half(t):
        return torch.cat([-t[..., hd // 2:], t[..., : hd // 2]], dim=-1)

    q_hf = (x @ K.permute_to_hf(wq, n_heads).T).view(1, S, n_heads, hd)
    k_hf = (x @ K.permute_to_hf(wk, n_heads).T).view(1, S, n_heads, hd)
    q_hf, k_hf = q_hf * cos + rotate_half(q_hf) * sin, k_hf * cos + rotate_half(k_hf) * sin
    scores_meta = torch.einsum("bshd,bthd->bhst", q_meta, k_meta)
    scores_hf = torch.einsum("bshd,bthd->bhst", q_hf, k_hf)
    assert torch.allclose(scores_meta, scores_hf, atol=1e-5)
    # ... and without the permutation they would not agree.
    q_bad = (x @ wq.T).view(1, S, n_heads, hd)
    q_bad = q_bad * cos + rotate_half(q_bad) * sin
    assert not torch.allclose(scores_meta, torch.einsum("bshd,bthd->bhst", q_bad, k_hf), atol=1e-2)


def test_key_map_round_trips_every_parameter():
    for key in _model(TIED).state_dict():
        assert K.herd_key(K.hf_key(key)) == key
    assert K.herd_key("model.layers.3.self_attn.q_proj.weight") == "layers.3.attention.wq.weight"
    assert K.herd_key("model.layers.0.self_attn.q_proj.bias") is None


# ---- configs -------------------------------------------------------------------------------

HF_31_8B = {  # config.json of Llama 3.1 8B Instruct (shared/research/llama3-reference.md §3.2)
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False, "attention_dropout": 0.0,
    "mlp_bias": False, "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu",
    "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 131072,
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "pretraining_tp": 1,
    "rms_norm_eps": 1e-05, "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                           "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
    "vocab_size": 128256,
}
HF_32_1B = {**HF_31_8B, "hidden_size": 2048, "intermediate_size": 8192, "num_attention_heads": 32,
            "num_hidden_layers": 16, "head_dim": 64, "tie_word_embeddings": True,
            "rope_scaling": {**HF_31_8B["rope_scaling"], "factor": 32.0}}


def test_hf_configs_of_published_models_give_the_presets():
    assert K.args_from_hf_config(HF_31_8B) == PRESETS["llama3.1-8b"]
    assert K.args_from_hf_config(HF_32_1B) == PRESETS["llama3.2-1b"]
    llama3 = {**HF_31_8B, "rope_scaling": None, "max_position_embeddings": 8192}
    assert K.args_from_hf_config(llama3) == PRESETS["llama3-8b"]


# config.json of meta-llama/Llama-2-7b-hf and -70b-hf (transformers 4.31: no rope_theta, no head_dim).
HF_LLAMA2_7B = {
    "architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
    "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 11008, "max_position_embeddings": 4096,
    "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None, "tie_word_embeddings": False,
    "torch_dtype": "float16", "use_cache": True, "vocab_size": 32000,
}
HF_LLAMA2_70B = {**HF_LLAMA2_7B, "hidden_size": 8192, "intermediate_size": 28672, "num_attention_heads": 64,
                 "num_hidden_layers": 80, "num_key_value_heads": 8}


def test_hf_llama2_configs_give_the_presets():
    # Missing keys take transformers' LlamaConfig defaults (theta 10000), never Llama 3's.
    assert K.args_from_hf_config(HF_LLAMA2_7B) == PRESETS["llama2-7b"]
    assert K.args_from_hf_config(HF_LLAMA2_70B) == PRESETS["llama2-70b"]
    transformers = pytest.importorskip("transformers")
    reference = transformers.LlamaConfig(**HF_LLAMA2_7B)
    rope = getattr(reference, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(reference, "rope_theta", None))
    assert K.args_from_hf_config(HF_LLAMA2_7B).rope_theta == theta == 10000.0


def test_transformers_5_rope_parameters_form():
    v5 = {k: v for k, v in HF_31_8B.items() if k not in ("rope_scaling", "rope_theta")}
    v5["rope_parameters"] = {**HF_31_8B["rope_scaling"], "rope_theta": 500000.0}
    assert K.args_from_hf_config(v5) == PRESETS["llama3.1-8b"]
    default = {**v5, "rope_parameters": {"rope_type": "default", "rope_theta": 1234.0}}
    args = K.args_from_hf_config(default)
    assert args.rope_scaling is None and args.rope_theta == 1234.0


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_hf_config_round_trip_for_every_preset(name):
    cfg = json.loads(json.dumps(K.hf_config_from_args(PRESETS[name])))
    assert K.args_from_hf_config(cfg) == PRESETS[name]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_meta_params_round_trip_for_every_preset(name):
    params = json.loads(json.dumps(K.meta_params_from_args(PRESETS[name])))
    assert K.args_from_meta_params(params) == PRESETS[name]
    assert K.args_from_meta_params({"model": params}) == PRESETS[name]


def test_hf_config_is_accepted_by_transformers():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(**K.hf_config_from_args(TIED))
    assert cfg.head_dim == 32 and cfg.tie_word_embeddings and cfg.intermediate_size == TIED.ffn_hidden_dim
    rope = getattr(cfg, "rope_parameters", None) or cfg.rope_scaling
    assert rope["rope_type"] == "llama3" and rope["factor"] == 32.0


@pytest.mark.parametrize("dim", [64, 96, 2048, 4096])
def test_any_intermediate_size_is_reproduced_exactly(dim):
    for hidden in [2, 96, 97, 224, 1000, 3 * dim, 14336]:
        base = dict(hidden_size=dim, intermediate_size=hidden, num_hidden_layers=1, num_attention_heads=4,
                    vocab_size=8)
        assert K.args_from_hf_config(base).ffn_hidden_dim == hidden


def test_meta_params_of_published_models():
    base = {"dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256, "multiple_of": 1024,
            "ffn_dim_multiplier": 1.3, "norm_eps": 1e-05, "rope_theta": 500000.0}
    assert K.args_from_meta_params(base) == PRESETS["llama3-8b"]
    assert K.args_from_meta_params({**base, "use_scaled_rope": True}) == PRESETS["llama3.1-8b"]
    one_b = {"dim": 2048, "ffn_dim_multiplier": 1.5, "multiple_of": 256, "n_heads": 32, "n_kv_heads": 8,
             "n_layers": 16, "norm_eps": 1e-05, "rope_theta": 500000.0, "use_scaled_rope": True, "vocab_size": 128256}
    args = K.args_from_meta_params(one_b)
    assert args.rope_scaling.factor == 32.0  # not Meta's hard-coded 8 (llama-models#166)
    assert args == PRESETS["llama3.2-1b"].replace(tie_embeddings=False)  # ties come from the weights


def test_meta_params_herd_keys_do_not_collide_with_metas_loader():
    params = K.meta_params_from_args(PRESETS["llama3.1-8b"])
    # Meta's Llama3.build calls ModelArgs(max_seq_len=..., **params): a top-level max_seq_len would
    # be a duplicate keyword. Everything herd adds lives under "herd".
    assert "max_seq_len" not in params and set(params["herd"]) >= {"rope_scaling", "max_seq_len", "tie_embeddings"}


# ---- round trips ---------------------------------------------------------------------------


@pytest.mark.parametrize("args", [DEBUG, TIED], ids=["untied", "tied"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("fmt", ["hf", "meta"])
def test_round_trip_is_tensor_identical(tmp_path, args, dtype, fmt):
    model = _model(args, dtype)
    save_model(model, tmp_path / "ckpt", format=fmt)
    loaded = load_model(tmp_path / "ckpt")
    _assert_same_weights(model, loaded)
    assert loaded.args == args if fmt == "meta" else _same_args_but_ffn_rule(loaded.args, args)
    if args.tie_embeddings:
        assert loaded.output.weight is loaded.tok_embeddings.weight
    assert loaded.freqs_cis.dtype == torch.complex64
    assert torch.equal(loaded.freqs_cis, model.freqs_cis)
    tokens = torch.randint(0, args.vocab_size, (1, 80))
    assert torch.equal(loaded(tokens), model(tokens))


def test_hf_files_hold_hf_names_and_permuted_rows(tmp_path):
    model = _model(TIED)
    save_model(model, tmp_path / "hf")
    tensors = load_file(tmp_path / "hf" / "model.safetensors")
    assert "lm_head.weight" not in tensors  # tied: HF stores the embedding once
    wk = model.layers["1"].attention.wk.weight
    assert torch.equal(tensors["model.layers.1.self_attn.k_proj.weight"], K.permute_to_hf(wk, TIED.n_kv_heads))
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["head_dim"] == 32 and config["tie_word_embeddings"] is True
    assert config["torch_dtype"] == "float32" and config["model_type"] == "llama"


def test_meta_shards_follow_metas_split_layout(tmp_path):
    model = _model(DEBUG)
    save_model(model, tmp_path / "meta", format="meta", num_shards=2)
    files = [torch.load(tmp_path / "meta" / f"consolidated.0{i}.pth", weights_only=True) for i in range(2)]
    full = model.state_dict()
    for key, t in full.items():
        name = key.split(".")[-2]
        if name in ("wo", "w2"):
            halves = t.chunk(2, dim=1)
        elif name.endswith("norm"):
            halves = (t, t)
        else:  # wq wk wv w1 w3 tok_embeddings output: rows
            halves = t.chunk(2, dim=0)
        for shard, half in zip(files, halves):
            assert torch.equal(shard[key], half), key
            # A saved piece must own its storage: torch.save writes a view's whole storage.
            assert shard[key].untyped_storage().nbytes() == half.numel() * half.element_size(), key
    _assert_same_weights(model, load_model(tmp_path / "meta"))


def test_tied_meta_checkpoint_stores_output_and_ties_by_equality(tmp_path):
    model = _model(TIED)
    save_model(model, tmp_path / "meta", format="meta")
    sd = torch.load(tmp_path / "meta" / "consolidated.00.pth", weights_only=True)
    assert torch.equal(sd["output.weight"], sd["tok_embeddings.weight"])  # as Meta ships 3.2
    # Without herd's own hint, the tie is detected from the equal tensors, as for Meta's files.
    _edit_json(tmp_path / "meta" / "params.json", lambda p: p["herd"].pop("tie_embeddings"))
    loaded = load_model(tmp_path / "meta")
    assert loaded.args.tie_embeddings and loaded.output.weight is loaded.tok_embeddings.weight
    # An untied model whose head happens to differ stays untied.
    untied = _model(DEBUG)
    save_model(untied, tmp_path / "untied", format="meta")
    _edit_json(tmp_path / "untied" / "params.json", lambda p: p["herd"].pop("tie_embeddings"))
    assert not load_model(tmp_path / "untied").args.tie_embeddings


def test_rope_freqs_from_older_meta_files_is_dropped(tmp_path):
    model = _model(DEBUG)
    save_model(model, tmp_path / "meta", format="meta")
    path = tmp_path / "meta" / "consolidated.00.pth"
    sd = torch.load(path, weights_only=True)
    sd["rope.freqs"] = torch.randn(DEBUG.head_dim // 2)
    torch.save(sd, path)
    _assert_same_weights(model, load_model(tmp_path / "meta"))


def test_load_options_dtype_and_max_seq_len(tmp_path):
    save_model(_model(DEBUG), tmp_path / "hf")
    model = load_model(tmp_path / "hf", dtype=torch.bfloat16, max_seq_len=100)
    assert model.tok_embeddings.weight.dtype == torch.bfloat16
    assert model.args.max_seq_len == 100 and model.freqs_cis.shape == (100, DEBUG.head_dim // 2)
    assert model.freqs_cis.dtype == torch.complex64 and model.freqs_cis.device.type == "cpu"


def test_convert_both_ways_and_describe(tmp_path):
    model = _model(TIED, torch.bfloat16)
    save_model(model, tmp_path / "hf", shard_size=100_000)
    (tmp_path / "hf" / "tokenizer.model").write_text("tok")
    convert(tmp_path / "hf", tmp_path / "meta", to="meta", num_shards=2)
    convert(tmp_path / "meta", tmp_path / "hf2", to="hf")
    assert (tmp_path / "hf2" / "tokenizer.model").read_text() == "tok"
    _assert_same_weights(model, load_model(tmp_path / "hf2"))

    info = describe(tmp_path / "hf")
    assert info.format == "hf" and info.dtype == "bfloat16" and len(info.files) > 1
    assert info.num_params == TIED.num_params() and info.config["hidden_size"] == TIED.dim
    assert info.bytes_on_disk > 2 * TIED.num_params()
    meta = describe(tmp_path / "meta")
    assert meta.format == "meta" and meta.files == ("consolidated.00.pth", "consolidated.01.pth")
    assert meta.args == TIED and meta.dtype == "bfloat16"


def test_save_is_atomic_and_refuses_to_clobber(tmp_path, monkeypatch):
    model = _model(DEBUG)
    save_model(model, tmp_path / "ckpt")
    with pytest.raises(FileExistsError, match="already exists"):
        save_model(model, tmp_path / "ckpt")

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(F, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_model(model, tmp_path / "new")
    with pytest.raises(OSError, match="disk full"):
        save_model(_model(DEBUG, seed=1), tmp_path / "ckpt", overwrite=True)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no partial dir, no temp dir left
    _assert_same_weights(model, load_model(tmp_path / "ckpt"))  # the old checkpoint is intact
    other = _model(DEBUG, seed=1)
    save_model(other, tmp_path / "ckpt", overwrite=True)
    _assert_same_weights(other, load_model(tmp_path / "ckpt"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


# ---- errors --------------------------------------------------------------------------------


@pytest.fixture()
def hf_dir(tmp_path) -> Path:
    save_model(_model(DEBUG), tmp_path / "hf")
    return tmp_path / "hf"


@pytest.fixture()
def meta_dir(tmp_path) -> Path:
    save_model(_model(DEBUG), tmp_path / "meta", format="meta", num_shards=2)
    return tmp_path / "meta"


def test_error_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nope")


def test_error_no_format_detected(tmp_path):
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(FileNotFoundError, match=r"expected either HF files \(config.json \+ model.safetensors"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_text("")
    with pytest.raises(FileNotFoundError, match=r"\.bin weights are not supported"):
        load_model(tmp_path)


def test_error_missing_keys(hf_dir):
    _rewrite_safetensors(hf_dir / "model.safetensors", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing keys \(1\): layers\.1\.feed_forward\.w3\.weight"):
        load_model(hf_dir)


def test_error_unexpected_keys(hf_dir, meta_dir):
    _rewrite_safetensors(hf_dir / "model.safetensors",
                         lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}))
    with pytest.raises(ValueError, match=r"unexpected keys \(1\): model\.layers\.0\.self_attn\.q_proj\.bias"):
        load_model(hf_dir)
    for i in range(2):
        path = meta_dir / f"consolidated.0{i}.pth"
        sd = torch.load(path, weights_only=True)
        sd["layers.1.attention.wq.bias"] = torch.zeros(32)
        torch.save(sd, path)
    with pytest.raises(ValueError, match=r"unexpected keys \(1\): layers\.1\.attention\.wq\.bias"):
        load_model(meta_dir)


def test_error_shape_mismatch(hf_dir):
    _edit_json(hf_dir / "config.json", lambda c: c.update(num_key_value_heads=1))
    with pytest.raises(ValueError, match=r"config.json says num_key_value_heads = 1 but "
                                         r"model\.layers\.0\.self_attn\.k_proj\.weight has 32 rows, 2 heads"):
        load_model(hf_dir)
    # A shape the config's fields do not set (the RMSNorm width of layer 1) is the per-tensor check's.
    _edit_json(hf_dir / "config.json", lambda c: c.update(num_key_value_heads=2))
    _rewrite_safetensors(hf_dir / "model.safetensors", lambda t: t.update(
        {"model.layers.1.input_layernorm.weight": torch.ones(32)}))
    with pytest.raises(ValueError, match=r"shape mismatch for layers\.1\.attention_norm\.weight: the config implies "
                                         r"\(64,\), the checkpoint has \(32,\)"):
        load_model(hf_dir)


def test_error_vocab_mismatch(hf_dir, meta_dir):
    _edit_json(hf_dir / "config.json", lambda c: c.update(vocab_size=300))
    with pytest.raises(ValueError, match=r"config.json says vocab_size = 300 but model.embed_tokens.weight has 256 "
                                         r"rows"):
        load_model(hf_dir)
    _edit_json(meta_dir / "params.json", lambda p: p.update(vocab_size=128))
    with pytest.raises(ValueError, match=r"params.json says vocab_size = 128 but tok_embeddings.weight has 256 rows"):
        load_model(meta_dir)


def test_error_truncated_safetensors(hf_dir):
    path = hf_dir / "model.safetensors"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(ValueError, match=r"model\.safetensors is not a readable safetensors file \(truncated"):
        load_model(hf_dir)


def test_error_truncated_meta_file(meta_dir):
    path = meta_dir / "consolidated.01.pth"
    path.write_bytes(path.read_bytes()[:3000])
    with pytest.raises(ValueError, match=r"consolidated\.01\.pth is not a readable PyTorch checkpoint"):
        load_model(meta_dir)


@pytest.mark.parametrize("rope_type", ["yarn", "dynamic"])
def test_error_unknown_rope_type(hf_dir, rope_type):
    _edit_json(hf_dir / "config.json", lambda c: c["rope_scaling"].update(rope_type=rope_type))
    with pytest.raises(ValueError, match=rf"config\.json: HF config has rope_type '{rope_type}'"):
        load_model(hf_dir)


def test_error_index_points_at_missing_shard(tmp_path):
    save_model(_model(DEBUG), tmp_path / "hf", shard_size=50_000)
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    (tmp_path / "hf" / victim).unlink()
    with pytest.raises(FileNotFoundError, match=rf"points at shard files that do not exist: {victim}"):
        load_model(tmp_path / "hf")


def test_error_meta_shards_of_inconsistent_shapes(meta_dir):
    path = meta_dir / "consolidated.01.pth"
    sd = torch.load(path, weights_only=True)
    sd["layers.0.feed_forward.w1.weight"] = sd["layers.0.feed_forward.w1.weight"][:-8].clone()
    torch.save(sd, path)
    with pytest.raises(ValueError, match=r"disagree on the shape of 'layers\.0\.feed_forward\.w1\.weight' "
                                         r"\(consolidated\.00\.pth: \(112, 64\), consolidated\.01\.pth: \(104, 64\)\)"):
        load_model(meta_dir)


def test_error_meta_shard_numbering_gap(meta_dir):
    (meta_dir / "consolidated.01.pth").rename(meta_dir / "consolidated.02.pth")
    with pytest.raises(FileNotFoundError, match="without gaps"):
        load_model(meta_dir)


_RAN = []


def _side_effect():
    _RAN.append("code ran")
    return "gotcha"


class Payload:
    """Unpickling this calls _side_effect: what a malicious checkpoint would do."""

    def __reduce__(self):
        return (_side_effect, ())


def test_weights_only_refuses_pickled_code(meta_dir):
    path = meta_dir / "consolidated.00.pth"
    sd = torch.load(path, weights_only=True)
    sd["payload"] = Payload()
    torch.save(sd, path)
    with pytest.raises(ValueError, match=r"refusing to load .*consolidated\.00\.pth: it contains Python objects"):
        load_model(meta_dir)
    assert _RAN == []


def test_error_quantized_or_integer_weights(hf_dir):
    _rewrite_safetensors(hf_dir / "model.safetensors", lambda t: t.update(
        {"model.layers.0.mlp.up_proj.weight": torch.zeros(224, 64, dtype=torch.int8)}))
    with pytest.raises(ValueError, match=r"layers\.0\.feed_forward\.w3\.weight has dtype torch\.int8"):
        load_model(hf_dir)


def test_error_tied_config_with_a_different_head(hf_dir):
    _edit_json(hf_dir / "config.json", lambda c: c.update(tie_word_embeddings=True))
    with pytest.raises(ValueError, match="tie_word_embeddings=true but lm_head.weight differs"):
        load_model(hf_dir)


@pytest.mark.parametrize("edit, fragment", [
    (lambda c: c.update(attention_bias=True), "attention_bias=true"),
    (lambda c: c.update(model_type="mistral"), "model_type 'mistral'"),
    (lambda c: c.update(hidden_act="gelu"), "hidden_act 'gelu'"),
    (lambda c: c.pop("hidden_size"), "missing hidden_size"),
    (lambda c: c["rope_scaling"].pop("factor"), "'llama3' is missing factor"),
])
def test_error_hf_config_fields(edit, fragment):
    config = json.loads(json.dumps(HF_31_8B))
    edit(config)
    with pytest.raises(ValueError, match=fragment):
        K.args_from_hf_config(config)


@pytest.mark.parametrize("extra, fragment", [
    ({"quantization_args": {"group_size": 32}}, "quantized"),
    ({"vision_chunk_size": 560}, "Vision model.*load_mllama"),
    ({"n_experts": 8}, "keys herd does not know: n_experts"),
    ({"use_scaled_rope": False, "herd": {"rope_scaling": {"factor": 8.0}}}, "use_scaled_rope disagrees"),
])
def test_error_meta_params_fields(extra, fragment):
    params = {**K.meta_params_from_args(DEBUG), **extra}
    with pytest.raises(ValueError, match=fragment):
        K.args_from_meta_params(params)


def test_error_meta_split_needs_divisible_heads(tmp_path):
    with pytest.raises(ValueError, match=r"n_heads \(4\) is not divisible"):
        save_model(_model(DEBUG), tmp_path / "meta", format="meta", num_shards=3)
    assert not (tmp_path / "meta").exists()


def test_unknown_format_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="format must be 'hf' or 'meta'"):
        save_model(_model(DEBUG), tmp_path / "x", format="gguf")
