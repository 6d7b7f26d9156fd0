"""Tensor-parallel inference: each rank loads and runs its own slice of every matrix.

Megatron's layout, the same split as the training plan in `tensor.py`: wq/wk/wv and w1/w3 are
column-parallel (a rank owns whole query heads, the KV heads they read, and a slice of the FFN),
wo and w2 are row-parallel and all-reduce their partial sums, the embedding and the output head
are split by vocabulary. Per layer a decode step costs two all-reduces of (B, 1, dim), plus one
for the embedding and one all-gather of the logits per step.

Why plain sharded `nn.Linear`s and `torch.distributed` calls rather than the training plan's
DTensors:
* the training plan is sequence-parallel (the residual stream sharded along the sequence); a
  decode step has a sequence of one token, which cannot be split over ranks;
* the unchanged `Transformer` runs on local tensors: attention infers its local head count from
  the weights (`view(B, S, -1, D)`), and the KV cache is built from `model.args`, which here
  describes this rank's shard (its own KV heads only), so generate, the cache and the sampling
  code need no TP branch;
* decode is latency-bound: DTensor dispatch adds Python work to every op of every layer at every
  token, where this path adds one collective call after wo and w2 (measured in
  benchmarks/tp_decode.py).

GQA: a rank must own whole KV heads, so n_kv_heads % tp == 0 is required (a clear error names
the degrees that work). vLLM instead replicates KV heads when tp > n_kv_heads; herd does not,
since no Llama 3 model needs it inside one 8-GPU node (every size has 8 KV heads).

Sampling agreement: every rank receives the same all-gathered logits (identical bytes), so ranks
that sample with the same seed draw the same token and no per-step broadcast is needed; the
caller must share the seed (`shared_seed`).
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from herd.model.args import ModelArgs
from herd.model.llama import Transformer
from herd.model.sliced import SlicedCheckpoint, open_sliced

_COLUMN = ("attention.wq", "attention.wk", "attention.wv", "feed_forward.w1", "feed_forward.w3")
_ROW = ("attention.wo", "feed_forward.w2")


@dataclass(frozen=True)
class TPRank:
    """This process's place in the tensor-parallel group (the default group: one model, N ranks)."""

    rank: int
    size: int
    group: dist.ProcessGroup | None = None

    def vocab_range(self, vocab_size: int) -> tuple[int, int, int]:
        """(start, stop, rows per rank): ceil(V / N) rows each, the last rank's padded with zeros."""
        per = -(-vocab_size // self.size)
        start = min(self.rank * per, vocab_size)
        return start, min(start + per, vocab_size), per


def check_tp_inference(args: ModelArgs, tp: int) -> None:
    """ValueError naming the fix when `args` cannot be split over `tp` ranks for inference."""
    if tp < 1:
        raise ValueError(f"--tp must be a positive number of ranks, got {tp}")
    if args.n_kv_heads % tp:
        ok = [d for d in range(1, args.n_kv_heads + 1) if args.n_kv_heads % d == 0]
        raise ValueError(
            f"--tp {tp} does not divide n_kv_heads={args.n_kv_heads}: with grouped-query attention each rank must "
            f"own whole KV heads and the {args.n_rep} query heads that read each (herd does not replicate KV heads "
            f"across ranks); use --tp in {ok}"
        )
    if args.ffn_hidden_dim % tp:
        raise ValueError(f"--tp {tp} does not divide the FFN width {args.ffn_hidden_dim}; choose a tp that does")


def local_args(args: ModelArgs, tp: int) -> ModelArgs:
    """The shape of one rank's shard: its query and KV heads (head_dim and vocabulary unchanged).

    The KV cache is sized from these, so each rank caches only its own KV heads.
    """
    return args.replace(n_heads=args.n_heads // tp, n_kv_heads=args.n_kv_heads // tp, head_dim_override=args.head_dim)


# ---- the sharded modules ----------------------------------------------------------------------


class RowParallelLinear(nn.Linear):
    """A slice of the input features; the partial products are summed over the group."""

    def __init__(self, in_features: int, out_features: int, *, tp: TPRank, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=False, device=device, dtype=dtype)
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight)  # (..., out) partial sum over this rank's inputs
        dist.all_reduce(out, group=self.tp.group)
        return out


class VocabParallelEmbedding(nn.Module):
    """Rows [start, stop) of the embedding; other ranks' tokens look up zeros, summed over the group."""

    def __init__(self, weight: torch.Tensor, *, vocab_size: int, tp: TPRank):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)  # (ceil(V/N), dim)
        self.tp = tp
        self.start, self.stop, _ = tp.vocab_range(vocab_size)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        mine = (tokens >= self.start) & (tokens < self.stop)  # (B, S)
        local = torch.where(mine, tokens - self.start, 0)
        h = F.embedding(local, self.weight) * mine.unsqueeze(-1).to(self.weight.dtype)  # (B, S, dim)
        dist.all_reduce(h, group=self.tp.group)
        return h


class VocabParallelHead(nn.Module):
    """Logits for this rank's vocabulary rows, gathered so every rank holds all of them.

    Every rank needs the full, identical logits: sampling runs on each rank with a shared seed.
    """

    def __init__(self, weight: nn.Parameter, *, vocab_size: int, tp: TPRank):
        super().__init__()
        self.weight = weight  # (ceil(V/N), dim); the embedding's own Parameter when tied
        self.tp, self.vocab_size = tp, vocab_size

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        local = F.linear(h, self.weight).contiguous()  # (..., V/N)
        parts = [torch.empty_like(local) for _ in range(self.tp.size)]
        dist.all_gather(parts, local, group=self.tp.group)
        return torch.cat(parts, dim=-1)[..., : self.vocab_size]  # (..., V): the padding rows cut off


# ---- loading ----------------------------------------------------------------------------------


def _read(ckpt: SlicedCheckpoint, name: str, dim: int | None, start: int, stop: int, *, dtype, device):
    t = ckpt.read(name, dim, start, stop)
    return t.to(device=device, dtype=dtype or t.dtype)


def _vocab_rows(ckpt: SlicedCheckpoint, name: str, tp: TPRank, *, dtype, device) -> torch.Tensor:
    start, stop, per = tp.vocab_range(ckpt.args.vocab_size)
    rows = _read(ckpt, name, 0, start, stop, dtype=dtype, device=device)  # (stop - start, dim)
    if rows.shape[0] < per:  # the last rank's share of an uneven vocabulary: zero rows, cut off later
        rows = torch.cat([rows, rows.new_zeros(per - rows.shape[0], rows.shape[1])])
    return rows


def load_tp_model(
    path: str | os.PathLike,
    tp: TPRank,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    max_seq_len: int | None = None,
) -> Transformer:
    """This rank's shard of the checkpoint at `path` (HF, Meta or GGUF), read slice by slice.

    No rank holds the whole model: each weight is read as the slice this rank keeps (see
    `herd.model.sliced` for what each format allows). `model.args` describes the shard
    (`local_args`), except `vocab_size`, which stays the full vocabulary the logits cover.
    """
    ckpt = open_sliced(path)
    args = ckpt.args if max_seq_len is None else ckpt.args.replace(max_seq_len=max_seq_len)
    check_tp_inference(args, tp.size)
    dtype = dtype or ckpt.read("norm.weight").dtype  # the checkpoint's dtype, from a small tensor
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        dtype = torch.float32  # e.g. a quantized GGUF: its blocks dequantize to float32
    with torch.device("meta"):
        model = Transformer(args)
    for name, t in model.state_dict().items():  # every tensor present and whole before slicing any
        if ckpt.shape(name) != tuple(t.shape):
            raise ValueError(f"{ckpt.source}: {name} has shape {ckpt.shape(name)} but the config implies "
                             f"{tuple(t.shape)}; the config does not describe these weights")
    hd, r, n = args.head_dim, tp.rank, tp.size
    # Rows per rank of each column-parallel weight (= columns per rank of the row-parallel ones).
    share = {"wq": args.n_heads * hd // n, "wk": args.n_kv_heads * hd // n, "wv": args.n_kv_heads * hd // n,
             "w1": args.ffn_hidden_dim // n, "w3": args.ffn_hidden_dim // n, "wo": args.n_heads * hd // n,
             "w2": args.ffn_hidden_dim // n}

    def param(t: torch.Tensor) -> nn.Parameter:
        return nn.Parameter(t, requires_grad=False)

    for i, block in model.layers.items():
        for sub in _COLUMN:
            parent, attr = sub.split(".")
            k = share[attr]
            w = _read(ckpt, f"layers.{i}.{sub}.weight", 0, r * k, (r + 1) * k, dtype=dtype, device=device)
            with torch.device("meta"):
                lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
            lin.weight = param(w)
            setattr(getattr(block, parent), attr, lin)
        for sub in _ROW:
            parent, attr = sub.split(".")
            k = share[attr]
            w = _read(ckpt, f"layers.{i}.{sub}.weight", 1, r * k, (r + 1) * k, dtype=dtype, device=device)
            lin = RowParallelLinear(w.shape[1], w.shape[0], tp=tp, device="meta")
            lin.weight = param(w)
            setattr(getattr(block, parent), attr, lin)
        for norm in ("attention_norm", "ffn_norm"):
            getattr(block, norm).weight = param(_read(ckpt, f"layers.{i}.{norm}.weight", None, 0, 0, dtype=dtype,
                                                      device=device))
        block.attention.n_heads, block.attention.n_kv_heads = args.n_heads // n, args.n_kv_heads // n
    model.norm.weight = param(_read(ckpt, "norm.weight", None, 0, 0, dtype=dtype, device=device))
    emb = _vocab_rows(ckpt, "tok_embeddings.weight", tp, dtype=dtype, device=device)
    model.tok_embeddings = VocabParallelEmbedding(emb, vocab_size=args.vocab_size, tp=tp)
    head = model.tok_embeddings.weight if args.tie_embeddings else param(
        _vocab_rows(ckpt, "output.weight", tp, dtype=dtype, device=device))
    model.output = VocabParallelHead(head, vocab_size=args.vocab_size, tp=tp)
    model.args = local_args(args, n)
    model.freqs_cis = torch.empty(0, device=device)  # built on meta; recompute on the real device
    model.init_rope()
    leftover = [name for name, p in model.named_parameters() if p.is_meta]
    assert not leftover, f"parameters never loaded: {leftover[:3]}"
    return model.eval()


# ---- process group ----------------------------------------------------------------------------


def init_tp(tp: int, device: str) -> tuple[TPRank, str]:
    """Join the torchrun group (NCCL on CUDA, gloo on CPU); return this rank and its device.

    CUDA ranks each take the GPU of their LOCAL_RANK.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != tp:
        raise ValueError(f"--tp {tp} needs {tp} processes but this torchrun group has {world}; start it with "
                         f"--nproc-per-node {tp}, or run the command without torchrun and herd starts them")
    if torch.device(device).type == "cuda":
        check_gpus(tp)
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.device(device).type == "cuda" else "gloo")
    return TPRank(rank=dist.get_rank(), size=dist.get_world_size()), device


def check_gpus(tp: int) -> None:
    """One GPU per rank: NCCL cannot run two ranks of a group on one device."""
    have = torch.cuda.device_count()
    if have < tp:
        raise ValueError(f"--tp {tp} on cuda needs {tp} GPUs (one per rank) but torch sees {have}; lower --tp or "
                         "use --device cpu")


def shared_seed(seed: int | None, tp: TPRank) -> int:
    """One sampling seed for every rank: the user's, or one rank 0 draws (then broadcast).

    Different seeds would make ranks sample different tokens and their collectives diverge.
    """
    if seed is not None:
        return seed
    box = [secrets.randbits(62) if tp.rank == 0 else None]  # torch's default generator is not random
    dist.broadcast_object_list(box, src=0, group=tp.group)
    return int(box[0])
