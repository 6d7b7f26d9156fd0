"""Estimate the MFU a training layout reaches, from a stated model of one step.

    step = (compute + memory-bound + exposed TP + exposed CP) x (1 + bubble)
           + exposed PP + exposed FSDP
    MFU  = model FLOPs per GPU / (step x peak)

* compute: the FLOPs the busiest pipeline rank executes, GEMMs at `gemm_efficiency` x peak and
  attention at `attention_efficiency` x peak. Attention executes fewer FLOPs than the model
  count (`ModelArgs.flops_per_token` does not discount the causal mask, like PaLM's MFU): a
  flash-style kernel skips the masked half and recomputes the scores in backward, 7 S D per
  head and token against the 12 S D counted.
* memory-bound kernels (norms, RoPE, SwiGLU, residual adds, the loss): each byte autograd saves
  (`activation_bytes_per_token`, checked against herd's eager block, and the last stage's logits)
  is taken to be written in forward, read in backward and its gradient written, 3 passes over
  HBM (4 when AC recomputes the forward). A proxy, not a kernel count.
* bubble: the schedule's idle time relative to the time of its stages, (p - 1) / m for GPipe and
  1F1B and (p - 1) / (v m) for the interleaved schedules (the paper's ratio, section 3.3.2), with
  m the microbatches per data-parallel rank (its sequences / micro_batch) and v the stages per
  rank. The zero-bubble schedules are given the interleaved bubble: an upper bound, their split
  weight gradients shrink it. Exposed TP and CP traffic sits inside each stage's time, so the
  bubble stretches it too.
* communication: `step_comm_bytes` of the busiest rank, each kind on the link its group spans
  with ranks placed in the paper's order [TP, CP, PP, DP] (innermost fastest): NVLink inside a
  node, the per-GPU network outside, both at `link_efficiency` of their nominal bandwidth,
  collectives as rings ((n - 1) / n of the algorithm bytes cross each link). TP is exposed (herd
  and the paper do not overlap it) unless `tp_overlap` says otherwise; CP's K/V all-gather is
  exposed (attention waits for it); PP is asynchronous point-to-point, so only the fill and
  drain, 2 (p - 1) microbatch messages, are exposed; FSDP prefetches unit by unit, so one unit's
  traffic is exposed (the first gather and the last reduce-scatter have nothing to hide behind),
  plus whatever of it exceeds the compute it hides behind.

What the model ignores: the optimizer step, kernel launch gaps, stragglers, compute slowed by
the collectives it overlaps, the load imbalance of document masks, network congestion, and
latency (every transfer is taken at bandwidth). Each would lower the real MFU, so read the
estimate as what the layout reaches at best under these assumptions. For the paper's Table 4
it is 7-9 points above what Meta measured (`herd plan --paper`), and only the low ends of the
cited efficiency ranges keep it within 10: at 75% GEMM efficiency the 8K rows come out 10-12
points above, with half the TP traffic hidden 11-13. For smaller models the
ignored overheads weigh more: torchtitan logs 34% for Llama 3 8B under FSDP on 8 H100s, where
this model says 60%.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from herd.model.args import ModelArgs
from herd.parallel.pipeline import layer_split, stage_ids, stages_per_rank
from herd.parallel.plan import CommInputs, Layout, activation_bytes_per_token, parse_count, step_comm_bytes
from herd.parallel.tensor import check_tp

PLACEMENT = ("tp", "cp", "pp", "dp")  # innermost first: the paper's order, and herd's mesh order
_INTERLEAVED = ("Interleaved1F1B", "InterleavedZeroBubble", "ZBVZeroBubble")


@dataclass(frozen=True)
class Assumptions:
    """What a step is modelled on; the defaults are an H100 SXM cluster like the paper's
    (8 GPUs per NVLink node, a 400 Gb/s RoCE NIC per GPU). One set for every layout.

    gemm_efficiency 0.70: cuBLAS bf16 GEMMs on an H100 SXM reach about 70-80% of the 989 TFLOP/s
    dense peak when large; the low end, because the TP-sharded K/V projections are thin
    (N = 128 for 405B under TP 8) and sustained clocks sit under the 700 W cap.
    attention_efficiency 0.30: FlashAttention-2 reaches "only 35% utilization on the H100" (the
    FlashAttention-3 paper; about 370 TFLOP/s forward at head dimension 128 and long sequences,
    unmasked); causal masking and the backward pass, 5/7 of the executed FLOPs, run lower.
    link_efficiency 0.8: NCCL's bus bandwidth for large all-gathers and reduce-scatters on
    NVLink 4 is about 360 of the nominal 450 GB/s (nccl-tests); 400G NICs come closer to their
    rate, so one figure for both is conservative for the network.
    """

    peak_tflops: float = 989.0  # dense bf16 of an H100 SXM
    gemm_efficiency: float = 0.70
    attention_efficiency: float = 0.30
    hbm_tbs: float = 3.35  # TB/s of HBM3 on an H100 SXM
    nvlink_gbs: float = 450.0  # GB/s per GPU, one direction (NVLink 4: 18 links x 25 GB/s)
    net_gbs: float = 50.0  # GB/s per GPU, one direction (400 Gb/s RoCE or InfiniBand)
    link_efficiency: float = 0.8
    gpus_per_node: int = 8
    tp_overlap: float = 0.0  # fraction of TP traffic hidden behind compute

    def __post_init__(self) -> None:
        for name in ("peak_tflops", "hbm_tbs", "nvlink_gbs", "net_gbs"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("gemm_efficiency", "attention_efficiency", "link_efficiency"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name} is a fraction of the peak, in (0, 1], got {getattr(self, name)}")
        if not 0 <= self.tp_overlap <= 1:
            raise ValueError(f"tp_overlap is the hidden fraction of TP traffic, in [0, 1], got {self.tp_overlap}")
        if self.gpus_per_node < 1:
            raise ValueError(f"gpus_per_node must be >= 1, got {self.gpus_per_node}")


def bubble_ratio(schedule: str, pp: int, microbatches: int, stages_per_rank: int = 1) -> float:
    """Idle time of a pipeline step relative to the time of its stages: (p - 1) / (v m).

    As a share of the whole step this is (p - 1) / (v m + p - 1); v is 1 for GPipe and 1F1B.
    """
    if pp < 1 or microbatches < 1 or stages_per_rank < 1:
        raise ValueError(f"pp, microbatches and stages per rank must be >= 1, got {pp}, {microbatches}, "
                         f"{stages_per_rank}")
    v = stages_per_rank if schedule in _INTERLEAVED else 1
    return (pp - 1) / (v * microbatches)


def ring_seconds(nbytes: float, n: int, bytes_per_s: float) -> float:
    """A ring all-gather or reduce-scatter of `nbytes` algorithm bytes over n ranks: each rank
    sends and receives (n - 1) / n of the buffer."""
    return 0.0 if n <= 1 else nbytes * (n - 1) / n / bytes_per_s


def link_of(layout: Layout, kind: str, gpus_per_node: int) -> str:
    """'nvlink' when a `kind` group ("tp", "cp", "pp", "dp", or "fsdp": dp x cp) fits in a node.

    With ranks placed [TP, CP, PP, DP], innermost first, a group spans the product of its own
    degree and every inner one; FSDP shards over dp and cp, so it spans the job unless dp = 1.
    """
    if kind == "fsdp":
        kind = "dp" if layout.dp > 1 else "cp"
    if kind not in PLACEMENT:
        raise ValueError(f"unknown parallelism {kind!r}; use one of {', '.join(PLACEMENT)} or fsdp")
    degrees = {"tp": layout.tp, "cp": layout.cp, "pp": layout.pp, "dp": layout.dp}
    span = 1
    for k in PLACEMENT[:PLACEMENT.index(kind) + 1]:
        span *= degrees[k]
    return "nvlink" if span <= gpus_per_node else "network"


@dataclass
class MfuEstimate:
    """One step of the busiest pipeline rank, in seconds, and what it makes of the peak.

    step_s = compute_s + memory_s + exposed_s (tp, cp, pp, fsdp) + bubble_s.
    """

    assumptions: Assumptions
    schedule: str
    microbatches: int
    stages_per_rank: int
    busiest_rank: int
    layers: int  # on the busiest rank
    model_flops_per_gpu: float  # herd's flops_per_token convention: the MFU numerator
    gemm_flops: float  # executed by one GPU of the busiest rank
    attention_flops: float
    compute_s: float
    memory_s: float
    bubble_s: float
    exposed_s: dict[str, float]  # tp, cp, pp, fsdp
    comm_s: dict[str, float]  # the same traffic before any overlap
    links: dict[str, str]  # tp, cp, pp, fsdp -> nvlink | network
    step_s: float
    tokens_per_gpu_s: float
    mfu: float
    tflops_per_gpu: float

    def to_dict(self) -> dict:
        return asdict(self)


def executed_flops(args: ModelArgs, layout: Layout, layers: int, *, last: bool) -> tuple[float, float]:
    """GEMM and attention FLOPs one GPU of a pipeline rank with `layers` layers runs in a step."""
    tp, cp = layout.tp, layout.cp
    tokens = layout.sequences // layout.dp * layout.seq_len // cp  # per GPU and step
    layer_matmul = args._layer_params() - 2 * args.dim  # the norms are not matmuls
    head = args.vocab_size * args.dim if last else 0
    gemm = 6 * tokens * (layers * layer_matmul + head) / tp
    if layout.ac == "full":  # every block's forward runs again
        gemm += 2 * tokens * layers * layer_matmul / tp
    if layout.loss_chunks > 1:  # the chunked head's forward runs again in backward
        gemm += 2 * tokens * head / tp
    # Causal flash attention: forward 2 S D and backward 5 S D (scores recomputed) per head and
    # token, the halves of an unmasked kernel's 4 and 10; full AC runs the forward again.
    per_head = (7 + (2 if layout.ac == "full" else 0)) * layout.seq_len * args.head_dim
    attention = tokens * layers * (args.n_heads // tp) * per_head
    return gemm, attention


def estimate_mfu(args: ModelArgs, layout: Layout, assumptions: Assumptions | None = None) -> MfuEstimate:
    """The MFU `layout` reaches training `args` under `assumptions` (see the module docstring)."""
    a = assumptions or Assumptions()
    check_tp(args, layout.tp)
    peak = a.peak_tflops * 1e12
    pp, m = layout.pp, layout.microbatches
    v = stages_per_rank(layout.pp_schedule, layout.pp_stages_per_rank or None) if pp > 1 else 1
    n_stages = pp * v
    ranges = layer_split(args.n_layers, n_stages)
    links = {k: link_of(layout, k, a.gpus_per_node) for k in ("tp", "cp", "pp", "fsdp")}
    bw = {"nvlink": a.nvlink_gbs * 1e9 * a.link_efficiency, "network": a.net_gbs * 1e9 * a.link_efficiency}
    bubble = bubble_ratio(layout.pp_schedule, pp, m, v) if pp > 1 else 0.0
    tokens = layout.sequences // layout.dp * layout.seq_len // layout.cp  # per GPU and step
    passes = 3 + (1 if layout.ac != "none" else 0)
    per_token = activation_bytes_per_token(args, compute_bytes=layout.compute_bytes, tp=layout.tp, cp=layout.cp)
    busiest = None
    for rank in range(pp):
        ids = stage_ids(rank, pp, layout.pp_schedule, v) if pp > 1 else [0]
        layers = sum(len(ranges[s]) for s in ids)
        first, last = 0 in ids, n_stages - 1 in ids
        gemm, attention = executed_flops(args, layout, layers, last=last)
        compute = gemm / (peak * a.gemm_efficiency) + attention / (peak * a.attention_efficiency)
        logits = args.vocab_size / layout.tp * (layout.compute_bytes + 8) if last else 0  # as in plan's memory
        memory = passes * (per_token * layers + logits) * tokens / (a.hbm_tbs * 1e12)
        comm = step_comm_bytes(args, CommInputs(
            dp_shard=layout.dp, tp=layout.tp, cp=layout.cp, pp=pp, batch=layout.sequences // layout.dp,
            seq_len=layout.seq_len, stage_ids=ids, n_stages=n_stages, microbatches=m, ac=layout.ac,
            loss_chunks=layout.loss_chunks, param_bytes=layout.compute_bytes, reduce_bytes=4,
            act_bytes=layout.compute_bytes))
        comm_s = {
            "tp": ring_seconds(comm["tp"], layout.tp, bw[links["tp"]]),
            "cp": ring_seconds(comm["cp"], layout.cp, bw[links["cp"]]),
            "pp": comm["pp"] / bw[links["pp"]],  # point-to-point: every byte crosses the link
            "fsdp": ring_seconds(comm["fsdp"], layout.dp * layout.cp, bw[links["fsdp"]]),
        }
        # Messages this rank sends or receives in a step: 2 per cross-rank boundary per microbatch.
        messages = sum(2 for s in ids for nb in (s - 1, s + 1) if 0 <= nb < n_stages and nb not in ids) * m
        units = layers + (1 if first else 0) + 1  # FSDP units: blocks, the embedding, the root
        busy = compute + memory
        exposed = {
            "tp": comm_s["tp"] * (1 - a.tp_overlap),
            "cp": comm_s["cp"],
            "pp": comm_s["pp"] / messages * 2 * (pp - 1) + max(0.0, comm_s["pp"] - busy) if messages else 0.0,
            "fsdp": comm_s["fsdp"] / units + max(0.0, comm_s["fsdp"] - busy),
        }
        stage = busy + exposed["tp"] + exposed["cp"]
        step = stage * (1 + bubble) + exposed["pp"] + exposed["fsdp"]
        if busiest is None or step > busiest["step_s"]:
            busiest = dict(busiest_rank=rank, layers=layers, gemm_flops=gemm, attention_flops=attention,
                           compute_s=compute, memory_s=memory, bubble_s=stage * bubble, exposed_s=exposed,
                           comm_s=comm_s, step_s=step)
    model = args.flops_per_token(layout.seq_len) * layout.global_batch_tokens / layout.gpus
    mfu = model / (busiest["step_s"] * peak)
    return MfuEstimate(assumptions=a, schedule=layout.pp_schedule if pp > 1 else "-", microbatches=m,
                       stages_per_rank=v, model_flops_per_gpu=model, links=links, mfu=mfu,
                       tokens_per_gpu_s=layout.global_batch_tokens / layout.gpus / busiest["step_s"],
                       tflops_per_gpu=mfu * a.peak_tflops, **busiest)


# ---- the paper's Table 4 -------------------------------------------------------------------------


@dataclass(frozen=True)
class PaperRow:
    """A row of the Llama 3 paper's Table 4 (405B, BF16, H100 80 GB, 16M tokens per step)."""

    gpus: int
    tp: int
    cp: int
    pp: int
    seq_len: int
    tflops: float
    mfu: float


# The paper prints DP 4 for the 128K row, but 16,384 / (8 x 16 x 16) = 8, and only DP 8 gives its
# 16 sequences per DP rank and 16M tokens; DP is what the GPUs leave here.
TABLE4 = (
    PaperRow(gpus=8192, tp=8, cp=1, pp=16, seq_len=8192, tflops=430, mfu=0.43),
    PaperRow(gpus=16384, tp=8, cp=1, pp=16, seq_len=8192, tflops=400, mfu=0.41),
    PaperRow(gpus=16384, tp=8, cp=16, pp=16, seq_len=131072, tflops=380, mfu=0.38),
)
PAPER_MODEL = "llama3.1-405b"
# The paper runs an interleaved schedule but does not print its stages per rank; 7 is the most
# herd's layer split allows for 126 layers on 16 ranks (the paper's own split, a layer moved off
# each end, is not herd's). One microbatch is one sequence, so m = sequences per DP rank.
PAPER_SCHEDULE, PAPER_STAGES_PER_RANK = "Interleaved1F1B", 7


def paper_layout(row: PaperRow) -> Layout:
    return Layout(gpus=row.gpus, tp=row.tp, cp=row.cp, pp=row.pp, seq_len=row.seq_len,
                  global_batch_tokens=parse_count("16M"), micro_batch=1, pp_schedule=PAPER_SCHEDULE,
                  pp_stages_per_rank=PAPER_STAGES_PER_RANK)


def paper_comparison(assumptions: Assumptions | None = None) -> list[tuple[PaperRow, Layout, MfuEstimate]]:
    """Each Table 4 layout with its estimate under one set of assumptions."""
    args = ModelArgs.from_name(PAPER_MODEL)
    out = []
    for row in TABLE4:
        layout = paper_layout(row)
        out.append((row, layout, estimate_mfu(args, layout, assumptions)))
    return out


# ---- presentation ----------------------------------------------------------------------------


def format_assumptions(a: Assumptions) -> list[str]:
    return [
        f"{'assumptions':>16}  peak {a.peak_tflops:,.0f} TFLOP/s; GEMMs at {a.gemm_efficiency:.0%} of it, attention "
        f"at {a.attention_efficiency:.0%} (causal, flash-style); HBM {a.hbm_tbs:g} TB/s",
        f"{'':>16}  NVLink {a.nvlink_gbs:g} GB/s inside {a.gpus_per_node}-GPU nodes, network {a.net_gbs:g} GB/s per "
        f"GPU, both at {a.link_efficiency:.0%}; ranks placed [TP, CP, PP, DP] innermost first",
        f"{'':>16}  overlap: TP {a.tp_overlap:.0%} hidden, CP exposed, PP async (fill and drain exposed), "
        "FSDP prefetched (one unit exposed)",
    ]


def format_estimate(e: MfuEstimate) -> str:
    piped = e.schedule != "-"
    where = (f"set by pipeline rank {e.busiest_rank} ({e.layers} layers; {e.schedule}, {e.microbatches} microbatches "
             f"x {e.stages_per_rank} stage(s) per rank)" if piped else f"{e.layers} layers on every GPU, no pipeline")
    parts = [("compute", e.compute_s), ("memory-bound", e.memory_s)] + ([("bubble", e.bubble_s)] if piped else [])
    parts += [(f"{k} ({e.links[k]})", e.exposed_s[k]) for k in ("tp", "cp", "pp", "fsdp") if e.comm_s[k] > 0]
    traffic = [f"{k} {e.comm_s[k]:,.2f} s" for k in ("tp", "cp", "pp", "fsdp") if e.comm_s[k] > 0]
    lines = [
        f"{'estimated MFU':>16}  {e.mfu:.1%} = {e.tflops_per_gpu:,.0f} TFLOP/s per GPU; {e.step_s:,.2f} s/step, "
        f"{e.tokens_per_gpu_s:,.0f} tokens/s/GPU",
        f"{'':>16}  {where}",
        f"{'step breakdown':>16}  " + ", ".join(f"{name} {s:,.2f} s" for name, s in parts),
        f"{'':>16}  (the traffic left exposed, out of {', '.join(traffic)} in all)" if traffic
        else f"{'':>16}  (no traffic: one GPU)",
    ]
    return "\n".join(lines + format_assumptions(e.assumptions))


def format_paper_table(rows: list[tuple[PaperRow, Layout, MfuEstimate]]) -> str:
    head = (f"{'GPUs':>7} {'TP':>3} {'CP':>3} {'PP':>3} {'DP':>4} {'seq':>8} {'batch/DP':>8} {'m':>3}"
            f" | {'estimate':>8} {'TFLOP/s':>7} | {'paper':>5} {'TFLOP/s':>7} | {'diff':>5}")
    lines = [f"Llama 3 paper, Table 4: {PAPER_MODEL}, 16M tokens per step, {PAPER_SCHEDULE} with "
             f"{PAPER_STAGES_PER_RANK} stages per rank", head, "-" * len(head)]
    for row, layout, e in rows:
        lines.append(
            f"{row.gpus:>7,} {row.tp:>3} {row.cp:>3} {row.pp:>3} {layout.dp:>4} {row.seq_len:>8,} "
            f"{layout.sequences // layout.dp:>8} {e.microbatches:>3} | {e.mfu:>8.1%} {e.tflops_per_gpu:>7,.0f} | "
            f"{row.mfu:>5.0%} {row.tflops:>7,.0f} | {100 * (e.mfu - row.mfu):>+5.1f}")
    lines.append("")
    for row, layout, e in rows:
        parts = [("compute", e.compute_s), ("memory", e.memory_s), ("bubble", e.bubble_s)]
        parts += [(k, e.exposed_s[k]) for k in ("tp", "cp", "pp", "fsdp") if e.comm_s[k] > 0]
        lines.append(f"{row.gpus:>7,} {row.seq_len:>8,}: {e.step_s:,.2f} s/step = "
                     + " + ".join(f"{name} {s:,.2f}" for name, s in parts))
    lines.append("")
    return "\n".join(lines + format_assumptions(rows[0][2].assumptions))
