"""Rejection sampling (paper §4.2.2): K samples per prompt, scored by the reward model, best kept.

Candidates come from the serving engine through `herd.serve.batch.generate_all`, the batch
generator behind `herd generate --input`: each prompt is one request with n = K choices, so its
prompt is prefilled once and its K rows share it (the paper's PagedAttention point: the prompt's
keys and values are computed once, not K times), and prompts are continuously batched, so a
finished prompt's slots go to the next one at once instead of waiting for the longest sample of
a static batch. Each finished response is scored as prompt + response by the reward model, and
the highest-scoring one becomes a new SFT dialog. Responses that ran out of tokens without ending
their turn are not eligible: a truncated answer would teach the model not to stop. A prompt whose
K samples all ran out yields nothing.

Seeds: prompt i's K choices draw from seeds derived from (seed, i) plus the choice index, so a
prompt's samples do not depend on what it was batched with.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from herd.generate import SamplingParams
from herd.model import Transformer
from herd.posttrain.config import RejectionConfig
from herd.posttrain.data import read_chat_jsonl, write_chat_jsonl
from herd.io import atomic_write_json
from herd.posttrain.loop import load_for_training
from herd.posttrain.reward import RewardModel, dialog_tokens, load_reward_model, score_dialogs
from herd.serve.batch import generate_all
from herd.serve.batch_io import BatchItem, item_seed
from herd.serve.engine import Engine
from herd.tokenizer import ChatFormat, Message


@dataclass
class Sampled:
    """One prompt's K samples with their rewards; `best` is None when no sample finished its turn."""

    prompt: list[Message]
    responses: list[str]
    rewards: list[float]
    finished: list[bool]
    best: int | None

    @property
    def dialog(self) -> list[Message] | None:
        if self.best is None:
            return None
        return [*self.prompt, Message("assistant", self.responses[self.best])]


def rejection_sample(
    policy: Transformer,
    reward_model: RewardModel,
    fmt: ChatFormat,
    prompts: Sequence[Sequence[Message]],
    *,
    k: int,
    max_new_tokens: int,
    sampling: SamplingParams,
    batch_size: int = 8,
    log: Callable[[str], None] | None = None,
) -> list[Sampled]:
    """For each prompt (a dialog ending in a user turn), sample k responses and keep the best.

    batch_size: prompts decoded together (the engine gets batch_size * k slots)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for i, p in enumerate(prompts):
        if not p or p[-1].role == "assistant":
            raise ValueError(f"prompt {i} must end with a user (or ipython) turn, not an assistant turn")
    if not prompts:
        return []
    tok = fmt.tokenizer
    ids = [fmt.encode_dialog_prompt(p).tokens for p in prompts]
    context = min(policy.args.max_seq_len, max(map(len, ids)) + max_new_tokens)
    longest = max(range(len(ids)), key=lambda i: len(ids[i]))
    if len(ids[longest]) >= policy.args.max_seq_len:
        raise ValueError(f"prompt {longest} has {len(ids[longest])} tokens, which leaves no room for a response in "
                         f"the policy's {policy.args.max_seq_len}-token context; shorten it")
    items = [BatchItem(i, i, i, x, max_new_tokens, SamplingParams(
        sampling.temperature, sampling.top_p, sampling.top_k, None if sampling.seed is None else item_seed(sampling.seed, i)),
        n=k) for i, x in enumerate(ids)]
    was_training = policy.training
    policy.eval()
    engine = Engine(policy, max_batch=batch_size * k, max_queue=batch_size, max_seq_len=max(context, 2))
    texts: list[list[str]] = [[] for _ in prompts]
    finished: list[list[bool]] = [[] for _ in prompts]
    try:
        for n_done, (item, result) in enumerate(generate_all(engine, items, stop_tokens=tok.stop_tokens), 1):
            texts[item.id] = [tok.decode(c.tokens) for c in result.choices]
            finished[item.id] = [c.finish_reason == "stop" for c in result.choices]
            if log is not None and (n_done % batch_size == 0 or n_done == len(prompts)):
                log(f"rs: {n_done}/{len(prompts)} prompts sampled")
    finally:
        policy.train(was_training)
    del engine  # its KV cache, before the reward model runs
    out: list[Sampled] = []
    for s in range(0, len(prompts), batch_size):
        group = range(s, min(s + batch_size, len(prompts)))
        scored = [dialog_tokens(fmt, prompts[i], Message("assistant", t)) for i in group for t in texts[i]]
        rewards = score_dialogs(reward_model, scored, batch_size=batch_size * k).tolist()
        for j, i in enumerate(group):
            r, f = rewards[j * k : (j + 1) * k], finished[i]
            eligible = [c for c in range(k) if f[c]]
            best = max(eligible, key=lambda c: r[c]) if eligible else None
            out.append(Sampled(list(prompts[i]), texts[i], r, f, best))
    return out


def prompts_from_dialogs(dialogs: Sequence[Sequence[Message]]) -> list[list[Message]]:
    """Each dialog up to (not including) its last assistant turn; dialogs without one are kept whole."""
    out = []
    for d in dialogs:
        assistant = [i for i, m in enumerate(d) if m.role == "assistant"]
        out.append(list(d[: assistant[-1]] if assistant else d))
    return out


def run_rejection(cfg: RejectionConfig, *, log: Callable[[str], None] | None = print) -> dict:
    """`herd rs`: sample K per prompt, keep the best by reward, write `<output.dir>/rs.jsonl`."""
    rs = cfg.rs
    if not rs.prompts or not rs.reward_model:
        raise ValueError("rs.prompts (chat JSONL) and rs.reward_model (a `herd rm` output directory) are required")
    loaded = load_for_training(cfg.model)
    policy = loaded.model
    reward = load_reward_model(rs.reward_model, dtype=policy.tok_embeddings.weight.dtype, device=cfg.model.device)
    fmt = loaded.chat
    prompts = prompts_from_dialogs(read_chat_jsonl(rs.prompts, require_assistant=False))
    sampling = SamplingParams(temperature=rs.temperature, top_p=rs.top_p, seed=rs.seed)
    with torch.no_grad():
        samples = rejection_sample(policy, reward, fmt, prompts, k=rs.k, max_new_tokens=rs.max_new_tokens,
                                   sampling=sampling, batch_size=rs.batch_size, log=log)
    kept = [s.dialog for s in samples if s.dialog is not None]
    out = Path(cfg.output.dir)
    write_chat_jsonl(out / "rs.jsonl", kept)
    best = [s.rewards[s.best] for s in samples if s.best is not None]
    mean_all = [sum(s.rewards) / len(s.rewards) for s in samples]
    report = {"prompts": len(samples), "kept": len(kept), "k": rs.k,
              "mean_reward_best": sum(best) / max(len(best), 1), "mean_reward_all": sum(mean_all) / max(len(mean_all), 1),
              "output": str(out / "rs.jsonl")}
    atomic_write_json(out / "rs_metrics.json", report)
    return report

