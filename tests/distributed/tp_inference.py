"""What the tensor-parallel inference group runs (imported by name in each spawned rank).

Every check compares rank-local TP results with a plain single-process model loaded from the
same files by `load_model` in the same process: logits of a prefill and several decode steps,
greedy and seeded sampled generations, and what each rank holds (its KV heads, its share of the
parameters).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

import harness as H
from herd.generate import SamplingParams, generate
from herd.generate.kv_cache import KVCache
from herd.model import ModelArgs, build_model
from herd.model.formats import load_model, save_model
from herd.model.gguf import write_gguf
from herd.parallel.inference import TPRank, load_tp_model, shared_seed

# Odd vocabulary: the last rank's vocabulary rows are padded. 4 query / 2 KV heads: one KV head each.
ARGS = ModelArgs.from_name("debug", vocab_size=255)
CHECKPOINTS = {
    "hf": (ARGS, "hf"),
    "hf tied": (ARGS.replace(tie_embeddings=True), "hf"),
    "meta 1 file": (ARGS, "meta1"),
    "meta 2 files": (ARGS.replace(vocab_size=256), "meta2"),
    "gguf f32": (ARGS, "gguf"),
}
PROMPTS = [[1, 17, 200, 3, 99, 42, 7], [5, 250, 8]]  # ragged: different lengths in one batch
DECODE_STEPS = 4


def _write(kind: str, args: ModelArgs, root: Path) -> Path:
    model = build_model(args, seed=11)
    if kind == "hf":
        return save_model(model, root / "ck", format="hf")
    if kind.startswith("meta"):
        return save_model(model, root / "ck", format="meta", num_shards=int(kind[-1]))
    return write_gguf(model, root / "m.gguf", qtype="F32")


def _logits_diff(ref, tp_model) -> float:
    """Max |logit difference| over a ragged prefill and DECODE_STEPS greedy decode steps."""
    tokens, lengths = torch.zeros(len(PROMPTS), max(map(len, PROMPTS)), dtype=torch.long), []
    for i, p in enumerate(PROMPTS):
        tokens[i, : len(p)] = torch.tensor(p)
        lengths.append(len(p))
    n = tokens.shape[1] + DECODE_STEPS
    c_ref = KVCache(ref.args, batch_size=len(PROMPTS), max_seq_len=n)
    c_tp = KVCache(tp_model.args, batch_size=len(PROMPTS), max_seq_len=n)
    with torch.inference_mode():
        a, b = ref(tokens, cache=c_ref), tp_model(tokens, cache=c_tp)  # (B, S, V)
        worst = float((a - b).abs().max())
        rows = torch.arange(len(PROMPTS))
        pos = torch.tensor(lengths)
        nxt = a[rows, pos - 1].argmax(-1)
        for _ in range(DECODE_STEPS):
            a = ref(nxt[:, None], pos=pos[:, None], cache=c_ref)[:, 0]  # (B, V)
            b = tp_model(nxt[:, None], pos=pos[:, None], cache=c_tp)[:, 0]
            worst = max(worst, float((a - b).abs().max()))
            nxt, pos = a.argmax(-1), pos + 1
    return worst


def run(rank: int, world: int, workdir: Path) -> list:
    tp = TPRank(rank=rank, size=world)
    out = []
    for name, (args, kind) in CHECKPOINTS.items():
        root = workdir / name.replace(" ", "-")
        if rank == 0:
            root.mkdir()
            _write(kind, args, root)
        dist.barrier()
        path = root / "m.gguf" if kind == "gguf" else root / "ck"
        ref = load_model(path).eval()
        model = load_tp_model(path, tp)
        diff = _logits_diff(ref, model)
        out += H.agree(f"logits {name}", diff <= H.TOL, f"max |diff| {diff:.2e} (tol {H.TOL:g})")
        if name == "hf":
            out += _generations(ref, model, tp)
            out += _shard_sizes(ref, model, world)
    return out


def _generations(ref, model, tp: TPRank) -> list:
    out = []
    greedy = SamplingParams(temperature=0)
    want = [r.tokens for r in generate(ref, PROMPTS, max_new_tokens=12, sampling=greedy)]
    got = [r.tokens for r in generate(model, PROMPTS, max_new_tokens=12, sampling=greedy)]
    out += H.agree("greedy generate", got == want, f"tp {got} vs single {want}")
    # Sampling: a seed rank 0 draws and shares; every rank must draw the same tokens as one process.
    seed = shared_seed(None, tp)
    hot = SamplingParams(temperature=1.0, top_p=0.95, seed=seed)
    want = [r.tokens for r in generate(ref, PROMPTS, max_new_tokens=12, sampling=hot)]
    got = [r.tokens for r in generate(model, PROMPTS, max_new_tokens=12, sampling=hot)]
    everyone = [None] * tp.size
    dist.all_gather_object(everyone, got)
    same = all(g == everyone[0] for g in everyone)
    out += H.agree("sampled generate (shared seed)", got == want and same, f"tp {got} vs single {want}; ranks agree: "
                   f"{same}")
    return out


def _shard_sizes(ref, model, world: int) -> list:
    """Each rank holds 1/world of every matrix (norms replicated) and caches its own KV heads."""
    a = ARGS
    per_vocab = -(-a.vocab_size // world)
    expect = (per_vocab * a.dim * (1 if a.tie_embeddings else 2) + a.dim
              + a.n_layers * (a._layer_params() - 2 * a.dim) // world + a.n_layers * 2 * a.dim)
    got = sum(p.numel() for p in model.parameters())
    cache = KVCache(model.args, batch_size=1, max_seq_len=8)
    full = KVCache(ref.args, batch_size=1, max_seq_len=8)
    ok = got == expect and cache.k[0].shape[1] == a.n_kv_heads // world and cache.nbytes() * world == full.nbytes()
    return H.agree("shard sizes", ok, f"params {got} (expected {expect}); cache heads {cache.k[0].shape[1]}")
