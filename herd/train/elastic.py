"""Automatic restart of a training job: `herd train CFG --nproc N --max-restarts K`.

A process of the job that dies (SIGKILL, an OOM kill, a crash, a NCCL/gloo error after a peer
vanished) brings the whole job back from its last good checkpoint, with no person involved,
up to K times; then the job fails with torchrun's exit code.

Why torchrun's elastic agent (torch.distributed.elastic) and not torchft:

* herd's resume is exact: everything a restart needs is in `Trainer.state_dict()`, checkpoints
  are atomic and verified, and a run killed anywhere continues bit for bit
  (tests/integration/test_train_resume.py). Restarting the *whole worker group* from the last
  checkpoint is therefore all that is missing, and that is exactly what the agent does with
  `--max-restarts`: it watches the workers every 0.1 s (`--monitor-interval`), stops the
  survivors when one fails, re-rendezvous and starts the group again with
  TORCHELASTIC_RESTART_COUNT raised. It ships with torch (2.13 here), needs no server, and
  `herd train --nproc N` already ran under torchrun, so the change is one flag.
* torchft (0.2.0 installs here from PyPI, with opentelemetry as extra dependencies) solves
  another problem: keep training through a failure by dropping a *replica group* for some
  steps and healing it from a live peer. It needs a lighthouse server, a per-step quorum
  (a round trip before every step), its own process groups and a Manager wrapping the optimizer,
  and every replica group is a separate torchrun job. While a replica is out the global batch
  is smaller, so the losses differ from a fault-free run's by design: the opposite of the
  exact-resume guarantee herd's tests hold. It pays off where restarting costs minutes (thousands
  of GPUs, slow checkpoint loads); at the scale these machines test it would be untestable
  dead code (ARCHITECTURE.md, principle 13).

What the agent costs is measured, not assumed: each restart pays process start-up (interpreter,
torch import, process group), the checkpoint load and the replay of the steps since that
checkpoint. The supervisor writes the account (herd.train.goodput) to `effective_time.json`.

A restart is the recovery from a one-time fault, including silent data corruption (a worker
exits 4, the group comes back from a checkpoint written before the corruption). A corruption
that comes back at the same step on the same ranks is the hardware's: the worker writes
`sdc-stop.json` (herd.train.sdc.record_event) and the supervisor ends torchrun at once instead
of letting it spend the remaining restarts meeting the same fault.

A single process (`--nproc 1`, the default) with `--max-restarts K` runs under the same agent
as one worker, so it restarts the same way; without the flag it runs in this process, as before.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from herd.parallel.launch import run_under_torchrun
from herd.train.goodput import EffectiveTime, effective_time, write_summary
from herd.train.sdc import SDC_EXIT_CODE, SDC_STOP

DEFAULT_RESTARTS = 3  # for --nproc > 1: enough for a few faults, few enough that a deterministic crash ends the job


def under_torchrun() -> bool:
    """True in a worker that torchrun (or its elastic agent) started."""
    return "TORCHELASTIC_RESTART_COUNT" in os.environ or "TORCHELASTIC_RUN_ID" in os.environ


def restarts_for(nproc: int, max_restarts: int | None) -> int:
    """The restarts a run gets: as asked, else DEFAULT_RESTARTS under torchrun and 0 in one process."""
    if max_restarts is not None:
        return max_restarts
    return DEFAULT_RESTARTS if nproc > 1 else 0


@dataclass
class SupervisedRun:
    returncode: int  # torchrun's: 0 once a group finished the job, else the last failure's
    account: EffectiveTime
    summary: Path  # effective_time.json
    stopped: str = ""  # why the job was ended before its restarts ran out (a persistent SDC), else ""


def supervise(config: str, overrides: Sequence[str], *, out_dir: str | Path, nproc: int, max_restarts: int,
              since: float | None = None) -> SupervisedRun:
    """Run `herd train config overrides` under torchrun's agent and account for the time it took
    from `since` (Unix time; default now; `herd train` passes its own process start)."""
    if under_torchrun():
        raise ValueError("--nproc and --max-restarts start a job; this process is already a torchrun worker "
                         "(run herd train CFG under torchrun without them, or herd train CFG --nproc N alone)")
    since = time.time() if since is None else since
    stop = Path(out_dir) / SDC_STOP
    stop.unlink(missing_ok=True)  # a person starting the job again has dealt with the last one
    code = run_under_torchrun(nproc, ["train", config, *overrides], max_restarts=max_restarts, stop_file=stop)
    run = account_for(out_dir, since=since, returncode=code)
    if stop.is_file():  # a worker saw the same corruption again after a restart (herd.train.sdc.record_event)
        run.stopped = json.loads(stop.read_text()).get("message", "")
        run.returncode = SDC_EXIT_CODE
    return run


def account_for(out_dir: str | Path, *, since: float, returncode: int = 0) -> SupervisedRun:
    """The effective-time account of the run that began at `since` and ends now; written to out_dir."""
    account = effective_time(out_dir, since=since, until=time.time())
    return SupervisedRun(returncode, account, write_summary(out_dir, account))
