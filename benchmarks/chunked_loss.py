"""What `train.loss_chunks` buys and costs under FSDP 2 (gloo, 2 ranks, one thread each), on this CPU.

A 4-layer debug-width model with a 32,768-token vocabulary, so the output head dominates as it
does for Llama 3 (128,256 x 4,096). For 1, 4 and 16 chunks, per rank and step:

* saved for backward: the bytes autograd keeps from forward to backward (parameters excluded),
  measured with saved-tensor hooks on an unsharded copy over the rank's rows. The plain head keeps the whole fp32 (tokens x vocab)
  logits for the cross-entropy's backward; the chunked head keeps none (each chunk is
  recomputed in backward), only the hidden states its chunks read, which the hooks do not see
  (`tokens x dim x 4` bytes, noted in the output).
* largest logits: the most rows any (rows x vocab) tensor had, forward or backward.
* FSDP bytes: all-gathers and reduce-scatters, which chunking must not change (the head is
  gathered once and its gradient reduce-scattered once, whatever the chunk count).
* seconds per step: best of the timed steps; the price is one more head matmul per step.

    python benchmarks/chunked_loss.py             # 4 x 256 tokens per step
    python benchmarks/chunked_loss.py --steps 3

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
from torch.utils._python_dispatch import TorchDispatchMode

from herd.model import ModelArgs
from herd.model.llama import Transformer, build_model
from herd.model.loss import chunked_cross_entropy_sum, cross_entropy_sum
from herd.parallel import ParallelConfig, parallelize
from herd.parallel.comm import CommCounter

ARGS = ModelArgs.from_name("debug", n_layers=4, vocab_size=32768)
CHUNKS = (1, 4, 16)


class _LogitRows(TorchDispatchMode):
    """The most rows any non-view tensor whose last dimension is the vocabulary had."""

    def __init__(self):
        super().__init__()
        self.rows = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == ARGS.vocab_size:
                    self.rows = max(self.rows, t.shape[:-1].numel())
        return out


def _saved_bytes(fn, params) -> int:
    """Bytes of the distinct storages autograd saves while `fn()` runs forward, parameters excluded."""
    skip = {p.untyped_storage().data_ptr() for p in params}
    seen: dict[int, int] = {}

    def pack(t):
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return t
        s = t.untyped_storage()
        if s.data_ptr() not in skip:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def _worker(rank: int, world: int, port: int, out: str, steps: int, batch: int, seq: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=300))
    cfg = ParallelConfig()
    meshes = cfg.dims(world).build_mesh("cpu")
    g = torch.Generator().manual_seed(0)
    data = []
    for _ in range(steps + 2):
        t = torch.randint(0, ARGS.vocab_size, (batch, seq + 1), generator=g)
        data.append((t[:, :-1], t[:, 1:]))
    rows = slice(rank * batch // world, (rank + 1) * batch // world)
    plain = build_model(ARGS, seed=0)
    state = plain.state_dict()
    results = {}
    for chunks in CHUNKS:
        with torch.device("meta"):
            model = Transformer(ARGS)
        pm = parallelize(model, cfg, meshes)
        pm.load_full_state_dict(state, device="cpu")
        opt = torch.optim.AdamW(pm.parameters(), lr=1e-3, foreach=True)

        def step(inputs, targets):
            loss = pm.forward_backward(inputs[rows], targets[rows], loss_chunks=chunks).loss
            pm.clip_grad_norm_(1.0)
            opt.step()
            opt.zero_grad()
            return float(loss)

        step(*data[0])  # first step: lazy initialisation
        # What autograd saves depends on the rank's tokens, not on where FSDP keeps the weights
        # (whose gathered copies the hooks would also see), so it is measured on an unsharded
        # copy over the same rows, with the same loss functions the parallel path calls.
        inputs, targets = data[1][0][rows], data[1][1][rows]
        if chunks == 1:
            saved = _saved_bytes(lambda: cross_entropy_sum(plain(inputs), targets), plain.parameters())
        else:
            saved = _saved_bytes(lambda: chunked_cross_entropy_sum(plain.hidden(inputs), plain.output.weight, targets,
                                                                   chunks=chunks), plain.parameters())
        with CommCounter() as counter, _LogitRows() as logit_rows:
            losses = [step(*data[1])]
        fsdp = sum(c.nbytes for c in counter.calls if c.kind in ("all_gather", "reduce_scatter"))
        times = []
        for inputs, targets in data[2:]:
            dist.barrier()
            t0 = time.perf_counter()
            losses.append(step(inputs, targets))
            elapsed = torch.tensor(time.perf_counter() - t0)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            times.append(float(elapsed))
        results[chunks] = {"saved_for_backward_bytes": saved, "largest_logits_rows": logit_rows.rows,
                           "fsdp_bytes": fsdp, "seconds_per_step": min(times), "losses": losses}
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    dist.destroy_process_group()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=6, help="timed steps per chunk count")
    ap.add_argument("--batch", type=int, default=4, help="global batch, sequences")
    ap.add_argument("--seq", type=int, default=256)
    opts = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "chunked.json")
        mp.start_processes(_worker, args=(2, _port(), out, opts.steps, opts.batch, opts.seq), nprocs=2,
                           start_method="spawn", join=True)
        report = {int(k): v for k, v in json.loads(Path(out).read_text()).items()}
    tokens = opts.batch // 2 * opts.seq
    hidden = tokens * ARGS.dim * 4
    print(f"FSDP 2, debug width, {ARGS.n_layers} layers, vocab {ARGS.vocab_size:,}, {tokens} tokens per rank, fp32, "
          f"gloo, best of {opts.steps} steps; chunked runs also keep the {hidden / 2**20:.2f} MiB hidden states")
    print(f"{'chunks':>6}{'saved for bwd MiB':>19}{'largest logits':>16}{'FSDP MiB':>10}{'s/step':>8}{'vs plain':>9}")
    base = report[1]["seconds_per_step"]
    for chunks, r in report.items():
        logits = f"{r['largest_logits_rows']} x {ARGS.vocab_size}"
        print(f"{chunks:>6}{r['saved_for_backward_bytes'] / 2**20:>19.2f}{logits:>16}{r['fsdp_bytes'] / 2**20:>10.2f}"
              f"{r['seconds_per_step']:>8.3f}{r['seconds_per_step'] / base:>9.2f}")
    drift = max(abs(a - b) for r in report.values() for a, b in zip(r["losses"], report[1]["losses"]))
    print(f"losses of every chunk count vs the plain head: max |diff| {drift:.1e}")
    print(json.dumps({"benchmark": "chunked_loss", "layout": "FSDP 2", "vocab": ARGS.vocab_size,
                      "tokens_per_rank": tokens, "loss_max_abs_diff_vs_plain": drift,
                      "by_chunks": {c: {k: v for k, v in r.items() if k != "losses"} for c, r in report.items()}}))


if __name__ == "__main__":
    main()
