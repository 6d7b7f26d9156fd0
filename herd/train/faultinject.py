"""Faults injected on purpose into `herd train`, for the tests and benchmarks of recovery.

Nothing here is configured from a run's TOML: a user's config never carries a fault. A test or
benchmark sets the environment variable `HERD_INJECT_FAULTS` to a JSON object

    {"state": "/tmp/x/fired", "faults": [{"kind": "kill", "step": 7, "rank": 1}, ...]}

and `herd train` turns it into `Trainer` step hooks (`hooks_from_env`); unset, there are none.
Torchrun passes the environment on to every rank and to every restarted rank.

Each fault fires at most once in the job's life, however often its step runs: before it acts it
creates `<state>/<index>-<kind>-step<step>` exclusively, so the step replayed after the restart
a kill caused does not kill again. Kinds:

* `kill`: the rank sends itself SIGKILL when it reaches `step`, after that step's batch has been
  drawn: the other ranks are then inside the step's collectives, waiting for a peer that is gone
  (the failure a crashed host or an OOM-killed process gives). No Python handler, no cleanup.

* `nan`: one gradient of the rank becomes NaN in that step, through herd.train.anomaly's own
  `FaultInjector` (between backward and its check). Registered only where that module exists.
* `bitflip`: bit `bit` (default 0) of element `index` (default 0) of parameter `name` (default
  the first) flips on the rank before the step, through herd.train.sdc's `flip_bit`: one
  replica's weights differ from the others'. Registered only where that module exists.

The last two are adapters to the modules that detect those faults (issue 16's anomaly skip and
SDC checks); where the modules are absent the kinds are absent, and asking for them is an error.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ENV = "HERD_INJECT_FAULTS"


@dataclass(frozen=True)
class Fault:
    index: int  # position in the list: part of the fired-marker name
    kind: str
    step: int  # the optimizer step (1-based) during which it fires
    rank: int  # the global rank it fires on
    options: dict[str, Any]  # kind-specific settings


Hook = Callable[[Any, int], None]  # herd.train.trainer.StepHook: (trainer, step)


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _kill(fault: Fault) -> Hook:
    def act(trainer: Any, step: int) -> None:
        os.kill(os.getpid(), signal.SIGKILL)
    return act


def _nan(fault: Fault) -> Hook:
    from herd.train.anomaly import FaultInjector

    def act(trainer: Any, step: int) -> None:
        FaultInjector().nan_grad(step, rank=fault.rank).install(trainer)
    return act


def _bitflip(fault: Fault) -> Hook:
    from herd.train.sdc import flip_bit

    def act(trainer: Any, step: int) -> None:
        params = dict(trainer.model.named_parameters())
        name = fault.options.get("name") or next(iter(params))
        if name not in params:
            raise ValueError(f"{ENV}: bitflip fault names parameter {name!r}, which rank {fault.rank} does not hold")
        flip_bit(params[name].data, index=fault.options.get("index", 0), bit=fault.options.get("bit", 0))
    return act


KINDS: dict[str, Callable[[Fault], Hook]] = {"kill": _kill}
for _kind, _module, _factory in (("nan", "herd.train.anomaly", _nan), ("bitflip", "herd.train.sdc", _bitflip)):
    if importlib.util.find_spec(_module) is not None:
        KINDS[_kind] = _factory


def parse(spec: str) -> tuple[Path, list[Fault]]:
    """The state directory and the faults of an `HERD_INJECT_FAULTS` value; ValueError says what is wrong."""
    try:
        data = json.loads(spec)
    except json.JSONDecodeError as e:
        raise ValueError(f"{ENV} is not JSON ({e}); expected {{\"state\": DIR, \"faults\": [...]}}") from None
    if not isinstance(data, dict) or not isinstance(data.get("state"), str) or not isinstance(data.get("faults"), list):
        raise ValueError(f"{ENV} must be an object with \"state\" (a directory) and \"faults\" (a list)")
    faults = []
    for i, f in enumerate(data["faults"]):
        if not isinstance(f, dict) or f.get("kind") not in KINDS:
            raise ValueError(f"{ENV} fault {i}: kind must be one of {sorted(KINDS)}, got {f!r}")
        step, rank = f.get("step"), f.get("rank", 0)
        if not isinstance(step, int) or step < 1 or not isinstance(rank, int) or rank < 0:
            raise ValueError(f"{ENV} fault {i}: step must be an integer >= 1 and rank >= 0, got {f!r}")
        options = {k: v for k, v in f.items() if k not in ("kind", "step", "rank")}
        faults.append(Fault(index=i, kind=f["kind"], step=step, rank=rank, options=options))
    return Path(data["state"]), faults


def claim(state: Path, fault: Fault) -> bool:
    """True exactly once per fault across every process and restart of the job."""
    state.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(state / f"{fault.index}-{fault.kind}-step{fault.step}", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.close(fd)
    return True


def hooks(state: Path, faults: list[Fault]) -> list[Hook]:
    """One step hook that fires this rank's faults at their steps."""
    if not faults:
        return []
    actions = [(f, KINDS[f.kind](f)) for f in faults]

    def hook(trainer: Any, step: int) -> None:
        rank = _rank()
        for fault, act in actions:
            if fault.step == step and fault.rank == rank and claim(state, fault):
                act(trainer, step)
    return [hook]


def hooks_from_env() -> list[Hook]:
    spec = os.environ.get(ENV)
    return hooks(*parse(spec)) if spec else []
