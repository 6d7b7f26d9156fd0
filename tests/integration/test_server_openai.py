"""The OpenAI/vLLM surface beyond plain generation, over HTTP: sampling fields, echo with prompt
logprobs, /v1/models/{id}, /tokenize, /detokenize, latency histograms; each checked against the
model computed directly or a value worked out by hand."""

import httpx
import openai
import pytest
import torch

from herd.tokenizer import ChatFormat, Message, Tokenizer, llama3_tokenizer_path
from tests.helpers import real_vocab_model, served

KEY = "test-key"
CONTEXT = 128
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_file(llama3_tokenizer_path())


@pytest.fixture(scope="module")
def model():
    """Random, with the real vocabulary (as in test_server.py); a soft head, so penalties change paths."""
    return real_vocab_model(seed=5, context=CONTEXT)


@pytest.fixture(scope="module")
def server(model, tok):
    with served(model, tok, max_seq_len=CONTEXT, api_key=KEY) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def _lsm(model, ids):
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).float(), dim=-1)[0]  # (S, V)


def _post(server, path, body, headers=AUTH):
    return httpx.post(server.url + path, json=body, headers=headers, timeout=60)


def test_model_by_id(server, client):
    m = client.models.retrieve("tiny")
    assert m.id == "tiny" and m.object == "model" and m.max_model_len == CONTEXT
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-9")
    r = httpx.get(server.url + "/v1/models/gpt-9", headers=AUTH)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert httpx.get(server.url + "/v1/models/tiny").status_code == 401


def test_tokenize_and_detokenize(server, tok):
    r = _post(server, "/tokenize", {"model": "tiny", "prompt": "Hello llamas"}).json()
    ids = tok.encode("Hello llamas", bos=True, eos=False)
    assert r == {"count": len(ids), "max_model_len": CONTEXT, "tokens": ids}
    chat = _post(server, "/tokenize", {"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["tokens"] == ChatFormat(tok, version="3.1").encode_dialog_prompt([Message("user", "hi")]).tokens
    assert _post(server, "/detokenize", {"tokens": ids[1:]}).json() == {"prompt": "Hello llamas"}
    bad = _post(server, "/detokenize", {"tokens": [-4]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    assert _post(server, "/tokenize", {"prompt": "x"}, headers={}).status_code == 401
    info = httpx.get(server.url + "/tokenizer_info", headers=AUTH).json()
    assert info["bos_token"] == "<|begin_of_text|>" and info["eos_token"] == "<|end_of_text|>"


def _greedy_reference(model, prompt, steps, rule):
    seq = list(prompt)
    for _ in range(steps):
        with torch.no_grad():
            logits = model(torch.tensor([seq]))[0, -1].float()
        seq.append(int(rule(logits, seq).argmax()))
    return seq[len(prompt):]


def test_sampling_fields_end_to_end(model, tok, client):
    prompt = tok.encode("The llama", bos=True, eos=False)
    base = dict(model="tiny", prompt=prompt, max_tokens=5, temperature=0)
    forced = client.completions.create(**base, logit_bias={"1234": 100})
    assert forced.usage.completion_tokens == 5 and forced.choices[0].text == tok.decode([1234] * 5)

    def ctrl(logits, seq):  # CTRL's rule over prompt + output, written out
        out = logits.clone()
        for t in set(seq):
            out[t] = out[t] / 0.2 if out[t] > 0 else out[t] * 0.2  # < 1 favours repeats
        return out

    def openai_rule(logits, seq):
        out, gen = logits.clone(), seq[len(prompt):]
        for t in set(gen):
            out[t] -= gen.count(t) * -2.0 + -2.0  # negative: favour repeats, which this model avoids
        return out

    plain = client.completions.create(**base, logprobs=0).choices[0].logprobs.tokens
    for extra, rule in (({"extra_body": {"repetition_penalty": 0.2}}, ctrl),
                        ({"frequency_penalty": -2.0, "presence_penalty": -2.0}, openai_rule)):
        r = client.completions.create(**base, logprobs=0, **extra)
        want = _greedy_reference(model, prompt, 5, rule)
        assert r.choices[0].logprobs.tokens == [tok.decode_single_token_bytes(t).decode() for t in want], extra
        assert r.choices[0].logprobs.tokens != plain, extra  # the penalty changed the path
    # top_k 1 and min_p 1 keep only the most likely token: sampling at temperature 1 is then greedy.
    for extra in ({"top_k": 1}, {"min_p": 1.0}):
        r = client.completions.create(**{**base, "temperature": 1.0}, seed=7, logprobs=0, extra_body=extra)
        assert r.choices[0].logprobs.tokens == plain, extra
    with pytest.raises(openai.BadRequestError, match="logit_bias"):
        client.completions.create(**base, logit_bias={"999999": 1})
    with pytest.raises(openai.BadRequestError, match="frequency_penalty"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], frequency_penalty=3)


def test_ignore_eos_generates_through_end_of_turn(tok, client):
    # logit_bias makes <|eot_id|> the greedy token at every step: the chat ends at once, unless
    # ignore_eos keeps it going to max_tokens (llama.cpp's and vLLM's field, for fixed-length runs).
    base = dict(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0,
                logit_bias={str(tok.eot_id): 100})
    stopped = client.chat.completions.create(**base)
    assert stopped.usage.completion_tokens == 0 and stopped.choices[0].finish_reason == "stop"
    kept = client.chat.completions.create(**base, extra_body={"ignore_eos": True})
    assert kept.usage.completion_tokens == 4 and kept.choices[0].finish_reason == "length"
    assert kept.choices[0].message.content == ""  # special tokens stay out of the text


def test_echo_with_logprobs_scores_the_prompt(model, tok, client):
    ids = tok.encode("Llamas hum when they are curious", bos=True, eos=False)
    r = client.completions.create(model="tiny", prompt=ids, max_tokens=0, echo=True, logprobs=2, temperature=0)
    c = r.choices[0]
    lsm = _lsm(model, ids)
    assert c.finish_reason == "length" and r.usage.completion_tokens == 0 and r.usage.prompt_tokens == len(ids)
    assert c.logprobs.tokens == [tok.decode_single_token_bytes(t).decode() for t in ids]
    assert c.logprobs.token_logprobs[0] is None and c.logprobs.top_logprobs[0] is None
    want = [lsm[i - 1, ids[i]].item() for i in range(1, len(ids))]
    torch.testing.assert_close(torch.tensor(c.logprobs.token_logprobs[1:]), torch.tensor(want), atol=1e-4, rtol=0)
    for i, top in enumerate(c.logprobs.top_logprobs[1:], start=1):
        assert len(top) == 2 and max(top.values()) == pytest.approx(lsm[i - 1].max().item(), abs=1e-4)
    assert c.text == tok.decode(ids[1:])  # the echo leaves out special tokens, as generated text does

    # With a completion: the prompt's entries, then the generated ones, offsets running on.
    text_prompt = "Llamas hum"
    g = client.completions.create(model="tiny", prompt=text_prompt, max_tokens=3, echo=True, logprobs=1,
                                  temperature=0)
    plain = client.completions.create(model="tiny", prompt=text_prompt, max_tokens=3, logprobs=1, temperature=0)
    n_prompt = len(tok.encode(text_prompt, bos=True, eos=False))
    lp = g.choices[0].logprobs
    assert g.choices[0].text == text_prompt + plain.choices[0].text
    assert len(lp.tokens) == n_prompt + 3 and lp.tokens[n_prompt:] == plain.choices[0].logprobs.tokens
    assert lp.token_logprobs[n_prompt:] == plain.choices[0].logprobs.token_logprobs
    text = g.choices[0].text  # each token's text sits at its offset (BOS, left out of the text, takes none)
    assert lp.tokens[0] == "<|begin_of_text|>" and lp.text_offset[:2] == [0, 0]
    assert all(text[o : o + len(t)] == t for o, t in zip(lp.text_offset[1:], lp.tokens[1:]))

    # Streamed: the echo comes first, and the chunks add up to the same text.
    chunks = list(client.completions.create(model="tiny", prompt=text_prompt, max_tokens=3, echo=True,
                                            temperature=0, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == g.choices[0].text
    assert chunks[0].choices[0].text.startswith(text_prompt)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=0)


def _samples(url, name):
    """name{labels} -> value for every sample of a metric family in /metrics."""
    out = {}
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def test_latency_histograms_count_every_request_and_gap(server, client):
    before = {n: _samples(server.url, n) for n in ("herd_time_to_first_token_seconds", "herd_inter_token_latency_seconds",
                                                   "herd_request_seconds")}
    r = client.completions.create(model="tiny", prompt="a", max_tokens=6, temperature=0)
    after = {n: _samples(server.url, n) for n in before}

    def delta(name, series):
        return after[name][series] - before[name].get(series, 0.0)

    assert delta("herd_time_to_first_token_seconds", "herd_time_to_first_token_seconds_count") == 1
    assert delta("herd_request_seconds", "herd_request_seconds_count") == 1
    # One gap per token after the first (a stop token ends the choice without being a token).
    assert delta("herd_inter_token_latency_seconds", "herd_inter_token_latency_seconds_count") == \
        r.usage.completion_tokens - 1
    for name in before:  # cumulative buckets: non-decreasing, +Inf equals the count
        buckets = [v for k, v in after[name].items() if k.startswith(name + "_bucket")]
        assert buckets == sorted(buckets) and buckets[-1] == after[name][name + "_count"]
    assert any(k.startswith("herd_generation_tokens_total") for k in _samples(server.url, "herd_generation_tokens"))
