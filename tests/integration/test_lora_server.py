"""Multi-LoRA serving over HTTP: two adapters and the base model answered concurrently, each
equal to greedy generation with that adapter merged into the base weights."""

import copy
import threading

import httpx
import openai
import pytest
import torch

from herd.generate import GREEDY, generate
from herd.generate.adapters import load_adapters
from herd.model import ModelArgs, build_model
from herd.posttrain.lora import apply_lora, lora_parameters, save_adapter
from herd.serve import Engine
from herd.serve.server import ServerThread, build_app
from herd.tokenizer import Tokenizer, llama3_tokenizer_path
from tests.helpers import sharpened

KEY = "k"


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_file(llama3_tokenizer_path())


@pytest.fixture(scope="module")
def base():
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128256, multiple_of=32, max_seq_len=128)
    return sharpened(build_model(args, seed=3), 4.0)  # batched and single-row greedy decoding agree


@pytest.fixture(scope="module")
def adapters(base, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    paths = {}
    for name, targets, seed in (("pirate", ["wq", "wv", "w2"], 1), ("poet", ["wk", "wo", "w1", "w3"], 2)):
        m = copy.deepcopy(base)
        apply_lora(m, targets, 4, 8.0)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in lora_parameters(m):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        save_adapter(m, root / name)
        paths[name] = root / name
    return paths


@pytest.fixture(scope="module")
def served(base, tok, adapters):
    model = copy.deepcopy(base)
    aset = load_adapters(model, adapters)
    engine = Engine(model, max_batch=4, max_seq_len=128, token_bytes=tok.decode_single_token_bytes, adapters=aset)
    engine.start()
    with ServerThread(build_app(engine, tok, model_name="tiny", api_key=KEY)) as server:
        yield server, aset, engine
    engine.stop()


def test_models_lists_the_adapters_with_their_parent(served):
    server, _, _ = served
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    data = client.models.list().data
    assert [(m.id, getattr(m, "parent", None)) for m in data] == [("tiny", None), ("pirate", "tiny"), ("poet", "tiny")]


def test_unknown_model_is_a_404_naming_what_is_served(served):
    server, _, _ = served
    r = httpx.post(server.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                   json={"model": "sailor", "prompt": "Hi", "max_tokens": 2})
    assert r.status_code == 404
    err = r.json()["error"]
    assert err["code"] == "model_not_found" and err["param"] == "model" and err["type"]
    assert "'tiny', 'pirate', 'poet'" in err["message"]


def test_adapters_and_base_in_concurrent_requests(base, tok, served):
    server, aset, engine = served
    refs = {"tiny": base}
    for a in aset.adapters:
        m = copy.deepcopy(base)
        with torch.no_grad():
            for name in a.weights:
                m.get_submodule(name).weight += a.delta(name)
        refs[a.name] = m
    prompt = "The llama is"
    ids = tok.encode(prompt, bos=True, eos=False)
    want = {name: tok.decode(generate(m, [ids], max_new_tokens=8, sampling=GREEDY)[0].tokens)
            for name, m in refs.items()}
    assert len(set(want.values())) == 3  # the adapters change the answer
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    got: dict[int, tuple[str, str]] = {}
    order = ["pirate", "tiny", "poet", "poet", "pirate", "tiny"]

    def ask(i, name):
        r = client.completions.create(model=name, prompt=prompt, max_tokens=8, temperature=0)
        got[i] = (r.model, r.choices[0].text)

    threads = [threading.Thread(target=ask, args=(i, n)) for i, n in enumerate(order)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for i, name in enumerate(order):
        assert got[i] == (name, want[name]), name
    m = engine.metrics()
    assert m.decode_rows_total > m.decode_steps_total  # some decode steps really held several rows


def test_herd_generate_with_lora_equals_the_merged_model(base, tok, adapters, tmp_path, capsys):
    import herd
    from herd.cli import main
    from herd.generate.adapters import read_adapter

    herd.save_model(base, tmp_path / "hf", format="hf")
    prompt = "Llamas live in"
    assert main(["generate", str(tmp_path / "hf"), "--prompt", prompt, "--temperature", "0", "--max-new-tokens", "8",
                 "--ignore-eos", "--lora", str(adapters["poet"])]) == 0
    out = capsys.readouterr().out
    poet = read_adapter(adapters["poet"], base.args)
    ref = copy.deepcopy(base)
    with torch.no_grad():
        for name in poet.weights:
            ref.get_submodule(name).weight += poet.delta(name)
    [want] = generate(ref, [tok.encode(prompt, bos=True, eos=False)], max_new_tokens=8, sampling=GREEDY)
    [plain] = generate(base, [tok.encode(prompt, bos=True, eos=False)], max_new_tokens=8, sampling=GREEDY)
    assert out == prompt + tok.decode(want.tokens) + "\n" and want.tokens != plain.tokens


@pytest.mark.parametrize("lora, message", [
    ("x=/no/such/adapter", "adapter_config.json does not exist"),
    ("=somewhere", "--lora takes NAME=PATH"),
])
def test_herd_serve_refuses_bad_lora_flags(base, tmp_path, capsys, lora, message):
    import herd
    from herd.cli import main

    herd.save_model(base, tmp_path / "hf", format="hf")
    assert main(["serve", str(tmp_path / "hf"), "--lora", lora]) == 2
    assert message in capsys.readouterr().err
