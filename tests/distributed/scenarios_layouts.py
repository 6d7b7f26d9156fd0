"""The paper's 4-D layouts: CP x PP with document masks, PP with tied embeddings, all four at once.

Run inside the groups of scenarios.world2 / world4 (no spawn of their own), and in the 8- and
16-rank groups of test_layouts_4d.py. Every run is held to the single-process reference as the
other parity scenarios are: losses and gradients of 3 AdamW steps with clipping within 1e-5
(fp32). Tied runs also check that the embedding (first stage) and head (last stage) copies are
bitwise equal after the steps and equal the single tied model's matrix, that gradient
accumulation (the trainer's `TrainCore` with two micro-batches) counts each micro-batch once,
and that a checkpoint holds what a single tied model's holds and resumes across layouts.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

import harness as H
from herd.data.loader import Batch
from herd.parallel import ParallelConfig
from herd.train.core import TrainCore
from herd.train.optim import param_groups

P = ParallelConfig
TIED = H.ARGS.replace(tie_embeddings=True)  # Llama 3.2 1B/3B: the head is the embedding matrix
PARAM_TOL = 3e-5  # final parameters after 3 AdamW steps (see scenarios_chunked.PARAM_TOL)


def _with_head(grads: list[dict]) -> list[dict]:
    """The single tied model's gradients, also under the head copy's name (which must hold it too)."""
    return [g | {"output.weight": g["tok_embeddings.weight"]} for g in grads]


def _copies(name: str, pm, single) -> list:
    """Both copies bitwise equal on every rank that holds one, and equal to one process's matrix."""
    mine = {n: H.full(p.detach()).clone() for n, p in pm.named_parameters()
            if n in ("tok_embeddings.weight", "output.weight")}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    emb = [g["tok_embeddings.weight"] for g in gathered if "tok_embeddings.weight" in g]
    head = [g["output.weight"] for g in gathered if "output.weight" in g]
    ref = single.model.tok_embeddings.weight.detach()
    equal = bool(emb) and bool(head) and all(torch.equal(emb[0], t) for t in emb + head)
    diff = float((emb[0] - ref).abs().max()) if emb else float("inf")
    return H.agree(f"{name}: copies bitwise equal", equal and diff <= PARAM_TOL,
                   f"{len(emb)} embedding and {len(head)} head copies, equal: {equal}; "
                   f"max |diff| to one process {diff:.2e} (tol {PARAM_TOL:g})")


def tied_parity(name: str, cfg: ParallelConfig, batches, state) -> list:
    single = H.Single(state, TIED)
    losses, grads = H.train(single, H.new_optimizer(single.parameters()), batches)
    pm, got = H.parallel_run(cfg, batches, state=state, args=TIED)
    return H.compare(name, (losses, _with_head(grads)), got) + _copies(name, pm, single)


class _CoreRunner(H.Parallel):
    """The trainer's step: `TrainCore` with the global batch as two accumulated micro-batches."""

    def __init__(self, pm, opt):
        super().__init__(pm)
        self.core = TrainCore(pm.module, opt, grad_clip=H.CLIP, parallel=pm)

    def step(self, inputs, targets, doc_ids):
        halves = torch.arange(inputs.shape[0]).chunk(2)
        micro = [Batch(inputs[r], targets[r], None if doc_ids is None else doc_ids[r],
                       int((targets[r] != -100).sum())) for r in halves]
        return self.core.forward_backward(micro).loss


def tied_accumulation(name: str, cfg: ParallelConfig, batches, state) -> list:
    single = H.Single(state, TIED)
    losses, grads = H.train(single, H.new_optimizer(single.parameters()), batches)
    pm = H.build_parallel(cfg, state=state, args=TIED)
    opt = H.new_optimizer(pm.parameters())
    runner = _CoreRunner(pm, opt)
    got = H.train(runner, opt, batches)
    return H.compare(name, (losses, _with_head(grads)), got) + _copies(name, pm, single)


def eval_between_steps(name: str, cfg: ParallelConfig, batches, state, *, args=H.ARGS) -> list:
    """`loss_sum` (validation) after the first step, then two more steps: the evaluation equals one
    process's and the training after it is unchanged (the schedule is reused for both)."""
    single = H.Single(state, args)
    opt = H.new_optimizer(single.parameters())
    inputs, targets, doc_ids = batches[0]
    pm = H.build_parallel(cfg, state=state, args=args)
    runner = H.Parallel(pm)
    popt = H.new_optimizer(runner.parameters())
    ref_a, ref_ga = H.train(single, opt, batches[:1])
    got_a, got_ga = H.train(runner, popt, batches[:1])
    with torch.no_grad():
        want = float(torch.nn.functional.cross_entropy(
            single.model(inputs, doc_ids=doc_ids).flatten(0, 1), targets.flatten(), reduction="sum"))
        got = pm.loss_sum(inputs, targets, doc_ids=doc_ids)
    ref_b, ref_gb = H.train(single, opt, batches[1:])
    got_b, got_gb = H.train(runner, popt, batches[1:])
    fix = _with_head if args.tie_embeddings else (lambda g: g)
    out = H.agree(f"{name} loss_sum", abs(got - want) <= 1e-6 * abs(want),
                  f"{got:.6f} vs single-process {want:.6f}")
    return out + H.compare(f"{name} training around loss_sum", (ref_a + ref_b, fix(ref_ga + ref_gb)),
                           (got_a + got_b, got_ga + got_gb))


def _metadata_keys(path: str) -> set[str]:
    return set(dcp.FileSystemReader(path).read_metadata().state_dict_metadata)


def _optimizer(module) -> torch.optim.Optimizer:
    """herd's two parameter groups (decay on matmuls only; a tied head copy counts as the embedding)."""
    return torch.optim.AdamW(param_groups(module, 0.1), lr=H.LR, foreach=True)


def tied_checkpoints(state, workdir: Path) -> list:
    """Save under one layout, continue under another (and in one process): the continuing losses
    equal an uninterrupted single tied run's. FSDP 2 -> PP 2 reads the optimizer state of the
    matrix from its one-process name into the last stage's head copy; the PP 2 checkpoint holds
    exactly the keys a single tied model's checkpoint holds, and its parameter groups name every
    stage's parameters (one process's optimizer refuses groups of another size)."""
    batches = H.make_batches(docs=True, steps=4, seed=3)
    single = H.Single(state, TIED)
    ref_losses, _ = H.train(single, _optimizer(single.model), batches, keep_grads=False)
    out = []
    saved = {}
    for save_name, cfg in {"FSDP 2": P(), "PP 2 ZBVZeroBubble": P(pp=2, pp_schedule="ZBVZeroBubble")}.items():
        ckpt = str(workdir / f"ckpt-tied-{save_name.replace(' ', '-')}")
        pm = H.build_parallel(cfg, state=state, args=TIED)
        runner = H.Parallel(pm)
        opt = _optimizer(pm.module)
        first, _ = H.train(runner, opt, batches[:2], keep_grads=False)
        dcp.save({"model": get_model_state_dict(pm.module), "optim": pm.optimizer_state_dict(opt)},
                 checkpoint_id=ckpt)
        saved[save_name] = (ckpt, first)
    for (save_name, load_name), cfg in {("FSDP 2", "PP 2 1F1B"): P(pp=2),
                                         ("PP 2 ZBVZeroBubble", "PP 2 1F1B"): P(pp=2),
                                         ("PP 2 ZBVZeroBubble", "FSDP 2"): P()}.items():
        ckpt, first = saved[save_name]
        pm = H.build_parallel(cfg, state=None, args=TIED)
        runner = H.Parallel(pm)
        opt = _optimizer(pm.module)
        sd = {"model": get_model_state_dict(pm.module), "optim": pm.optimizer_state_dict(opt)}
        dcp.load(sd, checkpoint_id=ckpt)
        set_model_state_dict(pm.module, sd["model"])
        pm.load_optimizer_state_dict(opt, sd["optim"])
        cont, _ = H.train(runner, opt, batches[2:], keep_grads=False)
        diff = max(abs(a - b) for a, b in zip(first + cont, ref_losses))
        out += H.agree(f"resume tied {save_name} -> {load_name}", diff <= H.TOL,
                       f"losses {[round(x, 6) for x in first + cont]} vs {[round(x, 6) for x in ref_losses]} "
                       f"(max |diff| {diff:.1e})")
    ok, detail = True, "rank 0 only"
    if dist.get_rank() == 0:  # one process: read the pipeline's checkpoint, and write its own to compare keys
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

        ckpt, first = saved["PP 2 ZBVZeroBubble"]  # rank 0 holds stages 0 and 3, rank 1 stages 1 and 2
        one = H.Single(None, TIED)
        opt1 = _optimizer(one.model)
        sd = {"model": get_model_state_dict(one.model), "optim": get_optimizer_state_dict(one.model, opt1)}
        dcp.load(sd, checkpoint_id=ckpt, no_dist=True)
        set_model_state_dict(one.model, sd["model"])
        set_optimizer_state_dict(one.model, opt1, sd["optim"])
        own = str(workdir / "ckpt-tied-one-process")
        dcp.save(sd, checkpoint_id=own, no_dist=True)
        cont, _ = H.train(one, opt1, batches[2:], keep_grads=False)
        diff = max(abs(a - b) for a, b in zip(cont, ref_losses[2:]))
        keys, want = _metadata_keys(ckpt), _metadata_keys(own)
        ok = diff <= H.TOL and keys == want
        detail = (f"losses {[round(x, 6) for x in cont]} vs {[round(x, 6) for x in ref_losses[2:]]} "
                  f"(max |diff| {diff:.1e}); keys only in the pipeline's: {sorted(keys - want)[:4]}, "
                  f"only in one process's: {sorted(want - keys)[:4]}")
    return out + H.agree("resume tied PP 2 ZBVZeroBubble -> single process (same checkpoint keys)", ok, detail)


def world2(state, refs, workdir: Path) -> list:
    """Inside scenarios.world2's group."""
    tied_state = H.reference_state(args=TIED)
    docs = refs[True][0]
    out = []
    for s in ("1F1B", "ZBVZeroBubble"):
        out += tied_parity(f"PP 2 {s} tied", P(pp=2, pp_schedule=s), docs, tied_state)
    out += tied_accumulation("TrainCore PP 2 1F1B tied, 2 micro-batches", P(pp=2), docs, tied_state)
    out += eval_between_steps("PP 2 ZBVZeroBubble", P(pp=2, pp_schedule="ZBVZeroBubble"), docs, state)
    out += eval_between_steps("PP 2 ZBVZeroBubble tied", P(pp=2, pp_schedule="ZBVZeroBubble"), docs, tied_state,
                              args=TIED)
    out += tied_checkpoints(tied_state, workdir)
    return out


NAMES2 = (
    [x for s in ("1F1B", "ZBVZeroBubble") for x in (f"PP 2 {s} tied", f"PP 2 {s} tied: copies bitwise equal")]
    + ["TrainCore PP 2 1F1B tied, 2 micro-batches", "TrainCore PP 2 1F1B tied, 2 micro-batches: copies bitwise equal"]
    + [x for n in ("PP 2 ZBVZeroBubble", "PP 2 ZBVZeroBubble tied")
       for x in (f"{n} loss_sum", f"{n} training around loss_sum")]
    + ["resume tied FSDP 2 -> PP 2 1F1B", "resume tied PP 2 ZBVZeroBubble -> PP 2 1F1B",
       "resume tied PP 2 ZBVZeroBubble -> FSDP 2", "resume tied PP 2 ZBVZeroBubble -> single process (same checkpoint keys)"]
)


def world4(state, refs) -> list:
    """Inside scenarios.world4's group: CP x PP (document masks, a V schedule with AC) and tied PP
    with FSDP and with TP."""
    tied_state = H.reference_state(args=TIED)
    out = []
    for name, (cfg, docs) in CP_PP.items():
        _, got = H.parallel_run(cfg, refs[docs][0], state=state)
        out += H.compare(name, refs[docs][1], got)
    out += eval_between_steps("CP 2 x PP 2", P(cp=2, pp=2, dp_shard=1), refs[True][0], state)
    # PP 4: the copies' ranks (first and last) get a two-rank group of their own; the middle
    # stages hold no copy and take no part.
    for name, cfg in {"PP 2 x FSDP 2 tied": P(pp=2, dp_shard=2), "PP 2 x TP 2 tied": P(pp=2, tp=2, dp_shard=1),
                      "PP 4 tied": P(pp=4, dp_shard=1)}.items():
        out += tied_parity(name, cfg, refs[True][0], tied_state)
    return out


CP_PP = {
    "CP 2 x PP 2 docs=True": (P(cp=2, pp=2, dp_shard=1), True),
    "CP 2 x PP 2 docs=False": (P(cp=2, pp=2, dp_shard=1), False),
    "CP 2 x PP 2 ZBVZeroBubble + full AC docs=True": (P(cp=2, pp=2, dp_shard=1, pp_schedule="ZBVZeroBubble",
                                                         ac="full"), True),
}
NAMES4 = (list(CP_PP) + ["CP 2 x PP 2 loss_sum", "CP 2 x PP 2 training around loss_sum"]
          + [x for n in ("PP 2 x FSDP 2 tied", "PP 2 x TP 2 tied", "PP 4 tied") for x in (n, f"{n}: copies bitwise equal")])


# ---- 8 and 16 ranks (test_layouts_4d.py) ------------------------------------------------------------


def _refs(batch: int = H.BATCH):
    state = H.reference_state()
    refs = {}
    for docs in (False, True):
        batches = H.make_batches(docs=docs, batch=batch)
        refs[docs] = (batches, H.reference_run(batches, state=state))
    return state, refs


LAYOUTS8 = {"TP 2 x CP 2 x PP 2 docs=True": (P(tp=2, cp=2, pp=2, dp_shard=1), True)}


def world8(rank: int, world: int, workdir: Path) -> list:
    state, refs = _refs()
    out = []
    for name, (cfg, docs) in LAYOUTS8.items():
        _, got = H.parallel_run(cfg, refs[docs][0], state=state)
        out += H.compare(name, refs[docs][1], got)
    out += tied_parity("TP 2 x CP 2 x PP 2 tied", P(tp=2, cp=2, pp=2, dp_shard=1), refs[True][0],
                       H.reference_state(args=TIED))
    return out


NAMES8 = list(LAYOUTS8) + ["TP 2 x CP 2 x PP 2 tied", "TP 2 x CP 2 x PP 2 tied: copies bitwise equal"]

LAYOUTS16 = {
    "FSDP 2 x PP 2 x CP 2 x TP 2 docs=True": (P(dp_shard=2, pp=2, cp=2, tp=2), True),
    "FSDP 2 x PP 2 x CP 2 x TP 2 ZBVZeroBubble + full AC docs=True": (
        P(dp_shard=2, pp=2, cp=2, tp=2, pp_schedule="ZBVZeroBubble", ac="full"), True),
}


def world16(rank: int, world: int, workdir: Path) -> list:
    state, refs = _refs(batch=8)  # 4 rows per data-parallel rank: one per ZBVZeroBubble microbatch
    out = []
    for name, (cfg, docs) in LAYOUTS16.items():
        _, got = H.parallel_run(cfg, refs[docs][0], state=state)
        out += H.compare(name, refs[docs][1], got)
    out += tied_parity("FSDP 2 x PP 2 x CP 2 x TP 2 tied", P(dp_shard=2, pp=2, cp=2, tp=2), refs[True][0],
                       H.reference_state(args=TIED))
    # Fewer rows than microbatches is a clear error, not torch's assertion deep in the schedule.
    pm = H.build_parallel(P(dp_shard=2, pp=2, cp=2, tp=2, pp_schedule="ZBVZeroBubble"), state=state)
    inputs, targets, doc_ids = refs[True][0][0]
    try:
        pm.forward_backward(inputs[:1], targets[:1], doc_ids=doc_ids[:1])  # one row on each data-parallel rank
        ok, detail = False, "no error"
    except ValueError as e:
        ok, detail = "parallel.pp_microbatches <= 1" in str(e), str(e)
    return out + H.agree("too few rows for the microbatches", ok, detail)


NAMES16 = list(LAYOUTS16) + ["FSDP 2 x PP 2 x CP 2 x TP 2 tied", "FSDP 2 x PP 2 x CP 2 x TP 2 tied: copies bitwise equal",
                              "too few rows for the microbatches"]
