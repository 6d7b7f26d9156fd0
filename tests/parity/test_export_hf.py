"""Exports read by transformers as their users would: AutoTokenizer, apply_chat_template, generate.

The reference for tokens is herd's own tokenizer and ChatFormat (Meta's reference behaviour);
transformers must reach the same ids from the exported files alone. A herd-trained vocabulary
checks that nothing depends on Llama 3's ids; the real vocabulary checks the released layout
and the stop ids a 3.1 chat model needs.
"""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from herd.generate.session import resolve_tokenizer
from herd.model import ModelArgs, build_model, load_model
from herd.posttrain.io import save_checkpoint
from herd.quant import QuantConfig, quantize, save_quantized
from herd.tokenizer import ChatFormat, Message, Tokenizer, ToolCall, llama3_tokenizer_path
from herd.tokenizer.export import tokenizer_files
from herd.tokenizer.train_bpe import save_rank_file, train_bpe
from herd.train.export import save_inference_model

TEXTS = [
    "Hello world", "  multiple   spaces\n\n\n  and\ttabs", "12345678 3.14159", "I'm you'RE THEY'LL",
    "Déjà vu — 東京は晴れ。Привет мир! مرحبا", "def f(x):\n    return x**2\n", "🦙 emoji 👩‍👩‍👧",
]

DIALOGS = [
    [Message("system", "You are a helpful assistant."), Message("user", "Who are you?")],
    [Message("user", "What's 2+2?"), Message("assistant", "4"), Message("user", "And 3+3? Be brief.")],
    [Message("user", "Weather in Paris?"),
     Message("assistant", "", tool_calls=[ToolCall("get_weather", {"city": "Paris", "days": [1, 2], "metric": True})]),
     Message("tool", '{"temperature": 21}'), Message("assistant", "It is 21 degrees.")],
    [Message("system", "Environment: ipython\nTools: brave_search\n"), Message("user", "Find llamas"),
     Message("assistant", "", tool_calls=[ToolCall("brave_search", {"query": "llama facts"})],
             stop_reason="end_of_message"),
     Message("ipython", "Llamas are camelids.")],
    [Message("user", "Run it"),
     Message("assistant", "", tool_calls=[ToolCall("code_interpreter", {"code": "print(1 + 1)\n"})],
             stop_reason="end_of_message")],
    # RAG context after a content that ends in a letter (see LLAMA31_CHAT_TEMPLATE for the joins).
    [Message("user", "Summarise the document", context="Llamas live in the Andes.\nThey hum.")],
    [Message("user", "  leading spaces and trailing  "), Message("assistant", "  ok  ")],
]


def hf_message(m: Message) -> dict:
    """A herd Message as the OpenAI/HF message dict the template reads."""
    out: dict = {"role": m.role, "content": m.content}
    if m.tool_calls:
        out["tool_calls"] = [{"type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                             for c in m.tool_calls]
    if m.stop_reason != "end_of_turn":
        out["stop_reason"] = m.stop_reason
    if m.context is not None:
        out["context"] = m.context
    return out


def chat_ids(hf_tok, dialog, *, add_generation_prompt):
    out = hf_tok.apply_chat_template([hf_message(m) for m in dialog], add_generation_prompt=add_generation_prompt,
                                     tokenize=True)
    return list(out["input_ids"] if not isinstance(out, list) else out)


def tiny(vocab_size: int, *, tie: bool = True, seed: int = 0):
    args = ModelArgs(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=vocab_size, multiple_of=16,
                     max_seq_len=256, tie_embeddings=tie)
    return build_model(args, seed=seed).eval()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 1,536-rank vocabulary trained by herd, and an HF export of a tiny model that uses it."""
    import pydoc_data.topics

    root = tmp_path_factory.mktemp("trained")
    texts = [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)][:50]
    save_rank_file(train_bpe(texts, vocab_size=1536), root / "tokenizer.model")
    tok = Tokenizer.from_file(root / "tokenizer.model")
    out = save_inference_model(tiny(tok.n_words), root / "hf", format="hf", tokenizer=root / "tokenizer.model")
    return tok, root / "tokenizer.model", out


@pytest.fixture(scope="module")
def llama3_export(tmp_path_factory):
    """A tiny chat model with the real vocabulary, exported to HF; greedy decoding of PROMPT
    gives " Hi" then <|eot_id|> (see `_stop_after_one_token`)."""
    tok = Tokenizer.from_file(llama3_tokenizer_path())
    model = tiny(128256, tie=False)
    _stop_after_one_token(model, *_chat_tokens(tok))
    out = save_inference_model(model, tmp_path_factory.mktemp("llama3") / "hf", format="hf",
                               tokenizer=llama3_tokenizer_path())
    return tok, out, AutoTokenizer.from_pretrained(out)


def test_autotokenizer_loads_a_herd_trained_export(trained):
    tok, _, out = trained
    hf = AutoTokenizer.from_pretrained(out)
    assert isinstance(hf, PreTrainedTokenizerFast) and len(hf) == tok.n_words == 1536 + 256
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    for text in TEXTS:
        ids = tok.encode(text, bos=False, eos=False)
        assert hf.encode(text, add_special_tokens=False) == ids
        assert hf.encode(text) == [tok.bos_id, *ids]
        assert hf.decode(ids) == text  # no space clean-up: decoding is exact, as tiktoken's


def test_chat_template_gives_herds_chatformat_ids(trained, llama3_export):
    for tok, hf in ((trained[0], AutoTokenizer.from_pretrained(trained[2])), llama3_export[::2]):
        fmt = ChatFormat(tok, version="3.1")
        for dialog in DIALOGS:
            for gen in (True, False):
                expected = fmt.encode_dialog_prompt(dialog, add_generation_prompt=gen).tokens
                assert chat_ids(hf, dialog, add_generation_prompt=gen) == expected, (dialog, gen)


def test_chat_template_refuses_what_herds_format_cannot_write(llama3_export):
    hf = llama3_export[2]
    call = {"type": "function", "function": {"name": "f", "arguments": {}}}
    with pytest.raises(Exception, match="one tool call per message"):
        hf.apply_chat_template([{"role": "assistant", "content": "", "tool_calls": [call, call]}], tokenize=False)
    with pytest.raises(Exception, match="system message"):
        hf.apply_chat_template([{"role": "user", "content": "x"}], tools=[{"type": "function", "function": {
            "name": "f", "description": "d", "parameters": {"type": "object", "properties": {}}}}], tokenize=False)


def test_hf_export_layout_and_herds_loader(trained, tmp_path):
    tok, rank_file, out = trained
    assert not (out / "tokenizer.model").exists()  # a root tokenizer.model reads as SentencePiece elsewhere
    assert (out / "original" / "tokenizer.model").read_bytes() == rank_file.read_bytes()
    found = resolve_tokenizer(out, None, vocab_size=tok.n_words)
    assert found.encode("hello", bos=True, eos=False) == tok.encode("hello", bos=True, eos=False)
    stops = [tok.eos_id, tok.eom_id, tok.eot_id]
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == stops
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == stops and gen["bos_token_id"] == tok.bos_id
    # The Meta layout keeps Meta's file where Meta's releases have it.
    meta = save_inference_model(load_model(out), tmp_path / "meta", format="meta", tokenizer=rank_file)
    assert (meta / "tokenizer.model").read_bytes() == rank_file.read_bytes()
    assert not (meta / "tokenizer.json").exists()


def test_posttrain_and_quantized_outputs_carry_the_tokenizer(trained, tmp_path):
    tok, rank_file, out = trained
    model = load_model(out)
    sft = save_checkpoint(model, tmp_path / "sft", tokenizer=rank_file)
    assert {p.relative_to(sft).as_posix() for p in sft.rglob("*") if p.is_file()} >= {
        "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "original/tokenizer.model",
        "generation_config.json"}
    assert AutoTokenizer.from_pretrained(sft).encode("x y") == [tok.bos_id, *tok.encode("x y", bos=False, eos=False)]
    # A source directory is a tokenizer source too: its files are copied as they are.
    again = save_checkpoint(model, tmp_path / "again", tokenizer=out)
    for name in ("tokenizer.json", "tokenizer_config.json", "original/tokenizer.model"):
        assert (again / name).read_bytes() == (out / name).read_bytes()
    quantize(model, QuantConfig("int8"))
    q = save_quantized(model, tmp_path / "q", copy_from=out)
    for name in ("tokenizer.json", "original/tokenizer.model", "generation_config.json"):
        assert (q / name).read_bytes() == (out / name).read_bytes()
    assert resolve_tokenizer(q, None, vocab_size=tok.n_words).n_words == tok.n_words


def test_convert_writes_the_tokenizer_files_it_is_given(trained, tmp_path):
    from herd.model import convert

    tok, rank_file, out = trained
    meta = convert(out, tmp_path / "meta", to="meta", extra_files=tokenizer_files(out, layout="meta"))
    assert (meta / "tokenizer.model").read_bytes() == rank_file.read_bytes()
    # Without extra_files an HF source's tokenizer files and stop ids carry over as they are.
    hf = convert(out, tmp_path / "hf", to="hf")
    for name in ("tokenizer.json", "tokenizer_config.json", "original/tokenizer.model"):
        assert (hf / name).read_bytes() == (out / name).read_bytes()
    assert json.loads((hf / "config.json").read_text())["eos_token_id"] == [tok.eos_id, tok.eom_id, tok.eot_id]


def _stop_after_one_token(model, prompt_last: int, first: int, eot: int, after: int) -> None:
    """Make greedy decoding go prompt_last -> first -> eot -> after (-> token 0 ...).

    Attention and MLP write nothing (wo = w2 = 0), so the last hidden state is the current
    token's embedding. Those four tokens get orthogonal one-hot embeddings and the output head
    maps each to its successor.
    """
    with torch.no_grad():
        for layer in model.layers.values():
            layer.attention.wo.weight.zero_()
            layer.feed_forward.w2.weight.zero_()
        model.tok_embeddings.weight.mul_(0.01)
        model.output.weight.zero_()
        for axis, (token, successor) in enumerate(((prompt_last, first), (first, eot), (eot, after))):
            model.tok_embeddings.weight[token].zero_()
            model.tok_embeddings.weight[token, axis] = 1.0
            model.output.weight[successor, axis] = 10.0


def _chat_tokens(tok: Tokenizer) -> tuple[int, int, int, int]:
    prompt = ChatFormat(tok, version="3.1").encode_dialog_prompt([Message("user", "Say one word.")]).tokens
    first, after = tok.encode(" Hi", bos=False, eos=False)[0], tok.encode("!", bos=False, eos=False)[0]
    return prompt[-1], first, tok.eot_id, after  # the prompt ends with "\n\n"


def test_transformers_generation_stops_at_eot(llama3_export):
    tok, out, _ = llama3_export
    prompt = ChatFormat(tok, version="3.1").encode_dialog_prompt([Message("user", "Say one word.")]).tokens
    _, first, eot, after = _chat_tokens(tok)
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert hf.generation_config.eos_token_id == [128001, 128008, 128009]
    ids = torch.tensor([prompt])
    generated = hf.generate(ids, max_new_tokens=10, do_sample=False)[0, len(prompt):].tolist()
    assert generated == [first, eot]
    # What an export that declared only <|end_of_text|> (herd's before) would do: run on past it.
    runaway = hf.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=128001)[0, len(prompt):].tolist()
    assert runaway[:3] == [first, eot, after] and len(runaway) == 10
