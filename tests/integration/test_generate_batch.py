"""`herd generate --input/--output` on a tiny checkpoint with the real Llama 3 vocabulary: against the
library one prompt at a time, resumed after a kill, and split over worker processes."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import herd
from herd.cli import main
from herd.generate import GREEDY, generate
from herd.model import ModelArgs, build_model
from herd.serve.batch_io import read_results
from herd.tokenizer import ChatFormat, Message, Tokenizer, llama3_tokenizer_path

PROMPTS = ["Llamas live in", "The capital of France is", "Once upon a time", "1, 2, 3,", "Why is the sky blue?",
           "herd of llamas", "Hello", "The quick brown fox"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128256, multiple_of=32, max_seq_len=256)
    model = build_model(args, seed=3)
    with torch.no_grad():  # a sharper head: batched and single-row decoding (rounding differently) agree
        model.output.weight.mul_(4.0)
    path = tmp_path_factory.mktemp("batch") / "hf"
    herd.save_model(model.eval(), path, format="hf")
    return path, model.eval()


@pytest.fixture(autouse=True)
def _one_thread_and_no_kernel_build(monkeypatch):
    # The compiled CPU kernels are not what is tested here, and their shared build folder is rebuilt
    # whenever another checkout of herd loaded them last (the build command names the source path).
    monkeypatch.setenv("HERD_CPU_KERNELS", "0")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: a second thread only adds contention on a busy 2-core box
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_file(llama3_tokenizer_path())


def _input(tmp_path, n=len(PROMPTS), name="in.jsonl", **extra):
    path = tmp_path / name
    path.write_text("".join(json.dumps({"id": f"q{i}", "prompt": PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS)),
                                        **extra}) + "\n" for i in range(n)))
    return path


def _records(path):
    records = read_results(path)[0]
    assert len(records) == len({r["id"] for r in records}), "an id was written twice"
    return {r["id"]: r for r in records}


def test_batch_greedy_equals_the_library_and_a_rerun_resumes(ckpt, tok, tmp_path, capsys):
    path, model = ckpt
    src, out = _input(tmp_path), tmp_path / "out.jsonl"
    argv = ["generate", str(path), "--input", str(src), "--output", str(out), "--temperature", "0",
            "--max-new-tokens", "10", "--max-batch", "3"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["finished"] == summary["requests"] == len(PROMPTS) and summary["skipped_lines"] == 0
    got = _records(out)
    for i, p in enumerate(PROMPTS):
        [want] = generate(model, [tok.encode(p, bos=True, eos=False)], max_new_tokens=10, sampling=GREEDY,
                          stop_tokens=tok.stop_tokens)
        assert got[f"q{i}"]["choices"][0]["text"] == tok.decode(want.tokens)
        assert got[f"q{i}"]["choices"][0]["finish_reason"] == want.finish_reason
    assert main(argv) == 0  # everything is there already
    again = json.loads(capsys.readouterr().out)
    assert again["finished"] == 0 and again["already_done"] == len(PROMPTS)
    assert _records(out) == got


def test_bad_input_is_a_clear_error(ckpt, tmp_path, capsys):
    path, _ = ckpt
    src = tmp_path / "bad.jsonl"
    src.write_text('{"id": 1, "prompt": "ok"}\n{"id": 1, "prompt": "again"}\n')
    common = ["generate", str(path), "--output", str(tmp_path / "o.jsonl"), "--max-new-tokens", "2"]
    assert main([*common, "--input", str(src), "--strict"]) == 2
    assert f"{src}:2: duplicate id 1 (first on line 1)" in capsys.readouterr().err
    assert main([*common, "--input", str(src)]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["skipped_lines"] == 1 and "skipped" in out.err
    assert main([*common, "--input", str(tmp_path / "missing.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["generate", str(path), "--input", str(src)]) == 2
    assert "--output" in capsys.readouterr().err
    assert main([*common, "--input", str(src), "--n", "9"]) == 2
    assert "--n" in capsys.readouterr().err
    assert main([*common, "--input", str(src), "--system", "Be brief."]) == 2
    assert "--chat" in capsys.readouterr().err


def test_chat_wraps_prompt_lines_as_a_user_turn(ckpt, tok, tmp_path, capsys):
    path, model = ckpt
    src, out = _input(tmp_path, n=2), tmp_path / "out.jsonl"
    assert main(["generate", str(path), "--input", str(src), "--output", str(out), "--chat", "--system", "Be brief.",
                 "--temperature", "0", "--max-new-tokens", "6"]) == 0
    capsys.readouterr()
    fmt = ChatFormat(tok, version="3.1")
    for i in range(2):
        ids = fmt.encode_dialog_prompt([Message("system", "Be brief."), Message("user", PROMPTS[i])]).tokens
        [want] = generate(model, [ids], max_new_tokens=6, sampling=GREEDY, stop_tokens=tok.stop_tokens)
        rec = _records(out)[f"q{i}"]
        assert rec["prompt_tokens"] == len(ids) and rec["choices"][0]["text"] == tok.decode(want.tokens)


# top-k keeps sampling cheap on a 128K vocabulary (top-p alone sorts it at every step).
SAMPLED = ["--temperature", "1.0", "--top-k", "40", "--seed", "11", "--max-new-tokens", "16", "--n", "2"]


@pytest.mark.slow  # three runs, one a subprocess: ~30 s alone on 2 cores, minutes when they are busy
def test_killed_midway_then_restarted_gives_the_uninterrupted_output(ckpt, tmp_path, capsys):
    path, _ = ckpt
    src = _input(tmp_path, n=16)
    assert main(["generate", str(path), "--input", str(src), "--output", str(tmp_path / "whole.jsonl"), *SAMPLED]) == 0
    capsys.readouterr()
    want = _records(tmp_path / "whole.jsonl")
    out = tmp_path / "killed.jsonl"
    cmd = [sys.executable, "-m", "herd", "generate", str(path), "--input", str(src), "--output", str(out),
           "--max-batch", "2", *SAMPLED]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HERD_CPU_KERNELS": "0"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if out.exists() and out.read_bytes().count(b"\n") >= 3:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait(30)
    killed = len(read_results(out)[0])
    assert 3 <= killed < 16, "the run was not killed midway"
    assert main(["generate", str(path), "--input", str(src), "--output", str(out), *SAMPLED]) == 0
    assert json.loads(capsys.readouterr().out)["already_done"] == killed
    assert _records(out) == want


@pytest.mark.slow  # spawns two workers that import torch and load the model
def test_nproc_workers_merge_into_the_single_process_output(ckpt, tmp_path, capsys):
    path, _ = ckpt
    src = _input(tmp_path, n=10)
    args = ["generate", str(path), "--input", str(src), *SAMPLED]
    assert main([*args, "--output", str(tmp_path / "one.jsonl")]) == 0
    assert main([*args, "--output", str(tmp_path / "two.jsonl"), "--nproc", "2"]) == 0
    summaries = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert summaries[1]["finished"] == summaries[1]["requests"] == 10
    assert not list(tmp_path.glob("two.jsonl.part*"))
    assert [r["id"] for r in read_results(tmp_path / "two.jsonl")[0]] == [f"q{i}" for i in range(10)]
    assert _records(tmp_path / "two.jsonl") == _records(tmp_path / "one.jsonl")
