"""Executors: where a pipeline task (stage, shard) runs; the steps never know. `local` (the
default) forks `workers` processes on this machine, which inherit the run, so nothing is pickled.
`ray` submits the same tasks as Ray remote tasks (one CPU each) to the cluster at `address`, or
to a local Ray cluster of `num_cpus` CPUs (default: `workers`) started for the run and stopped
after it; the run (config, steps, shard layout) is pickled once into Ray's object store. Tasks
read and write the same files either way, so the outputs are byte-identical, and resuming works
the same (a shard whose stats file exists is skipped, whichever executor wrote it). With a
remote cluster, `output_dir` and the inputs must be on storage that every node sees at the same
path (a shared file system); Ray does not move these files.
"""

from __future__ import annotations

import os
import platform
import sys
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Any

# The run being executed (herd.data.pipeline's _Run), inherited by forked workers so that steps (which
# may hold models, compiled patterns or test callables) never need pickling; a task is just (stage, shard).
_CURRENT: Any = None


def _worker_init() -> None:
    # Parallelism comes from the worker processes: a torch model inside one (the tiny classifier)
    # must not also spawn intra-op threads, or N workers x N threads thrash the cores.
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)
    else:
        os.environ["OMP_NUM_THREADS"] = "1"


def _task(k: int, shard: int) -> None:
    assert _CURRENT is not None
    _CURRENT.run_task(k, shard)


class LocalExecutor:
    """Forked processes on this machine (or this process when workers == 1)."""

    def __init__(self, run: Any, workers: int) -> None:
        global _CURRENT
        _CURRENT = run
        self.run = run
        self.pool = (ProcessPoolExecutor(workers, mp_context=get_context("fork"), initializer=_worker_init)
                     if workers > 1 else None)

    def run_stage(self, k: int, shards: list[int]) -> None:
        if self.pool is None:
            for s in shards:
                self.run.run_task(k, s)
        else:
            for f in [self.pool.submit(_task, k, s) for s in shards]:
                f.result()

    def close(self) -> None:
        global _CURRENT
        if self.pool is not None:
            self.pool.shutdown()
        _CURRENT = None


def _ray_task(run: Any, k: int, shard: int, cwd: str) -> None:
    # Relative paths in the pipeline file (inputs, output_dir, models) mean the driver's cwd.
    if not os.path.isdir(cwd):
        raise FileNotFoundError(f"Ray worker on {platform.node()}: the driver's working directory {cwd} does not "
                                "exist here; run from (and keep the pipeline's files on) a file system that every "
                                "node mounts at the same path")
    os.chdir(cwd)
    _worker_init()
    run.run_task(k, shard)


class RayExecutor:
    """Ray remote tasks, one CPU each; the run is pickled once into the object store."""

    def __init__(self, run: Any, *, address: str | None, num_cpus: int | None, workers: int) -> None:
        try:
            import ray
        except ImportError:
            raise ImportError("[pipeline] executor = \"ray\" needs Ray: pip install 'herd[ray]'") from None
        self.ray = ray
        # A connection opened here (to a local cluster it starts, or to `address`) is closed at the end,
        # which stops only that local cluster; a Ray session the caller already opened is used as it is.
        self.owned = not ray.is_initialized()
        if self.owned:
            if address is None:
                ray.init(num_cpus=num_cpus or workers, include_dashboard=False, log_to_driver=True)
            else:
                ray.init(address=address)
        self.ref = ray.put(run)
        self.remote = ray.remote(num_cpus=1, max_retries=0)(_ray_task)

    def run_stage(self, k: int, shards: list[int]) -> None:
        cwd = os.getcwd()
        refs = [self.remote.remote(self.ref, k, s, cwd) for s in shards]
        try:
            self.ray.get(refs)
        except self.ray.exceptions.RayTaskError as e:
            # Re-raise what the step raised (as the local executor does), not Ray's wrapper.
            if isinstance(getattr(e, "cause", None), BaseException):
                raise e.cause from None
            raise

    def close(self) -> None:
        if self.owned:
            self.ray.shutdown()


EXECUTORS = ("local", "ray")
