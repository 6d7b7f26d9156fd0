"""Effective training time: the share of a run's wall time spent on steps that count.

A job that restarts after a fault spends time on things that move no weights forward: starting
processes (interpreter, imports, the process group), building the model, verifying and loading
the checkpoint, and replaying the steps between that checkpoint and the fault. The ratio

    effective = (seconds of the steps that survived into the final metrics.jsonl) / wall time

says what a run's faults, restarts and fixed costs took from it. Who knows what:

* the workers know each step's time; `metrics.jsonl` keeps the surviving steps (a restart
  truncates it back to the resumed step) and each record carries its Unix `time`, so records of
  an earlier invocation of the same job are told apart from this one's;
* rank 0 appends one line per process start to `attempts.jsonl` (`record_attempt`): when the
  trainer was constructed and when it was ready to step, the resumed step, the checkpoint load
  time and the step records the restart cut (the replayed work); and one per anomaly rollback
  (`record_rollback`), whose cut records are replayed work too;
* the supervisor (`herd train`, the process that runs torchrun) knows the wall time, and puts it
  all together with `effective_time` into `effective_time.json` and its last line.

The design trade-off: the breakdown is reconstructed from timestamps on one machine's clock, not
measured by one process end to end, so time nobody accounts for (checkpoint saves, validation,
averaging, exit) is the remainder `other_seconds`, never a guess.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from herd.io import atomic_write_json, read_records

ATTEMPTS = "attempts.jsonl"
SUMMARY = "effective_time.json"


def process_start_time() -> float:
    """Unix time at which this process started (Linux: /proc), else now.

    The supervisor's wall time starts there, so its own interpreter and torch import count too.
    """
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])  # field 22: starttime
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        started = boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()
    # btime has one-second resolution: never report a start in the future or implausibly far back.
    return min(started, time.time())


def record_attempt(out_dir: str | Path, *, attempt: int, started: float, ready: float, resumed_step: int,
                   load_seconds: float, dropped: list[dict[str, Any]]) -> None:
    """Append this process start to `attempts.jsonl` (rank 0 only). `dropped`: the step records
    the restart cut from metrics.jsonl, kept as (step, seconds, time) for the replay account."""
    rec = {"attempt": attempt, "started": started, "ready": ready, "resumed_step": resumed_step,
           "load_seconds": load_seconds,
           "dropped": [[r["step"], r.get("seconds", 0.0), r.get("time", 0.0)] for r in dropped]}
    with open(Path(out_dir) / ATTEMPTS, "a") as f:
        f.write(json.dumps(rec) + "\n")


def record_rollback(out_dir: str | Path, *, dropped: list[dict[str, Any]]) -> None:
    """Append an anomaly rollback (herd.train.anomaly) to `attempts.jsonl` (rank 0 only): the step
    records it cut are replayed work like a restart's, though no process restarted."""
    rec = {"rollback": True, "time": time.time(),
           "dropped": [[r["step"], r.get("seconds", 0.0), r.get("time", 0.0)] for r in dropped]}
    with open(Path(out_dir) / ATTEMPTS, "a") as f:
        f.write(json.dumps(rec) + "\n")


@dataclass
class EffectiveTime:
    wall_seconds: float  # supervisor start to end, restarts included
    productive_seconds: float  # steps of this run that are in the final history
    productive_steps: int
    attempts: int  # process starts of this run (1 = no restart)
    replayed_steps: int  # steps computed, then cut by a restart and computed again
    replayed_seconds: float
    startup_seconds: float  # before each trainer existed: process start, imports, and after a fault its detection
    init_seconds: float  # trainer constructed -> ready to step: process group, model, checkpoint load, peak
    load_seconds: float  # the checkpoint verification and load inside init_seconds
    other_seconds: float  # the rest: checkpoint saves, validation, averaging, the exit
    since: float = 0.0  # Unix times the account covers: the supervisor's process start ...
    until: float = 0.0  # ... and the moment it was written

    @property
    def restarts(self) -> int:
        return max(self.attempts - 1, 0)

    @property
    def effective(self) -> float:
        return self.productive_seconds / self.wall_seconds if self.wall_seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "restarts": self.restarts, "effective": self.effective}

    def line(self) -> str:
        return (f"effective training time {100 * self.effective:.1f}%: {self.productive_seconds:.1f} s of steps "
                f"({self.productive_steps} kept) in {self.wall_seconds:.1f} s wall; {self.restarts} restart(s), "
                f"{self.replayed_steps} step(s) replayed ({self.replayed_seconds:.1f} s), start-up "
                f"{self.startup_seconds:.1f} s, init {self.init_seconds:.1f} s (checkpoint loads "
                f"{self.load_seconds:.1f} s), other {self.other_seconds:.1f} s")


def effective_time(out_dir: str | Path, *, since: float, until: float) -> EffectiveTime:
    """The account of the run that started at Unix time `since` and ended at `until`."""
    out_dir = Path(out_dir)
    steps = [r for r in read_records(out_dir / "metrics.jsonl") if "loss" in r and r.get("time", 0.0) >= since]
    lines = read_records(out_dir / ATTEMPTS)
    attempts = sorted((a for a in lines if "rollback" not in a and a.get("started", 0.0) >= since),
                      key=lambda a: a["started"])
    dropped = [d for a in lines for d in a.get("dropped", []) if d[2] >= since]
    # Every step end this run saw, kept or cut: the last one before a restart ends that attempt.
    ends = sorted([r["time"] for r in steps] + [d[2] for d in dropped])
    startup = init = load = 0.0
    prev_end = since
    for a in attempts:
        prev_end = max([prev_end, *(t for t in ends if t < a["started"])])
        startup += max(a["started"] - prev_end, 0.0)
        init += max(a["ready"] - a["started"], 0.0)
        load += a.get("load_seconds", 0.0)
        prev_end = a["ready"]
    wall = max(until - since, 0.0)
    productive = sum(r.get("seconds", 0.0) for r in steps)
    replayed = sum(d[1] for d in dropped)
    return EffectiveTime(wall_seconds=wall, productive_seconds=productive, productive_steps=len(steps),
                         attempts=len(attempts), replayed_steps=len(dropped), replayed_seconds=replayed,
                         startup_seconds=startup, init_seconds=init, load_seconds=load,
                         other_seconds=wall - productive - replayed - startup - init, since=since, until=until)


def write_summary(out_dir: str | Path, account: EffectiveTime) -> Path:
    path = Path(out_dir) / SUMMARY
    atomic_write_json(path, account.to_dict())
    return path
