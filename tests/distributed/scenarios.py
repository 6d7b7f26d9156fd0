"""What each spawned group runs: every layout against the single-process reference.

Each function runs inside all ranks of one gloo group and returns (name, ok, detail)
results; the test modules assert on them one by one.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

import harness as H
import scenarios_anomaly
import scenarios_chunked
import scenarios_layouts
from herd.model.llama import Transformer
from herd.parallel import ParallelConfig, parallelize
from herd.parallel.comm import CommCounter
from herd.parallel.plan import CommInputs, step_comm_bytes

PP_SCHEDULES = ("GPipe", "1F1B", "Interleaved1F1B", "InterleavedZeroBubble", "ZBVZeroBubble")


def layouts(configs: dict[str, ParallelConfig], state, refs) -> list:
    out = []
    for name, (cfg, docs) in configs.items():
        pm, got = H.parallel_run(cfg, refs[docs][0], state=state)
        out += H.compare(f"{name} docs={docs}", refs[docs][1], got)
    return out


def comm_check(name: str, cfg: ParallelConfig, state, batches, *, args=H.ARGS) -> list:
    """Measured bytes of one steady-state step == the analytic count in herd.parallel.plan."""
    pm = H.build_parallel(cfg, state=state, args=args)
    runner = H.Parallel(pm)
    H.train(runner, H.new_optimizer(runner.parameters()), batches[:1], keep_grads=False)  # first step: set-up traffic
    inputs, targets, doc_ids = batches[1]
    with CommCounter() as counter:
        runner.step(inputs, targets, doc_ids)
    measured = counter.attribute(pm.meshes)
    d = pm.dims
    expected = step_comm_bytes(args, CommInputs(
        dp_replicate=d.dp_replicate, dp_shard=d.dp_shard, tp=d.tp, cp=d.cp, pp=d.pp, batch=H.BATCH // d.dp,
        seq_len=H.SEQ, stage_ids=pm.stage_ids, n_stages=d.pp * len(pm.parts),
        microbatches=cfg.pp_microbatches or d.pp * len(pm.parts), ac=cfg.ac, loss_parallel=cfg.loss_parallel))
    ok = measured == expected
    return H.agree(f"comm {name}", ok, f"measured {measured}, analytic {expected}")


def resume(name: str, save_cfg: ParallelConfig, load_cfgs: dict[str, ParallelConfig], state, workdir: Path) -> list:
    """Train 2 steps under one layout, save with DCP, continue 2 steps under others (and in one
    process): the continuing losses must equal an uninterrupted single-process run's."""
    batches = H.make_batches(docs=True, steps=4, seed=3)
    ref_losses, _ = H.reference_run(batches, state=state)
    ckpt = str(workdir / f"ckpt-{name}")
    pm = H.build_parallel(save_cfg, state=state)
    runner = H.Parallel(pm)
    opt = H.new_optimizer(runner.parameters())
    first, _ = H.train(runner, opt, batches[:2], keep_grads=False)
    dcp.save({"model": get_model_state_dict(pm.module), "optim": get_optimizer_state_dict(pm.module, opt)},
             checkpoint_id=ckpt)
    out = []
    for load_name, cfg in load_cfgs.items():
        pm2 = H.build_parallel(cfg, state=None)
        runner2 = H.Parallel(pm2)
        opt2 = H.new_optimizer(runner2.parameters())
        sd = {"model": get_model_state_dict(pm2.module), "optim": get_optimizer_state_dict(pm2.module, opt2)}
        dcp.load(sd, checkpoint_id=ckpt)
        set_model_state_dict(pm2.module, sd["model"])
        set_optimizer_state_dict(pm2.module, opt2, sd["optim"])
        cont, _ = H.train(runner2, opt2, batches[2:], keep_grads=False)
        diff = max(abs(a - b) for a, b in zip(first + cont, ref_losses))
        out += H.agree(f"resume {name} -> {load_name}", diff <= H.TOL,
                       f"losses {[round(x, 6) for x in first]} + {[round(x, 6) for x in cont]} vs "
                       f"{[round(x, 6) for x in ref_losses]} (max |diff| {diff:.1e})")
    # One process: rank 0 alone reads the sharded checkpoint into a plain model.
    ok, detail = True, "rank 0 only"
    if dist.get_rank() == 0:
        single = H.Single(None)
        opt1 = H.new_optimizer(single.parameters())
        sd = {"model": get_model_state_dict(single.model), "optim": get_optimizer_state_dict(single.model, opt1)}
        dcp.load(sd, checkpoint_id=ckpt, no_dist=True)
        set_model_state_dict(single.model, sd["model"])
        set_optimizer_state_dict(single.model, opt1, sd["optim"])
        cont, _ = H.train(single, opt1, batches[2:], keep_grads=False)
        diff = max(abs(a - b) for a, b in zip(cont, ref_losses[2:]))
        ok, detail = diff <= H.TOL, f"losses {[round(x, 6) for x in cont]} vs {ref_losses[2:]} (max |diff| {diff:.1e})"
    return out + H.agree(f"resume {name} -> single process", ok, detail)


class _Accumulating(H.Parallel):
    """One process, the batch split into row blocks as gradient-accumulation micro-batches."""

    def __init__(self, pm, *, blocks: int):
        super().__init__(pm)
        self.blocks = blocks

    def step(self, inputs, targets, doc_ids):
        n = int((targets != -100).sum())
        total = 0.0
        for rows in torch.arange(inputs.shape[0]).chunk(self.blocks):
            docs = None if doc_ids is None else doc_ids[rows]
            total += float(self.pm.forward_backward(inputs[rows], targets[rows], doc_ids=docs, num_targets=n).loss)
        return torch.tensor(total)


def _refs(state):
    refs = {}
    for docs in (False, True):
        batches = H.make_batches(docs=docs)
        refs[docs] = (batches, H.reference_run(batches, state=state))
    return refs


def world2(rank: int, world: int, workdir: Path) -> list:
    state = H.reference_state()
    refs = _refs(state)
    P = ParallelConfig
    configs = {
        "FSDP 2": (P(), False),
        "FSDP 2 (docs)": (P(), True),
        "TP 2": (P(tp=2), True),
        "TP 2 without loss parallel": (P(tp=2, loss_parallel=False), False),
        "CP 2": (P(cp=2), False),
        "CP 2 (docs)": (P(cp=2), True),
        "FSDP 2 + full AC": (P(ac="full"), True),
        "FSDP 2 + selective AC": (P(ac="selective"), True),
        "TP 2 + selective AC": (P(tp=2, ac="selective"), True),
        "CP 2 + full AC": (P(cp=2, ac="full"), True),
    }
    configs |= {f"PP 2 {s}": (P(pp=2, pp_schedule=s), True) for s in PP_SCHEDULES}
    out = layouts(configs, state, refs)

    # Float8 scales activations by their own amax, so each data-parallel rank quantises its
    # rows with its own scale. The reference is therefore one float8 process accumulating the
    # same two row blocks as two micro-batches (which also exercises `num_targets`).
    for recipe in ("tensorwise", "rowwise"):
        f8 = dict(float8=recipe, float8_emulate=True)
        batches = refs[False][0]
        with torch.device("meta"):
            model = Transformer(H.ARGS)
        single = parallelize(model, P(**f8), None)
        single.load_full_state_dict(state, device="cpu")
        runner = _Accumulating(single, blocks=2)
        ref = H.train(runner, H.new_optimizer(runner.parameters()), batches)
        _, got = H.parallel_run(P(**f8), batches, state=state)
        out += H.compare(f"FSDP 2 + float8 {recipe} (emulated)", ref, got)
    # TP ranks see the whole batch, so TP + row-wise float8 equals one float8 process exactly.
    f8 = dict(float8="rowwise", float8_emulate=True)
    with torch.device("meta"):
        model = Transformer(H.ARGS)
    single = parallelize(model, P(**f8), None)
    single.load_full_state_dict(state, device="cpu")
    runner = H.Parallel(single)
    ref = H.train(runner, H.new_optimizer(runner.parameters()), refs[True][0])
    _, got = H.parallel_run(P(tp=2, **f8), refs[True][0], state=state)
    out += H.compare("TP 2 + float8 rowwise (emulated)", ref, got)

    # bf16 compute under FSDP (the GPU setting) is not exact; it must stay close to fp32.
    _, (losses, _) = H.parallel_run(P(param_dtype="bfloat16"), refs[True][0], state=state)
    worst = max(abs(a - b) for a, b in zip(losses, refs[True][1][0]))
    out += H.agree("FSDP 2 bf16 compute", worst < 0.02, f"losses {losses} vs fp32 {refs[True][1][0]} ({worst:.1e})")

    batches = refs[False][0]
    for name, cfg in {"FSDP 2": P(), "TP 2": P(tp=2), "CP 2": P(cp=2), "PP 2 1F1B": P(pp=2),
                      "PP 2 ZBVZeroBubble": P(pp=2, pp_schedule="ZBVZeroBubble"),
                      "TP 2 + full AC": P(tp=2, ac="full"),
                      "TP 2 + selective AC": P(tp=2, ac="selective"), "CP 2 + selective AC": P(cp=2, ac="selective")}.items():
        out += comm_check(name, cfg, state, batches)
    tied = scenarios_layouts.TIED
    out += comm_check("PP 2 1F1B tied", P(pp=2), H.reference_state(args=tied), batches, args=tied)

    out += resume("FSDP 2", P(), {"TP 2": P(tp=2), "PP 2": P(pp=2)}, state, workdir)
    out += scenarios_layouts.world2(state, refs, workdir)
    return out + scenarios_anomaly.world2(state, workdir)


def world4(rank: int, world: int, workdir: Path) -> list:
    state = H.reference_state()
    refs = _refs(state)
    P = ParallelConfig
    configs = {
        "HSDP 2x2": (P(dp_replicate=2, dp_shard=2), True),
        "FSDP 2 x TP 2": (P(dp_shard=2, tp=2), True),
        "CP 2 x TP 2": (P(cp=2, tp=2, dp_shard=1), True),
        "PP 2 x FSDP 2": (P(pp=2, dp_shard=2), True),
        "FSDP 2 x CP 2": (P(dp_shard=2, cp=2), True),
        "PP 2 x TP 2": (P(pp=2, tp=2, dp_shard=1), False),
    }
    out = layouts(configs, state, refs)
    batches = refs[False][0]
    for name, cfg in {"HSDP 2x2": P(dp_replicate=2, dp_shard=2), "FSDP 2 x TP 2": P(dp_shard=2, tp=2),
                      "CP 2 x TP 2": P(cp=2, tp=2, dp_shard=1), "PP 2 x FSDP 2": P(pp=2, dp_shard=2),
                      "CP 2 x PP 2": P(cp=2, pp=2, dp_shard=1)}.items():
        out += comm_check(name, cfg, state, batches)
    out += comm_check("PP 2 x FSDP 2 tied", P(pp=2, dp_shard=2), H.reference_state(args=scenarios_layouts.TIED),
                      batches, args=scenarios_layouts.TIED)
    out += resume("FSDP 2 x TP 2", P(dp_shard=2, tp=2), {"FSDP 4": P(dp_shard=4), "HSDP 2x2": P(dp_replicate=2)},
                  state, workdir)
    out += scenarios_layouts.world4(state, refs)
    return out + scenarios_chunked.world4(state)
