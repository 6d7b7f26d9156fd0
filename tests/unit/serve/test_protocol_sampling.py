"""The sampling fields OpenAI and vLLM clients send, echoed prompts' logprobs, /tokenize and /detokenize,
as plain functions (no HTTP)."""

import pytest

from herd.serve.logprobs import echo_logprobs, join_logprobs
from herd.serve.protocol import (
    APIError,
    check_length,
    check_logit_bias,
    parse_chat_request,
    parse_completion_request,
)
from herd.serve.requests import PromptLogprob
from herd.serve.tokens_api import detokenize, tokenize
from herd.tokenizer import ChatFormat, Tokenizer, llama3_tokenizer_path

CHAT = {"messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_file(llama3_tokenizer_path())


def test_sampling_extensions_are_parsed():
    p = parse_chat_request({**CHAT, "frequency_penalty": 0.5, "presence_penalty": -1, "repetition_penalty": 1.2,
                            "logit_bias": {"42": -100, "7": 3.5}, "top_k": 40, "min_p": 0.05}, max_n=1).params
    assert (p.penalties.frequency, p.penalties.presence, p.penalties.repetition) == (0.5, -1.0, 1.2)
    assert dict(p.penalties.logit_bias) == {42: -100.0, 7: 3.5}
    assert p.sampling.top_k == 40 and p.sampling.min_p == 0.05
    plain = parse_chat_request({**CHAT, "top_k": -1, "min_p": 0}, max_n=1).params
    assert plain.sampling.top_k is None and plain.sampling.min_p is None and not plain.penalties.active
    assert parse_chat_request({**CHAT, "top_k": 0}, max_n=1).params.sampling.top_k is None  # vLLM: 0 = off too


@pytest.mark.parametrize("extra, param", [
    ({"frequency_penalty": 2.01}, "frequency_penalty"),
    ({"presence_penalty": -2.5}, "presence_penalty"),
    ({"presence_penalty": "high"}, "presence_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": {"-5": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"logit_bias": {"5": "1"}}, "logit_bias"),
    ({"logit_bias": {"5": True}}, "logit_bias"),
    ({"logit_bias": [1, 2]}, "logit_bias"),
    ({"top_k": -2}, "top_k"),
    ({"top_k": 1.5}, "top_k"),
    ({"min_p": 1.5}, "min_p"),
    ({"ignore_eos": "yes"}, "ignore_eos"),
])
def test_bad_sampling_fields_are_400s_naming_the_field(extra, param):
    for parse, body in ((parse_chat_request, CHAT), (parse_completion_request, {"prompt": "x"})):
        with pytest.raises(APIError) as e:
            parse({**body, **extra}, max_n=1)
        assert e.value.status == 400 and e.value.param == param and param in e.value.message


def test_ignore_eos_is_parsed_and_off_by_default():
    for parse, body in ((parse_chat_request, CHAT), (parse_completion_request, {"prompt": "x"})):
        assert parse({**body, "ignore_eos": True}, max_n=1).params.ignore_eos is True
        assert parse(body, max_n=1).params.ignore_eos is False


def test_logit_bias_ids_are_checked_against_the_vocabulary():
    p = parse_chat_request({**CHAT, "logit_bias": {"255": 1, "256": 1}}, max_n=1).params
    check_logit_bias(p.penalties, 257)
    with pytest.raises(APIError, match="256") as e:
        check_logit_bias(p.penalties, 256)
    assert e.value.param == "logit_bias"


def test_completions_take_max_tokens_zero_and_echo():
    p = parse_completion_request({"prompt": "x", "max_tokens": 0, "echo": True, "logprobs": 1}, max_n=1).params
    assert p.max_tokens == 0 and p.echo and p.logprobs and p.top_logprobs == 1
    assert check_length(10, 0, 10) == 0  # a prompt that fills the context can still be scored
    with pytest.raises(APIError):
        check_length(11, 0, 10)
    with pytest.raises(APIError) as e:
        parse_completion_request({"prompt": "x", "max_tokens": -1}, max_n=1)
    assert e.value.param == "max_tokens"
    with pytest.raises(APIError) as e:
        parse_completion_request({"prompt": "x", "echo": "yes"}, max_n=1)
    assert e.value.param == "echo"


def test_echo_logprobs_in_the_legacy_format(tok):
    ids = tok.encode("Hello world", bos=True, eos=False)  # <|begin_of_text|>, Hello, " world"
    entries = [PromptLogprob(None), PromptLogprob(-2.0, [(9906, -1.0)]), PromptLogprob(-0.5, [(1917, -0.5)])]
    special = frozenset(tok.special_tokens.values())
    lp, end = echo_logprobs(tok, ids, entries, special)
    assert lp["tokens"] == ["<|begin_of_text|>", "Hello", " world"]
    assert lp["token_logprobs"] == [None, -2.0, -0.5]
    assert lp["top_logprobs"] == [None, {"Hello": -1.0}, {" world": -0.5}]
    # Offsets into the echoed text "Hello world", which leaves BOS out.
    assert lp["text_offset"] == [0, 0, 5] and end == 11
    assert echo_logprobs(tok, ids, entries)[0]["text_offset"] == [0, 17, 22]  # without special ids: raw lengths
    then = {"tokens": ["!"], "token_logprobs": [-3.0], "top_logprobs": [{"!": -3.0}], "text_offset": [11]}
    joined = join_logprobs(lp, then)
    assert joined["tokens"][-1] == "!" and joined["token_logprobs"] == [None, -2.0, -0.5, -3.0]
    assert joined["top_logprobs"][0] is None and joined["text_offset"] == [0, 0, 5, 11]
    bare, _ = echo_logprobs(tok, ids, [PromptLogprob(None), PromptLogprob(-2.0), PromptLogprob(-0.5)])
    assert bare["top_logprobs"] is None  # logprobs 0: no alternatives asked for


def test_tokenize_prompt_and_messages(tok):
    fmt = ChatFormat(tok, version="3.1")
    r = tokenize({"prompt": "Hello world"}, tok, fmt, max_model_len=128)
    assert r == {"count": 3, "max_model_len": 128, "tokens": tok.encode("Hello world", bos=True, eos=False)}
    r = tokenize({"prompt": "Hello world", "add_special_tokens": False, "return_token_strs": True}, tok, fmt,
                 max_model_len=128)
    assert r["tokens"] == tok.encode("Hello world", bos=False, eos=False) and r["token_strs"] == ["Hello", " world"]
    msgs = [{"role": "user", "content": "hi"}]
    from herd.tokenizer import Message
    want = fmt.encode_dialog_prompt([Message(role="user", content="hi")]).tokens
    assert tokenize({"messages": msgs}, tok, fmt, max_model_len=128)["tokens"] == want
    no_gen = tokenize({"messages": msgs, "add_generation_prompt": False}, tok, fmt, max_model_len=128)["tokens"]
    assert no_gen == fmt.encode_dialog_prompt([Message(role="user", content="hi")], add_generation_prompt=False).tokens
    assert len(want) > len(no_gen) and no_gen[0] == tok.bos_id and no_gen.count(tok.bos_id) == 1


@pytest.mark.parametrize("body, param", [
    ({}, "prompt"), ({"prompt": "a", "messages": []}, "prompt"), ({"prompt": 3}, "prompt"),
    ({"messages": "hi"}, "messages"), ({"prompt": "a", "add_special_tokens": "no"}, "add_special_tokens"),
])
def test_tokenize_errors(tok, body, param):
    with pytest.raises(APIError) as e:
        tokenize(body, tok, ChatFormat(tok, version="3.1"), max_model_len=128)
    assert e.value.status == 400 and e.value.param == param


def test_detokenize(tok):
    ids = tok.encode("Hello world", bos=False, eos=False)
    assert detokenize({"tokens": ids}, tok) == {"prompt": "Hello world"}
    for bad in ({"tokens": [1, -1]}, {"tokens": [tok.n_words]}, {"tokens": "12"}, {}):
        with pytest.raises(APIError) as e:
            detokenize(bad, tok)
        assert e.value.param == "tokens"
