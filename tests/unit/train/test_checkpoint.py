"""DCP checkpoints: exact round trip, atomic layout, corrupt/partial detection, pruning, averaging."""

import dataclasses

import os

import pytest
import torch

from herd.model import ModelArgs, build_model
from herd.train.average import average_checkpoints
from herd.train.checkpoint import COMPLETE, Checkpointer, load, load_model_weights

ARGS = ModelArgs.from_name("debug")


def state_of(model):
    return {"model": model.state_dict(), "train": {"step": 0, "note": b""}}


def save(ck, seed, step, **kw):
    model = build_model(ARGS, seed=seed)
    meta = {"stage": kw.pop("stage", "pretrain"), "model_args": dataclasses.asdict(ARGS)}
    return model, ck.save({"model": model.state_dict(), "train": {"step": step, "note": b"x" * step}},
                          step=step, meta=meta, **kw)


def test_round_trip_is_exact_and_non_tensors_come_back(tmp_path):
    ck = Checkpointer(tmp_path, keep_last=2)
    model, saved = save(ck, seed=1, step=5)
    assert (saved.path / COMPLETE).is_file() and saved.path.name == "step-00000005"
    other = build_model(ARGS, seed=2)
    state = state_of(other)
    load(saved.path, state)
    other.load_state_dict(state["model"])
    for (k, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), k
    assert state["train"] == {"step": 5, "note": b"xxxxx"}


def test_partial_and_corrupt_checkpoints_are_skipped_with_a_message(tmp_path):
    messages = []
    ck = Checkpointer(tmp_path, keep_last=5, log=messages.append)
    save(ck, 1, 10)
    save(ck, 2, 20)
    _, newest = save(ck, 3, 30)
    # step 30: a flipped byte in the tensor file; step 20: the COMPLETE marker never got written
    data = next(p for p in newest.path.iterdir() if p.suffix == ".distcp")
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    (tmp_path / "step-00000020" / COMPLETE).unlink()

    found = ck.latest()
    assert found.step == 10
    assert "skipping checkpoint step-00000030" in messages[0] and "CRC-32" in messages[0]
    assert "skipping checkpoint step-00000020" in messages[1] and "interrupted" in messages[1]
    assert not (tmp_path / "step-00000030").exists()  # moved aside, never tried again
    assert any(p.name.startswith("step-00000030.bad-") for p in tmp_path.iterdir())


def test_truncated_file_is_detected(tmp_path):
    messages = []
    ck = Checkpointer(tmp_path, keep_last=5, log=messages.append)
    save(ck, 1, 10)
    _, newest = save(ck, 2, 20)
    meta_file = newest.path / ".metadata"
    meta_file.write_bytes(meta_file.read_bytes()[:-10])
    assert ck.latest().step == 10
    assert "truncated" in messages[0]


def test_leftover_temp_dir_from_a_killed_write_is_removed(tmp_path):
    (tmp_path / ".step-00000040.tmp-12345").mkdir()
    messages = []
    Checkpointer(tmp_path, keep_last=1, log=messages.append)
    assert not (tmp_path / ".step-00000040.tmp-12345").exists()
    assert "unfinished checkpoint write" in messages[0]


def test_replacing_a_step_never_leaves_it_missing(tmp_path, monkeypatch):
    """A kill between setting the old copy aside and renaming the new one in: the old one comes back."""
    ck = Checkpointer(tmp_path, keep_last=5)
    _, first = save(ck, 1, 10)
    real_rename = os.rename

    def killed_after_setting_aside(src, dst):
        real_rename(src, dst)
        if ".old-" in str(dst):
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(os, "rename", killed_after_setting_aside)
    with pytest.raises(KeyboardInterrupt):
        save(ck, 2, 10)
    monkeypatch.setattr(os, "rename", real_rename)
    assert not (tmp_path / "step-00000010").exists()
    messages = []
    again = Checkpointer(tmp_path, keep_last=5, log=messages.append)
    assert "restoring step-00000010" in " ".join(messages)
    assert again.latest().step == 10 and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    _, replaced = save(again, 3, 10)  # a normal replacement leaves nothing aside
    assert again.latest().step == 10 and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_pruning_keeps_the_last_k_and_every_kept_one(tmp_path):
    ck = Checkpointer(tmp_path, keep_last=2)
    for step in (1, 2, 3):
        save(ck, 0, step)
    save(ck, 0, 4, keep=True)
    for step in (5, 6, 7):
        save(ck, 0, step)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000004", "step-00000006", "step-00000007"]


def test_average_is_the_mean_of_the_weights(tmp_path):
    ck = Checkpointer(tmp_path, keep_last=3)
    models = [save(ck, seed, step)[0] for seed, step in ((1, 1), (2, 2), (3, 3))]
    avg = average_checkpoints([tmp_path / f"step-0000000{i}" for i in (1, 2, 3)], ARGS)
    for name, p in avg.state_dict().items():
        expected = torch.stack([m.state_dict()[name].double() for m in models]).mean(0).float()
        torch.testing.assert_close(p, expected, rtol=0, atol=1e-7, msg=name)
    assert not torch.equal(avg.state_dict()["layers.0.attention.wq.weight"], models[0].state_dict()[
        "layers.0.attention.wq.weight"])


def test_average_refuses_a_corrupt_checkpoint(tmp_path):
    ck = Checkpointer(tmp_path, keep_last=3)
    _, saved = save(ck, 1, 1)
    (saved.path / COMPLETE).unlink()
    with pytest.raises(ValueError, match="cannot average"):
        average_checkpoints([saved.path], ARGS)


def test_model_weights_load_alone(tmp_path):
    ck = Checkpointer(tmp_path, keep_last=3)
    model, saved = save(ck, 1, 1)
    other = build_model(ARGS, seed=9)
    load_model_weights(saved.path, other)
    assert torch.equal(other.output.weight, model.output.weight)
