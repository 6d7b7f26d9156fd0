"""A pipeline file's configuration: typed dataclasses read by the one config loader (`herd.config`).

The file is a `PipelineFile`: the `[pipeline]` section, the `[[input]]`, `[[step]]` and `[[output]]`
lists, whose entries are the reader, step and writer dataclasses their `type` picks from the
registries, and `[[train]]` classifier specs. Every key is checked against its field's type by the
same builder as `herd train`'s config, so an unknown key, a missing one or a wrongly typed value
is an error naming its full path (`step[3].min_words`) and the valid keys; `--section.key VALUE`
overrides and `--print-config` work as for training. The file format is described in
`herd.data.pipeline`.

Trade-off: the file (`PipelineFile`, what was written, readable back as TOML) is kept apart from
the run's resolved settings (`PipelineConfig`: an expanded output path, classifier paths made
relative to it, the raw dict that is the run's identity on resume). The few cross-key rules (Ray
options, unique names) stay here as code rather than in a schema library.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from herd.config import apply_overrides, build, build_tagged, read_toml, tagged_entries
from herd.data.executors import EXECUTORS
from herd.data.steps import OUTPUTS, READERS, STEPS, Output, Reader, Step


def _where_rule(cls: type) -> dict[str, str]:
    """Keys a step class has but does not take: `where` on a step that must see every document."""
    if getattr(cls, "supports_where", True):
        return {}
    return {"where": "`where` applies to filters, modifiers, classifiers, language ID and line dedup only; "
                     f"{cls.type!r} is a document-level dedup, extraction or mix step, which sees every document"}


def build_entry(registry: dict[str, type], entry: dict[str, Any], *, what: str, key: str | None = None) -> Any:
    """One `[[input]]`/`[[step]]`/`[[output]]`-style entry: the class its `type` names, built by the
    typed loader (`key` is its path in messages, default `what`)."""
    return build_tagged(registry, entry, key or what, what=what, exclude=_where_rule)


@dataclass
class PipelineSection:
    """`[pipeline]`: where the run writes and how its tasks are scheduled."""

    output_dir: str = field(metadata={"help": "where the run writes everything, e.g. output_dir = \"runs/data\""})
    workers: int = 1                 # processes (local) or concurrent tasks (Ray)
    shards: int | None = None        # input shards; default 4 x workers, at most one per input file
    name: str = ""
    executor: str = "local"          # or "ray"
    address: str | None = None       # ray: ray.init(address=...); unset starts a local cluster
    num_cpus: int | None = None      # ray: CPUs of the local cluster (default: workers)

    def validate(self) -> None:
        if self.workers < 1:
            raise ValueError(f"[pipeline] workers must be >= 1, got {self.workers}")
        if self.executor not in EXECUTORS:
            raise ValueError(f"[pipeline] executor must be one of {', '.join(EXECUTORS)}, not {self.executor!r}")
        if self.executor != "ray" and (self.address is not None or self.num_cpus is not None):
            raise ValueError("[pipeline] address and num_cpus are Ray options: set executor = \"ray\" or remove them")
        if self.address is not None and self.num_cpus is not None:
            raise ValueError("[pipeline] num_cpus sizes the local Ray cluster started when no address is given; "
                             "an existing cluster at `address` has its own CPUs: remove one of the two")
        if self.num_cpus is not None and self.num_cpus < 1:
            raise ValueError(f"[pipeline] num_cpus must be >= 1, got {self.num_cpus}")


@dataclass
class TrainSpec:
    """A classifier trained from labelled sources before the pipeline runs (skipped if it exists)."""

    model: str
    # {label = "code", input = {type = "python_stdlib"}, limit = 500}: the input is a reader entry
    examples: list[dict[str, Any]]
    kind: Literal["fasttext", "transformer"] = "fasttext"
    chunk_chars: int = 2000         # long documents are cut into pieces of about this size
    options: dict[str, Any] = field(default_factory=dict)  # passed to train_fasttext / train_transformer


def example_source(example: Any, key: str) -> tuple[str, int | None, Reader]:
    """A `[[train]]` example's (label, limit, reader), checked; `key` is its path in messages."""
    if not isinstance(example, dict):
        raise ValueError(f"{key}: expected a table {{label = ..., input = {{type = ...}}, limit = N}}, "
                         f"got {example!r}")
    ex = dict(example)
    label, limit, inp = ex.pop("label", None), ex.pop("limit", None), ex.pop("input", None)
    if label is None or inp is None or ex:
        raise ValueError(f"{key}: [[train]] examples entries are {{label = ..., input = {{type = ...}}, limit = N}}"
                         + (f"; unknown keys {sorted(ex)}" if ex else ""))
    if not isinstance(label, str):
        raise ValueError(f"{key}.label: expected a string, got {label!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"{key}.limit: expected a positive integer, got {limit!r}")
    return label, limit, build_entry(READERS, inp, what="[[train]] input", key=f"{key}.input")


@dataclass
class PipelineFile:
    """Everything a pipeline TOML file may say, section by section (`herd data run --help` lists it)."""

    pipeline: PipelineSection
    input: list[Reader] = tagged_entries(READERS, what="[[input]]")
    step: list[Step] = tagged_entries(STEPS, what="[[step]]", exclude=_where_rule)
    output: list[Output] = tagged_entries(OUTPUTS, what="[[output]]")
    train: list[TrainSpec] = field(default_factory=list)

    def validate(self) -> PipelineFile:
        """Cross-key rules; raises ValueError naming the key. Returns self."""
        if not self.input:
            raise ValueError("a pipeline needs at least one [[input]]")
        if not self.output:
            raise ValueError("a pipeline needs at least one [[output]] (jsonl, parquet or shards)")
        for kind, items in (("step", self.step), ("input", self.input), ("output", self.output)):
            names = [x.name for x in items]
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise ValueError(f"[[{kind}]] names must be unique; give `name = ...` to the repeated {dup}")
        for i, spec in enumerate(self.train):
            for j, example in enumerate(spec.examples):
                example_source(example, f"train.{i}.examples[{j}]")
        self.pipeline.validate()
        return self


@dataclass
class PipelineConfig:
    """What a run needs, resolved from a `PipelineFile` (tests build one directly from objects)."""

    inputs: list[Reader]
    steps: list[Step]
    outputs: list[Output]
    output_dir: Path
    workers: int = 1
    shards: int | None = None
    train: list[TrainSpec] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)  # the file as read (+ overrides): the run's identity
    executor: str = "local"          # or "ray"
    address: str | None = None       # ray: ray.init(address=...); None starts a local cluster
    num_cpus: int | None = None      # ray: CPUs of the local cluster (default: workers)
    file: PipelineFile | None = None  # the typed file it came from (what --print-config prints)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PipelineConfig:
        d = dict(d)
        file = build(PipelineFile, d).validate()
        p = file.pipeline
        out_dir = Path(p.output_dir).expanduser()
        # A classify step naming a model that a [[train]] block writes reads it where training put
        # it. The file's own step keeps the path as written, so --print-config reads back equal.
        trained = {t.model for t in file.train}
        steps = []
        for step in file.step:
            model = getattr(step, "model", None)
            if isinstance(model, str) and model in trained and not Path(model).expanduser().is_absolute():
                step = dataclasses.replace(step, model=str(out_dir / model))
            steps.append(step)
        return cls(inputs=file.input, steps=steps, outputs=file.output, output_dir=out_dir, workers=p.workers,
                   shards=p.shards, train=file.train, raw=d, executor=p.executor, address=p.address,
                   num_cpus=p.num_cpus, file=file)

    @classmethod
    def from_toml(cls, path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
        """Read a pipeline file, apply `--section.key VALUE` overrides (see `load_pipeline`), check it."""
        return load_pipeline(path, overrides)


def load_pipeline(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """A pipeline file with `--section.key VALUE` overrides applied: `--pipeline.workers 4`, or a list
    entry's key by its name or index, `--step.gopher_quality.min_words 40`, `--input.0.limit 100`.
    Entries cannot be added, removed or retyped from the command line. The overridden values become
    part of the run's identity (a resumed run must be given the same ones)."""
    data = read_toml(path, what="pipeline file", hint="see configs/data/ for examples")
    return PipelineConfig.from_dict(apply_overrides(PipelineFile, data, overrides))
