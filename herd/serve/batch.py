"""Offline batch generation: a JSONL file of prompts through the continuous-batching engine.

What it is for: rejection sampling and synthetic data (the paper's post-training rounds generate
K answers for every prompt of a large set), where throughput matters and latency does not.

Design trade-offs:
* The engine, not `herd.generate.generate`: requests are submitted while the engine's bounded
  queue takes them (`QueueFull` means "step first") and written as each finishes, so a short
  answer frees its slot for the next prompt at once instead of idling until the longest answer
  of a static batch ends. Only the engine's public API is used (submit, step or start, handles).
* Output in completion order, one line per id, appended and fsync'ed as it finishes (see
  `batch_io`): a crash loses only the requests in flight, and a restart skips every id already
  written. Consumers key on `id`, never on line order.
* Data parallelism by processes (`nproc`): worker i takes the valid input lines whose rank is i
  mod N (fixed by the input alone, so a restart gives each worker the same lines), loads its own
  copy of the model (on cuda:i when the device is cuda) and appends to its own part file; when
  all are done the parent merges output and parts in input order with one atomic rename. One
  command and one output, and parts are what resume reads, so an interrupted run of any N
  resumes under any N. Processes rather than Ray: a model per process is the unit of data
  parallelism on one machine, and several machines can split the input file and run a command
  each. Threads would not help: one engine already keeps the device busy.
* Reproducible sampling whatever the batching: each id gets its own seed (its line's, or one
  hashed from the run seed and the id), and the engine draws each choice from its own generator.
  What can still differ is the logits' last bits, which depend on the batch the row was decoded
  in; a sampled token flips only when that moves it across a probability boundary.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from multiprocessing import get_context
from pathlib import Path
from threading import Event as ThreadEvent
from typing import Any

import torch

from herd.generate.loading import LoadedModel, load_for_inference
from herd.io import atomic_write_text
from herd.serve.batch_io import BatchDefaults, BatchItem, ResultsFile, read_batch_input, read_results
from herd.serve.engine import Engine
from herd.serve.requests import FinishEvent, QueueFull, Request, RequestHandle, RequestResult


@dataclass
class BatchStats:
    """What one run did. `skipped` holds a "file:line: problem" per input line left out."""

    requests: int = 0  # valid ids in this run's share of the input
    already_done: int = 0  # of those, found in the output or a part file
    finished: int = 0  # generated and written now
    failed: int = 0  # ended with an engine error: not written, retried by the next run
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    skipped: list[str] = field(default_factory=list)

    def add(self, other: BatchStats) -> None:
        for name in ("requests", "already_done", "finished", "failed", "prompt_tokens", "completion_tokens"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.seconds = max(self.seconds, other.seconds)

    def summary(self) -> dict[str, Any]:
        tps = self.completion_tokens / self.seconds if self.seconds else 0.0
        return {"requests": self.requests, "already_done": self.already_done, "finished": self.finished,
                "failed": self.failed, "skipped_lines": len(self.skipped), "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "seconds": round(self.seconds, 3),
                "completion_tokens_per_second": round(tps, 2)}


def generate_all(
    engine: Engine, items: Iterable[BatchItem], *, stop_tokens: Iterable[int] = ()
) -> Iterator[tuple[BatchItem, RequestResult]]:
    """Every item through the engine, yielded as each finishes (completion order).

    Drives the engine with `step()`, or waits on it when its own thread runs (`engine.start()`).
    Closing the iterator early cancels what is still queued or running."""
    stop = tuple(stop_tokens)
    wake = ThreadEvent()  # set on the engine thread when a choice finishes

    def on_event(event: Any) -> None:
        if isinstance(event, FinishEvent):
            wake.set()

    source = iter(items)
    upcoming = next(source, None)
    active: dict[RequestHandle, BatchItem] = {}
    try:
        while upcoming is not None or active:
            while upcoming is not None:
                request = Request(upcoming.prompt, upcoming.max_tokens, upcoming.sampling, upcoming.n,
                                  stop_tokens=stop, stop_strings=upcoming.stop)
                try:
                    handle = engine.submit(request, on_event=on_event)
                except QueueFull:
                    break
                active[handle] = upcoming
                upcoming = next(source, None)
            if engine.running:
                wake.wait(1.0)
                wake.clear()
            else:
                busy = engine.step()
                assert busy or not active, "the engine went idle with requests unfinished"
            for handle in [h for h in active if h.done()]:
                yield active.pop(handle), handle.result(0)
    finally:
        for handle in active:
            handle.cancel()
        if active and not engine.running:
            engine.step()  # frees the cancelled requests' slots, so the engine can be reused


def result_record(item: BatchItem, result: RequestResult, decode: Callable[[list[int]], str]) -> dict[str, Any]:
    """One output line: per choice its text (cut before a stop string), finish reason and token count."""
    choices = []
    for c in result.choices:
        text = decode(c.tokens)
        if c.stop_string is not None and (at := text.find(c.stop_string)) >= 0:
            text = text[:at]
        choices.append({"index": c.index, "text": text, "finish_reason": c.finish_reason,
                        "completion_tokens": len(c.tokens)})
    record: dict[str, Any] = {"id": item.id, "choices": choices, "prompt_tokens": result.prompt_tokens,
                              "completion_tokens": result.completion_tokens, "seed": item.sampling.seed}
    if item.metadata is not None:
        record["metadata"] = item.metadata
    return record


def run_batch(
    engine: Engine,
    lm: LoadedModel,
    input_path: str | os.PathLike[str],
    results_path: str | os.PathLike[str],
    *,
    defaults: BatchDefaults,
    strict: bool = False,
    shard: tuple[int, int] = (0, 1),
    done: Iterable[str | int] = (),
    progress: bool = False,
    position: int = 0,
    chat: bool = False,
    system: str | None = None,
) -> BatchStats:
    """Generate every id of `input_path` in this shard that is not yet in `results_path` (nor in
    `done`), appending each result to `results_path` as it finishes. chat: "prompt" lines become a
    user turn in the chat format (after `system`, if given), as `herd generate --chat` does."""
    i, n = shard
    t0 = time.perf_counter()
    messages_encoder = _messages_encoder(lm)
    if chat:
        encode_text: Callable[[str], list[int]] = lambda text: lm.encode_user_turn(text, system=system)  # noqa: E731
    else:
        encode_text = lm.encode_text
    with ResultsFile(results_path) as results:
        batch = read_batch_input(input_path, defaults=defaults, encode_text=encode_text,
                                 encode_messages=messages_encoder, context=engine.max_seq_len, max_n=engine.max_batch,
                                 done=results.done | set(done), strict=strict)
        items = [x for x in batch.items if x.order % n == i]
        done_here = results.done | set(done)
        already = sum(1 for k, x in enumerate(batch.ids) if k % n == i and x in done_here)
        stats = BatchStats(requests=len(items) + already, already_done=already, skipped=batch.skipped)
        bar = _progress_bar(len(items), enabled=progress, desc=f"shard {i}/{n}" if n > 1 else "generate",
                            position=position)
        try:
            for item, result in generate_all(engine, items, stop_tokens=lm.stop_tokens):
                errors = [c.error or c.finish_reason for c in result.choices if c.finish_reason in ("error", "cancelled")]
                if errors:
                    stats.failed += 1
                    print(f"herd generate: id {item.id!r} (line {item.line}) failed: {errors[0]}; not written, "
                          "a rerun retries it", file=sys.stderr)
                else:
                    results.append(result_record(item, result, lm.tokenizer.decode))
                    stats.finished += 1
                    stats.prompt_tokens += result.prompt_tokens
                    stats.completion_tokens += result.completion_tokens
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(tokens=stats.completion_tokens, refresh=False)
        finally:
            if bar is not None:
                bar.close()
    stats.seconds = time.perf_counter() - t0
    return stats


def _messages_encoder(lm: LoadedModel) -> Callable[[list], list[int]]:
    def encode(messages: list) -> list[int]:
        return lm.chat.encode_dialog_prompt(messages).tokens  # ValueError when there is no chat template

    return encode


def _progress_bar(total: int, *, enabled: bool, desc: str, position: int):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=" req", position=position, file=sys.stderr, dynamic_ncols=True,
                disable=not sys.stderr.isatty())


# ---- a whole job: load, shard over processes, merge -------------------------------------------------


@dataclass(frozen=True)
class BatchJob:
    """Everything `herd generate --input` needs, picklable for worker processes."""

    checkpoint: str
    input: str
    output: str
    defaults: BatchDefaults = BatchDefaults()
    tokenizer: str | None = None
    device: str = "cpu"
    dtype: torch.dtype | None = None
    context: int | None = None  # tokens per engine slot; default the model's, at most 8192
    max_batch: int = 8
    max_queue: int | None = None  # default max_batch: a short queue keeps input order close to run order
    nproc: int = 1
    strict: bool = False
    overwrite: bool = False
    progress: bool = False
    chat: bool = False  # "prompt" lines as a user turn in the chat format
    system: str | None = None


def part_path(output: str | os.PathLike[str], i: int, n: int) -> Path:
    output = Path(output)
    return output.with_name(f"{output.name}.part{i}of{n}")


def _parts(output: str | os.PathLike[str]) -> list[Path]:
    output = Path(output)
    return sorted(output.parent.glob(f"{output.name}.part*of*"))


def _ids(path: Path) -> set[str | int]:
    return {r["id"] for r in read_results(path)[0]}


def run_batch_job(job: BatchJob) -> BatchStats:
    """Run (or resume) a batch job, in this process or in `nproc` workers, and leave one output file."""
    if job.nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {job.nproc}")
    if not Path(job.input).is_file():
        raise FileNotFoundError(f"input {job.input!r} does not exist; pass a JSONL file of "
                                '{"id": ..., "prompt": ...} lines')
    if Path(job.input).resolve() == Path(job.output).resolve():
        raise ValueError("--output must differ from --input (results are appended to the output)")
    if job.overwrite:
        for p in [Path(job.output), *_parts(job.output)]:
            p.unlink(missing_ok=True)
    if job.nproc == 1:
        done = set().union(*(_ids(p) for p in _parts(job.output)))
        stats = _run_shard(job, 0, 1, done, job.output)
    else:
        devices = _worker_devices(job.device, job.nproc)
        done = _ids(Path(job.output))
        ctx = get_context("spawn")  # a forked child would inherit torch's threads and CUDA state
        with ProcessPoolExecutor(job.nproc, mp_context=ctx) as pool:
            futures = [pool.submit(_shard_worker, replace(job, device=devices[i]), i, done) for i in range(job.nproc)]
            results = [f.result() for f in futures]
        stats = BatchStats(skipped=results[0].skipped)  # every worker read the same file
        for r in results:
            stats.add(r)
    if _parts(job.output):
        merge_results(job.input, job.output)
    return stats


def _worker_devices(device: str, nproc: int) -> list[str]:
    dev = torch.device(device)
    if dev.type != "cuda":
        return [device] * nproc
    if dev.index is not None:
        raise ValueError(f"--nproc {nproc} puts worker i on cuda:i; pass --device cuda, not {device}")
    count = torch.cuda.device_count()
    if count < nproc:
        raise ValueError(f"--nproc {nproc} needs {nproc} GPUs (one per worker) but torch sees {count}")
    return [f"cuda:{i}" for i in range(nproc)]


def _shard_worker(job: BatchJob, i: int, done: set) -> BatchStats:
    if torch.device(job.device).type == "cpu":  # N workers share the cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // job.nproc))
    others = set().union(*(_ids(p) for p in _parts(job.output) if p != part_path(job.output, i, job.nproc)))
    return _run_shard(job, i, job.nproc, done | others, part_path(job.output, i, job.nproc))


def _run_shard(job: BatchJob, i: int, n: int, done: set, results_path: str | os.PathLike[str]) -> BatchStats:
    lm = load_for_inference(job.checkpoint, tokenizer=job.tokenizer, dtype=job.dtype, device=job.device,
                            max_seq_len=job.context)
    context = job.context or min(lm.model.args.max_seq_len, 8192)
    engine = Engine(lm.model, max_batch=job.max_batch, max_queue=job.max_queue or job.max_batch,
                    max_seq_len=context, token_bytes=lm.tokenizer.decode_single_token_bytes)
    return run_batch(engine, lm, job.input, results_path, defaults=job.defaults, strict=job.strict, shard=(i, n),
                     done=done, progress=job.progress, position=i, chat=job.chat, system=job.system)


def merge_results(input_path: str | os.PathLike[str], output: str | os.PathLike[str]) -> int:
    """Fold the part files into `output` (one record per id, in input order; ids no longer in the
    input last) with one atomic write, then delete the parts. Returns the number of records."""
    order: dict[str, int] = {}
    with open(input_path, "rb") as f:
        for k, raw in enumerate(f):
            try:
                obj = json.loads(raw)
            except ValueError:
                continue
            if isinstance(obj, dict) and "id" in obj:
                order.setdefault(json.dumps(obj["id"]), k)
    parts = _parts(output)
    records: dict[str, dict] = {}
    for path in [Path(output), *parts]:
        for rec in read_results(path)[0]:
            records.setdefault(json.dumps(rec["id"]), rec)
    ranked = sorted(records.items(), key=lambda kv: order.get(kv[0], len(order)))
    atomic_write_text(output, "".join(json.dumps(r, ensure_ascii=False) + "\n" for _, r in ranked))
    for p in parts:  # after the rename: a crash in between leaves duplicates, which the next merge drops
        p.unlink()
    return len(ranked)
