"""The post-training stage of `make demo`: SFT on real chat data, then DPO on real-vs-mismatched pairs.

Given the pretrained demo checkpoint (with its tokenizer.model beside it):

1. reads the chatterbot-corpus conversations (real, BSD-3, installed from PyPI) and holds out
   10% of the prompts;
2. answers a few fixed prompts greedily with the base model;
3. SFT: full finetuning on the training dialogs, loss on assistant tokens only;
4. builds preference pairs: chosen = the real answer, rejected = an answer from another
   category (mismatched), for training and held-out prompts;
5. DPO from the SFT model (beta 0.1, NLL 0.2, formatting tokens masked) against a frozen copy
   of it;
6. answers the same prompts again and reports preference accuracy on the held-out pairs for the
   base, SFT and DPO models.

Trade-off: step counts are fixed (as in configs/demo.toml) rather than fitted to the machine's
speed, so the result is the same everywhere and a busy machine takes longer instead of
training less. They are sized for the demo's 3.2M-parameter, 4,096-token model to take about
3 minutes on an idle 2-core CPU; a base with Llama 3's 128K vocabulary makes each step several
times dearer, and `DemoConfig.sft_seconds` / `dpo_seconds` can then cap the stages instead.
Everything printed is also returned and written to `<out_dir>/posttrain_demo.json`, and the
chat and preference data to JSONL files beside it for trying `herd sft|rm|rs|dpo` by hand.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from herd.generate import SamplingParams, generate
from herd.generate.session import resolve_tokenizer
from herd.model import Transformer, load_model
from herd.posttrain.config import FinetuneOptimConfig
from herd.posttrain.data import (
    Conversation,
    chatterbot_conversations,
    conversation_dialog,
    mismatched_pairs,
    write_chat_jsonl,
    write_preference_jsonl,
)
from herd.posttrain.dpo import encode_pairs, precompute_reference_logps, preference_accuracy, train_dpo
from herd.io import atomic_write_json
from herd.posttrain.io import save_checkpoint, tokenizer_file
from herd.posttrain.sft import tokenize_dialogs, train_sft
from herd.tokenizer import ChatFormat, Message

SYSTEM = "You are a helpful assistant."
SHOW_PROMPTS = (
    "What is AI?",
    "Tell me a joke",
    "My computer won't turn on.",
    "What is your favorite book?",
)


@dataclass
class DemoConfig:
    max_tokens: int = 96  # dialogs longer than this (in tokens) are left out
    seq_len: int = 256
    sft: FinetuneOptimConfig = dataclasses.field(default_factory=lambda: FinetuneOptimConfig(
        lr=1e-3, steps=120, batch_size=8, warmup_steps=10, min_lr_ratio=0.1, weight_decay=0.0, seed=0))
    sft_seconds: float | None = None  # optional wall-clock cap on the SFT stage
    dpo: FinetuneOptimConfig = dataclasses.field(default_factory=lambda: FinetuneOptimConfig(
        lr=1e-4, steps=60, batch_size=8, warmup_steps=5, min_lr_ratio=0.1, seed=0))
    dpo_seconds: float | None = None
    beta: float = 0.1
    nll_coef: float = 0.2
    train_pairs: int = 480  # dpo.steps * dpo.batch_size: each pair seen once
    held_out_pairs: int = 128
    max_new_tokens: int = 32


def _held_out(prompt: str) -> bool:
    # 10% of distinct prompts, by a stable hash: every answer to a held-out prompt is held out.
    return hashlib.sha256(prompt.strip().lower().encode()).digest()[0] < 26


def _answers(model: Transformer, fmt: ChatFormat, prompts: tuple[str, ...], max_new_tokens: int) -> list[str]:
    ids = [fmt.encode_dialog_prompt([Message("system", SYSTEM), Message("user", p)]).tokens for p in prompts]
    model.eval()
    results = generate(model, ids, max_new_tokens=max_new_tokens, sampling=SamplingParams(temperature=0.0, top_p=1.0),
                       stop_tokens=fmt.tokenizer.stop_tokens)
    model.train()
    return [fmt.tokenizer.decode(r.tokens).strip() for r in results]


def run_posttrain_demo(
    base_checkpoint_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    config: DemoConfig | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Run SFT then DPO on the pretrained demo model; print and return the before/after report."""
    cfg = config or DemoConfig()
    t0 = last = time.perf_counter()

    def tick() -> float:
        nonlocal last
        now = time.perf_counter()
        elapsed, last = now - last, now
        return round(elapsed, 1)

    base_dir, out = Path(base_checkpoint_dir), Path(out_dir)
    torch.manual_seed(0)
    model = load_model(base_dir, dtype=torch.float32)
    tok = resolve_tokenizer(base_dir, None, vocab_size=model.args.vocab_size)
    tok_file = tokenizer_file(base_dir)
    fmt = ChatFormat(tok, version="3.1")
    seq_len = min(cfg.seq_len, model.args.max_seq_len - 1)

    def fits(c: Conversation) -> bool:
        return len(fmt.encode_dialog_prompt(conversation_dialog(c, system=SYSTEM), add_generation_prompt=False).tokens) \
            <= min(cfg.max_tokens, seq_len + 1)

    convs = [c for c in chatterbot_conversations() if fits(c)]
    train_convs = [c for c in convs if not _held_out(c.prompt)]
    held_convs = [c for c in convs if _held_out(c.prompt)]
    log(f"posttrain: {len(train_convs)} training and {len(held_convs)} held-out chatterbot dialogs "
        f"(model {model.args.num_params():,} parameters, vocabulary {model.args.vocab_size:,})")

    raw_train = mismatched_pairs(train_convs, seed=1, system=SYSTEM)
    raw_held = mismatched_pairs(held_convs, seed=2, system=SYSTEM)
    # The data as files too, so `herd sft|rm|rs|dpo` (configs/posttrain_*.toml) can be tried on it.
    write_chat_jsonl(out / "chat_train.jsonl", [conversation_dialog(c, system=SYSTEM) for c in train_convs])
    write_chat_jsonl(out / "chat_heldout.jsonl", [conversation_dialog(c, system=SYSTEM) for c in held_convs])
    write_preference_jsonl(out / "pairs_train.jsonl", raw_train)
    write_preference_jsonl(out / "pairs_heldout.jsonl", raw_held)
    train_pairs = encode_pairs(fmt, raw_train[: cfg.train_pairs])
    held_pairs = encode_pairs(fmt, raw_held[: cfg.held_out_pairs])
    phases = {"data": tick()}
    before = _answers(model, fmt, SHOW_PROMPTS, cfg.max_new_tokens)
    phases["answers"] = tick()
    acc_base = preference_accuracy(model, held_pairs)

    # ---- SFT -------------------------------------------------------------------------------
    examples = tokenize_dialogs(fmt, [conversation_dialog(c, system=SYSTEM) for c in train_convs], seq_len=seq_len)
    val = tokenize_dialogs(fmt, [conversation_dialog(c, system=SYSTEM) for c in held_convs], seq_len=seq_len)
    sft = train_sft(model, examples, cfg.sft, seq_len=seq_len, val_examples=val, log=log, log_every=25,
                    max_seconds=cfg.sft_seconds)
    acc_sft = preference_accuracy(model, held_pairs)
    sft_dir = save_checkpoint(model, out / "sft", tokenizer=tok_file)

    phases["sft"] = tick()

    # ---- DPO -------------------------------------------------------------------------------
    # The reference is a frozen copy of the SFT model, run only on the pairs a step uses: with a
    # wall-clock cap, precomputing log-probs for every training pair could cost more than it saves.
    # The held-out pairs' reference log-probs are computed once, for the accuracy below.
    ref_held = precompute_reference_logps(model, held_pairs)
    dpo = train_dpo(model, train_pairs, cfg.dpo, beta=cfg.beta, nll_coef=cfg.nll_coef, log=log, log_every=10,
                    max_seconds=cfg.dpo_seconds)
    acc_dpo = preference_accuracy(model, held_pairs, reference_logps=ref_held)
    dpo_dir = save_checkpoint(model, out / "dpo", tokenizer=tok_file)
    phases["dpo"] = tick()
    after = _answers(model, fmt, SHOW_PROMPTS, cfg.max_new_tokens)
    phases["answers"] += tick()

    report = {
        "train_dialogs": len(train_convs), "held_out_dialogs": len(held_convs),
        "sft_steps": sft.fit.steps, "sft_final_loss": round(sft.fit.losses[-1], 4),
        "sft_val_loss": None if sft.val_loss is None else round(sft.val_loss, 4),
        "sft_tokens_per_s": round(sft.fit.tokens_per_s, 1),
        "dpo_steps": dpo.fit.steps, "dpo_final_loss": round(dpo.fit.losses[-1], 4),
        "train_pairs": len(train_pairs), "held_out_pairs": len(held_pairs),
        "held_out_logprob_accuracy": {"base": acc_base.logprob, "sft": acc_sft.logprob, "dpo": acc_dpo.logprob},
        "held_out_reward_accuracy_dpo": acc_dpo.reward,
        "answers": [{"prompt": p, "before": b, "after": a} for p, b, a in zip(SHOW_PROMPTS, before, after)],
        "checkpoints": {"sft": str(sft_dir), "dpo": str(dpo_dir)},
        "seconds": round(time.perf_counter() - t0, 1),
        "phase_seconds": phases,
    }
    _print_report(report, log)
    atomic_write_json(out / "posttrain_demo.json", report)
    return report


def _print_report(r: dict, log: Callable[[str], None]) -> None:
    log("\nSame prompts, greedy, before (pretrained) and after (SFT + DPO):")
    for a in r["answers"]:
        log(f"  user> {a['prompt']}\n    before: {a['before'][:100]!r}\n    after:  {a['after'][:100]!r}")
    acc = r["held_out_logprob_accuracy"]
    log(f"\nHeld-out preference accuracy over {r['held_out_pairs']} pairs (real answer vs mismatched):")
    log(f"  policy log-prob per token, chosen > rejected: base {acc['base']:.1%}  SFT {acc['sft']:.1%}  "
        f"DPO {acc['dpo']:.1%}")
    log(f"  DPO implicit reward, chosen > rejected:       {r['held_out_reward_accuracy_dpo']:.1%}")
    log(f"SFT {r['sft_steps']} steps (val loss {r['sft_val_loss']}), DPO {r['dpo_steps']} steps; {r['seconds']} s "
        f"({', '.join(f'{k} {v} s' for k, v in r['phase_seconds'].items())})")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Run the post-training demo stage on a base checkpoint.")
    parser.add_argument("base", help="pretrained checkpoint directory with tokenizer.model beside the weights")
    parser.add_argument("out", help="output directory")
    opts = parser.parse_args()
    run_posttrain_demo(opts.base, opts.out)
