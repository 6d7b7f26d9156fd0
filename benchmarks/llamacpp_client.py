"""The benchmarks' handle on `llamacpp_worker.py`: one llama.cpp process per GGUF file.

Each `LlamaCppProcess` starts the worker with the same Python interpreter (llama-cpp-python
must be installed there) and talks JSON lines to it; the worker never imports torch.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

WORKER = Path(__file__).with_name("llamacpp_worker.py")


class LlamaCppProcess:
    def __init__(self, gguf: str | Path, *, threads: int, n_ctx: int, n_batch: int = 512):
        self.path = Path(gguf)
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER), "--model", str(gguf), "--threads", str(threads), "--n-ctx", str(n_ctx),
             "--n-batch", str(n_batch)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
        )
        hello = self._read()
        if hello.get("torch_loaded"):
            raise RuntimeError("the llama.cpp worker imported torch; it must run without it")
        self.n_vocab = int(hello["n_vocab"])

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the llama.cpp worker for {self.path.name} exited (code {self.proc.poll()})")
        return json.loads(line)

    def _call(self, cmd: str, **kwargs) -> dict:
        self.proc.stdin.write(json.dumps({"cmd": cmd, **kwargs}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def run(self, prompt: list[int], n: int) -> tuple[float, list[float]]:
        """(0.0, a timestamp per greedy token in seconds since the prompt was submitted)."""
        reply = self._call("run", prompt=list(prompt), n=n)
        return 0.0, reply["stamps"]

    def logits(self, prompt: list[int], continuation: list[int]) -> np.ndarray:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "logits.npy"
            self._call("logits", prompt=list(prompt), continuation=list(continuation), out=str(out))
            return np.load(out)

    def nll(self, windows: list[tuple[list[int], int]]) -> tuple[float, int]:
        reply = self._call("nll", windows=[[list(ids), int(first)] for ids, first in windows])
        return reply["nll_sum"], reply["count"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=30)

    def __enter__(self) -> LlamaCppProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
