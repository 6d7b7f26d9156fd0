"""Direct Preference Optimisation as Llama 3 uses it (paper §4.1.2).

loss = -log sigmoid(beta * [(log pi(y_c) - log ref(y_c)) - (log pi(y_r) - log ref(y_r))])
       + nll_coef * (-log pi(y_c) / |y_c|)

with beta = 0.1 and nll_coef = 0.2 by default. The log-probabilities in the DPO term leave out
the formatting tokens (header and termination tokens: <|start_header_id|>, <|end_header_id|>,
<|eot_id|>, <|eom_id|>, <|end_of_text|>): chosen and rejected share them, so they pull both
likelihoods in the same direction and the paper found that destabilising. The NLL term keeps the
chosen response's terminator, since ending the turn is part of what SFT taught and the term's
job is to keep the chosen response likely.

The reference model is either a frozen copy, the policy with its LoRA adapters switched off
(no second model in memory), or log-probabilities computed once up front
(`precompute_reference_logps`), after which the reference can be freed.

Trade-off: chosen and rejected rows are right-padded into one (2B, S) batch and run through
the full output head, with no packing and no fused loss. DPO's loss is nonlinear in the
sequence log-probabilities, so the vocabulary-sized gradient cannot be formed in the forward
pass as SFT's fused cross-entropy does; padding wastes some compute on uneven pairs but keeps
each sequence's log-probability a plain masked sum.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from herd.model import Transformer
from herd.posttrain.config import DPOConfig, FinetuneOptimConfig, LoRAConfig
from herd.posttrain.data import IndexBatches, PreferencePair, encode_dialog, read_preference_jsonl
from herd.io import atomic_write_json
from herd.posttrain.lora import apply_lora, lora_disabled
from herd.posttrain.loop import FitResult, StepLoss, fit, load_for_training
from herd.tokenizer import ChatFormat, Message, Tokenizer, TokenizerLike


def formatting_ids(tokenizer: TokenizerLike) -> frozenset[int]:
    """Header and termination tokens, masked out of the DPO log-probabilities: Llama 3's header and
    end tokens, or for other vocabularies every special token (ChatML's <|im_start|>, <|im_end|>...)."""
    t = tokenizer
    if isinstance(t, Tokenizer):
        return frozenset({t.bos_id, t.start_header_id, t.end_header_id, t.eot_id, t.eom_id, t.eos_id})
    return frozenset({*t.special_tokens.values(), t.bos_id, t.eos_id, *t.stop_tokens})


@dataclass
class ResponseTokens:
    """prompt + one response as ids, with two masks over the ids.

    dpo_mask: the response's tokens that enter the DPO term (formatting tokens removed if asked);
    nll_mask: the response as SFT trains it (its body and terminator).
    """

    tokens: list[int]
    dpo_mask: list[bool]
    nll_mask: list[bool]


@dataclass
class PairTokens:
    chosen: ResponseTokens
    rejected: ResponseTokens


def encode_response(
    fmt: ChatFormat, prompt: Sequence[Message], response: Message, *, mask_formatting: bool = True,
    max_len: int | None = None,
) -> ResponseTokens:
    """Tokenise prompt + response; masks cover the response turn only (not earlier assistant turns)."""
    start = len(fmt.encode_dialog_prompt(prompt, add_generation_prompt=True).tokens)  # through the open header
    enc = encode_dialog(fmt, [*prompt, response], max_len=max_len)
    n = len(enc.tokens)
    if start >= n:
        raise ValueError(f"the prompt alone has {start} tokens, which leaves no room for the response within "
                         f"max_len={max_len}; raise data.max_len or shorten the prompt")
    nll = [i >= start and enc.assistant_mask[i] for i in range(n)]
    skip = formatting_ids(fmt.tokenizer) if mask_formatting else frozenset()
    dpo = [m and enc.tokens[i] not in skip for i, m in enumerate(nll)]
    return ResponseTokens(enc.tokens, dpo, nll)


def encode_pairs(
    fmt: ChatFormat, pairs: Sequence[PreferencePair], *, mask_formatting: bool = True, max_len: int | None = None
) -> list[PairTokens]:
    return [PairTokens(encode_response(fmt, p.prompt, p.chosen, mask_formatting=mask_formatting, max_len=max_len),
                       encode_response(fmt, p.prompt, p.rejected, mask_formatting=mask_formatting, max_len=max_len))
            for p in pairs]


@dataclass
class PreferenceBatch:
    """Chosen rows then rejected rows: inputs / targets (2B, S-1), masks over targets."""

    inputs: torch.Tensor
    targets: torch.Tensor
    dpo_mask: torch.Tensor  # bool
    nll_mask: torch.Tensor  # bool

    @property
    def num_pairs(self) -> int:
        return self.inputs.shape[0] // 2


def collate(pairs: Sequence[PairTokens], *, device: torch.device | str = "cpu") -> PreferenceBatch:
    rows = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    S = max(len(r.tokens) for r in rows)
    tokens = torch.zeros(len(rows), S, dtype=torch.long)  # pad 0: never attended to, masked out of the loss
    dpo = torch.zeros(len(rows), S, dtype=torch.bool)
    nll = torch.zeros(len(rows), S, dtype=torch.bool)
    for i, r in enumerate(rows):
        n = len(r.tokens)
        tokens[i, :n] = torch.tensor(r.tokens)
        dpo[i, :n] = torch.tensor(r.dpo_mask)
        nll[i, :n] = torch.tensor(r.nll_mask)
    # Target j is token j+1; its masks are token j+1's.
    return PreferenceBatch(tokens[:, :-1].to(device), tokens[:, 1:].to(device), dpo[:, 1:].to(device),
                           nll[:, 1:].to(device))


def token_logps(model: Transformer, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target_j | inputs_<=j) for every position: (N, S) fp32."""
    logits = model(inputs)  # (N, S, V) fp32
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


@dataclass
class DPOLoss:
    loss: torch.Tensor  # what is minimised: dpo + nll_coef * nll
    dpo: torch.Tensor
    nll: torch.Tensor
    chosen_rewards: torch.Tensor  # beta * (log pi - log ref), per pair
    rejected_rewards: torch.Tensor

    @property
    def accuracy(self) -> float:
        return float((self.chosen_rewards > self.rejected_rewards).float().mean())


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    *,
    beta: float = 0.1,
    chosen_nll: torch.Tensor | None = None,
    nll_coef: float = 0.0,
) -> DPOLoss:
    """DPO on summed sequence log-probs (B,) each; `chosen_nll` (B,) per-token NLL of the chosen response."""
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    chosen_rewards = beta * (policy_chosen - ref_chosen.detach())
    rejected_rewards = beta * (policy_rejected - ref_rejected.detach())
    dpo = -F.logsigmoid(chosen_rewards - rejected_rewards).mean()
    nll = chosen_nll.mean() if chosen_nll is not None else torch.zeros_like(dpo)
    return DPOLoss(dpo + nll_coef * nll, dpo, nll, chosen_rewards.detach(), rejected_rewards.detach())


@dataclass
class SequenceLogps:
    dpo: torch.Tensor  # (2B,) summed log-probs over the DPO mask
    nll: torch.Tensor  # (2B,) mean negative log-prob over the NLL mask


def sequence_logps(model: Transformer, batch: PreferenceBatch) -> SequenceLogps:
    lp = token_logps(model, batch.inputs, batch.targets)  # (2B, S)
    dpo = (lp * batch.dpo_mask).sum(-1)
    nll = -(lp * batch.nll_mask).sum(-1) / batch.nll_mask.sum(-1).clamp_min(1)
    return SequenceLogps(dpo, nll)


@torch.no_grad()
def precompute_reference_logps(
    reference: Transformer, pairs: Sequence[PairTokens], *, batch_size: int = 8
) -> torch.Tensor:
    """Reference log-probs (n_pairs, 2) [chosen, rejected] over the DPO masks, computed once."""
    was_training = reference.training
    reference.eval()
    out = []
    for s in range(0, len(pairs), batch_size):
        batch = collate(pairs[s : s + batch_size], device=reference.tok_embeddings.weight.device)
        lp = sequence_logps(reference, batch).dpo
        B = batch.num_pairs
        out.append(torch.stack([lp[:B], lp[B:]], dim=1).cpu())
    reference.train(was_training)
    return torch.cat(out)


@dataclass
class PreferenceAccuracy:
    """Held-out preference accuracy.

    reward: fraction where the DPO implicit reward beta*(log pi - log ref) ranks chosen first
        (None without a reference). logprob: fraction where the policy's mean log-prob per
        response token is higher for chosen (length-normalised, so short answers are not favoured).
    """

    reward: float | None
    logprob: float
    pairs: int


@torch.no_grad()
def preference_accuracy(
    policy: Transformer, pairs: Sequence[PairTokens], *, reference_logps: torch.Tensor | None = None,
    batch_size: int = 8,
) -> PreferenceAccuracy:
    was_training = policy.training
    policy.eval()
    wins_reward = wins_lp = 0
    for s in range(0, len(pairs), batch_size):
        batch = collate(pairs[s : s + batch_size], device=policy.tok_embeddings.weight.device)
        lp = token_logps(policy, batch.inputs, batch.targets)
        summed = (lp * batch.dpo_mask).sum(-1)
        mean = summed / batch.dpo_mask.sum(-1).clamp_min(1)
        B = batch.num_pairs
        wins_lp += int((mean[:B] > mean[B:]).sum())
        if reference_logps is not None:
            ref = reference_logps[s : s + B].to(summed.device)
            wins_reward += int(((summed[:B] - ref[:, 0]) > (summed[B:] - ref[:, 1])).sum())
    policy.train(was_training)
    n = len(pairs)
    return PreferenceAccuracy(wins_reward / n if reference_logps is not None else None, wins_lp / n, n)


@dataclass
class DPOResult:
    fit: FitResult
    pairs: int
    final_accuracy: float  # training-batch reward accuracy over the last 10 steps


def train_dpo(
    policy: Transformer,
    pairs: Sequence[PairTokens],
    optim: FinetuneOptimConfig,
    *,
    beta: float = 0.1,
    nll_coef: float = 0.2,
    reference: Transformer | None = None,
    reference_logps: torch.Tensor | None = None,
    lora: LoRAConfig | None = None,
    log: Callable[[str], None] | None = print,
    log_every: int = 10,
    max_seconds: float | None = None,
) -> DPOResult:
    """Train `policy` in place with DPO.

    Reference, in order of precedence: `reference_logps` (n_pairs, 2) from
    `precompute_reference_logps`; a `reference` model (kept frozen); with LoRA, the policy with
    its adapters switched off; otherwise a frozen copy of the policy as it is now.
    """
    if not pairs:
        raise ValueError("no preference pairs to train on")
    if reference_logps is not None and reference_logps.shape != (len(pairs), 2):
        raise ValueError(f"reference_logps has shape {tuple(reference_logps.shape)}; expected ({len(pairs)}, 2)")
    use_lora = lora is not None and lora.rank > 0
    if use_lora:
        apply_lora(policy, lora.targets, lora.rank, lora.alpha, dropout=lora.dropout,
                   quantize_base=lora.quantize_base)
    if reference_logps is None and reference is None and not use_lora:
        reference = copy.deepcopy(policy)
    if reference is not None:
        reference.eval().requires_grad_(False)
    policy.train()
    device = policy.tok_embeddings.weight.device
    batches = IndexBatches(len(pairs), batch_size=optim.batch_size, seed=optim.seed)

    def step(_: int) -> StepLoss:
        idx = batches.next_indices()
        batch = collate([pairs[i] for i in idx], device=device)
        B = batch.num_pairs
        pol = sequence_logps(policy, batch)
        if reference_logps is not None:
            ref = reference_logps[idx].to(device)
            ref_c, ref_r = ref[:, 0], ref[:, 1]
        else:
            with torch.no_grad():
                if reference is not None:
                    ref_lp = sequence_logps(reference, batch).dpo
                else:
                    with lora_disabled(policy):
                        ref_lp = sequence_logps(policy, batch).dpo
            ref_c, ref_r = ref_lp[:B], ref_lp[B:]
        out = dpo_loss(pol.dpo[:B], pol.dpo[B:], ref_c, ref_r, beta=beta, chosen_nll=pol.nll[:B], nll_coef=nll_coef)
        return StepLoss(out.loss, tokens=batch.inputs.numel(),
                        metrics={"dpo": out.dpo.item(), "nll": out.nll.item(), "acc": out.accuracy,
                                 "margin": float((out.chosen_rewards - out.rejected_rewards).mean())})

    result = fit(policy, step, optim, log=log, log_every=log_every, name="dpo", max_seconds=max_seconds)
    recent = [m["acc"] for m in result.metrics[-10:]]
    return DPOResult(result, len(pairs), sum(recent) / max(len(recent), 1))


def run_dpo(cfg: DPOConfig, *, log: Callable[[str], None] | None = print) -> dict:
    """`herd dpo`: preference JSONL -> DPO-trained model (and adapters) in output.dir."""
    from herd.model import load_model
    from herd.posttrain.sft import save_trained

    loaded = load_for_training(cfg.model)
    policy, fmt = loaded.model, loaded.chat
    if not cfg.data.train:
        raise ValueError("data.train is empty: give a preference JSONL file")
    pairs = read_preference_jsonl(cfg.data.train)
    random.Random(cfg.optim.seed).shuffle(pairs)
    n_val = int(len(pairs) * cfg.data.val_fraction)
    encoded = encode_pairs(fmt, pairs, mask_formatting=cfg.dpo.mask_formatting, max_len=cfg.data.max_len)
    train, val = encoded[n_val:], encoded[:n_val]
    reference = None
    if cfg.dpo.reference:
        reference = load_model(cfg.dpo.reference, dtype=policy.tok_embeddings.weight.dtype, device=cfg.model.device)
    ref_logps = val_ref = None
    if cfg.dpo.precompute_reference or val:
        ref_model = reference if reference is not None else policy
        if cfg.dpo.precompute_reference:
            ref_logps = precompute_reference_logps(ref_model, train, batch_size=cfg.optim.batch_size)
            reference = None  # freed: the log-probs are all DPO needs from it
        if val:
            val_ref = precompute_reference_logps(ref_model, val, batch_size=cfg.optim.batch_size)
    before = preference_accuracy(policy, val, reference_logps=val_ref) if val else None
    result = train_dpo(policy, train, cfg.optim, beta=cfg.dpo.beta, nll_coef=cfg.dpo.nll_coef, reference=reference,
                       reference_logps=ref_logps, lora=cfg.lora, log=log, log_every=cfg.output.log_every)
    after = preference_accuracy(policy, val, reference_logps=val_ref) if val else None
    out = save_trained(policy, cfg.output.dir, source=cfg.model.path, lora=cfg.lora, format=cfg.output.format,
                       tokenizer=cfg.model.tokenizer or None)
    report = {"steps": result.fit.steps, "train_pairs": len(train), "val_pairs": len(val),
              "final_loss": result.fit.losses[-1] if result.fit.losses else None,
              "val_reward_accuracy": after.reward if after else None,
              "val_logprob_accuracy_before": before.logprob if before else None,
              "val_logprob_accuracy_after": after.logprob if after else None,
              "output": str(out)}
    atomic_write_json(Path(cfg.output.dir) / "dpo_metrics.json", report)
    return report
