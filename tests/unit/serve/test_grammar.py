"""Forced tool calls in each chat format's call format: random-logit walks through the grammar
must give replies that the format's own parser reads as one call with valid arguments."""

import jsonschema
import numpy as np
import pytest
import torch

from herd.serve.protocol import APIError, parse_chat_request
from herd.tokenizer import ChatFormat, ChatTemplate, Tokenizer, llama3_tokenizer_path

pytest.importorskip("llguidance")
from herd.serve.grammar import Grammars  # noqa: E402

PARAMS = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]},
                                           "days": {"type": "integer", "minimum": 1, "maximum": 9}},
          "required": ["city", "days"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": PARAMS}},
         {"type": "function", "function": {"name": "now", "parameters": {
             "type": "object", "properties": {}, "additionalProperties": False}}}]
HERMES = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if tools %}<tools>{{ tools | tojson }}</tools>{% endif %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}{# <tool_call> #}")
BARE = HERMES.replace("{# <tool_call> #}", "{# m.tool_calls #}")
PLAIN = HERMES.replace("{# <tool_call> #}", "")


def _request(choice):
    return parse_chat_request({"messages": [{"role": "user", "content": "hi"}], "tools": TOOLS,
                               "tool_choice": choice}, max_n=1)


def _reply(grammar, tok, vocab_size, seed):
    processor, rng, out = grammar.processor(), np.random.default_rng(seed), []
    for _ in range(200):
        logits = processor(torch.from_numpy(rng.standard_normal(vocab_size, dtype=np.float32)), out).numpy()
        t = int(np.argmax(logits + rng.gumbel(size=vocab_size)))
        processor.accept(t)
        out.append(t)
        if t in tok.stop_tokens:
            return out
    raise AssertionError(f"no end: {tok.decode(out)!r}")


def _check_calls(fmt, grammar, tok, vocab_size, names):
    seen = set()
    for seed in range(6):
        ids = _reply(grammar, tok, vocab_size, seed)
        [call] = fmt.decode_assistant_message(ids).tool_calls
        assert call.name in names
        if call.name == "get_weather":
            jsonschema.validate(call.arguments, PARAMS)
        else:
            assert call.arguments == {}
        seen.add(call.name)
    return seen


def test_llama3_forced_calls_parse():
    tok = Tokenizer.from_file(llama3_tokenizer_path())
    fmt = ChatFormat(tok, version="3.1")
    grammars = Grammars(tok, tok.n_words)
    assert _check_calls(fmt, grammars.for_chat(fmt, _request("required")), tok, tok.n_words,
                        {"get_weather", "now"}) == {"get_weather", "now"}
    named = _request({"type": "function", "function": {"name": "get_weather"}})
    assert _check_calls(fmt, grammars.for_chat(fmt, named), tok, tok.n_words, {"get_weather"}) == {"get_weather"}
    plain = parse_chat_request({"messages": [{"role": "user", "content": "hi"}], "tools": TOOLS}, max_n=1)
    assert grammars.for_chat(fmt, plain) is None  # tool_choice auto: no constraint


@pytest.fixture(scope="module")
def smollm2_tok(smollm2_gguf):
    from herd.tokenizer.resolve import load_tokenizer

    return load_tokenizer(smollm2_gguf, None, vocab_size=49152)


@pytest.mark.parametrize("template", [HERMES, BARE], ids=["tool_call-tags", "bare-json"])
def test_template_forced_calls_parse(smollm2_tok, template):
    tok = smollm2_tok
    fmt = ChatTemplate(template, tok)
    grammars = Grammars(tok, tok.n_words)
    grammar = grammars.for_chat(fmt, _request("required"))
    assert _check_calls(fmt, grammar, tok, tok.n_words, {"get_weather", "now"})
    if template is HERMES:
        assert tok.decode(_reply(grammar, tok, tok.n_words, 0)).startswith("<tool_call>\n{\"name\": ")


def test_a_template_without_a_call_format_refuses(smollm2_tok):
    fmt = ChatTemplate(PLAIN, smollm2_tok)
    with pytest.raises(APIError, match="no tool-call format") as e:
        Grammars(smollm2_tok, smollm2_tok.n_words).for_chat(fmt, _request("required"))
    assert e.value.status == 400
