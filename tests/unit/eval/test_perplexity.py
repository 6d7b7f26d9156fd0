"""Perplexity and bits per byte on models whose answer is known in closed form."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from herd.eval.perplexity import perplexity
from herd.model import ModelArgs, build_model

ARGS = ModelArgs.from_name("debug")  # 2 layers, dim 64, vocab 256, max_seq_len 256


def fixed_distribution_model(log_probs: torch.Tensor):
    """A debug model whose next-token logits are `log_probs` whatever the context.

    The blocks write nothing into the residual stream (wo and w2 are zero), every embedding
    row is all ones, so the final RMSNorm output is 1/sqrt(1 + eps) everywhere, and output row
    v is constant log_probs[v] / (dim / sqrt(1 + eps)).
    """
    m = build_model(ARGS, seed=0)
    with torch.no_grad():
        for layer in m.layers.values():
            layer.attention.wo.weight.zero_()
            layer.feed_forward.w2.weight.zero_()
        m.tok_embeddings.weight.fill_(1.0)
        normed = 1.0 / math.sqrt(1.0 + ARGS.norm_eps)
        m.output.weight.copy_((log_probs.double() / (ARGS.dim * normed)).float()[:, None].expand(-1, ARGS.dim))
    return m.eval()


def test_perplexity_of_a_fixed_distribution_is_exp_entropy():
    p = torch.full((ARGS.vocab_size,), 0.0, dtype=torch.float64)
    p[:4] = torch.tensor([0.5, 0.25, 0.125, 0.125], dtype=torch.float64)
    log_p = torch.where(p > 0, p.log(), torch.full_like(p, -60.0))  # exp(-60) * 252 ~ 2e-24: nothing
    model = fixed_distribution_model(log_p)
    # A sequence whose token frequencies are exactly p: its cross-entropy is the entropy.
    body = [0] * 200 + [1] * 100 + [2] * 50 + [3] * 50
    body = [body[i] for i in torch.randperm(len(body), generator=torch.Generator().manual_seed(0)).tolist()]
    entropy = -(p[:4] * p[:4].log()).sum().item()  # 1.75 bits
    for seq_len, stride in [(64, 64), (64, 23), (256, 100)]:
        r = perplexity(model, [7] + body, seq_len=seq_len, stride=stride)  # token 7 opens, unscored
        assert r.num_tokens == len(body)
        assert r.perplexity == pytest.approx(math.exp(entropy), rel=1e-5)
        assert r.perplexity == pytest.approx(2**1.75, rel=1e-5)


class ByteTokenizer:
    """Token id = byte value; BOS is 255 (never produced by UTF-8 text of ASCII letters)."""

    def encode(self, text: str, *, bos: bool, eos: bool) -> list[int]:
        return ([255] if bos else []) + list(text.encode("utf-8"))


def test_bits_per_byte_of_a_uniform_model_is_log2_vocab():
    model = fixed_distribution_model(torch.zeros(ARGS.vocab_size, dtype=torch.float64))
    text = "the quick brown fox jumps over the lazy dog " * 5
    r = perplexity(model, text, tokenizer=ByteTokenizer(), seq_len=32, stride=16)
    assert r.num_bytes == len(text) and r.num_tokens == len(text)
    assert r.perplexity == pytest.approx(ARGS.vocab_size, rel=1e-5)
    assert r.bits_per_byte == pytest.approx(math.log2(ARGS.vocab_size), rel=1e-5)


def test_disjoint_windows_equal_a_direct_cross_entropy():
    model = build_model(ARGS, seed=3).eval()
    ids = torch.randint(0, ARGS.vocab_size, (150,), generator=torch.Generator().manual_seed(4))
    total = 0.0
    with torch.inference_mode():
        for begin in (0, 64, 128):  # inputs [begin, begin + 64) predict tokens begin+1 .. begin+64
            inputs, targets = ids[begin:begin + 64], ids[begin + 1:begin + 65]
            logits = model(inputs[None, : targets.numel()])[0]
            total += F.cross_entropy(logits.double(), targets, reduction="sum").item()
    r = perplexity(model, ids, seq_len=64)
    assert r.num_windows == 3 and r.num_tokens == 149
    assert r.nll == pytest.approx(total / 149, rel=1e-6)


def test_window_bookkeeping_scores_every_token_once():
    model = build_model(ARGS, seed=3).eval()
    ids = torch.randint(0, ARGS.vocab_size, (150,), generator=torch.Generator().manual_seed(4))
    full = perplexity(model, ids, seq_len=150)  # one window: the exact per-token loss
    with torch.inference_mode():
        logits = model(ids[None, :-1])[0]
    ref = F.cross_entropy(logits.double(), ids[1:]).item()
    assert full.num_windows == 1 and full.nll == pytest.approx(ref, rel=1e-6)
    for stride in (16, 50, 100):
        r = perplexity(model, ids, seq_len=100, stride=stride)
        assert r.num_tokens == 149
        # Overlapping windows give every token at least seq_len - stride of context, so the
        # loss approaches the full-context one as the stride shrinks.
        assert abs(r.nll - ref) <= abs(perplexity(model, ids, seq_len=50).nll - ref) + 1e-6


def test_user_errors():
    model = build_model(ARGS, seed=0).eval()
    with pytest.raises(ValueError, match="seq_len"):
        perplexity(model, [1, 2, 3], seq_len=ARGS.max_seq_len + 1)
    with pytest.raises(ValueError, match="stride"):
        perplexity(model, [1, 2, 3], seq_len=8, stride=9)
    with pytest.raises(ValueError, match="tokenizer"):
        perplexity(model, "text", seq_len=8)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        perplexity(model, [1], seq_len=8)
    with pytest.raises(ValueError, match="token ids"):
        perplexity(model, [1, 999], seq_len=8)
