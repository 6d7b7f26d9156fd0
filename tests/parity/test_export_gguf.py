"""GGUF tokenizer metadata read by llama.cpp (llama-cpp-python, in its own process) and by
transformers' GGUF loader: the ids herd's tokenizer gives, or those of the source the
metadata came from (an HF tokenizer.json, a GGUF file)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from herd.tokenizer import Tokenizer, llama3_tokenizer_path
from herd.tokenizer.export import (
    LLAMA31_CHAT_TEMPLATE,
    add_gguf_tokenizer_metadata,
    gguf_tokenizer_metadata,
    hf_tokenizer_json,
)
from herd.tokenizer.tokenizer import PAT_STR
from herd.tokenizer.train_bpe import save_rank_file, train_bpe

gguf = pytest.importorskip("gguf")
pytest.importorskip("llama_cpp")
tokenizers = pytest.importorskip("tokenizers")

TEXTS = [
    "Hello world", "The quick brown fox jumps over the lazy dog.",
    "  multiple   spaces\n\n\n  and\ttabs\t\t\r\n", "12345678 3.14159 1,000,000 0x1F",
    "Déjà vu, naïve café — 東京は晴れ。Привет мир! مرحبا नमस्ते", "def f(x):\n    return x**2  # comment\n",
    "I'm you'RE we've THEY'LL", "😀🎉 emoji 👩‍👩‍👧 🦙", "\n", " ", "a" * 300, "x  \n  y\n\n \n z   ",
    "<|eot_id|> stays plain text",
]

# llama.cpp in a process of its own, as its users run it (and away from torch's threads).
LLAMA_CPP = r"""
import json, sys
import llama_cpp
out = {}
for case in json.loads(sys.argv[1]):
    llm = llama_cpp.Llama(model_path=case["path"], vocab_only=True, verbose=False)
    out[case["path"]] = {
        "ids": [llm.tokenize(t.encode("utf-8"), add_bos=False, special=False) for t in case["texts"]],
        "with_bos": llm.tokenize(b"hi", add_bos=True, special=False),
        "bos": llm.token_bos(), "eos": llm.token_eos(),
        "pre": llm.metadata.get("tokenizer.ggml.pre"),
        "template": llm.metadata.get("tokenizer.chat_template"),
    }
print(json.dumps(out))
"""


def llama_cpp_read(cases: list[tuple[str, list[str]]]) -> dict[str, dict]:
    arg = json.dumps([{"path": str(p), "texts": t} for p, t in cases])
    done = subprocess.run([sys.executable, "-c", LLAMA_CPP, arg], capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def write_vocab_gguf(path, meta) -> str:
    """A GGUF with the tokenizer metadata and a tiny llama header (enough for vocab_only loads)."""
    import numpy as np

    n = len(meta["tokenizer.ggml.tokens"])
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(256)
    w.add_embedding_length(8)
    w.add_block_count(1)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(n)
    add_gguf_tokenizer_metadata(w, meta)
    w.add_tensor("token_embd.weight", np.zeros((n, 8), np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    import pydoc_data.topics

    texts = [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)][:40]
    path = tmp_path_factory.mktemp("small") / "tokenizer.model"
    save_rank_file(train_bpe(texts, vocab_size=1024), path)
    return Tokenizer.from_file(path)


@pytest.fixture(scope="module")
def llama3_gguf(tmp_path_factory):
    tok = Tokenizer.from_file(llama3_tokenizer_path())
    return tok, write_vocab_gguf(tmp_path_factory.mktemp("l3") / "llama3.gguf", gguf_tokenizer_metadata(tok))


def _json_source(root, name: str, tok: Tokenizer, pre_tokenizer: dict) -> tuple[object, str]:
    """herd's small vocabulary as a tokenizer.json behind another pre-tokenizer, and its GGUF."""
    data = json.loads(hf_tokenizer_json(tok))
    data["pre_tokenizer"] = pre_tokenizer
    data["model"]["ignore_merges"] = False  # as in GPT-2-style tokenizer.json files (and llama.cpp for them)
    d = root / name
    d.mkdir()
    (d / "tokenizer.json").write_text(json.dumps(data))
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}))
    return tokenizers.Tokenizer.from_file(str(d / "tokenizer.json")), write_vocab_gguf(d / "v.gguf", gguf_tokenizer_metadata(d))


def test_llama_cpp_reads_herds_vocabularies_and_tokenizer_json_ones(tmp_path, llama3_gguf, small, smollm2_gguf):
    llama3, llama3_path = llama3_gguf
    small_path = write_vocab_gguf(tmp_path / "small.gguf", gguf_tokenizer_metadata(small))
    # Meta's own tokenizer.json (3.2 Vision's: one more special token) through the tokenizer.json path.
    meta_dir = tmp_path / "meta"
    meta_dir.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (meta_dir / name).write_bytes((llama3_tokenizer_path().parent / name).read_bytes())
    meta_path = write_vocab_gguf(tmp_path / "meta.gguf", gguf_tokenizer_metadata(meta_dir))
    # Other llama.cpp pre types, each against HF tokenizers reading the same tokenizer.json.
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    pre_tokenizers = {
        "gpt-2": byte_level,
        "smollm": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, byte_level]},
        "qwen2": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": PAT_STR.replace(r"\p{N}{1,3}", r"\p{N}")}, "behavior": "Isolated",
             "invert": False}, {**byte_level, "use_regex": False}]},
    }
    json_sources = {pre: _json_source(tmp_path, pre, small, p) for pre, p in pre_tokenizers.items()}
    # A GGUF source's tokenizer carried into a new file (SmolLM2: pre type "smollm").
    carried = write_vocab_gguf(tmp_path / "smol.gguf", gguf_tokenizer_metadata(smollm2_gguf))

    plain = TEXTS[:-1]
    read = llama_cpp_read([(llama3_path, TEXTS), (small_path, TEXTS), (meta_path, plain), (carried, TEXTS),
                           (str(smollm2_gguf), TEXTS), *((p, plain) for _, p in json_sources.values())])

    for tok, path in ((llama3, llama3_path), (small, small_path)):
        got = read[path]
        assert got["ids"] == [tok.encode(t, bos=False, eos=False) for t in TEXTS]
        assert got["with_bos"] == tok.encode("hi", bos=True, eos=False)
        assert (got["bos"], got["eos"], got["pre"]) == (tok.bos_id, tok.eos_id, "llama-bpe")
        assert got["template"] == LLAMA31_CHAT_TEMPLATE
    assert read[meta_path]["ids"] == [llama3.encode(t, bos=False, eos=False) for t in plain]
    for pre, (hf, path) in json_sources.items():
        assert read[path]["pre"] == pre
        assert read[path]["ids"] == [hf.encode(t, add_special_tokens=False).ids for t in plain], pre
    assert read[carried]["pre"] == "smollm"
    assert {k: v for k, v in read[carried].items()} == read[str(smollm2_gguf)]


def test_transformers_gguf_loader_reads_the_metadata(small, tmp_path):
    from transformers import AutoTokenizer

    # The small vocabulary: transformers takes over a minute to convert Llama 3's 128K tokens.
    meta = gguf_tokenizer_metadata(small)
    write_vocab_gguf(tmp_path / "small.gguf", meta)
    hf = AutoTokenizer.from_pretrained(tmp_path, gguf_file="small.gguf")
    assert hf.convert_ids_to_tokens(list(range(small.n_words))) == meta["tokenizer.ggml.tokens"]
    assert hf.chat_template == LLAMA31_CHAT_TEMPLATE and hf.bos_token == "<|begin_of_text|>"
    # transformers' GGUF loader ignores tokenizer.ggml.pre and splits every byte-level BPE with
    # GPT-2's regex (transformers 5.3, integrations/ggml.py), so ids agree only where that regex
    # and Llama 3's cut the text alike: words, letters of any script, single spaces, emoji.
    for text in ("Hello world", "The quick brown fox jumps over the lazy dog.", "Déjà vu, naïve café",
                 "Привет мир", "😀🎉 emoji 🦙"):
        assert hf.encode(text, add_special_tokens=False) == small.encode(text, bos=False, eos=False), text
