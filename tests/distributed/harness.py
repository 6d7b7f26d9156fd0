"""Spawned gloo process groups and the single-process reference the layouts are held to.

A spawned group costs ~10 s (world 2) or ~18 s (world 4) on two cores, almost all process
start-up, so each test module spawns one group and runs many scenarios in it (scenarios.py).
Scenarios return (name, ok, detail) results that rank 0 writes to a file; an exception
aborts the whole group with its traceback.
"""

from __future__ import annotations

import json
import os
import socket
import warnings
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor

from herd.model import ModelArgs
from herd.model.llama import Transformer, build_model
from herd.parallel import ParallelConfig, ParallelModel, parallelize

ARGS = ModelArgs.from_name("debug", n_layers=4)  # 4 layers: 2 ranks x 2 stages for looped/V schedules
SEQ, BATCH, STEPS, LR, CLIP = 32, 4, 3, 3e-3, 1.0
TOL = 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, fn: Callable, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")  # torchao and DeviceMesh chatter would bury real failures
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    try:
        results = fn(rank, world, Path(out).parent)
        if rank == 0:
            Path(out).write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def spawn(fn: Callable[[int, int, Path], list], world: int, tmp: Path) -> dict[str, tuple[bool, str]]:
    """Run fn(rank, world, workdir) in `world` gloo processes; return rank 0's {name: (ok, detail)}.

    `fn` must be importable by name in a fresh interpreter (spawn pickles it by reference).
    """
    out = str(tmp / "results.json")
    mp.start_processes(_worker, args=(world, _free_port(), fn, out), nprocs=world, start_method="spawn", join=True)
    return {name: (ok, detail) for name, ok, detail in json.loads(Path(out).read_text())}


# ---- data, reference, parallel runs ------------------------------------------------------------


def clean(name: str) -> str:
    """Parameter name without the wrappers AC and compile insert."""
    return name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def make_batches(*, docs: bool, steps: int = STEPS, batch: int = BATCH, seq: int = SEQ, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        tokens = torch.randint(0, ARGS.vocab_size, (batch, seq + 1), generator=g)
        inputs, targets = tokens[:, :-1], tokens[:, 1:].clone()
        targets[0, :3] = -100  # uneven target counts across data-parallel ranks
        doc_ids = None
        if docs:
            # 1-3 documents per row at random boundaries, different per row.
            cuts = torch.randint(1, seq, (batch, 2), generator=g)
            idx = torch.arange(seq)
            doc_ids = (idx >= cuts[:, :1]).long() + (idx >= cuts[:, 1:]).long()
        out.append((inputs, targets, doc_ids))
    return out


def reference_state(seed: int = 0, args: ModelArgs = ARGS) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in build_model(args, seed=seed).state_dict().items()}


def new_optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=LR, weight_decay=0.1, foreach=True)


class Single:
    """The single-process reference: a plain model, mean loss over the whole global batch."""

    def __init__(self, state: dict | None, args: ModelArgs = ARGS):
        self.model = Transformer(args)
        if state is not None:
            self.model.load_state_dict(state)
        self.model.tie_weights()

    def parameters(self):
        return self.model.parameters()

    def named_parameters(self):
        return self.model.named_parameters()

    def clip_grad_norm_(self, max_norm):
        return torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)

    def step(self, inputs, targets, doc_ids):
        logits = self.model(inputs, doc_ids=doc_ids)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        loss.backward()
        return loss.detach()


class Parallel:
    """A ParallelModel fed its data-parallel rows of the global batch (head in `loss_chunks` slices)."""

    def __init__(self, pm: ParallelModel, *, loss_chunks: int = 1):
        self.pm, self.loss_chunks = pm, loss_chunks

    def parameters(self):
        return list(self.pm.parameters())

    def named_parameters(self):
        return self.pm.named_parameters()

    def clip_grad_norm_(self, max_norm):
        return self.pm.clip_grad_norm_(max_norm)

    def step(self, inputs, targets, doc_ids):
        m, dp = self.pm.meshes, self.pm.dims.dp
        r = m.dp_rank if m is not None else 0
        rows = slice(r * inputs.shape[0] // dp, (r + 1) * inputs.shape[0] // dp)
        docs = None if doc_ids is None else doc_ids[rows]
        return self.pm.forward_backward(inputs[rows], targets[rows], doc_ids=docs, loss_chunks=self.loss_chunks).loss


def train(runner, opt, batches, *, keep_grads: bool = True):
    """AdamW steps with clipping; returns (losses, gradients before each step)."""
    losses, grads = [], []
    for inputs, targets, doc_ids in batches:
        opt.zero_grad()
        losses.append(float(runner.step(inputs, targets, doc_ids)))
        if keep_grads:
            grads.append({clean(n): full(p.grad).clone() for n, p in runner.named_parameters() if p.grad is not None})
        runner.clip_grad_norm_(CLIP)
        opt.step()
    return losses, grads


def reference_run(batches, *, state: dict, args: ModelArgs = ARGS):
    single = Single(state, args)
    return train(single, new_optimizer(single.parameters()), batches)


_MESHES: dict = {}


def meshes_for(config: ParallelConfig):
    """One mesh per layout per process: creating process groups is the slow part of a scenario."""
    dims = config.dims(dist.get_world_size())
    if dims not in _MESHES:
        _MESHES[dims] = dims.build_mesh("cpu")
    return _MESHES[dims]


def build_parallel(config: ParallelConfig, *, state: dict | None, args: ModelArgs = ARGS) -> ParallelModel:
    with torch.device("meta"):
        model = Transformer(args)
    pm = parallelize(model, config, meshes_for(config))
    if state is not None:
        pm.load_full_state_dict(state, device="cpu")
    else:
        pm.materialize(device="cpu", seed=1)  # weights to be overwritten by a checkpoint
    return pm


def parallel_run(config: ParallelConfig, batches, *, state: dict, args: ModelArgs = ARGS, loss_chunks: int = 1):
    pm = build_parallel(config, state=state, args=args)
    runner = Parallel(pm, loss_chunks=loss_chunks)
    return pm, train(runner, new_optimizer(runner.parameters()), batches)


def compare(name: str, ref, got, *, tol: float = TOL) -> list:
    """One result comparing losses and every gradient any rank holds with the reference.

    Collective: every rank must call it. Each rank checks the gradients it holds (pipeline
    stages hold a subset); together the ranks must cover every parameter on every step.
    """
    (ref_losses, ref_grads), (losses, grads) = ref, got
    worst, where = 0.0, ""
    for r, g in zip(ref_losses, losses):
        if abs(r - g) > worst:
            worst, where = abs(r - g), "loss"
    for step, (rg, gg) in enumerate(zip(ref_grads, grads)):
        for n, t in gg.items():
            diff = float((rg[n] - t).abs().max()) if n in rg else float("inf")
            if diff > worst:
                worst, where = diff, f"step {step} grad {n}"
    mine = {"worst": worst, "where": where, "names": [sorted(g) for g in grads], "losses": losses}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    problems = [f"rank {r}: {g['where']} off by {g['worst']:.2e}" for r, g in enumerate(gathered) if g["worst"] > tol]
    for step, rg in enumerate(ref_grads):
        covered = set().union(*(g["names"][step] for g in gathered))
        if covered != set(rg):
            problems.append(f"step {step}: gradients missing for {sorted(set(rg) - covered)[:3]}")
    detail = (f"max |diff| {max(g['worst'] for g in gathered):.2e} (tol {tol:g}); "
              f"ref losses {[round(x, 6) for x in ref_losses]}; got {[round(x, 6) for x in gathered[0]['losses']]}")
    if problems:
        detail += "; " + "; ".join(problems)
    return [(name, not problems, detail)]


def agree(name: str, ok: bool, detail: str) -> list:
    """A result that holds only if it holds on every rank (collective)."""
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (ok, detail))
    bad = [f"rank {r}: {d}" for r, (o, d) in enumerate(gathered) if not o]
    return [(name, not bad, "; ".join(bad) or gathered[0][1])]
