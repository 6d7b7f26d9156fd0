"""Size a training layout without hardware: memory per GPU, step FLOPs, communication.

Memory counts what herd's own implementation keeps alive on the busiest pipeline stage:

* parameters: the fp32 master shard (FSDP over dp x cp ranks) plus the compute-dtype copy
  FSDP gathers: two blocks at a time when it reshards after forward (no pipeline), the whole
  stage when it does not (with pipeline parallelism, as the paper does);
* gradients: the fp32 shard, plus the unsharded fp32 accumulation of the stage when pipeline
  microbatches accumulate before the reduce-scatter (the paper's fp32 accumulation);
* optimizer: AdamW's two fp32 moments, sharded;
* activations: the tensors autograd saves per layer and token, counted from herd's eager
  model (`activation_bytes_per_token`, checked against saved-tensor hooks in the tests),
  times the layers of the stage and the tokens in flight under the pipeline schedule;
  plus the logits and their loss on the last stage.

Trade-off: this is arithmetic on shapes, so it cannot see allocator fragmentation, kernel
workspaces or NCCL buffers (typically a few GiB on a GPU); compare the total with the
device's memory leaving that margin. FLOPs follow `ModelArgs.flops_per_token` (6N + attention,
no causal discount); communication follows the algorithm-bytes convention of `comm.py`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from herd.model.args import ModelArgs
from herd.parallel.checkpointing import AC_MODES
from herd.parallel.pipeline import PP_SCHEDULES, check_pp, check_schedule_ac, layer_split, stage_ids, stages_per_rank
from herd.parallel.tensor import check_tp

H100_BF16_PEAK = 989e12  # dense bf16 FLOP/s of an H100 SXM, the usual MFU denominator
GiB = 2**30


@dataclass(frozen=True)
class Layout:
    gpus: int
    seq_len: int
    global_batch_tokens: int
    tp: int = 1
    cp: int = 1
    pp: int = 1
    micro_batch: int = 1  # sequences per pipeline microbatch (per data-parallel rank)
    ac: str = "none"
    pp_schedule: str = "1F1B"
    pp_stages_per_rank: int = 0
    compute_bytes: int = 2  # bf16 activations and gathered weights
    loss_chunks: int = 1  # train.loss_chunks: the head and its loss in slices, recomputed in backward

    def __post_init__(self) -> None:
        for name in ("gpus", "seq_len", "global_batch_tokens", "tp", "cp", "pp", "micro_batch", "loss_chunks"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.ac not in AC_MODES:
            raise ValueError(f"ac must be one of {', '.join(AC_MODES)}, got {self.ac!r}")
        if self.gpus % (self.tp * self.cp * self.pp) != 0:
            raise ValueError(f"{self.gpus} GPUs are not divisible by tp*cp*pp = {self.tp * self.cp * self.pp}; "
                             "the data-parallel degree must be a whole number")
        if self.global_batch_tokens % self.seq_len != 0:
            raise ValueError(f"the global batch ({self.global_batch_tokens:,} tokens) is not a whole number of "
                             f"{self.seq_len:,}-token sequences")
        if self.sequences % self.dp != 0:
            raise ValueError(f"{self.sequences:,} sequences per step cannot be split evenly over dp = {self.dp} ranks; "
                             "change the batch or the layout")
        if (self.sequences // self.dp) % self.micro_batch != 0:
            raise ValueError(f"{self.sequences // self.dp} sequences per data-parallel rank are not a multiple of "
                             f"micro_batch = {self.micro_batch}")
        if self.seq_len % (2 * self.cp) != 0:
            raise ValueError(f"context parallel needs seq_len divisible by 2*cp = {2 * self.cp}")
        if (self.seq_len // self.cp) % self.tp != 0:  # as ParallelModel.forward_backward checks it
            raise ValueError(f"sequence parallel needs seq_len / cp = {self.seq_len // self.cp} divisible by "
                             f"tp = {self.tp}")
        if self.pp_stages_per_rank < 0 or (self.pp == 1 and self.pp_stages_per_rank > 1):
            raise ValueError(f"pp_stages_per_rank = {self.pp_stages_per_rank} is the stages each pipeline rank runs: "
                             "0 (the schedule's default) or, with pp > 1, a count the schedule accepts")

    @property
    def dp(self) -> int:
        return self.gpus // (self.tp * self.cp * self.pp)

    @property
    def sequences(self) -> int:
        return self.global_batch_tokens // self.seq_len

    @property
    def microbatches(self) -> int:
        return self.sequences // self.dp // self.micro_batch


# ---- activations ---------------------------------------------------------------------------


def activation_bytes_per_token(args: ModelArgs, *, compute_bytes: int = 2, tp: int = 1, cp: int = 1,
                               ac: str = "none") -> float:
    """Bytes autograd keeps per layer for each local token (herd's eager block).

    No AC, per RMSNorm: its fp32 input copy (4d), the fp32 1/rms, the normalised output, and
    the (TP-gathered) input of the projections it feeds; attention: q, the gathered k and v,
    the output and the fp32 log-sum-exp per head; FFN: w1 and w3 outputs, SiLU, their product.
    Under TP the sequence-sharded and head-sharded tensors divide by tp; the projection
    inputs are gathered over the sequence and do not. Under CP k and v span the whole
    sequence, cp times the local tokens.
    """
    d, e = args.dim, compute_bytes
    qd, kv, H, ffn = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim, args.n_heads, args.ffn_hidden_dim
    if ac == "full":
        return e * d / tp  # only the block input, sequence-sharded under TP
    norms = 2 * (4 * d + 4 + e * d) / tp + 2 * e * d
    attention = (e * (2 * qd) + 4 * H) / tp + e * 2 * kv * cp / tp
    mlp = e * 4 * ffn / tp
    if ac == "selective":
        # Kept: matmul outputs (q, k, v, wo, w1, w3, w2), attention output and LSE, the block input.
        return (e * (qd + 2 * kv + qd + d + 2 * ffn + d + d) + 4 * H) / tp + e * 2 * kv * (cp - 1) / tp
    return norms + attention + mlp


def _in_flight(layout: Layout, n_per_rank: int, rank: int) -> float:
    """Microbatches' worth of `rank`'s layers alive at its memory peak.

    GPipe keeps every microbatch; 1F1B keeps pp - rank (the warm-up depth); interleaved
    schedules warm up 2(pp - rank - 1) + (v - 1)pp + 1 chunks of 1/v of the layers
    (Megatron-LM's count), which the zero-bubble schedules are taken to match.
    """
    pp, n_mb = layout.pp, layout.microbatches
    if pp == 1:
        return 1.0
    if layout.pp_schedule == "GPipe":
        return float(n_mb)
    if n_per_rank == 1:
        return float(min(pp - rank, n_mb))
    chunks = min(2 * (pp - rank - 1) + (n_per_rank - 1) * pp + 1, n_mb * n_per_rank)
    return chunks / n_per_rank


# ---- parameters per stage ----------------------------------------------------------------


def _layer_params(args: ModelArgs) -> int:
    return args._layer_params()


def _stage_params(args: ModelArgs, layers: int, *, first: bool, last: bool, pp: int = 1) -> int:
    """Parameters one rank holds. A tied matrix is one tensor only without pipeline parallelism:
    under it the first and last stage each hold a copy (herd.parallel.tied), also on one rank (V)."""
    n = layers * _layer_params(args)
    if first:
        n += args.vocab_size * args.dim
    if last:
        n += args.dim + (0 if args.tie_embeddings and first and pp == 1 else args.vocab_size * args.dim)
    return n


@dataclass
class Memory:
    """Bytes on one GPU of one pipeline stage."""

    stage: int
    params: float  # fp32 shard + gathered compute-dtype weights
    grads: float
    optimizer: float
    activations: float
    logits: float
    total: float = 0.0

    def __post_init__(self) -> None:
        self.total = self.params + self.grads + self.optimizer + self.activations + self.logits


def _memory(args: ModelArgs, layout: Layout, ac: str) -> Memory:
    pp, tp, cp, e = layout.pp, layout.tp, layout.cp, layout.compute_bytes
    n_per_rank = stages_per_rank(layout.pp_schedule, layout.pp_stages_per_rank or None) if pp > 1 else 1
    n_stages = pp * n_per_rank
    ranges = layer_split(args.n_layers, n_stages)
    shard = layout.dp * cp  # FSDP shards over data and context ranks
    tokens_mb = layout.micro_batch * layout.seq_len // cp
    per_tok = activation_bytes_per_token(args, compute_bytes=e, tp=tp, cp=cp, ac=ac)
    worst = None
    for rank in range(pp):
        ids = stage_ids(rank, pp, layout.pp_schedule, n_per_rank) if pp > 1 else [0]
        layers = sum(len(ranges[s]) for s in ids)
        first, last = 0 in ids, n_stages - 1 in ids
        p_local = _stage_params(args, layers, first=first, last=last, pp=pp) / tp
        block = _layer_params(args) / tp
        gathered = e * (p_local if pp > 1 else 2 * block)  # whole stage kept vs current + prefetched block
        grads = 4 * p_local / shard + (4 * p_local if pp > 1 else (e + 4) * block)
        acts = per_tok * tokens_mb * layers * _in_flight(layout, n_per_rank, rank)
        if ac == "full":  # one block's activations are rebuilt at a time during backward
            acts += activation_bytes_per_token(args, compute_bytes=e, tp=tp, cp=cp) * tokens_mb
        # Last stage: logits in the compute dtype, their fp32 copy, and log-softmax for the loss;
        # a chunked head holds one chunk's at a time (forward, and its recompute in backward).
        logits = math.ceil(tokens_mb / layout.loss_chunks) * args.vocab_size / tp * (e + 8) if last else 0.0
        m = Memory(stage=rank, params=4 * p_local / shard + gathered, grads=grads,
                   optimizer=8 * p_local / shard, activations=acts, logits=logits)
        if worst is None or m.total > worst.total:
            worst = m
    return worst


# ---- communication ---------------------------------------------------------------------------


def _padded(shape: tuple[int, ...], n: int) -> int:
    rest = math.prod(shape[1:])
    return math.ceil(shape[0] / n) * n * rest


def _unit_shapes(args: ModelArgs, tp: int, layers: int, *, first: bool, last: bool,
                 pp: int = 1) -> list[list[tuple[int, ...]]]:
    """Local (TP-sharded) parameter shapes of each FSDP unit, in `apply_fsdp`'s grouping."""
    d, qd, kv, ffn, V = args.dim, args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim, \
        args.ffn_hidden_dim, args.vocab_size
    block = [(qd // tp, d), (kv // tp, d), (kv // tp, d), (d, qd // tp), (ffn // tp, d), (d, ffn // tp),
             (ffn // tp, d), (d,), (d,)]
    units = [list(block) for _ in range(layers)]
    tied = args.tie_embeddings and first and last and pp == 1  # one tensor in one module
    if first and not tied:
        units.append([(V // tp, d)])
    root = []
    if last:
        root += [(d,), (V // tp, d)]
    units.append(root)  # the root unit exists on every stage, possibly empty
    return units


@dataclass
class CommInputs:
    """What decides one rank's traffic in a step (see `step_comm_bytes`)."""

    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1
    cp: int = 1
    pp: int = 1
    batch: int = 1  # rows per data-parallel rank
    seq_len: int = 1
    stage_ids: list[int] = field(default_factory=lambda: [0])
    n_stages: int = 1
    microbatches: int = 1
    ac: str = "none"
    loss_parallel: bool = True
    loss_chunks: int = 1  # train.loss_chunks: the head in slices (always loss parallel under TP)
    param_bytes: int = 4  # dtype FSDP gathers in
    reduce_bytes: int = 4  # dtype gradients are reduced in
    act_bytes: int = 4


def step_comm_bytes(args: ModelArgs, c: CommInputs) -> dict[str, int]:
    """Algorithm bytes one rank moves in one forward/backward, by the parallelism that moves them.

    fsdp: per unit, an all-gather before forward, again before backward when resharded
    after forward (never for the root), and a reduce-scatter of gradients (plus an
    all-reduce of the shard across replicas for HSDP). tp: per layer an all-gather and a
    reduce-scatter of (tokens x dim) around attention and FFN, mirrored in backward; the
    embedding and head add one each way; loss parallel all-reduces three numbers per token (twice
    with a chunked head, whose backward recomputes them; chunking changes no FSDP traffic).
    cp: per layer an all-gather of K and V over the sequence and a reduce-scatter of their
    gradients, nothing else. pp: activations forward and their gradients backward across each
    stage boundary that crosses ranks, and for a tied embedding/output matrix an all-reduce of
    the gradient shard between the first and the last stage's ranks (none when one rank holds
    both). Full or selective AC repeat the forward gathers.
    """
    out = {"fsdp": 0, "tp": 0, "cp": 0, "pp": 0, "loss": 0}
    d = args.dim
    S_local = c.seq_len // c.cp
    tokens = c.batch * S_local  # per data-parallel rank and step
    ranges = layer_split(args.n_layers, c.n_stages)
    first, last = 0 in c.stage_ids, c.n_stages - 1 in c.stage_ids
    layers = sum(len(ranges[s]) for s in c.stage_ids)
    fsdp_n = c.dp_shard * c.cp
    if fsdp_n * c.dp_replicate > 1:
        reshard = c.pp == 1
        units = _unit_shapes(args, c.tp, layers, first=first, last=last, pp=c.pp)
        for i, unit in enumerate(units):
            numel = sum(_padded(s, fsdp_n) for s in unit)
            is_root = i == len(units) - 1
            gathers = 1 + (1 if reshard and not is_root else 0)
            out["fsdp"] += numel * c.param_bytes * gathers
            if fsdp_n > 1:
                out["fsdp"] += numel * c.reduce_bytes
            if c.dp_replicate > 1:
                out["fsdp"] += numel // fsdp_n * c.reduce_bytes
    recompute = c.ac in ("full", "selective")
    if c.tp > 1:
        act = tokens * d * c.act_bytes
        # Per layer: 2 gathers + 2 reduce-scatters forward, the same backward. Full AC redoes
        # the forward up to the last tensor backward needs (the FFN's input gather), so three
        # of the four; selective keeps reduce-scatter outputs and redoes the two gathers.
        per_layer = 8 + (3 if c.ac == "full" else 2 if c.ac == "selective" else 0)
        out["tp"] += layers * per_layer * act
        if first:
            out["tp"] += 2 * act  # embedding: reduce-scatter forward, all-gather backward
        if last:
            out["tp"] += 2 * act  # head input: all-gather forward, reduce-scatter backward
            if c.loss_parallel or c.loss_chunks > 1:
                # Max, sum of exponentials, target logit (fp32); a chunked head recomputes each
                # chunk's logits in backward, and with them these reductions.
                out["tp"] += 3 * tokens * 4 * (2 if c.loss_chunks > 1 else 1)
            else:
                out["tp"] += tokens * args.vocab_size * c.act_bytes  # gathering the logits
        if fsdp_n * c.dp_replicate > 1:
            # Norm weights are replicated over TP; FSDP needs their partial gradients summed
            # over TP before its own reduce-scatter (without FSDP this happens at the optimizer).
            norms = 2 * layers + (1 if last else 0)
            out["tp"] += norms * d * c.param_bytes
    if c.cp > 1:
        kv = c.batch * 2 * (args.n_kv_heads // c.tp) * c.seq_len * args.head_dim * c.act_bytes
        out["cp"] += layers * kv * (2 + (1 if recompute else 0))
    if c.pp > 1:
        msg = c.batch * S_local // c.tp * d * c.act_bytes  # whole step, all microbatches
        for s in c.stage_ids:
            for nb in (s - 1, s + 1):
                if 0 <= nb < c.n_stages and nb not in c.stage_ids:
                    out["pp"] += 2 * msg  # forward one way, gradient the other
        if args.tie_embeddings and first != last:
            # The tied gradient's shard, laid out as the weight: vocabulary over TP, then FSDP.
            out["pp"] += _padded((args.vocab_size // c.tp, d), fsdp_n) // fsdp_n * c.reduce_bytes
    if c.dp_replicate * c.dp_shard > 1:
        out["loss"] += 8  # global target count
    if c.dp_replicate * c.dp_shard * c.cp > 1:
        out["loss"] += 4
    if c.pp > 1:
        out["loss"] += 4
    return out


# ---- the plan --------------------------------------------------------------------------------


@dataclass
class Plan:
    model: str
    layout: Layout
    dp: int
    sequences_per_dp: int
    microbatches: int
    num_params: int
    flops_per_token: float
    step_flops: float  # model FLOPs of one optimizer step, all GPUs
    flops_per_gpu: float
    hardware_flops_per_gpu: float  # including recomputation under AC
    memory_no_ac: Memory
    memory_full_ac: Memory
    memory_selective_ac: Memory
    memory: Memory  # under layout.ac
    comm: dict[str, int]  # bytes per GPU per step (first pipeline rank)

    def step_seconds(self, *, mfu: float, peak_flops: float = H100_BF16_PEAK) -> float:
        return self.flops_per_gpu / (mfu * peak_flops)

    def to_dict(self) -> dict:
        return asdict(self)


def plan(args: ModelArgs, layout: Layout, *, model: str = "") -> Plan:
    """Memory per GPU, FLOPs and communication of training `args` under `layout`."""
    check_tp(args, layout.tp)
    if layout.pp_schedule not in PP_SCHEDULES:
        raise ValueError(f"unknown pipeline schedule {layout.pp_schedule!r}; use one of {', '.join(PP_SCHEDULES)}")
    n_per_rank = stages_per_rank(layout.pp_schedule, layout.pp_stages_per_rank or None) if layout.pp > 1 else 1
    check_pp(args, layout.pp, n_per_rank)  # the runtime's own checks (tied embeddings are fine)
    if layout.pp > 1:
        check_schedule_ac(layout.pp_schedule, layout.ac)
    fpt = args.flops_per_token(layout.seq_len)
    step = fpt * layout.global_batch_tokens
    recompute = {"none": 0.0, "selective": 0.0, "full": 1.0}[layout.ac]
    # Full AC reruns every block's forward: a third of the non-head training FLOPs again.
    head = 6 * args.vocab_size * args.dim
    hw = step + recompute * (fpt - head) / 3 * layout.global_batch_tokens
    if layout.loss_chunks > 1:  # each chunk's head forward runs again in backward
        hw += head / 3 * layout.global_batch_tokens
    ids = stage_ids(0, layout.pp, layout.pp_schedule, n_per_rank) if layout.pp > 1 else [0]
    comm = step_comm_bytes(args, CommInputs(
        dp_shard=layout.dp, tp=layout.tp, cp=layout.cp, pp=layout.pp,
        batch=layout.sequences // layout.dp, seq_len=layout.seq_len, stage_ids=ids,
        n_stages=layout.pp * n_per_rank, microbatches=layout.microbatches, ac=layout.ac,
        loss_chunks=layout.loss_chunks, param_bytes=layout.compute_bytes, reduce_bytes=4,
        act_bytes=layout.compute_bytes))
    return Plan(
        model=model, layout=layout, dp=layout.dp, sequences_per_dp=layout.sequences // layout.dp,
        microbatches=layout.microbatches, num_params=args.num_params(), flops_per_token=fpt, step_flops=step,
        flops_per_gpu=step / layout.gpus, hardware_flops_per_gpu=hw / layout.gpus,
        memory_no_ac=_memory(args, layout, "none"), memory_full_ac=_memory(args, layout, "full"),
        memory_selective_ac=_memory(args, layout, "selective"), memory=_memory(args, layout, layout.ac), comm=comm,
    )


# ---- presentation ----------------------------------------------------------------------------


def parse_count(text: str) -> int:
    """'16M' -> 16 * 2**20. K, M, G are powers of 1024: the paper's 16M tokens are 2,048 x 8,192."""
    t = text.strip().upper().replace(",", "").replace("_", "")
    mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(t[-1:], 1)
    number = t[:-1] if mult > 1 else t
    try:
        value = float(number) * mult
    except ValueError:
        raise ValueError(f"cannot read {text!r} as a count; use e.g. 16M, 8192 or 4.5K") from None
    if value != int(value) or value <= 0:
        raise ValueError(f"{text!r} is not a positive whole number of tokens")
    return int(value)


def format_plan(p: Plan, *, mfu: float | None = None, peak_flops: float = H100_BF16_PEAK,
                gpu_memory_gib: float | None = None) -> str:
    """The plan as text; with `mfu`, also the step time at that assumed MFU (`herd plan --mfu`,
    beside the estimate of `herd.parallel.mfu`)."""
    L = p.layout

    def gib(x: float) -> str:
        return f"{x / GiB:,.1f}"

    mems = (("none", p.memory_no_ac), ("selective", p.memory_selective_ac), ("full", p.memory_full_ac))
    lines = [
        f"{'model':>16}  {p.model or '-'} ({p.num_params:,} parameters)",
        f"{'layout':>16}  {L.gpus:,} GPUs = tp {L.tp} x cp {L.cp} x pp {L.pp} x dp {p.dp}",
        f"{'batch':>16}  {L.global_batch_tokens:,} tokens = {L.sequences:,} x {L.seq_len:,}; {p.sequences_per_dp} "
        f"per dp rank in {p.microbatches} microbatch(es) of {L.micro_batch}{' (' + L.pp_schedule + ')' if L.pp > 1 else ''}",
        f"{'memory / GPU':>16}  GiB on the busiest pipeline rank ({p.memory_no_ac.stage}), by activation checkpointing:",
        f"{'':>16}  {'':<12}" + "".join(f"{m:>11}" for m, _ in mems),
    ]
    for field_name in ("params", "grads", "optimizer", "activations", "logits", "total"):
        label = {"params": "parameters", "grads": "gradients"}.get(field_name, field_name)
        lines.append(f"{'':>16}  {label:<12}" + "".join(f"{gib(getattr(m, field_name)):>11}" for _, m in mems))
    if gpu_memory_gib is not None:
        fits = [m for m, mem in mems if mem.total / GiB <= gpu_memory_gib]
        lines.append(f"{'':>16}  fits in {gpu_memory_gib:g} GiB with AC: {', '.join(fits) or 'none of these'} "
                     "(allocator, workspaces and NCCL buffers not counted)")
    recomputed = ([f"{L.ac} AC"] if L.ac == "full" else []) + (["the chunked head"] if L.loss_chunks > 1 else [])
    lines += [
        f"{'step FLOPs':>16}  {p.step_flops:.3e} ({p.flops_per_token / 1e9:,.1f} GFLOP/token), "
        f"{p.flops_per_gpu / 1e12:,.0f} TFLOP per GPU"
        + (f" ({p.hardware_flops_per_gpu / 1e12:,.0f} executed with {' and '.join(recomputed)})" if recomputed else ""),
    ]
    if mfu is not None:
        seconds = p.step_seconds(mfu=mfu, peak_flops=peak_flops)
        lines.append(f"{'at ' + format(mfu, '.0%') + ' MFU':>16}  {seconds:,.2f} s/step, "
                     f"{L.global_batch_tokens / seconds / L.gpus:,.0f} tokens/s/GPU ({mfu * peak_flops / 1e12:,.0f} "
                     f"TFLOP/s of {peak_flops / 1e12:,.0f} peak; the MFU given with --mfu)")
    lines += [
        f"{'traffic / GPU':>16}  per step, first pipeline rank: "
        + ", ".join(f"{k} {v / GiB:,.2f} GiB" for k, v in p.comm.items() if k != "loss"),
    ]
    return "\n".join(lines)
