"""`herd train --max-restarts`: a killed rank brings the job back by itself, and nothing changes.

Two ranks train FSDP over gloo (`--nproc 2`); rank 1 sends itself SIGKILL mid-step 5
(herd.train.faultinject, through the environment: the run's config is the reference's). Torchrun's
elastic agent stops rank 0, restarts both from the step-3 checkpoint, and the job finishes on its
own. Its metrics.jsonl must hold steps 1-8 once each with the uninterrupted run's losses exactly,
its final weights must equal the uninterrupted run's, and the effective-time account must show one
restart with step 4 replayed. A single process under `--max-restarts 1` is killed the same way and
must equal an in-process run bit for bit.
"""

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from herd.data.shards import ShardWriter
from herd.model import ModelArgs, build_model
from herd.train import Trainer
from herd.train.checkpoint import load_model_weights
from herd.train.config import config_from_dict, to_toml
from herd.train.faultinject import ENV

ROOT = Path(__file__).resolve().parents[2]
STEPS = 8


def _config(data: Path, out: Path) -> dict:
    return {
        "job": {"out_dir": str(out), "device": "cpu", "seed": 0},
        "model": {"preset": "debug", "vocab_size": 512},
        "data": {"train": [str(data / "train")], "val": [str(data / "val")]},
        "train": {"micro_batch_tokens": 256},
        "optim": {"lr": 3e-3},
        "schedule": {"warmup_steps": 2, "min_lr": 3e-4},
        "checkpoint": {"every": 3, "keep_last": 2},
        "metrics": {"log_every": 1, "val_batches": 1, "val_batch_size": 4, "tensorboard": False, "plot": False,
                    "progress": False},
        "stages": [{"name": "pretrain", "steps": STEPS, "ramp": [[0, 512, 64]]}],
    }


def _rows(out: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (out / name).read_text().splitlines()]


def _losses(out: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in _rows(out, "metrics.jsonl") if "loss" in r]


def _weights(out: Path) -> dict[str, torch.Tensor]:
    model = build_model(ModelArgs.from_name("debug", vocab_size=512), device="cpu")
    load_model_weights(out / "checkpoints" / f"step-{STEPS:08d}", model)
    return model.state_dict()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("elastic")
    rng = random.Random(0)
    for split, docs in (("train", 300), ("val", 20)):
        with ShardWriter(root / "data" / split, vocab_size=512) as w:
            for _ in range(docs):
                w.add([rng.randrange(256) for _ in range(rng.randint(5, 90))])
    return root


def herd_train(root: Path, out: str, *flags: str, faults: list[dict] | None = None) -> str:
    cfg = root / f"{out}.toml"
    cfg.write_text(to_toml(config_from_dict(_config(root / "data", root / out))))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop(ENV, None)
    if faults:
        env[ENV] = json.dumps({"state": str(root / f"{out}-fired"), "faults": faults})
    launched = time.time()
    proc = subprocess.run([sys.executable, "-m", "herd", "train", str(cfg), *flags], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    (root / f"{out}.launched").write_text(f"{launched} {time.time()}")
    if proc.returncode != 0:  # torchrun's summary names only the last failure: show every error line too
        errors = [line for line in proc.stderr.splitlines() if "Error" in line or "error" in line]
        attempts = (root / out / "attempts.jsonl").read_text() if (root / out / "attempts.jsonl").is_file() else ""
        pytest.fail(f"herd train {out} exited {proc.returncode}\nattempts:\n{attempts}\nerror lines:\n"
                    + "\n".join(errors[-40:]) + "\nstdout:\n" + proc.stdout[-2000:] + "\nstderr:\n" + proc.stderr[-3000:])
    return proc.stdout


def _check_restarted(root: Path, out: str, ref: str, stdout: str) -> None:
    run = root / out
    assert _losses(run) == _losses(root / ref)  # steps 1..8 once each, the same floats
    assert [s for s, _ in _losses(run)] == list(range(1, STEPS + 1))
    for name, tensor in _weights(root / ref).items():
        assert torch.equal(_weights(run)[name], tensor), name
    attempts = _rows(run, "attempts.jsonl")
    assert [(a["attempt"], a["resumed_step"]) for a in attempts] == [(0, 0), (1, 3)]
    assert [d[0] for d in attempts[1]["dropped"]] == [4]  # step 5 died before it was logged
    summary = json.loads((run / "effective_time.json").read_text())
    assert (summary["restarts"], summary["replayed_steps"], summary["productive_steps"]) == (1, 1, STEPS)
    assert 0 < summary["effective"] < 1
    # The wall time is the supervisor's whole life: from its process start (not after its imports)
    # to its last line; btime has 1 s resolution, the exit itself is not counted.
    launched, ended = map(float, (root / f"{out}.launched").read_text().split())
    assert launched - 1.5 <= summary["since"] <= launched + 1.0
    assert summary["until"] <= ended
    assert "effective training time" in stdout and "1 restart(s)" in stdout
    assert not [p.name for p in (run / "checkpoints").iterdir() if ".tmp-" in p.name]


@pytest.mark.heavy
@pytest.mark.slow  # two 2-rank torchrun jobs, one restarted: 115-150 s measured on a busy 2-core machine
def test_killed_rank_restarts_from_the_checkpoint_and_matches_the_uninterrupted_run(data):
    herd_train(data, "ref2", "--nproc", "2")
    out = herd_train(data, "kill2", "--nproc", "2", faults=[{"kind": "kill", "step": 5, "rank": 1}])
    _check_restarted(data, "kill2", "ref2", out)


@pytest.mark.heavy
@pytest.mark.slow  # torchrun, a worker and its restart: 45-130 s measured on a busy 2-core machine
def test_one_process_under_max_restarts_restarts_too(data):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bitwise equality with the worker needs its reduction order
    try:
        Trainer(config_from_dict(_config(data / "data", data / "ref1"))).fit()
    finally:
        torch.set_num_threads(threads)
    out = herd_train(data, "kill1", "--max-restarts", "1", faults=[{"kind": "kill", "step": 5}])
    _check_restarted(data, "kill1", "ref1", out)


@pytest.mark.heavy
@pytest.mark.slow  # a 2-rank torchrun job, restarted once, then ended: ~60-120 s on a busy 2-core machine
def test_a_corruption_that_comes_back_after_the_restart_stops_the_job_for_good(data):
    # HERD_SDC_FAULTS faults fire in every process that reaches their step, so a restart from the
    # step-3 checkpoint meets the same flip again: hardware that keeps corrupting rank 1's copy.
    out = data / "sdc2"
    cfg = data / "sdc2.toml"
    cfg.write_text(to_toml(config_from_dict(_config(data / "data", out))))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
           "HERD_SDC_FAULTS": json.dumps([{"kind": "flip_param", "step": 4, "rank": 1, "name": "norm.weight"}])}
    env.pop(ENV, None)
    proc = subprocess.run([sys.executable, "-m", "herd", "train", str(cfg), "--nproc", "2", "--max-restarts", "3",
                           "--parallel.dp_replicate", "2", "--parallel.dp_shard", "1", "--sdc.replica_check_every",
                           "1"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 4, proc.stderr[-3000:]
    assert "likely faulty hardware: exclude rank 0's host or rank 1's host" in proc.stderr  # 2 replicas: both named
    attempts = _rows(out, "attempts.jsonl")
    assert [(a["attempt"], a["resumed_step"]) for a in attempts] == [(0, 0), (1, 3)]  # not 3 restarts
    events = _rows(out, "sdc-events.jsonl")
    assert [(e["step"], e["ranks"], e["attempt"]) for e in events] == [(4, [0, 1], 0), (4, [0, 1], 1)]


@pytest.mark.heavy
@pytest.mark.slow  # two 2-rank torchrun jobs, one restarted: ~2-3 min on a busy 2-core machine
def test_async_checkpoints_under_fsdp_restart_exactly(data):
    # The background writer's gloo group, DTensor staging and the commit on rank 0, under FSDP 2:
    # the killed run resumes from whichever checkpoint was complete and equals a synchronous run.
    herd_train(data, "ref2sync", "--nproc", "2")
    out = herd_train(data, "kill2async", "--nproc", "2", "--checkpoint.async_save", "true",
                     faults=[{"kind": "kill", "step": 5, "rank": 1}])
    run = data / "kill2async"
    assert _losses(run) == _losses(data / "ref2sync") and [s for s, _ in _losses(run)] == list(range(1, STEPS + 1))
    for name, tensor in _weights(data / "ref2sync").items():
        assert torch.equal(_weights(run)[name], tensor), name
    attempts = _rows(run, "attempts.jsonl")
    assert len(attempts) == 2 and attempts[1]["resumed_step"] in (0, 3) and "1 restart(s)" in out
    assert not [p.name for p in (run / "checkpoints").iterdir() if ".tmp-" in p.name]
