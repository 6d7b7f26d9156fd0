"""Structured outputs through the real `openai` client: response_format, pydantic parse, forced tool calls.

The models are random (a random model never writes JSON by itself: the worst case for a grammar),
with Llama 3's real vocabulary, and every sampled output is checked by `jsonschema`, an
independent validator. One rigged model shows that the mask changes what the model would say.
"""

import json
from typing import Literal

import jsonschema
import openai
import pydantic
import pytest
import torch

from herd.model import ModelArgs, build_model
from herd.serve import Engine
from herd.serve.server import ServerThread, build_app
from herd.tokenizer import Tokenizer, llama3_tokenizer_path

pytest.importorskip("llguidance")

KEY = "k"
# Bounded everywhere (maxLength, enums, ranges, maxItems): a random model would otherwise stay
# inside a string until max_tokens (a closing quote is a few dozen of 128K tokens).
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 2},
        "home": {"anyOf": [{"type": "null"}, {"type": "object", "properties": {
            "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}, "required": ["zip"], "additionalProperties": False}]},
    },
    "required": ["name", "age", "role", "tags", "home"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}, "days": {"type": "integer", "minimum": 1,
                                                                                     "maximum": 7}},
        "required": ["city", "days"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"zone": {"type": "string", "maxLength": 6}}, "required": ["zone"],
        "additionalProperties": False}}},
]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_file(llama3_tokenizer_path())


def _serve(model, tok):
    engine = Engine(model, max_batch=8, max_queue=32, max_seq_len=512, token_bytes=tok.decode_single_token_bytes)
    engine.start()
    return engine, ServerThread(build_app(engine, tok, model_name="tiny", api_key=KEY))


@pytest.fixture(scope="module")
def client(tok):
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128256, multiple_of=32, max_seq_len=512)
    engine, srv = _serve(build_model(args, seed=1).eval(), tok)
    with srv:
        yield openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
    engine.stop()


MESSAGES = [{"role": "user", "content": "Describe a user as JSON."}]


def test_json_schema_outputs_always_validate(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "user", "schema": SCHEMA, "strict": True}}
    outputs = []
    for seed in (0, 100, 200):  # 3 x 8 sampled choices at temperature 1 (choice i draws with seed + i)
        r = client.chat.completions.create(model="tiny", messages=MESSAGES, response_format=fmt, n=8, seed=seed,
                                           max_tokens=150, temperature=1.0)
        for c in r.choices:
            assert c.finish_reason == "stop", c.message.content
            outputs.append(json.loads(c.message.content))
    for value in outputs:
        jsonschema.validate(value, SCHEMA)
    assert len({json.dumps(v) for v in outputs}) == 24  # sampled, not one greedy answer repeated


def test_json_schema_stream_and_completions(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "user", "schema": SCHEMA}}
    chunks = list(client.chat.completions.create(model="tiny", messages=MESSAGES, response_format=fmt, seed=5,
                                                 max_tokens=150, stream=True))
    jsonschema.validate(json.loads("".join(c.choices[0].delta.content or "" for c in chunks)), SCHEMA)
    # /v1/completions takes response_format too (as vLLM does).
    r = client.completions.create(model="tiny", prompt="JSON:", max_tokens=150, n=4, seed=2,
                                  extra_body={"response_format": fmt})
    for c in r.choices:
        jsonschema.validate(json.loads(c.text), SCHEMA)


def test_json_object_mode_and_errors(client):
    # json_object is any object; a random model would fill it with endless keys, so the output is
    # checked as a prefix that the object grammar accepted: it opens with "{".
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, response_format={"type": "json_object"},
                                       max_tokens=20, temperature=0)
    content = r.choices[0].message.content
    assert content.startswith("{")
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(content), dict)
    for fmt, needle in [({"type": "xml"}, "'text', 'json_object', 'json_schema'"),
                        ({"type": "json_schema"}, "needs 'json_schema'"),
                        ({"type": "json_schema", "json_schema": {"schema": {}}}, "'name': string"),
                        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objet"}}},
                         "Invalid type: objet"),
                        ({"type": "json_schema", "json_schema": {"name": "x", "strict": True,
                                                                 "schema": {"type": "array", "uniqueItems": True}}},
                         "uniqueItems")]:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="tiny", messages=MESSAGES, response_format=fmt, max_tokens=5)
        assert needle in str(e.value), str(e.value)


class Person(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=8)
    age: int = pydantic.Field(ge=0, le=120)
    role: Literal["admin", "user"]


def test_pydantic_parse(client):
    parse = client.chat.completions.parse if hasattr(client.chat.completions, "parse") else \
        client.beta.chat.completions.parse
    for seed in range(4):
        r = parse(model="tiny", messages=MESSAGES, response_format=Person, max_tokens=60, seed=seed, temperature=1.0)
        person = r.choices[0].message.parsed
        assert isinstance(person, Person) and 0 <= person.age <= 120 and len(person.name) <= 8


def _params(name):
    return next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == name)


def test_forced_tool_calls_parse_and_validate(client):
    seen = set()
    for seed in range(4):
        r = client.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice="required",
                                           n=4, seed=seed, max_tokens=60, temperature=1.0)
        for c in r.choices:
            assert c.finish_reason == "tool_calls" and c.message.content is None
            [call] = c.message.tool_calls
            jsonschema.validate(json.loads(call.function.arguments), _params(call.function.name))
            seen.add(call.function.name)
    assert seen == {"get_weather", "get_time"}
    named = {"type": "function", "function": {"name": "get_weather"}}
    for stream in (False, True):
        r = client.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice=named, seed=9,
                                           max_tokens=60, stream=stream)
        if stream:
            calls = [d for chunk in r for d in (chunk.choices[0].delta.tool_calls or [])]
            assert [d.function.name for d in calls] == ["get_weather"]
            jsonschema.validate(json.loads(calls[0].function.arguments), _params("get_weather"))
        else:
            [call] = r.choices[0].message.tool_calls
            assert call.function.name == "get_weather"
            jsonschema.validate(json.loads(call.function.arguments), _params("get_weather"))
    with pytest.raises(openai.BadRequestError, match="does not declare it"):
        client.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS, max_tokens=5,
                                       tool_choice={"type": "function", "function": {"name": "nope"}})
    with pytest.raises(openai.BadRequestError, match="does not declare it"):
        client.chat.completions.create(model="tiny", messages=MESSAGES, tool_choice="required", max_tokens=5)


def test_the_mask_overrides_what_the_model_prefers(tok):
    """A bigram model rigged to answer {"city": "Paris"}: unconstrained it does; a schema that
    allows only Rome makes it write Rome, and json_object leaves its own answer alone."""
    args = ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=128256, multiple_of=32, max_seq_len=512)
    m = build_model(args, seed=0)
    reply = '{"city": "Paris"}'
    chain = [tok.encode("\n\n", bos=False, eos=False)[0], *tok.encode(reply, bos=False, eos=False), tok.eot_id]
    assert len(set(chain)) == len(chain)
    with torch.no_grad():
        for layer in m.layers.values():
            layer.attention.wo.weight.zero_()
            layer.feed_forward.w2.weight.zero_()
        m.output.weight.zero_()
        emb = m.tok_embeddings.weight
        for a, b in zip(chain, chain[1:]):
            m.output.weight[b] = 20 * emb[a] / emb[a].norm()
    engine, srv = _serve(m.eval(), tok)
    with srv:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0, timeout=60)

        def ask(**kw):
            return c.chat.completions.create(model="tiny", messages=MESSAGES, temperature=0, max_tokens=20,
                                             **kw).choices[0].message.content

        assert ask() == reply
        assert ask(response_format={"type": "json_object"}) == reply
        rome = {"type": "object", "properties": {"city": {"enum": ["Rome"]}}, "required": ["city"],
                "additionalProperties": False}
        assert json.loads(ask(response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": rome}})) \
            == {"city": "Rome"}
    engine.stop()


@pytest.mark.slow
def test_smollm2_answers_a_json_schema_request_with_sensible_json(smollm2_gguf):
    """The real SmolLM2-135M-Instruct behind the server: valid JSON, and the facts of the prompt."""
    from herd.generate.loading import load_for_inference

    lm = load_for_inference(smollm2_gguf)
    engine = Engine(lm.model, max_batch=2, max_seq_len=512, token_bytes=lm.tokenizer.decode_single_token_bytes)
    engine.start()
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                               "city": {"type": "string"}},
              "required": ["name", "age", "city"], "additionalProperties": False}
    with ServerThread(build_app(engine, lm.tokenizer, model_name="smol", api_key=KEY, chat=lm.chat)) as srv:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0, timeout=600)
        r = c.chat.completions.create(
            model="smol", temperature=0, max_tokens=60,
            messages=[{"role": "user", "content": "Give me a JSON object describing a person named Alice, "
                                                  "30 years old, living in Paris."}],
            response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}})
    engine.stop()
    value = json.loads(r.choices[0].message.content)
    jsonschema.validate(value, schema)
    assert value == {"name": "Alice", "age": 30, "city": "Paris"}
