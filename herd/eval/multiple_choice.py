"""Multiple-choice evaluation by log-likelihood, on tasks in a simple JSONL format.

One example per line: `{"question": str, "choices": [str, ...], "answer": int}` (the answer is
the index of the correct choice; an optional "id" is kept in the predictions).

Each choice is scored as the continuation " {choice}" after the prompt

    Question: {question}
    Answer:

with few-shot examples (each followed by its correct answer) before it, separated by blank
lines. Context and continuation are tokenized separately and concatenated, so the choice's
first token is the same whatever the prompt ends with (lm-eval's convention; it keeps scores
comparable across prompts).

Two accuracies are reported, because the sum of log-probabilities favours short answers:
* `acc`: argmax of the summed log-likelihood (unnormalised);
* `acc_norm`: argmax of the log-likelihood divided by the choice's length in UTF-8 bytes
  (the choice text, without the space that joins it to the prompt). Bytes, not tokens, so the
  normalisation does not depend on the tokenizer and models with different vocabularies are
  compared on the same footing. lm-eval's acc_norm divides by characters of the same text, so
  on ASCII choices the two are identical (checked against the harness in the tests).

Design trade-off: every choice of every example is one independent (context, continuation)
request, batched by length across examples. Scoring a shared context once and the choices
from its cached keys would save the repeated prompt, but few-shot prompts are short at the
scales run here and independent requests keep one code path with the lm-eval adapter.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from herd.eval.results import TaskResult
from herd.eval.scoring import score_continuations
from herd.model.llama import Transformer


class TextTokenizer(Protocol):
    bos_id: int

    def encode(self, s: str, *, bos: bool, eos: bool) -> list[int]: ...


@dataclass(frozen=True)
class MCExample:
    question: str
    choices: tuple[str, ...]
    answer: int
    id: str | None = None


def parse_mc_example(obj: Any, *, where: str) -> MCExample:
    """Validate one decoded JSONL record; `where` ("file.jsonl:12") prefixes every error."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object with question, choices, answer; got {type(obj).__name__}")
    missing = [k for k in ("question", "choices", "answer") if k not in obj]
    if missing:
        raise ValueError(f"{where}: missing field(s) {', '.join(missing)}; each line needs question, choices, answer")
    unknown = set(obj) - {"question", "choices", "answer", "id"}
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}; allowed: question, choices, answer, id")
    q, choices, answer = obj["question"], obj["choices"], obj["answer"]
    if not isinstance(q, str):
        raise ValueError(f"{where}: question must be a string")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise ValueError(f"{where}: choices must be a list of at least 2 non-empty strings")
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise ValueError(f"{where}: answer must be the index of the correct choice, 0..{len(choices) - 1}; got {answer!r}")
    ex_id = obj.get("id")
    return MCExample(question=q, choices=tuple(choices), answer=answer, id=None if ex_id is None else str(ex_id))


def load_mc_jsonl(path: str | os.PathLike[str]) -> list[MCExample]:
    """Read a task file; blank lines are skipped, anything malformed is an error naming its line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no task file at {path}")
    examples = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: invalid JSON ({e.msg} at column {e.colno})") from None
            examples.append(parse_mc_example(obj, where=f"{path}:{n}"))
    if not examples:
        raise ValueError(f"{path} holds no examples")
    return examples


def format_question(question: str) -> str:
    return f"Question: {question}\nAnswer:"


def format_continuation(choice: str) -> str:
    return f" {choice}"


def build_prompt(example: MCExample, shots: Sequence[MCExample] = ()) -> str:
    """The context string for `example`: solved shots, then the question, ending in 'Answer:'."""
    parts = [format_question(s.question) + format_continuation(s.choices[s.answer]) for s in shots]
    parts.append(format_question(example.question))
    return "\n\n".join(parts)


def select_shots(pool: Sequence[MCExample], k: int, *, seed: int, index: int, exclude_self: bool) -> list[MCExample]:
    """k shots drawn without replacement, the same for a given (seed, index) on every run.

    exclude_self: the pool is the evaluated set itself, so example `index` must not be its own shot.
    """
    if k == 0:
        return []
    candidates = [j for j in range(len(pool)) if not (exclude_self and j == index)]
    if k > len(candidates):
        raise ValueError(f"{k} shots asked for but only {len(candidates)} examples are available to draw them from")
    rng = random.Random(seed * 1_000_003 + index)
    return [pool[j] for j in rng.sample(candidates, k)]


@dataclass
class MCPrediction:
    index: int
    id: str | None
    answer: int
    logprobs: list[float]  # summed log-likelihood of each choice
    byte_lengths: list[int]
    pred: int  # argmax of logprobs
    pred_norm: int  # argmax of logprobs / byte_lengths


@dataclass
class MCResult:
    task: str
    num_shots: int
    accuracy: float
    accuracy_norm: float
    predictions: list[MCPrediction] = field(repr=False)

    @property
    def num_examples(self) -> int:
        return len(self.predictions)

    @property
    def answer_nll(self) -> float:
        """Mean over examples of the correct answer's NLL per UTF-8 byte: the "normalised NLL of
        the correct answer" that the paper's two-step method predicts from compute."""
        return sum(-p.logprobs[p.answer] / p.byte_lengths[p.answer] for p in self.predictions) / len(self.predictions)

    def to_task_result(self) -> TaskResult:
        return TaskResult(
            task=self.task,
            metrics={"acc": self.accuracy, "acc_norm": self.accuracy_norm, "answer_nll": self.answer_nll},
            num_examples=self.num_examples,
            config={"num_shots": self.num_shots, "acc_norm": "log-likelihood per UTF-8 byte of the choice"},
        )


def _argmax(values: Sequence[float]) -> int:
    # Ties go to the first choice, deterministically (max() would too; said here so it is a decision).
    return max(range(len(values)), key=lambda i: (values[i], -i))


def evaluate_mc(
    model: Transformer,
    tokenizer: TextTokenizer,
    examples: Sequence[MCExample],
    *,
    task: str = "multiple_choice",
    num_shots: int = 0,
    shots_pool: Sequence[MCExample] | None = None,
    seed: int = 0,
    batch_size: int = 16,
) -> MCResult:
    """Score every choice of every example and report acc / acc_norm (see the module docstring).

    shots_pool: where few-shot examples come from (e.g. a train split); None draws them from
    `examples` itself, never using an example as its own shot.
    """
    if not examples:
        raise ValueError("no examples to evaluate")
    if num_shots < 0:
        raise ValueError(f"num_shots must be >= 0, got {num_shots}")
    pool = examples if shots_pool is None else shots_pool
    requests: list[tuple[list[int], list[int]]] = []
    for i, ex in enumerate(examples):
        shots = select_shots(pool, num_shots, seed=seed, index=i, exclude_self=shots_pool is None)
        context = tokenizer.encode(build_prompt(ex, shots), bos=True, eos=False)
        for choice in ex.choices:
            requests.append((context, tokenizer.encode(format_continuation(choice), bos=False, eos=False)))
    scores = iter(score_continuations(model, requests, batch_size=batch_size))

    predictions = []
    for i, ex in enumerate(examples):
        lps = [next(scores).logprob for _ in ex.choices]
        nbytes = [len(c.encode("utf-8")) for c in ex.choices]
        predictions.append(MCPrediction(
            index=i, id=ex.id, answer=ex.answer, logprobs=lps, byte_lengths=nbytes,
            pred=_argmax(lps), pred_norm=_argmax([lp / n for lp, n in zip(lps, nbytes)]),
        ))
    n = len(predictions)
    return MCResult(
        task=task,
        num_shots=num_shots,
        accuracy=sum(p.pred == p.answer for p in predictions) / n,
        accuracy_norm=sum(p.pred_norm == p.answer for p in predictions) / n,
        predictions=predictions,
    )
