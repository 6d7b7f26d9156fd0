"""Reward model: the Llama backbone with a scalar head, trained on ranked responses.

The reward of a dialog is a linear read-out of the final-normed hidden state at its last token
(the assistant turn's <|eot_id|>), so the backbone has seen the whole prompt and response.
The loss is Bradley-Terry, -log sigmoid(r_better - r_worse), over every ordered pair of a
ranking; with an edited response the paper's ranking is edited > chosen > rejected, which gives
three pairs (Llama 3 paper §4.1.2: Llama 2's loss without the margin term).

Trade-off: each response is its own row (prompt repeated), not the paper's one row holding
the prompt and all shuffled responses with attention masks between them. That costs prompt
recomputation, which is small for the short prompts here, and keeps the model's forward pass
unchanged.

Saved layout: `<dir>/backbone` (an ordinary herd checkpoint, loadable by `herd info`) and
`<dir>/reward_head.safetensors` + `<dir>/reward_model.json`.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from herd.model import Transformer, load_model
from herd.posttrain.config import FinetuneOptimConfig, RewardConfig
from herd.posttrain.data import IndexBatches, PreferencePair, encode_dialog, read_preference_jsonl
from herd.io import atomic_write_json
from herd.posttrain.io import atomic_dir, save_checkpoint, save_tensors, tokenizer_file
from herd.posttrain.loop import FitResult, StepLoss, fit, load_for_training
from herd.tokenizer import ChatFormat, Message

HEAD_FILE = "reward_head.safetensors"
META_FILE = "reward_model.json"


class RewardModel(nn.Module):
    def __init__(self, backbone: Transformer) -> None:
        super().__init__()
        self.backbone = backbone
        w = backbone.tok_embeddings.weight
        self.score = nn.Linear(backbone.args.dim, 1, bias=True, device=w.device, dtype=w.dtype)
        # Zero: every response starts with reward 0, i.e. no preference, instead of a random one.
        nn.init.zeros_(self.score.weight)
        nn.init.zeros_(self.score.bias)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Rewards (B,) fp32 for right-padded rows tokens (B, S) of `lengths` (B,) tokens each."""
        h = self.backbone.hidden(tokens)  # (B, S, D); causal, so padding after a row's end is never seen
        last = h[torch.arange(h.shape[0], device=h.device), lengths - 1]  # (B, D)
        return self.score(last).squeeze(-1).float()


def bradley_terry_loss(better: torch.Tensor, worse: torch.Tensor) -> torch.Tensor:
    """Mean of -log sigmoid(better - worse) over pairs of rewards (B,), (B,)."""
    return -F.logsigmoid(better - worse).mean()


def ranking_loss(rewards: Sequence[torch.Tensor]) -> torch.Tensor:
    """Bradley-Terry over every ordered pair of a ranking, best first: rewards[i] should beat rewards[j>i].

    With [edited, chosen, rejected] this is the paper's edited > chosen > rejected; each pair
    counts once, averaged over pairs.
    """
    if len(rewards) < 2:
        raise ValueError("a ranking needs at least two responses")
    losses = [bradley_terry_loss(rewards[i], rewards[j]) for i in range(len(rewards)) for j in range(i + 1, len(rewards))]
    return torch.stack(losses).mean()


@dataclass
class RankedTokens:
    """One prompt's responses, best first, each tokenised as a whole dialog."""

    responses: list[list[int]]


def encode_ranked(fmt: ChatFormat, pairs: Sequence[PreferencePair], *, max_len: int | None = None) -> list[RankedTokens]:
    out = []
    for p in pairs:
        ranked = ([p.edited] if p.edited is not None else []) + [p.chosen, p.rejected]
        out.append(RankedTokens([encode_dialog(fmt, [*p.prompt, r], max_len=max_len).tokens for r in ranked]))
    return out


def _pad(rows: Sequence[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    S = max(len(r) for r in rows)
    tokens = torch.zeros(len(rows), S, dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = torch.tensor(r)
    return tokens.to(device), torch.tensor([len(r) for r in rows], device=device)


def score_dialogs(model: RewardModel, rows: Sequence[list[int]], *, batch_size: int = 8) -> torch.Tensor:
    """Rewards (N,) for tokenised dialogs, in batches, without gradients."""
    device = model.score.weight.device
    out = []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for s in range(0, len(rows), batch_size):
            out.append(model(*_pad(rows[s : s + batch_size], device)).cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


def _ranked_rewards(model: RewardModel, items: Sequence[RankedTokens]) -> list[torch.Tensor]:
    """Rewards per rank position: [r_rank0 (B,), r_rank1 (B,), ...] for items with equal rank counts."""
    k = len(items[0].responses)
    rows = [it.responses[j] for j in range(k) for it in items]  # rank-major
    rewards = model(*_pad(rows, model.score.weight.device))
    return list(rewards.view(k, len(items)))


def reward_accuracy(model: RewardModel, items: Sequence[RankedTokens], *, batch_size: int = 8) -> float:
    """Fraction of held-out pairs (each ordered pair of each ranking) ranked correctly."""
    wins = total = 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for s in range(0, len(items), batch_size):
            for group in _by_rank_count(items[s : s + batch_size]):
                r = _ranked_rewards(model, group)
                for i in range(len(r)):
                    for j in range(i + 1, len(r)):
                        wins += int((r[i] > r[j]).sum())
                        total += r[i].numel()
    model.train(was_training)
    return wins / max(total, 1)


def _by_rank_count(items: Sequence[RankedTokens]) -> list[list[RankedTokens]]:
    groups: dict[int, list[RankedTokens]] = {}
    for it in items:
        groups.setdefault(len(it.responses), []).append(it)
    return list(groups.values())


@dataclass
class RewardResult:
    fit: FitResult
    val_accuracy: float | None
    val_accuracy_before: float | None


def train_reward_model(
    model: RewardModel,
    items: Sequence[RankedTokens],
    optim: FinetuneOptimConfig,
    *,
    val_items: Sequence[RankedTokens] = (),
    log: Callable[[str], None] | None = print,
    log_every: int = 10,
) -> RewardResult:
    if not items:
        raise ValueError("no preference data to train the reward model on")
    before = reward_accuracy(model, val_items) if val_items else None
    batches = IndexBatches(len(items), batch_size=optim.batch_size, seed=optim.seed)
    model.train()

    def step(_: int) -> StepLoss:
        idx = batches.next_indices()
        batch = [items[i] for i in idx]
        losses, n_tokens, acc = [], 0, []
        for group in _by_rank_count(batch):
            r = _ranked_rewards(model, group)
            losses.append(ranking_loss(r) * len(group))
            acc.append(float((r[0] > r[-1]).float().mean()) * len(group))
            n_tokens += sum(len(x) for it in group for x in it.responses)
        loss = torch.stack(losses).sum() / len(batch)
        return StepLoss(loss, tokens=n_tokens, metrics={"acc": sum(acc) / len(batch)})

    result = fit(model, step, optim, log=log, log_every=log_every, name="rm")
    after = reward_accuracy(model, val_items) if val_items else None
    return RewardResult(result, after, before)


def save_reward_model(model: RewardModel, path: str | os.PathLike, *, format: str = "hf",
                      tokenizer: str | os.PathLike | None = None) -> Path:
    def write(tmp: Path) -> None:
        save_checkpoint(model.backbone, tmp / "backbone", format=format, tokenizer=tokenizer)
        save_tensors(tmp / HEAD_FILE, {"score.weight": model.score.weight, "score.bias": model.score.bias})
        (tmp / META_FILE).write_text(json.dumps({"format": "herd-reward-v1", "dim": model.backbone.args.dim}) + "\n")

    return atomic_dir(path, write)


def load_reward_model(path: str | os.PathLike, *, dtype: torch.dtype | None = None,
                      device: torch.device | str = "cpu") -> RewardModel:
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / META_FILE).is_file() or not (path / HEAD_FILE).is_file():
        raise FileNotFoundError(f"{path} is not a reward model directory (written by `herd rm`): "
                                f"{META_FILE} or {HEAD_FILE} is missing")
    backbone = load_model(path / "backbone", dtype=dtype, device=device)
    model = RewardModel(backbone)
    head = load_file(str(path / HEAD_FILE))
    with torch.no_grad():
        model.score.weight.copy_(head["score.weight"])
        model.score.bias.copy_(head["score.bias"])
    return model.eval()


def run_reward(cfg: RewardConfig, *, log: Callable[[str], None] | None = print) -> dict:
    """`herd rm`: train a reward model on preference JSONL; report held-out pair accuracy."""
    loaded = load_for_training(cfg.model)
    backbone, fmt = loaded.model, loaded.chat
    if not cfg.data.train:
        raise ValueError("data.train is empty: give a preference JSONL file")
    pairs = read_preference_jsonl(cfg.data.train)
    random.Random(cfg.optim.seed).shuffle(pairs)
    n_val = int(len(pairs) * cfg.data.val_fraction)
    items = encode_ranked(fmt, pairs, max_len=cfg.data.max_len)
    model = RewardModel(backbone)
    result = train_reward_model(model, items[n_val:], cfg.optim, val_items=items[:n_val], log=log,
                                log_every=cfg.output.log_every)
    out = save_reward_model(model, cfg.output.dir, format=cfg.output.format,
                            tokenizer=cfg.model.tokenizer or tokenizer_file(cfg.model.path))
    report = {"steps": result.fit.steps, "train_pairs": len(items) - n_val, "val_pairs": n_val,
              "final_loss": result.fit.losses[-1] if result.fit.losses else None,
              "val_accuracy_before": result.val_accuracy_before, "val_accuracy": result.val_accuracy,
              "output": str(out)}
    atomic_write_json(Path(cfg.output.dir) / "rm_metrics.json", report)
    return report


def dialog_tokens(fmt: ChatFormat, prompt: Sequence[Message], response: Message) -> list[int]:
    """The ids the reward model scores for prompt + response."""
    return encode_dialog(fmt, [*prompt, response]).tokens
