"""herd.model.gguf reads through herd.gguf_header and one memory map: what it gives must equal what
the gguf package's own reader and dequantizer give, value for value and dtype for dtype.

The reference below is `gguf.GGUFReader` + `gguf.quants.dequantize` (what herd used before), on
SmolLM2 (a real llama.cpp Q4_1 file) and on small files mixing tensor types at odd alignments.
"""

from __future__ import annotations

import warnings
from collections import Counter

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from herd.model import RopeScaling, describe
from herd.model.gguf import describe_gguf, gguf_raw_tensors, herd_name, read_gguf
from herd.model.rope import rope_frequencies

GGML = gguf.GGMLQuantizationType


def reference_tensor(t) -> torch.Tensor:
    """One ReaderTensor as herd's GGUFReader-based reading turned it into torch."""
    if t.tensor_type in (GGML.F32, GGML.F16):
        return torch.from_numpy(np.array(t.data))
    if t.tensor_type == GGML.BF16:
        return torch.from_numpy(np.array(t.data)).view(torch.bfloat16)
    return torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type))


def reference_metadata(reader, *, summarize: bool = False) -> dict:
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        if summarize and field.types[0] == gguf.GGUFValueType.ARRAY and len(field.data) > 16:
            out[key] = f"<{len(field.data)} x {field.types[-1].name.lower()}>"
        else:
            out[key] = field.contents()
    return out


def assert_reads_like_gguf_reader(path) -> None:
    reader = gguf.GGUFReader(path)
    weights = [t for t in reader.tensors if herd_name(t.name) is not None]
    ckpt = read_gguf(path)
    assert list(ckpt.state_dict) == [herd_name(t.name) for t in weights]
    for t in weights:  # one tensor at a time: SmolLM2 dequantized is 0.5 GB
        ours, ref = ckpt.state_dict[herd_name(t.name)], reference_tensor(t)
        assert ours.dtype == ref.dtype and ours.shape == ref.shape, t.name
        assert torch.equal(ours.view(torch.uint8), ref.view(torch.uint8)), t.name  # bits, NaNs included
    assert ckpt.tensor_types == {herd_name(t.name): t.tensor_type.name for t in weights}
    assert ckpt.metadata == reference_metadata(reader)

    raw = gguf_raw_tensors(path)
    for t in weights:
        r = raw[herd_name(t.name)]
        want = np.asarray(t.data).view(np.uint8)
        assert r.type == t.tensor_type.name and r.shape == tuple(int(d) for d in reversed(t.shape.tolist()))
        assert r.data.dtype == np.uint8 and r.data.shape == want.shape and np.array_equal(r.data, want), t.name

    info = describe_gguf(path)
    assert info.config == reference_metadata(reader, summarize=True)
    counts = Counter(t.tensor_type.name for t in reader.tensors)
    assert info.dtype == ", ".join(f"{k} ({n})" for k, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def test_smollm2_reads_exactly_as_gguf_reader_and_dequantize(smollm2_gguf):
    assert_reads_like_gguf_reader(smollm2_gguf)
    info = describe(smollm2_gguf)
    assert info.config["tokenizer.ggml.tokens"] == "<49152 x string>"
    assert info.config["tokenizer.ggml.merges"] == "<48900 x string>"


# ---- small files: every float type, several block types, odd alignments -----------------------

DIM, FFN, VOCAB = 256, 512, 32
TYPES = {"token_embd.weight": GGML.F16, "output.weight": GGML.BF16, "blk.0.attn_q.weight": GGML.Q8_0,
         "blk.0.attn_k.weight": GGML.Q4_1, "blk.0.attn_v.weight": GGML.Q5_0, "blk.0.attn_output.weight": GGML.Q4_0,
         "blk.0.ffn_gate.weight": GGML.Q4_K, "blk.0.ffn_up.weight": GGML.Q6_K, "blk.0.ffn_down.weight": GGML.F32}


def _write(path, *, alignment: int | None, rope_freqs: bool = True):
    """A one-layer llama file whose tensors have the types of TYPES (K-quants as random blocks with
    small fp16 scales, since gguf cannot quantize to them)."""
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama")
    if alignment is not None:
        w.add_custom_alignment(alignment)
    for add, value in [(w.add_context_length, 64), (w.add_embedding_length, DIM), (w.add_block_count, 1),
                       (w.add_feed_forward_length, FFN), (w.add_head_count, 4), (w.add_head_count_kv, 2),
                       (w.add_layer_norm_rms_eps, 1e-5), (w.add_rope_freq_base, 500000.0)]:
        add(value)
    w.add_array("tokenizer.ggml.tokens", [f"t{i}" for i in range(VOCAB)])
    if rope_freqs:  # Llama 3.1 scaling as llama.cpp's converter stores it (factor 8, 64-token original)
        scaled = rope_frequencies(DIM // 4, 500000.0, RopeScaling(factor=8.0, original_max_seq_len=64))
        w.add_tensor("rope_freqs.weight", (rope_frequencies(DIM // 4, 500000.0, None) / scaled).numpy())
    shapes = {"token_embd.weight": (VOCAB, DIM), "output.weight": (VOCAB, DIM), "blk.0.attn_q.weight": (DIM, DIM),
              "blk.0.attn_k.weight": (DIM // 2, DIM), "blk.0.attn_v.weight": (DIM // 2, DIM),
              "blk.0.attn_output.weight": (DIM, DIM), "blk.0.ffn_gate.weight": (FFN, DIM),
              "blk.0.ffn_up.weight": (FFN, DIM), "blk.0.ffn_down.weight": (DIM, FFN)}
    for name in ("output_norm.weight", "blk.0.attn_norm.weight", "blk.0.ffn_norm.weight"):
        w.add_tensor(name, (1 + 0.1 * rng.standard_normal(DIM)).astype(np.float32))
    for name, shape in shapes.items():
        kind = TYPES[name]
        x = (0.1 * rng.standard_normal(shape)).astype(np.float32)
        if kind == GGML.F32:
            w.add_tensor(name, x)
        elif kind == GGML.F16:
            w.add_tensor(name, x.astype(np.float16))
        elif kind in (GGML.Q4_K, GGML.Q6_K):
            block, size = gguf.GGML_QUANT_SIZES[kind]
            blocks = rng.integers(0, 256, (shape[0], shape[1] // block, size), dtype=np.uint8)
            for off in ((0, 2) if kind == GGML.Q4_K else (size - 2,)):  # the fp16 scales: finite, small
                blocks[..., off:off + 2] = rng.uniform(1e-3, 1e-2, blocks.shape[:2]).astype(np.float16)[..., None].view(np.uint8)
            w.add_tensor(name, blocks.reshape(shape[0], -1), raw_dtype=kind)
        else:
            w.add_tensor(name, gguf.quants.quantize(x, kind), raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("alignment", [None, 8, 64, 4096])
def test_every_type_reads_exactly_as_gguf_reader_and_dequantize(tmp_path, alignment):
    path = _write(tmp_path / "mixed.gguf", alignment=alignment)
    assert_reads_like_gguf_reader(path)
    ckpt = read_gguf(path)
    assert ckpt.args.rope_scaling is not None and ckpt.args.rope_scaling.factor == 8.0
    assert {ckpt.tensor_types[herd_name(n)] for n in TYPES} == {k.name for k in TYPES.values()}


def test_float_tensors_share_a_copy_on_write_map(tmp_path):
    path = _write(tmp_path / "m.gguf", alignment=None)
    before = path.read_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns when it wraps a read-only array
        sd = read_gguf(path).state_dict
    assert sd["layers.0.feed_forward.w2.weight"].dtype == torch.float32
    for key in ("layers.0.feed_forward.w2.weight", "tok_embeddings.weight", "output.weight"):  # F32, F16, BF16
        sd[key].zero_()
    assert path.read_bytes() == before  # the file is never written through the map


def test_describe_reads_no_tensor_data_but_rope_freqs(tmp_path, monkeypatch):
    path = _write(tmp_path / "m.gguf", alignment=None)
    freqs = next(t for t in gguf.GGUFReader(path).tensors if t.name == "rope_freqs.weight")
    reads = []
    fromfile = np.fromfile

    def counted(*args, **kwargs):
        reads.append((kwargs.get("offset"), kwargs.get("count")))
        return fromfile(*args, **kwargs)

    def no_map(*args, **kwargs):
        raise AssertionError("describe_gguf mapped the tensor data")

    monkeypatch.setattr(np, "fromfile", counted)
    monkeypatch.setattr(np, "memmap", no_map)
    info = describe_gguf(path)
    assert info.args.rope_scaling is not None
    assert reads == [(freqs.data_offset, freqs.n_bytes)]


def test_unknown_tensor_types_and_short_data_are_clear_errors(tmp_path):
    path = _write(tmp_path / "m.gguf", alignment=None, rope_freqs=False)
    data = path.read_bytes()
    name = b"blk.0.ffn_down.weight"
    at = data.index(len(name).to_bytes(8, "little") + name) + 8 + len(name) + 4 + 2 * 8  # its GGML type id
    assert int.from_bytes(data[at:at + 4], "little") == GGML.F32
    (tmp_path / "t.gguf").write_bytes(data[:at] + (250).to_bytes(4, "little") + data[at + 4:])
    with pytest.raises(ValueError, match="blk.0.ffn_down.weight has GGML type 250, which the installed gguf"):
        read_gguf(tmp_path / "t.gguf")
    (tmp_path / "short.gguf").write_bytes(data[:-100])
    with pytest.raises(ValueError, match=r"truncated or corrupt\?\): tensor .* ends at byte \d+ but the file has"):
        describe_gguf(tmp_path / "short.gguf")
