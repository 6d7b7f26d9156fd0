"""Labelled examples for a quality or domain classifier, named the short way a person types them.

`herd data train-classifier --example LABEL=SOURCE` accepts a built-in corpus name or a path; this
module turns those into the `examples` of a `herd.data.pipeline.TrainSpec`, the same reader
entries a pipeline TOML spells out in full. The reader is chosen by the path's suffix, because
a one-line command has no room for a reader table; anything the suffix does not settle is an
error that lists what is understood, rather than a guess.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

BUILTIN_SOURCES: dict[str, dict[str, Any]] = {
    "wiki-en": {"type": "wikipedia", "languages": ["en"]}, "wiki-fr": {"type": "wikipedia", "languages": ["fr"]},
    "wiki-es": {"type": "wikipedia", "languages": ["es"]}, "python-stdlib": {"type": "python_stdlib"},
    "austen": {"type": "austen"},
}

_JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json", ".json.gz", ".json.zst")


def reader_for(source: str) -> dict[str, Any]:
    """A pipeline reader entry for a built-in source name, a folder of HTML pages, or a file whose
    suffix names its format."""
    if source in BUILTIN_SOURCES:
        return dict(BUILTIN_SOURCES[source])
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"--example: {source} is neither a file nor a folder nor one of the built-in sources "
                                f"({', '.join(BUILTIN_SOURCES)})")
    name = path.name.lower()
    if path.is_dir():
        return {"type": "folder", "root": str(path), "glob": ["**/*.html", "**/*.htm"]}
    if name.endswith((".warc", ".warc.gz")):
        return {"type": "warc", "paths": [str(path)]}
    if name.endswith(".parquet"):
        return {"type": "parquet", "paths": [str(path)]}
    if name.endswith(_JSONL_SUFFIXES):
        return {"type": "jsonl", "paths": [str(path)]}
    raise ValueError(f"--example: cannot tell how to read {source}; use .jsonl[.gz|.zst] with a \"text\" field, "
                     ".parquet, .warc[.gz] or a folder of HTML pages")


def labelled_examples(items: Sequence[str], *, limit: int | None = None) -> list[dict[str, Any]]:
    """`TrainSpec.examples` from LABEL=SOURCE strings; at least two distinct labels are needed."""
    examples = []
    for item in items:
        label, sep, source = item.partition("=")
        if not sep or not label or not source:
            raise ValueError(f"--example takes LABEL=SOURCE (e.g. good=refs.jsonl), got {item!r}")
        examples.append({"label": label, "input": reader_for(source), "limit": limit})
    if len({e["label"] for e in examples}) < 2:
        raise ValueError("a classifier needs at least two labels: give --example for each (e.g. hq=... and web=...)")
    return examples


def training_options(kind: str, *, epochs: int) -> dict[str, Any]:
    """`TrainSpec.options` for a number of epochs: fastText spells it `epoch`, herd's transformer `epochs`."""
    return {"epoch": epochs} if kind == "fasttext" else {"epochs": epochs}
