"""What a step plan costs `herd serve --tp`: the plan's broadcast beside the decode step it precedes.

Rank 0 of `herd serve --tp N` broadcasts one step plan per forward (`herd.serve.tp`: its length,
then its ints) and the followers replay it. This times, on two gloo ranks of one thread each,
(a) sending and receiving a decode plan for 8 rows (17 ints), alone, and (b) a tensor-parallel
decode step over those 8 rows (the forward the plan announces), the same model as
`benchmarks/tp_decode.py` (dim 512, 8 layers). Medians over the timed steps; on two shared cores
the figures say what the software path costs, not what NVLink would do.

    python benchmarks/serve_tp_plan.py
    python benchmarks/serve_tp_plan.py --steps 20   # quicker

The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
import time
import warnings
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from herd.generate import KVCache, decode_step
from herd.model import ModelArgs, build_model
from herd.model.formats import save_model
from herd.parallel.inference import TPRank, load_tp_model
from herd.serve.tp import DECODE, broadcast_receiver, broadcast_sender

ARGS = ModelArgs(dim=512, n_layers=8, n_heads=8, n_kv_heads=4, vocab_size=8192, multiple_of=64, max_seq_len=512)
ROWS = 8


def _median_ms(fn, steps: int) -> float:
    times = []
    for i in range(steps + 3):
        dist.barrier()
        t0 = time.perf_counter()
        fn(i)
        if i >= 3:  # warm-up left out
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _worker(rank: int, world: int, port: int, path: str, steps: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=300))
    try:
        model = load_tp_model(path, TPRank(rank, world))
        cache = KVCache(model.args, batch_size=ROWS, max_seq_len=steps + 8)
        send, receive = broadcast_sender("cpu"), broadcast_receiver("cpu")
        plan = [DECODE, ROWS, *range(ROWS), *([0] * ROWS)]

        def broadcast(i: int) -> None:
            if rank == 0:
                send(plan)
            else:
                receive()

        def step(i: int) -> None:
            with torch.inference_mode():
                decode_step(model, torch.arange(ROWS), torch.full((ROWS,), i), cache)

        plan_ms = _median_ms(broadcast, steps)
        step_ms = _median_ms(step, steps)
        if rank == 0:
            Path(out).write_text(json.dumps({"plan_ms": plan_ms, "decode_step_ms": step_ms}))
    finally:
        dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=50)
    opts = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = save_model(build_model(ARGS, seed=0), Path(tmp) / "ck")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        out = str(Path(tmp) / "r.json")
        mp.start_processes(_worker, args=(2, port, str(path), opts.steps, out), nprocs=2, start_method="spawn")
        result = {"model": "dim 512, 8 layers, 8/4 heads, vocab 8192", "rows": ROWS, **json.loads(Path(out).read_text())}
    result["plan_share"] = result["plan_ms"] / (result["plan_ms"] + result["decode_step_ms"])
    print(f"TP 2, {ROWS} rows: step plan broadcast {result['plan_ms']:.3f} ms, decode step {result['decode_step_ms']:.2f} "
          f"ms ({100 * result['plan_share']:.1f}% of the two)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
