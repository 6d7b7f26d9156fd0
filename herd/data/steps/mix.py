"""Domain mix: resample documents so that each domain's share of characters matches target
weights (Llama 3 §3.1.2: ~50% general knowledge, 25% maths and reasoning, 17% code, 8%
multilingual tokens).

Trade-off: characters stand in for tokens (the mix is decided before tokenisation; for one
tokenizer the two differ by a per-language factor, which a user can fold into the weights).
The mix is a global step: it needs every domain's total before choosing rates. With
`max_repeat = 1` it only downsamples (the largest total the scarcest domain allows); above 1 it
may repeat a scarce domain's documents up to that many times, as an epoch count would. Sampling
is a hash of the document id, so a rerun selects the same documents.

`caps` is the other way to state a mix, for adding a source to sources whose sizes are already
chosen: every domain is kept whole except the capped ones, each downsampled to at most its
share of the output. Fixed `weights` would move every domain's size whenever one of them
changes, since only the scarcest domain of a weighted mix keeps all its documents.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import xxhash

from herd.data.document import Document
from herd.data.steps.base import GlobalStep, StepStats
from herd.io import atomic_write_text

LLAMA3_MIX = {"general": 0.50, "math": 0.25, "code": 0.17, "multilingual": 0.08}


def mix_rates(available: dict[str, float], weights: dict[str, float], *, max_repeat: float = 1.0) -> dict[str, float]:
    """Sampling rate per domain (expected copies of each document) so that the output's shares
    equal `weights` renormalised over the domains that have data, no domain repeated more than
    `max_repeat` times, and the output as large as those limits allow."""
    present = {d: w for d, w in weights.items() if w > 0 and available.get(d, 0) > 0}
    if not present:
        raise ValueError(f"mix: none of the weighted domains {sorted(weights)} has documents "
                         f"(found {sorted(available)}); check the classifier's labels and the mix weights")
    total_w = sum(present.values())
    share = {d: w / total_w for d, w in present.items()}
    # The largest output T with T * share[d] <= max_repeat * available[d] for every domain.
    t = min(max_repeat * available[d] / s for d, s in share.items())
    return {d: (t * share[d] / available[d] if d in share else 0.0) for d in weights}


def cap_rates(available: dict[str, float], caps: dict[str, float]) -> dict[str, float]:
    """Sampling rate per domain: 1 for domains without a cap; a capped domain keeps the largest
    fraction of its characters that leaves it at most `caps[d]` of the output."""
    if any(not 0 <= c < 1 for c in caps.values()) or sum(caps.values()) >= 1:
        raise ValueError(f"mix caps are shares of the output, each in [0, 1) and summing below 1; got {caps}")
    whole = sum(v for d, v in available.items() if d not in caps)
    if whole <= 0:
        raise ValueError(f"mix caps {sorted(caps)} need at least one uncapped domain with documents; "
                         f"found {sorted(available)}")
    # Fixed point: a capped domain smaller than its cap is kept whole and counts as uncapped.
    binding = {d for d in caps if available.get(d, 0) > 0}
    while True:
        kept_whole = whole + sum(available.get(d, 0) for d in caps if d not in binding)
        total = kept_whole / (1 - sum(caps[d] for d in binding))
        small = {d for d in binding if available[d] <= caps[d] * total}
        if not small:
            break
        binding -= small
    return {d: (min(1.0, caps[d] * total / v) if d in caps else 1.0) if v > 0 else 0.0 for d, v in available.items()}


@dataclass
class Mix(GlobalStep):
    type: ClassVar[str] = "mix"
    name: str = "mix"
    weights: dict[str, float] | None = None  # default: Llama 3 §3.1.2 (LLAMA3_MIX) unless caps are given
    field: str = "domain"      # metadata key holding the domain label
    max_repeat: float = 1.0
    seed: int = 0
    caps: dict[str, float] | None = None  # instead of weights: only these domains are downsampled

    def __post_init__(self) -> None:
        if self.caps is not None and self.weights is not None:
            raise ValueError("mix: give either weights (every domain's share) or caps (the most some domains "
                             "may take, the rest kept whole), not both")
        if self.caps is None and self.weights is None:
            self.weights = dict(LLAMA3_MIX)

    def collect(self, docs: Iterable[Document], sig_path: Path) -> Iterator[Document]:
        chars: Counter = Counter()
        for doc in docs:
            chars[str(doc.metadata.get(self.field))] += len(doc.text)
            yield doc
        atomic_write_text(sig_path, json.dumps(chars))

    def plan(self, sig_paths: list[Path], plan_dir: Path) -> dict[str, Any]:
        chars: Counter = Counter()
        for p in sig_paths:
            chars.update(json.loads(p.read_text()))
        if self.caps is not None:
            rates = cap_rates(dict(chars), self.caps)
            wanted = self.caps
        else:
            assert self.weights is not None
            rates = mix_rates(dict(chars), self.weights, max_repeat=self.max_repeat)
            wanted = self.weights
        expected = {d: chars.get(d, 0) * r for d, r in rates.items()}
        total = sum(expected.values()) or 1
        (plan_dir / "rates.json").write_text(json.dumps(rates))
        return {"chars_in": dict(chars), "rates": {d: round(r, 4) for d, r in rates.items()},
                "expected_share": {d: round(v / total, 4) for d, v in expected.items()},
                "domains_without_data": sorted(d for d, w in wanted.items() if w > 0 and not chars.get(d))}

    def copies(self, doc: Document, rate: float) -> int:
        whole = math.floor(rate)
        u = xxhash.xxh64_intdigest(doc.id.encode("utf-8", "surrogatepass"), seed=self.seed) / 2.0**64
        return whole + (1 if u < rate - whole else 0)

    def apply(self, docs: Iterable[Document], stats: StepStats, *, shard: int, plan_dir: Path) -> Iterator[Document]:
        rates: dict[str, float] = json.loads((plan_dir / "rates.json").read_text())
        for doc in docs:
            stats.docs_in += 1
            stats.chars_in += len(doc.text)
            domain = str(doc.metadata.get(self.field))
            if domain not in rates:
                stats.drop("mix_domain_not_weighted")
                continue
            n = self.copies(doc, rates[domain])
            if n == 0:
                stats.drop(f"mix_downsampled_{domain}")
                continue
            for k in range(n):
                out = doc if k == 0 else Document(id=f"{doc.id}#repeat{k}", text=doc.text, url=doc.url,
                                                  timestamp=doc.timestamp, metadata=dict(doc.metadata))
                stats.docs_out += 1
                stats.chars_out += len(doc.text)
                stats.counters[f"chars_{domain}"] += len(doc.text)
                yield out
            stats.docs_added += n - 1


STEPS = (Mix,)
