"""GGUF blocks onto herd's int4, against the gguf package's own quantizer and dequantizer.

The reference for every value is `gguf.quants.dequantize` (llama.cpp's Python twin of
ggml-quants.c); blocks come from `gguf.quants.quantize` on random weights and from the real
SmolLM2-135M-Instruct file, read with `gguf.GGUFReader`.
"""

from __future__ import annotations

import struct
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from herd.quant.gguf_blocks import FP16_MAX, dequantize_blocks, q4_to_int4, quantized_model_from_raw
from herd.quant.linear import Int4Linear, Int8Linear, unpack_int4

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType


def _reference(blocks: np.ndarray, qtype, shape) -> torch.Tensor:
    return torch.from_numpy(gguf.quants.dequantize(blocks, qtype).reshape(shape).astype(np.float32))


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality with +0.0 == -0.0: Q4_0's 0 * d keeps d's sign, herd's 8d - 8d is +0."""
    return torch.equal((a + 0.0).view(torch.int32), (b + 0.0).view(torch.int32))


def _random_weights(scale: float, seed: int, shape=(16, 256)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape).astype(np.float32) * scale
    w[3] = 0.0  # an all-zero row: d = 0
    w[5, :32] = scale  # a constant block
    w[7] *= np.linspace(0.0, 50.0, shape[1], dtype=np.float32)  # blocks of very different ranges
    return w


# 0.02: typical weights; 1e-6: d ~ 1e-7, an fp16 subnormal (fp16's smallest normal is 6.1e-5);
# 300: large d, still with 8 d inside fp16.
@pytest.mark.parametrize("scale", [0.02, 1e-6, 300.0])
@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1])
def test_mapped_blocks_dequantize_bit_for_bit(qtype, scale):
    w = _random_weights(scale, seed=int(qtype))
    blocks = gguf.quants.quantize(w, qtype)
    int4 = q4_to_int4(qtype, blocks, w.shape)
    assert int4 is not None and int4.group_size == 32
    ref = _reference(blocks, qtype, w.shape)
    assert _same_bits(int4.dequantize(), ref)
    if scale == 1e-6:
        d = int4.scales.float().abs()
        assert ((d > 0) & (d < 2**-14)).any()  # the subnormal case is really exercised


def test_nibble_order_by_hand():
    # One Q4_1 block, d = 0.5, m = -1: byte j holds code j (low nibble) and 15 - j (high nibble),
    # so inputs 0..15 have codes 0..15 and inputs 16..31 have codes 15..0.
    qs = bytes(j | ((15 - j) << 4) for j in range(16))
    block = np.frombuffer(struct.pack("<ee", 0.5, -1.0) + qs, dtype=np.uint8)[None, :]
    int4 = q4_to_int4("Q4_1", block, (1, 32))
    codes = list(range(16)) + list(range(15, -1, -1))
    assert unpack_int4(int4.weight)[0].tolist() == codes
    assert int4.dequantize()[0].tolist() == [0.5 * q - 1.0 for q in codes]
    assert _same_bits(int4.dequantize(), _reference(block, Q.Q4_1, (1, 32)))


def test_q4_0_min_must_fit_fp16():
    # d = 8188: -8 d = -65504 is fp16's largest finite value, exact. d = 8192: -8 d overflows, so
    # the tensor has no exact int4 form and is dequantized instead.
    qs = bytes(range(0, 256, 17))  # codes (j, j) for j in 0..15
    for d, exact in [(8188.0, True), (8192.0, False)]:
        block = np.frombuffer(struct.pack("<e", d) + qs, dtype=np.uint8)[None, :]
        int4 = q4_to_int4(Q.Q4_0, block, (1, 32))
        ref = _reference(block, Q.Q4_0, (1, 32))
        assert abs(float(ref.min())) == 8 * d and (8 * d <= FP16_MAX) == exact
        if exact:
            assert _same_bits(int4.dequantize(), ref)
        else:
            assert int4 is None
            assert torch.equal(dequantize_blocks(Q.Q4_0, block, (1, 32)), ref)


def _q6_k_blocks(shape, seed: int) -> np.ndarray:
    """Random Q6_K bytes (the gguf package cannot quantize to it) with a sane fp16 d per block."""
    n, k = shape
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(n, k // 256, 210), dtype=np.uint8)  # ql, qh, scales, d
    blocks[..., 208:] = np.full((n, k // 256), 1e-3, dtype=np.float16).view(np.uint8).reshape(n, k // 256, 2)
    return blocks.reshape(n, -1)


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q5_1, Q.Q6_K, Q.F16, Q.BF16])
def test_other_types_are_dequantized_with_the_gguf_package(qtype):
    w = _random_weights(0.02, seed=3)
    blocks = _q6_k_blocks(w.shape, seed=3) if qtype == Q.Q6_K else gguf.quants.quantize(w, qtype)
    assert q4_to_int4(qtype, blocks, w.shape) is None
    assert torch.equal(dequantize_blocks(qtype.name, blocks, w.shape), _reference(blocks, qtype, w.shape))


def test_shape_and_size_errors():
    blocks = gguf.quants.quantize(_random_weights(0.02, seed=4), Q.Q4_1)
    with pytest.raises(ValueError, match="innermost-first"):
        q4_to_int4(Q.Q4_1, blocks, (256, 16))  # GGUF's order instead of (rows, inputs)
    for shape in [(8, 512), (16, 512)]:  # the same bytes in other rows; more bytes than there are
        with pytest.raises(ValueError, match="does not hold"):
            q4_to_int4(Q.Q4_1, blocks, shape)


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1])
@pytest.mark.parametrize("rows", [1, 5, 100])  # decode kernel, chunked kernel, dequantize + matmul
def test_int4_linear_from_blocks_matches_the_dequantized_linear(qtype, rows):
    w = _random_weights(0.02, seed=5, shape=(48, 256))
    blocks = gguf.quants.quantize(w, qtype)
    mod = q4_to_int4(qtype, blocks, w.shape).to_linear()
    lin = nn.Linear(256, 48, bias=False)
    with torch.no_grad():
        lin.weight.copy_(_reference(blocks, qtype, w.shape))
    x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(rows))
    with torch.inference_mode():
        torch.testing.assert_close(mod(x), lin(x), rtol=1e-5, atol=1e-6)


# ---- the real file --------------------------------------------------------------------------

_NAMES = {"attn_q": "attention.wq", "attn_k": "attention.wk", "attn_v": "attention.wv",
          "attn_output": "attention.wo", "ffn_gate": "feed_forward.w1", "ffn_up": "feed_forward.w3",
          "ffn_down": "feed_forward.w2", "attn_norm": "attention_norm", "ffn_norm": "ffn_norm"}


def _herd_name(gguf_name: str) -> str:
    """llama.cpp's tensor names -> herd's (a test-side copy; herd.model.gguf owns the real map)."""
    stem, _, suffix = gguf_name.rpartition(".")
    top = {"token_embd": "tok_embeddings", "output_norm": "norm", "output": "output"}
    if stem in top:
        return f"{top[stem]}.{suffix}"
    _, layer, kind = stem.split(".")
    return f"layers.{layer}.{_NAMES[kind]}.{suffix}"


@pytest.fixture(scope="module")
def smol_raw(smollm2_gguf):
    reader = gguf.GGUFReader(str(smollm2_gguf))
    # GGUF lists shapes innermost-first; torch order is the reverse.
    return {_herd_name(t.name): SimpleNamespace(type=t.tensor_type, shape=tuple(int(s) for s in reversed(t.shape)),
                                                data=t.data) for t in reader.tensors}


def test_real_q4_1_tensors_map_bit_for_bit(smol_raw):
    names = [n for n in smol_raw if n.startswith(("layers.0.", "layers.29."))]
    checked = 0
    for name in names:
        t = smol_raw[name]
        if t.type != Q.Q4_1:
            continue
        int4 = q4_to_int4(t.type, t.data, t.shape)
        assert _same_bits(int4.dequantize(), _reference(t.data, t.type, t.shape)), name
        checked += 1
    assert checked == 14  # 7 linear layers in each of the two blocks


def test_real_model_from_blocks_equals_transformers(smol_raw, smol_float, smollm2_hf):
    """Every Q4_1 tensor mapped exactly and a float head: the model *is* the file's weights, so its
    logits equal transformers' reading of the same file. This also shows that GGUF's q/k rows are
    already in herd's (Meta's) order: llama.cpp's converter undoes HF's permutation."""
    from herd.quant import QuantConfig

    args, sd = smol_float
    built = quantized_model_from_raw(args, sd, smol_raw, QuantConfig("int4", group_size=64, head="float"))
    model = built.model
    assert len(built.exact) == 7 * args.n_layers and all(isinstance(model.get_submodule(n), Int4Linear)
                                                         for n in built.exact)
    assert {model.get_submodule(n).group_size for n in built.exact} == {32}  # the blocks', not the recipe's
    assert built.requantized == {} and built.dequantized == {"output": "Q8_0", "tok_embeddings": "Q8_0"}
    assert model.output.weight is model.tok_embeddings.weight
    ids = smollm2_hf.tokenizer("The capital of France is Paris. Llamas are", return_tensors="pt").input_ids
    with torch.inference_mode():
        ref = smollm2_hf.model(ids).logits.float()
        ours = model(ids)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-4)

    # The default recipe: the tied Q8_0 head is requantized to herd's int8, and says so.
    default = quantized_model_from_raw(args, sd, smol_raw, QuantConfig("int4", group_size=32))
    assert default.requantized == {"output": "Q8_0"} and default.dequantized == {"tok_embeddings": "Q8_0"}
    assert isinstance(default.model.output, Int8Linear)
    with torch.inference_mode():
        top = default.model(ids).argmax(-1)
    assert float((top == ref.argmax(-1)).float().mean()) >= 0.9


def test_herd_quantize_of_a_gguf_file_keeps_its_blocks(smollm2_gguf, smol_raw, tmp_path):
    pytest.importorskip("herd.model.gguf", reason="herd.model.gguf (GGUF reading) is not in this tree yet")
    from herd.quant import QuantConfig, load_quantized, quantize_checkpoint

    report = quantize_checkpoint(smollm2_gguf, tmp_path / "q", QuantConfig("int4"))
    assert len(report.modules) == 211 and report.head == "int8" and report.bytes_after < report.bytes_before / 5
    loaded = load_quantized(tmp_path / "q")
    assert isinstance(loaded.output, Int8Linear)
    for name in ["layers.0.attention.wq", "layers.29.feed_forward.w2"]:
        t, mod = smol_raw[f"{name}.weight"], loaded.get_submodule(name)
        ref = q4_to_int4(t.type, t.data, t.shape)
        assert mod.group_size == 32
        assert torch.equal(mod.weight, ref.weight) and torch.equal(mod.scales, ref.scales), name
