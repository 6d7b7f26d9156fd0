"""The speedrun's data stage: real web pages and the demo's text sources through the curation
pipeline (configs/data/speedrun.toml), then handed to the tokenizer as `Doc` records per source.

Trade-off: the speedrun reads the pipeline's per-source JSONL outputs back rather than
streaming documents straight out of the last stage, so a second run costs one check of the
finished run's files (no reader, step or output runs again), and the tokenizer and the shards
can iterate over a source as many times as they like. The price is one compressed copy of the
curated text (about 4 MB) under the output directory.

`quick = True` runs the same steps on a few hundred documents per source (tests).
"""

from __future__ import annotations

import json
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from herd.data.corpora import Doc
from herd.data.pipeline import PipelineConfig, run_pipeline
from herd.data.steps import StepStats
from herd.data.steps.readers import open_text

PIPELINE = Path(__file__).resolve().parents[2] / "configs" / "data" / "speedrun.toml"
SOURCES = ("web", "wiki", "austen", "code")
# What `quick` changes, per input name: a few hundred documents each, the same steps.
QUICK: dict[str, dict[str, Any]] = {
    "web": {"glob": ["en-US/*.html", "fr-FR/*.html"], "warc_parts": 2},
    "wiki": {"limit": 300},
    "austen": {"limit": 40},
    "code": {"limit": 20},
}


@dataclass
class Curated:
    """What `curate` returns: per source, a function that iterates its curated documents afresh."""

    sources: dict[str, Callable[[], Iterator[Doc]]]
    steps: list[StepStats]          # in pipeline order; "read" first
    read: dict[str, int]            # documents read per source
    kept: dict[str, int]            # documents per source after the last step
    output_dir: Path
    seconds: float                  # of the pipeline run (of the original run when reused)
    reused: bool = False
    plans: dict[str, Any] = field(default_factory=dict)

    def table(self) -> str:
        """What each step removed, one row per step, then documents per source."""
        lines = [f"{'step':<18}{'in':>8}{'removed':>9}{'kept':>8}{'changed':>9}  why removed"]
        for s in self.steps:
            if s.type == "read":
                continue
            reasons = [f"{r} {n:,}" for r, n in s.dropped.most_common()]
            if s.counters.get("lines_removed"):  # line dedup changes documents rather than dropping them
                reasons.append(f"{s.counters['lines_removed']:,} repeated lines cut from {s.modified:,} documents")
            why = ", ".join(reasons) or "-"
            lines.append(f"{s.name:<18}{s.docs_in:>8,}{s.num_dropped:>9,}{s.docs_out:>8,}{s.modified:>9,}  {why}")
        lines.append("per source: " + ", ".join(f"{n} {self.read.get(n, 0):,} -> {self.kept.get(n, 0):,}"
                                                for n in self.sources))
        return "\n".join(lines)


def speedrun_config(out_dir: Path, *, quick: bool = False, pipeline: Path = PIPELINE) -> dict[str, Any]:
    """The pipeline file as a dict, its outputs (and the web input's WARC files) under `out_dir`."""
    if not pipeline.is_file():
        raise FileNotFoundError(f"{pipeline} is missing; the speedrun runs from a source checkout (pip install -e .)")
    d = tomllib.loads(pipeline.read_text(encoding="utf-8"))
    run_dir = (out_dir / ("data-quick" if quick else "data")).resolve()
    d["pipeline"]["output_dir"] = str(run_dir)
    for inp in d["input"]:
        if inp.get("warc"):
            inp["warc_dir"] = str(run_dir / "warc")
        if quick:
            inp.update(QUICK.get(inp["name"], {}))
    return d


def _docs(path: Path, source: str) -> Iterator[Doc]:
    with open_text(path) as f:
        for line in f:
            d = json.loads(line)
            meta = d.get("metadata") or {}
            # A page's URL is its stable name (WARC record ids are random per crawl); the split into
            # training and validation hashes this id.
            doc_id = d["url"] if source == "web" and d.get("url") else d["id"]
            yield Doc(id=doc_id, text=d["text"], source=source, topic=meta.get("topic") or "")


def _finished(cfg: PipelineConfig) -> dict[str, Any] | None:
    """The report of a complete run of exactly this configuration, or None."""
    out = cfg.output_dir
    report, config = out / "report.json", out / "pipeline.json"
    if not (report.is_file() and config.is_file()) or json.loads(config.read_text()) != cfg.raw:
        return None
    rep = json.loads(report.read_text())
    if not all(Path(o["path"]).is_file() for o in rep["outputs"].values()):
        return None
    return rep


def run_curation(config: dict[str, Any], *, log: Callable[[str], None] = print) -> Curated:
    """Runs (or reuses) a pipeline whose outputs are one JSONL file per source, named as the source."""
    cfg = PipelineConfig.from_dict(config)
    names = [o.name for o in cfg.outputs if o.type == "jsonl"]
    missing = [i.name for i in cfg.inputs if i.name not in names]
    if missing:
        raise ValueError(f"every input needs a jsonl output of the same name; none for {missing}")
    rep = _finished(cfg)
    reused = rep is not None
    if rep is None:
        # The output directory is this stage's own: a run of an edited pipeline file starts over
        # (run_pipeline would refuse to resume it) instead of stopping the demo.
        old = cfg.output_dir / "pipeline.json"
        fresh = old.is_file() and json.loads(old.read_text()) != cfg.raw
        if fresh:
            log(f"[data] the pipeline changed since the run in {cfg.output_dir}; starting over")
        rep = run_pipeline(cfg, fresh=fresh, log=lambda m: log(f"[data] {m}")).to_dict()
    steps = [StepStats.from_dict(s) for s in rep["steps"]]
    read_counts = steps[0].counters if steps and steps[0].type == "read" else {}
    read = {i.name: int(read_counts.get(f"docs_{i.name}", 0)) for i in cfg.inputs}
    kept = {i.name: int(rep["outputs"][i.name].get("docs", 0)) for i in cfg.inputs}
    paths = {i.name: Path(rep["outputs"][i.name]["path"]) for i in cfg.inputs}
    sources = {n: (lambda p=p, n=n: _docs(p, n)) for n, p in paths.items()}
    return Curated(sources=sources, steps=steps, read=read, kept=kept, output_dir=cfg.output_dir,
                   seconds=float(rep["seconds"]), reused=reused, plans=rep.get("plans", {}))


def curate(out_dir: Path, *, quick: bool = False, log: Callable[[str], None] = print) -> Curated:
    """Runs configs/data/speedrun.toml into `out_dir/data` (`out_dir/data-quick` when `quick`),
    or reuses a finished run there, and logs what each step removed."""
    t0 = time.perf_counter()
    cur = run_curation(speedrun_config(Path(out_dir), quick=quick), log=log)
    log(cur.table())
    how = f"reused {cur.output_dir}" if cur.reused else f"{cur.output_dir}"
    log(f"curation: {time.perf_counter() - t0:.1f} s ({how})")
    return cur
