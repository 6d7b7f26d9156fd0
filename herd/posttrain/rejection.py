"""Rejection sampling (paper §4.2.2): K samples per prompt, scored by the reward model, best kept.

Each prompt is repeated K times in one `herd.generate.generate` batch (one prefill for all K,
then batched decoding), each finished response is scored as prompt + response by the reward
model, and the highest-scoring one becomes a new SFT dialog. Responses that ran out of tokens
without ending their turn are not eligible: a truncated answer would teach the model not to
stop. A prompt whose K samples all ran out yields nothing.

Trade-off: the K copies of a prompt are prefilled separately rather than sharing one prefix in
the cache (the paper's PagedAttention trick). That keeps the generation loop untouched and
costs K-fold prefill, which is small next to decoding for short chat prompts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from herd.generate import SamplingParams, generate
from herd.model import Transformer
from herd.posttrain.config import RejectionConfig
from herd.posttrain.data import read_chat_jsonl, write_chat_jsonl
from herd.io import atomic_write_json
from herd.posttrain.loop import load_for_training
from herd.posttrain.reward import RewardModel, dialog_tokens, load_reward_model, score_dialogs
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
    """For each prompt (a dialog ending in a user turn), sample k responses and keep the best."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    for i, p in enumerate(prompts):
        if not p or p[-1].role == "assistant":
            raise ValueError(f"prompt {i} must end with a user (or ipython) turn, not an assistant turn")
    tok = fmt.tokenizer
    out: list[Sampled] = []
    was_training = policy.training
    policy.eval()
    seed = sampling.seed
    for s in range(0, len(prompts), batch_size):
        group = prompts[s : s + batch_size]
        ids = [fmt.encode_dialog_prompt(p).tokens for p in group]
        rows = [x for x in ids for _ in range(k)]  # prompt-major: rows i*k .. i*k+k-1 belong to prompt i
        params = sampling if seed is None else SamplingParams(sampling.temperature, sampling.top_p, sampling.top_k,
                                                              seed + s)
        results = generate(policy, rows, max_new_tokens=max_new_tokens, sampling=params, stop_tokens=tok.stop_tokens)
        texts = [tok.decode(r.tokens) for r in results]
        finished = [r.finish_reason == "stop" for r in results]
        scored = [dialog_tokens(fmt, group[i // k], Message("assistant", t)) for i, t in enumerate(texts)]
        rewards = score_dialogs(reward_model, scored, batch_size=batch_size * k).tolist()
        for i, prompt in enumerate(group):
            sl = slice(i * k, (i + 1) * k)
            r, f = rewards[sl], finished[sl]
            eligible = [j for j in range(k) if f[j]]
            best = max(eligible, key=lambda j: r[j]) if eligible else None
            out.append(Sampled(list(prompt), texts[sl], r, f, best))
        if log is not None:
            log(f"rs: {min(s + batch_size, len(prompts))}/{len(prompts)} prompts sampled")
    policy.train(was_training)
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

