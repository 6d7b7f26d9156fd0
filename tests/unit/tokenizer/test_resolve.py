"""Choosing a checkpoint's tokenizer and chat format from its files."""

from __future__ import annotations

import json
import shutil

import pytest

from herd.generate.session import resolve_tokenizer
from herd.tokenizer import (
    ChatFormat,
    ChatTemplate,
    HFTokenizer,
    Tokenizer,
    chat_format_for,
    llama3_tokenizer_path,
    load_tokenizer,
    read_chat_template,
)

# Meta-Llama-3-8B-Instruct's template (3.0) and the start of 3.1's, which has the date block.
LLAMA30_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
LLAMA31_TEMPLATE = LLAMA30_TEMPLATE.replace(
    "{% set loop_messages", "{{ 'Cutting Knowledge Date: December 2023' }}{% set loop_messages"
)


@pytest.fixture
def llama3_dir(tmp_path):
    shutil.copy(llama3_tokenizer_path(), tmp_path / "tokenizer.model")
    return tmp_path


def test_llama3_gets_chat_format_31_unless_its_template_is_meta_s_30(llama3_dir):
    tok = load_tokenizer(llama3_dir, vocab_size=128256)
    assert isinstance(tok, Tokenizer)
    chat = chat_format_for(llama3_dir, tok)
    assert isinstance(chat, ChatFormat) and chat.version == "3.1"
    (llama3_dir / "tokenizer_config.json").write_text(json.dumps({"chat_template": LLAMA30_TEMPLATE}))
    assert chat_format_for(llama3_dir, tok).version == "3.0"
    (llama3_dir / "tokenizer_config.json").write_text(json.dumps({"chat_template": LLAMA31_TEMPLATE}))
    assert chat_format_for(llama3_dir, tok).version == "3.1"


def test_chat_format_30_equals_hf_rendering_meta_s_30_template(llama3):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(llama3_tokenizer_path().parent)
    messages = [
        {"role": "system", "content": " Be brief. "},
        {"role": "user", "content": "Hi 😀"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Paris?"},
    ]
    from herd.tokenizer import Message

    ours = ChatFormat(llama3, version="3.0").encode_dialog_prompt([Message(**m) for m in messages]).tokens
    theirs = hf.apply_chat_template(
        messages, chat_template=LLAMA30_TEMPLATE, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert ours == theirs


def test_llama3_declared_stop_ids_are_kept(llama3_dir):
    (llama3_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [128001, 128009, 128004]}))
    tok = load_tokenizer(llama3_dir, vocab_size=128256)
    assert tok.stop_tokens == (128001, 128008, 128009, 128004)


def test_the_bundled_llama3_tokenizer_only_for_llama3_sized_models(tmp_path):
    assert isinstance(load_tokenizer(tmp_path, vocab_size=128256), Tokenizer)
    with pytest.raises(FileNotFoundError, match="--tokenizer"):
        load_tokenizer(tmp_path, vocab_size=32000)


def test_vocab_size_mismatch_is_refused(llama3_dir):
    with pytest.raises(ValueError, match="128256 tokens but the model's vocabulary is 128000"):
        load_tokenizer(llama3_dir, vocab_size=128000)
    # tiktoken vocabularies must match exactly, as before.
    with pytest.raises(ValueError, match="model's vocabulary is 128512"):
        load_tokenizer(llama3_dir, vocab_size=128512)


def test_paths_that_are_not_checkpoints(tmp_path, llama3_dir):
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "missing", vocab_size=10)
    with pytest.raises(ValueError, match="is a file"):
        load_tokenizer(llama3_dir / "tokenizer.model", vocab_size=128256)
    # An explicit tokenizer file of either kind is fine.
    assert isinstance(load_tokenizer(tmp_path, llama3_dir / "tokenizer.model", vocab_size=128256), Tokenizer)
    assert isinstance(resolve_tokenizer(tmp_path, llama3_dir / "tokenizer.model", vocab_size=128256), Tokenizer)


def test_templates_are_read_where_transformers_writes_them(chatml_dir, tmp_path, chatml):
    directory = tmp_path / "ckpt"
    shutil.copytree(chatml_dir, directory)
    tok = load_tokenizer(directory, vocab_size=600)
    assert isinstance(tok, HFTokenizer)
    assert read_chat_template(directory) == chatml  # tokenizer_config.json
    (directory / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    assert read_chat_template(directory) == "{{ messages[0]['content'] }}"  # transformers 5's file wins
    chat = chat_format_for(directory, tok)
    assert isinstance(chat, ChatTemplate) and chat.render([{"role": "user", "content": "hi"}]) == "hi"
    assert chat.variables["eos_token"] == "<|im_end|>" and chat.variables["pad_token"] == "<|endoftext|>"


def test_no_template_and_no_llama3_vocabulary_is_a_clear_error(chatml_dir, tmp_path):
    directory = tmp_path / "ckpt"
    shutil.copytree(chatml_dir, directory)
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    tok = load_tokenizer(directory, vocab_size=600)
    assert read_chat_template(directory) is None
    with pytest.raises(ValueError, match="declares no chat template"):
        chat_format_for(directory, tok)
