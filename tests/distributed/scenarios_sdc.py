"""What the SDC / watchdog groups run (tests/distributed/test_sdc.py): replicas per layout, injected
bit flips, the re-computation check, stragglers, the trainer's hooks, and a hang.

Every scenario runs on both ranks; a check that must stop the job raises SilentDataCorruption on
every rank, which the scenario catches and reports as a result.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import torch.distributed as dist

import harness as H
from herd.parallel import ParallelConfig
from herd.train.config import WatchdogConfig
from herd.train.sdc import Fault, Faults, ReplicaChecker, SilentDataCorruption, flip_bit, recompute_check
from herd.train.watchdog import Watchdog

P = ParallelConfig


def _trained(cfg: ParallelConfig, state, steps: int = 2):
    pm = H.build_parallel(cfg, state=state)
    runner = H.Parallel(pm)
    opt = H.new_optimizer(runner.parameters())
    H.train(runner, opt, H.make_batches(docs=False, steps=steps), keep_grads=False)
    return pm, runner, opt


def _expect_sdc(name: str, fn, *needles: str) -> list:
    try:
        fn()
    except SilentDataCorruption as e:
        missing = [n for n in needles if n not in str(e)]
        return H.agree(name, not missing, f"missing {missing} in: {e}" if missing else str(e).splitlines()[0])
    return H.agree(name, False, "no SilentDataCorruption raised")


def replicas(state) -> list:
    out = []
    # Which tensors are comparable in which layout.
    try:
        pm, _, opt = _trained(P(), state, steps=1)
        ReplicaChecker(list(pm.named_parameters()), opt)
        out += H.agree("FSDP 2: nothing comparable is refused", False, "no ValueError")
    except ValueError as e:
        out += H.agree("FSDP 2: nothing comparable is refused", "no rank holds a replicated tensor" in str(e), str(e))

    pm, runner, opt = _trained(P(dp_replicate=2, dp_shard=1), state)
    named = list(pm.named_parameters())
    checker = ReplicaChecker(named, opt)
    every = {n for n, _ in named}
    got = {t.name for t in checker.tracked}
    compared = checker.check(2)
    # Every parameter, and AdamW's exp_avg, exp_avg_sq and step for each.
    out += H.agree("HSDP 2x1: every parameter and its optimizer state compared, clean run passes",
                   got == every and compared == 4 * len(every) and all(t.group == (0, 1) for t in checker.tracked),
                   f"{len(got)}/{len(every)} parameters, {compared} tensors")
    w = dict(named)["layers.1.attention.wq.weight"]
    if dist.get_rank() == 1:
        flip_bit(w, index=5, bit=3)  # a low mantissa bit: invisible in the loss
    H.train(runner, opt, H.make_batches(docs=False, steps=1, seed=5), keep_grads=False)  # trains on, replicas stay apart
    out += _expect_sdc("HSDP 2x1: a flipped bit in rank 1's parameter is caught at the next check",
                       lambda: checker.check(3), "at step 3", "rank 1", "param layers.1.attention.wq.weight",
                       "no majority")

    # Optimizer state: flip it on a fresh, identical pair of replicas.
    pm, runner, opt = _trained(P(dp_replicate=2, dp_shard=1), state)
    named = list(pm.named_parameters())
    checker = ReplicaChecker(named, opt)
    if dist.get_rank() == 1:
        flip_bit(opt.state[dict(named)["layers.0.feed_forward.w2.weight"]]["exp_avg_sq"], index=0, bit=20)
    out += _expect_sdc("HSDP 2x1: a flipped bit in rank 1's optimizer state is caught",
                       lambda: checker.check(4), "at step 4", "rank 1", "optim layers.0.feed_forward.w2.weight.exp_avg_sq")

    # TP: only the norms are replicated, sharded projections are not compared.
    pm, runner, opt = _trained(P(tp=2), state)
    named = list(pm.named_parameters())
    checker = ReplicaChecker(named, opt)
    got = {t.name for t in checker.tracked}
    norms = {n for n, _ in named if n.endswith("norm.weight")}
    out += H.agree("TP 2: exactly the norms are compared", got == norms and len(norms) == 2 * H.ARGS.n_layers + 1,
                   f"{sorted(got)[:3]} ... ({len(got)})")
    checker.check(2)
    if dist.get_rank() == 1:
        flip_bit(dict(named)["norm.weight"], index=1, bit=31)
    out += _expect_sdc("TP 2: a flipped sign bit in rank 1's norm is caught", lambda: checker.check(5),
                       "at step 5", "rank 1", "param norm.weight")
    return out


def recompute(state) -> list:
    out = []
    pm = H.build_parallel(P(), state=state)
    opt = H.new_optimizer(pm.parameters())
    inputs, targets, _ = H.make_batches(docs=False, steps=1)[0]
    r = dist.get_rank()
    rows = slice(r * inputs.shape[0] // 2, (r + 1) * inputs.shape[0] // 2)

    def run():
        pm.forward_backward(inputs[rows], targets[rows])

    named = list(pm.named_parameters())
    zero = lambda: opt.zero_grad(set_to_none=True)  # noqa: E731
    n = recompute_check(1, run, named, zero, outputs=pm.parts)
    out += H.agree("FSDP 2: re-computation passes on a clean run", n == len(named), f"{n} gradients")
    faults = Faults([Fault("corrupt_compute", step=2, rank=1, options={"bit": 9})])
    out += _expect_sdc("FSDP 2: an injected compute fault on rank 1 is caught and rank 1 named",
                       lambda: recompute_check(2, run, named, zero, outputs=pm.parts,
                                               corrupt_first=faults.corrupt_compute(2, pm.module)),
                       "at step 2: rank 1", "forward outputs")
    # Without the forward hashes, the gradient (reduced over both ranks) differs everywhere: both named.
    out += _expect_sdc("FSDP 2: without output hashes every rank of the reduction is named",
                       lambda: recompute_check(2, run, named, zero, corrupt_first=faults.corrupt_compute(2, pm.module)),
                       "rank 0", "rank 1", "every rank of the reduction")
    return out


def stragglers(state, workdir: Path) -> list:
    pm = H.build_parallel(P(), state=state)
    runner = H.Parallel(pm)
    opt = H.new_optimizer(runner.parameters())
    faults = Faults([Fault("slow", step=1, rank=1, options={"seconds": 0.05})])
    records = []

    class Sink:
        def log_event(self, rec):
            records.append(rec)

    wd = Watchdog(WatchdogConfig(straggler_every=2, straggler_factor=1.5), out_dir=workdir, models=pm.parts,
                  faults=faults, log=lambda m: None)
    found = []
    for step, (inputs, targets, doc_ids) in enumerate(H.make_batches(docs=False, steps=4), start=1):
        wd.step_begin(step)
        t = time.perf_counter()
        opt.zero_grad()
        runner.step(inputs, targets, doc_ids)
        opt.step()
        found.append(wd.step_end(step, time.perf_counter() - t, Sink()))
    wd.close()
    ok = found[1] == found[3] == [1] and found[0] == found[2] == []
    if dist.get_rank() == 0:
        ok = ok and [r["step"] for r in records] == [2, 4] and all(r["stragglers"] == [1] for r in records)
    busy = records[-1]["rank_busy_s"] if records else None
    return H.agree("FSDP 2: the slow rank 1 is named a straggler", ok, f"found {found}; busy s/step {busy}")


def hooks_under_tp_and_pp(state, workdir: Path) -> list:
    """The progress hooks run under TP (DTensor block outputs) and PP (stage modules, schedules)."""
    out = []
    for name, cfg in {"TP 2": P(tp=2), "PP 2": P(pp=2)}.items():
        pm = H.build_parallel(cfg, state=state)
        runner = H.Parallel(pm)
        opt = H.new_optimizer(runner.parameters())
        events = []
        wd = Watchdog(WatchdogConfig(straggler_every=1), out_dir=workdir, models=pm.parts, log=lambda m: None)
        real_mark = wd.mark
        wd.mark = lambda event: (events.append(event), real_mark(event))  # noqa: E731
        wd.step_begin(1)
        inputs, targets, doc_ids = H.make_batches(docs=False, steps=1)[0]
        runner.step(inputs, targets, doc_ids)
        opt.step()
        wd.step_end(1, 1.0)
        wd.close()
        blocks = [n for p in pm.parts for n in (f"layers.{k}" for k in p.layers)]
        want = {f"forward of {b}" for b in blocks} | {f"backward of {b}" for b in blocks}
        missing = sorted(want - set(events))
        out += H.agree(f"{name}: progress events for every local block, forward and backward", not missing and
                       wd.busy > 0, f"missing {missing}; {len(events)} events, busy {wd.busy:.4f} s")
    return out


def trainer(workdir: Path) -> list:
    """The trainer's hooks end to end: HSDP 2x1 with a bit flipped on rank 1 after step 1."""
    from herd.data.shards import ShardWriter
    from herd.train.config import config_from_dict
    from herd.train.trainer import Trainer

    data = workdir / "shards"
    if dist.get_rank() == 0:
        rng = random.Random(0)
        with ShardWriter(data, vocab_size=256) as w:
            for _ in range(60):
                w.add([rng.randrange(256) for _ in range(rng.randint(5, 60))])
    dist.barrier()
    out_dir = workdir / "train"
    cfg = config_from_dict({
        "job": {"out_dir": str(out_dir), "device": "cpu"}, "model": {"preset": "debug", "n_layers": 2},
        "data": {"train": [str(data)]}, "parallel": {"dp_replicate": 2, "dp_shard": 1},
        "metrics": {"tensorboard": False, "plot": False, "progress": False},
        "sdc": {"replica_check_every": 2, "recompute_every": 1},
        "watchdog": {"straggler_every": 1, "collective_timeout_s": 60},
        "stages": [{"name": "p", "steps": 4, "ramp": [[0, 128, 16]]}]})
    faults = Faults([Fault("flip_param", step=1, rank=1, options={"name": "layers.0.ffn_norm.weight", "bit": 2})])
    t = Trainer(cfg, log=lambda m: None, faults=faults)
    out = _expect_sdc("trainer HSDP 2x1: the flip after step 1 stops the run at step 2's replica check", t.fit,
                      "replica checksum check at step 2", "rank 1", "param layers.0.ffn_norm.weight")
    steps_ok = t.step == 2
    recs = []
    if dist.get_rank() == 0:
        recs = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
        times = [r for r in recs if r.get("event") == "step_times"]
        # Step 2's record is never written: the check stops the run first.
        steps_ok = steps_ok and [r["step"] for r in times] == [1] and len(times[0]["rank_busy_s"]) == 2
    beats = sorted(p.name for p in (out_dir / "heartbeat").iterdir())
    out += H.agree("trainer HSDP 2x1: step-time records and heartbeats", steps_ok and beats == [
        "rank-0.json", "rank-1.json"], f"step {t.step}, records {recs}, heartbeats {beats}")

    # Checks every 3 steps, checkpoints every 2: the flip after step 1 must not reach step 2's
    # checkpoint, which every restart would resume from. The check before the save finds it.
    out_dir = workdir / "train-ckpt"
    from dataclasses import replace

    cfg = replace(cfg, job=replace(cfg.job, out_dir=str(out_dir)), sdc=replace(cfg.sdc, replica_check_every=3),
                  checkpoint=replace(cfg.checkpoint, every=2))
    faults = Faults([Fault("flip_param", step=1, rank=1, options={"name": "layers.0.ffn_norm.weight", "bit": 2})])
    t = Trainer(cfg, log=lambda m: None, faults=faults)
    out += _expect_sdc("trainer HSDP 2x1: a flip between replica checks stops the run before step 2's checkpoint",
                       t.fit, "replica checksum check at step 2", "rank 1")
    saved = sorted(p.name for p in (out_dir / "checkpoints").glob("step-*")) if (out_dir / "checkpoints").is_dir() else []
    return out + H.agree("trainer HSDP 2x1: no checkpoint holds the disagreeing replicas", t.step == 2 and not saved,
                         f"step {t.step}, checkpoints {saved}")


def world2(rank: int, world: int, workdir: Path) -> list:
    state = H.reference_state()
    return (replicas(state) + recompute(state) + stragglers(state, workdir) + hooks_under_tp_and_pp(state, workdir)
            + trainer(workdir))


def hang(rank: int, world: int, workdir: Path) -> list:
    """Rank 1 stalls inside step 2's forward of block 1; the watchdog must end the job (this never returns)."""
    state = H.reference_state()
    pm = H.build_parallel(P(), state=state)
    runner = H.Parallel(pm)
    opt = H.new_optimizer(runner.parameters())
    faults = Faults([Fault("stall", step=2, rank=1, options={"seconds": 120, "at": "forward of layers.1"})])
    wd = Watchdog(WatchdogConfig(collective_timeout_s=3), out_dir=workdir, models=pm.parts, faults=faults)
    (workdir / f"started-{rank}").write_text(str(time.time()))
    for step, (inputs, targets, doc_ids) in enumerate(H.make_batches(docs=False, steps=3), start=1):
        wd.step_begin(step)
        opt.zero_grad()
        runner.step(inputs, targets, doc_ids)
        opt.step()
        wd.step_end(step, 0.0)
    wd.close()
    return [("hang", False, "the stalled step completed")]


def world4(rank: int, world: int, workdir: Path) -> list:
    """Replica groups of the 4-rank products, and a majority naming one rank alone."""
    state = H.reference_state()
    out = []
    norm = "layers.0.attention_norm.weight"

    # FSDP 2 x TP 2 (rank = 2 * shard + tp): the norms' shards are replicated over the two TP ranks.
    pm, _, opt = _trained(P(dp_shard=2, tp=2), state, steps=1)
    named = list(pm.named_parameters())
    checker = ReplicaChecker(named, opt)
    norms = {n for n, _ in named if n.endswith("norm.weight")}
    mine = (0, 1) if rank < 2 else (2, 3)
    out += H.agree("FSDP 2 x TP 2: the norms, across the TP ranks of one shard",
                   {t.name for t in checker.tracked} == norms and {t.group for t in checker.tracked} == {mine},
                   f"{len(checker.tracked)} tensors in groups {sorted({t.group for t in checker.tracked})}")
    checker.check(1)
    if rank == 3:
        flip_bit(dict(named)[norm], index=0, bit=7)
    out += _expect_sdc("FSDP 2 x TP 2: a flip on rank 3 names ranks 2 and 3 only", lambda: checker.check(2),
                       "rank 2 (", "rank 3 (", f"param {norm}: ranks [2, 3]")

    # HSDP 2 x TP 2 (rank = 2 * replica + tp): norms replicated over all four ranks, projections over the
    # two replicas. Four copies of a norm: the majority names the odd rank alone.
    pm, _, opt = _trained(P(dp_replicate=2, dp_shard=1, tp=2), state, steps=1)
    named = list(pm.named_parameters())
    checker = ReplicaChecker(named, opt)
    groups = {t.name: t.group for t in checker.tracked}
    proj = (0, 2) if rank % 2 == 0 else (1, 3)
    ok = set(groups) == {n for n, _ in named} and all(
        g == ((0, 1, 2, 3) if n.endswith("norm.weight") else proj) for n, g in groups.items())
    out += H.agree("HSDP 2 x TP 2: norms across all 4 ranks, projections across the replicas", ok,
                   f"{sorted(set(groups.values()))}")
    checker.check(1)
    if rank == 3:
        flip_bit(dict(named)[norm], index=0, bit=7)
    out += _expect_sdc("HSDP 2 x TP 2: a flip on rank 3 names rank 3 alone by majority", lambda: checker.check(2),
                       "differs from the majority",
                       f"param {norm}: rank 3 differs from the majority of its replicas [0, 1, 2, 3]")
    msg_ok = True
    try:
        checker.check(3)
    except SilentDataCorruption as e:
        msg_ok = "rank 0" not in str(e).splitlines()[0] and "rank 2 " not in str(e).splitlines()[0]
    out += H.agree("HSDP 2 x TP 2: the majority's ranks are not named", msg_ok, "")

    # PP 2 x FSDP 2: the stages hold different layers and FSDP shards them: nothing to compare.
    try:
        pm, _, opt = _trained(P(pp=2, dp_shard=2), state, steps=1)
        ReplicaChecker(list(pm.named_parameters()), opt)
        out += H.agree("PP 2 x FSDP 2: nothing comparable is refused", False, "no ValueError")
    except ValueError as e:
        out += H.agree("PP 2 x FSDP 2: nothing comparable is refused", "no rank holds a replicated tensor" in str(e),
                       str(e))
    return out
