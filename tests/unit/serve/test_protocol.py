"""The OpenAI protocol layer without HTTP: validation, prompts with tools, stop strings, tool calls."""

import json

import pytest

from herd.serve.engine import Choice
from herd.serve.protocol import (
    APIError,
    TextAssembler,
    chat_prompt,
    check_length,
    may_be_tool_call,
    parse_chat_request,
    parse_completion_request,
    parse_tool_calls,
    tools_system_prompt,
)
from herd.tokenizer import ChatFormat, Message, Tokenizer, llama3_tokenizer_path

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_file(llama3_tokenizer_path())


@pytest.fixture(scope="module")
def special(tok):
    return frozenset(tok.special_tokens.values())


def _stream(tok, special, text_ids, stop):
    asm = TextAssembler(tok, stop, special)
    pieces = [asm.feed(t) for t in text_ids]
    return pieces, asm.finish(), asm


def test_text_is_cut_before_a_stop_string_split_across_tokens(tok, special):
    ids = tok.encode("Hello world. Goodbye", bos=False, eos=False)  # Hello| world|.| Good|bye
    pieces, rest, asm = _stream(tok, special, ids, ["d. Go"])
    assert "".join(pieces) + rest == "Hello worl" and asm.stopped
    # " world" ends with "d", a possible start of the stop string: held back until "." decides.
    assert pieces[:2] == ["Hello", " worl"]


def test_held_back_text_is_released_when_no_stop_string_follows(tok, special):
    ids = tok.encode("Hello world. Goodbye", bos=False, eos=False)
    pieces, rest, asm = _stream(tok, special, ids, ["d!"])
    assert "".join(pieces) + rest == "Hello world. Goodbye" and not asm.stopped
    assert pieces[1] == " worl"  # "d" waits for the next token, which is not "!"


def test_special_tokens_and_split_characters(tok, special):
    ids = [tok.bos_id] + tok.encode("😀 ok", bos=False, eos=False) + [tok.eot_id]
    pieces, rest, _ = _stream(tok, special, ids, [])
    assert pieces[:3] == ["", "", "😀"] and "".join(pieces) + rest == "😀 ok"


def test_validation_errors_name_the_field():
    ok = {"messages": [{"role": "user", "content": "hi"}]}
    cases = [
        ({**ok, "temperature": "hot"}, "temperature"),
        ({**ok, "temperature": 2.5}, "temperature"),
        ({**ok, "top_p": 0}, "top_p"),
        ({**ok, "n": 9}, "n"),
        ({**ok, "max_tokens": 0}, "max_tokens"),
        ({**ok, "stop": [1]}, "stop"),
        ({**ok, "stream_options": {"include_usage": True}}, "stream_options"),
        ({**ok, "top_logprobs": 2}, "top_logprobs"),
        ({**ok, "presence_penalty": 0.5}, "presence_penalty"),
        ({**ok, "tool_choice": "required", "tools": TOOLS}, "tool_choice"),
        ({"messages": "hi"}, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages"),
    ]
    for body, param in cases:
        with pytest.raises(APIError) as e:
            parse_chat_request(body, max_n=8)
        assert e.value.status == 400 and e.value.param == param, body
    with pytest.raises(APIError, match="JSON object"):
        parse_chat_request([1, 2], max_n=8)
    with pytest.raises(APIError) as e:
        parse_completion_request({"prompt": [[1], "x"]}, max_n=8)
    assert e.value.param == "prompt"


def test_accepted_shapes():
    r = parse_chat_request({"messages": [{"role": "developer", "content": [{"type": "text", "text": "a"},
                                                                          {"type": "text", "text": "b"}]},
                                         {"role": "user", "content": "hi"}],
                            "max_completion_tokens": 5.0, "stop": "x", "seed": 3, "logprobs": True,
                            "top_logprobs": 2}, max_n=8)
    assert r.messages[0] == Message("system", "ab") and r.params.max_tokens == 5 and r.params.stop == ["x"]
    assert r.params.sampling.seed == 3 and r.params.sampling.temperature == 1.0 and r.params.top_logprobs == 2
    c = parse_completion_request({"prompt": [[1, 2], [3]], "logprobs": 0}, max_n=8)
    assert c.prompts == [[1, 2], [3]] and c.params.logprobs and c.params.top_logprobs == 0


def test_check_length():
    assert check_length(10, None, 64) == 54
    assert check_length(10, 54, 64) == 54
    for prompt, max_tokens in [(64, None), (10, 55)]:
        with pytest.raises(APIError) as e:
            check_length(prompt, max_tokens, 64)
        assert e.value.status == 400 and e.value.code == "context_length_exceeded"


def test_tools_go_into_the_system_turn(tok):
    fmt = ChatFormat(tok, version="3.1")
    req = parse_chat_request({"messages": [{"role": "system", "content": "Be brief."},
                                           {"role": "user", "content": "Weather in Paris?"}], "tools": TOOLS},
                             max_n=8)
    ids = chat_prompt(fmt, req)
    text = tok.decode(ids)
    system = tools_system_prompt([TOOLS[0]["function"]], "Be brief.")
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n" + system + "<|eot_id|>")
    assert '"name": "get_weather"' in system and system.rstrip().endswith("Be brief.")
    assert "Today Date:" in system and text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    # tool_choice "none" leaves the prompt as it would be without tools.
    plain = parse_chat_request({"messages": [{"role": "user", "content": "x"}]}, max_n=8)
    none = parse_chat_request({"messages": [{"role": "user", "content": "x"}], "tools": TOOLS, "tool_choice": "none"},
                              max_n=8)
    assert chat_prompt(fmt, plain) == chat_prompt(fmt, none)


def test_tool_call_history_round_trips(tok):
    fmt = ChatFormat(tok, version="3.1")
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    req = parse_chat_request({"messages": [{"role": "user", "content": "Weather?"},
                                           {"role": "assistant", "content": None, "tool_calls": [call]},
                                           {"role": "tool", "tool_call_id": "call_1", "content": "18 C"}],
                              "tools": TOOLS}, max_n=8)
    text = tok.decode(chat_prompt(fmt, req))
    assert '{"type": "function", "name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>' in text
    assert "<|start_header_id|>ipython<|end_header_id|>\n\n18 C<|eot_id|>" in text
    bad = {**call, "function": {"name": "f", "arguments": "{not json"}}
    with pytest.raises(APIError, match="not valid JSON"):
        parse_chat_request({"messages": [{"role": "assistant", "content": None, "tool_calls": [bad]}]}, max_n=8)


@pytest.mark.parametrize("reply", [
    '{"name": "get_weather", "parameters": {"city": "Paris"}}',
    '<function=get_weather>{"city": "Paris"}</function>',
    '[get_weather(city="Paris")]',
])
def test_replies_in_each_tool_format_become_tool_calls(tok, special, reply):
    fmt = ChatFormat(tok, version="3.1")
    ids = tok.encode(reply, bos=False, eos=False)
    [call] = parse_tool_calls(fmt, Choice(0, tokens=ids, finish_reason="stop", stop_token=tok.eot_id))
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == "get_weather" and json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    assert may_be_tool_call(tok, ids[:1], special)
    assert not parse_tool_calls(fmt, Choice(0, tokens=tok.encode("It is sunny.", bos=False, eos=False)))
    assert not may_be_tool_call(tok, tok.encode(" It", bos=False, eos=False), special)
