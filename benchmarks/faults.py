"""Faults injected into a 2-rank training job: detected, recovered, and what they cost.

`herd train CFG --nproc 2` (FSDP over gloo, CPU, one thread per rank) trains a tiny model twice
from the same config: once fault free, once with faults injected at random steps drawn from a
seed, at a rate of one per `--every` steps (per kind). Both runs go through the real command,
supervised by torchrun's elastic agent (`--max-restarts`). Reported per kind: faults injected,
detected, recovered, and steps lost; for the run: effective training time (productive step time
over wall time, herd.train.goodput) with its breakdown, the fault-free run's for comparison, and
whether every step's loss equals the fault-free run's.

Fault kinds plug in through `FaultKind` (below): the module that detects the kind, the config
overrides that turn the detection on, and how to read the detections back from a finished run;
the injection itself is herd.train.faultinject's (`HERD_INJECT_FAULTS`, one entry per fault,
each fired once in the job's life). Kinds whose modules are not in this checkout are reported as
"not available" with the reason, never simulated:

* `kill`: rank r sends itself SIGKILL during step s; detection is torchrun's agent (a new attempt
  in attempts.jsonl), recovery the restart from the last checkpoint.
* `nan`: a NaN in one gradient of rank r at step s (herd.train.anomaly's FaultInjector); detected
  by the anomaly skip (a "nonfinite" record in metrics.jsonl), recovered by skipping that update,
  so the losses after it are not the fault-free run's.
* `bitflip`: one flipped bit in rank r's replica of a parameter before step s (herd.train.sdc's
  flip_bit); detected by the replica checksum check (the layout becomes plain data parallelism,
  for replicas to compare, in both runs), recovered by the restart from the last checkpoint.

    python benchmarks/faults.py                        # 300 steps, one kill per 100 steps
    python benchmarks/faults.py --steps 100 --every 50 # quicker

The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from herd.data.shards import ShardWriter  # noqa: E402
from herd.train import faultinject  # noqa: E402
from herd.train.config import config_from_dict, to_toml  # noqa: E402

WORLD = 2


@dataclass
class FaultKind:
    """One kind of fault: the module that detects it, the config that turns the detection on, and
    how to read the detections back from a finished run (its out_dir and its console log)."""

    name: str
    module: str  # the herd module that detects it; absent -> "not available"
    detections: Callable[[Path, str], list[int]]  # steps at which the run detected one
    overrides: list[str] = field(default_factory=list)  # config flags that turn the detection on

    def unavailable(self) -> str | None:
        """None if this checkout can inject and detect the kind, else why not."""
        if importlib.util.find_spec(self.module) is None:
            return f"{self.module} is not in this checkout"
        if self.name not in faultinject.KINDS:
            return f"herd.train.faultinject has no {self.name!r} injector"
        return None


def _restarts(out: Path, log: str) -> list[int]:
    """A kill is detected by torchrun's agent: each restart, at the step it resumed from."""
    return [a["resumed_step"] for a in _jsonl(out / "attempts.jsonl")[1:]]


def _anomalies(out: Path, log: str) -> list[int]:
    """herd.train.anomaly logs each skipped update in metrics.jsonl with its "anomaly" kind."""
    return [r["step"] for r in _jsonl(out / "metrics.jsonl") if str(r.get("anomaly", "")).startswith("nonfinite")]


def _corruptions(out: Path, log: str) -> list[int]:
    """herd.train.sdc stops every rank with one message naming the step; one detection per step."""
    return sorted({int(m) for m in re.findall(r"silent data corruption detected by .*? at step (\d+)", log)})


KINDS = [
    FaultKind("kill", "herd.train.elastic", _restarts),
    FaultKind("nan", "herd.train.anomaly", _anomalies),
    # Replicas to compare: plain data parallelism over the 2 ranks, checked at every checkpoint step
    # (--replica-check-every, main() adds it), so no checkpoint is written before the check of its step.
    FaultKind("bitflip", "herd.train.sdc", _corruptions, ["--parallel.dp_replicate", "2", "--parallel.dp_shard", "1"]),
]


def _jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_data(root: Path) -> Path:
    rng = random.Random(0)
    for split, docs in (("train", 3000), ("val", 40)):
        with ShardWriter(root / "data" / split, vocab_size=512) as w:
            for _ in range(docs):
                w.add([rng.randrange(256) for _ in range(rng.randint(5, 200))])
    return root / "data"


def write_config(data: Path, out: Path, args: argparse.Namespace) -> Path:
    cfg = {
        "job": {"out_dir": str(out), "device": "cpu", "seed": 0},
        "model": {"preset": "debug", "vocab_size": 512, "dim": args.dim, "n_layers": args.layers},
        "data": {"train": [str(data / "train")], "val": [str(data / "val")]},
        "train": {"micro_batch_tokens": args.batch_tokens},
        "optim": {"lr": 3e-3},
        "schedule": {"warmup_steps": 10, "min_lr": 3e-4},
        "checkpoint": {"every": args.checkpoint_every, "keep_last": 2},
        "metrics": {"log_every": 50, "val_batches": 1, "val_batch_size": 4, "tensorboard": False,
                    "plot": False, "progress": False},
        "stages": [{"name": "pretrain", "steps": args.steps, "ramp": [[0, args.batch_tokens, 128]]}],
    }
    path = out.with_suffix(".toml")
    path.write_text(to_toml(config_from_dict(cfg)))
    return path


def schedule(kinds: list[FaultKind], *, steps: int, every: int, seed: int, per_kind: bool = False) -> list[dict[str, Any]]:
    """One fault per `every` steps, at a random step of each window and a random rank: the kinds
    take turns window by window (so `every` is the rate of all faults together), or with
    `per_kind` one fault of every kind in each window (the rate of each kind)."""
    rng = random.Random(seed)
    faults = []
    for i, lo in enumerate(range(0, steps, every)):
        hi = min(lo + every, steps)
        for kind in (kinds if per_kind else [kinds[i % len(kinds)]] if kinds else []):
            # Never the very last step: a fault there would leave no step to show the recovery.
            faults.append({"kind": kind.name, "step": rng.randint(lo + 1, max(lo + 1, hi - 1)),
                           "rank": rng.randrange(WORLD)})
    return sorted(faults, key=lambda f: f["step"])


def herd_train(config: Path, *, faults: list[dict] | None, state: Path, overrides: list[str],
               max_restarts: int) -> tuple[int, float, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop(faultinject.ENV, None)
    if faults:
        env[faultinject.ENV] = json.dumps({"state": str(state), "faults": faults})
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "herd", "train", str(config), "--nproc", str(WORLD),
                           "--max-restarts", str(max_restarts), *overrides], env=env, cwd=ROOT,
                          capture_output=True, text=True)
    return proc.returncode, time.perf_counter() - t, proc.stdout + proc.stderr


def restart_seconds(out: Path) -> list[float]:
    """Per restart: the new group's ready time minus the last step end before the restart."""
    attempts = [a for a in _jsonl(out / "attempts.jsonl") if "rollback" not in a]
    ends = [r["time"] for r in _jsonl(out / "metrics.jsonl") if "loss" in r]
    ends += [d[2] for a in _jsonl(out / "attempts.jsonl") for d in a.get("dropped", [])]
    gaps = []
    for a in attempts[1:]:
        before = [t for t in ends if t < a["started"]]
        if before:
            gaps.append(a["ready"] - max(before))
    return gaps


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _jsonl(out / "metrics.jsonl") if "loss" in r}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--every", type=int, default=100, help="one fault of each kind per this many steps")
    p.add_argument("--checkpoint-every", type=int, default=10)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch-tokens", type=int, default=1024, help="tokens per step (sequences of 128)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kinds", default="kill,nan,bitflip")
    p.add_argument("--per-kind", action="store_true", help="one fault of every kind per --every steps (default: one "
                   "fault in all per --every steps, the kinds taking turns)")
    p.add_argument("--sync-checkpoints", action="store_true", help="write checkpoints on the training thread "
                   "(default: checkpoint.async_save)")
    p.add_argument("--replica-check-every", type=int, default=0,
                   help="with bitflip: steps between replica checks (default: --checkpoint-every)")
    p.add_argument("--keep", help="keep the runs in this directory (default: a temporary one)")
    args = p.parse_args()

    asked = [k for k in KINDS if k.name in args.kinds.split(",")]
    available = [k for k in asked if k.unavailable() is None]
    report: dict[str, Any] = {"benchmark": "faults", "steps": args.steps, "world": WORLD, "every": args.every,
                              "per_kind": args.per_kind, "seed": args.seed, "checkpoint_every": args.checkpoint_every,
                              "async_checkpoints": not args.sync_checkpoints, "kinds": {}}
    for k in asked:
        if k.unavailable() is not None:
            report["kinds"][k.name] = {"available": False, "reason": k.unavailable()}

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep) if args.keep else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        data = write_data(root)
        faults = schedule(available, steps=args.steps, every=args.every, seed=args.seed, per_kind=args.per_kind)
        overrides = [flag for k in available for flag in k.overrides]
        if any(k.name == "bitflip" for k in available):
            overrides += ["--sdc.replica_check_every", str(args.replica_check_every or args.checkpoint_every)]
        if not args.sync_checkpoints:
            overrides += ["--checkpoint.async_save", "true"]
        report["overrides"] = overrides
        runs = {}
        for name, injected in (("fault_free", None), ("faulty", faults)):
            out = root / name
            load_before = os.getloadavg()
            code, seconds, log = herd_train(write_config(data, out, args), faults=injected, state=root / "fired",
                                            overrides=overrides, max_restarts=len(faults) + 1)  # kills and SDC stops restart
            if code != 0:
                print(log[-6000:], file=sys.stderr)
                raise SystemExit(f"the {name} run failed with exit code {code}")
            runs[name] = {"out": out, "seconds": seconds, "log": log,
                          "account": json.loads((out / "effective_time.json").read_text())}
            # The machine is shared: its 1-minute load average before and after each run says how shared.
            report[f"loadavg_{name}"] = [round(load_before[0], 1), round(os.getloadavg()[0], 1)]
            print(f"{name}: {runs[name]['account']['effective']:.1%} effective, {seconds:.1f} s", file=sys.stderr)

        faulty, clean = runs["faulty"]["out"], runs["fault_free"]["out"]
        fired = {p.name for p in (root / "fired").iterdir()} if (root / "fired").is_dir() else set()
        finished = sorted(losses(faulty)) == list(range(1, args.steps + 1))
        for k in available:
            mine = [f for f in faults if f["kind"] == k.name]
            injected = [f for i, f in enumerate(faults) if f in mine and f"{i}-{k.name}-step{f['step']}" in fired]
            detected = k.detections(faulty, runs["faulty"]["log"])
            entry = {"available": True, "injected": len(injected), "detected": len(detected),
                     "recovered": len(detected) if finished else 0, "steps": [f["step"] for f in mine]}
            if k.name == "kill":  # the steps between the checkpoint resumed from and the kill ran twice
                entry["steps_lost"] = sum(f["step"] - resumed for f, resumed in zip(injected, detected))
            if k.name == "nan":  # recomputed finite (exact recovery) vs skipped (the update is lost)
                recs = [r for r in _jsonl(faulty / "metrics.jsonl") if str(r.get("anomaly", "")).startswith("nonfinite")]
                entry["retried_transient"] = sum(r.get("action") == "retried" for r in recs)
                entry["skipped"] = sum(r.get("action") == "skip" for r in recs)
            report["kinds"][k.name] = entry
        kill, flip = report["kinds"].get("kill", {}), report["kinds"].get("bitflip", {})
        if kill.get("available") and flip.get("available"):
            # An SDC stop is restarted by the agent too: those restarts are the bit flips', not the kills'.
            kill["detected"] -= flip["detected"]
            kill["recovered"] = kill["detected"] if finished else 0
            kill.pop("steps_lost")  # restarts of both kinds interleave: no per-kill pairing

        acc, ref_acc = runs["faulty"]["account"], runs["fault_free"]["account"]
        report |= {
            "losses_equal": losses(faulty) == losses(clean),
            # A skipped update (nan) changes every loss after it by design; the first differing step says where.
            "first_differing_step": next((n for n in sorted(losses(clean)) if losses(faulty).get(n) != losses(clean)[n]),
                                         None),
            "finished": finished,
            "effective": round(acc["effective"], 4),
            "effective_fault_free": round(ref_acc["effective"], 4),
            "wall_s": round(acc["wall_seconds"], 1), "wall_fault_free_s": round(ref_acc["wall_seconds"], 1),
            "productive_s": round(acc["productive_seconds"], 1),
            "mean_step_s": round(acc["productive_seconds"] / max(acc["productive_steps"], 1), 4),
            "restarts": acc["restarts"], "replayed_steps": acc["replayed_steps"],
            "replayed_s": round(acc["replayed_seconds"], 1), "startup_s": round(acc["startup_seconds"], 1),
            "init_s": round(acc["init_seconds"], 1), "checkpoint_load_s": round(acc["load_seconds"], 2),
            "other_s": round(acc["other_seconds"], 1),
        }
        # One restart, from the last step end before it to the new group's first step: the agent seeing
        # the failure, stopping the others, new processes, imports, process group, model, checkpoint load.
        gaps = restart_seconds(faulty)
        report["restart_s"] = round(sum(gaps) / len(gaps), 1) if gaps else None
        report["restarts_s"] = [round(g, 1) for g in gaps]
        # Per restart: the logged steps it cut and ran again (the step in flight at a kill comes on top).
        report["steps_redone_per_restart"] = [len(a.get("dropped", [])) for a in _jsonl(faulty / "attempts.jsonl")[1:]
                                              if "rollback" not in a]
        kill = report["kinds"].get("kill", {})
        if gaps and kill.get("injected") and "steps_lost" in kill:
            # What one kill costs: a restart plus the steps run twice; faults alone take 10% of the
            # productive time at one kill per this many steps (the paper's 90% target).
            per_kill = report["restart_s"] + kill["steps_lost"] / kill["injected"] * report["mean_step_s"]
            report["cost_per_kill_s"] = round(per_kill, 1)
            report["steps_per_kill_for_90pct"] = round(9 * per_kill / report["mean_step_s"])
    print(json.dumps(report))


if __name__ == "__main__":
    main()
