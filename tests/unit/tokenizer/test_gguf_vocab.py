"""GGUF vocabularies: the metadata reader against gguf.GGUFReader, byte-level BPE against HF and llama.cpp."""

from __future__ import annotations

import json

import numpy as np
import pytest

import herd.tokenizer.gguf_vocab as gv
from herd.tokenizer import HFTokenizer, Tokenizer, llama3_tokenizer_path, load_tokenizer

gguf = pytest.importorskip("gguf")

TEXTS = [
    "The quick brown fox, in 2024 and 1234567890!",
    "Où est l'hôpital ? Straße. 我们在北京。東京 😀👍🏽",
    "def f(x):\n    return x  # it's, we've, I'll\n\n\t  ",
    "a<|im_end|>b typed by a user",
    "$5 + 3 = <8> | ~^ and ... !!",
]


def _write(path, build, *, tensor: np.ndarray | None = None, arch: str = "llama") -> None:
    writer = gguf.GGUFWriter(str(path), arch)
    build(writer)
    if tensor is not None:
        writer.add_tensor("x", tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _reference(path) -> dict:
    reader = gguf.GGUFReader(str(path))
    return {k: f.contents() for k, f in reader.fields.items() if k.startswith(("tokenizer.", "general."))}


def _every_type(writer) -> None:
    writer.add_uint8("general.u8", 255)
    writer.add_int8("general.i8", -7)
    writer.add_uint16("general.u16", 65535)
    writer.add_int16("general.i16", -300)
    writer.add_uint32("general.u32", 4_000_000_000)
    writer.add_int32("general.i32", -5)
    writer.add_uint64("general.u64", 2**40)
    writer.add_int64("general.i64", -(2**40))
    writer.add_float32("general.f32", 0.5)
    writer.add_float64("general.f64", 1e-300)
    writer.add_bool("general.flag", True)
    writer.add_string("tokenizer.chat_template", "{{ 'é😀' }}")
    writer.add_array("tokenizer.ggml.tokens", ["a", "Ġb", "東京", ""])
    writer.add_array("tokenizer.ggml.scores", [0.0, -1.5, 2.25, 3.0])
    writer.add_array("tokenizer.ggml.token_type", [1, 3, 4, 6])
    writer.add_string("other.ignored", "x")


def test_metadata_equals_gguf_reader(tmp_path):
    path = tmp_path / "small.gguf"
    _write(path, _every_type)
    ours = gv.read_gguf_metadata(path)
    assert ours == _reference(path)
    assert "other.ignored" not in ours


def test_metadata_of_a_file_with_tensor_data(tmp_path):
    # The header reader maps the file; the 1.2 MB of tensor data after the header is never parsed.
    path = tmp_path / "large.gguf"
    _write(path, _every_type, tensor=np.zeros(300_000, dtype=np.float32))
    assert gv.read_gguf_metadata(path) == _reference(path)


def test_broken_files_are_clear_errors(tmp_path):
    path = tmp_path / "small.gguf"
    _write(path, _every_type)
    data = path.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[:60])
    with pytest.raises(ValueError, match="truncated|damaged"):
        gv.read_gguf_metadata(tmp_path / "cut.gguf")
    (tmp_path / "not.gguf").write_bytes(b"PK\x03\x04" + data[4:])
    with pytest.raises(ValueError, match="not a GGUF file"):
        gv.read_gguf_metadata(tmp_path / "not.gguf")
    with pytest.raises(FileNotFoundError):
        gv.read_gguf_metadata(tmp_path / "missing.gguf")


@pytest.fixture(scope="module")
def byte_level(chatml_dir):
    """The trained byte-level BPE of conftest: tokens, merges and the specials' ids."""
    data = json.loads((chatml_dir / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    tokens = [None] * len(vocab)
    for text, i in vocab.items():
        tokens[i] = text
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    specials = {t["content"] for t in data["added_tokens"]}
    types = [gguf.TokenType.CONTROL if t in specials else gguf.TokenType.NORMAL for t in tokens]
    return tokens, merges, types


def _byte_level_gguf(path, byte_level, pre: str | None) -> None:
    tokens, merges, types = byte_level

    def build(writer):
        # One tiny layer's hyperparameters, so that llama.cpp opens it (vocab only).
        writer.add_context_length(64)
        writer.add_embedding_length(8)
        writer.add_block_count(1)
        writer.add_feed_forward_length(8)
        writer.add_head_count(1)
        writer.add_head_count_kv(1)
        writer.add_layer_norm_rms_eps(1e-5)
        writer.add_vocab_size(len(tokens))
        writer.add_tokenizer_model("gpt2")
        if pre is not None:
            writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
        writer.add_eos_token_id(tokens.index("<|im_end|>"))
        writer.add_eot_token_id(tokens.index("<|endoftext|>"))
        writer.add_add_bos_token(False)

    _write(path, build)


def _hf_reference(chatml_dir, pre: str):
    from tokenizers import Tokenizer as Engine
    from tokenizers import pre_tokenizers

    engine = Engine.from_file(str(chatml_dir / "tokenizer.json"))
    if pre == "smollm":  # SmolLM2's own tokenizer.json: digits one by one, then GPT-2's regex
        engine.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    engine.encode_special_tokens = True
    return engine


@pytest.mark.parametrize("pre", ["gpt-2", "smollm", "default"])
def test_byte_level_bpe_equals_hf_and_llama_cpp(byte_level, chatml_dir, tmp_path, pre):
    path = tmp_path / f"{pre}.gguf"
    _byte_level_gguf(path, byte_level, pre)
    tok = load_tokenizer(path, vocab_size=len(byte_level[0]))
    assert isinstance(tok, HFTokenizer)
    assert tok.stop_tokens == (byte_level[0].index("<|im_end|>"), byte_level[0].index("<|endoftext|>"))
    assert tok.add_bos is False
    if pre != "default":  # llama.cpp's "default" has no tokenizer.json counterpart
        engine = _hf_reference(chatml_dir, pre)
        for text in TEXTS:
            assert tok.encode(text, bos=False, eos=False) == engine.encode(text, add_special_tokens=False).ids
    llama_cpp = pytest.importorskip("llama_cpp")
    vocab = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    for text in TEXTS:
        ids = tok.encode(text, bos=False, eos=False)
        assert ids == vocab.tokenize(text.encode(), add_bos=False, special=False), text
        assert tok.encode(text, bos=False, eos=False, allowed_special="all") == vocab.tokenize(
            text.encode(), add_bos=False, special=True
        )
        assert tok.decode(ids) == text


def test_an_unknown_pre_tokenizer_is_refused(byte_level, tmp_path):
    _byte_level_gguf(tmp_path / "odd.gguf", byte_level, "some-new-model")
    with pytest.raises(ValueError, match="pre-tokenizer 'some-new-model'.*smollm"):
        load_tokenizer(tmp_path / "odd.gguf", vocab_size=1000)


def test_a_missing_pre_tokenizer_is_llama_cpp_s_default(byte_level, tmp_path):
    _byte_level_gguf(tmp_path / "none.gguf", byte_level, None)
    _byte_level_gguf(tmp_path / "default.gguf", byte_level, "default")
    missing = load_tokenizer(tmp_path / "none.gguf", vocab_size=1000)
    default = load_tokenizer(tmp_path / "default.gguf", vocab_size=1000)
    for text in TEXTS:
        assert missing.encode(text, bos=False, eos=False) == default.encode(text, bos=False, eos=False)


def test_a_file_without_vocabulary_is_refused(tmp_path):
    _write(tmp_path / "bare.gguf", lambda w: w.add_string("general.name", "bare"))
    with pytest.raises(ValueError, match="no tokenizer.ggml.model"):
        load_tokenizer(tmp_path / "bare.gguf", vocab_size=10)


def test_a_llama3_vocabulary_becomes_herd_s_tiktoken_tokenizer(llama3, tmp_path):
    data = json.loads((llama3_tokenizer_path().parent / "tokenizer.json").read_text())
    tokens = [None] * 128256
    for text, i in data["model"]["vocab"].items():
        tokens[i] = text
    for added in data["added_tokens"]:
        if added["id"] < 128256:
            tokens[added["id"]] = added["content"]
    types = [gguf.TokenType.NORMAL] * 128000 + [gguf.TokenType.CONTROL] * 256

    def build(writer):
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("llama-bpe")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_bos_token_id(128000)
        writer.add_eos_token_id(128009)
        writer.add_eot_token_id(128009)
        writer.add_eom_token_id(128008)
        writer.add_string("tokenizer.chat_template", "{{ '<|start_header_id|>' }}")

    path = tmp_path / "llama3.gguf"
    _write(path, build)
    tok = load_tokenizer(path, vocab_size=128256)
    assert isinstance(tok, Tokenizer)
    assert tok._model._mergeable_ranks == llama3._model._mergeable_ranks
    text = "Hello world! 2024 東京 😀 <|eot_id|>"
    assert tok.encode(text, bos=True, eos=False) == llama3.encode(text, bos=True, eos=False)
    assert set(tok.stop_tokens) == {128001, 128008, 128009}


def test_a_herd_trained_vocabulary_comes_back_as_the_same_tiktoken_tokenizer(corpus, tmp_path):
    # herd's small vocabularies have Llama 3's layout with fewer base tokens.
    from herd.tokenizer.base import gpt2_byte_decoder
    from herd.tokenizer.tokenizer import SPECIAL_TOKEN_NAMES
    from herd.tokenizer.train_bpe import train_bpe

    ranks = train_bpe(corpus, vocab_size=400)
    reference = Tokenizer(ranks)
    char_of = {b: c for c, b in gpt2_byte_decoder().items()}
    tokens = [""] * len(ranks)
    for token, rank in ranks.items():
        tokens[rank] = "".join(char_of[b] for b in token)
    tokens += SPECIAL_TOKEN_NAMES

    def build(writer):
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("llama-bpe")
        writer.add_token_list(tokens)
        writer.add_eos_token_id(reference.eos_id)

    _write(tmp_path / "small.gguf", build)
    tok = load_tokenizer(tmp_path / "small.gguf", vocab_size=reference.n_words)
    assert isinstance(tok, Tokenizer)
    assert tok._model._mergeable_ranks == reference._model._mergeable_ranks
    assert tok.special_tokens == reference.special_tokens
