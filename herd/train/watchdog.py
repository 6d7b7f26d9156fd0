"""Hangs and stragglers: a per-rank progress record, a watchdog thread, and step times gathered to rank 0.

**Progress.** Each rank keeps an in-memory record of where it is: the step, and the last progress
*event* of that step, numbered in order. Events are the step's start and end, the trainer's own
phases (the SDC checks, the straggler gather), and hooks on the model: the forward of the root
(registered ahead of FSDP's hooks, so it fires before the step's first all-gather), the forward
of every transformer block and its end, and the start of each block's backward (a hook on the
block's output gradient). Under FSDP a block's forward event fires after that block's weights
were all-gathered, so a rank whose last event is "forward of layers.1 done" has left its block
and waits in the next collective. Hooks cost a Python call per block per pass; under
`parallel.compile` the per-block hooks are left out (compiled blocks would trace them) and
progress is per step only.

**Hangs** (`watchdog.collective_timeout_s`): the process group is created with that timeout, and
a daemon thread per rank writes the record to `OUT/heartbeat/rank-N.json` about once a second
and ends the job when the rank has made no progress inside a step for that long. Before exiting
(code `HANG_EXIT_CODE`) it reads every rank's heartbeat and names the rank(s) furthest behind,
the stuck ones, with their step and last event, and what each other rank last completed before
the collective it is blocked in; the report goes to stderr and `OUT/hang-report.json`. Every
rank reaches the same verdict from the same files. "Furthest behind" compares (step, number of
events); under PP the stages run different blocks, so there the event counts compare loosely.
The process group's own timeout is set to twice the watchdog's: it is the backstop when the
thread cannot run, and it must not fire first, or a collective's bare timeout error would end
the rank before the report that names the stuck one. The trade-off: detection is "no event for
the timeout", so a single block's forward longer than the timeout reads as a hang; timeouts are
minutes in practice. Checkpoint writes and validation are outside the watched steps. The
heartbeat folder must be shared by the ranks (it is under job.out_dir, which checkpoints need
shared anyway).

**Stragglers** (`watchdog.straggler_every`, `watchdog.straggler_factor`): in synchronous
training every rank's step takes the same wall time, the fast ones waiting in collectives for
the slow one, so the step time cannot name a straggler. Each rank also sums its *busy* time, the
time inside its blocks' forwards (after the weights arrived, before the next collective), and
every N steps one all-gather of two numbers per rank brings the window's means to rank 0. A rank
whose busy time exceeds `straggler_factor` times the low median (the lower middle value, which
a single slow rank cannot pull up; with two ranks, the faster one) is named in the log and in a
metrics record `{"event": "step_times", "rank_step_s", "rank_busy_s", "stragglers"}`. Without
block hooks (compile) the busy time is the step time.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from herd.io import atomic_write_json, atomic_write_text
from herd.train.config import WatchdogConfig
from herd.train.sdc import Faults, sleep

HANG_EXIT_CODE = 3


def find_stragglers(times: Sequence[float], factor: float) -> list[int]:
    """Indices whose time exceeds `factor` times the low median of `times`."""
    if len(times) < 2:
        return []
    ref = statistics.median_low(times)
    if ref <= 0:
        return []
    return [i for i, t in enumerate(times) if t > factor * ref]


def _blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    layers = getattr(model, "layers", None)
    return [(f"layers.{k}", m) for k, m in layers.items()] if isinstance(layers, nn.ModuleDict) else []


def _done(beat: dict[str, Any]) -> int:
    return beat["step"] - 1 if beat.get("in_step", True) else beat["step"]


def hang_report(beats: dict[int, dict[str, Any] | None], *, world: int, timeout_s: float, now: float) -> str:
    """The message for a hang from every rank's last heartbeat (None: that rank wrote none)."""
    missing = [r for r in range(world) if beats.get(r) is None]
    present = {r: b for r, b in beats.items() if b is not None}
    lines = [f"hang: no progress for {timeout_s:g} s (watchdog.collective_timeout_s); the job ends."]
    if present:
        low = min((b["step"], b["event_index"]) for b in present.values())
        stuck = sorted(r for r, b in present.items() if (b["step"], b["event_index"]) == low)
        if len(stuck) == len(present) and not missing and world > 1:
            lines.append("Every rank stopped at the same point, so none is behind the others: the stall is in "
                         "the collective they all wait in, or in the network.")
        for r in stuck:
            b = present[r]
            lines.append(f"Stuck: rank {r} ({b['host']}, pid {b['pid']}): last completed step {_done(b)}; "
                         f"in step {b['step']} at '{b['event']}' for {now - b['event_time']:.1f} s, and never reached "
                         "the collective the other ranks wait in")
        for r, b in sorted(present.items()):
            if r not in stuck:
                lines.append(f"  rank {r} ({b['host']}): last completed step {_done(b)}; in step {b['step']}, last "
                             f"completed '{b['event']}' {now - b['event_time']:.1f} s ago, blocked in the next "
                             "collective after it")
    for r in missing:
        lines.append(f"Stuck: rank {r} wrote no heartbeat (it died or never started a step)")
    return "\n".join(lines)


class Watchdog:
    """Per-rank progress, hang detection and straggler gathering; every method is cheap when off."""

    def __init__(self, cfg: WatchdogConfig, *, out_dir: Path, models: Sequence[nn.Module] = (),
                 faults: Faults | None = None, log: Callable[[str], None] = print, compiled: bool = False):
        self.cfg, self.log = cfg, log
        self.faults = faults or Faults()
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.dir = Path(out_dir) / "heartbeat"
        self.report_path = Path(out_dir) / "hang-report.json"
        self.step, self.event, self.event_index = 0, "not started", 0
        self.event_time = time.time()
        self.in_step = False
        self.busy = 0.0  # seconds inside block forwards this step
        self._block_t0 = 0.0
        self.window: list[tuple[float, float]] = []  # (step seconds, busy seconds) since the last gather
        self.hooks: list[Any] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.hooked = False
        if cfg.collective_timeout_s or cfg.straggler_every or self.faults:
            for model in models:  # several pipeline stages on a rank: each is hooked
                self._hook(model, blocks=not compiled)
        if cfg.collective_timeout_s:
            self.dir.mkdir(parents=True, exist_ok=True)
            self.interval = min(1.0, cfg.collective_timeout_s / 5)
            self._thread = threading.Thread(target=self._watch, name="herd-watchdog", daemon=True)
            self._thread.start()

    # ---- progress ----------------------------------------------------------------------------

    def _hook(self, model: nn.Module, *, blocks: bool) -> None:
        # Every hook returns None explicitly: a forward pre-hook's return value replaces the
        # module's inputs, a forward hook's its output, a tensor hook's the gradient.
        def root(module, args) -> None:
            self.mark("forward")

        self.hooks.append(model.register_forward_pre_hook(root, prepend=True))
        if not blocks:
            return
        self.hooked = True
        for name, block in _blocks(model):
            def enter(module, args, name=name) -> None:
                self._enter(name)

            def leave(module, args, out, name=name) -> None:
                self._leave(name, out)

            self.hooks.append(block.register_forward_pre_hook(enter))
            self.hooks.append(block.register_forward_hook(leave))

    def _enter(self, name: str) -> None:
        self.mark(f"forward of {name}")
        self._block_t0 = time.perf_counter()
        if self.faults:
            sleep(self.faults.slow_seconds(self.step))  # inside the busy time: a slow device

    def _leave(self, name: str, out: Any) -> None:
        self.busy += time.perf_counter() - self._block_t0
        self.mark(f"forward of {name} done")
        if isinstance(out, torch.Tensor) and out.requires_grad:
            def backward(grad, name=name) -> None:
                self.mark(f"backward of {name}")

            out.register_hook(backward)

    def mark(self, event: str) -> None:
        """Record progress; fault injection may stall here."""
        with self._lock:
            self.event, self.event_time = event, time.time()
            self.event_index += 1
        if self.faults:
            sleep(self.faults.stall_seconds(self.step, event))

    def step_begin(self, step: int) -> None:
        with self._lock:
            self.step, self.event_index, self.in_step = step, 0, True
        self.busy = 0.0
        self.mark("step start")

    def step_end(self, step: int, seconds: float, metrics: Any = None) -> list[int]:
        """End of a step: straggler gather every `straggler_every` steps (collective); returns the stragglers."""
        self.mark("step end")
        self.in_step = False
        every = self.cfg.straggler_every
        if not every:
            return []
        self.window.append((seconds, self.busy if self.hooked else seconds))
        if step % every:
            return []
        with self.phase("collective: all-gather of step times (straggler check)"):
            mine = torch.tensor([sum(s for s, _ in self.window), sum(b for _, b in self.window)],
                                dtype=torch.float64) / len(self.window)
            if self.world > 1:
                out = [torch.zeros_like(mine) for _ in range(self.world)]
                dist.all_gather(out, mine)
            else:
                out = [mine]
        self.window.clear()
        step_s = [float(t[0]) for t in out]
        busy_s = [float(t[1]) for t in out]
        slow = find_stragglers(busy_s, self.cfg.straggler_factor)
        if self.rank == 0 and metrics is not None:
            rec = {"step": step, "event": "step_times", "rank_step_s": step_s, "rank_busy_s": busy_s,
                   "stragglers": slow}
            log_event = getattr(metrics, "log_event", None)
            if log_event is not None:
                log_event(rec)
        if slow and self.rank == 0:
            ref = statistics.median_low(busy_s)
            self.log(f"straggler(s) at step {step}: " + ", ".join(
                f"rank {r} busy {busy_s[r]:.3f} s/step" for r in slow)
                + f" vs a median of {ref:.3f} s (watchdog.straggler_factor {self.cfg.straggler_factor:g}); "
                "the whole job runs at the slowest rank's pace")
        return slow

    def phase(self, name: str):
        """A context marking a phase of the step (entered and left as progress events)."""
        wd = self

        class _Phase:
            def __enter__(self):
                wd.mark(name)

            def __exit__(self, *exc):
                wd.mark(f"{name} done")
        return _Phase()

    # ---- the watchdog thread -----------------------------------------------------------------

    def _beat(self) -> dict[str, Any]:
        with self._lock:
            return {"rank": self.rank, "host": self.host, "pid": self.pid, "step": self.step,
                    "in_step": self.in_step, "event": self.event, "event_index": self.event_index,
                    "event_time": self.event_time, "time": time.time()}

    def _write_beat(self) -> None:
        atomic_write_json(self.dir / f"rank-{self.rank}.json", self._beat())

    def _read_beats(self) -> dict[int, dict[str, Any] | None]:
        beats: dict[int, dict[str, Any] | None] = {}
        for r in range(self.world):
            try:
                beats[r] = json.loads((self.dir / f"rank-{r}.json").read_text())
            except (OSError, json.JSONDecodeError):
                beats[r] = None
        return beats

    def _watch(self) -> None:
        timeout = self.cfg.collective_timeout_s
        while not self._stop.wait(self.interval):
            self._write_beat()
            with self._lock:
                stalled = self.in_step and time.time() - self.event_time > timeout
            if stalled:
                self._die(timeout)

    def _die(self, timeout: float) -> None:
        self._write_beat()
        time.sleep(self.interval * 1.5)  # every rank's file has been rewritten since the stall began
        report = hang_report(self._read_beats(), world=self.world, timeout_s=timeout, now=time.time())
        report = f"rank {self.rank} watchdog: {report}"
        try:
            atomic_write_text(self.report_path.with_name(f"hang-report-rank{self.rank}.txt"), report + "\n")
            if self.rank == 0 or not self.report_path.exists():
                atomic_write_json(self.report_path, {"rank": self.rank, "report": report,
                                                     "heartbeats": self._read_beats()})
        finally:
            print(f"herd train: {report}", file=sys.stderr, flush=True)
            os._exit(HANG_EXIT_CODE)  # the main thread is blocked in a collective: only an exit ends it

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        for h in self.hooks:
            h.remove()
        self.hooks.clear()
