"""Training checkpoints with torch.distributed.checkpoint (DCP), written atomically, verified on load.

Layout under the run's `checkpoints/` directory:

    step-00000120/            one checkpoint: DCP's .metadata + __0_0.distcp, and
        COMPLETE              JSON: step, stage, model args, and size + CRC-32 of every other file
    .step-00000140.tmp-PID/   being written (or left by a killed run: removed at the next start)
    step-00000100.bad-...     found corrupt at a restart, renamed aside, never read again

A checkpoint is written into a temporary directory, the COMPLETE file is written (and fsynced)
last, and only then is the directory renamed to its final name. A run killed at any instant
therefore leaves either the previous checkpoints untouched or one more complete one. On a
restart each candidate, newest first, is verified against its COMPLETE file (every file present,
right size, right CRC-32); the first good one is used and every skipped one is reported.

Design trade-offs:
* CRC-32 of every file means reading a checkpoint twice at a restart (once to verify, once to
  load). That is seconds for the models trained here and minutes for an 8B one, which is small
  next to resuming from silently corrupt weights. Verification happens at restarts, for
  checkpoint averaging and, with `verify_writes` (`sdc.verify_checkpoints`), once more right
  after each write: the files are dropped from the page cache first (posix_fadvise DONTNEED on
  the fsynced, clean pages), so the re-read comes from the storage, and a checkpoint the storage
  corrupted stops the job at once instead of surfacing at the restart that needed it.
* DCP rather than torch.save: the same files load into a differently sharded model later (issue
  4's FSDP/TP), and a single process needs no process group (`no_dist`). Values that are not
  tensors (loader and RNG states) are stored by DCP as pickled blobs.
* Pruning keeps the newest `keep_last` periodic checkpoints plus every checkpoint marked `keep`
  (each stage's final one, which the next stage starts from and `herd export` wants).
* Asynchronous writes (`save_async`, `checkpoint.async_save`): the state is copied (staged) at
  the step boundary, which is the only part training waits for, and a background thread writes
  the copy through the same path as `save` (temporary directory, CRCs, COMPLETE, rename, the
  verification, pruning), so every guarantee above holds: a kill mid-write leaves the previous
  checkpoints, and the unfinished one is removed at the next start. The price is a second copy
  of the state in memory while a write is pending, and a write that competes with training for
  CPU and I/O. At most one write is pending: the next save, a load, a scan of the checkpoints
  and the run's end wait for it first (and re-raise its error, e.g. a failed verification, on
  the training thread). In a distributed run the writer's collectives (DCP's planning, the
  barrier, the broadcast) use a gloo group of their own, so they never interleave with the
  training step's collectives on the default group.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import threading
import time
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

COMPLETE = "COMPLETE"
_NAME_RE = re.compile(r"^step-(\d{8})$")
_TMP_RE = re.compile(r"^\.step-\d{8}\.tmp-\d+$")
# A checkpoint being replaced by a newer one of the same step, renamed aside until the new one is
# in place; restored at the next start if the new one never arrived.
_OLD_RE = re.compile(r"^\.(step-\d{8})\.old-\d+$")


@dataclass(frozen=True)
class SavedCheckpoint:
    path: Path
    step: int
    meta: dict[str, Any] = field(repr=False)

    @property
    def stage(self) -> str:
        return self.meta.get("stage", "")


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


class CheckpointVerifyError(RuntimeError):
    """A checkpoint failed its CRC check right after it was written."""


def _crc32(path: Path, *, from_disk: bool = False) -> int:
    crc = 0
    with open(path, "rb") as f:
        if from_disk and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # clean pages: evicted, re-read from disk
        while chunk := f.read(1 << 20):
            crc = zlib.crc32(chunk, crc)
    return crc


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _no_dist() -> bool:
    return not (dist.is_available() and dist.is_initialized())


# In a distributed run (issue 4) every rank writes its shards into one directory, and rank 0
# alone does the bookkeeping on the file system (COMPLETE, rename, prune, quarantine).
def _rank0() -> bool:
    return _no_dist() or dist.get_rank() == 0


def _barrier(group: Any = None) -> None:
    if not _no_dist():
        dist.barrier(group=group)


def _from_rank0(value: Any, group: Any = None) -> Any:
    if _no_dist():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def stage_state(obj: Any) -> Any:
    """A copy of a (nested) state dict that training can no longer change: every tensor copied
    (to CPU where it is a plain tensor; a DTensor is cloned where it lives, keeping its mesh and
    placements), everything else kept (the trainer's other values are ints, strings and bytes)."""
    if isinstance(obj, dict):
        return {k: stage_state(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(stage_state(v) for v in obj)
    if isinstance(obj, torch.Tensor):
        if type(obj) is torch.Tensor or isinstance(obj, torch.nn.Parameter):
            return obj.detach().to("cpu", copy=True)
        return obj.detach().clone()
    return obj


@contextlib.contextmanager
def _quiet_single_process():
    # DCP warns on every single-process save/load that it is "assuming the intent" to run without
    # a process group; that is exactly the intent here (no_dist is passed explicitly).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def verify(path: Path, *, from_disk: bool = False) -> tuple[dict[str, Any] | None, str]:
    """(COMPLETE's contents, "") for a good checkpoint, else (None, what is wrong).

    from_disk: evict each file from the page cache before reading it (after a write)."""
    marker = path / COMPLETE
    if not marker.is_file():
        return None, f"no {COMPLETE} file (the write was interrupted)"
    try:
        meta = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError) as e:
        return None, f"{COMPLETE} is unreadable ({e})"
    files = meta.get("files")
    if not isinstance(files, dict) or not files:
        return None, f"{COMPLETE} lists no files"
    for name, (size, crc) in files.items():
        f = path / name
        if not f.is_file():
            return None, f"{name} is missing"
        if f.stat().st_size != size:
            return None, f"{name} has {f.stat().st_size} bytes, expected {size} (truncated?)"
        if _crc32(f, from_disk=from_disk) != crc:
            return None, f"{name} fails its CRC-32 check (corrupt)"
    return meta, ""


class Checkpointer:
    """verify_writes: re-read every checkpoint after its write and raise CheckpointVerifyError on a bad CRC.
    on_written(path, step): called on rank 0 after the rename, before that verification (fault injection)."""

    def __init__(self, root: str | Path, *, keep_last: int, log: Callable[[str], None] = print,
                 verify_writes: bool = False, on_written: Callable[[Path, int], None] | None = None,
                 async_writes: bool = False, before_commit: Callable[[Path, int], None] | None = None):
        """async_writes: allow `save_async` (in a distributed run it creates the writer's own gloo
        group, a collective: construct the Checkpointer on every rank). before_commit(tmp, step):
        called on rank 0 once the files are written, before COMPLETE and the rename (tests: a kill there)."""
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.root = Path(root)
        self.keep_last = keep_last
        self.log = log
        self.verify_writes, self.on_written, self.before_commit = verify_writes, on_written, before_commit
        self.async_writes = async_writes
        self._group = dist.new_group(backend="gloo") if async_writes and not _no_dist() else None
        self._pending: threading.Thread | None = None
        self._error: BaseException | None = None
        self.root.mkdir(parents=True, exist_ok=True)
        for leftover in sorted(self.root.iterdir()) if _rank0() else ():
            if _TMP_RE.match(leftover.name):
                self.log(f"removing {leftover.name}: an unfinished checkpoint write from an interrupted run")
                shutil.rmtree(leftover)
            elif (old := _OLD_RE.match(leftover.name)) and not (self.root / old.group(1)).exists():
                self.log(f"restoring {old.group(1)}: a run was interrupted while replacing it")
                os.rename(leftover, self.root / old.group(1))
            elif old:
                shutil.rmtree(leftover)  # its replacement is in place

    # ---- write ---------------------------------------------------------------------------

    def save(self, state: dict[str, Any], *, step: int, meta: dict[str, Any], keep: bool = False) -> SavedCheckpoint:
        """Write `state` (a DCP state dict) as the checkpoint for `step`; prune old ones."""
        self.wait()
        return self._write(state, step=step, meta=meta, keep=keep, group=None)

    def save_async(self, state: dict[str, Any], *, step: int, meta: dict[str, Any], keep: bool = False) -> Path:
        """Stage `state` now and write it in the background (see the module doc); returns the
        directory it will have. Waits for (and re-raises the error of) the write still pending."""
        if not self.async_writes:
            raise ValueError("save_async needs a Checkpointer built with async_writes=True")
        self.wait()
        staged = stage_state(state)

        def write() -> None:
            try:
                self._write(staged, step=step, meta=meta, keep=keep, group=self._group)
            except BaseException as e:  # handed to the training thread by wait()
                self._error = e

        self._pending = threading.Thread(target=write, name=f"checkpoint-step-{step}", daemon=True)
        self._pending.start()
        return self.root / checkpoint_name(step)

    def wait(self) -> None:
        """Block until no write is pending; raise the error a background write ended with."""
        if self._pending is not None:
            self._pending.join()
            self._pending = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def settle(self, timeout: float = 120.0) -> None:
        """On the way out of a failed run: give a pending write `timeout` seconds to finish (it is a
        good checkpoint from before the failure), and drop its error (the run's own error is the
        one to report). A write still blocked then dies with the process; its temporary
        directory is removed at the next start."""
        if self._pending is not None:
            self._pending.join(timeout)
        self._error = None

    @property
    def pending(self) -> bool:
        return self._pending is not None and self._pending.is_alive()

    def _write(self, state: dict[str, Any], *, step: int, meta: dict[str, Any], keep: bool,
               group: Any) -> SavedCheckpoint:
        dst = self.root / checkpoint_name(step)
        tmp = self.root / f".{dst.name}.tmp-{_from_rank0(os.getpid(), group)}"
        if _rank0():
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        _barrier(group)
        with _quiet_single_process():
            dcp.save(state, storage_writer=dcp.FileSystemWriter(tmp, sync_files=True), process_group=group,
                     no_dist=_no_dist())
        if not _rank0():
            _barrier(group)  # until rank 0 has made the checkpoint complete
            self._raise_if_bad(_from_rank0(None, group), dst)
            return SavedCheckpoint(dst, step, meta)
        if self.before_commit is not None:
            self.before_commit(tmp, step)
        files = {p.name: [p.stat().st_size, _crc32(p)] for p in sorted(tmp.iterdir()) if p.is_file()}
        meta = {**meta, "step": step, "keep": keep, "saved_at": time.time(), "files": files}
        with open(tmp / COMPLETE, "w") as f:
            json.dump(meta, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        old = None
        if dst.exists():  # a checkpoint of the same step from before a restart (or a rollback): replace it,
            old = self.root / f".{dst.name}.old-{os.getpid()}"  # keeping it until the new one is in place
            os.rename(dst, old)
        os.rename(tmp, dst)
        _fsync_dir(self.root)
        if old is not None:
            shutil.rmtree(old)
        if self.on_written is not None:
            self.on_written(dst, step)
        problem = ""
        if self.verify_writes:
            good, problem = verify(dst, from_disk=True)
            if good is None:
                self._quarantine(dst, problem)
        if not problem:
            self._prune()  # never drop a good old checkpoint for a bad new one
        _barrier(group)
        self._raise_if_bad(_from_rank0(problem, group), dst)
        return SavedCheckpoint(dst, step, meta)

    def _raise_if_bad(self, problem: str | None, dst: Path) -> None:
        if problem:
            raise CheckpointVerifyError(
                f"checkpoint {dst.name} failed its check right after the write: {problem}. The storage under "
                f"{self.root} returned other bytes than were written (moved aside as {dst.name}.bad-*); check the "
                "disk or file system, then restart: the run resumes from the previous checkpoint")

    def _prune(self) -> None:
        periodic = [c for c in self._scan() if not c.meta.get("keep")]
        for old in periodic[: max(len(periodic) - self.keep_last, 0)]:
            shutil.rmtree(old.path)

    # ---- read ----------------------------------------------------------------------------

    def _scan(self) -> list[SavedCheckpoint]:
        """Checkpoints with a readable COMPLETE file, oldest first (files not yet verified)."""
        out = []
        for p in self.root.iterdir():
            m = _NAME_RE.match(p.name)
            if not m or not (p / COMPLETE).is_file():
                continue
            try:
                meta = json.loads((p / COMPLETE).read_text())
            except (OSError, json.JSONDecodeError):
                meta = {}  # reported by verify() when someone tries to use it
            out.append(SavedCheckpoint(p, int(m.group(1)), meta))
        return sorted(out, key=lambda c: c.step)

    def candidates(self) -> list[Path]:
        """Every step-* directory, complete or not, oldest first."""
        return sorted((p for p in self.root.iterdir() if _NAME_RE.match(p.name)), key=lambda p: p.name)

    def latest(self, *, before: int | None = None) -> SavedCheckpoint | None:
        """The newest checkpoint that verifies; every bad one met on the way is reported and moved aside."""
        self.wait()
        return _from_rank0(self._latest(before) if _rank0() else None)

    def _latest(self, before: int | None) -> SavedCheckpoint | None:
        for path in reversed(self.candidates()):
            step = int(_NAME_RE.match(path.name).group(1))
            if before is not None and step >= before:
                continue
            meta, problem = verify(path)
            if meta is not None:
                return SavedCheckpoint(path, step, meta)
            self._quarantine(path, problem)
        return None

    def verified(self, path: Path) -> SavedCheckpoint:
        meta, problem = verify(path)
        if meta is None:
            raise ValueError(f"checkpoint {path} is unusable: {problem}")
        return SavedCheckpoint(path, int(meta["step"]), meta)

    def _quarantine(self, path: Path, problem: str) -> None:
        aside = path.with_name(f"{path.name}.bad-{int(time.time())}")
        os.rename(path, aside)
        self.log(f"skipping checkpoint {path.name}: {problem}; moved it to {aside.name} and falling back to "
                 "the previous one")

    def find_stage_final(self, stage: str) -> SavedCheckpoint | None:
        """The checkpoint that ended stage `stage` (marked final when it was saved)."""
        self.wait()
        for c in reversed(self._scan()):
            if c.meta.get("stage") == stage and c.meta.get("stage_final"):
                return self.verified(c.path)
        return None

    def stage_checkpoints(self, stage: str) -> list[SavedCheckpoint]:
        self.wait()
        return [c for c in self._scan() if c.meta.get("stage") == stage]


def load(path: str | Path, state: dict[str, Any]) -> None:
    """Fill `state` (same structure as when saved, or a subset such as {"model": ...}) in place."""
    with _quiet_single_process():
        dcp.load(state, storage_reader=dcp.FileSystemReader(path), no_dist=_no_dist())


def saved_keys(path: str | Path) -> set[str]:
    """The flattened names a checkpoint holds ("model.norm.weight", "train.step"): loading a key it
    lacks is an error in DCP, so state added in a later version must be asked about first."""
    return set(dcp.FileSystemReader(path).read_metadata().state_dict_metadata)


def load_model_weights(path: str | Path, model: torch.nn.Module) -> None:
    """Only the model's tensors out of a training checkpoint (for export and averaging)."""
    sd = model.state_dict()
    load(path, {"model": sd})
    model.load_state_dict(sd)
