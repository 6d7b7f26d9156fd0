"""herd.gguf_header against the gguf package's own reader, on files its writer made and on SmolLM2."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from herd.gguf_header import read_gguf_header

gguf = pytest.importorskip("gguf")
T = gguf.GGUFValueType
Q = gguf.GGMLQuantizationType


def _every_value(w) -> None:
    w.add_uint8("general.u8", 255)
    w.add_int8("general.i8", -128)
    w.add_uint16("general.u16", 65535)
    w.add_int16("general.i16", -300)
    w.add_uint32("general.u32", 4_000_000_000)
    w.add_int32("general.i32", -(2**31))
    w.add_uint64("general.u64", 2**64 - 1)
    w.add_int64("general.i64", -(2**40))
    w.add_float32("general.f32", 1e-5)  # read back as float32's 9.99999974738e-06, as GGUFReader gives
    w.add_float64("general.f64", 1e-300)
    w.add_bool("general.yes", True)
    w.add_bool("general.no", False)
    w.add_string("general.text", "{{ 'é😀' }}\n")
    w.add_key_value("general.empty", "", T.STRING)  # add_string would drop an empty string
    for vtype, values in [(T.UINT8, [0, 255]), (T.INT8, [-1, 2]), (T.UINT16, [7, 65535]), (T.INT16, [-2, 3]),
                          (T.UINT32, [1, 2**32 - 1]), (T.INT32, [-5, 6]), (T.UINT64, [2**63, 1]),
                          (T.INT64, [-(2**63), 4]), (T.FLOAT32, [0.5, -1.25]), (T.FLOAT64, [1e-300, 2.0]),
                          (T.BOOL, [True, False, True])]:
        w.add_key_value(f"tokenizer.{vtype.name.lower()}s", values, T.ARRAY, sub_type=vtype)
    w.add_array("tokenizer.ggml.tokens", ["a", "Ġb", "東京", "", "<0x0A>"])
    w.add_array("tokenizer.nested", [[1, 2, 3], [4]])
    w.add_array("tokenizer.nested_strings", [["x", "yz"], ["東"]])
    w.add_string("other.skipped", "x" * 100)
    w.add_array("other.skipped_tokens", ["p", "q"] * 10)
    w.add_array("other.skipped_nested", [[1.5], [2.5, 3.5]])


def _tensors() -> dict[str, tuple[np.ndarray, object]]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 64)).astype(np.float32)
    return {"f32": (x, None), "f16": (x.astype(np.float16), None), "norm": (x[0], None),
            "bf16": (gguf.quants.quantize(x, Q.BF16), Q.BF16), "q8_0": (gguf.quants.quantize(x, Q.Q8_0), Q.Q8_0),
            "q4_1": (gguf.quants.quantize(x, Q.Q4_1), Q.Q4_1), "q6_k": (rng.integers(0, 255, (4, 210), np.uint8), Q.Q6_K)}


def _write(path, build=_every_value, *, alignment: int | None = None, endianess=None, tensors=True):
    kwargs = {} if endianess is None else {"endianess": endianess}
    w = gguf.GGUFWriter(str(path), "llama", **kwargs)
    if alignment is not None:
        w.add_custom_alignment(alignment)
    build(w)
    for name, (a, raw) in (_tensors() if tensors else {}).items():
        w.add_tensor(name, a, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _flat(value):
    # GGUFReader.contents() flattens arrays of arrays (a FIXME in its code); herd keeps them nested.
    if isinstance(value, list) and value and isinstance(value[0], list):
        return [v for inner in value for v in _flat(inner)]
    return value


def _compare_with_gguf_reader(path, prefixes=None) -> None:
    ours = read_gguf_header(path, prefixes=prefixes)
    reader = gguf.GGUFReader(path)
    fields = {k: f for k, f in reader.fields.items()
              if not k.startswith("GGUF.") and (prefixes is None or k.startswith(prefixes))}
    assert list(ours.metadata) == list(fields)
    for key, field in fields.items():
        value, want = _flat(ours.metadata[key]), field.contents()
        assert value == want, key
        # The same Python types too (bool is not int, float32 values come back as float).
        assert [type(v) for v in value] == [type(v) for v in want] if isinstance(want, list) else type(value) is type(want)
        names = tuple(t.name.lower() for t in field.types)
        assert ours.types[key] == (names[:2] if names[:2] == ("array", "array") else names), key
    assert ours.version == reader.fields["GGUF.version"].contents()
    assert ours.alignment == reader.alignment and ours.data_start == reader.data_offset
    assert [(t.name, t.type, t.dims, t.offset) for t in ours.tensors] == [
        (t.name, int(t.tensor_type), tuple(int(d) for d in t.shape), t.data_offset) for t in reader.tensors]
    assert ours.file_size == path.stat().st_size


@pytest.mark.parametrize("alignment", [None, 1, 8, 256])
def test_every_value_type_and_tensor_info_equals_gguf_reader(tmp_path, alignment):
    path = _write(tmp_path / "every.gguf", alignment=alignment)
    _compare_with_gguf_reader(path)
    header = read_gguf_header(path)
    assert header.metadata["tokenizer.nested"] == [[1, 2, 3], [4]]
    assert header.metadata["general.f32"] == float(np.float32(1e-5))
    assert {t.name: t.type for t in header.tensors}["q6_k"] == int(Q.Q6_K)
    assert {t.name: t.dims for t in header.tensors}["q4_1"] == (64, 4)  # innermost first, counted in values
    assert all(t.offset % header.alignment == 0 for t in header.tensors)


def test_prefixes_keep_only_those_keys_and_still_place_the_data(tmp_path):
    path = _write(tmp_path / "every.gguf", alignment=256)
    _compare_with_gguf_reader(path, prefixes=("tokenizer.",))
    header = read_gguf_header(path, prefixes=("tokenizer.ggml.tokens",))
    assert header.metadata == {"tokenizer.ggml.tokens": ["a", "Ġb", "東京", "", "<0x0A>"]}
    assert set(header.types) == {"tokenizer.ggml.tokens"}
    # general.alignment is not kept, yet it still places the tensor data.
    assert header.alignment == 256 and header.data_start == read_gguf_header(path).data_start
    assert read_gguf_header(path, prefixes=()).metadata == {}


def test_smollm2_header_equals_gguf_reader(smollm2_gguf):
    _compare_with_gguf_reader(smollm2_gguf)
    header = read_gguf_header(smollm2_gguf)
    assert len(header.metadata["tokenizer.ggml.tokens"]) == 49152 and len(header.tensors) == 272


# ---- broken files -----------------------------------------------------------------------------


def test_every_truncation_of_the_header_is_an_error(tmp_path):
    path = _write(tmp_path / "every.gguf", tensors=False)
    data = path.read_bytes()
    cut, whole = tmp_path / "cut.gguf", read_gguf_header(path).metadata
    complete = []
    for n in range(len(data) + 1):
        cut.write_bytes(data[:n])
        try:
            complete.append(read_gguf_header(cut).metadata == whole)
        except ValueError as e:
            assert ("not a GGUF file" if n < 4 else "truncated or corrupt") in str(e), n
            complete.append(False)
    # Every cut before the header's last byte is an error, every later one reads the whole header.
    end = complete.index(True)
    assert all(complete[end:]) and end > len(data) - 32
    assert read_gguf_header(path).data_start == -(-end // 32) * 32


def test_truncated_tensor_infos_are_an_error(tmp_path):
    path = _write(tmp_path / "every.gguf")
    header = read_gguf_header(path)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[: header.data_start - 40])  # inside the last tensor info
    with pytest.raises(ValueError, match=r"truncated or corrupt: .* in tensor info 6"):
        read_gguf_header(cut)


def test_not_gguf_missing_and_directory(tmp_path):
    path = _write(tmp_path / "every.gguf", tensors=False)
    (tmp_path / "zip.gguf").write_bytes(b"PK\x03\x04" + path.read_bytes()[4:])
    with pytest.raises(ValueError, match=r"not a GGUF file \(it starts with b'PK\\x03\\x04'"):
        read_gguf_header(tmp_path / "zip.gguf")
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(ValueError, match="not a GGUF file"):
        read_gguf_header(tmp_path / "empty.gguf")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_gguf_header(tmp_path / "missing.gguf")
    with pytest.raises(ValueError, match="is a directory"):
        read_gguf_header(tmp_path)


def test_big_endian_and_other_versions_are_refused(tmp_path):
    big = _write(tmp_path / "big.gguf", endianess=gguf.GGUFEndian.BIG, tensors=False)
    with pytest.raises(ValueError, match="big-endian GGUF file .*gguf-convert-endian"):
        read_gguf_header(big)
    data = bytearray(_write(tmp_path / "ok.gguf", tensors=False).read_bytes())
    for version in (1, 4):
        struct.pack_into("<I", data, 4, version)
        (tmp_path / "v.gguf").write_bytes(bytes(data))
        with pytest.raises(ValueError, match=f"GGUF version {version} is not supported"):
            read_gguf_header(tmp_path / "v.gguf")


def _two_keys(w) -> None:
    w.add_uint32("general.aa", 1)
    w.add_uint32("general.ab", 2)


@pytest.mark.parametrize("build, patch, match", [
    (_two_keys, (b"general.ab", b"general.aa"), "key 'general.aa' appears twice"),
    (lambda w: w.add_uint32("general.alignment", 24), None, "general.alignment is 24 .*power of two"),
    (lambda w: w.add_int32("general.alignment", 32), None, r"general.alignment is 32 \(int32\)"),
    (lambda w: w.add_uint32("general.zz", 7), (b"general.zz\x04\x00\x00\x00", b"general.zz\x0d\x00\x00\x00"),
     "unknown GGUF value type 13"),
    (lambda w: w.add_array("general.zz", [1, 2]), (b"general.zz\x09\x00\x00\x00\x05", b"general.zz\x09\x00\x00\x00\x63"),
     "unknown GGUF value type 99"),
    (lambda w: w.add_string("general.\xe9", "x"), (b"general.\xc3\xa9", b"general.\xff\xfe"), "key .* is not UTF-8"),
], ids=["duplicate", "alignment-value", "alignment-type", "value-type", "item-type", "key-utf8"])
def test_malformed_headers_are_clear_errors(tmp_path, build, patch, match):
    path = _write(tmp_path / "bad.gguf", build, tensors=False)
    if patch is not None:
        data = path.read_bytes()
        assert data.count(patch[0]) == 1
        path.write_bytes(data.replace(*patch))
    for prefixes in (None, ("nothing.",)):  # kept or stepped over: the same error
        with pytest.raises(ValueError, match=match):
            read_gguf_header(path, prefixes=prefixes)


def test_duplicate_tensor_names_are_an_error(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "t.gguf"), "llama")
    w.add_tensor("aa", np.zeros(4, np.float32))
    w.add_tensor("ab", np.ones(4, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    data = (tmp_path / "t.gguf").read_bytes()
    (tmp_path / "t.gguf").write_bytes(data.replace(b"\x02\x00\x00\x00\x00\x00\x00\x00ab", b"\x02\x00\x00\x00\x00\x00\x00\x00aa"))
    with pytest.raises(ValueError, match="tensor 'aa' appears twice"):
        read_gguf_header(tmp_path / "t.gguf")
