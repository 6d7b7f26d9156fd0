"""Silent data corruption: replica checksums, gradient re-computation, and the faults that test them.

The Llama 3 paper's 405B run lost more of its 466 interruptions to silent data corruption and
faulty GPUs than to anything else. A corrupt value does not crash: it trains on. Two checks find
it while the job runs (checkpoint CRCs are the third, in herd.train.checkpoint):

* **Replica check** (`sdc.replica_check_every`): ranks that hold the same tensor must hold the
  same bits. Each rank hashes every parameter and optimizer-state tensor it holds, the hashes are
  gathered, and any disagreement inside a replica group stops the job on every rank, naming the
  rank(s) and the step. What is comparable follows from each DTensor's placements: a tensor is
  replicated over exactly the mesh dimensions where its placement is `Replicate()`, so
  - FSDP (`dp_shard`): every rank holds a different shard, nothing is comparable;
  - HSDP (`dp_replicate` > 1): the shards are replicated over `dp_replicate` (with `dp_shard = 1`
    that is plain data parallelism, whole tensors on every replica);
  - TP: the RMSNorm weights are replicated over the `tp` ranks (the projections are sharded);
    under FSDP x TP they are sharded over `dp_shard` and replicated over `tp`;
  - CP ranks shard through FSDP (`dp_shard_cp`), PP stages hold different layers: nothing;
  - a single process has nothing to compare with.
  Enabling the check where nothing is comparable is an error at start, not a check of nothing.
  AdamW's moments follow their parameter's placements; its plain `step` counters belong to their
  parameter's group. With two replicas a mismatch cannot say which copy is wrong, so both ranks
  are named; with three or more the odd one out (a majority disagrees with it) is named.
* **Re-computation** (`sdc.recompute_every`): before the step, the gradient of the step's first
  micro-batch is computed twice from the same weights and compared bitwise (per-tensor hashes).
  A fault in the arithmetic rarely strikes the same value twice, so a difference means bad
  hardware, and the job stops naming the rank. Gradients are reduced across data-parallel ranks,
  so one rank's fault shows in every rank's gradient; the model's forward output, this rank's own
  computation, is hashed too, and the ranks whose outputs differed are named as the faulty ones
  (a fault in the backward alone names every rank of the reduction). It costs two extra forward/backward passes of one
  micro-batch per check. On CPU the two passes are bit-identical; on CUDA they run under
  `torch.use_deterministic_algorithms(True, warn_only=True)`, and a kernel without a
  deterministic version (the warning names it) can make the check fire falsely: untested on GPU.

The hash (`tensor_checksum`) views a tensor's bytes as integers of its element size and sums them
with odd position weights, wrapping: any single flipped bit changes it (an odd weight is
invertible modulo a power of two), swapped elements change it, and it runs on the tensor's own
device, so only one integer per tensor crosses the network.

Fault injection (tests and benchmarks/faults.py; never a user config key): a `Faults` object,
given to `Trainer(faults=...)` or read from the environment variable `HERD_SDC_FAULTS` (a JSON
list of `{"kind": ..., "step": S, "rank": R, ...}`, what torchrun passes on to every rank):

* `flip_param`   after step S's update, flip bit `bit` (default 0) of element `index` (default 0)
                 of parameter `name` on rank R (the local shard of a DTensor);
* `flip_optim`   the same in the optimizer state `key` (default "exp_avg") of parameter `name`;
* `corrupt_compute`  at step S's re-computation check, one bit of the first pass's output of the
                 first transformer block flips on rank R (a faulty multiply);
* `corrupt_checkpoint`  the checkpoint of step S has one byte flipped on disk after its write;
* `stall`        rank R sleeps `seconds` at progress event `at` of step S (herd.train.watchdog's
                 events, e.g. "forward of layers.0"; default the step's start): a hang;
* `slow`         rank R sleeps `seconds` in every forward of every block from step S on: a straggler.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from herd.io import atomic_write_json, read_records
from herd.train.config import SDCConfig

FAULTS_ENV = "HERD_SDC_FAULTS"
SDC_EXIT_CODE = 4  # `herd train` exits with it after SilentDataCorruption or a checkpoint failing its check
_INT_VIEW = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}
_CHUNK = 1 << 22  # elements hashed at a time: bounds the scratch to one chunk of products


class SilentDataCorruption(RuntimeError):
    """Two computations or copies that must be bit-identical are not; the job must not train on.

    step, ranks: where it was seen and the ranks named (for `record_event`)."""

    def __init__(self, message: str, *, step: int = 0, ranks: Sequence[int] = ()):
        super().__init__(message)
        self.step, self.ranks = step, tuple(sorted(ranks))


# ---- a corruption that comes back --------------------------------------------------------------

SDC_EVENTS = "sdc-events.jsonl"  # in job.out_dir: one line per detection (rank 0 writes it)
SDC_STOP = "sdc-stop.json"  # in job.out_dir: a persistent corruption; `herd train`'s supervisor ends the job


def record_event(out_dir: str | Path, error: SilentDataCorruption, *, job: str | None = None) -> str | None:
    """Append `error` to the run's SDC record; if this job already saw a corruption at the same step
    naming the same ranks, return the message that stops it for good (else None).

    After a mismatch torchrun's agent restarts the job from the last checkpoint, which is the
    recovery for a one-time fault: a flipped bit does not flip again. A fault that does come back
    at the same step on the same rank, from the same checkpoint and data, is the hardware's, and
    every further restart would meet it again: stop rather than spend the remaining restarts.
    job: which torchrun invocation (TORCHELASTIC_RUN_ID); detections of earlier ones do not count,
    so a person who replaced the hardware and starts the job again is not stopped by old records.
    """
    job = os.environ.get("TORCHELASTIC_RUN_ID", "") if job is None else job
    path = Path(out_dir) / SDC_EVENTS
    earlier = read_records(path)
    event = {"job": job, "step": error.step, "ranks": list(error.ranks), "time": time.time(),
             "attempt": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")), "message": str(error).splitlines()[0]}
    with open(path, "a") as f:
        f.write(json.dumps(event) + "\n")
    if not any(e.get("job") == job and e.get("step") == error.step and e.get("ranks") == event["ranks"]
               for e in earlier):
        return None
    who = ", ".join(f"rank {r}" for r in error.ranks) or "an unnamed rank"
    exclude = " or ".join(f"rank {r}'s host" for r in error.ranks) or "the named rank's host"
    return (f"silent data corruption came back at step {error.step} on {who} after a restart from a checkpoint "
            f"written before it: a persistent fault, likely faulty hardware: exclude {exclude} and start the job "
            f"again (it resumes from the last good checkpoint). Every detection is in {path}.")


def write_stop(out_dir: str | Path, message: str) -> Path:
    """Tell `herd train`'s supervisor to end the job instead of restarting it (herd.train.elastic)."""
    return atomic_write_json(Path(out_dir) / SDC_STOP, {"message": message, "time": time.time()})


# ---- the hash and the bit flip -----------------------------------------------------------------


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _words(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as a flat integer tensor of its element size (no copy if contiguous)."""
    t = _local(t).detach()
    if not t.is_contiguous():
        t = t.contiguous()
    return t.reshape(-1).view(_INT_VIEW[t.element_size()])


_WEIGHTS: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def _weights(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """1, 3, 5, ... for one chunk, wrapped to `dtype` (odd numbers stay odd when they wrap)."""
    key = (dtype, device)
    if key not in _WEIGHTS:
        _WEIGHTS[key] = (torch.arange(_CHUNK, dtype=torch.int64, device=device) * 2 + 1).to(dtype)
    return _WEIGHTS[key]


@torch.no_grad()
def tensor_checksum(t: torch.Tensor) -> int:
    """A position-weighted sum of `t`'s bit patterns; equal bits give equal sums, one flipped bit never does.

    Within a chunk, element i times the odd weight 2i+1 in the element's own integer width (the
    product wraps, and multiplying by an odd number is one-to-one modulo 2**bits, so a changed
    element changes its product); the products sum exactly in int64 and each chunk's sum is
    weighted by an odd 2c+1 modulo 2**64. No int64 copy of the tensor is made. A DTensor is hashed
    by its local shard.
    """
    words = _words(t)
    total = torch.zeros((), dtype=torch.int64, device=words.device)
    weights = _weights(words.dtype, words.device)
    for c, start in enumerate(range(0, words.numel(), _CHUNK)):
        w = words[start:start + _CHUNK]
        total += (w * weights[:w.numel()]).sum(dtype=torch.int64) * (2 * c + 1)  # int64 wraps: the modulus
    return int(total)


@torch.no_grad()
def flip_bit(t: torch.Tensor, *, index: int = 0, bit: int = 0) -> None:
    """Flip bit `bit` of element `index` of `t` in place (of the local shard for a DTensor)."""
    local = _local(t)
    assert local.is_contiguous(), "flip_bit needs a contiguous tensor"
    words = local.reshape(-1).view(_INT_VIEW[local.element_size()])
    if not 0 <= index < words.numel() or not 0 <= bit < 8 * local.element_size():
        raise ValueError(f"flip_bit: element {index} bit {bit} is outside a tensor of {words.numel()} elements "
                         f"of {8 * local.element_size()} bits")
    mask = 1 << bit
    if mask >= 1 << (8 * local.element_size() - 1) and words.dtype != torch.uint8:
        mask -= 1 << (8 * local.element_size())  # the sign bit as a negative value of the signed view
    words[index] ^= mask


# ---- replica groups --------------------------------------------------------------------------


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def replica_group(t: torch.Tensor) -> tuple[int, ...]:
    """The global ranks that hold a bit-identical copy of this rank's part of `t` (this rank included).

    A DTensor is replicated over the mesh dimensions whose placement is Replicate(): the ranks that
    share this rank's coordinates on every other dimension hold the same local tensor. A plain
    tensor has no known replicas.
    """
    if not isinstance(t, DTensor):
        return (_rank(),)
    mesh = t.device_mesh
    coord = mesh.get_coordinate()
    assert coord is not None, "this rank is not in the tensor's mesh"
    idx = tuple(slice(None) if p.is_replicate() else c for p, c in zip(t.placements, coord))
    return tuple(sorted(int(r) for r in mesh.mesh[idx].reshape(-1).tolist()))


@dataclass(frozen=True)
class Tracked:
    name: str
    group: tuple[int, ...]  # replica group of the parameter and of its optimizer state
    param: nn.Parameter


def tracked_tensors(named_params: Sequence[tuple[str, nn.Parameter]]) -> list[Tracked]:
    """Every parameter this rank holds that has a replica elsewhere."""
    out = []
    for name, p in named_params:
        group = replica_group(p)
        if len(group) > 1:
            out.append(Tracked(name, group, p))
    return out


def _report(tracked: Sequence[Tracked], optimizer: torch.optim.Optimizer | None) -> dict[str, tuple]:
    """{name: (replica group, checksum)} of the parameters and their optimizer state (created lazily
    by the first step, hence looked up at each check; AdamW: exp_avg, exp_avg_sq, step)."""
    report = {}
    for t in tracked:
        report[f"param {t.name}"] = (t.group, tensor_checksum(t.param))
        state = optimizer.state.get(t.param, {}) if optimizer is not None else {}
        for key, value in sorted(state.items()):
            if isinstance(value, torch.Tensor):
                report[f"optim {t.name}.{key}"] = (t.group, tensor_checksum(value))
    return report


@dataclass
class Mismatch:
    name: str
    group: tuple[int, ...]
    checksums: dict[int, int]  # rank -> checksum
    ranks: list[int]  # the ranks named: the minority, or the whole group when no majority exists
    majority: bool  # False: the copies split evenly, so which one is corrupt is unknown

    def describe(self) -> str:
        copies = len(set(self.checksums.values()))
        if self.majority:
            who = ", ".join(f"rank {r}" for r in self.ranks)
            return f"{self.name}: {who} differ{'s' if len(self.ranks) == 1 else ''} from the majority of its replicas {list(self.group)}"
        return (f"{self.name}: ranks {list(self.group)} hold {copies} different copies and no majority says which is "
                "corrupt")


def find_mismatches(per_rank: Sequence[dict[str, tuple[Sequence[int], int]]]) -> list[Mismatch]:
    """Compare what every rank reported, {tensor name: (replica group, checksum)} indexed by rank.

    A pure function (the gathering is `ReplicaChecker.check`'s), so its rule is unit-tested alone.
    """
    by_key: dict[tuple[str, tuple[int, ...]], dict[int, int]] = {}
    for rank, report in enumerate(per_rank):
        for name, (group, checksum) in report.items():
            by_key.setdefault((name, tuple(group)), {})[rank] = checksum
    out = []
    for (name, group), sums in sorted(by_key.items()):
        assert set(sums) == set(group), f"{name}: replicas {group} but reports from {sorted(sums)}"
        if len(set(sums.values())) == 1:
            continue
        value, count = Counter(sums.values()).most_common(1)[0]
        if count * 2 > len(group):
            out.append(Mismatch(name, group, sums, sorted(r for r, s in sums.items() if s != value), True))
        else:
            out.append(Mismatch(name, group, sums, list(group), False))
    return out


def mismatch_message(step: int, mismatches: list[Mismatch], hosts: Sequence[str], *, what: str) -> str:
    ranks = sorted({r for m in mismatches for r in m.ranks})
    names = ", ".join(f"rank {r} ({hosts[r]})" for r in ranks)
    if all(m.majority for m in mismatches):
        head = f"{names} {'differs' if len(ranks) == 1 else 'differ'} from the majority of their replicas"
    else:
        head = f"{names} hold different copies of tensors that must be bit-identical (no majority tells which is corrupt)"
    lines = [f"silent data corruption detected by the {what} at step {step}: {head}. The job stops rather than "
             "train on corrupt values; take the named rank's device out of service and restart from a checkpoint "
             "written before the corruption."]
    lines += [f"  {m.describe()}" for m in mismatches[:8]]
    if len(mismatches) > 8:
        lines.append(f"  ... and {len(mismatches) - 8} more tensors")
    return "\n".join(lines)


def _gather(obj: Any) -> list[Any]:
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class ReplicaChecker:
    """Hashes of replicated parameters and optimizer state, compared across their replicas (collective)."""

    def __init__(self, named_params: Sequence[tuple[str, nn.Parameter]], optimizer: torch.optim.Optimizer | None):
        self.tracked = tracked_tensors(named_params)
        self.optimizer = optimizer
        counts = _gather(len(self.tracked))
        if sum(counts) == 0:
            raise ValueError("sdc.replica_check_every is set but no rank holds a replicated tensor in this layout: "
                             "FSDP shards, pipeline stages and a single process have nothing to compare. Replicas "
                             "exist under parallel.dp_replicate > 1 (HSDP) and for the norms under parallel.tp > 1; "
                             "use such a layout or set sdc.replica_check_every = 0")
        self.host = socket.gethostname()

    def check(self, step: int, *, mark: Callable[[str], None] = lambda event: None) -> int:
        """Raise SilentDataCorruption on every rank if any replica differs; return the tensors compared here."""
        report = _report(self.tracked, self.optimizer)
        mark("collective: all-gather of replica checksums (sdc)")
        gathered = _gather((report, self.host))
        mismatches = find_mismatches([r for r, _ in gathered])
        if mismatches:
            raise SilentDataCorruption(mismatch_message(step, mismatches, [h for _, h in gathered],
                                                        what="replica checksum check"),
                                       step=step, ranks={r for m in mismatches for r in m.ranks})
        return len(report)


# ---- gradient re-computation -------------------------------------------------------------------


def grad_checksums(params: Sequence[tuple[str, nn.Parameter]]) -> dict[str, int]:
    return {name: tensor_checksum(p.grad) for name, p in params if p.grad is not None}


def recompute_check(step: int, run: Callable[[], None], params: Sequence[tuple[str, nn.Parameter]],
                    zero_grad: Callable[[], None], *, outputs: Sequence[nn.Module] = (),
                    corrupt_first: Callable[[], Any] | None = None,
                    mark: Callable[[str], None] = lambda event: None) -> int:
    """Run `run()` (forward + backward of one micro-batch from zero gradients) twice and compare the
    gradients bitwise; collective, raises SilentDataCorruption on every rank naming the ranks that
    differed. Leaves the gradients zeroed. Returns the gradient tensors compared on this rank.

    outputs: modules whose forward outputs are hashed too. Gradients are reduced across data-parallel
    ranks, so one rank's fault reaches every rank's gradient; a forward output is this rank's own
    computation, so the ranks whose outputs differed are named as the faulty ones.
    corrupt_first: a context-manager factory around the first pass (fault injection).
    """
    cuda = any(p.is_cuda for _, p in params)
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    seen: list[list[int]] = [[], []]
    pass_no = 0

    def record(module, args, out):
        if isinstance(out, torch.Tensor):
            seen[pass_no].append(tensor_checksum(out))

    handles = [m.register_forward_hook(record) for m in outputs]
    if cuda:
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        zero_grad()
        with corrupt_first() if corrupt_first is not None else contextlib.nullcontext():
            run()
        first = grad_checksums(params)
        zero_grad()
        pass_no = 1
        run()
        second = grad_checksums(params)
        zero_grad()
    finally:
        for h in handles:
            h.remove()
        if cuda:
            torch.use_deterministic_algorithms(was_deterministic)
    differ = sorted(n for n in first if first[n] != second.get(n))
    mark("collective: all-gather of re-computation results (sdc)")
    gathered = _gather((differ, seen[0] != seen[1], socket.gethostname()))
    bad = [r for r, (d, f, _) in enumerate(gathered) if d or f]
    if bad:
        own = [r for r, (_, f, _) in enumerate(gathered) if f]
        named = own or bad
        lines = [f"silent data corruption detected by the gradient re-computation at step {step}: "
                 + ", ".join(f"rank {r} ({gathered[r][2]})" for r in named) + " computed two different "
                 + ("forward outputs" if own else "gradients") + " from the same weights and data. The job stops "
                 "rather than train on; take the named rank's device out of service and restart from the last "
                 "checkpoint."]
        if not own and len(bad) > 1:
            lines.append("  (gradients are reduced across data-parallel ranks, so a fault on one rank shows on "
                         "every rank of the reduction: the faulty one is among those named)")
        for r in bad:
            d, f, _ = gathered[r]
            what = ["forward output"] if f else []
            lines.append(f"  rank {r}: {', '.join(what + d[:4])}{' ...' if len(d) > 4 else ''}")
        raise SilentDataCorruption("\n".join(lines), step=step, ranks=named)
    return len(first)


# ---- fault injection ---------------------------------------------------------------------------


@dataclass
class Fault:
    kind: str
    step: int
    rank: int = 0
    options: dict[str, Any] = field(default_factory=dict)


KINDS = ("flip_param", "flip_optim", "corrupt_compute", "corrupt_checkpoint", "stall", "slow")


class Faults:
    """Faults to inject, by kind, step and rank (see the module docstring). Test-facing only."""

    def __init__(self, faults: Iterable[Fault] = ()):
        self.faults = list(faults)
        for f in self.faults:
            if f.kind not in KINDS:
                raise ValueError(f"unknown fault kind {f.kind!r}; kinds: {', '.join(KINDS)}")
            if not isinstance(f.step, int) or f.step < 1 or not isinstance(f.rank, int) or f.rank < 0:
                raise ValueError(f"fault {f.kind}: step must be an integer >= 1 and rank >= 0, got {f}")

    @classmethod
    def from_list(cls, items: list[dict[str, Any]]) -> Faults:
        if not isinstance(items, list) or not all(isinstance(i, dict) and "kind" in i and "step" in i for i in items):
            raise ValueError(f"{FAULTS_ENV} must be a JSON list of objects with \"kind\" and \"step\", got {items!r}")
        return cls(Fault(i["kind"], i["step"], i.get("rank", 0), {k: v for k, v in i.items()
                                                                   if k not in ("kind", "step", "rank")})
                   for i in items)

    @classmethod
    def from_env(cls) -> Faults:
        spec = os.environ.get(FAULTS_ENV, "")
        if not spec:
            return cls()
        try:
            return cls.from_list(json.loads(spec))
        except json.JSONDecodeError as e:
            raise ValueError(f"{FAULTS_ENV} is not JSON ({e})") from None

    def __bool__(self) -> bool:
        return bool(self.faults)

    def due(self, kind: str, step: int, *, rank: int | None = None) -> list[Fault]:
        rank = _rank() if rank is None else rank
        return [f for f in self.faults if f.kind == kind and f.step == step and f.rank == rank]

    def slow_seconds(self, step: int) -> float:
        rank = _rank()
        return sum(f.options.get("seconds", 1.0) for f in self.faults
                   if f.kind == "slow" and f.rank == rank and step >= f.step)

    def stall_seconds(self, step: int, event: str) -> float:
        return sum(f.options.get("seconds", 60.0) for f in self.due("stall", step)
                   if f.options.get("at", "step start") == event)

    @torch.no_grad()
    def after_update(self, step: int, named_params: Sequence[tuple[str, nn.Parameter]],
                     optimizer: torch.optim.Optimizer) -> None:
        params = dict(named_params)
        for f in self.due("flip_param", step) + self.due("flip_optim", step):
            name = f.options.get("name")
            if name not in params:
                raise ValueError(f"fault {f.kind}: no parameter {name!r} on rank {f.rank}; have {sorted(params)[:5]} ...")
            target = params[name]
            if f.kind == "flip_optim":
                target = optimizer.state[params[name]][f.options.get("key", "exp_avg")]
            flip_bit(target, index=f.options.get("index", 0), bit=f.options.get("bit", 0))

    def corrupt_compute(self, step: int, model: nn.Module) -> Callable[[], Any] | None:
        """A context-manager factory flipping a bit of the first block's output, if a fault is due."""
        faults = self.due("corrupt_compute", step)
        if not faults:
            return None
        block = next(iter(model.layers.values()))
        bit = faults[0].options.get("bit", 0)

        class _Corrupt:
            def __enter__(self):
                def hook(module, args, out):
                    out = out.clone()
                    flip_bit(out, index=0, bit=bit)
                    return out
                self.handle = block.register_forward_hook(hook)

            def __exit__(self, *exc):
                self.handle.remove()
        return _Corrupt

    def checkpoint_written(self, path: Path, step: int) -> None:
        """Flip one byte of the checkpoint's largest file if a fault is due (rank 0 writes the marker)."""
        if not self.due("corrupt_checkpoint", step, rank=0) or _rank() != 0:
            return
        victim = max((p for p in path.iterdir() if p.is_file() and p.name != "COMPLETE"), key=lambda p: p.stat().st_size)
        with open(victim, "r+b") as f:
            f.seek(victim.stat().st_size // 2)
            b = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([b[0] ^ 0x10]))


def sleep(seconds: float) -> None:
    """A stalled or slow rank (fault injection); a function so tests can see where it is called."""
    if seconds > 0:
        time.sleep(seconds)


# ---- the trainer's hooks -------------------------------------------------------------------------


class SDC:
    """What the trainer calls around each step: `before_step` (re-computation), `after_step` (faults, replicas).

    model: the module whose parameters the optimizer steps (a ParallelModel's `.module`);
    run_micro(batch): forward + backward of one micro-batch (the trainer passes TrainCore's);
    outputs: the modules whose forward runs (a ParallelModel's parts): their outputs name the faulty rank.
    """

    def __init__(self, cfg: SDCConfig, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                 run_micro: Callable[[Any], Any], faults: Faults | None = None, outputs: Sequence[nn.Module] = (),
                 log: Callable[[str], None] = print, mark: Callable[[str], None] = lambda event: None):
        self.cfg, self.model, self.optimizer, self.run_micro, self.mark = cfg, model, optimizer, run_micro, mark
        self.faults = faults or Faults()
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.outputs = list(outputs)
        self.replicas = ReplicaChecker(self.named, optimizer) if cfg.replica_check_every else None
        if self.replicas is not None:
            groups = {t.group for t in self.replicas.tracked}
            log(f"sdc: replica check every {cfg.replica_check_every} steps over "
                f"{len(self.replicas.tracked)} replicated parameters "
                f"(and their optimizer state) in {len(groups)} replica group(s) on this rank")

    def before_step(self, step: int, micro_batches: Sequence[Any]) -> None:
        every = self.cfg.recompute_every
        if every and step % every == 0:
            recompute_check(step, lambda: self.run_micro(micro_batches[0]), self.named,
                            lambda: self.optimizer.zero_grad(set_to_none=True),
                            outputs=self.outputs, corrupt_first=self.faults.corrupt_compute(step, self.model),
                            mark=self.mark)

    def after_step(self, step: int) -> None:
        if self.faults:
            self.faults.after_update(step, self.named, self.optimizer)
        every = self.cfg.replica_check_every
        if self.replicas is not None and step % every == 0:
            self.replicas.check(step, mark=self.mark)

    def before_checkpoint(self, step: int) -> None:
        """The replica check before a checkpoint is written, where the period has not just run it:
        a restart resumes from the newest checkpoint, so none may hold replicas that disagree
        (with checks every 3 steps and checkpoints every 2, a flip after step 1 would otherwise be
        saved at step 2 and come back with every restart)."""
        every = self.cfg.replica_check_every
        if self.replicas is not None and step % every != 0:
            self.replicas.check(step, mark=self.mark)
