"""Tensor-parallel inference over 2 gloo ranks equals one process (one spawned group, ~20 s).

Logits of a ragged prefill and 4 decode steps within 1e-5 for HF (tied and untied, odd
vocabulary), Meta (1 and 2 model-parallel files) and GGUF checkpoints each rank reads by slice;
greedy and seeded-sampled generations token for token; each rank's share of the weights and KV
cache. Then `herd generate --tp 2` (torchrun) prints the text `herd generate` prints.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # spawned workers import the scenarios by name

import harness  # noqa: E402
import tp_inference  # noqa: E402

from herd.cli import main  # noqa: E402
from herd.model import ModelArgs, build_model  # noqa: E402
from herd.model.formats import save_model  # noqa: E402


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return harness.spawn(tp_inference.run, 2, tmp_path_factory.mktemp("tp_infer"))


NAMES = ([f"logits {n}" for n in tp_inference.CHECKPOINTS]
         + ["greedy generate", "sampled generate (shared seed)", "shard sizes"])


@pytest.mark.parametrize("name", NAMES)
def test_tp_inference(results, name):
    assert name in results, f"scenario {name!r} did not run; ran: {sorted(results)}"
    ok, detail = results[name]
    assert ok, detail


def test_no_unexpected_scenarios(results):
    assert set(results) == set(NAMES)


@pytest.mark.slow  # three interpreters start (torchrun and two ranks): ~20 s alone, over a minute on a busy machine
def test_cli_generate_tp2_prints_what_one_process_prints(tmp_path, capsys):
    # The real Llama 3 vocabulary (the tokenizer herd falls back to), a tiny body.
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128256, multiple_of=32, max_seq_len=256)
    path = save_model(build_model(args, seed=3), tmp_path / "ck")
    argv = ["generate", str(path), "--prompt", "Llamas live in", "--temperature", "0", "--max-new-tokens", "8",
            "--ignore-eos"]
    assert main(argv) == 0
    single = capsys.readouterr().out
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.run([sys.executable, "-m", "herd", *argv, "--tp", "2"], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout == single
    assert proc.stderr.count("[8 tokens, finish: length]") == 1  # rank 0 reports; rank 1 is silent


def test_cli_tp_refuses_a_split_the_kv_heads_cannot_take(tmp_path, capsys):
    path = save_model(build_model(ModelArgs.from_name("debug"), seed=0), tmp_path / "ck")  # 2 KV heads
    assert main(["generate", str(path), "--prompt", "x", "--tp", "3"]) == 2
    err = capsys.readouterr().err
    assert "does not divide n_kv_heads=2" in err and "use --tp in [1, 2]" in err
