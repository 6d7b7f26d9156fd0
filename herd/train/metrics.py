"""What a run reports: per-step loss, learning rate, gradient norm, tokens/s and MFU; validation loss.

Four sinks, all fed from the same records: `metrics.jsonl` (one JSON object per step or
validation, the source of truth; a restart truncates it back to the resumed step so the file
reads as one uninterrupted run, and keeps what it cut in `dropped` for the effective-time
account of herd.train.goodput), a console line every `log_every` steps under a tqdm progress
bar, TensorBoard event files, and `loss.png`, redrawn at each validation and stage end and
replaced atomically so a viewer never sees half a PNG.

MFU divides achieved FLOP/s (ModelArgs.flops_per_token x tokens/s) by a peak *measured* once at
start with a large matmul in the training dtype (fp32 on CPU, bf16 on GPU), not a datasheet
number: on a shared 2-core CPU the datasheet says little, and a measured peak makes the ratio
mean "how close to the best this machine's matmul kernel can do".
"""

from __future__ import annotations

import io
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from herd.io import atomic_write_bytes, atomic_write_text, read_records
from herd.train.config import MetricsConfig


_PEAKS: dict[tuple, float] = {}


def measure_matmul_peak(device: torch.device, dtype: torch.dtype, *, size: int | None = None,
                        seconds: float = 1.0, cached: bool = True, cache_file: Path | None = None) -> float:
    """Best FLOP/s of a square matmul in `dtype` on `device` over about `seconds` of trials.

    Measured once per process and device/dtype/size (each measurement costs a few seconds, and a
    process that builds several trainers, like the demo or a test run, would pay it each time);
    `cached=False` measures again, e.g. for a benchmark that brackets its run with two readings.

    cache_file: a JSON file that keeps the measurement across processes (the trainer passes one in
    its run directory, so a job restarted after a fault does not measure again: ~1 s of every
    restart on our CPUs). Its key names the host, the device and its model, the thread count,
    dtype, size and torch version, so a restart on other hardware or software measures afresh.
    """
    n = size or (2048 if device.type == "cpu" else 8192)
    key = (str(device), dtype, n)
    if cached and key in _PEAKS:
        return _PEAKS[key]
    file_key = _peak_file_key(device, dtype, n) if cached and cache_file is not None else None
    known = _read_peaks(cache_file) if file_key is not None else {}
    if file_key in known:
        _PEAKS[key] = float(known[file_key])
        return _PEAKS[key]
    peak = _measure(device, dtype, n, seconds)
    if cached:
        _PEAKS[key] = peak
    if file_key is not None:
        # Merged with what is there (other ranks' hosts); two ranks writing at once lose nothing that
        # matters: the loser's key is measured again at its next start.
        atomic_write_text(cache_file, json.dumps({**_read_peaks(cache_file), file_key: peak}, indent=1))
    return peak


def _peak_file_key(device: torch.device, dtype: torch.dtype, n: int) -> str:
    import platform
    import socket

    model = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    return (f"{socket.gethostname()}|{device}|{model}|{dtype}|n={n}|threads={torch.get_num_threads()}"
            f"|torch {torch.__version__}")


def _read_peaks(path: Path) -> dict[str, float]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}  # absent or damaged: measure (and rewrite it)
    return {k: v for k, v in data.items() if isinstance(v, (int, float)) and v > 0} if isinstance(data, dict) else {}


def _measure(device: torch.device, dtype: torch.dtype, n: int, seconds: float) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b  # warm-up: first-call kernel selection and page faults
    sync()
    best, deadline = math.inf, time.perf_counter() + seconds
    trials = 0
    while trials < 3 or time.perf_counter() < deadline:
        t = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t)
        trials += 1
    return 2 * n**3 / best


@dataclass
class StepRecord:
    step: int  # optimizer steps completed
    stage: str
    loss: float
    lr: float
    grad_norm: float
    tokens_seen: int
    batch_tokens: int
    seq_len: int
    tokens_per_s: float
    mfu: float
    seconds: float  # wall time of the step alone (batch, forward, backward, update)
    time: float = 0.0  # Unix time at the step's end: which run (and which restart) produced it


class MetricsLogger:
    """Fans records out to the sinks. `start_step` > 0 means a resumed run."""

    def __init__(self, out_dir: Path, cfg: MetricsConfig, *, total_steps: int, start_step: int,
                 stage_bounds: list[tuple[str, int]]):
        self.out_dir, self.cfg = Path(out_dir), cfg
        self.total_steps = total_steps
        self.stage_bounds = stage_bounds  # (name, first step) per stage, for the plot
        self.jsonl = self.out_dir / "metrics.jsonl"
        self.plot_path = self.out_dir / "loss.png"
        self.dropped: list[dict[str, Any]] = []  # step records cut by _restore: work a restart redoes
        self.history = self._restore(start_step)
        self._tb = None
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events a killed run wrote after its last checkpoint; also from step 1
            # when it died before its first one (a restart then begins again at step 1).
            self._tb = SummaryWriter(log_dir=str(self.out_dir / "tensorboard"), purge_step=start_step + 1)
        self._bar = None
        if cfg.progress:
            from tqdm import tqdm

            # disable=None: no bar when stderr is not a terminal (logs and CI get the lines only).
            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                             file=sys.stderr, leave=False, disable=None)

    def _restore(self, start_step: int) -> list[dict[str, Any]]:
        """Records up to the resumed step; anything later was written by steps that will be redone."""
        if not self.jsonl.is_file():
            return []
        keep = []
        for rec in read_records(self.jsonl):  # without the half-written last line of a killed run
            # Anomaly records stay: they happened, and a rollback's skipped data stays skipped.
            if rec.get("step", 0) <= start_step or "anomaly" in rec:
                keep.append(rec)
            elif "loss" in rec:
                self.dropped.append(rec)
        atomic_write_text(self.jsonl, "".join(json.dumps(r) + "\n" for r in keep))
        return keep

    def _append(self, rec: dict[str, Any]) -> None:
        self.history.append(rec)
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(rec) + "\n")

    def log_step(self, r: StepRecord) -> None:
        self._append(asdict(r))
        if self._tb is not None:
            for name in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu"):
                self._tb.add_scalar(f"train/{name}", getattr(r, name), r.step)
            self._tb.add_scalar("train/tokens_seen", r.tokens_seen, r.step)
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix_str(f"{r.stage} loss {r.loss:.4f}", refresh=False)
        if r.step % self.cfg.log_every == 0 or r.step == self.total_steps:
            self.write(
                f"step {r.step:>6}/{self.total_steps} | {r.stage} | loss {r.loss:.4f} | lr {r.lr:.2e} | "
                f"gnorm {r.grad_norm:.3f} | {r.tokens_per_s:,.0f} tok/s | mfu {100 * r.mfu:.1f}% | "
                f"seq {r.seq_len} x {r.batch_tokens // r.seq_len}")

    def log_event(self, rec: dict[str, Any]) -> None:
        """A record other than a step or a validation (e.g. per-rank step times); jsonl only."""
        self._append(rec)

    def log_val(self, step: int, stage: str, loss: float, *, name: str = "val_loss") -> None:
        self._append({"step": step, "stage": stage, name: loss})
        if self._tb is not None:
            self._tb.add_scalar(f"val/{name}", loss, step)
        self.write(f"step {step:>6}/{self.total_steps} | {stage} | {name.replace('_', ' ')} {loss:.4f}")
        self.plot()

    def log_anomaly(self, stage: str, record: dict[str, Any]) -> None:
        """A skipped update or a rollback (herd.train.anomaly.AnomalyRecord as a dict): always printed."""
        rec = {"step": record["step"], "stage": stage, "anomaly": record["kind"],
               **{k: v for k, v in record.items() if k not in ("step", "kind")}}
        self._append(rec)
        if self._tb is not None:
            self._tb.add_scalar(f"anomaly/{record['kind']}", record["value"], record["step"])
        what = ("gradient norm" if record["kind"] == "nonfinite_grad" else
                "loss" if record["kind"] != "rollback" else "")
        if record["kind"] == "rollback":
            detail = (f"{record['threshold']:g} anomalous steps in a row: rolled back to the checkpoint of step "
                      f"{record['value']:g} and skipping the data of the streak")
        else:
            bound = f" > {record['threshold']:.4f}" if record["kind"] == "loss_spike" else ""
            outcome = ("recomputed from the same batch and weights: finite, a transient fault; update applied"
                       if record.get("action") == "retried" else "update skipped")
            detail = f"{what} {record['value']:.4f}{bound} on {record['ranks']} of {record['world']} rank(s); {outcome}"
        self.write(f"step {record['step']:>6}/{self.total_steps} | {stage} | {record['kind']}: {detail}")

    def rewind(self, step: int) -> list[dict[str, Any]]:
        """A rollback to the checkpoint of `step`: later step and validation records will be redone.
        Returns the step records cut (replayed work, for herd.train.goodput)."""
        cut = [r for r in self.history if r.get("step", 0) > step and "loss" in r and "anomaly" not in r]
        self.history = [r for r in self.history if r.get("step", 0) <= step or "anomaly" in r]
        atomic_write_text(self.jsonl, "".join(json.dumps(r) + "\n" for r in self.history))
        if self._bar is not None:
            self._bar.n = step
            self._bar.refresh()
        return cut

    def write(self, line: str) -> None:
        if self._bar is not None:
            self._bar.write(line, file=sys.stdout)
        else:
            print(line, flush=True)

    def plot(self) -> Path | None:
        """Training loss (and validation loss) against step, with stage boundaries; atomic PNG."""
        if not self.cfg.plot:
            return None
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        train = [(r["step"], r["loss"]) for r in self.history if "loss" in r]
        val = [(r["step"], r["val_loss"]) for r in self.history if "val_loss" in r]
        fig = Figure(figsize=(8, 4.5), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        if train:
            ax.plot(*zip(*train), lw=0.8, label="train loss")
        if val:
            ax.plot(*zip(*val), "o-", ms=3, label="validation loss")
        for name, start in self.stage_bounds:
            ax.axvline(start, color="grey", ls=":", lw=0.8)
            ax.text(start, 1.0, f" {name}", transform=ax.get_xaxis_transform(), va="top", fontsize=8)
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        atomic_write_bytes(self.plot_path, buf.getvalue())
        return self.plot_path

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
