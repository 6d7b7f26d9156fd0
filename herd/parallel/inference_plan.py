"""Size an inference layout: weights and KV cache per GPU for tensor x pipeline parallelism.

The paper serves 405B with tensor parallelism inside a node and pipeline parallelism across
nodes, in BF16 on 16 GPUs or FP8 on one 8-GPU node (section 6). Per GPU, with `herd.parallel.
inference`'s layout (every matrix split over tp ranks, the vocabulary too; norms replicated;
pipeline stages of contiguous layers, `layer_split`):

* weights: the busiest stage's parameters / tp, at the bytes per parameter of the weight format;
* KV cache: 2 (K and V) x the stage's layers x n_kv_heads / tp x head_dim x bytes, per token of
  context, times context x batch. Each rank caches only its own KV heads, so tp may not exceed
  n_kv_heads (as `check_tp_inference` requires).
* logits: batch x vocabulary in fp32 on the last stage (every rank gathers all of them).

Trade-off: arithmetic on shapes, like the training plan. Activations of a decode step are
negligible; a long prefill's are not and are left out, as are allocator, CUDA graph and NCCL
workspaces (a few GiB): compare the total with the device's memory leaving that margin.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from herd.model.args import ModelArgs
from herd.parallel.pipeline import layer_split

GiB = 2**30

# Bytes per parameter of each weight format. fp8-ffn is the paper's rule (section 6.2): the FFN
# matrices of every layer but the first and the last in FP8, everything else in BF16.
WEIGHT_FORMATS = {"bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "fp8-ffn": None, "int8": 1.0, "int4": 0.5}
KV_FORMATS = {"bf16": 2, "fp16": 2, "fp8": 1, "fp32": 4}


@dataclass(frozen=True)
class InferenceLayout:
    tp: int = 1
    pp: int = 1
    context: int = 8192  # tokens of context per sequence the KV cache holds
    batch: int = 1  # sequences decoded together
    weights: str = "bf16"
    kv: str = "bf16"

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "context", "batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.weights not in WEIGHT_FORMATS:
            raise ValueError(f"unknown weight format {self.weights!r}; use one of {', '.join(WEIGHT_FORMATS)}")
        if self.kv not in KV_FORMATS:
            raise ValueError(f"unknown KV cache format {self.kv!r}; use one of {', '.join(KV_FORMATS)}")


@dataclass
class StageMemory:
    """Bytes on one GPU of one pipeline stage."""

    stage: int
    layers: int
    weights: float
    kv_per_token: int  # bytes per token of context, this GPU
    kv_cache: float
    logits: float
    total: float


@dataclass
class InferencePlan:
    model: str
    num_params: int
    layout: InferenceLayout
    gpus: int
    weight_bytes_total: float  # all GPUs together
    kv_per_token_total: int  # bytes per token of context, whole model (all GPUs)
    stages: list[StageMemory]

    @property
    def busiest(self) -> StageMemory:
        return max(self.stages, key=lambda s: s.total)

    def to_dict(self) -> dict:
        return {**asdict(self), "busiest_stage": self.busiest.stage}


def _layer_weight_bytes(args: ModelArgs, layer: int, weights: str) -> float:
    if weights != "fp8-ffn":
        return args._layer_params() * WEIGHT_FORMATS[weights]
    ffn = 3 * args.dim * args.ffn_hidden_dim
    inner = 0 < layer < args.n_layers - 1
    return (args._layer_params() - ffn) * 2 + ffn * (1 if inner else 2)


def _vocab_bytes(args: ModelArgs, weights: str) -> float:
    """One vocabulary matrix (embedding or head); fp8-ffn keeps them in bf16 like the paper."""
    return args.vocab_size * args.dim * (2 if weights == "fp8-ffn" else WEIGHT_FORMATS[weights])


def inference_plan(args: ModelArgs, layout: InferenceLayout, *, model: str = "") -> InferencePlan:
    tp, pp = layout.tp, layout.pp
    if args.n_kv_heads % tp:
        raise ValueError(f"tp {tp} does not divide n_kv_heads={args.n_kv_heads}: each GPU must hold whole KV heads; "
                         f"use tp in {[d for d in range(1, args.n_kv_heads + 1) if args.n_kv_heads % d == 0]}")
    kv_bytes = KV_FORMATS[layout.kv]
    stages = []
    for s, layers in enumerate(layer_split(args.n_layers, pp)):
        first, last = s == 0, s == pp - 1
        w = sum(_layer_weight_bytes(args, i, layout.weights) for i in layers)
        if first:
            w += _vocab_bytes(args, layout.weights)
        if last:
            w += args.dim * 2 + (0 if args.tie_embeddings and first else _vocab_bytes(args, layout.weights))
        per_tok = 2 * len(layers) * (args.n_kv_heads // tp) * args.head_dim * kv_bytes
        kv = per_tok * layout.context * layout.batch
        logits = layout.batch * args.vocab_size * 4 if last else 0
        stages.append(StageMemory(stage=s, layers=len(layers), weights=w / tp, kv_per_token=per_tok, kv_cache=kv,
                                  logits=logits, total=w / tp + kv + logits))
    total_w = sum(st.weights for st in stages) * tp
    return InferencePlan(model=model, num_params=args.num_params(), layout=layout, gpus=tp * pp,
                         weight_bytes_total=total_w,
                         kv_per_token_total=args.kv_cache_bytes_per_token(bytes_per_element=kv_bytes), stages=stages)


def format_inference_plan(p: InferencePlan, *, gpu_memory_gib: float | None = None) -> str:
    L, b = p.layout, p.busiest

    def gib(x: float) -> str:
        return f"{x / GiB:,.1f} GiB"

    lines = [
        f"{'model':>16}  {p.model or '-'} ({p.num_params:,} parameters)",
        f"{'layout':>16}  {p.gpus} GPUs = tp {L.tp} x pp {L.pp}; weights {L.weights}, KV cache {L.kv}",
        f"{'weights':>16}  {p.weight_bytes_total / 1e9:,.1f} GB in all; {gib(b.weights)} on each GPU of stage {b.stage} "
        f"({b.layers} layers)",
        f"{'KV cache':>16}  {p.kv_per_token_total / 1024:,.0f} KiB/token for the model; {b.kv_per_token / 1024:,.1f} KiB/token "
        f"per GPU; x {L.context:,} context x {L.batch} sequences = {gib(b.kv_cache)} per GPU",
        f"{'total / GPU':>16}  {gib(b.total)} (weights + KV cache + {gib(b.logits)} logits; activations, allocator "
        "and NCCL workspaces not counted)",
    ]
    if gpu_memory_gib is not None:
        fits = b.total / GiB <= gpu_memory_gib
        free = gpu_memory_gib * GiB - b.weights - b.logits
        more = int(free // (b.kv_per_token * L.context)) if free > 0 else 0
        lines.append(f"{'':>16}  {'fits' if fits else 'does NOT fit'} in {gpu_memory_gib:g} GiB; room for {more} "
                     f"sequence(s) of {L.context:,} tokens")
    return "\n".join(lines)
