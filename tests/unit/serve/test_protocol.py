"""The OpenAI protocol layer without HTTP: validation, prompts with tools, stop strings, tool calls."""

import json
import random

import pytest

from herd.serve.engine import Choice
from herd.serve.protocol import (
    MAX_STOP_LENGTH,
    MAX_STOP_STRINGS,
    APIError,
    StopFilter,
    StopStrings,
    TextAssembler,
    ToolCallSniffer,
    chat_prompt,
    check_length,
    may_be_tool_call,
    parse_chat_request,
    parse_completion_request,
    parse_tool_calls,
    tools_system_prompt,
)
from herd.tokenizer import ChatFormat, Message, StreamDecoder, Tokenizer, llama3_tokenizer_path

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


class _QuadraticFilter:
    """The stop-string logic StopFilter replaced, kept as the reference: it rescans the text for
    every stop string and tries every prefix length for the held-back tail (O(len(stop)^2) per token)."""

    def __init__(self, stops):
        self.stops, self.text, self.sent, self.stopped = list(stops), "", 0, False

    def push(self, piece, *, final=False):
        if self.stopped:
            return ""
        self.text += piece
        if self.stops:
            hits = [i for i in (self.text.find(s, self.sent) for s in self.stops) if i >= 0]
            if hits:
                self.text, self.stopped, final = self.text[: min(hits)], True, True
        end = len(self.text)
        if not final:
            end -= max((k for s in self.stops for k in range(len(s) - 1, 0, -1) if self.text.endswith(s[:k])), default=0)
        out = self.text[self.sent : end]
        self.sent = max(self.sent, end)
        return out


# Small alphabets make overlapping stops and partial matches frequent; multi-byte characters included.
ALPHABETS = ["ab", "abc", "aé😀", "a東京\n", "xyxz"]


def test_stop_filter_equals_the_quadratic_reference_on_random_text():
    rng = random.Random(0)
    for case in range(4000):
        alphabet = rng.choice(ALPHABETS)
        word = lambda lo, hi: "".join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi)))  # noqa: E731
        stops = [word(1, 6) for _ in range(rng.randint(0, 4))]
        if stops and rng.random() < 0.3:  # one stop inside another: "abcd" and "bc"
            s = rng.choice(stops)
            stops.append(s[rng.randint(0, len(s) - 1) :][: rng.randint(1, len(s))])
        pieces = [word(0, 5) for _ in range(rng.randint(0, 14))]
        ours, ref = StopFilter(StopStrings(stops) if case % 2 else stops), _QuadraticFilter(stops)
        for piece in pieces:
            assert ours.push(piece) == ref.push(piece), (stops, pieces)
            assert ours.stopped == ref.stopped and ours.text == ref.text, (stops, pieces)
        assert ours.push("", final=True) == ref.push("", final=True), (stops, pieces)
        assert ours.text == ref.text and ours.stopped == ref.stopped, (stops, pieces)


def test_overlapping_stops_cut_at_the_earliest_start():
    f = StopFilter(["bc", "abcd"])
    assert f.push("xabcdy") == "x" and f.stopped and f.text == "x"  # both end in this piece; "abcd" starts first
    f = StopFilter(["bc", "abcd"])
    assert f.push("xab") == "x" and f.push("c") == "a" and f.stopped and f.text == "xa"  # "bc" completes first
    f = StopFilter(["aab"])
    assert [f.push(p) for p in ["a", "a", "a", "c"]] == ["", "", "a", "aac"] and not f.stopped  # "aa" may grow into it


def test_text_assembler_equals_the_reference_on_multibyte_tokens(tok, special):
    rng = random.Random(1)
    words = ["llama", " é", "😀", "東京", " the", "\n", "ab", "🦙🦙", " ça"]
    for _ in range(150):
        text = "".join(rng.choice(words) for _ in range(rng.randint(1, 12)))
        ids = tok.encode(text, bos=False, eos=False)
        stops = [text[i : i + rng.randint(1, 4)] for i in (rng.randrange(len(text)) for _ in range(rng.randint(0, 2)))]
        stops += [rng.choice(words) + rng.choice(words) for _ in range(rng.randint(0, 2))]
        asm, decoder, ref = TextAssembler(tok, stops, special), StreamDecoder(tok), _QuadraticFilter(stops)
        for t in ids:
            assert asm.feed(t) == ("" if ref.stopped else ref.push(decoder.feed(t))), (text, stops)
        assert asm.finish() == ref.push("" if ref.stopped else decoder.flush(), final=True), (text, stops)
        assert asm.text == ref.text and asm.stopped == ref.stopped


class _CountingStr(str):
    """A stop string that counts how often a character of it is read."""

    reads = 0

    def __getitem__(self, key):
        _CountingStr.reads += 1
        return str.__getitem__(self, key)


def _reads_per_token(length, tokens=300):
    # Text of 'a's against 'aaa...ab': every position is a partial match, the worst case for the
    # old held-back-tail search (which tried all len(stop) prefixes at every token).
    stop = _CountingStr("a" * (length - 1) + "b")
    f = StopFilter([stop])
    _CountingStr.reads = 0
    for _ in range(tokens):
        f.push("aaaa")
    assert not f.stopped
    return _CountingStr.reads / tokens


def test_stop_filter_work_per_token_does_not_grow_with_the_stop_length():
    short, long = _reads_per_token(1_000), _reads_per_token(100_000)
    assert long <= 3 * short + 1 and long < 20, (short, long)  # the quadratic search read ~len(stop)^2 / 2


def test_tool_call_sniffer_equals_a_full_decode(tok, special):
    # The sniffer skips leading blank tokens it has decoded once; the answer must not change.
    rng = random.Random(2)
    words = [" ", "\n", "  ", "\t", "{", "[", "<", "x", " é", "😀", "\u3000"]
    for _ in range(200):
        text = "".join(rng.choice(words) for _ in range(rng.randint(1, 10)))
        ids = tok.encode(text, bos=False, eos=False)
        if rng.random() < 0.3:
            ids.insert(rng.randrange(len(ids) + 1), tok.eot_id)
        sniffer = ToolCallSniffer(tok, special)
        for i in range(1, len(ids) + 1):
            assert sniffer(ids[:i]) == may_be_tool_call(tok, ids[:i], special), (text, ids[:i])


def test_stop_strings_are_limited_in_number_and_length():
    ok = {"messages": [{"role": "user", "content": "hi"}]}
    r = parse_chat_request({**ok, "stop": ["x" * MAX_STOP_LENGTH] * MAX_STOP_STRINGS}, max_n=8)
    assert len(r.params.stop) == MAX_STOP_STRINGS
    for stop, limit in [(["x"] * (MAX_STOP_STRINGS + 1), str(MAX_STOP_STRINGS)),
                        ("x" * (MAX_STOP_LENGTH + 1), str(MAX_STOP_LENGTH)),
                        (["ok", "x" * 1_000_000], str(MAX_STOP_LENGTH)), (["ok", ""], str(MAX_STOP_LENGTH))]:
        with pytest.raises(APIError) as e:
            parse_completion_request({"prompt": "x", "stop": stop}, max_n=8)
        assert e.value.status == 400 and e.value.param == "stop" and limit in e.value.message


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
        ({**ok, "tool_choice": "required"}, "tool_choice"),
        ({**ok, "tool_choice": "any", "tools": TOOLS}, "tool_choice"),
        ({**ok, "tool_choice": {"type": "function", "function": {}}, "tools": TOOLS}, "tool_choice"),
        ({**ok, "tool_choice": {"type": "function", "function": {"name": "other"}}, "tools": TOOLS}, "tool_choice"),
        ({**ok, "response_format": {"type": "json_schema", "json_schema": {"schema": {}}}}, "response_format"),
        ({**ok, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": []}}},
         "response_format"),
        ({**ok, "response_format": {"type": "yaml"}}, "response_format"),
        ({**ok, "response_format": "json"}, "response_format"),
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


def test_response_format_and_forced_tool_choice_are_parsed():
    ok = {"messages": [{"role": "user", "content": "hi"}]}
    assert parse_chat_request(ok, max_n=1).params.response_format is None
    assert parse_chat_request({**ok, "response_format": {"type": "text"}}, max_n=1).params.response_format is None
    fmt = parse_chat_request({**ok, "response_format": {"type": "json_object"}}, max_n=1).params.response_format
    assert (fmt.schema, fmt.strict) == ({"type": "object"}, False)
    spec = {"name": "p", "schema": {"type": "integer"}, "strict": True}
    fmt = parse_completion_request({"prompt": "x", "response_format": {"type": "json_schema", "json_schema": spec}},
                                   max_n=1).params.response_format
    assert (fmt.schema, fmt.strict, fmt.name) == ({"type": "integer"}, True, "p")
    assert parse_chat_request({**ok, "tools": TOOLS}, max_n=1).forced_tool is None
    assert parse_chat_request({**ok, "tools": TOOLS, "tool_choice": "required"}, max_n=1).forced_tool == ""
    named = {"type": "function", "function": {"name": "get_weather"}}
    assert parse_chat_request({**ok, "tools": TOOLS, "tool_choice": named}, max_n=1).forced_tool == "get_weather"
