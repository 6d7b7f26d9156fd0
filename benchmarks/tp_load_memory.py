"""Memory one tensor-parallel rank holds after loading its shard, against one whole-model process.

Each measurement runs in a fresh interpreter: load (whole model with `load_model`, or rank 0 of N
with `load_tp_model`, which needs no process group to load), read every weight once (as a forward
would), then report from /proc/self/status the private memory (RssAnon, minus the interpreter's own
before loading) and the checkpoint pages mapped in (RssFile: page cache, shared by every rank on a
node and reclaimable). The whole-model load keeps fp32 safetensors weights as views of the mapped
file, so its weights show up as file pages, not private memory.

    python benchmarks/tp_load_memory.py            # dim 1024, 8 layers, vocabulary 32000 (610 MiB fp32)

The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

ARGS = dict(dim=1024, n_layers=8, n_heads=16, n_kv_heads=8, vocab_size=32000, multiple_of=256, max_seq_len=256)

_CHILD = """
import json, sys
def status():
    d = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return {k: int(d[k].split()[0]) / 1024 for k in ("RssAnon", "RssFile")}
import torch
from herd.model.formats import load_model
from herd.parallel.inference import TPRank, load_tp_model
path, tp = sys.argv[1], int(sys.argv[2])
base = status()
model = load_model(path) if tp == 1 else load_tp_model(path, TPRank(0, tp))
with torch.no_grad():
    for p in model.parameters():
        float(p.float().sum())
now = status()
held = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values()) / 2**20
print(json.dumps({"private_mib": now["RssAnon"] - base["RssAnon"], "file_pages_mib": now["RssFile"] - base["RssFile"],
                  "parameters_mib": held}))
"""


def main() -> None:
    import torch

    from herd.model import ModelArgs, build_model
    from herd.model.formats import save_model

    with tempfile.TemporaryDirectory() as tmp:
        path = save_model(build_model(ModelArgs(**ARGS), seed=0), Path(tmp) / "ck")
        del torch
        result = {}
        for tp in (1, 2, 4):
            out = subprocess.run([sys.executable, "-c", _CHILD, str(path), str(tp)], capture_output=True, text=True,
                                 check=True).stdout
            result[f"tp{tp}"] = r = json.loads(out.strip().splitlines()[-1])
            who = "whole model, one process" if tp == 1 else f"rank 0 of {tp}"
            print(f"{who:>26}: parameters {r['parameters_mib']:.0f} MiB, private memory +{r['private_mib']:.0f} MiB, "
                  f"checkpoint pages mapped {r['file_pages_mib']:.0f} MiB")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
