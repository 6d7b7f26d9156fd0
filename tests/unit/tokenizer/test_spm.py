"""Llama 1/2 SentencePiece vocabularies: herd's three readings of one model against sentencepiece and HF.

One small model trained like Llama's is read as `tokenizer.model` (SentencePieceTokenizer), as
the legacy tokenizer.json Meta's HF repos ship (normalizer Prepend("▁") + Replace, read by
HFTokenizer) and as GGUF `llama` metadata (tokens, scores, types, read by gguf_vocab). All three
must give sentencepiece's ids, which transformers' LlamaTokenizer gives too except where text
starts with whitespace (transformers 5's Metaspace pre-tokenizer folds the dummy prefix into it).
"""

from __future__ import annotations

import json
import random
import shutil

import pytest

from herd.tokenizer import HFTokenizer, SentencePieceTokenizer, StreamDecoder, Tokenizer, load_tokenizer
from herd.tokenizer.gguf_vocab import gguf_tokenizer
from herd.tokenizer.resolve import tokenizer_from_path

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Où est l'hôpital ? Straße und Größe.",
    "我们在北京吃了烤鸭。東京は日本の首都です。",
    "Emoji 😀👍🏽 🦙 and rare ☃ Ж ℵ characters",
    "def square(x):\n    return x ** 2  # 1234567890\n\tprint(square(12))",
    "trailing spaces   ",
    "<s> and </s> typed by a user",
]
LEADING = [" leading space", "  two leading", "\n newline first"]


@pytest.fixture(scope="module")
def sp(sp_model):
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=str(sp_model))


@pytest.fixture(scope="module")
def tok(sp_model):
    return SentencePieceTokenizer.from_file(sp_model)


@pytest.fixture(scope="module")
def hf_dir(sp_model, tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama2-hf")
    shutil.copy(sp_model, directory / "tokenizer.model")
    return directory


@pytest.fixture(scope="module")
def legacy_json_dir(hf_dir, tmp_path_factory):
    """The tokenizer.json layout of Meta's Llama 2 HF repos, built from transformers' conversion."""
    from tokenizers import decoders, normalizers
    from transformers import LlamaTokenizer

    backend = LlamaTokenizer.from_pretrained(hf_dir, legacy=True).backend_tokenizer
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.pre_tokenizer = None
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    directory = tmp_path_factory.mktemp("llama2-json")
    backend.save(str(directory / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


@pytest.fixture(scope="module")
def gguf_file(sp, tmp_path_factory):
    """The same vocabulary as llama.cpp's converter writes it for a Llama 2 model."""
    import gguf

    path = tmp_path_factory.mktemp("llama2-gguf") / "vocab.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    n = sp.get_piece_size()
    types = [
        gguf.TokenType.CONTROL
        if sp.is_control(i)
        else gguf.TokenType.UNKNOWN
        if sp.is_unknown(i)
        else gguf.TokenType.BYTE
        if sp.is_byte(i)
        else gguf.TokenType.NORMAL
        for i in range(n)
    ]
    # A model of one tiny layer's hyperparameters, so that llama.cpp opens it (vocab only).
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_block_count(1)
    writer.add_feed_forward_length(8)
    writer.add_head_count(1)
    writer.add_head_count_kv(1)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(n)
    writer.add_tokenizer_model("llama")
    writer.add_token_list([sp.id_to_piece(i).encode() for i in range(n)])
    writer.add_token_scores([sp.get_score(i) for i in range(n)])
    writer.add_token_types(types)
    writer.add_bos_token_id(sp.bos_id())
    writer.add_eos_token_id(sp.eos_id())
    writer.add_unk_token_id(sp.unk_id())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_meta_s_ids_and_attributes(tok, sp):
    for text in TEXTS + LEADING:
        assert tok.encode(text, bos=True, eos=True) == [sp.bos_id(), *sp.encode(text), sp.eos_id()]
    assert tok.encode_batch(TEXTS, bos=True, eos=False) == [tok.encode(t, bos=True, eos=False) for t in TEXTS]
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.stop_tokens, tok.add_bos) == (1, 2, None, (2,), True)
    assert tok.special_tokens == {"<unk>": 0, "<s>": 1, "</s>": 2}


def test_equal_to_transformers_llama_tokenizer(tok, hf_dir):
    from transformers import LlamaTokenizer

    for legacy in (True, False):
        hf = LlamaTokenizer.from_pretrained(hf_dir, legacy=legacy)
        for text in TEXTS:
            assert (
                tok.encode(text, bos=False, eos=False)
                == hf(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
            )


def test_decode_equals_sentencepiece_and_round_trips(tok, sp):
    for text in TEXTS + LEADING:
        ids = sp.encode(text)
        assert tok.decode(ids) == sp.decode(ids) == text
    assert tok.decode_strips_first_space


def test_stream_decoding_equals_decode(tok):
    rng = random.Random(1)
    for text in TEXTS:
        ids = tok.encode(text, bos=False, eos=False)
        decoder = StreamDecoder(tok)
        assert "".join(decoder.feed(i) for i in ids) + decoder.flush() == tok.decode(ids) == text
    for _ in range(20):
        ids = [rng.randrange(tok.n_words) for _ in range(rng.randrange(1, 30))]
        decoder = StreamDecoder(tok)
        assert "".join(decoder.feed(i) for i in ids) + decoder.flush() == tok.decode(ids)


def test_special_text_is_plain_unless_allowed(tok, sp):
    text = "<s>Hi</s> there"
    assert tok.encode(text, bos=False, eos=False) == sp.encode(text)
    # Allowed specials split the text and every piece gets the dummy prefix, as llama.cpp and the
    # legacy HF layout do.
    assert tok.encode(text, bos=False, eos=False, allowed_special="all") == [
        1,
        *sp.encode("Hi"),
        2,
        *sp.encode(" there"),
    ]


def test_the_legacy_tokenizer_json_gives_sentencepiece_s_ids(legacy_json_dir, sp, tok):
    hf_tok = HFTokenizer.from_pretrained(legacy_json_dir)
    assert hf_tok.add_bos and hf_tok.decode_strips_first_space and hf_tok.eos_id == 2
    for text in TEXTS + LEADING:
        ids = hf_tok.encode(text, bos=False, eos=False)
        assert ids == sp.encode(text)
        assert hf_tok.decode(ids) == text
        assert hf_tok.encode(text, bos=False, eos=False, allowed_special="all") == tok.encode(
            text, bos=False, eos=False, allowed_special="all"
        )


def test_a_gguf_llama_vocabulary_gives_sentencepiece_s_and_llama_cpp_s_ids(gguf_file, sp):
    g = gguf_tokenizer(gguf_file)
    assert isinstance(g, HFTokenizer)
    assert (g.bos_id, g.eos_id, g.add_bos) == (1, 2, True)
    for text in TEXTS + LEADING:
        ids = g.encode(text, bos=False, eos=False)
        assert ids == sp.encode(text), text
        assert g.decode(ids) == text
    llama_cpp = pytest.importorskip("llama_cpp")
    vocab = llama_cpp.Llama(str(gguf_file), vocab_only=True, verbose=False)
    for text in TEXTS + LEADING:
        assert g.encode(text, bos=False, eos=False) == vocab.tokenize(text.encode(), add_bos=False, special=False)
        # With special tokens parsed, llama.cpp puts the dummy prefix after each of them too.
        assert g.encode(text, bos=False, eos=False, allowed_special="all") == vocab.tokenize(
            text.encode(), add_bos=False, special=True
        )


def test_tokenizer_model_kind_is_detected(sp_model, hf_dir, legacy_json_dir, tmp_path):
    assert isinstance(tokenizer_from_path(sp_model), SentencePieceTokenizer)
    assert isinstance(load_tokenizer(hf_dir, vocab_size=500), SentencePieceTokenizer)
    # Meta's Llama 2 download: tokenizer.model beside consolidated.*.pth, or in original/.
    (tmp_path / "original").mkdir()
    shutil.copy(sp_model, tmp_path / "original" / "tokenizer.model")
    assert isinstance(load_tokenizer(tmp_path, vocab_size=500), SentencePieceTokenizer)
    # tokenizer.json wins over a SentencePiece tokenizer.model (it carries added tokens).
    shutil.copy(sp_model, legacy_json_dir / "tokenizer.model")
    assert isinstance(load_tokenizer(legacy_json_dir, vocab_size=500), HFTokenizer)
    # Llama 3's tiktoken file of the same name wins over tokenizer.json.
    from herd.tokenizer import llama3_tokenizer_path

    shutil.copy(llama3_tokenizer_path(), legacy_json_dir / "tokenizer.model")
    assert isinstance(tokenizer_from_path(legacy_json_dir), Tokenizer)


def test_a_broken_sentencepiece_file_is_a_clear_error(sp_model, tmp_path):
    data = sp_model.read_bytes()
    broken = tmp_path / "tokenizer.model"
    broken.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a valid SentencePiece model"):
        SentencePieceTokenizer.from_file(broken)


# Llama-2-chat's template as its HF repo declares it.
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
LLAMA2_DIALOG = [
    {"role": "system", "content": "Answer in French."},
    {"role": "user", "content": "Where is Paris?"},
    {"role": "assistant", "content": "En France, 2024."},
    {"role": "user", "content": "Et Tokyo ? 😀"},
]


def test_llama2_chat_template_ids_and_mask(legacy_json_dir, tok):
    from transformers import PreTrainedTokenizerFast

    from herd.tokenizer import ChatTemplate

    hf = PreTrainedTokenizerFast(
        tokenizer_file=str(legacy_json_dir / "tokenizer.json"), bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    theirs = hf.apply_chat_template(LLAMA2_DIALOG, chat_template=LLAMA2_TEMPLATE, tokenize=True, return_dict=False)
    for backend in (HFTokenizer.from_pretrained(legacy_json_dir), tok):
        chat = ChatTemplate(LLAMA2_TEMPLATE, backend)
        ours = chat.encode_dialog_prompt(LLAMA2_DIALOG)
        assert ours.tokens == theirs, type(backend).__name__
        trained = [t for t, m in zip(ours.tokens, ours.assistant_mask, strict=True) if m]
        assert backend.decode(trained) == "En France, 2024. </s>"
    with pytest.raises(ValueError, match="must alternate"):
        chat.encode_dialog_prompt(LLAMA2_DIALOG[1:2] * 2)
