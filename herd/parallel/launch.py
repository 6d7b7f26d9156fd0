"""Process-group start-up for a training run, and `herd train --nproc N`.

`torchrun --nproc-per-node N -m herd train CFG` sets RANK/WORLD_SIZE/LOCAL_RANK; the trainer
calls `init_distributed`, which starts the default process group (NCCL on CUDA, gloo on CPU)
and builds the mesh of the run's `[parallel]` section. `herd train CFG --nproc N` re-runs
the same command line under torchrun on this machine, so the two spellings are one code path.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from datetime import timedelta

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


def pop_nproc(argv: Sequence[str]) -> tuple[int, list[str]]:
    """Take `--nproc N` (or `--nproc=N`) out of a command's trailing arguments."""
    rest, nproc, args = [], 1, list(argv)
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--nproc" or a.startswith("--nproc="):
            value = a.split("=", 1)[1] if "=" in a else (args[i + 1] if i + 1 < len(args) else "")
            i += 1 if "=" in a else 2
            if not value.isdigit() or int(value) < 1:
                raise ValueError(f"--nproc needs a positive number of processes, got {value!r}")
            nproc = int(value)
            continue
        rest.append(a)
        i += 1
    return nproc, rest


def run_under_torchrun(nproc: int, module_args: Sequence[str]) -> int:
    """Run `python -m herd <module_args>` in `nproc` local processes; return torchrun's exit code."""
    if world_size_from_env() > 1:
        raise ValueError("--nproc is for starting a run; this process is already one of a torchrun group")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "herd", *module_args]
    return subprocess.call(cmd)
