"""Needle in a haystack: a fact hidden at a controlled depth in filler text of a controlled length.

A sample is built in token space, not text space: the prompt is

    [BOS] + filler[:p] + needle + filler[p:H] + question        (exactly `context_length` tokens)

with p = round(depth * H) and H the filler tokens that fit. Splicing token lists gives exact
lengths and depths (a text-space splice re-tokenizes and drifts by a few tokens at the joins),
at the cost of a haystack that may be cut mid-word where the needle goes in: the needle starts
with a space and ends a sentence, so the cut is one odd word boundary, which the models here
tolerate. The answer ("the pass key is 12345") is a random number per trial, so the model can
only succeed by reading the needle.

Two ways to score:
* "loglik" (default): one forward over prompt + answer; correct when every answer token is the
  model's argmax. Identical to greedy decoding producing the answer tokens, at the cost of
  one forward instead of one per answer token.
* "generate": greedy decoding through the KV cache; correct when the decoded text starts with
  the key. Accepts a different tokenization of the same digits, which "loglik" does not.

Fillers: "passkey" repeats the five sentences of the passkey-retrieval test (Mohtashami & Jaggi,
2023), a haystack with nothing to learn that small models can be trained and tested on;
"wikipedia" uses the English Wikipedia leads shipped with herd's demo extra (closer to the
paper's natural-text haystacks); any other value is read as a UTF-8 text file. A filler shorter
than the haystack is repeated.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

from herd.eval.results import TaskResult, format_table, save_figure
from herd.eval.scoring import score_continuations
from herd.model.llama import Transformer

PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
Method = Literal["loglik", "generate"]


class NeedleTokenizer(Protocol):
    bos_id: int

    def encode(self, s: str, *, bos: bool, eos: bool) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


@dataclass(frozen=True)
class NeedleTemplate:
    """The needle, the question after the haystack, and the answer; `{key}` is the hidden number."""

    needle: str = " The pass key is {key}. Remember it. {key} is the pass key."
    question: str = "\nWhat is the pass key? The pass key is"
    answer: str = " {key}"
    key_digits: int = 5

    def __post_init__(self) -> None:
        if "{key}" not in self.needle or "{key}" not in self.answer:
            raise ValueError("the needle and the answer must both contain {key}")
        if self.key_digits < 1:
            raise ValueError(f"key_digits must be >= 1, got {self.key_digits}")

    def random_key(self, rng: random.Random) -> str:
        first = str(rng.randint(1, 9))  # no leading zero: "0123" and "123" may tokenize alike
        return first + "".join(str(rng.randint(0, 9)) for _ in range(self.key_digits - 1))


@dataclass(frozen=True)
class NeedleSample:
    tokens: list[int]  # the prompt; len(tokens) == context_length
    answer_tokens: list[int]
    key: str
    context_length: int
    depth: float
    needle_start: int  # index in `tokens` of the needle's first token
    needle_len: int
    haystack_len: int  # filler tokens around the needle


def filler_units(source: str | os.PathLike[str] = "passkey") -> list[str]:
    """The filler as a list of units (a sentence block, an article, a file) that are tokenized one
    by one and cycled (see `filler_tokens`)."""
    if source == "passkey":
        units = [PASSKEY_FILLER]
    elif source == "wikipedia":
        from herd.data.corpora import wikipedia_leads

        units = [doc.text for doc in wikipedia_leads("en")]
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"filler {source!r} is neither 'passkey', 'wikipedia' nor a text file")
        units = [path.read_text(encoding="utf-8")]
    units = [u.strip() for u in units if u.strip()]
    if not units:
        raise ValueError(f"filler {source!r} is empty")
    return units


def filler_tokens(tokenizer: NeedleTokenizer, source: str | os.PathLike[str] = "passkey", *, min_tokens: int) -> list[int]:
    """At least `min_tokens` filler tokens: " " + unit, tokenized unit by unit, cycling the units.

    Unit by unit, so the stream's first k tokens are the same however many are asked for (a
    sample's haystack must not depend on the other context lengths in the same run), and each
    unit starts with " " so the joins tokenize as running text does (" The", not " ", "The").
    """
    units = filler_units(source)
    encoded: dict[int, list[int]] = {}
    tokens: list[int] = []
    i = 0
    while len(tokens) < min_tokens:
        k = i % len(units)
        if k not in encoded:
            encoded[k] = tokenizer.encode(" " + units[k], bos=False, eos=False)
        tokens.extend(encoded[k])
        i += 1
    return tokens


def make_needle_sample(
    tokenizer: NeedleTokenizer,
    filler: Sequence[int],
    *,
    context_length: int,
    depth: float,
    key: str,
    template: NeedleTemplate = NeedleTemplate(),
    offset: int = 0,
) -> NeedleSample:
    """One prompt of exactly `context_length` tokens with the needle at `depth` of the haystack.

    depth 0.0 puts the needle right after BOS, 1.0 right before the question. `offset` picks
    where in the filler the haystack window starts (so trials see different text).
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    needle = tokenizer.encode(template.needle.format(key=key), bos=False, eos=False)
    question = tokenizer.encode(template.question, bos=False, eos=False)
    answer = tokenizer.encode(template.answer.format(key=key), bos=False, eos=False)
    hay_len = context_length - 1 - len(needle) - len(question)
    if hay_len < 0:
        raise ValueError(
            f"context_length {context_length} is too short: BOS, the needle ({len(needle)} tokens) and "
            f"the question ({len(question)} tokens) alone take {1 + len(needle) + len(question)}"
        )
    if offset < 0 or offset + hay_len > len(filler):
        raise ValueError(f"the filler has {len(filler)} tokens; a {hay_len}-token haystack at offset {offset} does not fit")
    hay = list(filler[offset : offset + hay_len])
    p = round(depth * hay_len)
    tokens = [tokenizer.bos_id, *hay[:p], *needle, *hay[p:], *question]
    assert len(tokens) == context_length
    return NeedleSample(tokens=tokens, answer_tokens=answer, key=key, context_length=context_length, depth=depth,
                        needle_start=1 + p, needle_len=len(needle), haystack_len=hay_len)


def needle_samples(
    tokenizer: NeedleTokenizer,
    *,
    lengths: Sequence[int],
    depths: Sequence[float],
    trials: int,
    filler: str | os.PathLike[str] = "passkey",
    template: NeedleTemplate = NeedleTemplate(),
    seed: int = 0,
) -> list[NeedleSample]:
    """Samples for every (length, depth, trial), ordered length-major; each has its own key and offset."""
    if trials < 1:
        raise ValueError(f"trials must be >= 1, got {trials}")
    if not lengths or not depths:
        raise ValueError("give at least one context length and one depth")
    slack = 4096  # room for the random window offsets
    stream = filler_tokens(tokenizer, filler, min_tokens=max(lengths) + slack)
    samples = []
    for length in lengths:
        for depth in depths:
            for t in range(trials):
                # String seeds are hashed with SHA-512 by `random`: stable across runs and processes.
                rng = random.Random(f"{seed}:{length}:{depth!r}:{t}")
                key = template.random_key(rng)
                # The offset range does not depend on the other lengths asked for (the stream's
                # prefix is the same whatever its length), so a cell's samples are reproducible alone.
                offset = rng.randrange(0, slack + 1)
                samples.append(make_needle_sample(tokenizer, stream, context_length=length, depth=depth, key=key,
                                                  template=template, offset=offset))
    return samples


@dataclass
class NeedleRecord:
    context_length: int
    depth: float
    key: str
    correct: bool
    answer_logprob: float | None  # "loglik" only
    output: str | None  # "generate" only: the decoded continuation


@dataclass
class NeedleResult:
    lengths: list[int]
    depths: list[float]
    trials: int
    method: str
    accuracy: list[list[float]]  # [depth index][length index]
    records: list[NeedleRecord] = field(repr=False)

    @property
    def mean_accuracy(self) -> float:
        return sum(r.correct for r in self.records) / len(self.records)

    def accuracy_at_length(self, length: int) -> float:
        j = self.lengths.index(length)
        return sum(row[j] for row in self.accuracy) / len(self.depths)

    def table(self) -> str:
        header = ("depth", *(f"{n:,}" for n in self.lengths))
        rows = [(f"{d:.2f}", *(f"{a:.2f}" for a in row)) for d, row in zip(self.depths, self.accuracy)]
        rows.append(("mean", *(f"{self.accuracy_at_length(n):.2f}" for n in self.lengths)))
        return format_table(header, rows)

    def to_task_result(self, task: str = "needle") -> TaskResult:
        metrics = {"acc": self.mean_accuracy, **{f"acc@{n}": self.accuracy_at_length(n) for n in self.lengths}}
        return TaskResult(task=task, metrics=metrics, num_examples=len(self.records),
                          config={"method": self.method, "trials": self.trials, "lengths": self.lengths,
                                  "depths": self.depths, "accuracy_grid": self.accuracy})


def _check_fits(samples: Sequence[NeedleSample], max_seq_len: int) -> None:
    for s in samples:
        if s.context_length + len(s.answer_tokens) > max_seq_len:
            raise ValueError(
                f"a {s.context_length}-token prompt plus its {len(s.answer_tokens)}-token answer exceeds the model's "
                f"max_seq_len {max_seq_len}; use shorter --lengths or load the model with a longer --max-seq-len"
            )


def evaluate_needle(
    model: Transformer,
    tokenizer: NeedleTokenizer,
    *,
    lengths: Sequence[int],
    depths: Sequence[float],
    trials: int = 4,
    method: Method = "loglik",
    filler: str | os.PathLike[str] = "passkey",
    template: NeedleTemplate = NeedleTemplate(),
    seed: int = 0,
    batch_size: int = 4,
) -> NeedleResult:
    """Retrieval accuracy for every (context length, depth), averaged over `trials` keys."""
    if method not in ("loglik", "generate"):
        raise ValueError(f"method must be 'loglik' or 'generate', got {method!r}")
    samples = needle_samples(tokenizer, lengths=lengths, depths=depths, trials=trials, filler=filler,
                             template=template, seed=seed)
    _check_fits(samples, model.args.max_seq_len)
    records = []
    if method == "loglik":
        scores = score_continuations(model, [(s.tokens, s.answer_tokens) for s in samples], batch_size=batch_size)
        for s, sc in zip(samples, scores):
            records.append(NeedleRecord(s.context_length, s.depth, s.key, sc.is_greedy, sc.logprob, None))
    else:
        from herd.generate import GREEDY, generate

        for start in range(0, len(samples), batch_size):
            batch = samples[start : start + batch_size]
            outs = generate(model, [s.tokens for s in batch], sampling=GREEDY,
                            max_new_tokens=max(len(s.answer_tokens) for s in batch))
            for s, out in zip(batch, outs):
                text = tokenizer.decode(out.tokens)
                records.append(NeedleRecord(s.context_length, s.depth, s.key, text.strip().startswith(s.key), None, text))
    grid = []
    for depth in depths:
        row = []
        for length in lengths:
            cell = [r.correct for r in records if r.context_length == length and r.depth == depth]
            row.append(sum(cell) / len(cell))
        grid.append(row)
    return NeedleResult(lengths=list(lengths), depths=list(depths), trials=trials, method=method, accuracy=grid,
                        records=records)


def _draw_heatmap(fig, ax, result: NeedleResult, title: str) -> None:
    from matplotlib.colors import LinearSegmentedColormap

    cmap = LinearSegmentedColormap.from_list("needle", ["#d7301f", "#fdd49e", "#1a9850"])
    im = ax.imshow(result.accuracy, cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(result.lengths)), [f"{n:,}" for n in result.lengths])
    ax.set_yticks(range(len(result.depths)), [f"{d:.0%}" for d in result.depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    for i, row in enumerate(result.accuracy):
        for j, acc in enumerate(row):
            ax.text(j, i, f"{acc:.2f}", ha="center", va="center", fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label="accuracy")


def plot_needle_heatmap(result: NeedleResult, path: str | os.PathLike[str], *, title: str | None = None) -> Path:
    """Accuracy by context length (x) and needle depth (y, 0 = start of the context at the top), as PNG."""
    return plot_needle_heatmaps({title or f"needle retrieval accuracy ({result.method}, {result.trials} trials per cell)":
                                 result}, path)


def plot_needle_heatmaps(results: dict[str, NeedleResult], path: str | os.PathLike[str]) -> Path:
    """Several heatmaps side by side (e.g. before and after context extension), one per title."""
    from matplotlib.figure import Figure

    if not results:
        raise ValueError("no needle results to plot")
    first = next(iter(results.values()))
    width = 1.2 + 0.9 * len(first.lengths)
    fig = Figure(figsize=(width * len(results) + 0.5, 1.0 + 0.5 * len(first.depths)))
    axes = fig.subplots(1, len(results), squeeze=False)[0]
    for ax, (title, result) in zip(axes, results.items()):
        _draw_heatmap(fig, ax, result, title)
    return save_figure(fig, path)


def needle_training_texts(
    tokenizer: NeedleTokenizer,
    *,
    num_docs: int,
    context_length: int,
    filler: str | os.PathLike[str] = "passkey",
    template: NeedleTemplate = NeedleTemplate(),
    seed: int = 0,
) -> list[str]:
    """Documents that teach the task: a haystack of about `context_length` tokens with the needle
    at a uniformly random depth, then the question and its answer.

    For small models that must learn retrieval before it can be measured (the demo). Text, not
    tokens, so they go through the ordinary data path (`herd data tokenize`, shards, the loader);
    re-tokenizing the spliced text may shift lengths by a token or two, which training does not
    mind. Keys come from a different seed space than `needle_samples`, so evaluation keys are
    not memorised.
    """
    rng = random.Random(f"train:{seed}")
    stream = filler_tokens(tokenizer, filler, min_tokens=context_length + 4096)
    docs = []
    for _ in range(num_docs):
        key = template.random_key(rng)
        sample = make_needle_sample(tokenizer, stream, context_length=context_length, depth=rng.random(), key=key,
                                    template=template, offset=rng.randrange(0, 4096))
        docs.append(tokenizer.decode(sample.tokens[1:]) + template.answer.format(key=key) + ".")
    return docs
