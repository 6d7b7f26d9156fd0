"""Evaluation results as JSON plus a readable table, and atomic file writes for everything eval saves.

One report shape serves every evaluation (multiple choice, needle, lm-eval, perplexity): a list of
tasks, each with flat `metrics` (name -> number) and free-form `config` (how it was run). Flat
metrics make the table generic and make two reports easy to diff; anything richer (per-example
predictions, a needle grid) goes in `config`/`extra` as plain JSON rather than new fields, so the
file format stays one version.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from herd.io import atomic_write_bytes, atomic_write_text

REPORT_FORMAT = "herd-eval-v1"


def save_figure(fig: Any, path: str | os.PathLike[str], *, dpi: int = 120) -> Path:
    """Render a matplotlib `Figure` to PNG in memory, then write it atomically.

    Figures are built as `matplotlib.figure.Figure()` rather than through pyplot, so nothing here
    touches the global backend or pyplot's figure registry (safe headless and in threads).
    """
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return atomic_write_bytes(path, buf.getvalue())


def _herd_version() -> str:
    try:
        return metadata.version("herd")
    except metadata.PackageNotFoundError:
        return "unknown"


@dataclass
class TaskResult:
    task: str
    metrics: dict[str, float]
    num_examples: int
    config: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalReport:
    model: str
    tasks: list[TaskResult]
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    herd_version: str = field(default_factory=_herd_version)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"format": REPORT_FORMAT, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalReport:
        if data.get("format") != REPORT_FORMAT:
            raise ValueError(f"not a herd eval report (format {data.get('format')!r}, expected {REPORT_FORMAT!r})")
        fields = {k: v for k, v in data.items() if k != "format"}
        fields["tasks"] = [TaskResult(**t) for t in fields["tasks"]]
        return cls(**fields)

    def save(self, path: str | os.PathLike[str]) -> Path:
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> EvalReport:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no eval report at {path}")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(data)

    def table(self) -> str:
        rows = [(t.task, name, _fmt(value), str(t.num_examples)) for t in self.tasks for name, value in t.metrics.items()]
        return format_table(("task", "metric", "value", "n"), rows)


def _fmt(value: float) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if math.isnan(value) or math.isinf(value):
        return str(value)
    return f"{value:.4f}"


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table: first column left-aligned, the others right-aligned (numbers line up)."""
    cols = list(zip(header, *rows)) if rows else [(h,) for h in header]
    widths = [max(len(str(c)) for c in col) for col in cols]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(str(c).ljust(w) if j == 0 else str(c).rjust(w) for j, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *(line(r) for r in rows)])
