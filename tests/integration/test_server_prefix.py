"""The prefix cache seen through the server: two completions sharing a long prompt, then /metrics."""

import httpx
import pytest

from herd.model import ModelArgs, build_model
from herd.serve import Engine
from herd.serve.server import ServerThread, build_app
from herd.tokenizer import Tokenizer, llama3_tokenizer_path


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_file(llama3_tokenizer_path())


def _metrics(url: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith("herd_") and "{" not in line:
            name, value = line.split()
            out[name] = float(value)
    return out


def test_metrics_show_prefix_hits_and_free_blocks(tok):
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128256, multiple_of=32, max_seq_len=256)
    model = build_model(args, seed=3).eval()
    engine = Engine(model, max_batch=2, max_seq_len=256, block_size=16, num_blocks=40,
                    token_bytes=tok.decode_single_token_bytes)
    engine.start()
    system = "You are a careful assistant who answers in one short sentence. " * 6
    try:
        with ServerThread(build_app(engine, tok, model_name="tiny")) as srv:
            m0 = _metrics(srv.url)
            assert m0["herd_kv_blocks_total"] == 40 and m0["herd_kv_blocks_free"] == 40
            prompts = [system + "Question: what is a llama?", system + "Question: what is an alpaca?"]
            for prompt in prompts:
                body = {"model": "tiny", "prompt": prompt, "max_tokens": 3, "temperature": 0}
                assert httpx.post(srv.url + "/v1/completions", json=body, timeout=60).status_code == 200
            m = _metrics(srv.url)
    finally:
        engine.stop()
    a, b = (tok.encode(p, bos=tok.add_bos, eos=False) for p in prompts)  # as the server encodes them
    shared = 0
    while a[shared] == b[shared]:
        shared += 1
    hits = min(shared, len(b) - 1) // 16 * 16  # the second prompt finds the whole blocks of the shared prefix
    assert hits >= 64
    assert m["herd_prefix_cache_queries_total"] == len(a) + len(b)
    assert m["herd_prefix_cache_hits_total"] == hits
    assert m["herd_prefill_tokens_total"] == m["herd_prefix_cache_queries_total"] - hits
    assert m["herd_prefix_cache_hit_rate"] == pytest.approx(hits / m["herd_prefix_cache_queries_total"])
    assert m["herd_kv_blocks_free"] == 40  # everything released; cached blocks count as free


@pytest.mark.parametrize("flag", ["--kv-blocks", "--block-size", "--prefill-chunk"])
def test_serve_refuses_bad_cache_flags_before_loading(flag, capsys, tmp_path):
    from herd.cli import main

    assert main(["serve", str(tmp_path / "no-such-model"), flag, "0"]) == 2  # the flag, not the missing path
    assert f"{flag} must be at least 1" in capsys.readouterr().err
