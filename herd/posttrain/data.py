"""Post-training data: chat and preference JSONL, tokenised with the chat format and packed.

Two files formats, one JSON object per line:

* chat: `{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", ...}]}`;
  roles system / user / assistant / ipython (`tool` is written as ipython); assistant turns may
  carry `tool_calls` (`[{"name", "arguments"}]`) and `stop_reason`.
* preference: `{"prompt": ..., "chosen": ..., "rejected": ..., "edited": ...}`; `prompt` is a
  string (one user turn) or a list of messages, each response a string or one assistant message.
  `edited` is optional (the paper's third, human-edited response, ranked above `chosen`).

Every malformed line is reported as `ValueError("<file>:<line>: what is wrong")`.

Trade-off: examples are tokenised eagerly into lists of ids. Post-training sets here are small
(thousands of dialogs), and having every length up front lets packing be a plain first-fit over
known sizes and lets errors point at the offending line before any training starts. A streaming
reader would be needed only for pretraining-sized chat data, which goes through `herd.data`.

Packing puts several dialogs into one row, shifts by one for next-token targets inside each
dialog (never across a boundary), and writes -100 wherever the chat format's assistant mask is
False, so only assistant bodies and their eot/eom are trained.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from herd.io import atomic_write_text
from herd.targets import IGNORE_INDEX
from herd.tokenizer import ChatFormat, ChatTokens, Message, ToolCall
from herd.tokenizer.chat import content_json, parse_content

_MESSAGE_KEYS = {"role", "content", "tool_calls", "stop_reason", "context"}


@dataclass
class PreferencePair:
    """One prompt with responses ranked edited > chosen > rejected (edited is optional)."""

    prompt: list[Message]
    chosen: Message
    rejected: Message
    edited: Message | None = None


@dataclass
class Batch:
    """A packed batch for next-token losses (same fields as `herd.data.loader.Batch`).

    inputs / targets / doc_ids are (B, S) int64; targets are -100 where nothing is trained,
    and attention never crosses a change of doc_id.
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    doc_ids: torch.Tensor
    num_targets: int


# ---- reading and writing -----------------------------------------------------------------


def _lines(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (expected a JSONL file, one JSON object per line)")
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None


def _message(obj: Any, where: str) -> Message:
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: a message must be an object with 'role' and 'content', got {type(obj).__name__}")
    unknown = sorted(set(obj) - _MESSAGE_KEYS)
    if unknown:
        raise ValueError(f"{where}: unknown message keys {unknown}; allowed: {sorted(_MESSAGE_KEYS)}")
    for key in ("role", "content"):
        if key not in obj:
            raise ValueError(f"{where}: message is missing {key!r}")
    calls = obj.get("tool_calls") or []
    if not isinstance(calls, list) or not all(isinstance(c, dict) and {"name", "arguments"} <= set(c) for c in calls):
        raise ValueError(f"{where}: tool_calls must be a list of objects with 'name' and 'arguments'")
    try:
        return Message(
            role=obj["role"],
            content=parse_content(obj["content"]),
            tool_calls=[ToolCall(c["name"], c["arguments"]) for c in calls],
            stop_reason=obj.get("stop_reason", "end_of_turn"),
            context=obj.get("context"),
        )
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def _message_to_json(m: Message) -> dict[str, Any]:
    out: dict[str, Any] = {"role": m.role, "content": content_json(m.content)}
    if m.tool_calls:
        out["tool_calls"] = [{"name": c.name, "arguments": c.arguments} for c in m.tool_calls]
    if m.stop_reason != "end_of_turn":
        out["stop_reason"] = m.stop_reason
    if m.context is not None:
        out["context"] = m.context
    return out


def read_chat_jsonl(path: str | os.PathLike, *, require_assistant: bool = True) -> list[list[Message]]:
    """Dialogs from a chat JSONL file; each must contain an assistant turn unless require_assistant=False
    (prompt files for rejection sampling end at the user turn)."""
    dialogs = []
    for lineno, obj in _lines(path):
        where = f"{path}:{lineno}"
        if not isinstance(obj, dict) or "messages" not in obj:
            raise ValueError(f'{where}: expected an object with a "messages" list')
        if set(obj) - {"messages"}:
            raise ValueError(f"{where}: unknown keys {sorted(set(obj) - {'messages'})}; a line holds only 'messages'")
        messages = obj["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError(f'{where}: "messages" must be a non-empty list')
        dialog = [_message(m, f"{where}: message {i}") for i, m in enumerate(messages)]
        if require_assistant and not any(m.role == "assistant" for m in dialog):
            raise ValueError(f"{where}: the dialog has no assistant turn, so there is nothing to train on")
        dialogs.append(dialog)
    if not dialogs:
        raise ValueError(f"{path} holds no dialogs")
    return dialogs


def _response(obj: Any, where: str) -> Message:
    if isinstance(obj, str):
        return Message("assistant", obj)
    msg = _message(obj, where)
    if msg.role != "assistant":
        raise ValueError(f"{where}: a response must be an assistant message, got role {msg.role!r}")
    return msg


def read_preference_jsonl(path: str | os.PathLike) -> list[PreferencePair]:
    """Preference pairs from a JSONL file (see the module docstring for the format)."""
    pairs = []
    allowed = {"prompt", "chosen", "rejected", "edited"}
    for lineno, obj in _lines(path):
        where = f"{path}:{lineno}"
        if not isinstance(obj, dict):
            raise ValueError(f"{where}: expected an object with prompt, chosen and rejected")
        missing = [k for k in ("prompt", "chosen", "rejected") if k not in obj]
        if missing:
            raise ValueError(f"{where}: missing {', '.join(missing)}")
        if set(obj) - allowed:
            raise ValueError(f"{where}: unknown keys {sorted(set(obj) - allowed)}; allowed: {sorted(allowed)}")
        prompt = obj["prompt"]
        if isinstance(prompt, str):
            messages = [Message("user", prompt)]
        elif isinstance(prompt, list) and prompt:
            messages = [_message(m, f"{where}: prompt message {i}") for i, m in enumerate(prompt)]
        else:
            raise ValueError(f"{where}: prompt must be a string or a non-empty list of messages")
        if messages[-1].role == "assistant":
            raise ValueError(f"{where}: the prompt ends with an assistant turn; the responses are that turn")
        edited = obj.get("edited")
        pairs.append(PreferencePair(
            prompt=messages,
            chosen=_response(obj["chosen"], f"{where}: chosen"),
            rejected=_response(obj["rejected"], f"{where}: rejected"),
            edited=None if edited is None else _response(edited, f"{where}: edited"),
        ))
    if not pairs:
        raise ValueError(f"{path} holds no preference pairs")
    return pairs


def _write_lines(path: str | os.PathLike, rows: Iterable[dict[str, Any]]) -> Path:
    return atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def write_chat_jsonl(path: str | os.PathLike, dialogs: Iterable[Sequence[Message]]) -> Path:
    """Write dialogs as chat JSONL, atomically (readers never see a partial file)."""
    return _write_lines(path, ({"messages": [_message_to_json(m) for m in d]} for d in dialogs))


def write_preference_jsonl(path: str | os.PathLike, pairs: Iterable[PreferencePair]) -> Path:
    """Write preference pairs as JSONL, atomically."""
    def row(p: PreferencePair) -> dict[str, Any]:
        out = {"prompt": [_message_to_json(m) for m in p.prompt], "chosen": _message_to_json(p.chosen),
               "rejected": _message_to_json(p.rejected)}
        if p.edited is not None:
            out["edited"] = _message_to_json(p.edited)
        return out

    return _write_lines(path, (row(p) for p in pairs))


# ---- tokenising and packing ------------------------------------------------------------------


def encode_dialog(fmt: ChatFormat, dialog: Sequence[Message], *, max_len: int | None = None) -> ChatTokens:
    """BOS + the whole dialog with its assistant mask, no open header (training form).

    Dialogs longer than `max_len` are cut at the end; a cut assistant turn loses its eot, which
    is what truncating a long answer means.
    """
    enc = fmt.encode_dialog_prompt(dialog, add_generation_prompt=False)
    if max_len is not None and len(enc.tokens) > max_len:
        enc = ChatTokens(enc.tokens[:max_len], enc.assistant_mask[:max_len])
    return enc


@dataclass
class _Piece:
    inputs: list[int]
    targets: list[int]


def _shift(enc: ChatTokens, all_tokens: bool) -> _Piece:
    # Target i is token i+1, trained only where the chat format marks token i+1 as assistant's.
    t, m = enc.tokens, enc.assistant_mask
    return _Piece(t[:-1], [t[i + 1] if m[i + 1] or all_tokens else IGNORE_INDEX for i in range(len(t) - 1)])


def pack_sft(
    examples: Sequence[ChatTokens], *, seq_len: int, pad_id: int = 0, all_tokens: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """First-fit-decreasing packing into rows of `seq_len`: (inputs, targets, doc_ids), each (N, S).

    Each example becomes one document (inputs = tokens[:-1], targets shifted); padding gets its
    own document id -1 and target -100. `all_tokens` trains every next token of a dialog, not
    only the assistant's (distillation and calibration use it). Examples longer than seq_len + 1
    tokens are an error here: cut them with `encode_dialog(max_len=...)` first.
    """
    pieces = [_shift(e, all_tokens) for e in examples if len(e.tokens) >= 2]
    too_long = [len(p.inputs) for p in pieces if len(p.inputs) > seq_len]
    if too_long:
        raise ValueError(
            f"{len(too_long)} examples have more than seq_len={seq_len} inputs (longest {max(too_long)}); "
            "raise seq_len or cut them with encode_dialog(max_len=seq_len + 1)"
        )
    order = sorted(range(len(pieces)), key=lambda i: -len(pieces[i].inputs))
    rows: list[list[int]] = []  # indices of pieces per row
    free: list[int] = []
    for i in order:
        n = len(pieces[i].inputs)
        for r, room in enumerate(free):
            if room >= n:
                rows[r].append(i)
                free[r] -= n
                break
        else:
            rows.append([i])
            free.append(seq_len - n)
    inputs = torch.full((len(rows), seq_len), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), seq_len), IGNORE_INDEX, dtype=torch.long)
    doc_ids = torch.full((len(rows), seq_len), -1, dtype=torch.long)
    for r, members in enumerate(rows):
        pos = 0
        for doc, i in enumerate(members):
            p = pieces[i]
            n = len(p.inputs)
            inputs[r, pos : pos + n] = torch.tensor(p.inputs)
            targets[r, pos : pos + n] = torch.tensor(p.targets)
            doc_ids[r, pos : pos + n] = doc
            pos += n
    return inputs, targets, doc_ids


class IndexBatches:
    """Batches of indices into n items, reshuffled every pass; `state_dict` resumes exactly."""

    def __init__(self, n: int, *, batch_size: int, seed: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if n == 0:
            raise ValueError("nothing to draw batches from: the data set is empty")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.epoch, self.cursor = 0, 0
        self._order = self._permutation()

    def _permutation(self) -> list[int]:
        order = list(range(self.n))
        random.Random(self.seed + self.epoch).shuffle(order)
        return order

    def next_indices(self) -> list[int]:
        idx = []
        while len(idx) < self.batch_size:
            if self.cursor == self.n:
                self.epoch, self.cursor = self.epoch + 1, 0
                self._order = self._permutation()
            idx.append(self._order[self.cursor])
            self.cursor += 1
        return idx

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._order = self._permutation()


class PackedBatches(IndexBatches):
    """Shuffled batches of packed rows (inputs, targets, doc_ids), each (N, S)."""

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor, doc_ids: torch.Tensor, *, batch_size: int,
                 seed: int) -> None:
        super().__init__(inputs.shape[0], batch_size=batch_size, seed=seed)
        self.inputs, self.targets, self.doc_ids = inputs, targets, doc_ids

    def next_batch(self) -> Batch:
        idx = self.next_indices()
        targets = self.targets[idx]
        return Batch(self.inputs[idx], targets, self.doc_ids[idx], int((targets != IGNORE_INDEX).sum()))


# ---- real chat data that installs with pip ------------------------------------------------------

CHATTERBOT_PACKAGE = "chatterbot-corpus"


@dataclass
class Conversation:
    """A prompt and its real answer from a named category (for SFT and mismatched preference pairs)."""

    prompt: str
    answer: str
    category: str
    history: list[str] = field(default_factory=list)  # earlier turns, alternating user / assistant


def chatterbot_conversations(language: str = "english") -> list[Conversation]:
    """Every (turn, next turn) pair of the chatterbot-corpus YAML files (BSD-3), category = file name.

    Longer conversations give one example per assistant turn, with the earlier turns as history.
    Files are found through the package metadata, never by importing the package.
    """
    import yaml  # optional dependency, in the posttrain extra

    try:
        dist = metadata.distribution(CHATTERBOT_PACKAGE)
    except metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"the chat demo data ships in the PyPI package {CHATTERBOT_PACKAGE}; install it with "
            f"`pip install {CHATTERBOT_PACKAGE}==1.3.3 pyyaml` (the posttrain extra does this)"
        ) from None
    root = Path(dist.locate_file(f"chatterbot_corpus/data/{language}"))
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is missing; chatterbot-corpus has no language {language!r}")
    out = []
    for path in sorted(root.glob("*.yml")):
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f) or {}
        for conv in doc.get("conversations") or []:
            turns = [str(t).strip() for t in conv if t is not None and str(t).strip()]
            # Turn 0 is the user; answers are the odd turns.
            for j in range(1, len(turns), 2):
                out.append(Conversation(prompt=turns[j - 1], answer=turns[j], category=path.stem,
                                        history=turns[: j - 1]))
    return out


def conversation_dialog(conv: Conversation, *, system: str | None = None, answer: str | None = None) -> list[Message]:
    """The conversation as messages; `answer` replaces the real answer (None keeps it, "" drops it)."""
    messages = [Message("system", system)] if system else []
    for i, turn in enumerate(conv.history):
        messages.append(Message("user" if i % 2 == 0 else "assistant", turn))
    messages.append(Message("user", conv.prompt))
    text = conv.answer if answer is None else answer
    if text:
        messages.append(Message("assistant", text))
    return messages


def mismatched_pairs(
    conversations: Sequence[Conversation], *, seed: int, system: str | None = None
) -> list[PreferencePair]:
    """chosen = the real answer, rejected = the answer of a conversation from another category.

    Another category (not just another conversation) keeps a rejected answer from being an
    equally good paraphrase, since chatterbot repeats prompts with several valid answers.
    """
    rng = random.Random(seed)
    by_category: dict[str, list[int]] = {}
    for i, c in enumerate(conversations):
        by_category.setdefault(c.category, []).append(i)
    if len(by_category) < 2:
        raise ValueError("mismatched pairs need conversations from at least two categories")
    pairs = []
    for c in conversations:
        other = rng.choice([k for k in by_category if k != c.category])
        wrong = conversations[rng.choice(by_category[other])].answer
        pairs.append(PreferencePair(prompt=conversation_dialog(c, system=system, answer=""),
                                    chosen=Message("assistant", c.answer), rejected=Message("assistant", wrong)))
    return pairs
