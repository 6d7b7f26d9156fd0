"""Anomalies under 2 ranks: a fault one rank sees makes every rank skip the same update.

Run inside the world-2 group of scenarios.py. Each case trains 3 steps through the real
`TrainCore` with an `AnomalyGuard`, poisons step 2 on rank 1 only, and must end with weights
equal (bit for bit, same layout) to a run that never saw step 2's batch.
"""

from __future__ import annotations

import torch

import harness as H
from herd.data.loader import Batch
from herd.parallel import ParallelConfig
from herd.train.anomaly import AnomalyGuard, FaultInjector
from herd.train.config import AnomalyConfig
from herd.train.core import TrainCore

CASES = {  # name -> (layout, fault)
    "FSDP 2: NaN gradient on rank 1": (ParallelConfig(), "nan_grad"),
    "PP 2: NaN gradient on rank 1": (ParallelConfig(pp=2), "nan_grad"),
    "FSDP 2: NaN loss seen by rank 1 only": (ParallelConfig(), "nan_loss"),
    "TP 2: NaN loss seen by rank 1 only": (ParallelConfig(tp=2), "nan_loss"),
}


def _run(cfg: ParallelConfig, state, batches, *, guard: bool, fault: str | None = None):
    pm = H.build_parallel(cfg, state=state)
    g = AnomalyGuard(AnomalyConfig(), device=torch.device("cpu"), log=lambda m: None) if guard else None
    core = TrainCore(pm.module, H.new_optimizer(pm.parameters()), grad_clip=H.CLIP, parallel=pm, guard=g)
    if fault is not None:
        getattr(FaultInjector(), fault)(2, rank=1).install(core)
    verdicts = []
    for i, (inputs, targets, doc_ids) in enumerate(batches, 1):
        b = Batch(inputs, targets, doc_ids, int((targets != -100).sum()))
        verdicts.append(core.step([b], lr=H.LR, step=i).anomaly)
    return {H.clean(n): H.full(p).detach().clone() for n, p in pm.named_parameters()}, verdicts


def world2(state) -> list:
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
    return out
