"""A pipeline file's configuration: the `[pipeline]` keys, `[[input]]`/`[[step]]`/`[[output]]`
entries built from their registries, and `[[train]]` classifier specs, each checked by hand.

Trade-off: the entries are plain dataclasses built from TOML tables, so an unknown or misspelt key
is an error naming the valid ones (ARCHITECTURE.md principle 5), at the price of writing the few
cross-key rules (Ray options, unique names) out here rather than in a schema library.
The file format itself is described in `herd.data.pipeline`.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from herd.data.executors import EXECUTORS
from herd.data.steps import OUTPUTS, READERS, STEPS, Output, Reader, Step


def build_entry(registry: dict[str, type], entry: dict[str, Any], *, what: str) -> Any:
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
        inputs = [build_entry(READERS, e, what="[[input]]") for e in d.get("input", [])]
        steps = [build_entry(STEPS, e, what="[[step]]") for e in d.get("step", [])]
        outputs = [build_entry(OUTPUTS, e, what="[[output]]") for e in d.get("output", [])]
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
