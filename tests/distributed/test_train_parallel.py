"""`herd train` under torchrun: the trainer's parallel seam end to end.

One process trains 6 steps as the reference. `herd train CFG --nproc 2` (FSDP over 2 ranks)
trains the first 3 and checkpoints; that checkpoint then resumes under TP 2 (torchrun) and in
one process. Another FSDP run computes the head in 4 chunks (`--train.loss_chunks 4`) against
the reference's plain head. Every step's loss equals the reference within 1e-5 (fp32), so the data order,
the initialisation (full_init), the gradient normalisation and DCP resharding all agree.
"""

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from herd.data.shards import ShardWriter
from herd.train import Trainer
from herd.train.config import config_from_dict, to_toml

STEPS = 6


def _losses(out_dir: Path, key: str = "loss") -> dict[int, float]:
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in rows if key in r}


def _config(data: Path, out: Path, steps: int) -> dict:
    return {
        "job": {"out_dir": str(out), "device": "cpu", "seed": 0},
        "model": {"preset": "debug", "vocab_size": 512},
        "data": {"train": [str(data / "train")], "val": [str(data / "val")]},
        "train": {"micro_batch_tokens": 256},  # two micro-batches of 4 rows: accumulation under DP too
        "optim": {"lr": 3e-3},
        "schedule": {"warmup_steps": 2, "decay_steps": STEPS, "min_lr": 3e-4},
        "checkpoint": {"every": 3, "keep_last": 2},
        "metrics": {"log_every": 1, "val_batches": 1, "val_batch_size": 4, "tensorboard": False, "plot": False,
                    "progress": False},
        "stages": [{"name": "pretrain", "steps": steps, "ramp": [[0, 512, 64]]}],
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_parallel")
    rng = random.Random(0)
    for split, docs in (("train", 300), ("val", 20)):
        with ShardWriter(root / "data" / split, vocab_size=512) as w:
            for _ in range(docs):
                w.add([rng.randrange(256) for _ in range(rng.randint(5, 90))])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        Trainer(config_from_dict(_config(root / "data", root / "single", STEPS))).fit()
    finally:
        torch.set_num_threads(threads)

    def herd_train(steps: int, out: str, *extra: str) -> None:
        cfg = root / f"{out}-{steps}.toml"
        cfg.write_text(to_toml(config_from_dict(_config(root / "data", root / out, steps))))
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run([sys.executable, "-m", "herd", "train", str(cfg), *extra], env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]

    herd_train(3, "fsdp", "--nproc", "2")  # dp_shard = -1: FSDP over both ranks
    herd_train(3, "chunked", "--nproc", "2", "--train.loss_chunks", "4")  # the head in 4 slices per micro-batch
    shutil.copytree(root / "fsdp", root / "tp")
    shutil.copytree(root / "fsdp", root / "one")
    herd_train(STEPS, "tp", "--nproc", "2", "--parallel.tp", "2")
    herd_train(STEPS, "one")
    out = {name: _losses(root / name) for name in ("single", "fsdp", "tp", "one", "chunked")}
    return out | {f"{name} val": _losses(root / name, "val_loss") for name in ("fsdp", "chunked")}


def test_fsdp_under_torchrun_matches_one_process(runs):
    assert sorted(runs["fsdp"]) == [1, 2, 3]
    for step, loss in runs["fsdp"].items():
        assert loss == pytest.approx(runs["single"][step], abs=1e-5), (step, runs)


def test_chunked_head_under_fsdp_matches_the_plain_head_in_one_process(runs):
    assert sorted(runs["chunked"]) == [1, 2, 3]
    for step, loss in runs["chunked"].items():
        assert loss == pytest.approx(runs["single"][step], abs=1e-5), (step, runs)
    # Validation at the stage end runs the chunked head too (ParallelModel.loss_sum).
    assert list(runs["chunked val"]) == list(runs["fsdp val"]) == [3]
    assert runs["chunked val"][3] == pytest.approx(runs["fsdp val"][3], abs=1e-5)


@pytest.mark.parametrize("name", ["tp", "one"])
def test_fsdp_checkpoint_resumes_under_another_layout(runs, name):
    assert sorted(runs[name]) == list(range(1, STEPS + 1))
    for step in range(4, STEPS + 1):
        assert runs[name][step] == pytest.approx(runs["single"][step], abs=1e-5), (name, step, runs)


@pytest.fixture(scope="module")
def tied_runs(runs, tmp_path_factory):
    """Llama 3.2's tied embeddings under `herd train --nproc 2 --parallel.pp 2` (ZBVZeroBubble: rank 0
    holds both copies of the matrix), checkpointed after 3 steps and resumed in one process."""
    data = next(tmp_path_factory.getbasetemp().glob("train_parallel*/data"))
    root = data.parent
    tied = {"model": {"preset": "debug", "vocab_size": 512, "n_layers": 4, "tie_embeddings": True}}

    def cfg(out: str, steps: int) -> dict:
        return _config(data, root / out, steps) | tied

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        Trainer(config_from_dict(cfg("tied-single", STEPS))).fit()
        Trainer(config_from_dict(cfg("tied-single-3", 3))).fit()  # its validation at step 3
    finally:
        torch.set_num_threads(threads)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for out, steps, extra in (("tied-pp", 3, ["--nproc", "2", "--parallel.pp", "2",
                                              "--parallel.pp_schedule", "ZBVZeroBubble"]),
                              ("tied-pp", STEPS, [])):
        path = root / f"{out}-{steps}.toml"
        path.write_text(to_toml(config_from_dict(cfg(out, steps))))
        proc = subprocess.run([sys.executable, "-m", "herd", "train", str(path), *extra], env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
    return {name: _losses(root / name) for name in ("tied-single", "tied-pp")} | {
        f"{name} val": _losses(root / name, "val_loss") for name in ("tied-single", "tied-single-3", "tied-pp")}


@pytest.mark.slow  # three more runs: about 2.5 minutes on 2 shared cores
def test_tied_embeddings_under_pp_train_validate_and_resume_in_one_process(tied_runs):
    """Steps 1-3 under PP 2 (ZBV), validation at step 3 through the pipeline, steps 4-6 in one
    process from the pipeline's checkpoint: every loss equals one uninterrupted tied process."""
    assert sorted(tied_runs["tied-pp"]) == list(range(1, STEPS + 1))
    for step, loss in tied_runs["tied-pp"].items():
        assert loss == pytest.approx(tied_runs["tied-single"][step], abs=1e-5), (step, tied_runs)
    assert sorted(tied_runs["tied-pp val"]) == [3, 6]
    assert tied_runs["tied-pp val"][3] == pytest.approx(tied_runs["tied-single-3 val"][3], abs=1e-5)
    assert tied_runs["tied-pp val"][6] == pytest.approx(tied_runs["tied-single val"][6], abs=1e-5)
