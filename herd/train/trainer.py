"""The pretraining loop: stages of AdamW steps over packed batches, checkpointed and resumable.

One `Trainer` runs every stage of a config in order (pretrain, context extension, annealing),
each starting from the previous stage's final checkpoint. `train_step` is the whole algorithm;
the rest is bookkeeping around it.

Design trade-offs:
* Everything that must survive a restart lives in `state_dict()` (model, optimizer, step,
  tokens seen, loader position, RNG states) and nothing else is read back. The learning rate and
  batch shape are functions of (step, tokens seen), so they need no state of their own. On CPU a
  run killed at any step and restarted with the same command reproduces the uninterrupted run's
  losses bit for bit (tests/integration/test_train_resume.py).
* Stage transitions go through disk even in an uninterrupted run: the stage's final checkpoint
  is saved and then loaded back. That is one redundant read per stage, and in exchange a run
  that crosses a stage boundary in one process and a run restarted exactly at the boundary take
  the same code path, and "the annealing stage starts from the pretrain checkpoint" is literal.
* The model is built on the meta device and materialised afterwards (`herd.model.build_model`);
  parallel layouts transform the meta model first (`herd.parallel.build_parallel_model`).
* The step itself (forward, loss, backward, clipping, the optimizer) is `herd.train.core`'s,
  the same for every layout and for post-training: gradients are token-weighted over the whole
  accumulated batch, so splitting a batch into micro-batches changes nothing but memory.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import os
import pickle
import random
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

from herd.model import Transformer, build_model
from herd.parallel import ParallelConfig, ParallelModel, build_parallel_model
from herd.parallel.launch import init_distributed, is_rank0
from herd.train import checkpoint as ckpt_io
from herd.train.anomaly import LEDGER, AnomalyGuard, AnomalyRecord, Verdict
from herd.train.average import average_checkpoints
from herd.train.checkpoint import Checkpointer, SavedCheckpoint
from herd.train.config import Config, config_to_dict, micro_batch_rows
from herd.train.core import TokenBatch, TrainCore, token_loss
from herd.train.export import TOKENIZER_FILE, save_inference_model
from herd.train.goodput import record_attempt, record_rollback
from herd.train.metrics import MetricsLogger, StepRecord, measure_matmul_peak
from herd.train.optim import build_optimizer
from herd.train.schedule import Schedule, StageSpan, batch_shape
from herd.train.sdc import SDC, Faults
from herd.train.watchdog import Watchdog


class Batch(Protocol):
    inputs: torch.Tensor  # (B, S) int64
    targets: torch.Tensor  # (B, S) int64, -100 = no target
    doc_ids: torch.Tensor  # (B, S) int64
    num_targets: int


class Loader(Protocol):
    def next_batch(self, *, batch_size: int | None = None, seq_len: int | None = None) -> Batch: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


PEAK_CACHE = ".matmul-peak.json"  # in job.out_dir: a restarted job reuses its measured peak (herd.train.metrics)
LoaderFactory = Callable[..., Loader]  # (sources, *, weights, seq_len, batch_size, seed) -> Loader
StepHook = Callable[["Trainer", int], None]  # (trainer, step about to run): called once its batch is drawn


def packed_loader(sources: Sequence[str], *, weights: Sequence[float] | None, seq_len: int, batch_size: int,
                  seed: int) -> Loader:
    from herd.data.loader import PackedLoader

    return PackedLoader(sources, weights=weights, seq_len=seq_len, batch_size=batch_size, seed=seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"job.device is {name!r} but no CUDA device is available; use \"cpu\" or \"auto\"")
    return device


def keep_freed_memory_in_the_heap() -> None:
    """On glibc, stop returning large freed blocks to the kernel (CPU training only).

    A training step allocates and frees the same large activation buffers every time. glibc
    serves blocks above 128 KiB with mmap and gives them back with munmap on free, so each step
    page-faults all of its activations in again: on our 2-core machines that was ~13% of the
    CPU time as system time, and steps ~20-30% slower (the same cure as running under jemalloc
    or tcmalloc, which PyTorch recommends for CPU training). The cost is a resident set that
    stays at its peak instead of shrinking between steps.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return  # not glibc (macOS, musl): their allocators do not have this problem to the same degree
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    libc.mallopt(m_mmap_threshold, 1 << 30)
    libc.mallopt(m_trim_threshold, 1 << 30)


class _NoMetrics:
    """The metrics sink of ranks other than 0 in a distributed run."""

    def log_step(self, record) -> None: ...
    def log_val(self, *args, **kwargs) -> None: ...
    def log_anomaly(self, *args, **kwargs) -> None: ...
    def rewind(self, step: int) -> list:
        return []
    def write(self, line: str) -> None: ...
    def close(self) -> None: ...
    def plot(self) -> None:
        return None


@dataclass
class StepResult:
    loss: float  # mean over the batch's target tokens, fp32
    lr: float
    grad_norm: float  # before clipping
    tokens: int  # input tokens in the batch
    anomaly: Verdict | None = None  # set: the update was skipped on every rank
    retried: AnomalyRecord | None = None  # set: non-finite at first, finite when recomputed (a transient fault)


@dataclass
class StageResult:
    name: str
    steps: int
    tokens: int
    seconds: float  # wall time of this stage in this process (0 if it was already done)
    final_loss: float | None
    val_loss: float | None
    checkpoint: str
    averaged: str | None = None  # directory of the averaged model, for stages with average_last
    averaged_val_loss: float | None = None


@dataclass
class TrainResult:
    steps: int
    tokens_seen: int
    seconds: float
    resumed_from: int  # step of the checkpoint this process started from (0 = fresh)
    stages: list[StageResult] = field(default_factory=list)
    loss_plot: str | None = None
    anomalies: dict[str, int] = field(default_factory=dict)  # by kind, in this process (herd.train.anomaly)


class Trainer:
    def __init__(self, cfg: Config, *, loader_factory: LoaderFactory = packed_loader,
                 log: Callable[[str], None] | None = None, faults: Faults | None = None,
                 step_hooks: Sequence[StepHook] = ()):
        self.started = time.time()  # for the effective-time account (herd.train.goodput)
        self.cfg = cfg
        self.step_hooks = list(step_hooks)  # observers of each step; herd.train.faultinject's faults use it
        self.log = log or (lambda msg: print(f"herd train: {msg}", file=sys.stderr, flush=True))
        self.loader_factory = loader_factory
        self.device = resolve_device(cfg.job.device)
        if self.device.type == "cpu":
            keep_freed_memory_in_the_heap()
        self.out_dir = Path(cfg.job.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.schedule = Schedule.from_config(cfg)
        # Issue 4's seam: under torchrun, or with a [parallel] section, the model goes through
        # herd.parallel (meta -> pipeline split, TP, CP, AC, compile, FSDP -> materialise), and
        # self.model is the module holding this rank's parameters under the full model's names.
        # Twice the watchdog's timeout: its report names the stuck rank, a bare collective timeout would not.
        self.meshes = init_distributed(cfg.parallel, self.device, timeout_s=2 * cfg.watchdog.collective_timeout_s)
        self.parallel: ParallelModel | None = None
        if self.meshes is not None or cfg.parallel != ParallelConfig():
            self.parallel = build_parallel_model(cfg.stage_args(0), cfg.parallel, self.meshes, device=self.device,
                                                 seed=cfg.job.seed, init_fn=build_model)
            self.model = self.parallel.module
            if not is_rank0():
                self.log = lambda msg: None
        else:
            # fp32 parameters: on GPU the forward runs under bf16 autocast with fp32 master weights.
            self.model = build_model(cfg.stage_args(0), device=self.device, seed=cfg.job.seed)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.anomaly = (AnomalyGuard(cfg.anomaly, device=self.device, ledger=self.out_dir / LEDGER, log=self.log)
                        if cfg.anomaly.enabled else None)
        self.core = TrainCore(self.model, self.optimizer, grad_clip=cfg.optim.grad_clip,
                              loss=token_loss(cfg.train.loss_chunks), parallel=self.parallel, device=self.device,
                              document_mask=cfg.train.document_mask, autocast=self._autocast,
                              hint="restart from the last checkpoint with a lower optim.lr or longer "
                                   "schedule.warmup_steps", guard=self.anomaly)
        # Silent data corruption, hangs and stragglers (herd.train.sdc, herd.train.watchdog); faults
        # are injected by tests and benchmarks only (HERD_SDC_FAULTS), never by a config.
        self.faults = faults if faults is not None else Faults.from_env()
        self.checkpointer = Checkpointer(self.out_dir / "checkpoints", keep_last=cfg.checkpoint.keep_last,
                                         log=self.log, verify_writes=cfg.sdc.verify_checkpoints,
                                         on_written=self.faults.checkpoint_written if self.faults else None,
                                         async_writes=cfg.checkpoint.async_save)
        self.watchdog = Watchdog(cfg.watchdog, out_dir=self.out_dir, faults=self.faults, log=self.log,
                                 models=self.parallel.parts if self.parallel is not None else [self.model],
                                 compiled=cfg.parallel.compile)
        parts = self.parallel.parts if self.parallel is not None else [self.model]
        self.sdc = SDC(cfg.sdc, model=self.model, optimizer=self.optimizer, faults=self.faults, log=self.log,
                       run_micro=lambda batch: self.core.forward_backward([batch]), outputs=parts,
                       mark=self.watchdog.mark)
        self.step = 0
        self.tokens_seen = 0
        self._checkpoint_owed = False  # a periodic checkpoint fell on a skipped update: write it at the next good step
        self.loader: Loader | None = None
        self.loader_key = ""  # which sources/weights the loader reads; its state only carries over if equal
        self._pending_loader_state: tuple[str, bytes] | None = None
        self.tokenizer = self._copy_tokenizer()
        self.metrics: MetricsLogger | None = None
        self.peak_flops = 0.0
        self.load_seconds = 0.0  # verifying and loading the checkpoint this process resumed from

    # ---- state -------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything a restart needs. Loader and RNG states are opaque pickled blobs: DCP then
        needs no knowledge of their structure to load them back."""
        loader_state = self.loader.state_dict() if self.loader is not None else None
        rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
        return {
            "model": self.model.state_dict(),
            "optim": (self.parallel.optimizer_state_dict(self.optimizer) if self.parallel is not None
                      else get_optimizer_state_dict(self.model, self.optimizer)),
            "train": {"step": self.step, "tokens_seen": self.tokens_seen, "loader_key": self.loader_key,
                      "loader": pickle.dumps(loader_state), "rng": pickle.dumps(rng),
                      "anomaly": pickle.dumps(self.anomaly.state_dict() if self.anomaly is not None else None)},
        }

    def load_checkpoint(self, ckpt: SavedCheckpoint) -> None:
        state = self.state_dict()
        if "train.anomaly" not in ckpt_io.saved_keys(ckpt.path):  # saved before [anomaly] existed
            del state["train"]["anomaly"]
        ckpt_io.load(ckpt.path, state)
        self.model.load_state_dict(state["model"])
        if self.parallel is not None:  # names a tied matrix as one process does (herd.parallel.tied)
            self.parallel.load_optimizer_state_dict(self.optimizer, state["optim"])
        else:
            set_optimizer_state_dict(self.model, self.optimizer, state["optim"])
        train = state["train"]
        self.step, self.tokens_seen = int(train["step"]), int(train["tokens_seen"])
        # The loader for the next stage may read other sources; it is rebuilt in _enter_stage,
        # which takes this state only if the sources match.
        self.loader, self.loader_key = None, ""
        self._pending_loader_state = (train["loader_key"], train["loader"])
        rng = pickle.loads(train["rng"])
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        anomaly = pickle.loads(train["anomaly"]) if "anomaly" in train else None
        if self.anomaly is not None and anomaly is not None:
            self.anomaly.load_state_dict(anomaly)

    def save_checkpoint(self, span: StageSpan, *, final: bool = False) -> SavedCheckpoint | None:
        """None: a periodic checkpoint written in the background (checkpoint.async_save); a stage's
        final one is always written before this returns (the next stage and export read it)."""
        meta = {"stage": span.name, "stage_index": span.index, "stage_final": final,
                "tokens_seen": self.tokens_seen, "model_args": dataclasses.asdict(self.model.args),
                "config": config_to_dict(self.cfg)}
        self._checkpoint_owed = False
        self.sdc.before_checkpoint(self.step)
        if self.cfg.checkpoint.async_save and not final:
            self.checkpointer.save_async(self.state_dict(), step=self.step, meta=meta)
            return None
        return self.checkpointer.save(self.state_dict(), step=self.step, meta=meta, keep=final)

    # ---- one step ------------------------------------------------------------------------------

    def _autocast(self):
        if self.device.type == "cuda":
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()  # fp32 on CPU: bf16 matmuls are slow without AVX-512 BF16

    def train_step(self, micro_batches: list[Batch]) -> StepResult:
        for hook in self.step_hooks:
            hook(self, self.step + 1)
        lr = self.schedule.lr(self.step)
        r = self.core.step(micro_batches, lr=lr, step=self.step + 1)
        self.step += 1  # a skipped update still counts: its data was read, the schedule moves on
        self.tokens_seen += r.tokens
        return StepResult(loss=r.loss, lr=lr, grad_norm=r.grad_norm, tokens=r.tokens, anomaly=r.anomaly,
                          retried=r.retried)

    # ---- evaluation ----------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, model: Transformer | None = None) -> float | None:
        """Mean loss per target token on the held-out split (the same batches every time)."""
        if not self.cfg.data.val:
            return None
        model = model or self.model
        m = self.cfg.metrics
        loader = self.loader_factory(self.cfg.data.val, weights=None, seq_len=self.cfg.val_seq_len,
                                     batch_size=m.val_batch_size, seed=self.cfg.job.seed)
        was_training = model.training
        model.eval()
        total, count = 0.0, 0
        for _ in range(m.val_batches):
            b = loader.next_batch()
            doc_ids = b.doc_ids.to(self.device) if self.cfg.train.document_mask else None
            with self._autocast():
                if model is self.model and self.parallel is not None:
                    total += self.parallel.loss_sum(b.inputs.to(self.device), b.targets.to(self.device),
                                                    doc_ids=doc_ids, loss_chunks=self.core.loss_chunks)
                    count += b.num_targets
                    continue
                # The training loss (chunked head with train.loss_chunks > 1), so validation never
                # holds the full (B, S, vocab) logits that the training step was configured to avoid.
                loss = token_loss(self.cfg.train.loss_chunks)(
                    model, TokenBatch(b.inputs.to(self.device), b.targets.to(self.device), doc_ids, b.num_targets))
            total += loss.item()
            count += b.num_targets
        model.train(was_training)
        return total / max(count, 1)

    # ---- the run -------------------------------------------------------------------------------

    def _copy_tokenizer(self) -> Path | None:
        if not self.cfg.data.tokenizer:
            return None
        src = Path(self.cfg.data.tokenizer)
        if not src.is_file():
            raise FileNotFoundError(f"data.tokenizer: {src} not found (it is the tokenizer.model the shards "
                                    "were made with)")
        dst = self.out_dir / TOKENIZER_FILE
        if is_rank0() and (not dst.is_file() or dst.read_bytes() != src.read_bytes()):
            shutil.copy2(src, dst)
        return dst

    def _enter_stage(self, span: StageSpan) -> None:
        stage = self.cfg.stages[span.index]
        args = self.cfg.stage_args(span.index)
        if args != self.model.args:  # context extension: a longer RoPE table, or a new theta / scaling
            self.model.args = args
            self.model.init_rope()
        sources, weights = self._mix(span.index)
        key = json.dumps([sources, weights])
        if self.loader is None or key != self.loader_key:
            shape = batch_shape(stage.ramp, self.tokens_seen)
            # A new mix gets its own seed (job.seed + the index of the stage that introduced it),
            # so a stage re-reading a source sees another order, and a restart rebuilds the same.
            first = span.index
            while first > 0 and self._mix(first - 1) == (sources, weights):
                first -= 1
            self.loader = self.loader_factory(sources, weights=weights, seq_len=shape.seq_len,
                                              batch_size=shape.rows, seed=self.cfg.job.seed + first)
            self.loader_key = key
            if self._pending_loader_state is not None and self._pending_loader_state[0] == key:
                self.loader.load_state_dict(pickle.loads(self._pending_loader_state[1]))
        self._pending_loader_state = None
        if self.anomaly is not None:
            self.anomaly.enter_stage(span.index)

    def _mix(self, index: int) -> tuple[list[str], list[float] | None]:
        stage = self.cfg.stages[index]
        if stage.train:
            return list(stage.train), list(stage.weights) or None
        return list(self.cfg.data.train), list(self.cfg.data.weights) or None

    def _next_micro_batches(self, span: StageSpan) -> list[Batch]:
        shape = batch_shape(self.cfg.stages[span.index].ramp, self.tokens_seen)
        rows = micro_batch_rows(self.cfg.train.micro_batch_tokens, shape.seq_len, shape.rows)
        assert shape.rows % rows == 0, (shape, rows)  # Config.validate checked the divisibility
        if self.anomaly is not None:  # may jump over data a rollback chose to skip
            self.anomaly.before_step(self.step + 1, self.loader, self.loader_key)
        return [self.loader.next_batch(batch_size=rows, seq_len=shape.seq_len) for _ in range(shape.rows // rows)]

    def _resume(self) -> int:
        t = time.perf_counter()
        latest = self.checkpointer.latest()
        if latest is None:
            return 0
        saved = latest.meta.get("model_args", {})
        now = dataclasses.asdict(self.cfg.stage_args(latest.meta.get("stage_index", 0)))
        shape_keys = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "tie_embeddings")
        if any(saved.get(k) != now[k] for k in shape_keys):
            raise ValueError(f"the checkpoint {latest.path} holds a model of another shape "
                             f"({ {k: saved.get(k) for k in shape_keys} }) than [model] now describes; "
                             "use a new job.out_dir or restore the config")
        self.load_checkpoint(latest)
        self.load_seconds = time.perf_counter() - t
        self.log(f"resumed from {latest.path} (step {self.step}, {self.tokens_seen:,} tokens seen)")
        return self.step

    def check_vocab(self) -> None:
        """Shards made with a larger vocabulary than the model's would stop the run deep in the
        embedding with an IndexError; say what to change before any step instead."""
        if self.loader_factory is not packed_loader:
            return  # a custom loader owns its data and its checks
        from herd.data.shards import read_meta

        vocab = self.model.args.vocab_size
        sources = {*self.cfg.data.train, *self.cfg.data.val, *(s for st in self.cfg.stages for s in st.train)}
        for src in sorted(sources):
            shards = read_meta(src).vocab_size
            if shards > vocab:
                raise ValueError(f"the token shards in {src} hold ids up to {shards - 1} (vocabulary of {shards}) but "
                                 f"the model has model.vocab_size = {vocab}; set model.vocab_size = {shards} or "
                                 "more, or tokenize the data with the model's tokenizer")

    def fit(self) -> TrainResult:
        t_start = time.perf_counter()
        self.check_vocab()
        resumed_from = self._resume()
        spans = self.schedule.spans
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.peak_flops = measure_matmul_peak(self.device, dtype, cache_file=self.out_dir / PEAK_CACHE)
        if self.meshes is not None:  # tokens/s is the whole group's, so MFU is against the group's peak
            self.peak_flops *= self.meshes.world.size()
        self.log(f"{self.model.args.num_params():,} parameters on {self.device}; measured {dtype} matmul peak "
                 f"{self.peak_flops / 1e9:,.1f} GFLOP/s; {self.schedule.total_steps} steps in "
                 f"{len(spans)} stage(s): {', '.join(f'{s.name} ({s.steps})' for s in spans)}")
        if is_rank0():  # one process writes metrics.jsonl, TensorBoard and the plot
            self.metrics = MetricsLogger(self.out_dir, self.cfg.metrics, total_steps=self.schedule.total_steps,
                                         start_step=self.step, stage_bounds=[(s.name, s.start) for s in spans])
            record_attempt(self.out_dir, attempt=int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")),
                           started=self.started, ready=time.time(), resumed_step=resumed_from,
                           load_seconds=self.load_seconds, dropped=self.metrics.dropped)
        else:
            self.metrics = _NoMetrics()
        result = TrainResult(steps=0, tokens_seen=0, seconds=0.0, resumed_from=resumed_from)
        try:
            for span in spans:
                result.stages.append(self._run_stage(span))
            self.checkpointer.wait()
        finally:
            self.checkpointer.settle()  # after a failure: let a pending write finish, if it can
            self.watchdog.close()
            self.metrics.close()
        result.steps, result.tokens_seen = self.step, self.tokens_seen
        result.anomalies = dict(self.anomaly.counts) if self.anomaly is not None else {}
        result.loss_plot = str(self.metrics.plot()) if self.cfg.metrics.plot else None
        result.seconds = time.perf_counter() - t_start
        return result

    def _run_stage(self, span: StageSpan) -> StageResult:
        stage = self.cfg.stages[span.index]
        t0, tokens0 = time.perf_counter(), self.tokens_seen
        final = self.checkpointer.find_stage_final(span.name) if self.step >= span.end else None
        if final is None:
            if self.step < span.start:
                raise AssertionError(f"stage {span.name} starts at step {span.start} but the run is at {self.step}")
            if self.step == span.start and span.index > 0:
                prev = self.schedule.spans[span.index - 1]
                start_ckpt = self.checkpointer.find_stage_final(prev.name)
                if start_ckpt is None:
                    raise FileNotFoundError(f"stage {span.name} starts from stage {prev.name}'s final checkpoint, "
                                            f"which is missing from {self.checkpointer.root}")
                self.load_checkpoint(start_ckpt)
                self.log(f"stage {span.name}: starting from {start_ckpt.path.name} (end of {prev.name})")
            self._enter_stage(span)
            last_loss = self._train_until(span)
            val = self.evaluate()
            if val is not None:
                self.metrics.log_val(self.step, span.name, val)
            final = self.save_checkpoint(span, final=True)
        else:
            last_loss, val = None, None
        out = StageResult(name=span.name, steps=span.steps, tokens=self.tokens_seen - tokens0,
                          seconds=time.perf_counter() - t0, final_loss=last_loss, val_loss=val,
                          checkpoint=str(final.path))
        averaged = self.out_dir / f"{span.name}-averaged"
        if stage.average_last and (last_loss is not None or not averaged.is_dir()):
            self._average(span, out, averaged)
        elif stage.average_last:
            out.averaged = str(averaged)
        return out

    def _train_until(self, span: StageSpan) -> float | None:
        cfg, last = self.cfg, None
        while self.step < span.end:
            t = time.perf_counter()
            micro = self._next_micro_batches(span)
            self.watchdog.step_begin(self.step + 1)
            self.sdc.before_step(self.step + 1, micro)  # the re-computation check, when due
            r = self.train_step(micro)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t
            seq_len = micro[0].inputs.shape[1]
            tps = r.tokens / seconds
            self.metrics.log_step(StepRecord(
                step=self.step, stage=span.name, loss=r.loss, lr=r.lr, grad_norm=r.grad_norm,
                tokens_seen=self.tokens_seen, batch_tokens=r.tokens, seq_len=seq_len, tokens_per_s=tps,
                mfu=tps * self.model.args.flops_per_token(seq_len) / self.peak_flops, seconds=seconds,
                time=time.time()))
            if r.retried is not None:
                self.metrics.log_anomaly(span.name, dataclasses.asdict(r.retried))
            self.sdc.after_step(self.step)  # the replica check, when due
            self.watchdog.step_end(self.step, seconds, self.metrics)  # straggler gather, when due
            if r.anomaly is not None:  # no update: nothing to validate or checkpoint at this step
                self._after_anomaly(span, r.anomaly)
                continue
            last = r.loss
            if cfg.metrics.val_every and self.step % cfg.metrics.val_every == 0 and self.step < span.end:
                val = self.evaluate()
                if val is not None:
                    self.metrics.log_val(self.step, span.name, val)
            if (self.step % cfg.checkpoint_every(span.index) == 0 or self._checkpoint_owed) and self.step < span.end:
                self.save_checkpoint(span)
        return last

    def _after_anomaly(self, span: StageSpan, verdict: Verdict) -> None:
        """Log a skipped update; at the end of a long enough streak, roll back and skip its data."""
        self.metrics.log_anomaly(span.name, dataclasses.asdict(verdict.record))
        # Never a checkpoint inside a streak: a rollback then always has one from before it, and no
        # checkpoint of the abandoned steps is left for a resume to pick up.
        self._checkpoint_owed |= self.step % self.cfg.checkpoint_every(span.index) == 0
        if not verdict.rollback:
            return
        target = self.checkpointer.latest()
        window = self.anomaly.plan_rollback(step=self.step, loader=self.loader,
                                            checkpoint_step=None if target is None else target.step)
        self.load_checkpoint(target)
        self._enter_stage(span)
        self._checkpoint_owed = False
        cut = self.metrics.rewind(self.step)
        if cut:  # rank 0's logger: the replayed steps count against the effective time
            record_rollback(self.out_dir, dropped=cut)
        self.metrics.log_anomaly(span.name, dataclasses.asdict(self.anomaly.rollback_record(window)))

    def _average(self, span: StageSpan, out: StageResult, dst: Path) -> None:
        n = self.cfg.stages[span.index].average_last
        ckpts = self.checkpointer.stage_checkpoints(span.name)[-n:]
        if len(ckpts) < n:
            raise FileNotFoundError(f"stage {span.name}: {n} checkpoints to average but only steps "
                                    f"{[c.step for c in ckpts]} are in {self.checkpointer.root}")
        model = average_checkpoints([c.path for c in ckpts], self.model.args, device=self.device)
        if is_rank0():  # every rank averaged the same weights; one writes them
            save_inference_model(model, dst, format="hf", tokenizer=self.tokenizer, overwrite=True)
        out.averaged = str(dst)
        out.averaged_val_loss = self.evaluate(model)
        steps = ", ".join(str(c.step) for c in ckpts)
        msg = f"stage {span.name}: averaged the checkpoints of steps {steps} into {dst}"
        if out.averaged_val_loss is not None:
            self.metrics.log_val(self.step, span.name, out.averaged_val_loss, name="averaged_val_loss")
            msg += f" (validation loss {out.averaged_val_loss:.4f})"
        self.log(msg)
