"""Train a small byte-level BPE vocabulary with the Llama 3 split regex, saved as a tiktoken rank file.

Trade-off: the merges are learned by Hugging Face `tokenizers` (Rust, multi-threaded, seconds on
megabytes) rather than by a readable pure-Python loop, because training is not what herd teaches
and a Python BPE trainer takes minutes on the embedded corpora. Encoding stays with tiktoken
through `Tokenizer`, exactly as for the real Llama 3 vocabulary, so a model trained on a small
vocabulary runs through the same code as one trained on Meta's.

The conversion: pre-tokens come from the Llama 3 regex (`PAT_STR`), so no merge crosses a
pre-token boundary; the 256 single bytes get ranks 0..255 in byte order and every learned token
the next rank in the order its merge was learned. tiktoken merges the adjacent pair whose
concatenation has the lowest rank, which reproduces the learned merge order; `vocab_size` counts
these base ranks, and `Tokenizer` numbers its 256 special tokens after them.
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from herd.io import atomic_write_bytes
from herd.tokenizer.tokenizer import PAT_STR, load_rank_file

MIN_VOCAB_SIZE = 257  # the 256 bytes and at least one merge


@dataclass(frozen=True)
class TrainedTokenizer:
    path: Path
    vocab_size: int  # base ranks in the file; a loaded Tokenizer has vocab_size + 256 ids
    sha256: str  # of the rank file, as recorded in token shards' meta.json
    num_chars: int  # characters of training text


def _byte_level_alphabet() -> dict[str, int]:
    """HF's byte-level stand-in character -> the byte it stands for (GPT-2's table).

    Printable Latin-1 bytes stand for themselves; the other 68 bytes are given the code points
    from U+0100 upward in byte order, so that every pre-token is printable text.
    """
    from tokenizers import pre_tokenizers

    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {chr(b): b for b in printable}
    others = [b for b in range(256) if b not in table.values()]
    table.update({chr(256 + i): b for i, b in enumerate(others)})
    # Guard against a tokenizers release with another table: check the set and one mixed sample.
    assert set(table) == set(pre_tokenizers.ByteLevel.alphabet())
    sample = "\x00 é\n€"
    [(piece, _)] = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False).pre_tokenize_str(sample)
    assert bytes(table[c] for c in piece) == sample.encode("utf-8")
    return table


def train_bpe(texts: Iterable[str], *, vocab_size: int) -> dict[bytes, int]:
    """Learn `vocab_size` base ranks (256 bytes + merges) from `texts`; returns bytes -> rank."""
    try:
        from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    except ImportError:
        raise ImportError("BPE training needs Hugging Face tokenizers: `pip install 'herd[data]'`") from None
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be at least {MIN_VOCAB_SIZE} (the 256 bytes plus one merge), got {vocab_size}")

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PAT_STR), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=0,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],  # Llama 3's special tokens are appended by Tokenizer, not learned
    )
    seen = 0

    def counted():
        nonlocal seen
        for text in texts:
            seen += 1
            yield text

    tok.train_from_iterator(counted(), trainer=trainer)
    if seen == 0:
        raise ValueError("no training text: the sources yielded no documents")

    byte_of = _byte_level_alphabet()
    vocab = tok.get_vocab()  # byte-level string -> HF id; ids of merges follow the merge order
    ranks = {bytes([b]): b for b in range(256)}
    for piece, _ in sorted(vocab.items(), key=lambda kv: kv[1]):
        token = bytes(byte_of[c] for c in piece)
        if token not in ranks:
            ranks[token] = len(ranks)
    if len(ranks) != vocab_size:
        raise ValueError(
            f"the training text supports only {len(ranks)} tokens, fewer than vocab_size={vocab_size}; "
            "train on more text or ask for a smaller vocabulary"
        )
    return ranks


def save_rank_file(ranks: dict[bytes, int], path: str | os.PathLike[str]) -> str:
    """Write `<base64 token> <rank>` lines in rank order, atomically; returns the file's sha256."""
    path = Path(path)
    lines = b"".join(base64.b64encode(tok) + b" %d\n" % rank for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]))
    atomic_write_bytes(path, lines)
    return hashlib.sha256(lines).hexdigest()


def train_tokenizer(texts: Iterable[str], out_path: str | os.PathLike[str], *, vocab_size: int) -> TrainedTokenizer:
    """Train on `texts` and save the rank file at `out_path` (load it with `Tokenizer.from_file`)."""
    num_chars = 0

    def counted():
        nonlocal num_chars
        for text in texts:
            num_chars += len(text)
            yield text

    ranks = train_bpe(counted(), vocab_size=vocab_size)
    sha = save_rank_file(ranks, out_path)
    assert len(load_rank_file(out_path)) == vocab_size
    return TrainedTokenizer(path=Path(out_path), vocab_size=vocab_size, sha256=sha, num_chars=num_chars)
