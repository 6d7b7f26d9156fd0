"""Decode step time of tensor-parallel inference: plain sharded linears vs the DTensor plan.

`herd.parallel.inference` shards the model into plain local `nn.Linear`s and calls
`torch.distributed` after wo and w2; the alternative is torch's DTensor plan (ColwiseParallel /
RowwiseParallel without sequence parallelism, which a one-token decode step cannot use). Both
move the same bytes (two all-reduces per layer, one for the embedding, one logits gather); this
measures what each costs per decode step, and one process for reference.

Two gloo ranks of one thread each on this CPU, batch 1, one token per step after a 32-token
prompt; the time is the median over the timed steps. On two shared cores the figures say what
the software path costs, not what NVLink would do.

    python benchmarks/tp_decode.py              # dim 512, 8 layers
    python benchmarks/tp_decode.py --steps 20   # quicker

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

from herd.generate.kv_cache import KVCache
from herd.model import ModelArgs, build_model
from herd.model.formats import load_model, save_model
from herd.parallel.inference import TPRank, load_tp_model, local_args

ARGS = ModelArgs(dim=512, n_layers=8, n_heads=8, n_kv_heads=4, vocab_size=8192, multiple_of=64, max_seq_len=512)
PROMPT = 32


def _step_ms(model, args: ModelArgs, steps: int) -> float:
    cache = KVCache(args, batch_size=1, max_seq_len=PROMPT + steps + 8)
    tok = torch.randint(0, ARGS.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    times = []
    with torch.inference_mode():
        logits = model(tok, cache=cache)
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        for i in range(steps + 3):
            if dist.is_initialized():
                dist.barrier()
            t0 = time.perf_counter()
            logits = model(nxt, pos=PROMPT + i, cache=cache)
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            if i >= 3:  # warm-up steps left out
                times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _dtensor_model(path: Path, world: int):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    model = load_model(path).eval()
    mesh = init_device_mesh("cpu", (world,))
    plan = {"tok_embeddings": RowwiseParallel(input_layouts=Replicate()),
            "output": ColwiseParallel(output_layouts=Replicate())}
    for i in model.layers:
        plan |= {f"layers.{i}.attention.{n}": ColwiseParallel() for n in ("wq", "wk", "wv")}
        plan |= {f"layers.{i}.feed_forward.{n}": ColwiseParallel() for n in ("w1", "w3")}
        plan |= {f"layers.{i}.attention.wo": RowwiseParallel(), f"layers.{i}.feed_forward.w2": RowwiseParallel()}
    parallelize_module(model, mesh, plan)
    return model


def _worker(rank: int, world: int, port: int, path: str, steps: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=300))
    try:
        plain = load_tp_model(path, TPRank(rank, world))
        plain_ms = _step_ms(plain, plain.args, steps)
        dt = _dtensor_model(Path(path), world)
        dt_ms = _step_ms(dt, local_args(ARGS, world), steps)
        if rank == 0:
            Path(out).write_text(json.dumps({"plain_ms": plain_ms, "dtensor_ms": dt_ms}))
    finally:
        dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=50)
    opts = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = save_model(build_model(ARGS, seed=0), Path(tmp) / "ck")
        torch.set_num_threads(1)
        single = _step_ms(load_model(path).eval(), ARGS, opts.steps)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        out = str(Path(tmp) / "r.json")
        mp.start_processes(_worker, args=(2, port, str(path), opts.steps, out), nprocs=2, start_method="spawn")
        result = {"model": "dim 512, 8 layers, 8/4 heads, vocab 8192", "single_process_ms": single,
                  **json.loads(Path(out).read_text())}
    print(f"decode step, batch 1: one process {result['single_process_ms']:.2f} ms; TP 2 plain "
          f"{result['plain_ms']:.2f} ms; TP 2 DTensor {result['dtensor_ms']:.2f} ms")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
