"""herd's tokenizer as HF and GGUF files: the same ids as herd's tiktoken encoder (checked with HF
`tokenizers`, Meta's own tokenizer.json and the gguf package), the files each layout needs, every
stop id declared, and clear refusals."""

import json
import random

import pytest

from herd.tokenizer import Tokenizer, llama3_tokenizer_path
from herd.tokenizer.export import (
    HF_TOKENIZER_FILES,
    LLAMA31_CHAT_TEMPLATE,
    add_gguf_tokenizer_metadata,
    byte_level_text,
    generation_config,
    generation_config_of,
    gguf_tokenizer_metadata,
    hf_tokenizer_json,
    tokenizer_files,
)
from herd.tokenizer.tokenizer import PAT_STR, SPECIAL_TOKEN_NAMES
from herd.tokenizer.train_bpe import save_rank_file, train_bpe

tokenizers = pytest.importorskip("tokenizers")

# Varied text: scripts, code, whitespace runs, digit groups, contractions, emoji, control bytes.
TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "  multiple   spaces\n\n\n  and\ttabs\t\t\r\n",
    "12345678 3.14159 1,000,000 0x1F 2024-01-01",
    "Déjà vu, naïve café — 東京は晴れ。Привет мир! مرحبا بالعالم नमस्ते",
    "def f(x):\n    return x**2  # comment\n\n\nclass A:\n\tpass\n",
    "I'm you'RE we've THEY'LL she'd it's",
    "😀🎉 emoji 👩‍👩‍👧 🦙",
    "\n", " ", "", "a" * 300, "\x00\x01\x7f\u200b",
    "x  \n  y\n\n \n z   ",
]


def _random_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    alphabet = "ab cd\n\t.,!?0123456789éü東京🦙'-_()[]{}"
    return ["".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 80))) for _ in range(n)]


@pytest.fixture(scope="module")
def llama3_json(llama3):
    return hf_tokenizer_json(llama3)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A 1,024-rank vocabulary trained by herd on Python's own documentation."""
    import pydoc_data.topics

    texts = [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)][:40]
    path = tmp_path_factory.mktemp("small") / "tokenizer.model"
    save_rank_file(train_bpe(texts, vocab_size=1024), path)
    return path


def _ids(hf, text):
    return hf.encode(text, add_special_tokens=False).ids


def test_llama3_tokenizer_json_encodes_as_tiktoken_and_as_metas_own(llama3, llama3_json):
    ours = tokenizers.Tokenizer.from_str(llama3_json)
    official = tokenizers.Tokenizer.from_file(str(llama3_tokenizer_path().parent / "tokenizer.json"))
    for text in TEXTS + _random_texts(100):
        expected = llama3.encode(text, bos=False, eos=False)
        assert _ids(ours, text) == expected, text
        assert _ids(official, text) == expected, text
    # The post-processor prepends <|begin_of_text|>, as Meta's HF tokenizer does.
    assert ours.encode("hi").ids == official.encode("hi").ids == [128000, 6151]
    # HF reads special-token text in input as the token (herd does not, by design).
    assert _ids(ours, "<|eot_id|>") == [128009] != llama3.encode("<|eot_id|>", bos=False, eos=False)


def test_llama3_vocabulary_and_merges_equal_metas_tokenizer_json(llama3_json):
    ours = json.loads(llama3_json)
    official = json.loads((llama3_tokenizer_path().parent / "tokenizer.json").read_text())
    assert ours["model"]["vocab"] == official["model"]["vocab"]
    # Same merges in the same order as transformers' TikTokenConverter made for Meta (280,147).
    assert [" ".join(m) for m in ours["model"]["merges"]] == official["model"]["merges"]
    assert ours["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] == PAT_STR
    assert ours["pre_tokenizer"] == official["pre_tokenizer"]
    added = {a["id"]: a for a in ours["added_tokens"]}
    assert [added[i]["content"] for i in range(128000, 128256)] == list(SPECIAL_TOKEN_NAMES)
    assert all(a["special"] and not a["normalized"] for a in added.values())


def test_small_trained_vocabulary_encodes_and_decodes_as_tiktoken(small):
    tok = Tokenizer.from_file(small)
    hf = tokenizers.Tokenizer.from_str(hf_tokenizer_json(tok))
    assert hf.get_vocab_size() == tok.n_words == 1024 + 256
    assert hf.token_to_id("<|eot_id|>") == tok.eot_id == 1024 + 9
    for text in TEXTS + _random_texts(200, seed=1):
        ids = tok.encode(text, bos=False, eos=False)
        assert _ids(hf, text) == ids, text
        assert hf.decode(ids) == text
    assert hf.encode("x").ids == [tok.bos_id, *tok.encode("x", bos=False, eos=False)]


def test_byte_level_text_is_gpt2s_table():
    from tokenizers import pre_tokenizers

    assert byte_level_text(b" \n") == "ĠĊ" and byte_level_text(b"A") == "A"
    # Every byte, through HF's own ByteLevel pre-tokenizer.
    text = bytes(range(256)).decode("latin-1")
    [(piece, _)] = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False).pre_tokenize_str(text)
    assert byte_level_text(text.encode("utf-8")) == piece


def test_tokenizer_files_for_hf_and_meta_layouts(small):
    hf = tokenizer_files(small, layout="hf", model_max_length=2048)
    assert set(hf) == {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "original/tokenizer.model"}
    assert hf["original/tokenizer.model"] == small.read_bytes()  # never at the root of an HF directory
    config = json.loads(hf["tokenizer_config.json"])
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and config["model_max_length"] == 2048
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == (
        "<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>")
    assert config["chat_template"] == LLAMA31_CHAT_TEMPLATE and config["clean_up_tokenization_spaces"] is False
    assert json.loads(hf["special_tokens_map.json"])["eos_token"] == "<|end_of_text|>"
    assert tokenizer_files(small, layout="meta") == {"tokenizer.model": small.read_bytes()}
    # A directory holding the rank file (root or original/) is the same source.
    assert tokenizer_files(small.parent, layout="hf", model_max_length=2048) == hf


def test_tokenizer_files_copy_a_directorys_hf_files_as_they_are(tmp_path, small):
    src = tmp_path / "src"
    (src / "original").mkdir(parents=True)
    for name in HF_TOKENIZER_FILES:
        (src / name).write_text(f"{name} as shipped")
    (src / "original" / "tokenizer.model").write_bytes(small.read_bytes())
    files = tokenizer_files(src, layout="hf")
    assert {n: files[n].decode() for n in HF_TOKENIZER_FILES} == {n: f"{n} as shipped" for n in HF_TOKENIZER_FILES}
    assert files["original/tokenizer.model"] == small.read_bytes() and "tokenizer.model" not in files
    # Meta's layout wants the tiktoken file at the root.
    assert tokenizer_files(src, layout="meta")["tokenizer.model"] == small.read_bytes()


def test_sentencepiece_model_stays_at_the_root(tmp_path):
    # A SentencePiece model (Llama 1/2) is a binary protobuf, not `<base64> <rank>` lines.
    sp = b"\n\x0e\n\x05<unk>\x15\x00\x00\x00\x00\x18\x02" + bytes(range(40))
    (tmp_path / "tokenizer.model").write_bytes(sp)
    (tmp_path / "tokenizer_config.json").write_text('{"tokenizer_class": "LlamaTokenizer"}')
    for layout in ("hf", "meta"):
        files = tokenizer_files(tmp_path, layout=layout)
        assert files["tokenizer.model"] == sp and "original/tokenizer.model" not in files
        assert files["tokenizer_config.json"] == b'{"tokenizer_class": "LlamaTokenizer"}'


def test_tokenizer_files_refuse_clearly(tmp_path, small):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tokenizer_files(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no tokenizer found"):
        tokenizer_files(tmp_path)
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    with pytest.raises(ValueError, match="gguf_tokenizer_metadata"):
        tokenizer_files(tmp_path / "m.gguf")
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match="pass the directory"):
        tokenizer_files(tmp_path / "tokenizer.json")
    with pytest.raises(ValueError, match="layout must be"):
        tokenizer_files(small, layout="gguf")
    with pytest.raises(ValueError, match="model_max_length"):
        tokenizer_files(small, model_max_length=0)


def test_generation_config_declares_every_stop_id(llama3, small, tmp_path):
    assert generation_config([128001, 128008, 128009], 128000) == {
        "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009]}
    assert generation_config([2, 2], 1, pad_id=2) == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    with pytest.raises(ValueError, match="at least one stop token"):
        generation_config([], 1)
    # The real vocabulary: <|end_of_text|>, <|eom_id|>, <|eot_id|>.
    assert generation_config_of(llama3_tokenizer_path()) == {
        "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009]}
    assert generation_config_of(small)["eos_token_id"] == [1024 + 1, 1024 + 8, 1024 + 9]
    # A checkpoint's own generation config is kept (sampling defaults too) and its stop ids extended.
    (tmp_path / "original").mkdir()
    (tmp_path / "original" / "tokenizer.model").write_bytes(llama3_tokenizer_path().read_bytes())
    (tmp_path / "config.json").write_text('{"bos_token_id": 128000, "eos_token_id": 128001}')
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": 128001, "temperature": 0.6}')
    assert generation_config_of(tmp_path) == {
        "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "temperature": 0.6}
    # Not a tiktoken vocabulary: the checkpoint's ids as declared, or nothing.
    other = tmp_path / "other"
    other.mkdir()
    (other / "tokenizer.json").write_text("{}")
    assert generation_config_of(other) is None
    (other / "config.json").write_text('{"bos_token_id": 1, "eos_token_id": 2, "hidden_size": 8}')
    assert generation_config_of(other) == {"bos_token_id": 1, "eos_token_id": 2}


# ---- GGUF metadata ---------------------------------------------------------------------------


def test_gguf_metadata_of_a_tiktoken_vocabulary(llama3, llama3_json):
    meta = gguf_tokenizer_metadata(llama3)
    hf = json.loads(llama3_json)
    tokens = meta["tokenizer.ggml.tokens"]
    assert len(tokens) == len(meta["tokenizer.ggml.token_type"]) == 128256
    assert {t: i for i, t in enumerate(tokens[:128000])} == hf["model"]["vocab"]
    assert tokens[128000:] == list(SPECIAL_TOKEN_NAMES)
    assert set(meta["tokenizer.ggml.token_type"][:128000]) == {1} and set(meta["tokenizer.ggml.token_type"][128000:]) == {3}
    assert meta["tokenizer.ggml.merges"] == [" ".join(m) for m in hf["model"]["merges"]]
    assert (meta["tokenizer.ggml.model"], meta["tokenizer.ggml.pre"]) == ("gpt2", "llama-bpe")
    ids = {k.removeprefix("tokenizer.ggml.").removesuffix("_token_id"): v for k, v in meta.items() if k.endswith("_id")}
    assert ids == {"bos": 128000, "eos": 128001, "eot": 128009, "eom": 128008, "padding": 128004}
    assert meta["tokenizer.ggml.add_bos_token"] is True and meta["tokenizer.chat_template"] == LLAMA31_CHAT_TEMPLATE


def test_gguf_metadata_pads_to_the_models_vocabulary(small):
    meta = gguf_tokenizer_metadata(small, vocab_size=1300)
    assert len(meta["tokenizer.ggml.tokens"]) == len(meta["tokenizer.ggml.token_type"]) == 1300
    assert meta["tokenizer.ggml.tokens"][-1] == "[PAD1299]" and meta["tokenizer.ggml.token_type"][-1] == 5
    with pytest.raises(ValueError, match="embedding rows"):
        gguf_tokenizer_metadata(small, vocab_size=1000)


def _json_dir(tmp_path, name, small, pre_tokenizer, **config):
    """A tokenizer.json directory: herd's small vocabulary behind another pre-tokenizer."""
    data = json.loads(hf_tokenizer_json(Tokenizer.from_file(small)))
    data["pre_tokenizer"] = pre_tokenizer
    d = tmp_path / name
    d.mkdir()
    (d / "tokenizer.json").write_text(json.dumps(data))
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    return d


def test_gguf_pre_type_is_recognised_from_tokenizer_json(tmp_path, small):
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    split = {"type": "Split", "pattern": {"Regex": PAT_STR}, "behavior": "Isolated", "invert": False}
    cases = {
        "llama-bpe": {"type": "Sequence", "pretokenizers": [split, {**byte_level, "use_regex": False}]},
        "qwen2": {"type": "Sequence", "pretokenizers": [
            {**split, "pattern": {"Regex": PAT_STR.replace(r"\p{N}{1,3}", r"\p{N}")}}, {**byte_level, "use_regex": False}]},
        "gpt-2": byte_level,
        "smollm": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, byte_level]},
    }
    for pre, pre_tokenizer in cases.items():
        d = _json_dir(tmp_path, pre, small, pre_tokenizer, bos_token="<|begin_of_text|>",
                      eos_token={"content": "<|eot_id|>"}, chat_template="{{ 'x' }}")
        meta = gguf_tokenizer_metadata(d)
        assert meta["tokenizer.ggml.pre"] == pre
        assert meta["tokenizer.ggml.bos_token_id"] == 1024 and meta["tokenizer.ggml.eos_token_id"] == 1024 + 9
        assert meta["tokenizer.ggml.add_bos_token"] is True  # from the post-processor
        assert meta["tokenizer.chat_template"] == "{{ 'x' }}"
    d = _json_dir(tmp_path, "starcoder", small, cases["smollm"], clean_up_tokenization_spaces=True,
                  add_bos_token=False)
    meta = gguf_tokenizer_metadata(d)
    assert meta["tokenizer.ggml.pre"] == "starcoder" and meta["tokenizer.ggml.add_bos_token"] is False
    unknown = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": False}, byte_level]}
    with pytest.raises(ValueError, match="convert_hf_to_gguf"):
        gguf_tokenizer_metadata(_json_dir(tmp_path, "unknown", small, unknown))


def test_gguf_metadata_of_metas_tokenizer_json_equals_the_tiktoken_one(tmp_path, llama3):
    d = tmp_path / "meta-hf"
    d.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (d / name).write_bytes((llama3_tokenizer_path().parent / name).read_bytes())
    # This copy is the 3.2 Vision tokenizer: <|image|> is a 257th special token, id 128256.
    from_json = gguf_tokenizer_metadata(d)
    ours = gguf_tokenizer_metadata(llama3)
    assert from_json["tokenizer.ggml.pre"] == "llama-bpe"
    assert from_json["tokenizer.ggml.tokens"][:128000] == ours["tokenizer.ggml.tokens"][:128000]
    assert from_json["tokenizer.ggml.tokens"][128256] == "<|image|>"
    assert from_json["tokenizer.ggml.merges"] == ours["tokenizer.ggml.merges"]
    assert from_json["tokenizer.ggml.token_type"] == ours["tokenizer.ggml.token_type"] + [3]
    assert from_json["tokenizer.ggml.bos_token_id"] == 128000 and from_json["tokenizer.ggml.add_bos_token"] is True


def test_gguf_metadata_carries_a_gguf_sources_tokenizer_over(smollm2_gguf):
    meta = gguf_tokenizer_metadata(smollm2_gguf)
    assert meta["tokenizer.ggml.pre"] == "smollm" and meta["tokenizer.ggml.model"] == "gpt2"
    assert len(meta["tokenizer.ggml.tokens"]) == len(meta["tokenizer.ggml.token_type"]) == 49152
    assert meta["tokenizer.ggml.merges"][:2] == ["Ġ t", "Ġ a"]
    assert meta["tokenizer.ggml.eos_token_id"] == 2 and meta["tokenizer.ggml.add_bos_token"] is False
    assert "<|im_start|>" in meta["tokenizer.chat_template"]


def test_gguf_metadata_is_written_with_the_types_llama_cpp_reads(small, tmp_path):
    gguf = pytest.importorskip("gguf")
    meta = gguf_tokenizer_metadata(small)
    path = tmp_path / "vocab.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    add_gguf_tokenizer_metadata(writer, meta)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    again = gguf.GGUFReader(str(path))
    # The types of llama.cpp's own conversions (e.g. the SmolLM2 file): ids are unsigned.
    T = gguf.GGUFValueType
    expected_types = {
        "tokenizer.ggml.tokens": [T.ARRAY, T.STRING], "tokenizer.ggml.merges": [T.ARRAY, T.STRING],
        "tokenizer.ggml.token_type": [T.ARRAY, T.INT32], "tokenizer.ggml.bos_token_id": [T.UINT32],
        "tokenizer.ggml.eos_token_id": [T.UINT32], "tokenizer.ggml.eot_token_id": [T.UINT32],
        "tokenizer.ggml.add_bos_token": [T.BOOL], "tokenizer.ggml.model": [T.STRING],
        "tokenizer.ggml.pre": [T.STRING], "tokenizer.chat_template": [T.STRING],
    }
    for key, types in expected_types.items():
        assert again.fields[key].types == types, key
    assert {k: f.contents() for k, f in again.fields.items() if k.startswith("tokenizer.")} == meta
    with pytest.raises(ValueError, match="cannot write"):
        add_gguf_tokenizer_metadata(writer, {"tokenizer.x": 1.5})
