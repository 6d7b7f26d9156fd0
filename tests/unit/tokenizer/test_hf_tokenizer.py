"""HFTokenizer (tokenizer.json) against transformers, and Llama 3's tokenizer.json against herd's tiktoken path."""

from __future__ import annotations

import json
import random
import shutil

import pytest

from herd.tokenizer import HFTokenizer, StreamDecoder, Tokenizer, TokenizerLike, llama3_tokenizer_path, load_tokenizer
from herd.tokenizer.resolve import tokenizer_from_path

TEXTS = [
    "The quick brown fox, 1234567890!",
    "Où est l'hôpital ? Straße. 我们在北京。東京 😀👍🏽",
    "def f(x):\n    return x  # <|im_end|> stays text\n\n\t",
    "  spaces   everywhere  ",
    "",
]


@pytest.fixture(scope="module")
def tok(chatml_dir):
    return HFTokenizer.from_pretrained(chatml_dir)


@pytest.fixture(scope="module")
def hf(chatml_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(chatml_dir)


def test_every_backend_satisfies_the_interface(tok, llama3):
    assert isinstance(tok, TokenizerLike)
    assert isinstance(llama3, TokenizerLike)
    assert llama3.add_bos is True and llama3.decode_strips_first_space is False


def test_ids_and_decode_equal_transformers(tok, hf):
    for text in TEXTS:
        ids = tok.encode(text, bos=False, eos=False)
        assert ids == hf(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        assert tok.decode(ids) == text == hf.decode(ids, clean_up_tokenization_spaces=False)
    assert tok.encode_batch(TEXTS, bos=False, eos=True) == [tok.encode(t, bos=False, eos=True) for t in TEXTS]


def test_config_sets_the_special_ids(tok, hf):
    assert tok.eos_id == hf.eos_token_id == tok.special_tokens["<|im_end|>"]
    assert tok.pad_id == hf.pad_token_id
    assert tok.bos_id is None and tok.add_bos is False
    assert tok.stop_tokens == (tok.eos_id,)
    with pytest.raises(ValueError, match="no BOS"):
        tok.encode("x", bos=True, eos=False)


def test_special_tokens_plain_allowed_and_disallowed(tok, hf):
    text = "a<|im_start|>b<|im_end|>c"
    im_start, im_end = tok.special_tokens["<|im_start|>"], tok.special_tokens["<|im_end|>"]
    assert im_start not in tok.encode(text, bos=False, eos=False)
    everything = tok.encode(text, bos=False, eos=False, allowed_special="all")
    assert everything == hf(text, add_special_tokens=False)["input_ids"]
    only_end = tok.encode(text, bos=False, eos=False, allowed_special={"<|im_end|>"})
    assert im_end in only_end and im_start not in only_end
    assert only_end == tok.encode("a<|im_start|>b", bos=False, eos=False) + [im_end] + tok.encode(
        "c", bos=False, eos=False
    )
    with pytest.raises(ValueError, match="disallowed_special"):
        tok.encode(text, bos=False, eos=False, allowed_special={"<|im_end|>"}, disallowed_special="all")
    with pytest.raises(ValueError, match="unknown special tokens"):
        tok.encode(text, bos=False, eos=False, allowed_special={"<|eot_id|>"})


def test_stream_decoding_equals_decode_on_random_ids(tok):
    rng = random.Random(0)
    for _ in range(20):
        ids = [rng.randrange(tok.n_words) for _ in range(rng.randrange(1, 40))]
        decoder = StreamDecoder(tok)
        assert "".join(decoder.feed(i) for i in ids) + decoder.flush() == tok.decode(ids)


def test_bad_ids_are_a_clear_error(tok):
    with pytest.raises(ValueError, match="outside this vocabulary"):
        tok.decode([0, tok.n_words])
    with pytest.raises(ValueError, match="outside this vocabulary"):
        tok.decode_single_token_bytes(-1)


def test_generation_config_eos_ids_become_stop_tokens(chatml_dir, tmp_path):
    directory = tmp_path / "ckpt"
    shutil.copytree(chatml_dir, directory)
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 2]}))
    (directory / "config.json").write_text(json.dumps({"eos_token_id": 1, "vocab_size": 640}))
    tok = load_tokenizer(directory, vocab_size=640)  # a padded embedding is fine
    assert tok.stop_tokens == (2, 0, 1)


def test_bad_tokenizer_json_is_a_clear_error(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE", "vocab": ')
    with pytest.raises(ValueError, match="not a valid tokenizer.json"):
        load_tokenizer(tmp_path, vocab_size=10)
    with pytest.raises(FileNotFoundError):
        HFTokenizer.from_pretrained(tmp_path / "missing")


def test_bad_config_is_a_clear_error(chatml_dir, tmp_path):
    directory = tmp_path / "ckpt"
    shutil.copytree(chatml_dir, directory)
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|not_there|>"}))
    with pytest.raises(ValueError, match="not in tokenizer.json's vocabulary"):
        HFTokenizer.from_pretrained(directory)
    (directory / "tokenizer_config.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        HFTokenizer.from_pretrained(directory)


def test_a_tokenizer_larger_than_the_model_is_refused(chatml_dir):
    with pytest.raises(ValueError, match="model's vocabulary is 100"):
        load_tokenizer(chatml_dir, vocab_size=100)


@pytest.fixture(scope="module")
def llama3_from_json():
    return tokenizer_from_path(llama3_tokenizer_path().parent / "tokenizer.json")


def test_llama3_tokenizer_json_is_herd_s_exact_tiktoken_tokenizer(llama3_from_json, llama3):
    assert isinstance(llama3_from_json, Tokenizer)
    assert llama3_from_json.n_words == llama3.n_words == 128256
    assert llama3_from_json.special_tokens == llama3.special_tokens
    # Same ranks, so the same merges everywhere: compare the whole rank table, not samples.
    assert llama3_from_json._model._mergeable_ranks == llama3._model._mergeable_ranks
    text = "Hello world! 2024 東京 😀 <|eot_id|> " + "x" * 30_000
    assert llama3_from_json.encode(text, bos=True, eos=True) == llama3.encode(text, bos=True, eos=True)
    assert llama3_from_json.stop_tokens == llama3.stop_tokens
