"""Model builders shared by the tests (import as `from tests.helpers import ...`).

Greedy comparisons between two decoding paths (batched and single-row, speculative and plain,
server and library) must not hinge on near-ties between the two best tokens, which a random
model is full of: its logits are nearly flat. `sharpened` scales the output head so the best
token wins by a margin far above the last-bit differences of the paths being compared.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import torch

from herd.model import ModelArgs, build_model
from herd.model.llama import Transformer


def sharpened(model: Transformer, factor: float) -> Transformer:
    """`model` with its output head scaled by `factor` (in place), in eval mode."""
    with torch.no_grad():
        model.output.weight.mul_(factor)
    return model.eval()


def target_and_draft(args: ModelArgs, *, seed: int = 3, draft_seed: int = 4,
                     factor: float = 20.0) -> tuple[Transformer, Transformer]:
    """A sharpened target and a one-layer draft sharing its embeddings, first block and head, so
    the draft agrees with the target part of the time (neither always nor never)."""
    target = sharpened(build_model(args, seed=seed), factor)
    draft = build_model(args.replace(n_layers=1), seed=draft_seed)
    draft.load_state_dict({k: v for k, v in target.state_dict().items()
                           if not k.startswith(tuple(f"layers.{i}." for i in range(1, args.n_layers)))})
    return target, draft.eval()


def real_vocab_model(*, seed: int, context: int = 128) -> Transformer:
    """A random two-layer model with Llama 3's 128,256-token vocabulary (so the real tokenizer's
    ids, chat format and special tokens all apply), in eval mode."""
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128256, multiple_of=32,
                     max_seq_len=context)
    return build_model(args, seed=seed).eval()


def tiny_vision_model(*, seed: int, vocab_size: int = 128256, n_layers: int = 2, n_cross_layers: int = 1,
                      context: int = 128, amplify: float = 20.0):
    """A random Llama 3.2 Vision model (28 px tiles, up to 2 per image, 5 tokens each) whose images
    steer its greedy text: the cross-attention gates are opened (a fresh model's are 0, so it would
    ignore images) and the cross layers' outputs and the projector scaled up by `amplify` (and
    amplify / 4). Eval mode, fp32."""
    from herd.model.mllama import MllamaArgs, build_mllama
    from herd.model.vision import VisionArgs

    args = MllamaArgs(text=ModelArgs(dim=32, n_layers=n_layers, n_heads=4, n_kv_heads=2, vocab_size=vocab_size,
                                     multiple_of=16, max_seq_len=context),
                      vision=VisionArgs(width=16, n_layers=2, n_global_layers=1, n_heads=2, mlp_dim=32, image_size=28,
                                        patch_size=14, max_num_tiles=2, intermediate_layers=(1,)),
                      n_cross_layers=n_cross_layers)
    model = build_mllama(args, seed=seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("gate_attn", "gate_ffwd")):
                p.fill_(0.7)
        for block in model.text_model.cross_attention_layers.values():
            block.attention.wo.weight.mul_(amplify)
            block.feed_forward.w2.weight.mul_(amplify)
        model.vision_model.vision_projection.weight.mul_(amplify / 4)
    return model.eval()


@contextlib.contextmanager
def served(model: Transformer, tok, *, max_batch: int = 4, max_queue: int = 16, max_seq_len: int = 128,
           **app_options: Any) -> Iterator[Any]:
    """An engine over `model` behind the OpenAI app on a loopback port (a `ServerThread`); the
    engine is stopped on the way out. app_options go to `build_app` (model_name defaults to "tiny")."""
    from herd.serve import Engine
    from herd.serve.server import ServerThread, build_app

    engine = Engine(model, token_bytes=tok.decode_single_token_bytes, max_batch=max_batch, max_queue=max_queue,
                    max_seq_len=max_seq_len)
    engine.start()
    try:
        with ServerThread(build_app(engine, tok, **{"model_name": "tiny", **app_options})) as srv:
            yield srv
    finally:
        engine.stop()


@contextlib.contextmanager
def herd_serve_process(args: list[str], *, stop: int = signal.SIGINT,
                       startup_s: float = 180.0) -> Iterator[tuple[str, subprocess.Popen]]:
    """`python -m herd serve *args --port P` on a free loopback port, yielded as (url, process) once
    /health answers. Stopped with the signal `stop` on the way out; the caller reads the process's
    output and exit status afterwards (`proc.output`, `proc.returncode`)."""
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "herd", "serve", *args, "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    proc.output = ""
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_s
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else "timeout"
            time.sleep(0.2)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(stop)
        proc.output, _ = proc.communicate(timeout=60)
