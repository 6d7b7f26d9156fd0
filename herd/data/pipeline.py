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

Executors only decide where a task (stage, shard) runs; the steps never know. `local` (the
default) forks `workers` processes on this machine, which inherit the run, so nothing is pickled.
`ray` submits the same tasks as Ray remote tasks (one CPU each) to the cluster at `address`, or
to a local Ray cluster of `num_cpus` CPUs (default: `workers`) started for the run and stopped
after it; the run (config, steps, shard layout) is pickled once into Ray's object store. Tasks
read and write the same files either way, so the outputs are byte-identical, and resuming works
the same (a shard whose stats file exists is skipped, whichever executor wrote it). With a
remote cluster, `output_dir` and the inputs must be on storage that every node sees at the same
path (a shared file system); Ray does not move these files.

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

import dataclasses
import json
import logging
import os
import platform
import shutil
import sys
import time
import tomllib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from itertools import chain
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from herd.data.document import Document
from herd.data.steps import OUTPUTS, READERS, STEPS, GlobalStep, Output, Reader, Step, StepStats
from herd.data.steps.damaged import Corrupt
from herd.data.steps.readers import open_text
from herd.data.steps.writers import write_jsonl

FORMAT = "herd-pipeline-v1"
_log = logging.getLogger("herd.data")


# ---- configuration -------------------------------------------------------------------------------


def _build(registry: dict[str, type], entry: dict[str, Any], *, what: str) -> Any:
    entry = dict(entry)
    kind = entry.pop("type", None)
    if kind not in registry:
        raise ValueError(f"{what}: unknown or missing type {kind!r}; choose one of {', '.join(sorted(registry))}")
    cls = registry[kind]
    if "where" in entry and not getattr(cls, "supports_where", True):
        raise ValueError(f"{what} {kind!r}: `where` applies to filters, modifiers, classifiers, language ID and "
                         "line dedup only; a document-level dedup, extraction or mix step sees every document")
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    if not getattr(cls, "supports_where", True):
        names.discard("where")
    unknown = sorted(set(entry) - names)
    if unknown:
        raise ValueError(f"{what} {kind!r}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(names))}")
    entry.setdefault("name", kind)
    return cls(**entry)


@dataclass
class TrainSpec:
    """A classifier trained from labelled sources before the pipeline runs (skipped if it exists)."""

    model: str
    examples: list[dict[str, Any]]
    kind: str = "fasttext"          # or "transformer"
    chunk_chars: int = 2000         # long documents are cut into pieces of about this size
    options: dict[str, Any] = field(default_factory=dict)  # passed to train_fasttext / train_transformer


@dataclass
class PipelineConfig:
    inputs: list[Reader]
    steps: list[Step]
    outputs: list[Output]
    output_dir: Path
    workers: int = 1
    shards: int | None = None
    train: list[TrainSpec] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)
    executor: str = "local"          # or "ray"
    address: str | None = None       # ray: ray.init(address=...); None starts a local cluster
    num_cpus: int | None = None      # ray: CPUs of the local cluster (default: workers)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PipelineConfig:
        d = dict(d)
        top = {"pipeline", "input", "step", "output", "train"}
        if set(d) - top:
            raise ValueError(f"pipeline file: unknown section(s) {sorted(set(d) - top)}; valid: {sorted(top)}")
        p = dict(d.get("pipeline", {}))
        known = {"output_dir", "workers", "shards", "name", "executor", "address", "num_cpus"}
        if set(p) - known:
            raise ValueError(f"[pipeline]: unknown key(s) {sorted(set(p) - known)}; valid: {sorted(known)}")
        if "output_dir" not in p:
            raise ValueError("[pipeline] needs output_dir = \"...\" (where the run writes everything)")
        inputs = [_build(READERS, e, what="[[input]]") for e in d.get("input", [])]
        steps = [_build(STEPS, e, what="[[step]]") for e in d.get("step", [])]
        outputs = [_build(OUTPUTS, e, what="[[output]]") for e in d.get("output", [])]
        if not inputs:
            raise ValueError("a pipeline needs at least one [[input]]")
        if not outputs:
            raise ValueError("a pipeline needs at least one [[output]] (jsonl, parquet or shards)")
        for kind, items in (("step", steps), ("input", inputs), ("output", outputs)):
            names = [x.name for x in items]
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise ValueError(f"[[{kind}]] names must be unique; give `name = ...` to the repeated {dup}")
        train = []
        for t in d.get("train", []):
            try:
                train.append(TrainSpec(**t))
            except TypeError as e:
                raise ValueError(f"[[train]]: {e}; keys: model, examples, kind, chunk_chars, options") from None
        # A classify step naming a model that a [[train]] block writes reads it where training put it.
        trained = {t.model for t in train}
        out_dir = Path(p["output_dir"]).expanduser()
        for step in steps:
            model = getattr(step, "model", None)
            if isinstance(model, str) and model in trained and not Path(model).expanduser().is_absolute():
                step.model = str(out_dir / model)
        workers = int(p.get("workers", 1))
        if workers < 1:
            raise ValueError(f"[pipeline] workers must be >= 1, got {workers}")
        executor = p.get("executor", "local")
        if executor not in EXECUTORS:
            raise ValueError(f"[pipeline] executor must be one of {', '.join(EXECUTORS)}, not {executor!r}")
        if executor != "ray" and ("address" in p or "num_cpus" in p):
            raise ValueError("[pipeline] address and num_cpus are Ray options: set executor = \"ray\" or remove them")
        if "address" in p and "num_cpus" in p:
            raise ValueError("[pipeline] num_cpus sizes the local Ray cluster started when no address is given; "
                             "an existing cluster at `address` has its own CPUs: remove one of the two")
        if p.get("num_cpus") is not None and int(p["num_cpus"]) < 1:
            raise ValueError(f"[pipeline] num_cpus must be >= 1, got {p['num_cpus']}")
        return cls(inputs=inputs, steps=steps, outputs=outputs, output_dir=Path(p["output_dir"]).expanduser(),
                   workers=workers, shards=p.get("shards"), train=train, raw=d, executor=executor,
                   address=p.get("address"), num_cpus=p.get("num_cpus"))

    @classmethod
    def from_toml(cls, path: str | Path) -> PipelineConfig:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"pipeline file {path} not found")
        try:
            d = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path}: not valid TOML: {e}") from None
        return cls.from_dict(d)


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


def _atomic_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, ensure_ascii=False))
    os.replace(tmp, path)


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
            docs = stage.barrier.collect(docs, out_dir / f"sig_{shard:05d}.npz")
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
        _atomic_json(out_dir / f"shard_{shard:05d}.stats.json", [s.to_dict() for s in stats])

    @staticmethod
    def _count_read(docs: Iterable[Document], st: StepStats) -> Iterator[Document]:
        for doc in docs:
            st.docs_in += 1
            st.docs_out += 1
            st.chars_out += len(doc.text)
            yield doc


# The run being executed, inherited by forked workers so that steps (which may hold models, compiled
# patterns or test callables) never need pickling; a task is just (stage, shard).
_CURRENT: _Run | None = None


def _worker_init() -> None:
    # Parallelism comes from the worker processes: a torch model inside one (the tiny classifier)
    # must not also spawn intra-op threads, or N workers x N threads thrash the cores.
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)
    else:
        os.environ["OMP_NUM_THREADS"] = "1"


def _task(k: int, shard: int) -> None:
    assert _CURRENT is not None
    _CURRENT.run_task(k, shard)


class _LocalExecutor:
    """Forked processes on this machine (or this process when workers == 1)."""

    def __init__(self, run: _Run, workers: int) -> None:
        global _CURRENT
        _CURRENT = run
        self.run = run
        self.pool = (ProcessPoolExecutor(workers, mp_context=get_context("fork"), initializer=_worker_init)
                     if workers > 1 else None)

    def run_stage(self, k: int, shards: list[int]) -> None:
        if self.pool is None:
            for s in shards:
                self.run.run_task(k, s)
        else:
            for f in [self.pool.submit(_task, k, s) for s in shards]:
                f.result()

    def close(self) -> None:
        global _CURRENT
        if self.pool is not None:
            self.pool.shutdown()
        _CURRENT = None


def _ray_task(run: _Run, k: int, shard: int, cwd: str) -> None:
    # Relative paths in the pipeline file (inputs, output_dir, models) mean the driver's cwd.
    if not os.path.isdir(cwd):
        raise FileNotFoundError(f"Ray worker on {platform.node()}: the driver's working directory {cwd} does not "
                                "exist here; run from (and keep the pipeline's files on) a file system that every "
                                "node mounts at the same path")
    os.chdir(cwd)
    _worker_init()
    run.run_task(k, shard)


class _RayExecutor:
    """Ray remote tasks, one CPU each; the run is pickled once into the object store."""

    def __init__(self, run: _Run, *, address: str | None, num_cpus: int | None, workers: int) -> None:
        try:
            import ray
        except ImportError:
            raise ImportError("[pipeline] executor = \"ray\" needs Ray: pip install 'herd[ray]'") from None
        self.ray = ray
        # A connection opened here (to a local cluster it starts, or to `address`) is closed at the end,
        # which stops only that local cluster; a Ray session the caller already opened is used as it is.
        self.owned = not ray.is_initialized()
        if self.owned:
            if address is None:
                ray.init(num_cpus=num_cpus or workers, include_dashboard=False, log_to_driver=True)
            else:
                ray.init(address=address)
        self.ref = ray.put(run)
        self.remote = ray.remote(num_cpus=1, max_retries=0)(_ray_task)

    def run_stage(self, k: int, shards: list[int]) -> None:
        cwd = os.getcwd()
        refs = [self.remote.remote(self.ref, k, s, cwd) for s in shards]
        try:
            self.ray.get(refs)
        except self.ray.exceptions.RayTaskError as e:
            # Re-raise what the step raised (as the local executor does), not Ray's wrapper.
            if isinstance(getattr(e, "cause", None), BaseException):
                raise e.cause from None
            raise

    def close(self) -> None:
        if self.owned:
            self.ray.shutdown()


EXECUTORS = ("local", "ray")


# ---- training ------------------------------------------------------------------------------------


def _examples(spec: TrainSpec) -> list[tuple[str, str]]:
    from herd.data.steps.extract import Extract

    rows: list[tuple[str, str]] = []
    for ex in spec.examples:
        ex = dict(ex)
        label, limit, inp = ex.pop("label", None), ex.pop("limit", None), ex.pop("input", None)
        if label is None or inp is None or ex:
            raise ValueError("[[train]] examples entries are {label = ..., input = {type = ...}, limit = N}"
                             + (f"; unknown keys {sorted(ex)}" if ex else ""))
        reader = _build(READERS, inp, what="[[train]] input")
        docs = chain.from_iterable(reader.read(u) for u in reader.units())
        docs = Extract(timeout_s=0)(docs, StepStats(name="extract", type="extract"))
        n = 0
        for doc in docs:
            text = doc.text
            for i in range(0, max(len(text), 1), spec.chunk_chars):
                piece = text[i:i + spec.chunk_chars]
                if len(piece.strip()) >= min(200, spec.chunk_chars // 4):
                    rows.append((piece, label))
                    n += 1
                if limit is not None and n >= limit:
                    break
            if limit is not None and n >= limit:
                break
        if n == 0:
            raise ValueError(f"[[train]] {spec.model}: the {label!r} input produced no examples")
    return rows


def train_classifier(spec: TrainSpec, path: Path, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train one classifier from its labelled sources into `path` (atomically, with `path.json`
    beside it: held-out accuracy, labels, examples per label, seconds) and return that info."""
    from herd.data.steps import classifiers

    if spec.kind not in ("fasttext", "transformer"):
        raise ValueError(f"classifier kind must be 'fasttext' or 'transformer', not {spec.kind!r}")
    t0 = time.perf_counter()
    rows = _examples(spec)
    fn = classifiers.train_fasttext if spec.kind == "fasttext" else classifiers.train_transformer
    path.parent.mkdir(parents=True, exist_ok=True)
    info = fn(rows, path, **spec.options)
    info["seconds"] = round(time.perf_counter() - t0, 1)
    info["examples_per_label"] = dict(Counter(lab for _, lab in rows))
    _atomic_json(path.with_name(path.name + ".json"), info)
    log(f"trained {spec.kind} classifier {path}: {info}")
    return info


def train_classifiers(cfg: PipelineConfig, *, log: Callable[[str], None]) -> dict[str, Any]:
    """The pipeline file's [[train]] classifiers; one that exists already (model and info) is kept."""
    results = {}
    for spec in cfg.train:
        path = Path(spec.model).expanduser()
        path = path if path.is_absolute() else cfg.output_dir / path
        info_path = path.with_name(path.name + ".json")
        if path.is_file() and info_path.is_file():
            results[str(path)] = json.loads(info_path.read_text())
            continue
        results[str(path)] = train_classifier(spec, path, log=log)
    return results


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
    _atomic_json(config_path, cfg.raw)
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
        _atomic_json(layout_path, {"units": run.units, "num_shards": run.num_shards})
    log(f"{len(run.units)} input files in {run.num_shards} shards, {len(run.stages)} stage(s), "
        f"{f'{workers} worker(s)' if cfg.executor == 'local' else 'Ray executor'}")

    plans: dict[str, Any] = {}
    executor = (_RayExecutor(run, address=cfg.address, num_cpus=cfg.num_cpus, workers=workers)
                if cfg.executor == "ray" else _LocalExecutor(run, workers))
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
                    sigs = [sdir / f"sig_{s:05d}.npz" for s in range(run.num_shards)]
                    summary = stage.barrier.plan(sigs, pdir)
                    _atomic_json(done, summary)
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
    _atomic_json(out / "report.json", report.to_dict())
    from herd.data.report import write_html_report

    write_html_report(report.to_dict(), out / "report.html")
    return report
