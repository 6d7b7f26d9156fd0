"""Llama 3.2 Vision model: properties and user-facing errors (parity with transformers is in tests/parity)."""

from __future__ import annotations

import pytest
import torch

from herd.model.args import ModelArgs
from herd.model.mllama import MllamaArgs, build_mllama, cross_attention_masks
from herd.model.vision import VisionArgs


def small(**vision) -> MllamaArgs:
    return MllamaArgs(text=ModelArgs(dim=32, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=50, multiple_of=16,
                                     max_seq_len=32),
                      vision=VisionArgs(width=16, n_layers=2, n_global_layers=1, n_heads=2, mlp_dim=32, image_size=28,
                                        patch_size=14, max_num_tiles=2, intermediate_layers=(1,), **vision),
                      n_cross_layers=1)


def inputs(args: MllamaArgs, seq: int = 5):
    images = torch.randn(1, 1, 2, 3, 28, 28)
    ids, mask = torch.tensor([[2]]), torch.ones(1, 1, 2, dtype=torch.long)
    tokens = torch.tensor([[args.text.vocab_size, *range(1, seq)]])  # <|image|> first
    return tokens, images, ids, mask, torch.ones(1, seq, 1, 2, dtype=torch.long)


def test_fresh_gates_make_cross_layers_the_identity():
    """Cross-attention and MLP gates start at 0 (Meta, HF): images cannot change a fresh model's logits."""
    args = small()
    model = build_mllama(args, seed=0)
    tokens, images, ids, mask, xmask = inputs(args)
    with torch.no_grad():
        with_images = model(tokens, images=images, aspect_ratio_ids=ids, aspect_ratio_mask=mask,
                            cross_attention_mask=xmask)
        text_only = model(tokens)
        model.text_model.cross_attention_layers["0"].gate_attn.fill_(0.5)
        opened = model(tokens, images=images, aspect_ratio_ids=ids, aspect_ratio_mask=mask, cross_attention_mask=xmask)
    assert torch.equal(with_images, text_only)
    assert (opened - text_only).abs().max() > 1e-4


def test_extra_token_ids_read_the_learnable_embedding():
    model = build_mllama(small(), seed=1)
    t = model.text_model
    h = t.embed(torch.tensor([[3, 50, 57]]))
    assert torch.equal(h[0, 0], t.tok_embeddings.weight[3])
    assert torch.equal(h[0, 1], t.learnable_embedding.weight[0]) and torch.equal(h[0, 2], t.learnable_embedding.weight[7])
    with pytest.raises(ValueError, match="token ids must lie in 0..57"):
        t.embed(torch.tensor([[58]]))


def test_rows_that_see_no_tile_get_a_finite_row_and_a_zero_row_mask():
    xmask = torch.tensor([[[[0, 0]], [[1, 0]]]])  # (B=1, S=2, M=1, T=2)
    additive, row = cross_attention_masks(xmask, n_tokens=3, dtype=torch.float32)
    assert row.flatten().tolist() == [0.0, 1.0]
    assert torch.equal(additive[0, 0, 0], torch.zeros(6))
    assert additive[0, 0, 1, :3].eq(0).all() and additive[0, 0, 1, 3:].eq(torch.finfo(torch.float32).min).all()


def test_input_errors_name_the_fix():
    args = small()
    model = build_mllama(args, seed=2)
    tokens, images, ids, mask, xmask = inputs(args)
    with pytest.raises(ValueError, match="images must be .*vision_preprocess"):
        model(tokens, images=images[..., :14], aspect_ratio_ids=ids, aspect_ratio_mask=mask, cross_attention_mask=xmask)
    with pytest.raises(ValueError, match="aspect_ratio_ids must lie in 0..3"):
        model(tokens, images=images, aspect_ratio_ids=ids + 5, aspect_ratio_mask=mask, cross_attention_mask=xmask)
    with pytest.raises(ValueError, match="cross_attention_mask must be"):
        model(tokens, images=images, aspect_ratio_ids=ids, aspect_ratio_mask=mask, cross_attention_mask=xmask[:, :2])
    with pytest.raises(ValueError, match="aspect_ratio_ids .* and aspect_ratio_mask"):
        model(tokens, images=images, aspect_ratio_ids=None, aspect_ratio_mask=mask, cross_attention_mask=xmask)
    with pytest.raises(ValueError, match="either images .* or cross_kv"):
        kv = model.encode_images(images, ids, mask)
        model(tokens, images=images, aspect_ratio_ids=ids, aspect_ratio_mask=mask, cross_attention_mask=xmask,
              cross_kv=kv)


def test_config_errors():
    with pytest.raises(ValueError, match="intermediate_layers \\[5\\]"):
        small().vision.__class__(n_layers=2, intermediate_layers=(5,))
    with pytest.raises(ValueError, match="need more than max_num_tiles=2"):
        small(aspect_ratios=((2, 2),))
    with pytest.raises(ValueError, match="n_cross_layers must be in 1..3"):
        MllamaArgs(text=small().text, n_cross_layers=4)


def test_fusion_schedule_is_metas_uniform_spread():
    a = small()
    assert MllamaArgs(text=a.text.replace(n_layers=32), n_cross_layers=8).fusion_schedule == list(range(3, 32, 4))
    # Uneven: 10 layers, 3 cross layers -> every 4th from the top.
    assert MllamaArgs(text=a.text.replace(n_layers=10), n_cross_layers=3).fusion_schedule == [1, 5, 9]


def test_released_sizes_run_on_the_meta_device():
    """The 11B preset end to end without memory: 560 px tiles give 1601 tokens (padded to 1608 inside),
    7680 features per token (5 intermediate layers + the last), and vocabulary-sized logits."""
    from herd.model.mllama import PRESETS, Mllama

    args = PRESETS["llama3.2-11b-vision"]
    assert (args.vision.n_tokens, args.vision.n_padded, args.vision.output_dim) == (1601, 1608, 7680)
    with torch.device("meta"):
        model = Mllama(args)
        images = torch.empty(1, 2, 4, 3, 560, 560)
        ids, mask = torch.empty(1, 2, dtype=torch.long), torch.empty(1, 2, 4, dtype=torch.long)
        feats = model.vision_model.vision_encoder(images, ids, mask)
        kv = model.encode_images(images, ids, mask)
        logits = model(torch.empty(1, 6, dtype=torch.long), cross_kv=kv,
                       cross_attention_mask=torch.empty(1, 6, 2, 4, dtype=torch.long))
    assert feats.shape == (1, 2, 4, 1601, 7680)
    assert kv.k[0].shape == (1, 8, 2 * 4 * 1601, 128) and len(kv.k) == 8
    assert logits.shape == (1, 6, 128256)
