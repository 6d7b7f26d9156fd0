import random

import pytest
import torch

from herd.posttrain.config import FinetuneOptimConfig
from herd.posttrain.data import PreferencePair
from herd.posttrain.dpo import (
    collate,
    encode_pairs,
    encode_response,
    precompute_reference_logps,
    preference_accuracy,
    sequence_logps,
    train_dpo,
)
from herd.tokenizer import Message

PROMPT = [Message("system", "S"), Message("user", "Hi"), Message("assistant", "Old answer"), Message("user", "Q?")]


def test_masks_cover_the_response_only_and_dpo_skips_formatting_tokens(fmt, tok):
    r = encode_response(fmt, PROMPT, Message("assistant", "New answer"))
    body = [t for t, m in zip(r.tokens, r.dpo_mask) if m]
    assert tok.decode(body) == "New answer"  # no header, no eot, not the earlier assistant turn
    nll = [t for t, m in zip(r.tokens, r.nll_mask) if m]
    assert tok.decode(nll) == "New answer<|eot_id|>"
    # The masked-out part is exactly prompt + the open assistant header.
    prefix = fmt.encode_dialog_prompt(PROMPT).tokens
    assert r.tokens[: len(prefix)] == prefix and not any(r.nll_mask[: len(prefix)])
    tool = encode_response(fmt, PROMPT, Message("assistant", "x", stop_reason="end_of_message"))
    assert tok.decode([t for t, m in zip(tool.tokens, tool.dpo_mask) if m]) == "x"
    unmasked = encode_response(fmt, PROMPT, Message("assistant", "x"), mask_formatting=False)
    assert unmasked.dpo_mask == unmasked.nll_mask


def test_collate_shifts_targets_and_masks(fmt):
    pairs = encode_pairs(fmt, [PreferencePair([Message("user", "a")], Message("assistant", "yes"),
                                              Message("assistant", "no way"))])
    b = collate(pairs)
    assert b.inputs.shape == b.targets.shape == (2, len(pairs[0].rejected.tokens) - 1)
    chosen = pairs[0].chosen
    n = len(chosen.tokens)
    assert b.targets[0, : n - 1].tolist() == chosen.tokens[1:]
    assert b.dpo_mask[0, : n - 1].tolist() == chosen.dpo_mask[1:]
    assert not b.dpo_mask[0, n - 1 :].any()  # padding is never scored


def _yes_no_pairs(n: int, seed: int) -> list[PreferencePair]:
    # Held-out prompts are new words; the preference (answers that start with "yes") generalises.
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghij") for _ in range(5)) for _ in range(n)]
    return [PreferencePair([Message("user", w)], Message("assistant", f"yes {w[:2]}"),
                           Message("assistant", f"no {w[:2]}")) for w in words]


def test_tiny_dpo_run_raises_held_out_preference_accuracy(fmt, tiny_model):
    model = tiny_model(seed=1)
    train = encode_pairs(fmt, _yes_no_pairs(64, seed=0))
    held = encode_pairs(fmt, _yes_no_pairs(32, seed=1))
    ref_train = precompute_reference_logps(model, train)
    ref_held = precompute_reference_logps(model, held)
    before = preference_accuracy(model, held, reference_logps=ref_held)
    assert before.reward == 0.0  # policy == reference: no pair is won yet
    result = train_dpo(model, train, FinetuneOptimConfig(lr=3e-3, steps=25, batch_size=8, warmup_steps=2), beta=0.1,
                       nll_coef=0.2, reference_logps=ref_train, log=None)
    after = preference_accuracy(model, held, reference_logps=ref_held)
    assert result.fit.losses[-1] < result.fit.losses[0]
    assert after.reward >= 0.9
    assert after.logprob > before.logprob + 0.2


def test_precomputed_reference_equals_a_live_reference(fmt, tiny_model):
    pairs = encode_pairs(fmt, _yes_no_pairs(8, seed=3))
    cfg = FinetuneOptimConfig(lr=1e-3, steps=1, batch_size=8)
    live, pre = tiny_model(seed=2), tiny_model(seed=2)
    a = train_dpo(live, pairs, cfg, log=None)  # frozen copy of the starting policy
    b = train_dpo(pre, pairs, cfg, reference_logps=precompute_reference_logps(tiny_model(seed=2), pairs), log=None)
    assert a.fit.losses[0] == pytest.approx(b.fit.losses[0], rel=1e-6)
    # At step 0 the policy is the reference: the DPO term is log 2 exactly.
    assert a.fit.metrics[0]["dpo"] == pytest.approx(0.6931472, abs=1e-6)


def test_lora_dpo_uses_the_base_as_reference(fmt, tiny_model):
    from herd.posttrain.config import LoRAConfig

    pairs = encode_pairs(fmt, _yes_no_pairs(16, seed=4))
    model = tiny_model(seed=5)
    with torch.no_grad():
        start = sequence_logps(model, collate(pairs)).dpo
    result = train_dpo(model, pairs, FinetuneOptimConfig(lr=1e-2, steps=4, batch_size=8), lora=LoRAConfig(rank=4), log=None)
    assert result.fit.metrics[0]["dpo"] == pytest.approx(0.6931472, abs=1e-6)
    from herd.posttrain.lora import lora_disabled

    with torch.no_grad(), lora_disabled(model):
        torch.testing.assert_close(sequence_logps(model, collate(pairs)).dpo, start)
