"""Anomalies in the training step: skip the update, catch loss spikes, roll back past bad data.

The Llama 3 405B run met 466 interruptions in 54 days and kept >90% effective training time
because detection and recovery were automatic. This module is the part that lives inside the
step, before the optimizer touches the weights (`TrainCore._update` asks `AnomalyGuard.check`):

* **Non-finite loss or gradient norm, or a loss spike: skip the update.** The gradients are
  zeroed and `optimizer.step()` is not called, but the step counter, the data and the learning
  rate schedule (a function of the step) still advance, as in the paper: the batch is treated as
  seen. AdamW's own step count does not advance, so its bias correction is that of the updates
  actually made. Every rank must take the same decision or FSDP shards would drift apart, so the
  0/1 flags of every rank are summed with one all-reduce over the whole world (a sum rather than
  a max: the decision is the same, "any rank > 0", and the record can say how many ranks saw it).
* **Non-finite: first recompute.** A NaN or inf from a transient fault (a flipped bit in an
  activation, a flaky kernel, the silent data corruption the paper names as a leading cause)
  does not come back when the same micro-batches are run again from the same weights and RNG
  state; one from the data does. So a non-finite step is recomputed `retry_nonfinite` times
  (default once) before it counts: a finite recomputation is applied as the step's update, and
  the run stays bit-identical to one that never met the fault (recorded with action "retried");
  only a step that is non-finite again is skipped. The decision is agreed like the skip: every
  rank sees the same summed flags, so every rank recomputes. Loss spikes are not retried: a
  spike is a finite loss, data-caused as far as anyone can tell, and recomputing it costs a step.
* **Loss spike**: the loss is above both `median + spike_threshold * 1.4826 * MAD` and
  `spike_ratio * median` of the last `window` good losses of the stage. Median and MAD ignore
  the outliers they are meant to catch; the median lags a falling curve, so the ordinary descent
  never looks like a spike; the ratio keeps a flat curve's tiny MAD from flagging noise. The
  statistic starts afresh at each stage (context extension and annealing change the loss level)
  and only after `warmup` good steps.
* **Rollback**: `max_consecutive` anomalous steps in a row mean the data, not a transient fault,
  is the likely cause. The trainer reloads the newest checkpoint (never one written during the
  streak: a checkpoint due at a skipped update waits for the next good step), replays the good steps up to
  the streak, and jumps the loader over the streak's batches: the window from the loader state
  at the streak's first step to the state after its last. The window is written to
  `anomaly-skips.json` beside the checkpoints *before* the rollback and is carried in every later
  checkpoint, so a run killed after a rollback and resumed, from any checkpoint, skips the same
  data and continues exactly like the run that was not killed. Without any checkpoint yet the
  run stops with an error; the window is already recorded, so rerunning the same command trains
  from initialisation and skips it. `max_rollbacks` rollbacks to the same checkpoint stop the run.

The loader's own state is untouched: a window is a pair of loader states, compared for
equality before each step, so it works for any loader whose `state_dict()` is JSON-able (the
packed loader's is a few integers) and a resume under another layout still matches.

Injecting faults (tests and benchmarks/faults.py; deliberately not a config key, so no user
config can poison a run): build a `FaultInjector`, list the faults, install it on a trainer::

    FaultInjector().nan_grad(step=7, rank=1).scale_loss(step=12, factor=10.0).install(trainer)

Each fault fires once, at the optimizer step numbered `step` (1-based, as logged), on `rank` (or
every rank), between backward and the anomaly check, so everything downstream is the real code.
A fault that fired is gone, so the recomputation of a non-finite step (`retry_nonfinite`) no
longer sees it: a one-time fault is a transient one. List it twice for a fault the recomputation
meets again (a poisoned batch), and once more per rollback replay.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from herd.io import atomic_write_json
from herd.train.config import AnomalyConfig

LEDGER = "anomaly-skips.json"  # beside checkpoints/ in job.out_dir
KINDS = ("nonfinite_loss", "nonfinite_grad", "loss_spike")  # the order of the agreed flags; first wins a record
STATE_VERSION = 1


class AnomalyStop(FloatingPointError):
    """The run cannot recover by itself (no checkpoint to roll back to, or too many rollbacks)."""


@dataclass
class AnomalyRecord:
    """One line of metrics.jsonl (with "anomaly": kind) and of the console."""

    kind: str  # nonfinite_loss | nonfinite_grad | loss_spike | rollback
    step: int  # the optimizer step it happened at (rollback: the step the streak ended at)
    value: float  # the loss or gradient norm seen; rollback: the checkpoint step rolled back to
    threshold: float  # loss_spike: the bound crossed; non-finite: inf; rollback: max_consecutive
    ranks: int  # ranks that saw it; the decision (skip) was every rank's
    world: int
    action: str  # "skip": update skipped; "rollback": reloaded a checkpoint and skipped data;
    #              "retry": about to recompute; "retried": the recomputation was finite and was applied


@dataclass
class Verdict:
    """What every rank decided about one step that was not clean."""

    record: AnomalyRecord
    rollback: bool  # the streak reached max_consecutive
    retry: bool = False  # non-finite and retries are left: recompute the step instead of skipping it


@dataclass
class SkipWindow:
    """Data never trained on: the loader jumps from `start` to `end` (both loader states)."""

    loader_key: str  # which sources/weights the loader read (Trainer.loader_key)
    start: dict[str, Any]  # loader state before the streak's first step
    end: dict[str, Any]  # loader state after its last step
    first_step: int
    last_step: int
    rollback_to: int  # the checkpoint step the run went back to; -1: none existed


def _canon(state: dict[str, Any]) -> str:
    try:
        return json.dumps(state, sort_keys=True)
    except TypeError as e:
        raise ValueError(f"rolling back past bad data needs a loader whose state_dict() is JSON-serialisable "
                         f"({e}); set anomaly.max_consecutive = 0 to turn rollbacks off") from None


def _dist() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class SpikeDetector:
    """Median and MAD of the last `window` good losses; `bound()` is None until `warmup` of them."""

    def __init__(self, *, threshold: float, ratio: float, window: int, warmup: int):
        self.threshold, self.ratio, self.warmup = threshold, ratio, warmup
        self.values: deque[float] = deque(maxlen=window)
        self.seen = 0  # good losses since the last reset (the window keeps only the newest)

    def bound(self) -> float | None:
        if self.seen < self.warmup or not self.values:
            return None
        med = statistics.median(self.values)
        mad = statistics.median(abs(v - med) for v in self.values)
        return max(med + self.threshold * 1.4826 * mad, self.ratio * med)

    def is_spike(self, loss: float) -> tuple[bool, float]:
        bound = self.bound()
        return (bound is not None and loss > bound), (math.inf if bound is None else bound)

    def add(self, loss: float) -> None:
        self.values.append(loss)
        self.seen += 1

    def reset(self) -> None:
        self.values.clear()
        self.seen = 0

    def state_dict(self) -> dict[str, Any]:
        return {"values": list(self.values), "seen": self.seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.values.clear()
        self.values.extend(float(v) for v in state["values"])
        self.seen = int(state["seen"])


class AnomalyGuard:
    """The decisions of one rank; every method that decides is collective in a distributed run.

    ledger: `anomaly-skips.json` of the run (None: windows live only in memory and checkpoints).
    """

    def __init__(self, cfg: AnomalyConfig, *, device: torch.device, ledger: Path | None = None,
                 log: Callable[[str], None] = print):
        self.cfg, self.device, self.ledger, self.log = cfg, device, ledger, log
        self.spikes = (SpikeDetector(threshold=cfg.spike_threshold, ratio=cfg.spike_ratio, window=cfg.window,
                                     warmup=cfg.warmup) if cfg.spike_threshold > 0 else None)
        self.consecutive = 0
        self.stage = -1
        self.counts: Counter[str] = Counter()  # this process's anomalies by kind, for the run summary
        self.windows: list[SkipWindow] = self._read_ledger()
        self._step_start: tuple[int, str, dict[str, Any]] | None = None  # (step, loader key, state) of this step
        self._streak_start: tuple[int, str, dict[str, Any]] | None = None
        if self.windows:
            self.log(f"{len(self.windows)} data window(s) recorded in {ledger} will be skipped when reached")

    # ---- the step (called by TrainCore) ------------------------------------------------------

    def check(self, *, step: int, loss: float, grad_norm: float, retry: bool = False) -> Verdict | None:
        """None for a clean step (its loss joins the statistic), else every rank's agreed verdict.

        retry: the caller can recompute the step; a non-finite verdict then says `retry` and
        changes no state (the streak, the counts), since the step may yet turn out clean."""
        spike, bound = self.spikes.is_spike(loss) if self.spikes is not None else (False, math.inf)
        flags = [not math.isfinite(loss), not math.isfinite(grad_norm), spike]
        counts = torch.tensor(flags, dtype=torch.float32, device=self.device)
        world = 1
        if _dist():
            dist.all_reduce(counts, op=dist.ReduceOp.SUM)
            world = dist.get_world_size()
        counts = [int(c) for c in counts.tolist()]
        if not any(counts):
            self.consecutive = 0
            self._streak_start = None
            if self.spikes is not None:
                self.spikes.add(loss)
            return None
        kind = next(k for k, c in zip(KINDS, counts) if c)
        value = grad_norm if kind == "nonfinite_grad" else loss
        if kind != "loss_spike" and not flags[KINDS.index(kind)]:
            value = math.nan  # another rank saw it; this rank's own value is finite and beside the point
        threshold = bound if kind == "loss_spike" else math.inf
        if retry and kind != "loss_spike":
            return Verdict(AnomalyRecord(kind=kind, step=step, value=value, threshold=threshold,
                                         ranks=counts[KINDS.index(kind)], world=world, action="retry"),
                           rollback=False, retry=True)
        self.consecutive += 1
        if self.consecutive == 1:
            self._streak_start = self._step_start
        self.counts[kind] += 1
        record = AnomalyRecord(kind=kind, step=step, value=value, threshold=threshold, ranks=counts[KINDS.index(kind)],
                               world=world, action="skip")
        return Verdict(record, rollback=0 < self.cfg.max_consecutive <= self.consecutive)

    def transient(self, first: AnomalyRecord) -> AnomalyRecord:
        """The step whose first computation was `first` (a retry verdict) recomputed finite and was
        applied: the record says so; the streak is unaffected (the step was clean)."""
        self.counts["transient"] += 1
        return AnomalyRecord(**{**asdict(first), "action": "retried"})

    # ---- the trainer's hooks -----------------------------------------------------------------

    def enter_stage(self, index: int) -> None:
        """A new stage starts a new statistic (its loss level differs); a resume mid-stage keeps it."""
        if index != self.stage:
            self.stage = index
            self.consecutive = 0
            self._streak_start = None
            if self.spikes is not None:
                self.spikes.reset()

    def before_step(self, step: int, loader: Any, loader_key: str) -> None:
        """Jump over any recorded window that starts here, then remember where this step starts."""
        state = loader.state_dict() if self.cfg.max_consecutive or self.windows else None
        if state is None:
            return  # rollbacks are off and nothing is recorded: no loader state needed
        pending = list(self.windows)  # each window at most once: back-to-back windows chain, none can loop
        while True:
            match = next((w for w in pending if w.loader_key == loader_key and _canon(w.start) == _canon(state)), None)
            if match is None:
                break
            pending.remove(match)
            loader.load_state_dict(json.loads(json.dumps(match.end)))  # a copy: the loader may keep it
            state = loader.state_dict()
            self.log(f"step {step}: skipping the data of steps {match.first_step}-{match.last_step} (recorded at a "
                     f"rollback to step {match.rollback_to})")
        self._step_start = (step, loader_key, state)

    def plan_rollback(self, *, step: int, loader: Any, checkpoint_step: int | None) -> SkipWindow:
        """Record the streak's data as skipped (ledger first) and say where to go back to.

        Raises AnomalyStop when there is no checkpoint to go back to, or after `max_rollbacks`
        rollbacks to the same one.
        """
        assert self._streak_start is not None, "a rollback needs Trainer's before_step hook to have run"
        first, key, start = self._streak_start
        end = loader.state_dict()
        _canon(end)
        target = -1 if checkpoint_step is None else checkpoint_step
        assert target < first, f"checkpoint {target} lies inside the anomalous streak {first}-{step}"
        earlier = sum(1 for w in self.windows if w.rollback_to == target)
        if checkpoint_step is not None and earlier >= self.cfg.max_rollbacks:
            raise AnomalyStop(f"step {step}: {self.consecutive} anomalous steps in a row, and the run has already "
                              f"rolled back to the checkpoint of step {target} {earlier} time(s) "
                              f"(anomaly.max_rollbacks); the trouble is not in the data: look at the anomaly records "
                              "in metrics.jsonl and restart with a lower optim.lr or longer schedule.warmup_steps")
        window = SkipWindow(loader_key=key, start=start, end=end, first_step=first, last_step=step, rollback_to=target)
        self.windows.append(window)
        self._write_ledger()
        if checkpoint_step is None:
            raise AnomalyStop(f"step {step}: {self.consecutive} anomalous steps in a row before the first checkpoint, "
                              f"so there is nothing to roll back to; the data of steps {first}-{step} is recorded in "
                              f"{self.ledger}: rerun the same command to train from initialisation without it")
        self.counts["rollback"] += 1
        return window

    def rollback_record(self, window: SkipWindow) -> AnomalyRecord:
        return AnomalyRecord(kind="rollback", step=window.last_step, value=window.rollback_to,
                             threshold=self.cfg.max_consecutive, ranks=dist.get_world_size() if _dist() else 1,
                             world=dist.get_world_size() if _dist() else 1, action="rollback")

    # ---- state -------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "stage": self.stage, "consecutive": self.consecutive,
                "spikes": self.spikes.state_dict() if self.spikes is not None else None,
                "streak_start": self._streak_start, "windows": [asdict(w) for w in self.windows]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take a checkpoint's statistic; windows are only ever added (the ledger may know newer ones)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"anomaly state version {state.get('version')!r} is not {STATE_VERSION}")
        self.stage, self.consecutive = int(state["stage"]), int(state["consecutive"])
        self._streak_start = state["streak_start"]
        if self.spikes is not None:
            if state["spikes"] is not None:
                self.spikes.load_state_dict(state["spikes"])
            else:  # saved with the spike check off: start its statistic now
                self.spikes.reset()
        self.windows = _merge(self.windows, (SkipWindow(**w) for w in state["windows"]))

    def _read_ledger(self) -> list[SkipWindow]:
        windows: list[SkipWindow] = []
        if self.ledger is not None and (not _dist() or dist.get_rank() == 0) and self.ledger.is_file():
            try:
                windows = [SkipWindow(**w) for w in json.loads(self.ledger.read_text())["windows"]]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{self.ledger} is not a valid record of skipped data ({e}); herd train writes it "
                                 "at rollbacks: restore it, or delete it to train on that data again") from None
        if _dist():
            box = [windows]
            dist.broadcast_object_list(box, src=0)
            windows = box[0]
        return windows

    def _write_ledger(self) -> None:
        if self.ledger is not None and (not _dist() or dist.get_rank() == 0):
            atomic_write_json(self.ledger, {"version": STATE_VERSION, "windows": [asdict(w) for w in self.windows]})


def _merge(mine: list[SkipWindow], theirs: Iterable[SkipWindow]) -> list[SkipWindow]:
    seen = {(w.loader_key, _canon(w.start)) for w in mine}
    return mine + [w for w in theirs if (w.loader_key, _canon(w.start)) not in seen]


@dataclass
class _Fault:
    kind: str  # nan_grad | nan_loss | scale_loss
    rank: int | None
    factor: float = 1.0


@dataclass
class FaultInjector:
    """Faults for tests and benchmarks, fired once each at a chosen optimizer step (see the module doc)."""

    faults: dict[int, list[_Fault]] = field(default_factory=dict)
    fired: list[tuple[int, str]] = field(default_factory=list)  # (step, kind) in firing order

    def nan_grad(self, step: int, *, rank: int | None = None) -> FaultInjector:
        """One parameter's gradient (this rank's shard of it) becomes NaN."""
        return self._add(step, _Fault("nan_grad", rank))

    def nan_loss(self, step: int, *, rank: int | None = None) -> FaultInjector:
        """The loss this rank checks becomes NaN (the gradients stay finite)."""
        return self._add(step, _Fault("nan_loss", rank))

    def scale_loss(self, step: int, factor: float, *, rank: int | None = None) -> FaultInjector:
        """The loss and every gradient times `factor`, as if the loss had been scaled before backward."""
        return self._add(step, _Fault("scale_loss", rank, factor))

    def _add(self, step: int, fault: _Fault) -> FaultInjector:
        if step < 1:
            raise ValueError(f"faults fire at optimizer steps numbered from 1, got step {step}")
        self.faults.setdefault(step, []).append(fault)
        return self

    def install(self, target: Any) -> FaultInjector:
        """On a `Trainer` (its core) or a `TrainCore`."""
        core = getattr(target, "core", target)
        if not hasattr(core, "injector"):
            raise ValueError(f"install a FaultInjector on a Trainer or TrainCore, not {type(target).__name__}")
        core.injector = self
        return self

    @torch.no_grad()
    def apply(self, step: int, params: list[torch.nn.Parameter], loss: torch.Tensor) -> torch.Tensor:
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        pending = self.faults.get(step, [])
        kinds: set[str] = set()
        for fault in [f for f in pending if f.rank is None or f.rank == rank]:
            if fault.kind in kinds:
                continue  # a fault listed twice fires at two visits of the step (after a rollback)
            kinds.add(fault.kind)
            pending.remove(fault)
            self.fired.append((step, fault.kind))
            if fault.kind == "nan_loss":
                loss = loss * math.nan
            elif fault.kind == "scale_loss":
                loss = loss * fault.factor
                for p in params:
                    if p.grad is not None:
                        p.grad.mul_(fault.factor)
            else:
                grads = [p.grad for p in params if p.grad is not None]
                local = [g.to_local() if hasattr(g, "to_local") else g for g in grads]  # DTensor: this rank's shard
                next(g for g in local if g.numel()).fill_(math.nan)
        return loss
