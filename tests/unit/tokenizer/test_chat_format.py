import datetime

import pytest

from herd.tokenizer import ChatFormat, Message, ToolCall, llama31_system_prompt

HEADER_ASSISTANT = [128006, 78191, 128007, 271]


@pytest.fixture(scope="module")
def chat30(llama3):
    return ChatFormat(llama3, version="3.0")


@pytest.fixture(scope="module")
def chat31(llama3):
    return ChatFormat(llama3, version="3.1")


def test_llama30_documented_example(chat30):
    dialog = [Message("system", "You are a helpful assistant"), Message("user", "Who are you?")]
    expected = [128000, 128006, 9125, 128007, 271, 2675, 527, 264, 11190, 18328, 128009]
    expected += [128006, 882, 128007, 271, 15546, 527, 499, 30, 128009, 128006, 78191, 128007, 271]
    assert chat30.encode_dialog_prompt(dialog).tokens == expected


def test_llama30_strips_content_and_llama31_does_not(llama3, chat30, chat31):
    message = Message("user", "  hi there \n")
    enc = lambda s: llama3.encode(s, bos=False, eos=False)  # noqa: E731
    header = chat30.encode_header("user")
    assert chat30.encode_message(message).tokens == header + enc("hi there") + [llama3.eot_id]
    assert chat31.encode_message(message).tokens == header + enc("  hi there \n") + [llama3.eot_id]


@pytest.mark.parametrize(
    "message",
    [
        Message("ipython", "42"),
        Message("tool", "42"),
        Message("assistant", "", tool_calls=[ToolCall("f", {})]),
        Message("user", "q", context="doc"),
        Message("assistant", "x", stop_reason="end_of_message"),
    ],
)
def test_llama30_rejects_llama31_features(chat30, message):
    with pytest.raises(ValueError, match="3.0"):
        chat30.encode_message(message)


def test_ipython_header_and_tool_alias(chat31):
    assert chat31.encode_header("ipython") == [128006, 23799, 4690, 128007, 271]
    assert chat31.encode_message(Message("tool", "42")).tokens == chat31.encode_message(Message("ipython", "42")).tokens


def test_user_context_is_appended_after_a_blank_line(llama3, chat31):
    enc = lambda s: llama3.encode(s, bos=False, eos=False)  # noqa: E731
    tokens = chat31.encode_message(Message("user", "Question?", context="Some document.")).tokens
    assert tokens == chat31.encode_header("user") + enc("Question?") + [271] + enc("Some document.") + [llama3.eot_id]


CUSTOM_CALL = ToolCall("get_weather", {"city": "São Paulo", "days": 3, "units": None, "hourly": [True, 1.5]})


@pytest.mark.parametrize(
    ("tool_format", "text"),
    [
        (
            "json",
            '{"type": "function", "name": "get_weather", "parameters": '
            '{"city": "S\\u00e3o Paulo", "days": 3, "units": null, "hourly": [true, 1.5]}}',
        ),
        (
            "function_tag",
            '<function=get_weather>{"city": "S\\u00e3o Paulo", "days": 3, "units": null, "hourly": [true, 1.5]}'
            "</function>",
        ),
        ("python_list", '[get_weather(city="São Paulo", days=3, units=None, hourly=[True, 1.5])]'),
    ],
)
def test_custom_tool_call_round_trip(llama3, tool_format, text):
    chat = ChatFormat(llama3, version="3.1", tool_format=tool_format)
    message = Message("assistant", "", tool_calls=[CUSTOM_CALL])
    tokens = chat.encode_message(message).tokens
    assert llama3.decode(tokens) == "<|start_header_id|>assistant<|end_header_id|>\n\n" + text + "<|eot_id|>"
    # Any ChatFormat reads every format back, from ids or from text.
    for reader in (chat, ChatFormat(llama3, version="3.1")):
        assert reader.decode_assistant_message(tokens[4:]) == message
        assert reader.decode_assistant_message(llama3.decode(tokens)) == message


@pytest.mark.parametrize("tool_format", ["function_tag", "python_list"])
def test_several_custom_calls_round_trip(llama3, tool_format):
    chat = ChatFormat(llama3, version="3.1", tool_format=tool_format)
    calls = [ToolCall("search", {"q": 'say "hi"\n', "filters": {"lang": "fr", "n": [1, 2]}}), ToolCall("now", {})]
    message = Message("assistant", "", tool_calls=calls, stop_reason="end_of_message")
    assert chat.decode_assistant_message(chat.encode_message(message).tokens) == message


def test_json_format_carries_one_call(llama3):
    chat = ChatFormat(llama3, version="3.1", tool_format="json")
    with pytest.raises(ValueError, match="one call per message"):
        chat.encode_message(Message("assistant", "", tool_calls=[ToolCall("a", {}), ToolCall("b", {})]))


def test_hf_style_json_call_without_type_is_read(chat31):
    reply = '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>'
    assert chat31.decode_assistant_message(reply).tool_calls == [ToolCall("get_weather", {"city": "Paris"})]


def test_code_interpreter_uses_python_tag_and_eom(llama3, chat31):
    code = "import math\nprint(math.pi)\n"
    message = Message("assistant", "", [ToolCall("code_interpreter", {"code": code})], stop_reason="end_of_message")
    tokens = chat31.encode_message(message).tokens
    assert tokens[:4] == HEADER_ASSISTANT
    assert tokens[4] == llama3.python_tag_id and tokens[-1] == llama3.eom_id
    assert tokens[5:-1] == llama3.encode(code, bos=False, eos=False)
    assert chat31.decode_assistant_message(tokens[4:]) == message


@pytest.mark.parametrize("tool", ["brave_search", "wolfram_alpha", "photogen"])
def test_builtin_query_tools(llama3, chat31, tool):
    message = Message("assistant", "", [ToolCall(tool, {"query": 'latest "gold" price'})], stop_reason="end_of_message")
    tokens = chat31.encode_message(message).tokens
    assert llama3.decode(tokens[4:]) == f'<|python_tag|>{tool}.call(query="latest "gold" price")<|eom_id|>'
    assert chat31.decode_assistant_message(tokens) == message


def test_documented_llama31_brave_search_prompt(llama3, chat31):
    # models/llama3_1/prompt_format.md, "Builtin Tool Calling".
    tools = ["brave_search", "wolfram_alpha"]
    day = datetime.date(2024, 9, 21)
    system = llama31_system_prompt("You are a helpful assistant.", today=day, builtin_tools=tools)
    dialog = [Message("system", system), Message("user", "Search the web for the latest price of 1oz gold?")]
    assert llama3.decode(chat31.encode_dialog_prompt(dialog).tokens) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Environment: ipython\nTools: brave_search, wolfram_alpha\nCutting Knowledge Date: December 2023\n"
        "Today Date: 21 September 2024\n\nYou are a helpful assistant.\n<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nSearch the web for the latest price of 1oz gold?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    documented_reply = '<|python_tag|>brave_search.call(query="latest price of 1oz gold")<|eom_id|>'
    reply = llama3.encode(documented_reply, bos=False, eos=False, allowed_special="all")
    decoded = chat31.decode_assistant_message(reply)
    assert decoded.tool_calls == [ToolCall("brave_search", {"query": "latest price of 1oz gold"})]
    assert decoded.stop_reason == "end_of_message" and decoded.content == ""


def test_system_prompt_helper():
    day = datetime.date(2024, 3, 5)
    assert llama31_system_prompt(today=day) == "Cutting Knowledge Date: December 2023\nToday Date: 05 March 2024\n"
    assert llama31_system_prompt("Be brief.", today=day, builtin_tools=["code_interpreter"]) == (
        "Environment: ipython\nCutting Knowledge Date: December 2023\nToday Date: 05 March 2024\n\nBe brief.\n"
    )
    assert llama31_system_prompt(today=day, custom_tools=True).startswith("Environment: ipython\nCutting")
    with pytest.raises(ValueError, match="unknown builtin tools"):
        llama31_system_prompt(today=day, builtin_tools=["python"])


def test_decode_plain_replies(llama3, chat31):
    enc = lambda s: llama3.encode(s, bos=False, eos=False)  # noqa: E731
    assert chat31.decode_assistant_message(enc(" Hello, world. ") + [llama3.eot_id]) == Message(
        "assistant", " Hello, world. "
    )
    with_header = chat31.decode_assistant_message(HEADER_ASSISTANT + enc("Hi") + [llama3.eom_id])
    assert (with_header.content, with_header.stop_reason) == ("Hi", "end_of_message")
    assert chat31.decode_assistant_message(enc("Hi") + [llama3.eos_id]).stop_reason == "end_of_turn"
    truncated = chat31.decode_assistant_message(enc("Hi, I am"))
    assert (truncated.content, truncated.stop_reason) == ("Hi, I am", "out_of_tokens")
    # Special-token *text* the model spelled out is not the token.
    typed = chat31.decode_assistant_message(enc("see <|eot_id|>"))
    assert (typed.content, typed.stop_reason) == ("see <|eot_id|>", "out_of_tokens")
    # Text that only looks like JSON or a list stays text.
    for text in ['{"answer": 42}', "[1, 2, 3]", "[print('x')]", "brave_search is a tool"]:
        message = chat31.decode_assistant_message(enc(text) + [llama3.eot_id])
        assert (message.content, message.tool_calls) == (text, [])


def test_python_tag_reply_that_is_no_known_call_is_code(llama3, chat31):
    reply = [llama3.python_tag_id] + llama3.encode("x = 1\nprint(x)", bos=False, eos=False) + [llama3.eom_id]
    expected = [ToolCall("code_interpreter", {"code": "x = 1\nprint(x)"})]
    assert chat31.decode_assistant_message(reply).tool_calls == expected


def test_assistant_mask_covers_exactly_assistant_bodies(llama3, chat31):
    dialog = [
        Message("system", "Environment: ipython"),
        Message("user", "Compute 2+2, then greet."),
        Message("assistant", "", [ToolCall("code_interpreter", {"code": "print(2+2)"})], stop_reason="end_of_message"),
        Message("ipython", "4"),
        Message("assistant", "It is 4."),
        Message("user", "Thanks!"),
        Message("assistant", "You're welcome."),
    ]
    for add_generation_prompt in (False, True):
        out = chat31.encode_dialog_prompt(dialog, add_generation_prompt=add_generation_prompt)
        assert len(out.tokens) == len(out.assistant_mask)
        masked = [t for t, m in zip(out.tokens, out.assistant_mask) if m]
        assert llama3.decode(masked) == (
            "<|python_tag|>print(2+2)<|eom_id|>It is 4.<|eot_id|>You're welcome.<|eot_id|>"
        )
        # Masked spans are contiguous bodies that start right after an assistant header.
        starts = [i for i in range(len(out.tokens)) if out.assistant_mask[i] and not out.assistant_mask[i - 1]]
        assert len(starts) == 3
        assert all(out.tokens[i - 4 : i] == HEADER_ASSISTANT for i in starts)
    assert out.tokens[-4:] == HEADER_ASSISTANT and not any(out.assistant_mask[-4:])
    assert out.tokens[0] == llama3.bos_id and not out.assistant_mask[0]


def test_unknown_role_and_bad_settings_are_clear_errors(llama3, chat31):
    with pytest.raises(ValueError, match="unknown role 'bot'"):
        Message("bot", "hi")
    with pytest.raises(ValueError, match="unknown role"):
        chat31.encode_header("bot")
    with pytest.raises(ValueError, match="only assistant messages"):
        Message("user", "hi", tool_calls=[ToolCall("f", {})])
    with pytest.raises(ValueError, match="only user messages"):
        Message("system", "hi", context="doc")
    with pytest.raises(ValueError, match="unknown stop_reason"):
        Message("assistant", "hi", stop_reason="eot")
    with pytest.raises(ValueError, match="'3.1' for Llama 3.1, 3.2 and 3.3"):
        ChatFormat(llama3, version="3.2")
    with pytest.raises(ValueError, match="unknown tool_format"):
        ChatFormat(llama3, version="3.1", tool_format="xml")


@pytest.mark.parametrize(
    ("call", "tool_format", "message"),
    [
        (ToolCall("brave_search", {"q": "x"}), "json", "takes arguments"),
        (ToolCall("code_interpreter", {"code": 1}), "json", "takes arguments"),
        (ToolCall("f", {"x": {1, 2}}), "json", "must be JSON values"),
        (ToolCall("my-tool", {}), "python_list", "not a Python identifier"),
        (ToolCall("f", {"x": float("nan")}), "python_list", "no Python-literal form"),
        (ToolCall("a>b", {}), "function_tag", "avoid '>'"),
    ],
)
def test_unwritable_tool_calls_are_clear_errors(llama3, call, tool_format, message):
    chat = ChatFormat(llama3, version="3.1", tool_format=tool_format)
    with pytest.raises(ValueError, match=message):
        chat.encode_message(Message("assistant", "", [call]))


def test_builtin_call_must_be_alone(chat31):
    calls = [ToolCall("brave_search", {"query": "x"}), ToolCall("f", {})]
    with pytest.raises(ValueError, match="must be the only call"):
        chat31.encode_message(Message("assistant", "", calls))


# ---- Llama 3.2 Vision: <|image|> slots -------------------------------------------------------------


def test_an_image_slot_is_token_128256_where_it_sits(llama3, chat31):
    from herd.tokenizer.chat import IMAGE, IMAGE_TOKEN_ID

    assert IMAGE_TOKEN_ID == 128256 == llama3.n_words  # one past the text vocabulary
    dialog = [Message("user", [IMAGE, "What is in this image?"])]
    # Hand-assembled: BOS, user header, <|image|>, the text, <|eot_id|>, assistant header.
    text = llama3.encode("What is in this image?", bos=False, eos=False)
    want = [128000, 128006, 882, 128007, 271, 128256] + text + [128009] + HEADER_ASSISTANT
    assert chat31.encode_dialog_prompt(dialog).tokens == want
    two = Message("user", ["Compare ", IMAGE, " and ", IMAGE])
    body = chat31.encode_message(two).tokens[4:]
    enc = lambda s: llama3.encode(s, bos=False, eos=False)  # noqa: E731
    assert body == enc("Compare ") + [128256] + enc(" and ") + [128256, 128009]
    assert two.images == 2 and two.text == "Compare  and "


def test_image_dialogs_refuse_a_system_message_and_the_30_format(chat30, chat31):
    from herd.tokenizer.chat import IMAGE

    with pytest.raises(ValueError, match="no system message"):
        chat31.encode_dialog_prompt([Message("system", "Be brief."), Message("user", [IMAGE, "Describe it."])])
    with pytest.raises(ValueError, match="3.0 chat format has no images"):
        chat30.encode_dialog_prompt([Message("user", [IMAGE, "Describe it."])])
    with pytest.raises(ValueError, match="only user messages carry images"):
        Message("assistant", [IMAGE])
    with pytest.raises(ValueError, match="text or IMAGE"):
        Message("user", [IMAGE, 3])


def test_content_parts_round_trip_through_json():
    from herd.tokenizer.chat import IMAGE, content_json, parse_content

    parts = [IMAGE, "What colour is the square?"]
    assert content_json(parts) == [{"type": "image"}, {"type": "text", "text": "What colour is the square?"}]
    assert parse_content(content_json(parts)) == parts and parse_content("plain") == "plain"
    with pytest.raises(ValueError, match="content part"):
        parse_content([{"type": "image_url", "image_url": {"url": "x"}}])
