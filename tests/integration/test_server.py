"""The OpenAI-compatible server on loopback, driven by the official `openai` client (and raw HTTP
where the client would hide what is under test: SSE framing, disconnects, error bodies)."""

import json
import logging
import socket
import threading
import time

import httpx
import openai
import pytest
import torch

from herd.generate import GREEDY, generate
from herd.model import ModelArgs, build_model
from herd.serve import Engine, Request
from herd.serve.protocol import MAX_STOP_LENGTH, MAX_STOP_STRINGS, chat_prompt, parse_chat_request
from herd.serve.server import ServerThread, build_app
from herd.tokenizer import ChatFormat, Message, Tokenizer, llama3_tokenizer_path
from tests.helpers import herd_serve_process

KEY = "test-key"
CONTEXT = 256
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]
TOOL_REPLY = '<function=get_weather>{"city": "Paris"}'


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_file(llama3_tokenizer_path())


@pytest.fixture(scope="module")
def special(tok):
    return frozenset(tok.special_tokens.values())


@pytest.fixture(scope="module")
def model():
    """Random, with the real vocabulary; the sharper head keeps batched and single-row greedy
    decoding (which round differently) on the same tokens."""
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128256, multiple_of=32,
                     max_seq_len=CONTEXT)
    m = build_model(args, seed=3)
    with torch.no_grad():
        m.output.weight.mul_(4.0)
    return m.eval()


def _serve(model, tok, **engine_kw):
    engine = Engine(model, token_bytes=tok.decode_single_token_bytes, **engine_kw)
    engine.start()
    server = ServerThread(build_app(engine, tok, model_name="tiny", api_key=KEY))
    return engine, server


@pytest.fixture(scope="module")
def server(model, tok):
    engine, srv = _serve(model, tok, max_batch=8, max_queue=32, max_seq_len=CONTEXT)
    with srv:
        yield srv, engine
    engine.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0].url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def _greedy(model, prompt, max_tokens, stop_tokens):
    return generate(model, [prompt], max_new_tokens=max_tokens, sampling=GREEDY, stop_tokens=stop_tokens)[0]


def _text(tok, special, tokens):
    return tok.decode([t for t in tokens if t not in special])


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert httpx.get(server[0].url + "/health").json() == {"status": "ok"}


def test_completion_equals_generate_with_usage(model, tok, special, client):
    prompt = "The llama is"
    ids = tok.encode(prompt, bos=True, eos=False)
    want = _greedy(model, ids, 12, tok.stop_tokens)
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
    assert r.object == "text_completion" and r.choices[0].text == _text(tok, special, want.tokens)
    assert r.choices[0].finish_reason == want.finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(ids), 12, len(ids) + 12)


def test_streaming_completion_framing(tok, server, client):
    kw = dict(model="tiny", prompt="Once upon a time", max_tokens=10, temperature=0)
    whole = client.completions.create(**kw)
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert len({c.id for c in chunks}) == 1
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    # On the wire: one `data: {json}` event per chunk, then `data: [DONE]`.
    with httpx.stream("POST", server[0].url + "/v1/completions", json={**kw, "stream": True},
                      headers={"Authorization": f"Bearer {KEY}"}) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = [line for line in resp.iter_lines() if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: {") for e in events[:-1])


def test_chat_streaming_equals_non_streaming(model, tok, special, client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a llama?"}]
    ids = ChatFormat(tok, version="3.1").encode_dialog_prompt([Message("system", "Be brief."),
                                                               Message("user", "What is a llama?")]).tokens
    want = _greedy(model, ids, 9, tok.stop_tokens)
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=9, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == _text(tok, special, want.tokens)
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(want.tokens)
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=9, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == r.choices[0].message.content
    assert chunks[-2].choices[0].finish_reason == r.choices[0].finish_reason
    assert chunks[-1].usage.total_tokens == r.usage.total_tokens


def test_sixteen_concurrent_clients_get_their_own_answers(model, tok, special, server, client):
    # 16 clients, 8 slots: half wait in the queue and join the running batch as slots free up.
    prompts = [f"Request number {i} says" + " la" * (i % 5) for i in range(16)]
    budgets = [6 + (i % 4) * 3 for i in range(16)]
    got = {}

    def one(i):
        got[i] = client.completions.create(model="tiny", prompt=prompts[i], max_tokens=budgets[i], temperature=0)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for i in range(16):
        want = _greedy(model, tok.encode(prompts[i], bos=True, eos=False), budgets[i], tok.stop_tokens)
        assert got[i].choices[0].text == _text(tok, special, want.tokens), i
        assert got[i].usage.completion_tokens == len(want.tokens)
    assert server[1].metrics().decode_rows_total > server[1].metrics().decode_steps_total  # rows were batched


def test_stop_strings_cut_the_text(tok, client):
    kw = dict(model="tiny", prompt="A list of animals:", max_tokens=16, temperature=0)
    full = client.completions.create(**kw).choices[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    want = full[: full.find(stop)]
    r = client.completions.create(**kw, stop=[stop, "never appears"])
    assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
    streamed = list(client.completions.create(**kw, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == want
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_n_seed_and_logprobs(client):
    kw = dict(model="tiny", messages=[{"role": "user", "content": "Pick a word."}], max_tokens=6, temperature=1.0,
              seed=42, n=3, logprobs=True, top_logprobs=2)
    a, b = client.chat.completions.create(**kw), client.chat.completions.create(**kw)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]  # seeded
    assert len({c.message.content for c in a.choices}) > 1  # choices draw independently
    for c in a.choices:
        assert len(c.logprobs.content) == 6 and all(len(e.top_logprobs) == 2 for e in c.logprobs.content)
        assert all(e.logprob <= 0 for e in c.logprobs.content)
    assert a.usage.completion_tokens == 18
    r = client.completions.create(model="tiny", prompt="x", max_tokens=4, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert lp.text_offset[0] == 0 and all(len(alts) <= 3 for alts in lp.top_logprobs)


def _metric(url, name):
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_disconnect_mid_stream_frees_the_slot(server):
    url, engine = server[0].url, server[1]
    cancelled = engine.metrics().requests_finished_total.get("cancelled", 0)
    body = {"model": "tiny", "prompt": "Tell me everything", "max_tokens": 200, "temperature": 0, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}) as resp:
        lines = resp.iter_lines()
        next(lines)  # the first token arrived: the request holds a slot now
        assert _metric(url, "herd_slots_busy") == 1
    deadline = time.monotonic() + 20
    while _metric(url, "herd_slots_busy") != 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _metric(url, "herd_slots_busy") == 0
    m = engine.metrics()
    assert m.requests_finished_total.get("cancelled", 0) == cancelled + 1
    assert m.generation_tokens_total < 10_000  # sanity: it did not run on to 200 tokens unobserved
    assert _metric(url, 'herd_client_disconnects_total{when="while_streaming"}') >= 1


def test_health_answers_while_the_largest_stop_strings_generate(server, client):
    # The largest stop strings the server accepts, while completions decode under them.
    kw = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 200, "temperature": 0}
    plain = client.completions.create(**kw)
    text = plain.choices[0].text
    # Each one starts as the output does (a partial match at every token: all of it is held back)
    # and ends where the output never goes.
    stops = [((text * (MAX_STOP_LENGTH // max(1, len(text)) + 1))[: MAX_STOP_LENGTH - 1 - i] + "\x00" + "ab" * i)
             [:MAX_STOP_LENGTH] for i in range(MAX_STOP_STRINGS)]
    got = {}

    def generate():
        chunks = list(client.completions.create(**kw, stop=stops, stream=True))
        got["streamed"] = "".join(c.choices[0].text for c in chunks if c.choices)
        got["whole"] = client.completions.create(**kw, stop=stops)

    worker = threading.Thread(target=generate)
    latencies = []
    worker.start()
    while worker.is_alive():
        t0 = time.monotonic()
        assert httpx.get(server[0].url + "/health", timeout=30).status_code == 200
        latencies.append(time.monotonic() - t0)
        time.sleep(0.01)
    worker.join()
    assert max(latencies) < 2.0, latencies  # generous, for a loaded machine
    assert got["streamed"] == got["whole"].choices[0].text == text
    assert got["whole"].usage.completion_tokens == plain.usage.completion_tokens


# ---- connections: half-sent bodies and clients that go away, over raw sockets ------------------------------


@pytest.fixture
def gated(model, tok, caplog):
    """A server with a 1 s body timeout over an engine that steps only while `gate` is set, and
    the log records of the server and of uvicorn (whose logger does not propagate to the root)."""
    engine = Engine(model, token_bytes=tok.decode_single_token_bytes, max_batch=2, max_queue=4, max_seq_len=64)
    gate = threading.Event()
    step = engine.step
    engine.step = lambda: gate.wait() and step()
    engine.start()
    uvicorn_log = logging.getLogger("uvicorn.error")
    caplog.set_level(logging.INFO, logger="herd.serve")
    with ServerThread(build_app(engine, tok, model_name="tiny", body_timeout=1.0)) as srv:
        uvicorn_log.addHandler(caplog.handler)
        try:
            yield srv, gate, caplog
        finally:
            uvicorn_log.removeHandler(caplog.handler)
            gate.set()
    engine.stop()


def _post_head(port, length, body=b""):
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n" % length + body)
    return s


def _wait_for(url, name, value, timeout=10.0):
    deadline = time.monotonic() + timeout
    while _metric(url, name) != value and time.monotonic() < deadline:
        time.sleep(0.02)
    return _metric(url, name)


def _no_errors(records):
    bad = [r for r in records if r.levelno >= logging.WARNING or r.exc_info]
    assert not bad, [r.getMessage() for r in bad]


def test_a_stalled_body_is_answered_408_and_the_connection_closed(gated):
    srv, _, caplog = gated
    s = _post_head(srv.port, 100, b'{"prompt": "x"')  # 14 of 100 bytes, then nothing
    s.settimeout(20)
    t0, reply = time.monotonic(), b""
    while chunk := s.recv(65536):  # until the server closes
        reply += chunk
    s.close()
    assert 0.9 < time.monotonic() - t0 < 10
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408") and b"connection: close" in head.lower()
    error = json.loads(body)["error"]
    assert error["code"] == "request_timeout" and "1 s" in error["message"]
    assert _metric(srv.url, 'herd_http_responses_total{code="408"}') == 1
    assert httpx.get(srv.url + "/health").status_code == 200
    _no_errors(caplog.records)


def test_a_client_gone_mid_body_or_mid_generation_is_no_error(gated):
    srv, gate, caplog = gated
    url = srv.url
    # Headers and part of the body, then the client hangs up.
    _post_head(srv.port, 100, b'{"prompt": ').close()
    assert _wait_for(url, 'herd_client_disconnects_total{when="while_sending_the_body"}', 1) == 1
    # A whole request, then the client hangs up while its answer is generated (the gate holds the
    # engine, so the request is surely still running).
    body = json.dumps({"prompt": "Tell me everything", "max_tokens": 20}).encode()
    s = _post_head(srv.port, len(body), body)
    deadline = time.monotonic() + 10
    while _metric(url, "herd_requests_waiting") != 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    s.close()
    time.sleep(0.2)
    gate.set()  # the engine reaps the cancelled request
    assert _wait_for(url, 'herd_client_disconnects_total{when="while_generating"}', 1) == 1
    assert _wait_for(url, 'herd_choices_finished_total{reason="cancelled"}', 1) == 1
    assert _metric(url, 'herd_http_responses_total{code="500"}') == 0
    assert _metric(url, 'herd_http_responses_total{code="503"}') == 0
    assert httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200
    _no_errors(caplog.records)
    gone = [r.getMessage() for r in caplog.records if "disconnected" in r.getMessage()]
    assert len(gone) == 2 and all(r.levelno == logging.INFO for r in caplog.records if "disconnected" in r.getMessage())


def _raw(url, path, body=None, *, raw=None, key=KEY, method="POST"):
    headers = {} if key is None else {"Authorization": f"Bearer {key}"}
    if raw is not None:
        return httpx.request(method, url + path, content=raw, headers={**headers, "Content-Type": "application/json"})
    return httpx.request(method, url + path, json=body, headers=headers)


CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.mark.parametrize("path, body, raw, key, status, param", [
    ("/v1/chat/completions", None, b"{not json", KEY, 400, None),
    ("/v1/chat/completions", None, b"[" * 100_000, KEY, 400, None),  # nesting deeper than the JSON parser goes
    ("/v1/chat/completions", [1, 2], None, KEY, 400, None),
    ("/v1/chat/completions", {"model": "tiny"}, None, KEY, 400, "messages"),
    ("/v1/chat/completions", {**CHAT, "temperature": "hot"}, None, KEY, 400, "temperature"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": 0}, None, KEY, 400, "max_tokens"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": CONTEXT}, None, KEY, 400, "max_tokens"),
    ("/v1/chat/completions", {**CHAT, "n": 9}, None, KEY, 400, "n"),
    ("/v1/chat/completions", {**CHAT, "top_logprobs": 3}, None, KEY, 400, "top_logprobs"),
    ("/v1/chat/completions", {**CHAT, "frequency_penalty": 3.0}, None, KEY, 400, "frequency_penalty"),
    ("/v1/chat/completions", {**CHAT, "model": "gpt-9"}, None, KEY, 404, "model"),
    ("/v1/completions", {"model": "tiny", "prompt": "word " * 300}, None, KEY, 400, "messages"),
    ("/v1/completions", {"model": "tiny", "prompt": [1, 2, 999_999]}, None, KEY, 400, "prompt"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "echo": "yes"}, None, KEY, 400, "echo"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "stop": ["x" * 1_000_000]}, None, KEY, 400, "stop"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "stop": ["x"] * (MAX_STOP_STRINGS + 1)}, None, KEY, 400,
     "stop"),
    ("/v1/completions", {"model": "tiny", "prompt": "x"}, None, "wrong-key", 401, None),
    ("/v1/completions", {"model": "tiny", "prompt": "x"}, None, None, 401, None),
    ("/v1/models", None, None, None, 401, None),
    ("/v1/nothing", {}, None, KEY, 404, None),
])
def test_error_paths(server, path, body, raw, key, status, param):
    method = "GET" if path == "/v1/models" else "POST"
    resp = _raw(server[0].url, path, body, raw=raw, key=key, method=method)
    assert resp.status_code == status
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"] and error["type"]
    assert error["param"] == param
    assert httpx.get(server[0].url + "/health").status_code == 200  # the server survived


def test_wrong_method_and_client_exceptions(server, client):
    resp = httpx.get(server[0].url + "/v1/chat/completions")
    assert resp.status_code == 405 and "error" in resp.json()
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=0)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=[{"role": "user", "content": "x"}], max_tokens=1)
    bad = openai.OpenAI(base_url=server[0].url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_a_full_queue_answers_503_at_once(model, tok):
    engine = Engine(model, max_batch=1, max_queue=1, max_seq_len=64)  # never started: nothing leaves the queue
    engine.submit(Request([1, 2], 4))
    with ServerThread(build_app(engine, tok, model_name="tiny")) as srv:
        t0 = time.monotonic()
        resp = httpx.post(srv.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert resp.status_code == 503 and resp.json()["error"]["type"] == "unavailable_error"
        assert time.monotonic() - t0 < 5
        assert httpx.get(srv.url + "/health").status_code == 503  # the engine is not running
        assert "herd_requests_rejected_total 1" in httpx.get(srv.url + "/metrics").text
    engine.stop()


# ---- tool calls, with a model rigged to answer with one ----------------------------------------------------


@pytest.fixture(scope="module")
def tool_model(tok):
    """A bigram model that, after the assistant header's "\\n\\n", spells TOOL_REPLY and then <|eot_id|>.

    Attention and FFN outputs are zeroed, so the residual stream is the current token's embedding
    and the logits depend on the current token only; each token of the chain gets one output row
    pointing at its successor (the reply's tokens are all distinct, so the chain is unambiguous).
    """
    args = ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=128256, multiple_of=32,
                     max_seq_len=512)
    m = build_model(args, seed=0)
    chain = [tok.encode("\n\n", bos=False, eos=False)[0], *tok.encode(TOOL_REPLY, bos=False, eos=False), tok.eot_id]
    assert len(set(chain)) == len(chain)
    with torch.no_grad():
        for layer in m.layers.values():
            layer.attention.wo.weight.zero_()
            layer.feed_forward.w2.weight.zero_()
        m.output.weight.zero_()
        emb = m.tok_embeddings.weight
        for a, b in zip(chain, chain[1:]):
            m.output.weight[b] = 20 * emb[a] / emb[a].norm()
    return m.eval()


@pytest.fixture(scope="module")
def tool_client(tool_model, tok):
    engine, srv = _serve(tool_model, tok, max_batch=2, max_queue=4, max_seq_len=512)
    with srv:
        yield openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    engine.stop()


def test_tool_call_round_trip(tok, tool_client):
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = tool_client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    # Without tools the same reply is plain text.
    plain = tool_client.chat.completions.create(model="tiny", messages=messages, temperature=0)
    assert plain.choices[0].message.content == TOOL_REPLY and plain.choices[0].finish_reason == "stop"
    # Streaming: the text is held back while it may be a call, then sent as a tool_calls delta.
    chunks = list(tool_client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, temperature=0,
                                                      stream=True))
    deltas = [d for c in chunks for d in (c.choices[0].delta.tool_calls or [])]
    assert [d.function.name for d in deltas] == ["get_weather"]
    assert not "".join(c.choices[0].delta.content or "" for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # The call and its result go back in; the prompt is what our chat format makes of them.
    messages += [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                 {"role": "tool", "tool_call_id": call.id, "content": '{"temperature_c": 18}'}]
    again = tool_client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, temperature=0)
    expected = chat_prompt(ChatFormat(tok, version="3.1"), parse_chat_request({"messages": messages, "tools": TOOLS},
                                                                              max_n=2))
    assert again.usage.prompt_tokens == len(expected)
    assert again.choices[0].finish_reason == "tool_calls"


def test_oversized_body_is_refused(server):
    resp = _raw(server[0].url, "/v1/completions", raw=b" " * (8 * 2**20 + 1))
    assert resp.status_code == 413 and resp.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("stop", ["SIGINT", "SIGTERM"])
def test_herd_serve_command(model, tok, tmp_path, stop):
    # The CLI end to end: load a checkpoint, bind a free loopback port, answer, then stop cleanly on
    # Ctrl-C and on a service manager's SIGTERM alike: exit 0, with the engine stopped (the last line
    # is printed only after `serve` has stopped it).
    import signal

    import herd

    herd.save_model(model, tmp_path / "tiny", format="hf")
    args = [str(tmp_path / "tiny"), "--api-key", KEY, "--max-batch", "2", "--max-seq-len", "128"]
    with herd_serve_process(args, stop=getattr(signal, stop), startup_s=120) as (url, proc):
        c = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        assert [m.id for m in c.models.list().data] == ["tiny"]
        assert c.models.list().data[0].max_model_len == 128
        r = c.completions.create(model="tiny", prompt="Hi", max_tokens=3, temperature=0)
        assert r.usage.completion_tokens == 3
    out = proc.output
    assert proc.returncode == 0, out
    assert f"{url}/v1, 2 slots x 128 tokens" in out
    assert out.rstrip().endswith("herd serve: stopped"), out
