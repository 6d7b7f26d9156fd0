"""The forward pass against independent statements of the math (HF pieces, a plain reference)."""

import math

import pytest
import torch
import torch.nn.functional as F

from herd.generate import KVCache
from herd.model import ModelArgs, RopeScaling, build_model
from herd.model.llama import RMSNorm, positions_from_doc_ids
from herd.model.rope import apply_rotary_emb, precompute_freqs_cis, rope_frequencies


def _reference_scaled_freqs(head_dim, theta, factor, low, high, old_ctx):
    # Meta's original per-element loop form of apply_scaling (independent of our vectorised one).
    out = []
    for i in range(0, head_dim, 2):
        f = 1.0 / (theta ** (i / head_dim))
        wavelen = 2 * math.pi / f
        if wavelen < old_ctx / high:
            out.append(f)
        elif wavelen > old_ctx / low:
            out.append(f / factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append((1 - smooth) * f / factor + smooth * f)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("head_dim, factor", [(128, 8.0), (64, 32.0)])
def test_rope_frequencies_match_hf_bit_for_bit_and_loop_reference(head_dim, factor):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = RopeScaling(factor=factor)
    ours = rope_frequencies(head_dim, 500000.0, scaling)
    cfg = LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim,
                      rope_theta=500000.0, max_position_embeddings=131072,
                      rope_scaling=dict(rope_type="llama3", factor=factor, low_freq_factor=1.0,
                                        high_freq_factor=4.0, original_max_position_embeddings=8192))
    hf, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    assert torch.equal(ours, hf.float())
    ref = _reference_scaled_freqs(head_dim, 500000.0, factor, 1.0, 4.0, 8192)
    torch.testing.assert_close(ours.double(), ref, rtol=1e-6, atol=0)
    # 29/6/29 pairs unchanged / blended / divided at head_dim 128 (15/3/14 at 64).
    plain = rope_frequencies(head_dim, 500000.0, None)
    unchanged = int((ours == plain).sum())
    divided = int(torch.isclose(ours, plain / factor, rtol=1e-6).sum())
    assert (unchanged, divided) == ((29, 29) if head_dim == 128 else (15, 14))


def test_rope_rotates_interleaved_pairs_in_fp32_and_rounds_once():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 3, 8).to(torch.bfloat16)
    freqs = precompute_freqs_cis(8, 16, 10000.0, None)[:5].unsqueeze(0)  # (1, S, D/2)
    out = apply_rotary_emb(x, freqs)
    assert out.dtype == torch.bfloat16
    # independent real-arithmetic statement on pairs (x0, x1) -> (x0 c - x1 s, x0 s + x1 c)
    xf = x.float()
    ang = torch.angle(freqs).unsqueeze(2)  # (1, S, 1, D/2)
    c, s = torch.cos(ang), torch.sin(ang)
    x0, x1 = xf[..., 0::2], xf[..., 1::2]
    ref = torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1).flatten(3)
    torch.testing.assert_close(out, ref.to(torch.bfloat16), atol=1e-2, rtol=0)
    # rounding happens once: equals the fp32 result cast to bf16
    assert torch.equal(out, apply_rotary_emb(xf, freqs).to(torch.bfloat16))


def test_rmsnorm_bit_identical_to_hf_in_bf16():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(0)
    ours, hf = RMSNorm(64, 1e-5), LlamaRMSNorm(64, eps=1e-5)
    w = torch.randn(64)
    ours.weight.data.copy_(w)
    hf.weight.data.copy_(w)
    ours, hf = ours.to(torch.bfloat16), hf.to(torch.bfloat16)
    x = (torch.randn(3, 7, 64) * 5).to(torch.bfloat16)
    assert torch.equal(ours(x), hf(x))


def _reference_forward(model, tokens):
    """Plain Meta-style math: repeat_kv, matmul / sqrt(hd), additive -inf mask, fp32 softmax."""
    a = model.args
    B, S = tokens.shape
    freqs = model.freqs_cis[:S].unsqueeze(0)
    h = model.tok_embeddings(tokens)
    mask = torch.full((S, S), float("-inf")).triu(1)
    for layer in model.layers.values():
        at = layer.attention
        x = layer.attention_norm(h)
        q = at.wq(x).view(B, S, a.n_heads, a.head_dim)
        k = at.wk(x).view(B, S, a.n_kv_heads, a.head_dim)
        v = at.wv(x).view(B, S, a.n_kv_heads, a.head_dim)
        q, k = apply_rotary_emb(q, freqs), apply_rotary_emb(k, freqs)
        k = k[:, :, :, None, :].expand(B, S, a.n_kv_heads, a.n_rep, a.head_dim).reshape(B, S, a.n_heads, -1)
        v = v[:, :, :, None, :].expand(B, S, a.n_kv_heads, a.n_rep, a.head_dim).reshape(B, S, a.n_heads, -1)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        scores = q @ k.transpose(2, 3) / math.sqrt(a.head_dim) + mask
        out = (F.softmax(scores.float(), dim=-1).type_as(q) @ v).transpose(1, 2).reshape(B, S, -1)
        h = h + at.wo(out)
        x = layer.ffn_norm(h)
        ff = layer.feed_forward
        h = h + ff.w2(F.silu(ff.w1(x)) * ff.w3(x))
    return model.output(model.norm(h)).float()


@pytest.mark.parametrize("tie", [False, True])
def test_forward_matches_plain_reference_math(tie):
    model = build_model(ModelArgs.from_name("debug", tie_embeddings=tie), seed=0)
    tokens = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), _reference_forward(model, tokens), atol=2e-5, rtol=0)


def test_kv_cache_decode_equals_full_recompute():
    model = build_model(ModelArgs.from_name("debug"), seed=0).eval()
    tokens = torch.randint(0, 256, (1, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(tokens)
        cache = KVCache(model.args, batch_size=1, max_seq_len=64)
        parts = [model(tokens[:, :11], cache=cache, pos=0)]
        parts += [model(tokens[:, i : i + 1], cache=cache, pos=i) for i in range(11, 30)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=0)


def test_packed_documents_equal_separate_documents():
    model = build_model(ModelArgs.from_name("debug"), seed=0).eval()
    tokens = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(3))
    lengths = [[5, 11, 8], [24]]
    doc_ids = torch.tensor([sum(([i] * n for i, n in enumerate(row)), []) for row in lengths])
    with torch.no_grad():
        packed = model(tokens, doc_ids=doc_ids)
        for b, row in enumerate(lengths):
            start = 0
            for n in row:
                alone = model(tokens[b : b + 1, start : start + n])
                torch.testing.assert_close(packed[b : b + 1, start : start + n], alone, atol=1e-5, rtol=0)
                start += n
        # and the mask really matters: without doc ids the later documents change
        assert (model(tokens)[0, 5:] - packed[0, 5:]).abs().max() > 1e-3


def test_positions_restart_at_document_starts():
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2]])
    assert positions_from_doc_ids(doc_ids).tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]


def test_to_bf16_keeps_the_rope_table_exact_and_tied_weights_tied():
    model = build_model(ModelArgs.from_name("debug", tie_embeddings=True), seed=0)
    table = model.freqs_cis.clone()
    model.to(torch.bfloat16)
    assert model.freqs_cis.dtype == torch.complex64 and torch.equal(model.freqs_cis, table)
    assert model.output.weight is model.tok_embeddings.weight
    assert model(torch.tensor([[1, 2, 3]])).dtype == torch.float32


def test_seeded_init_is_deterministic_and_residual_projections_are_scaled():
    a = build_model(ModelArgs.from_name("debug"), seed=7)
    b = build_model(ModelArgs.from_name("debug"), seed=7)
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), n
    wq, wo = a.layers["0"].attention.wq.weight, a.layers["0"].attention.wo.weight
    assert wq.std() > 1.5 * wo.std()  # 0.02 vs 0.02 / sqrt(2 * n_layers)
