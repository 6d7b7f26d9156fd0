"""Anomalies under 2 ranks: a fault one rank sees makes every rank skip the same update.

Run inside the world-2 group of scenarios.py. Each case trains 3 steps through the real
`TrainCore` with an `AnomalyGuard`, poisons step 2 on rank 1 only, and must end with weights
equal (bit for bit, same layout) to a run that never saw step 2's batch. Then a whole FSDP
`Trainer` rolls back after NaN gradients on rank 1 only and must equal, bit for bit, an FSDP
run whose loader never returned the skipped window.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
import torch.distributed as dist

import harness as H
from herd.data.loader import Batch
from herd.parallel import ParallelConfig
from herd.data.shards import ShardWriter
from herd.train.anomaly import AnomalyGuard, FaultInjector
from herd.train.config import AnomalyConfig, config_from_dict
from herd.train.core import TrainCore
from herd.train.trainer import Trainer, packed_loader

CASES = {  # name -> (layout, fault)
    "FSDP 2: NaN gradient on rank 1": (ParallelConfig(), "nan_grad"),
    "PP 2: NaN gradient on rank 1": (ParallelConfig(pp=2), "nan_grad"),
    "FSDP 2: NaN loss seen by rank 1 only": (ParallelConfig(), "nan_loss"),
    "TP 2: NaN loss seen by rank 1 only": (ParallelConfig(tp=2), "nan_loss"),
}


RETRY_CASES = {"FSDP 2": ParallelConfig(), "PP 2": ParallelConfig(pp=2)}
RETRY_NAME = "anomaly {}: a one-time NaN gradient on rank 1 is recomputed, weights equal a fault-free run"


def _run(cfg: ParallelConfig, state, batches, *, guard: bool, fault: str | None = None, retry: int = 0):
    # retry 0 by default: the faults here stand for bad data, which a recomputation would meet again.
    pm = H.build_parallel(cfg, state=state)
    g = (AnomalyGuard(AnomalyConfig(retry_nonfinite=retry), device=torch.device("cpu"), log=lambda m: None)
         if guard else None)
    core = TrainCore(pm.module, H.new_optimizer(pm.parameters()), grad_clip=H.CLIP, parallel=pm, guard=g)
    if fault is not None:
        getattr(FaultInjector(), fault)(2, rank=1).install(core)
    verdicts = []
    for i, (inputs, targets, doc_ids) in enumerate(batches, 1):
        b = Batch(inputs, targets, doc_ids, int((targets != -100).sum()))
        verdicts.append(core.step([b], lr=H.LR, step=i).anomaly)
    return {H.clean(n): H.full(p).detach().clone() for n, p in pm.named_parameters()}, verdicts


def _trainer_cfg(data: Path, out: Path):
    return config_from_dict({
        "job": {"out_dir": str(out), "device": "cpu", "seed": 0},
        "model": {"preset": "debug", "vocab_size": 512},
        "data": {"train": [str(data)]},
        "optim": {"lr": 3e-3},
        "checkpoint": {"every": 3, "keep_last": 2},
        "metrics": {"log_every": 100, "tensorboard": False, "plot": False, "progress": False},
        "anomaly": {"max_consecutive": 2, "retry_nonfinite": 0},
        "stages": [{"name": "pretrain", "steps": 8, "ramp": [[0, 256, 64]]}],
    })


class _Dropping:
    """The reference's loader: at its `at`-th read it reads and throws away `n` batches first."""

    def __init__(self, inner, *, at: int, n: int):
        self.inner, self.at, self.n, self.calls = inner, at, n, 0

    def next_batch(self, **kw):
        self.calls += 1
        for _ in range(self.n if self.calls == self.at else 0):
            self.inner.next_batch(**kw)
        return self.inner.next_batch(**kw)

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state):
        self.inner.load_state_dict(state)


def trainer_rollback(workdir: Path) -> list:
    data = workdir / "anomaly-shards"
    if dist.get_rank() == 0:
        rng = random.Random(0)
        with ShardWriter(data, vocab_size=512) as w:
            for _ in range(100):
                w.add([rng.randrange(256) for _ in range(rng.randint(5, 90))])
    dist.barrier()
    t = Trainer(_trainer_cfg(data, workdir / "anomaly-run"), log=lambda m: None)
    FaultInjector().nan_grad(5, rank=1).nan_grad(6, rank=1).install(t)
    result = t.fit()
    ref = Trainer(_trainer_cfg(data, workdir / "anomaly-ref"), log=lambda m: None,
                  loader_factory=lambda *a, **kw: _Dropping(packed_loader(*a, **kw), at=5, n=2))
    ref.fit()
    got = {n: H.full(p).detach() for n, p in t.model.named_parameters()}
    want = {n: H.full(p).detach() for n, p in ref.model.named_parameters()}
    same = set(got) == set(want) and all(torch.equal(got[n], want[n]) for n in want)
    ok = same and result.anomalies == {"nonfinite_grad": 2, "rollback": 1}
    diff = max(float((got[n] - want[n]).abs().max()) for n in want)
    return H.agree("anomaly FSDP 2 Trainer: rollback after NaN gradients on rank 1 equals a run without the window",
                   ok, f"anomalies {result.anomalies}; max |diff| {diff:.1e}")


def world2(state, workdir: Path) -> list:
    batches = H.make_batches(docs=True)
    out = []
    for name, (cfg, fault) in CASES.items():
        got, verdicts = _run(cfg, state, batches, guard=True, fault=fault)
        ref, _ = _run(cfg, state, [batches[0], batches[2]], guard=False)
        skipped = [v is not None for v in verdicts]
        rec = verdicts[1].record if verdicts[1] is not None else None
        expect_ranks = 2 if fault == "nan_grad" else 1  # the global grad norm is NaN everywhere; the loss only on 1
        ok = (skipped == [False, True, False] and rec is not None and rec.ranks == expect_ranks and rec.world == 2
              and all(torch.equal(got[k], ref[k]) for k in ref) and set(got) == set(ref))
        detail = (f"skipped {skipped}; record {rec}; "
                  f"max |diff| {max(float((got[k] - ref[k]).abs().max()) for k in ref):.1e}")
        out += H.agree(f"anomaly {name}", ok, detail)
    # A one-time NaN gradient on rank 1 (transient): both ranks recompute the step, and the weights
    # equal those of a run that never met the fault.
    for name, cfg in RETRY_CASES.items():
        got, verdicts = _run(cfg, state, batches, guard=True, fault="nan_grad", retry=1)
        ref, _ = _run(cfg, state, batches, guard=False)
        ok = verdicts == [None, None, None] and set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref)
        out += H.agree(RETRY_NAME.format(name), ok, f"verdicts {verdicts}; max |diff| "
                       f"{max(float((got[k] - ref[k]).abs().max()) for k in ref):.1e}")
    return out + trainer_rollback(workdir)
