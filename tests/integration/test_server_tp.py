"""`herd serve --tp 2` (torchrun, two gloo ranks) answers as `herd serve` does, then stops cleanly.

The reference is the single-process server (the same checkpoint, engine sizes and chat format,
in this process), asked one request at a time. The tensor-parallel server gets the same requests
all at once, with fewer slots than requests and a small prefill chunk, so continuous admission,
chunked prefill and batched decode all run across the ranks; one later request shares a long
prefix with an earlier one (a prefix-cache hit: blocks copied into a row on every rank), one
scores its prompt (echo + logprobs: the output head over every position, on every rank).
Greedy texts must be equal. Then Ctrl-C (SIGINT to the process group, as a terminal sends it)
must stop every process, the follower by rank 0's stop message; and killing rank 0 outright must
not leave the follower behind.
"""

import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

from herd.cli import build_parser
from herd.cli.common import load
from herd.cli.inference import _serve_engine
from herd.model import ModelArgs, build_model
from herd.model.formats import save_model
from herd.serve.server import ServerThread, build_app

pytestmark = [pytest.mark.slow, pytest.mark.heavy]  # three interpreters (herd, torchrun, two ranks) start: ~30 s, more when busy

ROOT = Path(__file__).resolve().parents[2]
FLAGS = ["--max-batch", "3", "--block-size", "4", "--prefill-chunk", "8", "--max-seq-len", "128"]
SYSTEM = "You are a careful assistant who answers in one short sentence. " * 3
COMPLETIONS = [SYSTEM + "Question: what is a llama?", "Llamas live in", "The capital of France is",
               "1, 2, 3, 4, 5,", "Once upon a time there was a small"]
CHATS = ["hi", "Name three colours."]
# After the others, one at a time: a prompt that overwrites the start of row 0, where the next
# request goes, so that its cached prefix has to be copied into the row on every rank.
FLUSH = "Completely different words " * 16
LATE = SYSTEM + "Question: what is an alpaca?"


def _ck(tmp_path_factory) -> Path:
    # The Llama 3 vocabulary (the tokenizer herd falls back to), a tiny body with 2 KV heads (one
    # per rank). Rescaled as in tests/unit/serve/conftest.py so that the output depends on the
    # whole context (a random model's residual stream is mostly its last token's embedding, which
    # would hide wrong keys and values), with greedy margins wide enough that batched and one-row
    # decoding, and the ranks' split sums, which round differently, pick the same tokens.
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128256, multiple_of=32, max_seq_len=256)
    model = build_model(args, seed=3)
    with torch.no_grad():
        model.tok_embeddings.weight.mul_(0.1)
        for layer in model.layers.values():
            for w in (layer.attention.wq, layer.attention.wk, layer.attention.wo, layer.feed_forward.w2):
                w.weight.mul_(4.0)
        model.output.weight.mul_(8.0)
    return save_model(model, tmp_path_factory.mktemp("tp_serve") / "ck", format="hf")


def _bodies() -> list[tuple[str, dict]]:
    out = [("/v1/completions", {"model": "ck", "prompt": p, "max_tokens": 10, "temperature": 0, "logprobs": 1})
           for p in COMPLETIONS]
    out += [("/v1/chat/completions", {"model": "ck", "messages": [{"role": "user", "content": c}], "max_tokens": 10,
                                      "temperature": 0}) for c in CHATS]
    out.append(("/v1/completions", {"model": "ck", "prompt": "Scores of a prompt", "max_tokens": 0, "echo": True,
                                    "logprobs": 1, "temperature": 0}))
    return out


def _answer(url: str, route: str, body: dict):
    r = httpx.post(url + route, json=body, timeout=120)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    if "message" in choice:
        return choice["message"]["content"]
    lps = choice.get("logprobs")
    return choice["text"], lps["tokens"], [x if x is not None else 0.0 for x in lps["token_logprobs"]]


def _late(url: str) -> list:
    return [_answer(url, "/v1/completions", {"model": "ck", "prompt": p, "max_tokens": 10, "temperature": 0,
                                             "logprobs": 1}) for p in (FLUSH, LATE)]


def _reference(ck: Path) -> tuple[list, object]:
    opts = build_parser().parse_args(["serve", str(ck), *FLAGS])
    opts.device, opts.dtype = "cpu", None
    lm = load(opts)
    engine, _ = _serve_engine(opts, lm)
    engine.start()
    try:
        with ServerThread(build_app(engine, lm.tokenizer, model_name="ck", chat=lm.chat)) as srv:
            answers = [_answer(srv.url, route, body) for route, body in _bodies()]
            late = _late(srv.url)
    finally:
        engine.stop()
    return answers, late


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(ck: Path, log: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "herd", "serve", str(ck), "--tp", "2", "--port", str(port), *FLAGS],
                            stdout=subprocess.DEVNULL, stderr=log.open("w"), env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"herd serve --tp 2 exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError(f"herd serve --tp 2 did not come up:\n{log.read_text()[-3000:]}")


def _exited(proc: subprocess.Popen, timeout: float) -> bool:
    """Whether `herd serve --tp` exited within `timeout` seconds: it waits for torchrun, which waits
    for its ranks (and SIGKILLs them 30 s after asking them to stop)."""
    try:
        proc.wait(timeout)
        return True
    except subprocess.TimeoutExpired:
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def _rank0_pid(log: Path) -> int:
    return int(log.read_text().split("(rank 0: pid ")[1].split(")")[0])


def _kill_all(proc: subprocess.Popen, log: Path) -> None:
    """Clean up after a failed test: the launcher's session and torchrun's (its own)."""
    for pid in (proc.pid, os.getpgid(_rank0_pid(log)) if _alive(_rank0_pid(log)) else None):
        if pid is not None:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"no {name} in /metrics")


def test_tp2_server_answers_as_one_process_and_stops_cleanly(tmp_path_factory, tmp_path):
    ck = _ck(tmp_path_factory)
    want, want_late = _reference(ck)
    log = tmp_path / "serve.log"
    proc, url = _start(ck, log)
    try:
        with ThreadPoolExecutor(len(want)) as pool:  # all at once: 3 slots, 8 requests
            got = list(pool.map(lambda rb: _answer(url, *rb), _bodies()))
        hits_before = _metric(url, "herd_prefix_cache_hits_total")
        late = _late(url)
        hits = _metric(url, "herd_prefix_cache_hits_total") - hits_before
    finally:
        rank0 = _rank0_pid(log)
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in a terminal
        stopped = _exited(proc, 90)
        if not stopped:
            _kill_all(proc, log)
    text = log.read_text()
    for a, b in zip([*got, *late], [*want, *want_late], strict=True):
        if isinstance(b, str):  # a chat reply
            assert a == b
        else:  # (text, tokens, logprobs): greedy text exactly, logprobs up to the ranks' rounding
            assert a[:2] == b[:2]
            assert a[2] == pytest.approx(b[2], abs=1e-3)
    assert hits >= 32  # the shared system prompt's whole blocks (it is longer than 32 tokens)
    assert "tensor-parallel over 2 ranks" in text
    assert stopped and not _alive(rank0), f"processes left after SIGINT:\n{text[-3000:]}"
    assert "rank 1 stopped by rank 0" in text, text[-3000:]  # by the stop message, not torn down


def test_killing_rank0_takes_the_follower_down(tmp_path_factory, tmp_path):
    ck = _ck(tmp_path_factory)
    log = tmp_path / "serve.log"
    proc, url = _start(ck, log)
    try:
        os.kill(_rank0_pid(log), signal.SIGKILL)
        gone = _exited(proc, 90)  # torchrun sees rank 0 fail and stops rank 1
    finally:
        if proc.poll() is None:
            _kill_all(proc, log)
    assert gone, log.read_text()[-3000:]
    assert proc.returncode != 0


def test_serve_tp_refuses_what_it_cannot_do_yet(tmp_path, capsys):
    from herd.cli import main

    for flags, msg in ((["--lora", "x=y"], "--lora is not supported with --tp"),
                       (["--compile"], "--compile is not supported with --tp")):
        assert main(["serve", str(tmp_path), "--tp", "2", *flags]) == 2
        assert msg in capsys.readouterr().err
