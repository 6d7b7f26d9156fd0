"""The held-out validation split: a document is in it when a hash of its id falls below a fraction.

Trade-off: hashing ids instead of sampling with a seed means no list of held-out documents has
to be stored or shipped, a document keeps its side when the corpus grows, is reordered or is
read by another process (tokenizer training and tokenization agree without talking), and the
split at 1% is contained in the split at 2%. The price is that the validation size is only
about `fraction * num_docs`: a source with 100 documents may hold out 0 or 3 at 1%. The hash is
SHA-256, not Python's `hash()`, which is salted per process.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from typing import Literal, Protocol

_SALT = b"herd-validation-split-v1\x00"  # change only together with every stored split


class _HasId(Protocol):
    id: str


def validation_score(doc_id: str) -> float:
    """Where the id falls in [0, 1): the document is held out at any fraction above this."""
    digest = hashlib.sha256(_SALT + doc_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _check_fraction(fraction: float) -> None:
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation fraction must be in [0, 1), got {fraction}; e.g. 0.01 holds out 1%")


def is_validation(doc_id: str, *, fraction: float) -> bool:
    """True when the document with this id belongs to the held-out split at `fraction`."""
    _check_fraction(fraction)
    return validation_score(doc_id) < fraction


def select_split(docs: Iterable[_HasId], split: Literal["train", "val"], *, val_fraction: float) -> Iterator:
    """The documents of one side of the split, in their original order."""
    _check_fraction(val_fraction)
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    want_val = split == "val"
    return (doc for doc in docs if (validation_score(doc.id) < val_fraction) == want_val)
