"""Asynchronous checkpoint writes (Checkpointer.save_async, checkpoint.async_save): the files equal a
synchronous save's byte for byte, training's later changes never reach a pending write, one write
at a time, a background failure surfaces on the training thread, and a kill -9 in the middle of a
background write resumes from the previous checkpoint exactly like an uninterrupted run."""

import dataclasses
import json
import pickle
import random
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from herd.data.shards import ShardWriter
from herd.model import ModelArgs, build_model
from herd.train import Trainer
from herd.train.checkpoint import COMPLETE, Checkpointer, CheckpointVerifyError, load, stage_state
from herd.train.config import config_from_dict

ARGS = ModelArgs.from_name("debug")
ROOT = Path(__file__).resolve().parents[3]


def _trained_state():
    """A model and an AdamW state after one step (real optimizer tensors), plus non-tensor values."""
    model = build_model(ARGS, seed=3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(0, ARGS.vocab_size, (1, 8))).sum().backward()
    opt.step()
    state = {"model": model.state_dict(), "optim": opt.state_dict()["state"],
             "train": {"step": 7, "blob": b"\x00loader"}}
    return model, state


def _meta():
    return {"stage": "pretrain", "model_args": dataclasses.asdict(ARGS)}


def test_async_files_equal_a_sync_save_byte_for_byte(tmp_path):
    _, state = _trained_state()
    sync = Checkpointer(tmp_path / "sync", keep_last=2).save(state, step=7, meta=_meta())
    ck = Checkpointer(tmp_path / "async", keep_last=2, async_writes=True, verify_writes=True)
    path = ck.save_async(state, step=7, meta=_meta())
    ck.wait()
    names = sorted(p.name for p in sync.path.iterdir())
    assert names == sorted(p.name for p in path.iterdir()) and COMPLETE in names
    for name in names:
        if name.endswith(".distcp"):  # the tensors and blobs
            assert (sync.path / name).read_bytes() == (path / name).read_bytes(), name
    # DCP's .metadata also holds each save's own id and temporary path (two sync saves differ there
    # too); everything else in it, the index of every tensor and blob, must be the same.
    a, b = (pickle.loads((p / ".metadata").read_bytes()) for p in (sync.path, path))
    assert (a.state_dict_metadata, a.planner_data, a.storage_data) == (b.state_dict_metadata, b.planner_data,
                                                                       b.storage_data)
    assert a.storage_meta.save_id != b.storage_meta.save_id
    crcs = [{k: v for k, v in json.loads((p / COMPLETE).read_text())["files"].items() if k.endswith(".distcp")}
            for p in (sync.path, path)]
    assert crcs[0] == crcs[1] and crcs[0]


def test_training_after_save_async_returns_never_reaches_the_checkpoint(tmp_path):
    model, state = _trained_state()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    release = threading.Event()
    ck = Checkpointer(tmp_path, keep_last=2, async_writes=True,
                      before_commit=lambda tmp, step: release.wait(30))  # hold the write open
    path = ck.save_async(state, step=1, meta=_meta())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # the next optimizer steps, in place, while the write is pending
    assert ck.pending and not path.exists()
    release.set()
    ck.wait()
    back = {"model": build_model(ARGS, seed=9).state_dict()}
    load(path, back)
    assert all(torch.equal(back["model"][k], before[k]) for k in before)


def test_stage_state_copies_tensors_and_keeps_the_rest():
    t = torch.arange(6.0).view(2, 3)[:, 1]  # a view: the copy holds its values only
    staged = stage_state({"a": [t, 3], "b": (b"x", "s")})
    assert torch.equal(staged["a"][0], t) and staged["a"][0].data_ptr() != t.data_ptr()
    assert staged["a"][1] == 3 and staged["b"] == (b"x", "s")


def test_one_write_at_a_time_and_each_later_call_waits(tmp_path):
    _, state = _trained_state()
    seen = []
    ck = Checkpointer(tmp_path, keep_last=5, async_writes=True,
                      before_commit=lambda tmp, step: seen.append((step, sorted(p.name for p in tmp.parent.iterdir()
                                                                                if p.name.startswith("step-")))))
    ck.save_async(state, step=1, meta=_meta())
    ck.save_async(state, step=2, meta=_meta())  # waits for step 1 before staging
    ck.wait()
    assert seen[0] == (1, []) and seen[1] == (2, ["step-00000001"])
    ck.save(state, step=3, meta=_meta())  # a synchronous save waits too
    assert ck.latest().step == 3 and not ck.pending


def test_a_background_failure_is_raised_on_the_training_thread(tmp_path):
    _, state = _trained_state()

    def corrupt(path, step):  # the storage returns other bytes than were written
        f = max((p for p in path.iterdir() if p.name != COMPLETE), key=lambda p: p.stat().st_size)
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0x01
        f.write_bytes(bytes(data))

    ck = Checkpointer(tmp_path, keep_last=2, async_writes=True, verify_writes=True, on_written=corrupt)
    ck.save_async(state, step=4, meta=_meta())
    with pytest.raises(CheckpointVerifyError, match="step-00000004 failed its check"):
        ck.wait()
    ck.wait()  # raised once
    assert ck.latest() is None and any(p.name.startswith("step-00000004.bad-") for p in tmp_path.iterdir())


def test_save_async_needs_an_async_checkpointer(tmp_path):
    with pytest.raises(ValueError, match="async_writes=True"):
        Checkpointer(tmp_path, keep_last=1).save_async({}, step=1, meta={})


# ---- a kill -9 during a background write, through the Trainer -------------------------------------

STEPS = 10


def _cfg(data: Path, out: Path, *, async_save: bool):
    return {
        "job": {"out_dir": str(out), "device": "cpu", "seed": 0},
        "model": {"preset": "debug", "vocab_size": 512},
        "data": {"train": [str(data)]},
        "optim": {"lr": 3e-3},
        "schedule": {"warmup_steps": 2},
        "checkpoint": {"every": 2, "keep_last": 2, "async_save": async_save},
        "metrics": {"log_every": 1, "tensorboard": False, "plot": False, "progress": False},
        "stages": [{"name": "pretrain", "steps": STEPS, "ramp": [[0, 256, 64]]}],
    }


_KILLED_RUN = """
import json, os, signal, sys, torch
torch.set_num_threads(1)
from herd.train import Trainer
from herd.train.config import config_from_dict
t = Trainer(config_from_dict(json.loads(sys.argv[1])), log=lambda m: None)
def kill(tmp, step):  # rank 0's files of step 6 are written; COMPLETE and the rename are not
    if step == 6:
        print("killing", sorted(p.name for p in tmp.iterdir()), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
t.checkpointer.before_commit = kill
t.fit()
"""


def _losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if "loss" in r}


def test_a_kill_during_an_async_write_resumes_from_the_previous_checkpoint_exactly(tmp_path):
    torch.set_num_threads(1)
    rng = random.Random(0)
    with ShardWriter(tmp_path / "train", vocab_size=512) as w:
        for _ in range(200):
            w.add([rng.randrange(256) for _ in range(rng.randint(5, 90))])
    ref = Trainer(config_from_dict(_cfg(tmp_path / "train", tmp_path / "ref", async_save=False)), log=lambda m: None)
    ref.fit()

    out = tmp_path / "run"
    cfg = _cfg(tmp_path / "train", out, async_save=True)
    proc = subprocess.run([sys.executable, "-c", _KILLED_RUN, json.dumps(cfg)], capture_output=True, text=True,
                          timeout=300, env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert "killing" in proc.stdout and ".metadata" in proc.stdout  # the files were there, mid-write
    left = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert any(n.startswith(".step-00000006.tmp-") for n in left) and "step-00000004" in left  # killed mid-write
    assert "step-00000006" not in left

    resumed = Trainer(config_from_dict(cfg), log=lambda m: None)
    result = resumed.fit()
    assert result.resumed_from == 4
    assert not any(p.name.startswith(".step-") for p in (out / "checkpoints").iterdir())  # the leftover is gone
    assert _losses(out) == _losses(tmp_path / "ref")  # every step, bit for bit
    for (name, a), b in zip(resumed.model.named_parameters(), ref.model.parameters()):
        assert torch.equal(a, b), name
