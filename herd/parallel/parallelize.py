"""Apply every parallelism to a meta-device model, in one documented order, and run a step.

Order (each step relies on the ones before it):

0. float8: swap Linear -> Float8Linear on the whole model, so TP and FSDP see the final modules.
1. pipeline split: this rank's stages are cut out of the meta model (`pipeline.py`).
2. TP (+ sequence and loss parallel): needs plain Linears/norms to attach its styles to.
3. CP: replaces each `Attention.attend`; must precede compile so compile traces it.
4. AC: wraps whole blocks (the TP hooks and the CP attend inside are recomputed with them).
5. torch.compile per block: compiles the checkpointed block; FSDP's hooks stay outside it.
6. FSDP / HSDP: shards whatever the steps above produced, block by block, then the root.

Then `materialize` allocates the parameters on the target device and initialises them.

`ParallelModel.forward_backward` is the single place where the layouts differ at run time:
it shards the batch for CP, runs the pipeline schedule or a plain forward/backward, enables
loss parallel for TP, and normalises the loss by the global number of target tokens so
gradients equal the single-process gradients of the same global batch exactly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor.parallel import loss_parallel

from herd.model.llama import Transformer, positions_from_doc_ids
from herd.model.loss import chunked_cross_entropy_sum, cross_entropy_sum
from herd.parallel.checkpointing import AC_MODES, apply_ac
from herd.parallel.context import ContextParallel, apply_cp
from herd.parallel.dims import Meshes, ParallelDims
from herd.parallel.float8 import FLOAT8_RECIPES, apply_float8
from herd.parallel.fsdp import apply_fsdp, hidden_states
from herd.parallel.pipeline import (
    PP_SCHEDULES,
    PipelineStageModel,
    build_schedule,
    check_pp,
    check_schedule_ac,
    eval_schedule,
    split_model,
    stages_per_rank,
)
from herd.parallel.pipeline import stage_ids as stage_ids_of
from herd.parallel.tensor import apply_tp, check_tp
from herd.parallel.tied import TiedCopies, tie_group
from herd.targets import IGNORE_INDEX

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ParallelConfig:
    """The `[parallel]` section of a training config."""

    dp_replicate: int = 1
    dp_shard: int = -1  # -1: every rank the other dimensions leave
    cp: int = 1
    tp: int = 1
    pp: int = 1
    pp_schedule: str = "1F1B"
    pp_microbatches: int = 0  # 0: one per pipeline stage (pp * stages per rank)
    pp_stages_per_rank: int = 0  # 0: the schedule's default (1, or 2 for looped and V schedules)
    loss_parallel: bool = True  # with tp > 1: cross-entropy on vocabulary-sharded logits
    ac: str = "none"  # none | full | selective
    compile: bool = False  # torch.compile each block
    float8: str = "none"  # none | tensorwise | rowwise (torchao)
    float8_emulate: bool = False  # float8 numerics without FP8 hardware (CPU, tests)
    param_dtype: str = "float32"  # FSDP compute dtype; bfloat16 on GPU
    reduce_dtype: str = "float32"  # FSDP gradient reduction dtype (the paper reduces in fp32)
    # Initialise the whole model on every rank from the seed, then shard it: the same weights as
    # one process. False: initialise shards in place (any model size; values depend on the layout).
    full_init: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the key (also after `--parallel.key value` overrides)."""
        for name, allowed in (("pp_schedule", PP_SCHEDULES), ("ac", AC_MODES), ("float8", FLOAT8_RECIPES),
                              ("param_dtype", tuple(_DTYPES)), ("reduce_dtype", tuple(_DTYPES))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"parallel.{name} = {getattr(self, name)!r}; use one of {', '.join(allowed)}")
        if self.pp_microbatches < 0 or self.pp_stages_per_rank < 0:
            raise ValueError("parallel.pp_microbatches and parallel.pp_stages_per_rank must be >= 0 (0 = default)")
        if self.pp > 1:
            check_schedule_ac(self.pp_schedule, self.ac)

    def dims(self, world_size: int) -> ParallelDims:
        return ParallelDims(dp_replicate=self.dp_replicate, dp_shard=self.dp_shard, cp=self.cp, tp=self.tp,
                            pp=self.pp, world_size=world_size)


@dataclass
class StepLoss:
    """The loss of one step (or micro-batch): what every training loop reports.

    The one such type of the project (herd.train.core and post-training use it too); it lives
    here because herd.parallel sits below train in the dependency order.
    """

    loss: torch.Tensor  # mean loss over the step's targets (in a distributed step: the same value on every rank)
    num_targets: int = 0  # target tokens it covered (global batch)
    tokens: int = 0  # input tokens it read (throughput)
    metrics: dict[str, float] = field(default_factory=dict)  # extra numbers to log (accuracy, KL, ...)


class ParallelModel:
    """The local parts of a parallelised model and how to run a training step on them."""

    def __init__(self, parts: list[nn.Module], *, config: ParallelConfig, meshes: Meshes | None,
                 stage_ids: list[int], cp: ContextParallel | None,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 tie_group: dist.ProcessGroup | None = None):
        self.parts, self.config, self.meshes, self.stage_ids, self.cp = parts, config, meshes, stage_ids, cp
        self.loss_fn = loss_fn
        # Pipeline stages of a tied model: the embedding (first stage) and head (last stage) copies
        # of the one matrix that this rank holds, and the group joining the two stages' ranks
        # (None when one rank holds both, as in a V schedule).
        self.tie_group = tie_group
        self.tied: TiedCopies | None = None
        self.schedule = None
        self.microbatches = 1  # per step, under pipeline parallelism
        self._scale = 1.0  # loss multiplier of the current step, read by the pipeline's loss function
        self._loss_chunks = 1  # head slices of the current step, read by the pipeline's loss function
        self._merged: nn.Module | None = None

    # ---- set-up ----------------------------------------------------------------------------

    @property
    def dims(self) -> ParallelDims:
        return self.meshes.dims if self.meshes is not None else ParallelDims()

    @property
    def has_first_stage(self) -> bool:
        return 0 in self.stage_ids

    @property
    def has_last_stage(self) -> bool:
        return self.dims.pp * max(len(self.stage_ids), 1) - 1 in self.stage_ids

    @property
    def module(self) -> nn.Module:
        """One module holding every local parameter under the full model's names.

        For optimizers and checkpoints (`state_dict`, DCP's `get_optimizer_state_dict`), not
        for forward: with several pipeline stages on a rank it is a container of their parts.
        """
        if len(self.parts) == 1:
            return self.parts[0]
        if self._merged is None:
            self._merged = _LocalParts(self.parts)
        return self._merged

    def parameters(self) -> Iterator[nn.Parameter]:
        return self.module.parameters()

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return self.module.named_parameters()

    def materialize(self, *, device: torch.device | str, seed: int | None = None) -> None:
        """Allocate parameters on `device` and initialise them randomly.

        Sharded parameters are initialised through DTensor's random-number tracker, so the
        values depend on the layout; use `load_full_state_dict` to start every layout from the
        same weights (e.g. a seed checkpoint).
        """
        device = torch.device(device)
        if seed is not None:
            torch.manual_seed(seed)
        for part in self.parts:
            part.to_empty(device=device)
            part.init_weights()
        self._find_tied_copies()
        if self.tied:
            self.tied.copy_weights()
        self._build_schedule(device)

    def load_full_state_dict(self, state_dict: dict[str, torch.Tensor], *, device: torch.device | str) -> None:
        """Allocate on `device` and copy in a full (unsharded) state dict held by every rank."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        device = torch.device(device)
        if self.dims.pp > 1 and self.parts[0].args.tie_embeddings and "tok_embeddings.weight" in state_dict:
            # The last stage's head is its copy of the embedding; a tied checkpoint may name it once.
            state_dict = dict(state_dict) | {"output.weight": state_dict["tok_embeddings.weight"]}
        for part in self.parts:
            part.to_empty(device=device)
            if isinstance(part, Transformer):
                part.init_rope()
            if self.meshes is None:
                part.load_state_dict(state_dict)
                if isinstance(part, Transformer):
                    part.tie_weights()
            else:
                # Pipeline stages hold a subset of the keys, hence strict=False; every key a
                # stage does hold is still loaded (checked by the parity tests).
                # A copy: set_model_state_dict replaces the values of the dict it is given.
                set_model_state_dict(part, dict(state_dict),
                                     options=StateDictOptions(full_state_dict=True, strict=self.dims.pp == 1))
        self._find_tied_copies()
        self._build_schedule(device)

    def _find_tied_copies(self) -> None:
        if self.dims.pp > 1 and self.parts[0].args.tie_embeddings:
            self.tied = TiedCopies(self.parts, self.tie_group)

    def _build_schedule(self, device: torch.device) -> None:
        if self.dims.pp == 1 or self.schedule is not None:
            return
        c = self.config
        n_mb = self.microbatches = c.pp_microbatches or self.dims.pp * len(self.parts)
        self.schedule = build_schedule(
            list(zip(self.stage_ids, self.parts)), self.meshes.pp, schedule=c.pp_schedule,
            n_microbatches=n_mb, loss_fn=self._pipeline_loss, device=device,
        )

    # ---- one step --------------------------------------------------------------------------

    def _pipeline_loss(self, out: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The last stage's output (logits, or final-normed states for a chunked head) -> scaled loss."""
        if self._loss_chunks == 1:
            return _plain(self.loss_fn(out, targets)) * self._scale
        (last,) = [p for p in self.parts if getattr(p, "output", None) is not None]
        return _chunked_head_sum(out, last.output.weight, targets, self._loss_chunks) * self._scale

    def _use_chunks(self, chunks: int) -> None:
        """Set the head slices of this call; pipeline stages then end at the final norm."""
        self.check_loss_chunks(chunks)
        self._loss_chunks = chunks
        for part in self.parts:
            if isinstance(part, PipelineStageModel):
                part.head_in_loss = chunks > 1

    def _loss_context(self, loss_chunks: int = 1):
        if self.dims.tp > 1 and (self.config.loss_parallel or loss_chunks > 1):
            return loss_parallel()
        return contextlib.nullcontext()

    def check_loss_chunks(self, chunks: int) -> None:
        """Raise ValueError unless the head can run in `chunks` slices (every layout can).

        A chunked head multiplies slices of the final-normed states by the output matrix outside
        any module's forward. FSDP gathers that matrix through `hidden_states` (see fsdp.py) and
        keeps it gathered until its single reduce-scatter; CP only changes which tokens a rank
        holds; under TP the states are gathered over the sequence once and each chunk's logits
        stay vocabulary shards (chunks always use loss parallel, whatever `loss_parallel` says:
        gathering each chunk's logits would only add traffic); under PP the last stage stops at
        the final norm (`PipelineStageModel.head_in_loss`) and the schedule's loss function runs
        the head, whose matrix that stage holds (gathered: FSDP does not reshard under PP).
        """
        if isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1:
            raise ValueError(f"train.loss_chunks must be an integer >= 1, got {chunks!r}")
        if chunks > 1 and self.loss_fn is not cross_entropy_sum:
            raise ValueError(f"train.loss_chunks = {chunks} computes next-token cross-entropy itself; this "
                             "model was parallelised with a custom loss_fn, which needs train.loss_chunks = 1")

    def _token_loss_sum(self, part: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, pos: torch.Tensor,
                        doc_ids: torch.Tensor | None, chunks: int) -> torch.Tensor:
        """This rank's summed loss over `targets`, from the full logits or from the head in chunks."""
        if chunks == 1:
            return _plain(self.loss_fn(part(inputs, pos=pos, doc_ids=doc_ids), targets))
        hidden = hidden_states(part, inputs, pos=pos, doc_ids=doc_ids)  # (B, S, dim); FSDP: gathers the root
        # Read after `hidden`: under FSDP the attribute now holds the gathered matrix (before, the shard).
        return _chunked_head_sum(hidden, part.output.weight, targets, chunks)

    def forward_backward(
        self, inputs: torch.Tensor, targets: torch.Tensor, *, doc_ids: torch.Tensor | None = None,
        num_targets: int | None = None, loss_chunks: int = 1,
    ) -> StepLoss:
        """Forward and backward of one (B, S) batch; gradients accumulate into `.grad`.

        Every CP, TP and PP rank of a data-parallel group passes the same full batch.
        `num_targets`: target tokens of the whole global step, when it spans several calls
        (gradient accumulation); by default this call's batch summed over data-parallel ranks.
        `loss_chunks` > 1: run the output head and its cross-entropy in that many slices of this
        rank's tokens (see `check_loss_chunks` for how each layout reaches the head).
        """
        self._use_chunks(loss_chunks)
        B, S = inputs.shape
        d, m = self.dims, self.meshes
        if d.tp > 1 and (S // d.cp) % d.tp != 0:
            raise ValueError(f"sequence parallel needs seq_len / cp = {S // d.cp} divisible by tp = {d.tp}")
        if num_targets is None:
            count = (targets != IGNORE_INDEX).sum()
            if m is not None and d.dp > 1:
                dist.all_reduce(count, group=m.dp.get_group())
            num_targets = int(count)
        # Each data/context rank sums its own tokens; FSDP averages gradients over those
        # dp_replicate * dp_shard * cp ranks, so scaling by that count makes the result the
        # gradient of (global token sum / global token count).
        self._scale = (d.dp * d.cp) / max(num_targets, 1)
        self._check_rows(B)
        inputs, targets, pos, doc_ids = self._local_batch(inputs, targets, doc_ids)
        local_sum = torch.zeros((), device=inputs.device)
        with self._loss_context(loss_chunks):
            if self.schedule is not None:
                losses: list[torch.Tensor] = []
                kwargs = {"pos": pos} if doc_ids is None else {"pos": pos, "doc_ids": doc_ids}
                args = (inputs,) if self.has_first_stage else ()
                before = self.tied.grads_before() if self.tied else None
                self.schedule.step(*args, target=targets, losses=losses if self.has_last_stage else None, **kwargs)
                if self.tied:
                    self.tied.sum_grads(before)
                if self.has_last_stage:
                    local_sum = torch.stack([x.detach() for x in losses]).sum() / self._scale
            else:
                (part,) = self.parts
                loss = self._token_loss_sum(part, inputs, targets, pos, doc_ids, loss_chunks)
                (loss * self._scale).backward()
                local_sum = loss.detach()
        total = local_sum.float() / max(num_targets, 1)
        if m is not None and (d.dp * d.cp > 1 or d.pp > 1):
            # Sum over every rank that holds distinct tokens; non-last pipeline stages add 0.
            for mesh, n in ((m.dp_cp, d.dp * d.cp), (m.pp, d.pp)):
                if n > 1:
                    dist.all_reduce(total, group=mesh.get_group())
        return StepLoss(loss=total, num_targets=num_targets)

    def _check_rows(self, rows: int) -> None:
        """A pipeline schedule splits this rank's rows into microbatches: at least one row each."""
        if self.schedule is not None and rows < self.microbatches:
            raise ValueError(
                f"pipeline schedule {self.config.pp_schedule} splits each step into {self.microbatches} "
                f"microbatches, but this data-parallel rank has {rows} rows; set parallel.pp_microbatches <= {rows} "
                "or give each data-parallel rank more rows (a larger batch)")

    def dp_rows(self, x: torch.Tensor | None) -> torch.Tensor | None:
        """This data-parallel rank's rows of a global batch that every rank holds."""
        if x is None or self.meshes is None or self.dims.dp == 1:
            return x
        B, dp, r = x.shape[0], self.dims.dp, self.meshes.dp_rank
        if B % dp:
            raise ValueError(f"a batch of {B} rows cannot be split over dp = {dp} data-parallel ranks; "
                             "make the (micro-)batch rows a multiple of dp_replicate * dp_shard")
        return x[r * B // dp:(r + 1) * B // dp]

    @torch.no_grad()
    def _local_batch(self, inputs: torch.Tensor, targets: torch.Tensor, doc_ids: torch.Tensor | None):
        """This rank's part of the batch and its RoPE positions: the zig-zag chunks under context
        parallelism (whose shard carries the positions and the document structure; pipeline
        stages also get the rows' whole document ids to build each microbatch's mask), else the
        whole rows with positions restarting per document."""
        if self.cp is not None:
            shard = self.cp.shard_batch(inputs, targets, doc_ids=doc_ids)
            return shard.inputs, shard.targets, shard.pos, shard.doc_ids if self.dims.pp > 1 else None
        B, S = inputs.shape
        pos = positions_from_doc_ids(doc_ids) if doc_ids is not None else torch.arange(S, device=inputs.device)
        return inputs, targets, pos.expand(B, -1), doc_ids

    def loss_sum(self, inputs: torch.Tensor, targets: torch.Tensor, *, doc_ids: torch.Tensor | None = None,
                 loss_chunks: int = 1) -> float:
        """Summed loss of a batch every rank holds in full (evaluation; no data parallelism)."""
        self._use_chunks(loss_chunks)
        d, m = self.dims, self.meshes
        self._scale = 1.0
        self._check_rows(inputs.shape[0])
        inputs, targets, pos, doc_ids = self._local_batch(inputs, targets, doc_ids)
        total = torch.zeros((), device=inputs.device)
        with self._loss_context(loss_chunks):
            if self.schedule is not None:
                losses: list[torch.Tensor] = []
                kwargs = {"pos": pos} if doc_ids is None else {"pos": pos, "doc_ids": doc_ids}
                args = (inputs,) if self.has_first_stage else ()
                eval_schedule(self.schedule, *args, target=targets, losses=losses if self.has_last_stage else None,
                              **kwargs)
                if self.has_last_stage:
                    total = torch.stack([x.detach() for x in losses]).sum()
            else:
                (part,) = self.parts
                total = self._token_loss_sum(part, inputs, targets, pos, doc_ids, loss_chunks).detach()
        total = total.float()
        if m is not None:
            for mesh, n in ((m.cp, d.cp), (m.pp, d.pp)):  # CP ranks hold pieces, only the last stage has it
                if n > 1:
                    dist.all_reduce(total, group=mesh.get_group())
        return float(total)

    # ---- checkpoints -----------------------------------------------------------------------

    def optimizer_state_dict(self, optimizer: torch.optim.Optimizer) -> dict:
        """DCP's `get_optimizer_state_dict` of `module`, the same on every layout (collective).

        A tied matrix is named once, as in one process (see tied.py). Under pipeline parallelism
        each rank's parameter groups list only its own stages' names, while DCP stores the groups
        as one object that one rank writes; so every rank lists the names of all stages, and the
        checkpoint loads into any layout (a group must name all of one process's parameters).
        """
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        sd = get_optimizer_state_dict(self.module, optimizer)
        if self.tied:
            sd = self.tied.name_once(sd)
        if self.dims.pp > 1:
            mine = [list(g["params"]) for g in sd["param_groups"]]
            every = [None] * self.dims.pp
            dist.all_gather_object(every, mine, group=self.meshes.pp.get_group())
            for i, group in enumerate(sd["param_groups"]):
                names = [n for rank_groups in every for n in rank_groups[i]]
                group["params"] = list(dict.fromkeys(names))  # in stage order, each once
        return sd

    def load_optimizer_state_dict(self, optimizer: torch.optim.Optimizer, state_dict: dict) -> None:
        """`set_optimizer_state_dict` of a state from `optimizer_state_dict` (any layout's)."""
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        if self.tied:
            state_dict = self.tied.name_copies(state_dict)
        set_optimizer_state_dict(self.module, optimizer, state_dict)

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip by the global gradient norm over all shards, stages and parts; return the norm."""
        params = [p for p in self.parameters() if p.grad is not None]
        # A tied matrix's gradient counts once: its head copies (same gradient) stay out of the norm.
        heads = self.tied.head_ids if self.tied else set()
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if id(p) not in heads], norm_type=2.0)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()  # sums the squared norms of every shard
        if self.dims.pp > 1:
            sq = norm**2
            dist.all_reduce(sq, group=self.meshes.pp.get_group())
            norm = sq.sqrt()
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        return norm


class _LocalParts(nn.Module):
    """Several pipeline stages of one rank seen as one module with the full model's names."""

    def __init__(self, parts: list[nn.Module]):
        super().__init__()
        self._parts = tuple(parts)  # a tuple: not registered again as submodules
        self.layers = nn.ModuleDict()
        for part in parts:
            for name, block in part.layers.items():
                self.layers[name] = block
            for attr in ("tok_embeddings", "norm", "output"):
                if getattr(part, attr, None) is not None:
                    setattr(self, attr, getattr(part, attr))
        self.layers = nn.ModuleDict(sorted(self.layers.items(), key=lambda kv: int(kv[0])))

    @property
    def args(self):
        return self._parts[0].args

    @args.setter
    def args(self, value) -> None:
        for part in self._parts:
            part.args = value

    def init_rope(self) -> None:
        for part in self._parts:
            part.init_rope()

    def forward(self, *args, **kwargs):
        raise RuntimeError("a rank's pipeline stages run through ParallelModel.forward_backward, not forward")


def _plain(x: torch.Tensor) -> torch.Tensor:
    return x.full_tensor() if isinstance(x, DTensor) else x


def _chunked_head_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunks: int) -> torch.Tensor:
    """Summed cross-entropy of the head `weight` (vocab, dim) over `hidden` (B, S, dim) in `chunks` slices.

    Under TP `weight` is a DTensor sharded on the vocabulary and `hidden` is sharded on the
    sequence (the final norm's sequence parallelism); a chunk of tokens needs its positions
    whole, so they are gathered once (ColwiseParallel's own input all-gather) and each chunk's
    logits stay vocabulary shards for loss parallel.
    """
    if isinstance(hidden, DTensor):
        hidden = hidden.redistribute(placements=[Replicate()] * hidden.device_mesh.ndim)
    return _plain(chunked_cross_entropy_sum(hidden, weight, targets, chunks=chunks))


def parallelize(
    model: Transformer,
    config: ParallelConfig,
    meshes: Meshes | None,
    *,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = cross_entropy_sum,
) -> ParallelModel:
    """Transform a meta-device `model` for this rank (see the module docstring for the order).

    meshes: from `ParallelDims.build_mesh`, or None for a single process (AC, compile and
        float8 still apply). `loss_fn(logits, targets)` must return the *sum* over tokens.
    """
    config.validate()
    d = meshes.dims if meshes is not None else ParallelDims()
    if meshes is None and config.dims(1) != d:
        raise ValueError(f"parallel layout {config.dims(1).describe()} needs torch.distributed; launch with torchrun")
    args = model.args
    check_tp(args, d.tp)
    n_per_rank = stages_per_rank(config.pp_schedule, config.pp_stages_per_rank or None) if d.pp > 1 else 1
    check_pp(args, d.pp, n_per_rank)
    if config.float8 == "tensorwise" and d.tp > 1:
        # Each TP rank would scale its gradient shards by its own amax (torchao's float8 TP
        # styles fix that; they are not wired here). Row-wise scales are per row, so unaffected.
        raise ValueError("parallel.float8 = tensorwise is not supported with tensor parallelism; "
                         "use parallel.float8 = rowwise with tp > 1")
    use_fsdp = d.dp_replicate * d.fsdp > 1
    if _DTYPES[config.param_dtype] != torch.float32 and not use_fsdp:
        raise ValueError(
            f"parallel.param_dtype = {config.param_dtype} is applied by FSDP, which this layout ({d.describe()}) "
            "does not use; build the model in that dtype instead"
        )

    apply_float8(model, recipe=config.float8, emulate=config.float8_emulate)
    if d.pp > 1:
        stages = split_model(model, pp_rank=meshes.pp.get_local_rank(), pp=d.pp,
                             schedule=config.pp_schedule, n_per_rank=n_per_rank)
    else:
        stages = [(0, model)]
    cp = ContextParallel(meshes.cp) if d.cp > 1 else None
    for _, part in stages:
        if d.tp > 1:
            apply_tp(part, meshes.tp, loss_parallel=config.loss_parallel)
        if cp is not None:
            apply_cp(part, cp)
            if isinstance(part, PipelineStageModel):
                part.context = cp  # each microbatch builds its own mask over the gathered keys
        apply_ac(part, mode=config.ac)
        if config.compile:
            for block in part.layers.values():
                block.compile()  # in place: parameter names keep no `_orig_mod` prefix
        if use_fsdp:
            apply_fsdp(part, meshes.fsdp, param_dtype=_DTYPES[config.param_dtype],
                       reduce_dtype=_DTYPES[config.reduce_dtype], reshard_after_forward=d.pp == 1)
    group = None
    if d.pp > 1 and args.tie_embeddings:
        last = d.pp * n_per_rank - 1
        owner = next(r for r in range(d.pp) if last in stage_ids_of(r, d.pp, config.pp_schedule, n_per_rank))
        group = tie_group(meshes, last_stage_rank=owner)
    return ParallelModel([m for _, m in stages], config=config, meshes=meshes,
                         stage_ids=[s for s, _ in stages], cp=cp, loss_fn=loss_fn, tie_group=group)


def build_parallel_model(
    args,
    config: ParallelConfig,
    meshes: Meshes | None,
    *,
    device: torch.device | str,
    seed: int,
    init_fn: Callable[..., nn.Module] | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = cross_entropy_sum,
) -> ParallelModel:
    """Meta-device build -> `parallelize` -> materialise and initialise: what a trainer calls.

    With `config.full_init`, `init_fn(args, device=..., seed=...)` builds the whole initialised
    model on every rank (the single-process initialisation, so every layout starts from the same
    weights) and its state is sharded in; otherwise each rank initialises its shards in place.
    """
    with torch.device("meta"):
        model = Transformer(args)
    pm = parallelize(model, config, meshes, loss_fn=loss_fn)
    if config.full_init:
        if init_fn is None:
            raise ValueError("full_init needs the single-process initialiser (init_fn)")
        state = init_fn(args, device=torch.device(device), seed=seed).state_dict()
        pm.load_full_state_dict(state, device=device)
    else:
        pm.materialize(device=device, seed=seed)
    return pm
