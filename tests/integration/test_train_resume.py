"""A run killed with SIGKILL and restarted with the same command continues bit for bit.

`herd train` runs in a subprocess over real token shards; it is killed (kill -9) once in the
pretraining stage and once in the annealing stage (which reads another data mix), each time
wherever it happens to be (mid-step, mid-checkpoint-write), and restarted. The logged losses of
every step, the validation losses and the final weights must equal an uninterrupted run's exactly.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from herd.data.shards import ShardWriter
from herd.model import ModelArgs, build_model
from herd.train import Trainer, load_config
from herd.train.checkpoint import load_model_weights

ROOT = Path(__file__).resolve().parents[2]


def write_shards(path, *, docs, seed):
    rng = random.Random(seed)
    words = "the llama eats grass and hay in the high mountains while the alpaca sleeps".split()
    with ShardWriter(path, vocab_size=512, bos=256, eos=257) as w:
        for _ in range(docs):
            text = " ".join(rng.choice(words) for _ in range(rng.randint(5, 40)))
            w.add([256, *text.encode(), 257])
    return path


def config_text(tmp_path, out):
    train = write_shards(tmp_path / "train", docs=300, seed=0)
    hq = write_shards(tmp_path / "hq", docs=60, seed=1)
    val = write_shards(tmp_path / "val", docs=30, seed=2)
    return f"""
[job]
out_dir = "{out}"
device = "cpu"
[model]
vocab_size = 512
[data]
train = ["{train}"]
val = ["{val}"]
[train]
micro_batch_tokens = 256
[optim]
lr = 3e-3
[schedule]
warmup_steps = 3
[checkpoint]
every = 3
keep_last = 2
[metrics]
log_every = 1
val_every = 4
val_batches = 1
tensorboard = false
plot = false
progress = false
[[stages]]
name = "pretrain"
steps = 12
ramp = [[0, 512, 64], [4000, 1024, 128]]
[[stages]]
name = "anneal"
steps = 8
ramp = [[0, 512, 128]]
lr = "linear_to_zero"
train = ["{hq}", "{train}"]
weights = [0.7, 0.3]
checkpoint_every = 2
average_last = 2
"""


def records(out):
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    recs = []
    for line in path.read_text().splitlines():
        try:
            recs.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # the line being written right now
    return recs


def last_step(out):
    return max((r["step"] for r in records(out) if "loss" in r), default=0)


def start(config):
    # One thread: the reference run in this process uses one too (bitwise equality needs the same
    # reduction order), and a busy shared machine runs tiny models far faster that way.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "herd", "train", str(config)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def kill_after(config, out, step, timeout=300):
    proc = start(config)
    deadline = time.time() + timeout
    while last_step(out) < step:
        if proc.poll() is not None:
            pytest.fail(f"herd train exited ({proc.returncode}) before step {step}:\n{proc.stdout.read()}")
        if time.time() > deadline:
            proc.kill()
            pytest.fail(f"no step {step} within {timeout} s")
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return proc.stdout.read()


def test_kill_9_and_restart_reproduces_the_uninterrupted_run(tmp_path):
    ref_out, run_out = tmp_path / "ref", tmp_path / "run"
    text = config_text(tmp_path, "OUT")
    (tmp_path / "ref.toml").write_text(text.replace("OUT", str(ref_out)))
    config = tmp_path / "run.toml"
    config.write_text(text.replace("OUT", str(run_out)))

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        Trainer(load_config(tmp_path / "ref.toml")).fit()
    finally:
        torch.set_num_threads(threads)

    kill_after(config, run_out, 5)  # in pretraining (the checkpoint at step 3 is the resume point)
    log = kill_after(config, run_out, 15)  # in annealing, after its first checkpoint
    assert "resumed from" in log
    proc = start(config)
    final_log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, final_log
    assert "resumed from" in final_log

    ref, run = records(ref_out), records(run_out)
    assert [r["step"] for r in run if "loss" in r] == list(range(1, 21))
    assert [(r["step"], r["loss"]) for r in run if "loss" in r] == [(r["step"], r["loss"]) for r in ref if "loss" in r]
    assert [(r["step"], r["val_loss"]) for r in run if "val_loss" in r] == [
        (r["step"], r["val_loss"]) for r in ref if "val_loss" in r]
    args = ModelArgs.from_name("debug", vocab_size=512)
    a, b = build_model(args, init=False), build_model(args, init=False)
    load_model_weights(ref_out / "checkpoints" / "step-00000020", a)
    load_model_weights(run_out / "checkpoints" / "step-00000020", b)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name
