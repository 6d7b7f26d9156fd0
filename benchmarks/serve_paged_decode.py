"""Decode cost of the paged engine against the engine before it (static rows), same model, one process.

The old engine is `herd/serve/engine.py` at `--old-rev` (read with `git show`, imported as a
module: the request and event types it uses are unchanged). Both engines get the same requests
(1, 4 and 16 at once, 24-token prompts, greedy) and take turns stepping, one step each in
alternating order, so load from other processes hits both alike. Reported per engine: the median
decode step, tokens per decode-second, and the engine's own work around the forward (decode time
minus the time inside `decode_step`, which both call identically); and whether the tokens agree.

    python benchmarks/serve_paged_decode.py --max-tokens 32 --threads 1

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import herd.serve.engine as new_engine
from herd.generate.loading import load_for_inference
from herd.serve import Request


def load_old_engine(rev: str):
    source = subprocess.run(["git", "show", f"{rev}:herd/serve/engine.py"], check=True, capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parent).stdout
    path = Path(tempfile.mkdtemp()) / "old_engine.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("old_engine", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["old_engine"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="checkpoint (default: SmolLM2-135M-Instruct from herd's model cache)")
    p.add_argument("--old-rev", default="111b9c1", help="git revision of the engine to compare against")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model is None:
        from herd.model.zoo import smollm2_path

        args.model = smollm2_path()
    old = load_old_engine(args.old_rev)
    lm = load_for_inference(args.model)
    inside = {"old": 0.0, "new": 0.0}

    def timed(name, fn):
        def wrap(*a, **k):
            t = time.perf_counter()
            out = fn(*a, **k)
            inside[name] += time.perf_counter() - t
            return out
        return wrap

    old.decode_step = timed("old", old.decode_step)
    new_engine.decode_step = timed("new", new_engine.decode_step)
    summary = {"model": str(args.model).rsplit("/", 1)[-1], "threads": torch.get_num_threads(), "old_rev": args.old_rev,
               "max_tokens": args.max_tokens, "prompt_tokens": 24}
    same = True
    for n in (1, 4, 16):
        engines = {"old": old.Engine(lm.model, max_batch=16, max_seq_len=512),
                   "new": new_engine.Engine(lm.model, max_batch=16, max_seq_len=512)}
        for e in engines.values():  # first-call costs out of the figures
            e.submit(Request([1, 2, 3], 3))
            e.run_until_idle()
        g = torch.Generator().manual_seed(n)
        prompts = [torch.randint(100, 40000, (24,), generator=g).tolist() for _ in range(n)]
        base = {k: (e.metrics(), inside[k]) for k, e in engines.items()}
        handles = {k: [e.submit(Request(p, args.max_tokens)) for p in prompts] for k, e in engines.items()}
        steps: dict[str, list[float]] = {"old": [], "new": []}
        busy, i = True, 0
        while busy:
            busy = False
            for k in ("old", "new") if i % 2 == 0 else ("new", "old"):
                before = engines[k].metrics().decode_seconds
                busy |= engines[k].step()
                if engines[k].metrics().decode_seconds > before:
                    steps[k].append(1000 * (engines[k].metrics().decode_seconds - before))
            i += 1
        row = {}
        for k, e in engines.items():
            m, (m0, in0) = e.metrics(), base[k]
            decode_s, n_steps = m.decode_seconds - m0.decode_seconds, m.decode_steps_total - m0.decode_steps_total
            row[k] = {"decode_step_ms_median": round(statistics.median(steps[k]), 2),
                      "decode_tokens_per_s": round((m.generation_tokens_total - m0.generation_tokens_total) / decode_s, 2),
                      "engine_ms_per_step": round(1000 * (decode_s - (inside[k] - in0)) / n_steps, 2)}
        row["new_over_old_step"] = round(row["new"]["decode_step_ms_median"] / row["old"]["decode_step_ms_median"], 3)
        same &= [h.result(0).choices[0].tokens for h in handles["old"]] == [h.result(0).choices[0].tokens
                                                                              for h in handles["new"]]
        summary[str(n)] = row
        print(n, "requests:", row, flush=True)
    summary["same_tokens"] = same
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
