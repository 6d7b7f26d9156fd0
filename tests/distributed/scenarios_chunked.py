"""The chunked output head (`train.loss_chunks > 1`) under every parallel layout, in one gloo group.

Every run is held to the single-process reference with the *plain* head (loss_chunks = 1):
losses and gradients of 3 AdamW steps with clipping within the 1e-5 of the other parity
scenarios (fp32), then the final parameters (see PARAM_TOL). Also: the trainer's own step
(`TrainCore` with `ChunkedNextTokenLoss` and gradient accumulation), evaluation through
`loss_sum`, the bytes moved (FSDP: the gathered head is all-gathered and reduce-scattered once
per step, exactly the plain step's count; TP: only the recomputed loss-parallel reductions are
added), and the memory point itself: no (tokens x vocab) logits tensor is built.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode

import harness as H
from herd.data.loader import Batch
from herd.model import ModelArgs
from herd.model.llama import Transformer
from herd.parallel import ParallelConfig, parallelize
from herd.parallel.comm import CommCounter
from herd.parallel.pipeline import PP_SCHEDULES
from herd.parallel.plan import CommInputs, step_comm_bytes
from herd.train.core import ChunkedNextTokenLoss, TrainCore

CHUNKS = 4
# AdamW divides by sqrt(v), so last-bit gradient differences move a parameter by up to about
# lr x their relative size: after 3 steps the plain (unchunked) TP 2 run is already 1.2e-5 from
# one process (FSDP 2 and CP 2: 5.6e-6). Gradients and losses keep the 1e-5 of every layout.
PARAM_TOL = 3e-5
TIED = H.ARGS.replace(tie_embeddings=True)  # the head is the embedding matrix (Llama 3.2 1B/3B)


def final_params(name: str, ref_model: torch.nn.Module, runner) -> list:
    """Every parameter a rank holds (gathered from its shards) equals the reference's after training."""
    ref = {n: p.detach() for n, p in ref_model.named_parameters()}
    worst, where = 0.0, ""
    for n, p in runner.named_parameters():
        diff = float((H.full(p.detach()) - ref[H.clean(n)]).abs().max())
        if diff > worst:
            worst, where = diff, n
    return H.agree(f"{name}: final parameters", worst <= PARAM_TOL,
                   f"max |diff| {worst:.2e} (tol {PARAM_TOL:g}) at {where or '-'}")


def parity(name: str, cfg: ParallelConfig, batches, state, *, args: ModelArgs = H.ARGS) -> list:
    single = H.Single(state, args)
    ref = H.train(single, H.new_optimizer(single.parameters()), batches)
    pm = H.build_parallel(cfg, state=state, args=args)
    runner = H.Parallel(pm, loss_chunks=CHUNKS)
    got = H.train(runner, H.new_optimizer(runner.parameters()), batches)
    return H.compare(name, ref, got) + final_params(name, single.model, runner)


class _CoreRunner(H.Parallel):
    """The trainer's step: `TrainCore` with the chunked loss, the global batch as two micro-batches."""

    def __init__(self, pm, opt):
        super().__init__(pm)
        self.core = TrainCore(pm.module, opt, grad_clip=H.CLIP, loss=ChunkedNextTokenLoss(CHUNKS), parallel=pm)

    def step(self, inputs, targets, doc_ids):
        halves = torch.arange(inputs.shape[0]).chunk(2)  # each half still splits over the dp ranks
        micro = [Batch(inputs[r], targets[r], None if doc_ids is None else doc_ids[r],
                       int((targets[r] != -100).sum())) for r in halves]
        return self.core.forward_backward(micro).loss


def bf16_compute(state, batches, ref_losses) -> list:
    """bf16 compute under FSDP (the GPU setting): the chunks multiply FSDP's gathered bf16 matrix;
    not exact, so held to the plain fp32 run within the 0.02 of the plain bf16 scenario."""
    pm = H.build_parallel(ParallelConfig(param_dtype="bfloat16"), state=state)
    runner = H.Parallel(pm, loss_chunks=CHUNKS)
    losses, _ = H.train(runner, H.new_optimizer(runner.parameters()), batches, keep_grads=False)
    worst = max(abs(a - b) for a, b in zip(losses, ref_losses))
    return H.agree("FSDP 2 bf16 compute chunked", worst < 0.02, f"losses {losses} vs fp32 {ref_losses} ({worst:.1e})")


class _TwoBlocks(H.Parallel):
    """One process, the batch as two row blocks of gradient accumulation (plain head)."""

    def step(self, inputs, targets, doc_ids):
        n = int((targets != -100).sum())
        total = 0.0
        for rows in torch.arange(inputs.shape[0]).chunk(2):
            docs = None if doc_ids is None else doc_ids[rows]
            total += float(self.pm.forward_backward(inputs[rows], targets[rows], doc_ids=docs, num_targets=n).loss)
        return torch.tensor(total)


def float8(state, batches) -> list:
    """Row-wise float8 (emulated) leaves the head in high precision, so the chunks multiply the
    same matrix. Each data-parallel rank scales its own rows, hence the reference of world2's
    float8 scenarios: one float8 process accumulating the same two row blocks, plain head."""
    cfg = ParallelConfig(float8="rowwise", float8_emulate=True)
    with torch.device("meta"):
        model = Transformer(H.ARGS)
    single = parallelize(model, cfg, None)
    single.load_full_state_dict(state, device="cpu")
    runner = _TwoBlocks(single)
    ref = H.train(runner, H.new_optimizer(runner.parameters()), batches)
    pm = H.build_parallel(cfg, state=state)
    got = H.train(H.Parallel(pm, loss_chunks=CHUNKS), H.new_optimizer(list(pm.parameters())), batches)
    return H.compare("FSDP 2 + float8 rowwise (emulated) chunked", ref, got)


def core_parity(state, batches) -> list:
    single = H.Single(state)
    ref = H.train(single, H.new_optimizer(single.parameters()), batches)
    out = []
    for name, cfg in {"FSDP 2": ParallelConfig(), "PP 2": ParallelConfig(pp=2)}.items():
        pm = H.build_parallel(cfg, state=state)
        opt = H.new_optimizer(list(pm.parameters()))
        runner = _CoreRunner(pm, opt)
        got = H.train(runner, opt, batches)
        name = f"TrainCore {name} chunked, 2 micro-batches"
        out += H.compare(name, ref, got) + final_params(name, single.model, runner)
    return out


def evaluation(state, batches) -> list:
    """`loss_sum` (the trainer's validation) with a chunked head equals the plain single-process sum."""
    inputs, targets, doc_ids = batches[0]
    single = H.Single(state)
    with torch.no_grad():
        logits = single.model(inputs, doc_ids=doc_ids)
        want = float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum"))
    out = []
    for name, cfg in {"FSDP 2": ParallelConfig(), "TP 2": ParallelConfig(tp=2), "PP 2": ParallelConfig(pp=2),
                      "PP 2 ZBVZeroBubble": ParallelConfig(pp=2, pp_schedule="ZBVZeroBubble")}.items():
        pm = H.build_parallel(cfg, state=state)
        with torch.no_grad():
            got = pm.loss_sum(inputs, targets, doc_ids=doc_ids, loss_chunks=CHUNKS)
        out += H.agree(f"{name} chunked loss_sum", abs(got - want) <= 1e-3,  # a sum over ~125 tokens
                       f"{got:.6f} vs single-process {want:.6f}")
    return out


def _measure(cfg: ParallelConfig, state, batches):
    pm = H.build_parallel(cfg, state=state)
    runner = H.Parallel(pm, loss_chunks=CHUNKS)
    H.train(runner, H.new_optimizer(runner.parameters()), batches[:1], keep_grads=False)  # set-up traffic
    with CommCounter() as counter:
        runner.step(*batches[1])
    return pm, counter


def fsdp_comm(state, batches) -> list:
    """A chunked FSDP step moves exactly the plain step's analytic bytes: the root (norm and head)
    is gathered once and its gradient reduce-scattered once, however many chunks read it."""
    pm, counter = _measure(ParallelConfig(), state, batches)
    measured = counter.attribute(pm.meshes)
    expected = step_comm_bytes(H.ARGS, CommInputs(dp_shard=2, batch=H.BATCH // 2, seq_len=H.SEQ))
    assert expected == step_comm_bytes(H.ARGS, CommInputs(dp_shard=2, batch=H.BATCH // 2, seq_len=H.SEQ,
                                                          loss_chunks=CHUNKS))
    gathers = sum(c.kind == "all_gather" for c in counter.calls)
    scatters = sum(c.kind == "reduce_scatter" for c in counter.calls)
    units = H.ARGS.n_layers + 2  # blocks, embedding, root
    ok = measured == expected and scatters == units
    return H.agree("comm FSDP 2 chunked", ok, f"measured {measured}, analytic (plain head) {expected}; "
                   f"{gathers} all-gathers, {scatters} reduce-scatters for {units} units")


def tp_comm(state, batches) -> list:
    """Under TP the chunks add only the loss-parallel reductions their backward recomputes, with
    or without `loss_parallel` (chunks never gather the logits)."""
    out = []
    layouts = {"TP 2": ParallelConfig(tp=2), "TP 2 without loss parallel": ParallelConfig(tp=2, loss_parallel=False)}
    for name, cfg in layouts.items():
        pm, counter = _measure(cfg, state, batches)
        measured = counter.attribute(pm.meshes)
        expected = step_comm_bytes(H.ARGS, CommInputs(tp=2, batch=H.BATCH, seq_len=H.SEQ, loss_chunks=CHUNKS,
                                                      loss_parallel=cfg.loss_parallel))
        plain = step_comm_bytes(H.ARGS, CommInputs(tp=2, batch=H.BATCH, seq_len=H.SEQ))
        out += H.agree(f"comm {name} chunked", measured == expected,
                       f"measured {measured}, analytic {expected} (plain head with loss parallel: {plain})")
    return out


class _LogitRows(TorchDispatchMode):
    """The most rows any tensor whose last dimension is the vocabulary had (logits or their gradient).

    Views are skipped: the transposed (dim, vocab) head matrix is no activation.
    """

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.rows = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view:
            return out
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == self.vocab:
                shape = t.shape if not isinstance(t, DTensor) else t.to_local().shape
                self.rows = max(self.rows, shape[:-1].numel())
        return out


def logit_rows(state, batches) -> list:
    """The chunked step never holds more than one chunk's logits; the plain one holds all of them.

    FSDP 2: this rank's 64 tokens. PP 2 ZBVZeroBubble: rank 0 holds the last stage, which sees
    4 microbatches of 32 tokens; the plain schedule also merges their logits into one (B, S, V)
    output, the chunked one merges only final-normed states.
    """
    inputs, targets, doc_ids = batches[0]
    out = []
    layouts = {"FSDP 2": ParallelConfig(), "PP 2 ZBVZeroBubble": ParallelConfig(pp=2, pp_schedule="ZBVZeroBubble")}
    for name, cfg in layouts.items():
        rows = {}
        for chunks in (1, CHUNKS):
            pm = H.build_parallel(cfg, state=state)
            runner = H.Parallel(pm, loss_chunks=chunks)
            with _LogitRows(H.ARGS.vocab_size) as seen:
                runner.step(inputs, targets, doc_ids)
            rows[chunks] = seen.rows
        if pm.dims.pp == 1:
            tokens = H.BATCH // 2 * H.SEQ  # this rank's rows
            want = {1: tokens, CHUNKS: tokens // CHUNKS}
        elif pm.has_last_stage:
            microbatch = H.BATCH // len(pm.parts) // 2 * H.SEQ  # one row per microbatch
            want = {1: H.BATCH * H.SEQ, CHUNKS: microbatch // CHUNKS}
        else:
            want = {1: 0, CHUNKS: 0}
        out += H.agree(f"{name} chunked: largest logits tensor", rows == want,
                       f"rows of (rows x vocab) tensors: plain {rows[1]}, {CHUNKS} chunks {rows[CHUNKS]} "
                       f"(expected {want[1]} and {want[CHUNKS]})")
    return out


def world2(rank: int, world: int, workdir: Path) -> list:
    state = H.reference_state()
    plain, docs = H.make_batches(docs=False), H.make_batches(docs=True)
    P = ParallelConfig
    out = []
    layouts = {
        "FSDP 2": (P(), plain),
        "FSDP 2 (docs)": (P(), docs),
        "FSDP 2 + full AC": (P(ac="full"), docs),
        "FSDP 2 + selective AC": (P(ac="selective"), docs),
        "CP 2 (docs)": (P(cp=2), docs),
        "TP 2": (P(tp=2), docs),
        "TP 2 without loss parallel": (P(tp=2, loss_parallel=False), plain),
    } | {f"PP 2 {s}": (P(pp=2, pp_schedule=s), docs) for s in PP_SCHEDULES}
    for name, (cfg, batches) in layouts.items():
        out += parity(f"{name} chunked", cfg, batches, state)
    out += parity("FSDP 2 tied embeddings chunked", P(), docs, H.reference_state(args=TIED), args=TIED)
    single = H.Single(state)
    out += bf16_compute(state, docs, H.train(single, H.new_optimizer(single.parameters()), docs)[0])
    out += core_parity(state, docs)
    out += float8(state, plain)
    out += evaluation(state, docs)
    out += fsdp_comm(state, plain)
    out += tp_comm(state, plain)
    out += logit_rows(state, plain)
    dist.barrier()
    return out


def world4(state) -> list:
    """The 4-rank products, run inside scenarios.world4's group (one spawn for all 4-rank tests)."""
    docs = H.make_batches(docs=True)
    out = []
    for name, cfg in NAMES4_LAYOUTS.items():
        out += parity(f"{name} chunked", cfg, docs, state)
    # FSDP under PP keeps every unit gathered for the step: the head's chunks add no traffic,
    # and the last stage sends nothing further (the states it now ends at stay on the rank).
    cfg = NAMES4_LAYOUTS["PP 2 x FSDP 2"]
    pm, counter = _measure(cfg, state, H.make_batches(docs=False))
    d = pm.dims
    expected = step_comm_bytes(H.ARGS, CommInputs(
        dp_shard=d.dp_shard, pp=d.pp, batch=H.BATCH // d.dp, seq_len=H.SEQ, stage_ids=pm.stage_ids,
        n_stages=d.pp * len(pm.parts), microbatches=d.pp * len(pm.parts), loss_chunks=CHUNKS))
    measured = counter.attribute(pm.meshes)
    out += H.agree("comm PP 2 x FSDP 2 chunked", measured == expected, f"measured {measured}, analytic {expected}")
    return out


NAMES4_LAYOUTS = {"HSDP 2x2": ParallelConfig(dp_replicate=2, dp_shard=2),
                  "FSDP 2 x TP 2": ParallelConfig(dp_shard=2, tp=2),
                  "FSDP 2 x CP 2": ParallelConfig(dp_shard=2, cp=2),
                  "PP 2 x FSDP 2": ParallelConfig(pp=2, dp_shard=2),
                  "PP 2 x TP 2": ParallelConfig(pp=2, tp=2, dp_shard=1)}
NAMES4 = [x for n in NAMES4_LAYOUTS for x in (f"{n} chunked", f"{n} chunked: final parameters")] + [
    "comm PP 2 x FSDP 2 chunked"]
NAMES = (
    [f"{n} chunked" for n in ("FSDP 2", "FSDP 2 (docs)", "FSDP 2 + full AC", "FSDP 2 + selective AC", "CP 2 (docs)",
                              "TP 2", "TP 2 without loss parallel", "FSDP 2 tied embeddings")]
    + [f"PP 2 {s} chunked" for s in PP_SCHEDULES]
    + [f"TrainCore {n} chunked, 2 micro-batches" for n in ("FSDP 2", "PP 2")]
)
NAMES = [x for n in NAMES for x in (n, f"{n}: final parameters")] + [
    "FSDP 2 bf16 compute chunked", "FSDP 2 + float8 rowwise (emulated) chunked", "FSDP 2 chunked loss_sum", "TP 2 chunked loss_sum", "PP 2 chunked loss_sum",
    "PP 2 ZBVZeroBubble chunked loss_sum", "comm FSDP 2 chunked", "comm TP 2 chunked",
    "comm TP 2 without loss parallel chunked", "FSDP 2 chunked: largest logits tensor",
    "PP 2 ZBVZeroBubble chunked: largest logits tensor"]
