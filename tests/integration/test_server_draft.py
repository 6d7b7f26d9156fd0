"""`herd serve --draft`: speculative decoding behind the OpenAI API. Greedy completions equal the
model's own greedy output, sampled ones complete, /metrics counts drafted and accepted tokens."""

import httpx
import openai
import pytest

import herd
from herd.cli import main
from herd.generate import GREEDY, generate
from herd.model import ModelArgs
from herd.serve import Engine
from herd.serve.server import ServerThread, build_app
from herd.tokenizer import Tokenizer, llama3_tokenizer_path
from tests.helpers import herd_serve_process, target_and_draft

ARGS = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128256, multiple_of=32, max_seq_len=256)


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_file(llama3_tokenizer_path())


@pytest.fixture(scope="module")
def models():
    """A target and a one-layer draft sharing its embeddings, first block and head."""
    return target_and_draft(ARGS)


@pytest.fixture(scope="module")
def served(models, tok):
    target, draft = models
    engine = Engine(target, max_batch=4, max_seq_len=128, token_bytes=tok.decode_single_token_bytes, draft=draft,
                    num_draft=3)
    engine.start()
    with ServerThread(build_app(engine, tok, model_name="tiny")) as srv:
        yield srv, openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=120)
    engine.stop()


def test_greedy_completions_equal_the_models_greedy_output(models, tok, served):
    target, _ = models
    srv, client = served
    for prompt in ("Llamas live in", "The quick brown fox jumps over"):
        r = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
        ids = tok.encode(prompt, bos=True, eos=False)
        want = generate(target, [ids], max_new_tokens=12, sampling=GREEDY, stop_tokens=tok.stop_tokens)[0]
        assert r.choices[0].text == tok.decode(want.tokens)
    sampled = client.completions.create(model="tiny", prompt="Once", max_tokens=8, temperature=0.9, seed=3, n=2)
    assert all(c.finish_reason in ("length", "stop") for c in sampled.choices)
    assert sampled.usage.completion_tokens > 0
    metrics = httpx.get(srv.url + "/metrics", timeout=30).text
    values = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines()
              if line.startswith("herd_spec_")}
    drafted, accepted = values["herd_spec_draft_tokens_total"], values["herd_spec_accepted_tokens_total"]
    assert drafted > 0 and 0 <= accepted <= drafted


def test_herd_serve_draft_command(models, tmp_path):
    target, draft = models
    herd.save_model(target, tmp_path / "target", format="hf")
    herd.save_model(draft, tmp_path / "draft", format="hf")
    # Refused before anything loads: exit status 2 and a one-line reason.
    assert main(["serve", str(tmp_path / "target"), "--draft", str(tmp_path / "draft"), "--compile"]) == 2
    assert main(["serve", str(tmp_path / "target"), "--draft-k", "2"]) == 2
    args = [str(tmp_path / "target"), "--max-batch", "2", "--max-seq-len", "128", "--draft", str(tmp_path / "target"),
            "--draft-k", "2"]
    with herd_serve_process(args) as (url, proc):
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)
        r = c.completions.create(model="target", prompt="Hi", max_tokens=7, temperature=0)
        assert r.usage.completion_tokens == 7
        metrics = httpx.get(url + "/metrics", timeout=30).text
        # The model as its own draft: every proposed token is accepted.
        drafted = [line for line in metrics.splitlines() if line.startswith("herd_spec_draft_tokens_total")]
        accepted = [line for line in metrics.splitlines() if line.startswith("herd_spec_accepted_tokens_total")]
        assert float(drafted[0].split()[1]) > 0 and drafted[0].split()[1] == accepted[0].split()[1]
    out = proc.output
    assert proc.returncode == 0 and "speculative decoding with draft" in out and "k=2" in out
