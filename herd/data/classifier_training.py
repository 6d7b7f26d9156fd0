"""Classifiers a pipeline file's `[[train]]` blocks ask for, trained from labelled readers before
the run: each source is read, extracted and cut into pieces of about `chunk_chars` characters.

Trade-off: training happens once, in the parent process, and a model that exists already (with
its `.json` info beside it) is kept, so a resumed run never retrains; delete the file to retrain.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from itertools import chain
from pathlib import Path
from typing import Any

from herd.data.pipeline_config import PipelineConfig, TrainSpec, example_source
from herd.data.steps import StepStats
from herd.io import atomic_write_json


def _examples(spec: TrainSpec) -> list[tuple[str, str]]:
    from herd.data.steps.extract import Extract

    rows: list[tuple[str, str]] = []
    for j, ex in enumerate(spec.examples):
        label, limit, reader = example_source(ex, f"[[train]] {spec.model} examples[{j}]")
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
    atomic_write_json(path.with_name(path.name + ".json"), info)
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
