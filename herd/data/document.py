"""The one record that flows through the curation pipeline.

Trade-off: a plain slots dataclass with a free-form `metadata` dict, like datatrove's `Document`,
rather than a typed column per signal. Steps add what they compute (language, scores, domain)
under documented metadata keys, so a new step needs no schema change, and writers keep every key.
The fields that several steps rely on (url and crawl time for URL dedup, text for everything)
are real attributes so that a typo is an AttributeError, not a silently missing key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any


@dataclass(slots=True)
class Document:
    id: str
    text: str
    url: str | None = None
    # Crawl/fetch time as ISO 8601 (WARC-Date style, e.g. "2023-12-01T10:00:00Z"); None if unknown.
    timestamp: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "text": self.text, "url": self.url, "timestamp": self.timestamp,
                "metadata": self.metadata}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Document:
        return cls(id=d["id"], text=d["text"], url=d.get("url"), timestamp=d.get("timestamp"),
                   metadata=dict(d.get("metadata") or {}))


def parse_timestamp(value: str | None) -> float:
    """Seconds since the epoch for an ISO 8601 string; -inf when unknown, so known dates win."""
    if not value:
        return float("-inf")
    v = value.strip()
    if v.endswith("Z"):
        v = v[:-1] + "+00:00"
    try:
        t = datetime.fromisoformat(v)
    except ValueError:
        raise ValueError(f"timestamp {value!r} is not ISO 8601 (e.g. 2023-12-01T10:00:00Z)") from None
    if t.tzinfo is None:  # WARC dates are UTC; treat naive values the same way
        t = t.replace(tzinfo=timezone.utc)
    return t.timestamp()
