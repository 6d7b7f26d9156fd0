"""Tensor-parallel serving: rank 0 schedules, every rank runs the same forwards on its own shard.

`herd serve --tp N` runs one `Engine` per rank over that rank's slice of the model
(`herd.parallel.inference.load_tp_model`: its query and KV heads, a slice of the FFN and of the
vocabulary; all-reduces after wo and w2, all-gathered logits). Only rank 0 has the HTTP server,
the queue, the scheduler (admission, chunked prefill, prefix cache, preemption), the samplers and
the logits processors. The followers hold the same model-sized state rank 0 does, for their
heads: a `KVCache` of the same rows and a `BlockStore` of the same blocks. They must change it
exactly as rank 0 does, and join every collective of every forward, in the same order.

Design: rank 0 broadcasts a *step plan* before each forward, and the followers replay it. A plan
is one flat int64 message: the KV copies the engine made since the previous forward (a prefix
hit loading blocks into a row, full blocks saved into the pool, a fork copying a row), then the
forward itself (a prefill chunk: slot, position, tokens, whether the last position's logits and
how many positions' prompt logprobs are computed; or a decode step: every row's token and
position). The alternative was to wrap the model's forward and the store's copies so each call
broadcast its own inputs. It loses on two counts:
* the calls are not self-describing: the engine runs the output head over slices of a hidden
  state the previous call returned (the last position, then 256-position spans for prompt
  logprobs) and attends through a `RowCache` view; wrapping them means shipping which slice of
  which tensor, while a plan names the few integers the engine decided on (slot, pos, counts)
  and the follower derives the same calls from them (`scoring.head_spans`). This decided it.
* messages: the copies happen between forwards, so they ride in the next forward's message;
  wrapped, each would be a broadcast of its own (a decode step in which 8 sequences fill a block
  makes 8 saves). In tests/unit/serve/test_tp_plan.py's workload, 34 forwards carried 20 copies
  in 34 messages; wrapped calls would have sent 54. On a CPU this hardly matters: a plan's two
  broadcasts (its length, then its ints) took 0.42 ms beside 97.6 ms for the 8-row decode step
  it announces (benchmarks/serve_tp_plan.py, two gloo ranks on a loaded 2-core machine); on GPUs,
  where a decode step takes milliseconds, each extra broadcast's latency counts for more.

Sampling is rank 0's alone: every rank gets the same all-gathered logits, but only rank 0 picks
tokens; the followers learn them as the next decode step's inputs. So sampling seeds need not be
shared and logits processors (grammars) run once.

Failure and shutdown: `Engine.stop()` sends STOP after its thread has finished, and a follower
returns from `Follower.run`. The followers ignore SIGINT and SIGTERM (`herd serve --tp` sets
that up), so however the server is stopped, they leave only when rank 0 has finished. While the engine waits for work it sends a heartbeat every
`heartbeat_s`, so a follower's pending broadcast never reaches the process group's timeout
(gloo's default is 30 min, NCCL's watchdog 10 min). A failed step on rank 0 is fatal (the
followers may be inside that forward's collectives, so no later message would line up): the
engine fails the running requests and calls `abort`, which stops the server (SIGINT to this
process) without sending STOP; rank 0 then exits non-zero and torchrun tears the followers down
(their pending broadcast fails when rank 0's connection closes, or torchrun SIGKILLs them). If
rank 0 dies outright, the same happens; the process-group timeout is the last backstop.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from herd.generate import KVCache, decode_step
from herd.model.llama import Transformer
from herd.serve.pages import BlockStore, RowCache
from herd.serve.scoring import head_spans

log = logging.getLogger(__name__)

# Op codes, each followed by its operands in the flat message.
LOAD = 1  # slot, n, blocks[n]: pool blocks into positions 0..n*bs-1 of the row
SAVE = 2  # slot, first, n, blocks[n]: the row's blocks first..first+n-1 into pool blocks
COPY = 3  # src, dst, n: positions 0..n-1 of row src into row dst
PREFILL = 4  # slot, pos, c, last, scored, tokens[c]
DECODE = 5  # B, tokens[B], pos[B]
HEARTBEAT = 6
STOP = 7
OP_NAMES = {LOAD: "load", SAVE: "save", COPY: "copy", PREFILL: "prefill", DECODE: "decode",
            HEARTBEAT: "heartbeat", STOP: "stop"}


class _RecordingStore(BlockStore):
    """Rank 0's block store: each copy is also written down for the next plan."""

    def __init__(self, cache: KVCache, num_blocks: int, block_size: int, plan: list[int]):
        super().__init__(cache, num_blocks, block_size)
        self._plan = plan

    def save(self, cache: KVCache, row: int, first: int, blocks: Sequence[int]) -> None:
        if blocks:
            self._plan += [SAVE, row, first, len(blocks), *blocks]
        super().save(cache, row, first, blocks)

    def load(self, cache: KVCache, row: int, blocks: Sequence[int]) -> None:
        if blocks:
            self._plan += [LOAD, row, len(blocks), *blocks]
        super().load(cache, row, blocks)

    def copy_row(self, cache: KVCache, src: int, dst: int, n: int) -> None:
        self._plan += [COPY, src, dst, n]
        super().copy_row(cache, src, dst, n)


class Leader:
    """Rank 0's side, handed to `Engine(mirror=...)`: the engine reports each forward before it
    runs it, and the plan (the copies since the last forward, then the forward) goes to `send`.

    send: delivers one message to every follower (`broadcast_sender`; tests pass a list's append).
    heartbeat_s: idle seconds between heartbeats.
    """

    def __init__(self, send: Callable[[list[int]], None], *, heartbeat_s: float = 60.0):
        self._send_fn, self.heartbeat_s = send, heartbeat_s
        self._plan: list[int] = []
        self.messages = 0  # sent so far, and the copies they carried (for the design's evidence)
        self.copies = 0
        self.stopped = self.aborted = False

    def store(self, cache: KVCache, num_blocks: int, block_size: int) -> BlockStore:
        """The engine's block store, recording its copies into this leader's plan."""
        return _RecordingStore(cache, num_blocks, block_size, self._plan)

    def prefill(self, slot: int, pos: int, tokens: Sequence[int], *, last: bool, scored: int) -> None:
        """A prefill chunk of `tokens` at `pos` into row `slot`; `last`: the output head runs on its
        last position; `scored`: it also runs on the first `scored` positions (prompt logprobs)."""
        self._send([PREFILL, slot, pos, len(tokens), int(last), scored, *tokens])

    def decode(self, tokens: Sequence[int], pos: Sequence[int]) -> None:
        """A decode step over rows 0..len(tokens)-1."""
        self._send([DECODE, len(tokens), *tokens, *pos])

    def heartbeat(self) -> None:
        self._send([HEARTBEAT])

    def stop(self) -> None:
        """Tell the followers to return (once; not after `abort`)."""
        if self.stopped or self.aborted:
            return
        self.stopped = True
        try:
            self._send([STOP])
        except Exception:  # a follower already gone (torchrun tearing the group down): nothing to stop
            log.exception("could not send stop to the tensor-parallel followers")

    def abort(self) -> None:
        """A step failed: stop serving without talking to the followers again (see the module doc)."""
        self.aborted = True
        log.error("tensor-parallel step failed; shutting the server down (the other ranks are torn down with it)")
        os.kill(os.getpid(), signal.SIGINT)  # uvicorn's graceful shutdown, as Ctrl-C

    def _send(self, op: list[int]) -> None:
        assert not self.stopped or op == [STOP], "the followers were told to stop"
        self.copies += count_copies(self._plan)
        message = self._plan + op
        self._plan.clear()  # in place: the recording store appends to this list
        self._send_fn(message)
        self.messages += 1


def count_copies(plan: Sequence[int]) -> int:
    """The KV copies (LOAD/SAVE/COPY) in a message."""
    return sum(1 for code, _ in _ops(plan) if code in (LOAD, SAVE, COPY))


def _ops(message: Sequence[int]):
    """(op code, operands) pairs of a message."""
    i = 0
    while i < len(message):
        code = message[i]
        if code == LOAD:
            n = 2 + message[i + 2]
        elif code == SAVE:
            n = 3 + message[i + 3]
        elif code == COPY:
            n = 3
        elif code == PREFILL:
            n = 5 + message[i + 3]
        elif code == DECODE:
            n = 1 + 2 * message[i + 1]
        elif code in (HEARTBEAT, STOP):
            n = 0
        else:
            raise ValueError(f"unknown op code {code} at {i} in a step plan of {len(message)} ints: rank 0 and this "
                             "rank run different herd versions, or the message was corrupted")
        if i + 1 + n > len(message):
            raise ValueError(f"step plan truncated: {OP_NAMES[code]} at {i} needs {n} operands, "
                             f"{len(message) - i - 1} left")
        yield code, list(message[i + 1 : i + 1 + n])
        i += 1 + n


class Follower:
    """A follower rank's side: replays rank 0's plans on this rank's model, rows and blocks.

    model, cache, store: this rank's, sized as rank 0's (build them with an `Engine` of the same
    arguments and no mirror, and pass its `model`, `cache` and `store`).
    """

    def __init__(self, model: Transformer, cache: KVCache, store: BlockStore):
        self.model, self.cache, self.store = model, cache, store
        self.device = cache.k[0].device
        self.forwards = 0

    def replay(self, message: Sequence[int]) -> bool:
        """Apply one message; False when it was STOP."""
        with torch.inference_mode():
            for code, a in _ops(message):
                if code == LOAD:
                    self.store.load(self.cache, a[0], a[2:])
                elif code == SAVE:
                    self.store.save(self.cache, a[0], a[1], a[3:])
                elif code == COPY:
                    self.store.copy_row(self.cache, a[0], a[1], a[2])
                elif code == PREFILL:
                    self._prefill(slot=a[0], pos=a[1], last=bool(a[3]), scored=a[4], tokens=a[5:])
                elif code == DECODE:
                    B = a[0]
                    tokens = torch.tensor(a[1 : 1 + B], device=self.device)
                    pos = torch.tensor(a[1 + B :], device=self.device)
                    decode_step(self.model, tokens, pos, self.cache)  # the logits: rank 0 samples
                    self.forwards += 1
                elif code == STOP:
                    return False
        return True

    def _prefill(self, *, slot: int, pos: int, last: bool, scored: int, tokens: list[int]) -> None:
        # The same calls, in the same order, as Engine._prefill and scoring.score_chunk make.
        t = torch.tensor([tokens], dtype=torch.long, device=self.device)
        h = self.model.hidden(t, pos=pos, cache=RowCache(self.cache, slot))  # (1, c, dim)
        if last:
            self.model.output(h[:, -1])
        for a, b in head_spans(scored):
            self.model.output(h[0, a:b])
        self.forwards += 1

    def run(self, receive: Callable[[], list[int]]) -> None:
        """Replay messages from `receive` until STOP."""
        while self.replay(receive()):
            pass


# ---- the transport: torch.distributed broadcasts from rank 0 --------------------------------------


def broadcast_sender(device: torch.device | str, group: dist.ProcessGroup | None = None
                     ) -> Callable[[list[int]], None]:
    """Rank 0's `send`: the message's length, then its ints (on `device`: NCCL moves only CUDA tensors)."""

    def send(message: list[int]) -> None:
        dist.broadcast(torch.tensor([len(message)], dtype=torch.long, device=device), src=0, group=group)
        dist.broadcast(torch.tensor(message, dtype=torch.long, device=device), src=0, group=group)

    return send


def broadcast_receiver(device: torch.device | str, group: dist.ProcessGroup | None = None
                       ) -> Callable[[], list[int]]:
    """A follower's `receive`, the other end of `broadcast_sender`."""

    def receive() -> list[int]:
        n = torch.empty(1, dtype=torch.long, device=device)
        dist.broadcast(n, src=0, group=group)
        buf = torch.empty(int(n.item()), dtype=torch.long, device=device)
        dist.broadcast(buf, src=0, group=group)
        return buf.tolist()

    return receive
