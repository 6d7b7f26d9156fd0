"""GGUF reading and writing against independent references.

References: the `gguf` package (its reader, its dequantize, its HF -> GGUF tensor-name map),
HF transformers (a random LlamaForCausalLM converted the way llama.cpp's convert_hf_to_gguf.py
does it, and transformers' own GGUF loader), and llama.cpp itself (llama-cpp-python in a
subprocess) running files herd wrote.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from herd.model import ModelArgs, RopeScaling, build_model, describe, load_model
from herd.model.keymap import hf_key
from herd.model.rope import rope_frequencies

gguf = pytest.importorskip("gguf")

from herd.model.gguf import (  # noqa: E402  after importorskip: needs the gguf package
    _rope_scaling_from_divisors,
    gguf_raw_tensors,
    read_gguf,
    write_gguf,
)

QTYPES = ("F32", "F16", "Q8_0", "Q4_0")
GGML = gguf.GGMLQuantizationType


# ---- helpers -------------------------------------------------------------------------------


def byte_vocab() -> dict:
    """A minimal GPT-2 style vocabulary llama.cpp accepts: the 256 byte symbols, one merge, one
    control token (258 tokens)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    symbols, shifted = [], 0
    for b in range(256):
        if b in printable:
            symbols.append(chr(b))
        else:
            symbols.append(chr(256 + shifted))
            shifted += 1
    tokens = [*symbols, "\u0120t", "<|endoftext|>"]  # "\u0120" is GPT-2's symbol for the space byte
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [1] * 257 + [3],
        "tokenizer.ggml.merges": ["\u0120 t"],
        "tokenizer.ggml.bos_token_id": 257,
        "tokenizer.ggml.eos_token_id": 257,
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}",
    }


def tiny_model(*, tied: bool, seed: int = 0, **overrides):
    args = ModelArgs.from_name("debug", vocab_size=258, tie_embeddings=tied, **overrides)
    model = build_model(args, seed=seed).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):  # not all ones, so a norm mix-up shows
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen))
            elif p.dim() == 2 and "tok_embeddings" not in name:
                p.mul_(5.0)  # larger than init so attention and MLP shape the logits
    return model


TOKENS = torch.tensor([[(37 * i + 11) % 258 for i in range(100)]])  # 100 positions: the scaled RoPE pairs turn


def logits(model, tokens=TOKENS) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens)[0].float()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def gguf_names_of(args: ModelArgs) -> dict[str, str]:
    """herd name -> GGUF name through HF's names and the gguf package's own tensor-name map."""
    from herd.model.llama import Transformer

    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, args.n_layers)
    with torch.device("meta"):
        keys = [k for k in Transformer(args).state_dict() if not (k == "output.weight" and args.tie_embeddings)]
    return {k: tmap.get_name(hf_key(k), try_suffixes=(".weight",)) for k in keys}


def reference_dequantize(path: Path, args: ModelArgs) -> dict[str, torch.Tensor]:
    """Every weight of `path` as the gguf package alone reads it, under herd's names."""
    reader = gguf.GGUFReader(path)
    by_name = {t.name: t for t in reader.tensors}
    out = {}
    for key, name in gguf_names_of(args).items():
        t = by_name[name]
        out[key] = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
    return out


# ---- herd -> GGUF -> herd ------------------------------------------------------------------


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def written(request, tmp_path_factory):
    model = tiny_model(tied=request.param)
    root = tmp_path_factory.mktemp("gguf")
    paths = {q: write_gguf(model, root / f"tiny-{q}.gguf", qtype=q, tokenizer_metadata=byte_vocab(), name="tiny")
             for q in QTYPES}
    return model, paths


def test_f32_round_trip_gives_identical_logits(written):
    model, paths = written
    loaded = load_model(paths["F32"])
    a, b = loaded.args, model.args
    for field in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "ffn_hidden_dim", "head_dim",
                  "norm_eps", "rope_theta", "rope_scaling", "max_seq_len", "tie_embeddings"):
        assert getattr(a, field) == getattr(b, field), field
    assert loaded.tok_embeddings.weight.dtype == torch.float32
    assert torch.equal(logits(loaded), logits(model))


@pytest.mark.parametrize("qtype", QTYPES[1:])
def test_quantized_files_read_exactly_as_gguf_dequantizes_them(written, qtype):
    model, paths = written
    ckpt = read_gguf(paths[qtype])
    ref = reference_dequantize(paths[qtype], model.args)
    assert set(ckpt.state_dict) == set(ref)
    for key, t in ref.items():
        assert torch.equal(ckpt.state_dict[key].float(), t), key
    # Types: norms F32, matrices in qtype, the output head at 8 bits in a Q4_0 file.
    head = "tok_embeddings.weight" if model.args.tie_embeddings else "output.weight"
    for key, kind in ckpt.tensor_types.items():
        if key.endswith("norm.weight"):
            assert kind == "F32", key
        elif qtype == "Q4_0" and key == head:
            assert kind == "Q8_0"
        else:
            assert kind == qtype, key
    # The loaded model is exactly those weights, and within quantization error of the source.
    loaded = load_model(paths[qtype], dtype=torch.float32)
    for key, p in loaded.state_dict().items():
        assert torch.equal(p, ref[key if key in ref else "tok_embeddings.weight"]), key
    # Measured: F16 4e-4 / 7e-4, Q8_0 0.009 / 0.020, Q4_0 0.12 / 0.25 (untied / tied). Random weights
    # this large amplify the rounding through the layers; a q/k or name mix-up gives about 1.
    got, ref = logits(loaded), logits(model)
    bound = {"F16": 3e-3, "Q8_0": 0.06, "Q4_0": 0.5}[qtype]
    assert float((got - ref).norm() / ref.norm()) < bound


def test_default_dtype_follows_the_stored_embedding(written):
    _, paths = written
    assert load_model(paths["F16"]).tok_embeddings.weight.dtype == torch.float16
    assert load_model(paths["Q8_0"]).tok_embeddings.weight.dtype == torch.float32


def test_metadata_keys_and_value_types(written):
    model, paths = written
    reader = gguf.GGUFReader(paths["Q4_0"])
    f = reader.fields
    T = gguf.GGUFValueType
    assert f["general.architecture"].contents() == "llama"
    assert f["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q4_0
    assert f["general.quantization_version"].contents() == gguf.GGML_QUANT_VERSION
    assert f["llama.feed_forward_length"].contents() == model.args.ffn_hidden_dim
    assert f["tokenizer.ggml.token_type"].types == [T.ARRAY, T.INT32]
    assert f["tokenizer.ggml.tokens"].types == [T.ARRAY, T.STRING]
    assert f["tokenizer.ggml.bos_token_id"].types == [T.UINT32]
    assert f["tokenizer.ggml.add_bos_token"].types == [T.BOOL]
    assert f["tokenizer.ggml.tokens"].contents() == byte_vocab()["tokenizer.ggml.tokens"]
    names = {t.name for t in reader.tensors}
    assert ("output.weight" in names) != model.args.tie_embeddings
    assert "rope_freqs.weight" in names  # the debug preset has Llama 3.1 scaling


def test_raw_tensors_are_the_stored_blocks(written):
    model, paths = written
    raw = gguf_raw_tensors(paths["Q4_0"])
    reader = gguf.GGUFReader(paths["Q4_0"])
    by_name = {t.name: t for t in reader.tensors}
    for key, name in gguf_names_of(model.args).items():
        t, r = by_name[name], raw[key]
        assert r.type == t.tensor_type.name and r.data.dtype == np.uint8
        assert r.shape == tuple(model.state_dict()[key].shape)
        assert np.array_equal(r.data.reshape(-1), np.asarray(t.data).view(np.uint8).reshape(-1)), key
    ckpt = read_gguf(paths["Q4_0"])
    for key, r in raw.items():  # and they decode to what read_gguf gives
        kind = GGML[r.type]
        blocks = r.data.view(np.float32) if kind == GGML.F32 else r.data  # no F16 in this file
        values = np.array(gguf.quants.dequantize(blocks, kind), dtype=np.float32).reshape(r.shape)
        assert torch.equal(torch.from_numpy(values), ckpt.state_dict[key].float()), key


def test_rows_that_are_not_whole_blocks_fall_back_to_f16(tmp_path):
    model = tiny_model(tied=False, dim=48, n_heads=4, n_kv_heads=2, multiple_of=32, ffn_dim_multiplier=None)
    path = write_gguf(model, tmp_path / "odd.gguf", qtype="Q8_0")
    ckpt = read_gguf(path)
    for key, t in model.state_dict().items():
        want = "F32" if t.dim() == 1 else ("F16" if t.shape[1] % 32 else "Q8_0")
        assert ckpt.tensor_types[key] == want, key
    assert "F16" in ckpt.tensor_types.values() and "Q8_0" in ckpt.tensor_types.values()
    assert rel_err(logits(load_model(path)), logits(model)) < 2e-2


def test_write_is_atomic_and_overwrites(tmp_path):
    model = tiny_model(tied=True)
    path = tmp_path / "m.gguf"
    path.write_bytes(b"old")
    write_gguf(model, path)
    assert path.read_bytes()[:4] == b"GGUF"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]  # no temp file left behind
    with pytest.raises(ValueError, match="qtype"):
        write_gguf(model, tmp_path / "x.gguf", qtype="Q4_K")
    assert not (tmp_path / "x.gguf").exists()


# ---- describe / herd info ------------------------------------------------------------------


def test_describe_reports_types_size_and_params(written):
    model, paths = written
    info = describe(paths["Q4_0"])
    counts = Counter(t.tensor_type.name for t in gguf.GGUFReader(paths["Q4_0"]).tensors)
    assert info.format == "gguf" and info.files == (paths["Q4_0"].name,)
    assert info.dtype == ", ".join(f"{k} ({n})" for k, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    assert info.num_params == sum(p.numel() for p in model.parameters())
    assert info.bytes_on_disk == paths["Q4_0"].stat().st_size
    assert info.config["tokenizer.ggml.tokens"] == "<258 x string>"  # long arrays summarized
    json.dumps(info.config)


def test_herd_info_prints_a_gguf_file(written, capsys):
    from herd.cli import main

    _, paths = written
    assert main(["info", str(paths["Q8_0"])]) == 0
    out = capsys.readouterr().out
    assert "GGUF (llama.cpp)" in out and "Q8_0 (" in out


# ---- files in llama.cpp's own layout, from HF transformers -----------------------------------


def hf_llama(*, tied: bool, scaled: bool, dim: int = 64, ffn: int = 160, layers: int = 2):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=96, hidden_size=dim, intermediate_size=ffn, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=16384, rms_norm_eps=1e-5, tie_word_embeddings=tied,
        rope_theta=10000.0, initializer_range=0.2, attn_implementation="eager", dtype=torch.float32,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192) if scaled else None,
    )
    torch.manual_seed(3)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
    return model


def rope_params(cfg) -> dict:
    """transformers 5 keeps theta and scaling in rope_parameters, 4.x in rope_theta / rope_scaling."""
    params = dict(getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})
    params.setdefault("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    return params


def converter_rope_factors(cfg) -> np.ndarray:
    """rope_freqs as llama.cpp's LlamaModel.generate_extra_tensors computes it (float32 steps)."""
    rs = rope_params(cfg)
    hd = cfg.hidden_size // cfg.num_attention_heads
    freqs = 1.0 / (rs["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    old = 8192  # the converter reads original_max_position_embeddings from the top level only
    lo_w, hi_w = old / rs["low_freq_factor"], old / rs["high_freq_factor"]
    out = []
    for f in freqs:
        w = 2 * math.pi / f
        if w < hi_w:
            out.append(1.0)
        elif w > lo_w:
            out.append(rs["factor"])
        else:
            s = (old / w - rs["low_freq_factor"]) / (rs["high_freq_factor"] - rs["low_freq_factor"])
            out.append(float(1 / ((1 - s) / rs["factor"] + s)))
    return np.array(out, dtype=np.float32)


def write_like_llama_cpp(hf, path: Path, *, qtype: str = "F32", raw: dict | None = None) -> Path:
    """HF model -> GGUF the way convert_hf_to_gguf.py's LlamaModel does: gguf's name map, q/k rows
    turned from HF's halves back into interleaved pairs, rope_freqs for llama3 scaling."""
    cfg = hf.config
    n_heads, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base(rope_params(cfg)["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_vocab_size(cfg.vocab_size)
    w.add_rope_dimension_count(cfg.hidden_size // n_heads)
    if rope_params(cfg).get("rope_type") == "llama3":
        w.add_tensor("rope_freqs.weight", converter_rope_factors(cfg))
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    for name, t in hf.state_dict().items():
        x = t.detach().float().numpy()
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = n_heads if "q_proj" in name else n_kv
            x = x.reshape(heads, 2, x.shape[0] // heads // 2, x.shape[1]).swapaxes(1, 2).reshape(x.shape)
        new = tmap.get_name(name, try_suffixes=(".weight",))
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if raw is not None and new in raw:  # hand-made blocks of a type gguf cannot quantize
            blocks, kind = raw[new]
            w.add_tensor(new, blocks, raw_dtype=kind)
            continue
        kind = GGML[qtype] if x.ndim == 2 else GGML.F32
        w.add_tensor(new, gguf.quants.quantize(x, kind), raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


HF_TOKENS = torch.tensor([[(13 * i + 5) % 96 for i in range(120)]])


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_llama_cpp_layout_f32_matches_hf(tmp_path, tied):
    hf = hf_llama(tied=tied, scaled=True)
    path = write_like_llama_cpp(hf, tmp_path / "hf.gguf")
    ours = load_model(path)
    assert ours.args.tie_embeddings == tied
    assert ours.args.rope_scaling == RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                                 original_max_seq_len=8192)
    got = logits(ours, HF_TOKENS)
    # herd reading the same model from HF safetensors (its q/k un-permuted by keymap) is bitwise equal
    hf.save_pretrained(tmp_path / "hf")
    assert torch.equal(got, logits(load_model(tmp_path / "hf"), HF_TOKENS))
    with torch.no_grad():
        ref = hf(HF_TOKENS).logits[0]
    assert (got - ref).abs().max() < 1e-5 * ref.abs().max()  # rotate_half vs complex RoPE: rounding only


def _random_k_blocks(kind, shape, seed) -> np.ndarray:
    """Random blocks of a K-quant type with sane fp16 scales (gguf cannot quantize K-quants)."""
    block, size = gguf.GGML_QUANT_SIZES[kind]
    rows, cols = shape
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    # Offsets of the fp16 super-block scales (ggml-common.h): Q4_K / Q5_K start with d, dmin;
    # Q6_K ends with d.
    offsets = {GGML.Q4_K: (0, 2), GGML.Q5_K: (0, 2), GGML.Q6_K: (size - 2,)}[kind]
    for off in offsets:
        scale = rng.uniform(2e-3, 2e-2, size=(rows, cols // block)).astype(np.float16)
        data[:, :, off:off + 2] = scale.view(np.uint8).reshape(rows, cols // block, 2)
    return data.reshape(rows, -1)


@pytest.mark.parametrize("qtype", ["BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q4_K", "Q5_K", "Q6_K"])
def test_llama_cpp_layout_types_match_transformers_gguf_loader(tmp_path, qtype):
    transformers = pytest.importorskip("transformers")
    hf = hf_llama(tied=False, scaled=False, dim=256, ffn=512, layers=1)
    raw = None
    if qtype.endswith("_K"):
        kind = GGML[qtype]
        raw = {}
        for i, (name, t) in enumerate(hf.state_dict().items()):
            if t.dim() == 2:
                new = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 1).get_name(name, try_suffixes=(".weight",))
                raw[new] = (_random_k_blocks(kind, tuple(t.shape), i), kind)
        qtype = "F32"
    path = write_like_llama_cpp(hf, tmp_path / "m.gguf", qtype=qtype, raw=raw)
    ckpt = read_gguf(path)
    assert set(ckpt.tensor_types.values()) == {"F32", (kind.name if raw else qtype)}
    for key, t in reference_dequantize(path, ckpt.args).items():
        assert torch.equal(ckpt.state_dict[key].float(), t), key
    ours = load_model(path, dtype=torch.float32)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name,
                                                               dtype=torch.float32).eval()
    tokens = HF_TOKENS[:, :40]
    with torch.no_grad():
        ref = theirs(tokens).logits[0]
    got = logits(ours, tokens)
    assert torch.isfinite(got).all()
    assert (got - ref).abs().max() <= 1e-5 * max(1.0, float(ref.abs().max()))


# ---- RoPE scaling from rope_freqs ----------------------------------------------------------


@pytest.mark.parametrize("head_dim, theta, scaling", [
    (128, 500000.0, RopeScaling(factor=8.0)),  # Llama 3.1
    (64, 500000.0, RopeScaling(factor=32.0)),  # Llama 3.2 1B
    (16, 500000.0, RopeScaling(factor=8.0, original_max_seq_len=64)),  # herd's debug preset
    (16, 10000.0, RopeScaling(factor=16.0, low_freq_factor=0.5, high_freq_factor=4.0, original_max_seq_len=64)),
    # No pair in the blend band: any context length between the two neighbours gives the same RoPE.
    (16, 500000.0, RopeScaling(factor=4.0, original_max_seq_len=30)),
], ids=["3.1", "3.2", "debug", "wide-band", "no-band"])
def test_rope_scaling_recovered_from_divisors(head_dim, theta, scaling):
    unscaled = rope_frequencies(head_dim, theta, None)
    want = rope_frequencies(head_dim, theta, scaling)
    got = _rope_scaling_from_divisors((unscaled / want).numpy(), head_dim=head_dim, theta=theta,
                                      source=Path("x.gguf"), original=None)
    assert got is not None and got.factor == scaling.factor
    torch.testing.assert_close(rope_frequencies(head_dim, theta, got), want, rtol=1e-6, atol=0)
    if scaling.original_max_seq_len != 30 and scaling.low_freq_factor == 1.0:
        assert got == scaling  # Llama 3's own low / high come back exactly


def test_rope_divisors_outside_llama3_rule_are_refused():
    d = np.array([1.0, 3.0, 1.5, 8.0, 2.0, 8.0, 8.0, 8.0], dtype=np.float32)
    with pytest.raises(ValueError, match="Llama 3.1's RoPE scaling rule"):
        _rope_scaling_from_divisors(d, head_dim=16, theta=10000.0, source=Path("x.gguf"), original=None)
    assert _rope_scaling_from_divisors(np.ones(8, np.float32), head_dim=16, theta=1e4, source=Path("x"),
                                       original=None) is None


# ---- errors ----------------------------------------------------------------------------------


def _write_raw(path: Path, *, arch: str = "llama", kv: dict | None = None, tensors: dict | None = None,
               drop: tuple[str, ...] = ()) -> Path:
    """A small llama GGUF written key by key, for error cases (defaults: a valid 1-layer model).
    `drop` leaves out metadata keys and tensors by name."""
    dim, ffn, vocab = 32, 64, 16
    base = {"context_length": 64, "embedding_length": dim, "block_count": 1, "feed_forward_length": ffn,
            "attention.head_count": 2, "attention.head_count_kv": 2, "attention.layer_norm_rms_epsilon": 1e-5}
    base.update(kv or {})
    base = {k: v for k, v in base.items() if k not in drop}
    w = gguf.GGUFWriter(path, arch)
    for key, value in base.items():
        full = f"{arch}.{key}"
        if isinstance(value, str):
            w.add_string(full, value)
        elif isinstance(value, float):
            w.add_float32(full, value)
        else:
            w.add_uint32(full, value)
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (vocab, dim), "output_norm.weight": (dim,), "output.weight": (vocab, dim),
              "blk.0.attn_norm.weight": (dim,), "blk.0.ffn_norm.weight": (dim,),
              "blk.0.attn_q.weight": (dim, dim), "blk.0.attn_k.weight": (dim, dim), "blk.0.attn_v.weight": (dim, dim),
              "blk.0.attn_output.weight": (dim, dim), "blk.0.ffn_gate.weight": (ffn, dim),
              "blk.0.ffn_up.weight": (ffn, dim), "blk.0.ffn_down.weight": (dim, ffn)}
    arrays = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items() if n not in drop}
    arrays.update(tensors or {})
    for name, a in arrays.items():
        w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_valid_raw_file_loads(tmp_path):
    model = load_model(_write_raw(tmp_path / "ok.gguf"))
    assert model.args.dim == 32 and not model.args.tie_embeddings


@pytest.mark.parametrize("kwargs, match", [
    (dict(arch="qwen2"), "architecture 'qwen2'"),
    (dict(kv={"expert_count": 8}), "mixture-of-experts"),
    (dict(kv={"feed_forward_length": 96}), r"llama.feed_forward_length = 96 but blk.0.ffn_gate.weight has 64 rows"),
    (dict(kv={"vocab_size": 17}), "vocab_size = 17"),
    (dict(kv={"rope.scaling.type": "yarn"}), "'yarn' RoPE scaling"),
    (dict(kv={"rope.scaling.factor": 4.0}), r"'linear' RoPE scaling \(factor 4.0\)"),
    (dict(kv={"rope.dimension_count": 8}), "rotary dimensions"),
    (dict(drop=("blk.0.ffn_up.weight",)), "lacks 1 tensor"),
    (dict(drop=("attention.layer_norm_rms_epsilon",)), "no llama.attention.layer_norm_rms_epsilon"),
    (dict(tensors={"blk.0.ffn_gate_inp.weight": np.zeros((4, 32), np.float32)}), "does not have"),
    (dict(tensors={"blk.0.attn_q.weight": np.zeros((32, 32), np.int32)}), "type I32"),
    (dict(tensors={"rope_freqs.weight": np.array([1, 5, 2, 9, 1, 1, 1, 1], np.float32)}), "RoPE scaling rule"),
], ids=["arch", "moe", "ffn-shape", "vocab", "yarn", "linear", "partial-rotary", "missing", "no-eps", "unknown", "int",
        "rope-freqs"])
def test_bad_files_get_clear_errors(tmp_path, kwargs, match):
    path = _write_raw(tmp_path / "m.gguf", **kwargs)
    with pytest.raises(ValueError, match=match):
        load_model(path)


def test_missing_metadata_is_named_by_describe_too(tmp_path):
    path = _write_raw(tmp_path / "m.gguf", drop=("attention.head_count",))
    with pytest.raises(ValueError, match="no llama.attention.head_count in its metadata"):
        describe(path)


def test_not_gguf_truncated_and_missing(tmp_path):
    text = tmp_path / "notes.gguf"
    text.write_text("hello world")
    with pytest.raises(ValueError, match="not a GGUF file"):
        load_model(text)
    good = _write_raw(tmp_path / "ok.gguf")
    data = good.read_bytes()
    for cut in (100, len(data) // 2, len(data) - 8):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(ValueError, match="truncated or corrupt"):
            load_model(bad)
    with pytest.raises(FileNotFoundError):
        read_gguf(tmp_path / "absent.gguf")
    with pytest.raises(ValueError, match="directory"):
        read_gguf(tmp_path)


@pytest.mark.parametrize("change, match", [
    ({"tokenizer.ggml.foo": 1}, "unknown keys tokenizer.ggml.foo"),
    ({"tokenizer.ggml.token_type": ["1"] * 258}, "int32 values only"),
    ({"tokenizer.ggml.tokens": ["a"] * 10}, "10 entries"),
    ({"tokenizer.ggml.eos_token_id": 258}, r"token id in \[0, 258\)"),
    ({"tokenizer.ggml.bos_token_id": True}, "token id"),
    ({"tokenizer.ggml.add_bos_token": 1}, "True or False"),
    ({"tokenizer.ggml.merges": []}, "non-empty list"),
    ({"tokenizer.chat_template": None}, "must be a string"),
])
def test_tokenizer_metadata_is_checked(tmp_path, change, match):
    meta = {**byte_vocab(), **change}
    with pytest.raises(ValueError, match=match):
        write_gguf(tiny_model(tied=True), tmp_path / "m.gguf", tokenizer_metadata=meta)
    assert not list(tmp_path.iterdir())


# ---- llama.cpp runs what herd writes --------------------------------------------------------

_LLAMA_CPP = textwrap.dedent("""
    import json, sys
    import numpy as np
    from llama_cpp import Llama
    paths, tokens, out = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
    for q, path in paths.items():
        # type_k / type_v 0 (GGML_TYPE_F32): llama.cpp's default F16 KV cache would round K and V.
        llm = Llama(model_path=path, n_ctx=len(tokens), n_batch=len(tokens), logits_all=True, n_threads=1,
                    type_k=0, type_v=0, verbose=False)
        llm.eval(tokens)
        np.save(f"{out}/{q}.npy", np.asarray(llm.scores[: len(tokens)], dtype=np.float32))
""")


def test_llama_cpp_runs_files_herd_wrote(written, tmp_path):
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed")
    _, paths = written
    tokens = TOKENS[0].tolist()
    # Its own process: llama.cpp's threads and allocator stay out of pytest's torch process.
    subprocess.run([sys.executable, "-c", _LLAMA_CPP, json.dumps({q: str(p) for q, p in paths.items()}),
                    json.dumps(tokens), str(tmp_path)], check=True, timeout=300)
    for q in QTYPES:
        theirs = torch.from_numpy(np.load(tmp_path / f"{q}.npy"))
        ours = logits(load_model(paths[q], dtype=torch.float32))
        # F32: summation order only (measured < 1e-6). Quantized: the same weights, but llama.cpp
        # also rounds the activations (to F16 for F16 weights, to 8-bit blocks for Q8_0 / Q4_0)
        # where herd multiplies in fp32; measured (norm-relative) F16 3e-4 / 6e-4, Q8_0 and Q4_0 0.008 / 0.019
        # (untied / tied; random weights this large amplify rounding).
        bound = {"F32": 1e-5, "F16": 3e-3, "Q8_0": 0.06, "Q4_0": 0.06}[q]
        err = float((theirs - ours).norm() / ours.norm())
        assert err < bound, q
