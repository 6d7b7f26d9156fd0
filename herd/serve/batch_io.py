"""The files of offline batch generation: reading a JSONL of prompts, appending finished results.

Input: one JSON object per line, `{"id": ..., "prompt": "..."}` or `{"id": ..., "messages": [...]}`,
with optional per-line `max_tokens`, `temperature`, `top_p`, `top_k`, `n`, `seed`, `stop` and a free
`metadata` value that is copied to the output. Any other key is an error (a typo such as
`max_token` would otherwise silently fall back to the default).

Damaged lines (not JSON, a missing or duplicate id, a wrong type, a prompt longer than the context)
follow herd's data readers: by default each is skipped and counted, with its file, line number and
problem reported; with `strict` the first one is an error. A duplicate id keeps its first line.

Output: append-only JSONL, one line per finished id, flushed and fsync'ed before the next is
written, so a crash loses at most the requests still running and never leaves a corrupt line in
the middle. A crash during a write can leave a torn last line (no newline, or not JSON); reopening
the file for a restart cuts it off, and that id is generated again.

Seeds: a line's own `seed` is used as given; otherwise, when the run has a seed, each id gets one
derived from (run seed, id) by hashing, so an id's samples do not depend on which shard or batch
it landed in, or on what ran beside it. The engine seeds choice i with seed + i.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from herd.generate import SamplingParams
from herd.tokenizer import Message

INPUT_KEYS = frozenset({"id", "prompt", "messages", "max_tokens", "temperature", "top_p", "top_k", "n", "seed",
                        "stop", "metadata"})
SEED_BITS = 62  # the engine adds the choice index; torch seeds are 64-bit


@dataclass(frozen=True)
class BatchDefaults:
    """Sampling settings for lines that do not set their own (the CLI's flags)."""

    max_tokens: int = 256
    temperature: float = 0.6
    top_p: float = 0.9
    top_k: int | None = None
    n: int = 1
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass
class BatchItem:
    """One input line, encoded and ready to submit. `order` is its rank among the input's valid
    lines (what shards are assigned by, so that a restart assigns the same ids to the same shard)."""

    id: str | int
    line: int
    order: int
    prompt: list[int]
    max_tokens: int
    sampling: SamplingParams
    n: int = 1
    stop: tuple[str, ...] = ()
    metadata: Any = None


@dataclass
class BatchInput:
    """The lines to run, the problems of the lines skipped, and how many ids were already done."""

    items: list[BatchItem]
    skipped: list[str] = field(default_factory=list)
    already_done: int = 0
    ids: list[str | int] = field(default_factory=list)  # every valid id in input order (for merging)


def item_seed(run_seed: int, item_id: str | int) -> int:
    """A seed for one id, from the run's seed and the id alone (not its position or shard).
    The id's JSON text is hashed, so the id 1 and the id "1" get different seeds."""
    digest = hashlib.sha256(f"{run_seed}\x00{json.dumps(item_id)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> (64 - SEED_BITS)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _messages(raw: Any) -> list[Message]:
    if not isinstance(raw, list) or not raw:
        raise ValueError('"messages" must be a non-empty list of {"role": ..., "content": ...} objects')
    out = []
    for j, m in enumerate(raw):
        if not isinstance(m, dict) or set(m) - {"role", "content"} or not isinstance(m.get("role"), str) \
                or not isinstance(m.get("content"), str):
            raise ValueError(f'messages[{j}] must be {{"role": str, "content": str}}, got {json.dumps(m)[:80]}')
        out.append(Message(role=m["role"], content=m["content"]))
    if out[-1].role == "assistant":
        raise ValueError("the last message is the assistant's; end with a user (or system/ipython) turn to answer")
    return out


def parse_line(
    obj: Any,
    *,
    line: int,
    order: int,
    defaults: BatchDefaults,
    encode_text: Callable[[str], list[int]],
    encode_messages: Callable[[list[Message]], list[int]],
    context: int,
    max_n: int,
) -> BatchItem:
    """One decoded JSON line -> a BatchItem; ValueError names the problem (the caller adds file:line)."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    unknown = set(obj) - INPUT_KEYS
    if unknown:
        raise ValueError(f"unknown key(s) {sorted(unknown)}; allowed: {sorted(INPUT_KEYS)} "
                         "(put extra fields under \"metadata\")")
    if "id" not in obj:
        raise ValueError('missing "id" (a string or an integer that names this line in the output)')
    item_id = obj["id"]
    if not (isinstance(item_id, str) or _is_int(item_id)):
        raise ValueError(f'"id" must be a string or an integer, got {json.dumps(item_id)[:40]}')
    if ("prompt" in obj) == ("messages" in obj):
        raise ValueError('give exactly one of "prompt" (text) or "messages" (a chat, formatted with the chat template)')
    if "prompt" in obj:
        if not isinstance(obj["prompt"], str):
            raise ValueError(f'"prompt" must be a string, got {type(obj["prompt"]).__name__}')
        prompt = encode_text(obj["prompt"])
    else:
        prompt = encode_messages(_messages(obj["messages"]))
    max_tokens = obj.get("max_tokens", defaults.max_tokens)
    if not _is_int(max_tokens) or max_tokens < 1:
        raise ValueError(f'"max_tokens" must be an integer >= 1, got {max_tokens!r}')
    n = obj.get("n", defaults.n)
    if not _is_int(n) or not 1 <= n <= max_n:
        raise ValueError(f'"n" must be an integer in 1..{max_n} (one engine slot per choice), got {n!r}')
    for key in ("temperature", "top_p"):
        if key in obj and not _is_number(obj[key]):
            raise ValueError(f'"{key}" must be a number, got {obj[key]!r}')
    top_k = obj.get("top_k", defaults.top_k)
    if top_k is not None and not _is_int(top_k):
        raise ValueError(f'"top_k" must be an integer or null, got {top_k!r}')
    seed = obj.get("seed")
    if seed is not None and (not _is_int(seed) or not 0 <= seed < 2**SEED_BITS):
        raise ValueError(f'"seed" must be an integer in 0..2^{SEED_BITS}-1, got {seed!r}')
    if seed is None and defaults.seed is not None:
        seed = item_seed(defaults.seed, item_id)
    sampling = SamplingParams(temperature=float(obj.get("temperature", defaults.temperature)),
                              top_p=float(obj.get("top_p", defaults.top_p)), top_k=top_k, seed=seed)
    stop = obj.get("stop", list(defaults.stop))
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or any(not isinstance(s, str) or not s for s in stop):
        raise ValueError(f'"stop" must be a non-empty string or a list of them, got {json.dumps(stop)[:60]}')
    if len(prompt) >= context:
        raise ValueError(f"the prompt has {len(prompt)} tokens but the context is {context}; shorten it or "
                         "raise --max-seq-len")
    return BatchItem(item_id, line, order, prompt, max_tokens, sampling, n, tuple(stop), obj.get("metadata"))


def read_batch_input(
    path: str | os.PathLike[str],
    *,
    defaults: BatchDefaults,
    encode_text: Callable[[str], list[int]],
    encode_messages: Callable[[list[Message]], list[int]],
    context: int,
    max_n: int,
    done: Collection[str | int] = (),
    strict: bool = False,
) -> BatchInput:
    """Every line of the input JSONL, checked; ids in `done` are counted but not encoded."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input {str(path)!r} does not exist; pass a JSONL file of "
                                '{"id": ..., "prompt": ...} lines')
    out = BatchInput(items=[])
    seen: dict[Any, int] = {}
    order = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                try:
                    obj = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise ValueError(f"not a JSON line ({e})") from None
                item_id = obj.get("id") if isinstance(obj, dict) else None
                key = json.dumps(item_id)
                if item_id is not None and key in seen:
                    raise ValueError(f"duplicate id {key[:40]} (first on line {seen[key]}); ids must be unique")
                if (isinstance(item_id, str) or _is_int(item_id)) and item_id in done:
                    seen[key] = lineno
                    out.ids.append(item_id)
                    out.already_done += 1
                    order += 1
                    continue
                item = parse_line(obj, line=lineno, order=order, defaults=defaults, encode_text=encode_text,
                                  encode_messages=encode_messages, context=context, max_n=max_n)
            except ValueError as e:
                problem = f"{path}:{lineno}: {e}"
                if strict:
                    raise ValueError(f"{problem} (without --strict such lines are skipped and counted)") from None
                out.skipped.append(problem)
                continue
            seen[key] = lineno
            out.ids.append(item.id)
            out.items.append(item)
            order += 1
    return out


# ---- the results file -------------------------------------------------------------------------------


def read_results(path: str | os.PathLike[str]) -> tuple[list[dict], int]:
    """The complete records of a results file and the byte length they span. A torn last line
    (a crash mid-write: no newline, or not JSON) is left out; damage before the end is an error,
    since this writer never leaves any."""
    path = Path(path)
    if not path.exists():
        return [], 0
    data = path.read_bytes()
    records, good = [], 0
    lines = data.split(b"\n")
    for i, raw in enumerate(lines):
        last = i == len(lines) - 1  # after the final newline: "" when the file ends cleanly
        if last:
            break  # no newline after it: torn (or empty)
        try:
            rec = json.loads(raw)
            if not isinstance(rec, dict) or "id" not in rec:
                raise ValueError("no id")
        except ValueError as e:
            if i == len(lines) - 2 and not lines[-1]:
                break  # the last line, newline included, but cut inside: torn too
            raise ValueError(f"{path}:{i + 1}: not a result line ({e}); this file was not written by herd's batch "
                             "generation, or was edited. Move it away or pass --overwrite") from None
        records.append(rec)
        good += len(raw) + 1
    return records, good


class ResultsFile:
    """Append-only JSONL of finished results: one line per `append`, flushed and fsync'ed."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        records, good = read_results(self.path)
        self.done = {r["id"] for r in records}
        new = not self.path.exists()
        self._f = open(self.path, "ab")
        if self._f.tell() > good:  # cut a torn last line off before appending after it
            self._f.truncate(good)
            self._f.seek(good)
        if new:  # the file's own directory entry must survive a crash too
            _fsync_dir(self.path.parent)

    def append(self, record: dict) -> None:
        self._f.write(json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n")
        self._f.flush()
        os.fsync(self._f.fileno())
        self.done.add(record["id"])

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> ResultsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not every platform opens folders
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
