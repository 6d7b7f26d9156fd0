"""Process-group start-up for a training run, and `herd train --nproc N`.

`torchrun --nproc-per-node N -m herd train CFG` sets RANK/WORLD_SIZE/LOCAL_RANK; the trainer
calls `init_distributed`, which starts the default process group (NCCL on CUDA, gloo on CPU)
and builds the mesh of the run's `[parallel]` section. `herd train CFG --nproc N` re-runs
the same command line under torchrun on this machine, so the two spellings are one code path.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from herd.parallel.dims import Meshes
from herd.parallel.parallelize import ParallelConfig


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(config: ParallelConfig, device: torch.device, *, timeout_s: float = 0.0) -> Meshes | None:
    """Start the process group and mesh under torchrun; None for a plain single process.

    timeout_s: how long a collective may block before it fails (0: torch's default)."""
    world = world_size_from_env()
    dims = config.dims(world)  # validates the degrees against the number of processes
    if world == 1:
        return None
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        kwargs = {"timeout": timedelta(seconds=timeout_s)} if timeout_s > 0 else {}
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", **kwargs)
    return dims.build_mesh(device.type)


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _pop_count(argv: Sequence[str], flag: str, *, minimum: int) -> tuple[int | None, list[str]]:
    """Take `flag N` (or `flag=N`) out of a command's trailing arguments; None if it is absent."""
    rest, value, args = [], None, list(argv)
    i = 0
    while i < len(args):
        a = args[i]
        if a == flag or a.startswith(flag + "="):
            text = a.split("=", 1)[1] if "=" in a else (args[i + 1] if i + 1 < len(args) else "")
            i += 1 if "=" in a else 2
            if not text.isdigit() or int(text) < minimum:
                kind = "a positive number" if minimum else "a number (0 or more)"
                raise ValueError(f"{flag} needs {kind}, got {text!r}")
            value = int(text)
            continue
        rest.append(a)
        i += 1
    return value, rest


def pop_nproc(argv: Sequence[str]) -> tuple[int, list[str]]:
    """Take `--nproc N` (or `--nproc=N`) out of a command's trailing arguments."""
    nproc, rest = _pop_count(argv, "--nproc", minimum=1)
    return nproc or 1, rest


def pop_max_restarts(argv: Sequence[str]) -> tuple[int | None, list[str]]:
    """Take `--max-restarts K` out of a command's trailing arguments; None if it is absent."""
    return _pop_count(argv, "--max-restarts", minimum=0)


def run_under_torchrun(nproc: int, module_args: Sequence[str], *, max_restarts: int = 0,
                       stop_file: Path | None = None) -> int:
    """Run `python -m herd <module_args>` in `nproc` local processes; return torchrun's exit code.

    max_restarts: how often torchrun's elastic agent restarts the whole group after a process
    fails (herd.train.elastic says why the whole group, from the last checkpoint).
    stop_file: when a worker creates it, torchrun is ended (SIGTERM to it, which stops every rank)
    instead of restarting the group again: a failure the workers know a restart cannot cure.
    """
    if world_size_from_env() > 1:
        raise ValueError("--nproc is for starting a run; this process is already one of a torchrun group")
    cmd = [sys.executable, "-m", "herd.parallel.torchrun", "--standalone", f"--nproc-per-node={nproc}",
           f"--max-restarts={max_restarts}", "-m", "herd", *module_args]
    env = dict(os.environ)
    if max_restarts:
        # By default the workers' process group shares the agent's rendezvous store, and its keys
        # (the gloo/NCCL addresses of each rank) survive a restart: a restarted rank can read the
        # dead group's address before the new rank 0 writes its own, and every later attempt fails
        # the same way (seen here: "Gloo connectFullMesh failed ... Connection refused" after a
        # kill; pytorch/pytorch#135712). A store of their own per attempt has no stale keys.
        env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    # torchrun runs in a session of its own: a terminal's Ctrl-C (or a SIGTERM) reaches this process
    # alone, which passes it on to torchrun, which passes it to every rank, so each process gets
    # it once. Had it reached torchrun and the ranks directly as well, each rank would get it
    # twice (a server's second SIGINT forces its exit, dropping the answers still being sent).
    # And this process waits for torchrun: `subprocess.call` would SIGKILL it on Ctrl-C, orphaning
    # the ranks.
    proc = subprocess.Popen(cmd, start_new_session=True, env=env)
    if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread
        return wait_unless_stopped(proc, stop_file)

    def forward(signum, frame):
        proc.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return wait_unless_stopped(proc, stop_file)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def wait_unless_stopped(proc: subprocess.Popen, stop_file: Path | None, *, poll_s: float = 0.5) -> int:
    """`proc.wait()`, but SIGTERM `proc` once `stop_file` exists (then wait for it to end)."""
    if stop_file is None:
        return proc.wait()
    while proc.poll() is None:
        if stop_file.exists():
            proc.send_signal(signal.SIGTERM)
            return proc.wait()
        time.sleep(poll_s)
    return proc.returncode
