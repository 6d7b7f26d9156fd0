"""Throughput and traffic of each parallel layout on the tiny model, on this CPU.

For every layout: tokens/s of the whole group relative to one process, and the bytes each
rank moves in one steady-state step, counted at the dispatcher (`herd.parallel.comm`) and
compared with the analytic count (`herd.parallel.plan.step_comm_bytes`), split by the
parallelism that moves them. The CP layouts show that context parallelism adds only the
K/V all-gathers (and their reduce-scatters); the rest of their traffic is FSDP's, because
CP ranks share one FSDP group.

Step times are the best of the timed steps (the least disturbed by other processes on a
shared machine). Every process runs one thread, so a world-2 group uses the two cores a single
process leaves idle; world-4 groups oversubscribe them and are reported for traffic, not speed.
On a CPU with gloo the tiny model is latency bound: the speed figures say what the
collectives cost, not what a GPU cluster would do.

    python benchmarks/parallel.py               # debug model, 4 layers, 8 x 128 tokens per step
    python benchmarks/parallel.py --steps 3     # quicker

The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
import time
import warnings
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from herd.model import ModelArgs
from herd.model.llama import Transformer, build_model
from herd.parallel import ParallelConfig, parallelize
from herd.parallel.comm import CommCounter
from herd.parallel.plan import CommInputs, step_comm_bytes

ARGS = ModelArgs.from_name("debug", n_layers=4)
P = ParallelConfig
LAYOUTS: dict[int, dict[str, ParallelConfig]] = {
    2: {"FSDP 2": P(), "TP 2": P(tp=2), "CP 2": P(cp=2), "PP 2 (1F1B)": P(pp=2),
        "PP 2 (ZBVZeroBubble)": P(pp=2, pp_schedule="ZBVZeroBubble")},
    4: {"HSDP 2x2": P(dp_replicate=2, dp_shard=2), "FSDP 2 x TP 2": P(dp_shard=2, tp=2),
        "CP 2 x TP 2": P(cp=2, tp=2, dp_shard=1), "PP 2 x FSDP 2": P(pp=2, dp_shard=2)},
}


def batches(n: int, batch: int, seq: int):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        t = torch.randint(0, ARGS.vocab_size, (batch, seq + 1), generator=g)
        out.append((t[:, :-1], t[:, 1:]))
    return out


def run_layout(cfg: ParallelConfig | None, meshes, *, data, warmup: int) -> tuple[float, dict, dict]:
    """(seconds per timed step, measured bytes, analytic bytes) for one layout on this rank."""
    state = build_model(ARGS, seed=0).state_dict()
    with torch.device("meta"):
        model = Transformer(ARGS)
    pm = parallelize(model, cfg or P(dp_shard=1), meshes)
    pm.load_full_state_dict(state, device="cpu")
    opt = torch.optim.AdamW(pm.parameters(), lr=1e-3, foreach=True)
    d = pm.dims
    rank = meshes.dp_rank if meshes is not None else 0

    def step(inputs, targets, *, count=None):
        B = inputs.shape[0]
        rows = slice(rank * B // d.dp, (rank + 1) * B // d.dp)
        if count is not None:
            with count:
                pm.forward_backward(inputs[rows], targets[rows])
        else:
            pm.forward_backward(inputs[rows], targets[rows])
        pm.clip_grad_norm_(1.0)
        opt.step()
        opt.zero_grad()

    for inputs, targets in data[:warmup]:
        step(inputs, targets)
    measured, analytic = {}, {}
    if meshes is not None:
        counter = CommCounter()
        step(*data[warmup], count=counter)
        measured = counter.attribute(meshes)
        B, S = data[0][0].shape
        analytic = step_comm_bytes(ARGS, CommInputs(
            dp_replicate=d.dp_replicate, dp_shard=d.dp_shard, tp=d.tp, cp=d.cp, pp=d.pp, batch=B // d.dp,
            seq_len=S, stage_ids=pm.stage_ids, n_stages=d.pp * len(pm.parts),
            microbatches=cfg.pp_microbatches or d.pp * len(pm.parts), ac=cfg.ac, loss_parallel=cfg.loss_parallel))
        dist.barrier()
    # Best step, not mean: other processes share these cores, and the fastest step is the one
    # least disturbed by them. A group's step is as slow as its slowest rank.
    times = []
    for inputs, targets in data[warmup + 1:]:
        if meshes is not None:
            dist.barrier()
        t = time.perf_counter()
        step(inputs, targets)
        elapsed = torch.tensor(time.perf_counter() - t)
        if meshes is not None:
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        times.append(float(elapsed))
    return min(times), measured, analytic


def _worker(rank: int, world: int, port: int, out: str, steps: int, batch: int, seq: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=300))
    results = {}
    data = batches(steps + 3, batch, seq)
    for name, cfg in LAYOUTS[world].items():
        meshes = cfg.dims(world).build_mesh("cpu")
        seconds, measured, analytic = run_layout(cfg, meshes, data=data, warmup=2)
        gathered = [None] * world
        dist.all_gather_object(gathered, (measured, analytic))
        results[name] = {"world": world, "seconds_per_step": seconds,
                         "bytes_per_rank": [g[0] for g in gathered], "analytic_per_rank": [g[1] for g in gathered]}
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    dist.destroy_process_group()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=8, help="timed steps per layout")
    ap.add_argument("--batch", type=int, default=8, help="global batch, sequences")
    ap.add_argument("--seq", type=int, default=128)
    opts = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    data = batches(opts.steps + 3, opts.batch, opts.seq)
    single, _, _ = run_layout(None, None, data=data, warmup=2)
    tokens = opts.batch * opts.seq
    report = {"single process": {"world": 1, "seconds_per_step": single}}
    with tempfile.TemporaryDirectory() as tmp:
        for world in (2, 4):
            out = str(Path(tmp) / f"w{world}.json")
            mp.start_processes(_worker, args=(world, _port(), out, opts.steps, opts.batch, opts.seq), nprocs=world,
                               start_method="spawn", join=True)
            report |= json.loads(Path(out).read_text())
    single = min(single, run_layout(None, None, data=data, warmup=2)[0])  # baseline again, after the groups
    report["single process"]["seconds_per_step"] = single

    print(f"debug model, {ARGS.n_layers} layers, {opts.batch} x {opts.seq} tokens per step, fp32, gloo, 1 thread/rank, "
          f"best of {opts.steps} steps")
    print(f"{'layout':<22}{'world':>6}{'tok/s':>9}{'vs 1 proc':>10}  bytes per rank per step (measured = analytic?)")
    summary = {}
    for name, r in report.items():
        tps = tokens / r["seconds_per_step"]
        row = {"world": r["world"], "tokens_per_s": round(tps, 1), "vs_single": round(tps / (tokens / single), 3)}
        traffic = ""
        if r["world"] > 1:
            measured, analytic = r["bytes_per_rank"], r["analytic_per_rank"]
            row["match"] = measured == analytic
            # Rank 0 is representative except for pipeline stages; report the largest rank.
            worst = max(range(len(measured)), key=lambda i: sum(measured[i].values()))
            row["bytes"] = {k: v for k, v in measured[worst].items() if v}
            row["analytic_bytes"] = {k: v for k, v in analytic[worst].items() if v}
            traffic = ", ".join(f"{k} {v / 2**10:,.0f} KiB" for k, v in row["bytes"].items())
            traffic += "  (=)" if row["match"] else "  (DIFFERS: " + json.dumps(row["analytic_bytes"]) + ")"
        print(f"{name:<22}{r['world']:>6}{tps:>9,.0f}{row['vs_single']:>10.2f}  {traffic}")
        summary[name] = row
    print(json.dumps({"benchmark": "parallel", "model": "debug-4-layers", "tokens_per_step": tokens,
                      "threads_per_rank": 1, "layouts": summary}))


if __name__ == "__main__":
    main()
