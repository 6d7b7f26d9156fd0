"""Pipeline parallelism on `torch.distributed.pipelining`: stages cut from a meta model.

A stage is the whole `Transformer` with the layers it does not own deleted (and the
embedding, final norm and output head where they do not belong), so parameter names stay
those of the full model and a checkpoint written under one pipeline layout loads under any
other. Cutting happens on the meta device, before any memory is allocated.

Schedules are selected by name: GPipe and 1F1B hold one stage per rank; Interleaved1F1B and
InterleavedZeroBubble hold several stages per rank in a loop (stage s on rank s mod pp),
ZBVZeroBubble holds two stages in a V (rank r has stages r and 2pp-1-r). More stages per
rank shrink the pipeline bubble at the price of more point-to-point messages; the
zero-bubble schedules also split each backward into input- and weight-gradient halves to
fill the remaining bubble.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from herd.model.args import ModelArgs
from herd.model.llama import AttentionMask, Transformer
from herd.parallel.context import ContextParallel, GatheredMask

PP_SCHEDULES = ("GPipe", "1F1B", "Interleaved1F1B", "InterleavedZeroBubble", "ZBVZeroBubble")
_V_SCHEDULES = {"ZBVZeroBubble"}
_ZERO_BUBBLE = {"InterleavedZeroBubble", "ZBVZeroBubble"}


class PipelineStageModel(Transformer):
    """A `Transformer` holding only some layers; input is tokens (first stage) or hidden states.

    Takes `pos` as a (B, S) keyword so each microbatch carries its own positions; the mask is
    built here the way `Transformer.hidden` builds it for a cache-free forward. Under context
    parallelism (`context` set) `pos` covers this rank's chunks (B, S/cp) while `doc_ids` covers
    the whole rows (B, S), and the mask is over the all-gathered keys (`GatheredMask`). With
    `head_in_loss` the last stage stops at the final norm and the schedule's loss function
    applies the output head itself (in chunks, `train.loss_chunks`).

    With tied embeddings the first stage's `tok_embeddings` and the last stage's `output` are
    two copies of one matrix; `ParallelModel` sums their gradients so they stay equal.
    """

    head_in_loss: bool = False
    context: ContextParallel | None = None

    def forward(self, x: torch.Tensor, *, pos: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        h = self.tok_embeddings(x) if self.tok_embeddings is not None else x  # (B, S, dim)
        if self.context is not None:
            cp = self.context
            mask = GatheredMask(cp.gathered_mask(pos.shape[1] * cp.size, doc_ids, device=pos.device))
        else:
            mask = AttentionMask(pos, kv_len=pos.shape[1], doc_ids=doc_ids, cached=False)
        freqs_cis = self.freqs_cis[pos]  # (B, S, D/2)
        for layer in self.layers.values():
            h = layer(h, freqs_cis, mask, None)
        if self.norm is not None:
            h = self.norm(h)
        if self.output is not None and not self.head_in_loss:
            h = self.output(h).float()  # (B, S, vocab) logits on the last stage
        return h

    @torch.no_grad()
    def init_weights(self, *, generator: torch.Generator | None = None) -> None:
        """Initialise what this stage holds with the full model's rules (`Transformer.init_weights`)."""
        a = self.args
        std, out_std = 0.02, 0.02 / (2 * a.n_layers) ** 0.5
        for layer in self.layers.values():
            attn, ffn = layer.attention, layer.feed_forward
            for lin in (attn.wq, attn.wk, attn.wv, ffn.w1, ffn.w3):
                nn.init.normal_(lin.weight, std=std, generator=generator)
            for lin in (attn.wo, ffn.w2):
                nn.init.normal_(lin.weight, std=out_std, generator=generator)
            layer.attention_norm.weight.fill_(1.0)
            layer.ffn_norm.weight.fill_(1.0)
        if self.norm is not None:
            self.norm.weight.fill_(1.0)
        # A tied matrix gets the head's scale on both stages (values are then made equal by
        # `ParallelModel`, which copies the first stage's into the last).
        if self.tok_embeddings is not None:
            nn.init.normal_(self.tok_embeddings.weight, std=a.dim**-0.5 if a.tie_embeddings else 1.0,
                            generator=generator)
        if self.output is not None:
            nn.init.normal_(self.output.weight, std=a.dim**-0.5, generator=generator)
        self.init_rope()


def stages_per_rank(schedule: str, requested: int | None = None) -> int:
    if schedule not in PP_SCHEDULES:
        raise ValueError(f"unknown pipeline schedule {schedule!r}; use one of {', '.join(PP_SCHEDULES)}")
    if schedule in ("GPipe", "1F1B"):
        if requested not in (None, 1):
            raise ValueError(f"schedule {schedule} runs one stage per rank; set parallel.pp_stages_per_rank = 1")
        return 1
    if schedule in _V_SCHEDULES:
        if requested not in (None, 2):
            raise ValueError(f"schedule {schedule} runs two stages per rank (a V); set parallel.pp_stages_per_rank = 2")
        return 2
    n = requested or 2
    if n < 2:
        raise ValueError(f"schedule {schedule} needs parallel.pp_stages_per_rank >= 2, got {n}")
    return n


def stage_ids(pp_rank: int, pp: int, schedule: str, n_per_rank: int) -> list[int]:
    """Which global stages a rank runs, in the order the schedule expects."""
    if schedule in _V_SCHEDULES:
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank + i * pp for i in range(n_per_rank)]


def layer_split(n_layers: int, n_stages: int) -> list[range]:
    """Contiguous layer ranges per stage, as even as possible.

    Leftover layers go to the stages after the first: the first stage also runs the (cheap)
    embedding lookup, the paper instead moves a layer off both ends.
    """
    if n_stages > n_layers:
        raise ValueError(
            f"{n_stages} pipeline stages need at least {n_stages} layers, the model has {n_layers}; "
            "lower parallel.pp or parallel.pp_stages_per_rank"
        )
    base, extra = divmod(n_layers, n_stages)
    sizes = [base + (1 if 1 <= s <= extra else 0) for s in range(n_stages)]  # extra < n_stages
    starts = [sum(sizes[:s]) for s in range(n_stages)]
    return [range(a, a + n) for a, n in zip(starts, sizes)]


def check_pp(args: ModelArgs, pp: int, n_per_rank: int) -> None:
    if pp == 1:
        return
    layer_split(args.n_layers, pp * n_per_rank)


def check_schedule_ac(schedule: str, ac: str) -> None:
    """Zero-bubble schedules split each backward into an input-gradient and a weight-gradient
    pass over the same blocks; selective AC lets a region run backward once (torch raises
    "Trying to backward an extra time"), full AC recomputes the block for each pass."""
    if ac == "selective" and schedule in _ZERO_BUBBLE:
        raise ValueError(f"selective activation checkpointing cannot run under {schedule}, whose split backward "
                         "passes each block twice; use parallel.ac = full (or none), or a 1F1B schedule")


def split_model(model: Transformer, *, pp_rank: int, pp: int, schedule: str, n_per_rank: int) -> list[tuple[int, PipelineStageModel]]:
    """Cut a meta-device `model` into this rank's stages: [(stage_id, stage_model)]."""
    check_pp(model.args, pp, n_per_rank)
    n_stages = pp * n_per_rank
    ranges = layer_split(model.args.n_layers, n_stages)
    out = []
    for sid in stage_ids(pp_rank, pp, schedule, n_per_rank):
        stage = copy.deepcopy(model)
        stage.__class__ = PipelineStageModel  # same modules and names; only forward differs
        keep = {str(i) for i in ranges[sid]}
        for name in list(stage.layers.keys()):
            if name not in keep:
                del stage.layers[name]
        # A tied matrix is shared by the deep copy's embedding and head; dropping one of the two
        # leaves the other as this stage's own copy of it.
        if sid != 0:
            stage.tok_embeddings = None
        if sid != n_stages - 1:
            stage.norm = None
            stage.output = None
        out.append((sid, stage))
    return out


def build_schedule(
    stages: list[tuple[int, nn.Module]],
    mesh: DeviceMesh,
    *,
    schedule: str,
    n_microbatches: int,
    loss_fn,
    device: torch.device,
):
    """Wrap materialised, parallelised stage modules in `PipelineStage`s and a schedule."""
    # Imported here, not at the top: torch.distributed.pipelining pulls in torch._dynamo, ~1.5 s of
    # every process start on our CPUs, which layouts without PP (and every restart of them) never use.
    from torch.distributed.pipelining import PipelineStage
    from torch.distributed.pipelining.schedules import PipelineScheduleMulti, get_schedule_class

    n_stages = mesh.size() * len(stages)
    pp_stages = [
        PipelineStage(module, sid, n_stages, device, group=mesh.get_group()) for sid, module in stages
    ]
    cls = get_schedule_class(schedule)
    # Losses are already normalised by the global token count, so gradients must not be
    # divided again by the number of microbatches.
    if issubclass(cls, PipelineScheduleMulti):
        return cls(pp_stages, n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=False)
    (only,) = pp_stages
    return cls(only, n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=False)


# Action kinds (torch's `_ComputationType` values) a forward-only run must not perform.
_BACKWARD_ACTIONS = {"I", "W", "B", "SEND_B", "RECV_B"}


def eval_schedule(schedule, *args, **kwargs) -> None:
    """`schedule.eval(*args, **kwargs)`: forward only, losses into `kwargs["losses"]`.

    torch's action-list schedules keep their backward actions in eval and rely on each stage
    skipping them; where two adjacent stages share a rank (ZBVZeroBubble's V, torch 2.13) the
    skipped backward still hands its input gradient to the other stage, which fails ("can't
    steal_bwd_input if this stage doesn't have backward"). For the call, the action lists are
    cut to their forward actions; those keep their order, so every send still meets its receive.
    """
    full = getattr(schedule, "pipeline_order_with_comms", None)
    if full is None:  # one-stage-per-rank schedules run no action lists
        schedule.eval(*args, **kwargs)
        return
    schedule.pipeline_order_with_comms = {
        rank: [a for a in actions if a is None or str(a.computation_type.value) not in _BACKWARD_ACTIONS]
        for rank, actions in full.items()
    }
    try:
        schedule.eval(*args, **kwargs)
    finally:
        schedule.pipeline_order_with_comms = full

