"""A multiple-choice task made from held-out text: which sentence comes next?

The scaling-law two-step method (compute -> task NLL -> accuracy) needs a downstream task that
models of a few hundred thousand parameters do better than chance on. Real benchmarks are out of
reach at that size and cannot be downloaded here, so this builds one from the held-out side of a
corpus: the context is the opening sentences of a document, the right answer its next sentence,
and the distractors next sentences of other held-out documents. A model that has learned
anything about topic and syntax prefers the true continuation; chance is 1 / choices.

Trade-off: sentence splitting is a regular expression (a full stop, question or exclamation mark
followed by a space and a capital), not a linguistic splitter: abbreviations such as "St. Paul"
cut a sentence short now and then, which makes an item a little easier or harder, never wrong
about which continuation is the document's own.

    python -m herd.eval.tasks --source wiki-en --source austen --per-doc 80 --max-choice-chars 200 \\
        --out runs/tasks/next_sentence.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
from collections.abc import Iterable
from pathlib import Path

from herd.io import atomic_write_text

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(text.strip()) if s.strip()]


def next_sentence_task(texts: Iterable[str], *, n: int, choices: int = 4, context_sentences: int = 2,
                       min_chars: int = 20, max_chars: int | None = None, max_choice_chars: int | None = None,
                       per_doc: int = 1, seed: int = 0) -> list[dict]:
    """Up to `n` items {"question", "choices", "answer"} from documents with enough sentences.

    Each document gives up to `per_doc` items from successive, non-overlapping windows of
    `context_sentences` + 1 sentences; `max_chars` skips items whose context plus longest choice
    is longer, `max_choice_chars` items with a longer choice (small models read few tokens at once;
    herd's scorer keeps the end of a long context but must see a choice whole). Distractors are
    the true continuations of other items.
    """
    if choices < 2:
        raise ValueError(f"choices must be >= 2, got {choices}")
    if context_sentences < 1 or per_doc < 1:
        raise ValueError(f"context_sentences and per_doc must be >= 1, got {context_sentences} and {per_doc}")
    pool = []  # (context, true next sentence)
    for text in texts:
        s = sentences(text)
        w = context_sentences + 1
        for k in range(0, min(per_doc * w, len(s) - w + 1), w):
            if len(s[k + context_sentences]) >= min_chars:
                pool.append((" ".join(s[k:k + context_sentences]), s[k + context_sentences]))
    if len(pool) < choices:
        raise ValueError(f"only {len(pool)} windows of {context_sentences + 1} sentences; need at least "
                         f"{choices} to draw distractors from other items")
    rng = random.Random(seed)
    items = []
    for i, (context, truth) in enumerate(pool):
        if len(items) == n:
            break
        others = [j for j in rng.sample(range(len(pool)), min(len(pool), choices + 3)) if j != i]
        options = [truth] + [pool[j][1] for j in others if pool[j][1] != truth][: choices - 1]
        longest = max(map(len, options))
        if (len(options) < choices or (max_chars and len(context) + longest > max_chars)
                or (max_choice_chars and longest > max_choice_chars)):
            continue
        rng.shuffle(options)
        items.append({"question": context, "choices": options, "answer": options.index(truth)})
    return items


def write_task(items: list[dict], path: str | os.PathLike[str]) -> Path:
    return atomic_write_text(path, "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items))


def main(argv: list[str] | None = None) -> None:
    from herd.data.corpora import austen_chapters, wikipedia_leads
    from herd.data.split import select_split

    p = argparse.ArgumentParser(prog="python -m herd.eval.tasks", description=__doc__.splitlines()[0])
    p.add_argument("--source", action="append", choices=["wiki-en", "wiki-fr", "wiki-es", "austen"],
                   help="held-out documents of these corpora (repeatable; default wiki-en)")
    p.add_argument("--val-fraction", type=float, default=0.01,
                   help="the held-out side of the same id-hash split the tokenizer and shards use")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--choices", type=int, default=4)
    p.add_argument("--context-sentences", type=int, default=2)
    p.add_argument("--per-doc", type=int, default=1, help="items per document at most (long documents give more)")
    p.add_argument("--max-chars", type=int, help="skip items whose context + longest choice is longer")
    p.add_argument("--max-choice-chars", type=int, help="skip items with a longer choice")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    opts = p.parse_args(argv)

    def texts():
        for source in opts.source or ["wiki-en"]:
            docs = austen_chapters() if source == "austen" else wikipedia_leads(source.split("-")[1])
            yield from (d.text for d in select_split(docs, "val", val_fraction=opts.val_fraction))

    items = next_sentence_task(texts(), n=opts.n, choices=opts.choices, context_sentences=opts.context_sentences,
                               max_chars=opts.max_chars, max_choice_chars=opts.max_choice_chars,
                               per_doc=opts.per_doc, seed=opts.seed)
    print(f"{len(items)} items, chance {1 / opts.choices:.2f} -> {write_task(items, opts.out)}")


if __name__ == "__main__":
    main()
