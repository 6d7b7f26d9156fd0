"""Step protocol: generators over documents, filters that say why, counters that add up.

Trade-off (datatrove's design, ARCHITECTURE.md principle 7): a step is `step(docs, stats) ->
docs`, a lazy generator, so a whole pipeline fuses into one streaming loop per input shard and
needs no intermediate storage except at the few steps that must see the whole dataset first
(URL/exact/MinHash/line dedup, the corpus KL reference, the mix). Those are `GlobalStep`s: the
executor cuts the pipeline there, runs a `collect` pass over every shard, calls `plan` once, and
`apply`s the plan in the next pass. The cost is one write and read of the surviving documents per
global step; the gain is that every other step stays a ten-line generator that is trivial to test.

Every step owns a `StepStats`: documents in, out, dropped per reason, and text changed. The
executor checks `docs_in == docs_out + dropped (- added)` for every step, so a step cannot lose a
document without saying why.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from herd.data.document import Document


@dataclass
class StepStats:
    name: str
    type: str
    docs_in: int = 0
    docs_out: int = 0
    # Documents a step emits beyond its input (the mix repeats documents to upsample a domain).
    docs_added: int = 0
    dropped: Counter = field(default_factory=Counter)
    # Documents kept whose text the step changed (PII masking, line removal, markdown stripping).
    modified: int = 0
    chars_in: int = 0
    chars_out: int = 0
    # Free-form counts a step wants to report (lines removed per reason, languages seen, ...).
    counters: Counter = field(default_factory=Counter)
    seconds: float = 0.0
    # Readers only: damaged records or file regions skipped (not documents, so outside the balance
    # check), with the first few as {file, where, problem} for the report.
    skipped_corrupt: int = 0
    corrupt_examples: list[dict[str, str]] = field(default_factory=list)

    MAX_EXAMPLES: ClassVar[int] = 20

    def add_corrupt(self, example: dict[str, str]) -> None:
        self.skipped_corrupt += 1
        if len(self.corrupt_examples) < self.MAX_EXAMPLES:
            self.corrupt_examples.append(example)

    def drop(self, reason: str, n: int = 1) -> None:
        self.dropped[reason] += n

    @property
    def num_dropped(self) -> int:
        return sum(self.dropped.values())

    def check(self) -> None:
        assert self.docs_in + self.docs_added == self.docs_out + self.num_dropped, (
            f"step {self.name}: {self.docs_in} in + {self.docs_added} added != {self.docs_out} out + "
            f"{self.num_dropped} dropped; a step lost documents without a reason")

    def merge(self, other: StepStats) -> None:
        assert (self.name, self.type) == (other.name, other.type)
        for f in ("docs_in", "docs_out", "docs_added", "modified", "chars_in", "chars_out", "seconds"):
            setattr(self, f, getattr(self, f) + getattr(other, f))
        self.dropped.update(other.dropped)
        self.counters.update(other.counters)
        self.skipped_corrupt += other.skipped_corrupt
        self.corrupt_examples = (self.corrupt_examples + other.corrupt_examples)[: self.MAX_EXAMPLES]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["dropped"] = dict(self.dropped.most_common())
        d["counters"] = dict(sorted(self.counters.items()))
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StepStats:
        d = dict(d)
        d["dropped"] = Counter(d.get("dropped", {}))
        d["counters"] = Counter(d.get("counters", {}))
        return cls(**d)


def matches(doc: Document, where: dict[str, Any]) -> bool:
    """True when every `metadata[key]` equals the value (or is in the list) that `where` gives."""
    for key, want in where.items():
        v = doc.metadata.get(key)
        if (v not in want) if isinstance(want, list) else (v != want):
            return False
    return True


@dataclass
class Step:
    """A configured transformation of a document stream. Subclasses are dataclasses whose fields
    are the step's TOML keys; `type` is the name used in pipeline files."""

    type: ClassVar[str] = ""
    supports_where: ClassVar[bool] = False
    name: str = ""
    # Filters, modifiers and scorers only: documents whose metadata does not match pass through untouched
    # (e.g. {source = ["handbook"]} keeps web heuristics off code; {language = "en"} for English rules).
    where: dict[str, Any] | None = None

    def __call__(self, docs: Iterable[Document], stats: StepStats) -> Iterator[Document]:
        raise NotImplementedError

    def _bypass(self, doc: Document, stats: StepStats) -> bool:
        if self.where is None or matches(doc, self.where):
            return False
        stats.docs_in += 1
        stats.docs_out += 1
        stats.chars_in += len(doc.text)
        stats.chars_out += len(doc.text)
        stats.counters["not_applied"] += 1
        return True


class Filter(Step):
    """Keeps or drops whole documents: `filter(doc) -> (keep, reason)`."""

    supports_where: ClassVar[bool] = True

    def filter(self, doc: Document) -> tuple[bool, str | None]:
        raise NotImplementedError

    def __call__(self, docs: Iterable[Document], stats: StepStats) -> Iterator[Document]:
        for doc in docs:
            if self._bypass(doc, stats):
                yield doc
                continue
            stats.docs_in += 1
            stats.chars_in += len(doc.text)
            keep, reason = self.filter(doc)
            if keep:
                stats.docs_out += 1
                stats.chars_out += len(doc.text)
                yield doc
            else:
                assert reason, f"{type(self).__name__} dropped a document without a reason"
                stats.drop(reason)


class Modifier(Step):
    """Rewrites text: `modify(doc) -> new text`; an empty result drops the document."""

    supports_where: ClassVar[bool] = True

    def modify(self, doc: Document, stats: StepStats) -> str:
        raise NotImplementedError

    def __call__(self, docs: Iterable[Document], stats: StepStats) -> Iterator[Document]:
        for doc in docs:
            if self._bypass(doc, stats):
                yield doc
                continue
            stats.docs_in += 1
            stats.chars_in += len(doc.text)
            text = self.modify(doc, stats)
            if not text.strip():
                stats.drop(f"empty_after_{self.type}")
                continue
            if text != doc.text:
                stats.modified += 1
                doc.text = text
            stats.docs_out += 1
            stats.chars_out += len(text)
            yield doc


class GlobalStep(Step):
    """A step that must see every shard before deciding (dedup across the dataset, the mix).

    `collect` runs at the end of one pass and writes a small per-shard signature file; `plan`
    runs once over all of them and writes its decision into `plan_dir`; `apply` streams the
    next pass, identifying documents by (shard, position in that shard's stream).
    """

    # The signature file's suffix, so its name says its format: JSON unless the step saves numpy.
    sig_suffix: ClassVar[str] = ".json"

    @property
    def is_global(self) -> bool:
        """False lets a step with a per-shard mode (MinHash `scope = "shard"`) run streaming."""
        return True

    def collect(self, docs: Iterable[Document], sig_path: Path) -> Iterator[Document]:
        raise NotImplementedError

    def plan(self, sig_paths: list[Path], plan_dir: Path) -> dict[str, Any]:
        """Returns a few numbers for the report (clusters found, rates chosen, ...)."""
        raise NotImplementedError

    def apply(self, docs: Iterable[Document], stats: StepStats, *, shard: int, plan_dir: Path) -> Iterator[Document]:
        raise NotImplementedError

    def __call__(self, docs: Iterable[Document], stats: StepStats) -> Iterator[Document]:
        raise TypeError(f"{self.type} is a global step: run it through herd.data.pipeline, which "
                        "collects signatures over every shard before applying it")


def words(text: str) -> list[str]:
    """Whitespace words: the unit of Gopher's and C4's word counts (datatrove splits with spaCy's
    blank English tokenizer, which also separates punctuation; whitespace is the original
    Gopher description and is what the thresholds below are tested against)."""
    return text.split()
