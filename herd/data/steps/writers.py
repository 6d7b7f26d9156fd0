"""Writers: the pipeline's outputs. JSONL (plain/gz/zstd) and Parquet keep every field and all
metadata; `shards` tokenises into the token-shard format the trainer's loader reads
(`herd.data.shards`, docs/interfaces.md).

Each output may select documents (`where = {domain = ["code", "math"]}`, `min = {quality =
0.8}`), which is how an annealing set (high-quality code and maths, Llama 3 §3.1.3) is written
beside the main mix from the same pass. Files appear atomically (`herd.io.atomic_path`).
"""

from __future__ import annotations

import gzip
import io
import json
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from herd.data.document import Document
from herd.io import atomic_path


def open_write_text(path: Path) -> io.TextIOBase:
    p = str(path)
    if p.endswith(".gz"):
        return gzip.open(p, "wt", encoding="utf-8", compresslevel=6)
    if p.endswith(".zst") or p.endswith(".zstd"):
        import zstandard

        raw = open(p, "wb")
        return io.TextIOWrapper(zstandard.ZstdCompressor(level=3).stream_writer(raw, closefd=True), encoding="utf-8")
    return open(p, "w", encoding="utf-8")


def write_jsonl(docs: Iterable[Document], path: str | Path) -> int:
    """Writes documents as JSONL (compression from the suffix) atomically; returns the count."""
    n = 0
    with atomic_path(path) as tmp, open_write_text(tmp) as f:
        for doc in docs:
            f.write(json.dumps(doc.to_dict(), ensure_ascii=False))
            f.write("\n")
            n += 1
    return n


@dataclass
class Output:
    type: ClassVar[str] = ""
    path: str = ""
    name: str = ""
    where: dict[str, Any] = field(default_factory=dict)   # metadata key -> value or list of values
    min: dict[str, float] = field(default_factory=dict)   # metadata key -> lowest value kept

    def selects(self, doc: Document) -> bool:
        for key, want in self.where.items():
            v = doc.metadata.get(key)
            if (v not in want) if isinstance(want, list) else (v != want):
                return False
        for key, lo in self.min.items():
            v = doc.metadata.get(key)
            if not isinstance(v, (int, float)) or v < lo:
                return False
        return True

    def write(self, docs: Iterable[Document], *, out_dir: Path, workers: int) -> dict[str, Any]:
        raise NotImplementedError


def _selected(docs: Iterable[Document], out: Output, counts: Counter) -> Iterator[Document]:
    for doc in docs:
        if out.selects(doc):
            counts["docs"] += 1
            counts["chars"] += len(doc.text)
            counts[f"lang_{doc.metadata.get('language')}"] += 1
            counts[f"domain_{doc.metadata.get('domain')}"] += len(doc.text)
            yield doc


def _resolve(path: str, out_dir: Path) -> Path:
    p = Path(os.path.expanduser(path))
    return p if p.is_absolute() else out_dir / p


@dataclass
class JsonlOutput(Output):
    type: ClassVar[str] = "jsonl"

    def write(self, docs: Iterable[Document], *, out_dir: Path, workers: int) -> dict[str, Any]:
        counts: Counter = Counter()
        path = _resolve(self.path or f"{self.name}.jsonl.zst", out_dir)
        write_jsonl(_selected(docs, self, counts), path)
        return {"path": str(path), **counts}


@dataclass
class ParquetOutput(Output):
    type: ClassVar[str] = "parquet"
    row_group_size: int = 1024

    def write(self, docs: Iterable[Document], *, out_dir: Path, workers: int) -> dict[str, Any]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        counts: Counter = Counter()
        path = _resolve(self.path or f"{self.name}.parquet", out_dir)
        # metadata is stored as a JSON string: its keys differ between documents and steps.
        schema = pa.schema([("id", pa.string()), ("text", pa.string()), ("url", pa.string()),
                            ("timestamp", pa.string()), ("metadata", pa.string())])
        with atomic_path(path) as tmp, pq.ParquetWriter(tmp, schema, compression="zstd") as w:
            rows: list[dict[str, Any]] = []
            for doc in _selected(docs, self, counts):
                d = doc.to_dict()
                d["metadata"] = json.dumps(d["metadata"], ensure_ascii=False)
                rows.append(d)
                if len(rows) >= self.row_group_size:
                    w.write_table(pa.Table.from_pylist(rows, schema=schema))
                    rows.clear()
            if rows:
                w.write_table(pa.Table.from_pylist(rows, schema=schema))
        return {"path": str(path), **counts}


@dataclass
class ShardsOutput(Output):
    """Token shards for the trainer, written by `herd.data.shards.tokenize_to_shards`."""

    type: ClassVar[str] = "shards"
    tokenizer: str | None = None   # tiktoken rank file; default: the Llama 3 tokenizer
    bos: bool = True
    eos: bool = True

    def write(self, docs: Iterable[Document], *, out_dir: Path, workers: int) -> dict[str, Any]:
        try:
            from herd.data.shards import tokenize_to_shards
        except ImportError as e:
            raise FileNotFoundError("the shards output needs herd.data.shards (token-shard format); "
                                    f"it could not be imported: {e}") from None
        from herd.tokenizer import llama3_tokenizer_path

        counts: Counter = Counter()
        path = _resolve(self.path or self.name, out_dir)
        info = tokenize_to_shards(_selected(docs, self, counts), path,
                                  tokenizer_path=self.tokenizer or llama3_tokenizer_path(),
                                  num_workers=workers if workers > 1 else 0, bos=self.bos, eos=self.eos,
                                  resume=False, source=self.name)
        return {"path": str(path), **counts, "tokens": int(info.num_tokens)}


OUTPUTS: dict[str, type[Output]] = {o.type: o for o in (JsonlOutput, ParquetOutput, ShardsOutput)}
