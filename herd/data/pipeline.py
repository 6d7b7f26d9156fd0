"""Run a curation pipeline from a TOML file: readers -> steps -> outputs, sharded, resumable,
with per-step statistics of what was kept and dropped and why.

Trade-off (datatrove's executor model, see the research note): the inputs are cut into a fixed
number of shards and every shard streams through the fused generator chain independently; the
executor (local processes here) only schedules shards. A dataset-wide step (URL/exact/MinHash/line
dedup, the corpus KL reference, the mix) cuts the chain into *stages*: each stage writes its
surviving documents per shard (zstd JSONL under `work/`) plus a small signature file, one
process turns the signatures into a plan, and the next stage applies it while streaming on. A
finished shard (its stats file, written last) and a finished plan are never redone, so a run
that crashed resumes where it stopped; changing the pipeline file makes resuming an error
rather than a silent mix of two configurations. The price is one compressed write and read of
the surviving text per global step.

Executors (`herd.data.executors`) only decide where a task (stage, shard) runs; the steps never
know. The file is read into typed dataclasses by the shared loader (`herd.config`) in
`herd.data.pipeline_config`, which also takes `--section.key VALUE` overrides (`herd data run
--help` lists every key); classifier training is in `herd.data.classifier_training`.

Pipeline file:

    [pipeline]
    output_dir = "runs/data"     # everything a run writes; relative paths are from the cwd
    workers = 2                  # processes (1: run in this process)
    shards = 8                   # fixed for the life of a run (default: 4 x workers)
    executor = "local"           # or "ray" (pip install 'herd[ray]'), with optionally:
    # address = "auto"           #   an existing Ray cluster (ray.init(address=...)); omitted: a local one
    # num_cpus = 8               #   CPUs of that local cluster (default: workers); not with address

    [[input]]                    # any reader of herd.data.steps.readers.READERS
    type = "warc"
    paths = ["crawl/*.warc.gz"]
    # strict = true              # warc/jsonl/parquet: stop at the first corrupt record or cut file;
                                 # by default each is skipped, counted (skipped_corrupt) and listed in report.json

    [[train]]                    # optional: classifiers trained before the run if missing
    model = "models/domain.bin"  # relative to output_dir; .bin fastText, .pt tiny transformer
    examples = [{label = "code", limit = 500, input = {type = "python_stdlib"}}, ...]
                                 # a classify step with the same `model` string reads this file

    [[step]]                     # any step of herd.data.steps.STEPS, in order
    type = "extract"

    [[output]]                   # jsonl / parquet / shards, with optional where/min selection
    type = "shards"
    path = "shards/main"
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

from herd.data.classifier_training import train_classifier, train_classifiers
from herd.data.document import Document
from herd.data.executors import EXECUTORS, LocalExecutor, RayExecutor
from herd.data.pipeline_config import PipelineConfig, TrainSpec
from herd.data.steps import GlobalStep, Step, StepStats
from herd.data.steps.damaged import Corrupt
from herd.data.steps.readers import open_text
from herd.data.steps.writers import write_jsonl
from herd.io import atomic_write_json

# Re-exported: callers import the configuration and training from here, as before the split.
__all__ = ["EXECUTORS", "PipelineConfig", "RunReport", "Stage", "TrainSpec", "plan_stages", "run_pipeline",
           "train_classifier", "train_classifiers"]

FORMAT = "herd-pipeline-v1"
_log = logging.getLogger("herd.data")


# ---- stages --------------------------------------------------------------------------------------


@dataclass
class Stage:
    """Steps that stream together: an optional plan to apply first, then per-document steps, then
    an optional global step whose signatures are collected at the end."""

    index: int
    apply: GlobalStep | None
    steps: list[Step]
    barrier: GlobalStep | None


def plan_stages(steps: list[Step]) -> list[Stage]:
    stages: list[Stage] = []
    current: list[Step] = []
    pending: GlobalStep | None = None
    for step in steps:
        if isinstance(step, GlobalStep) and step.is_global:
            stages.append(Stage(len(stages), pending, current, step))
            current, pending = [], step
        else:
            current.append(step)
    stages.append(Stage(len(stages), pending, current, None))
    return stages


def sig_path(stage_dir: Path, shard: int, barrier: GlobalStep, *, reading: bool = False) -> Path:
    """Where `barrier` keeps shard `shard`'s signatures, named with the suffix of its format."""
    path = stage_dir / f"sig_{shard:05d}{barrier.sig_suffix}"
    # Runs written before the suffix followed the format named every signature file .npz, the JSON
    # ones (mix, token_kl) too. A resumed run whose collect pass finished then reads those rather
    # than failing on a missing .json; it never writes the old name.
    legacy = stage_dir / f"sig_{shard:05d}.npz"
    if reading and not path.exists() and legacy.exists():
        return legacy
    return path


def _timed(gen: Iterable[Document], cell: list[float]) -> Iterator[Document]:
    """Adds the time spent inside the wrapped generator (and everything upstream of it) to cell[0]."""
    it = iter(gen)
    while True:
        t = time.perf_counter()
        try:
            doc = next(it)
        except StopIteration:
            cell[0] += time.perf_counter() - t
            return
        cell[0] += time.perf_counter() - t
        yield doc


def _read_jsonl(path: Path) -> Iterator[Document]:
    with open_text(path) as f:
        for line in f:
            yield Document.from_dict(json.loads(line))


class _Run:
    def __init__(self, cfg: PipelineConfig) -> None:
        self.cfg = cfg
        self.stages = plan_stages(cfg.steps)
        self.work = cfg.output_dir / "work"
        self.units: list[tuple[int, str]] = []
        self.num_shards = 0

    def stage_dir(self, k: int) -> Path:
        return self.work / f"stage_{k}"

    def plan_dir(self, k: int) -> Path:
        return self.work / f"plan_{k}"

    def shard_units(self, shard: int) -> list[tuple[int, str]]:
        return self.units[shard :: self.num_shards]

    def run_task(self, k: int, shard: int) -> None:
        stage = self.stages[k]
        stats: list[StepStats] = []
        cells: list[list[float]] = []
        if k == 0:
            read = StepStats(name="read", type="read")
            counts: Counter = Counter()

            def skipped(c: Corrupt) -> None:
                read.add_corrupt(c.to_dict())
                # One line per record up to the number of examples kept; the rest are only counted.
                if read.skipped_corrupt <= StepStats.MAX_EXAMPLES:
                    _log.warning("skipped a corrupt record: %s", c.message())

            def source() -> Iterator[Document]:
                for i, unit in self.shard_units(shard):
                    reader = self.cfg.inputs[i]
                    for doc in reader.read(unit, skipped):
                        counts[f"docs_{reader.name}"] += 1
                        read.docs_in += 1
                        read.docs_out += 1
                        read.chars_out += len(doc.text)
                        yield doc

            docs: Iterable[Document] = source()
            stats.append(read)
        else:
            docs = _read_jsonl(self.stage_dir(k - 1) / f"shard_{shard:05d}.jsonl.zst")
            read = StepStats(name=f"read_stage_{k - 1}", type="read")
            stats.append(read)
            docs = self._count_read(docs, read)
        cells.append([0.0])
        docs = _timed(docs, cells[-1])
        if stage.apply is not None:
            st = StepStats(name=stage.apply.name, type=stage.apply.type)
            docs = stage.apply.apply(docs, st, shard=shard, plan_dir=self.plan_dir(k - 1))
            stats.append(st)
            cells.append([0.0])
            docs = _timed(docs, cells[-1])
        for step in stage.steps:
            st = StepStats(name=step.name, type=step.type)
            docs = step(docs, st)
            stats.append(st)
            cells.append([0.0])
            docs = _timed(docs, cells[-1])
        out_dir = self.stage_dir(k)
        if stage.barrier is not None:
            # Only the collect pass's time is counted here; its documents are counted where the
            # plan is applied, in the next stage, under the same step name.
            stats.append(StepStats(name=stage.barrier.name, type=stage.barrier.type))
            docs = stage.barrier.collect(docs, sig_path(out_dir, shard, stage.barrier))
            cells.append([0.0])
            docs = _timed(docs, cells[-1])
        write_jsonl(docs, out_dir / f"shard_{shard:05d}.jsonl.zst")
        # Own time of a step = time inside its generator minus time inside its upstream's.
        for i, st in enumerate(stats):
            st.seconds = cells[i][0] - (cells[i - 1][0] if i else 0.0)
            if st.type != "read":
                st.check()
        if k == 0:
            stats[0].counters.update(counts)
        atomic_write_json(out_dir / f"shard_{shard:05d}.stats.json", [s.to_dict() for s in stats])

    @staticmethod
    def _count_read(docs: Iterable[Document], st: StepStats) -> Iterator[Document]:
        for doc in docs:
            st.docs_in += 1
            st.docs_out += 1
            st.chars_out += len(doc.text)
            yield doc



# ---- the run -------------------------------------------------------------------------------------


@dataclass
class RunReport:
    steps: list[StepStats]
    plans: dict[str, Any]
    outputs: dict[str, Any]
    classifiers: dict[str, Any]
    seconds: float
    output_dir: Path

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "seconds": round(self.seconds, 2), "steps": [s.to_dict() for s in self.steps],
                "plans": self.plans, "outputs": self.outputs, "classifiers": self.classifiers,
                "skipped_corrupt": self.skipped_corrupt, "corrupt_examples": self.corrupt_examples}

    @property
    def skipped_corrupt(self) -> int:
        return sum(s.skipped_corrupt for s in self.steps)

    @property
    def corrupt_examples(self) -> list[dict[str, str]]:
        return [e for s in self.steps for e in s.corrupt_examples][: StepStats.MAX_EXAMPLES]

    def table(self) -> str:
        """The per-step table `herd data run` prints."""
        lines = [f"{'step':<22}{'in':>9}{'out':>9}{'dropped':>9}{'changed':>9}{'MB out':>9}{'sec':>8}  why dropped"]
        for s in self.steps:
            why = ", ".join(f"{r} {n}" for r, n in s.dropped.most_common())
            if s.docs_added:
                why = (why + ", " if why else "") + f"(+{s.docs_added} repeats)"
            if s.skipped_corrupt:
                why = (why + ", " if why else "") + f"skipped_corrupt {s.skipped_corrupt}"
            n_in = s.docs_in if s.type != "read" else s.docs_out
            lines.append(f"{s.name:<22}{n_in:>9,}{s.docs_out:>9,}{s.num_dropped:>9,}{s.modified:>9,}"
                         f"{s.chars_out / 1e6:>9.2f}{s.seconds:>8.1f}  {why}")
        return "\n".join(lines)


def _merge_stats(paths: list[Path]) -> list[StepStats]:
    merged: dict[str, StepStats] = {}
    for p in paths:
        for d in json.loads(p.read_text()):
            s = StepStats.from_dict(d)
            if s.name in merged:
                merged[s.name].merge(s)
            else:
                merged[s.name] = s
    return list(merged.values())


def _identity(raw: dict[str, Any]) -> dict[str, Any]:
    """The pipeline file less the keys that only say where tasks run: a run may resume on
    another executor or worker count (the shard layout is fixed in work/layout.json)."""
    p = {k: v for k, v in raw.get("pipeline", {}).items() if k not in ("workers", "executor", "address", "num_cpus")}
    return {**raw, "pipeline": p}


def run_pipeline(cfg: PipelineConfig, *, workers: int | None = None, fresh: bool = False,
                 log: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> RunReport:
    """Runs (or resumes) the pipeline; returns the merged statistics and writes report.json and
    report.html into the output directory."""
    t0 = time.perf_counter()
    workers = workers or cfg.workers
    out = cfg.output_dir
    if fresh and (out / "work").exists():
        shutil.rmtree(out / "work")
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / "pipeline.json"
    if not fresh and config_path.exists() and _identity(json.loads(config_path.read_text())) != _identity(cfg.raw):
        raise ValueError(f"{out} holds a run of a different pipeline file; rerun with --fresh to start over, "
                         "or choose another output_dir")
    atomic_write_json(config_path, cfg.raw)
    classifiers = train_classifiers(cfg, log=log)

    run = _Run(cfg)
    layout_path = out / "work" / "layout.json"
    if layout_path.exists():  # the shard assignment is fixed for the life of a run, whatever --workers says
        layout = json.loads(layout_path.read_text())
        run.units = [tuple(u) for u in layout["units"]]  # type: ignore[misc]
        run.num_shards = layout["num_shards"]
    else:
        run.units = [(i, u) for i, r in enumerate(cfg.inputs) for u in r.units()]
        run.num_shards = max(1, min(len(run.units), cfg.shards or 4 * workers))
        layout_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(layout_path, {"units": run.units, "num_shards": run.num_shards})
    log(f"{len(run.units)} input files in {run.num_shards} shards, {len(run.stages)} stage(s), "
        f"{f'{workers} worker(s)' if cfg.executor == 'local' else 'Ray executor'}")

    plans: dict[str, Any] = {}
    executor = (RayExecutor(run, address=cfg.address, num_cpus=cfg.num_cpus, workers=workers)
                if cfg.executor == "ray" else LocalExecutor(run, workers))
    try:
        for stage in run.stages:
            sdir = run.stage_dir(stage.index)
            sdir.mkdir(parents=True, exist_ok=True)
            todo = [s for s in range(run.num_shards) if not (sdir / f"shard_{s:05d}.stats.json").exists()]
            ts = time.perf_counter()
            executor.run_stage(stage.index, todo)
            names = [st.name for st in stage.steps] + ([stage.barrier.name + " (collect)"] if stage.barrier else [])
            log(f"stage {stage.index}: {len(todo)} shard(s) run, {run.num_shards - len(todo)} reused "
                f"({time.perf_counter() - ts:.1f}s) [{', '.join(names)}]")
            if stage.barrier is not None:
                pdir = run.plan_dir(stage.index)
                done = pdir / "plan.json"
                if not done.exists():
                    pdir.mkdir(parents=True, exist_ok=True)
                    sigs = [sig_path(sdir, s, stage.barrier, reading=True) for s in range(run.num_shards)]
                    summary = stage.barrier.plan(sigs, pdir)
                    atomic_write_json(done, summary)
                plans[stage.barrier.name] = json.loads(done.read_text())
                log(f"plan {stage.barrier.name}: {plans[stage.barrier.name]}")
    finally:
        executor.close()

    last = run.stage_dir(run.stages[-1].index)
    stats = _merge_stats([run.stage_dir(st.index) / f"shard_{s:05d}.stats.json"
                          for st in run.stages for s in range(run.num_shards)])
    # Stage reads after the first only re-read what the previous stage wrote: not worth a row.
    stats = [s for s in stats if not s.name.startswith("read_stage_")]
    outputs: dict[str, Any] = {}
    for o in cfg.outputs:
        finals = [last / f"shard_{s:05d}.jsonl.zst" for s in range(run.num_shards)]
        docs = chain.from_iterable(_read_jsonl(p) for p in finals)
        ts = time.perf_counter()
        outputs[o.name] = o.write(docs, out_dir=out, workers=workers)
        outputs[o.name]["seconds"] = round(time.perf_counter() - ts, 2)
        log(f"output {o.name}: {outputs[o.name].get('docs', 0):,} docs -> {outputs[o.name]['path']}")
    report = RunReport(steps=stats, plans=plans, outputs=outputs, classifiers=classifiers,
                       seconds=time.perf_counter() - t0, output_dir=out)
    if report.skipped_corrupt:
        first = report.corrupt_examples[0]
        log(f"warning: skipped {report.skipped_corrupt} corrupt record(s) or truncated file(s) in the inputs, "
            f"first {first['file']}, {first['where']}: {first['problem']}; all are listed in report.json "
            "(set strict = true in the [[input]] to stop at the first instead)")
    atomic_write_json(out / "report.json", report.to_dict())
    from herd.data.report import write_html_report

    write_html_report(report.to_dict(), out / "report.html")
    return report
