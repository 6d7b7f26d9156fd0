"""herd's Llama 3.2 Vision against transformers' MllamaForConditionalGeneration (fp32, tiny configs).

Both sides hold the same random weights (herd's, renamed by herd.model.mllama_io into HF's
layout and loaded with strict=True). Gates, norms and biases are redrawn away from their inits
so that every gated path, a swapped norm or a missing bias moves the logits far past TOL.

Tiles are 28 px with 14 px patches: 4 patches + the class token = 5 tokens, padded to 8, so the
pad-to-a-multiple-of-8 path and its attention mask are exercised as in the real models (1601 -> 1608 at 560 px).

Two known differences from transformers 5.3, both where herd follows Meta's reference code:
* intermediate vision features: transformers records the output of local layer i, Meta the input
  of layer i; the HF side is built with indices shifted by one so both read the same tensors.
* text rows that see no image: Meta zeroes the cross-attention output for them, transformers does
  not; such rows are checked against transformers' text-only run instead (see the dialog test).
"""

from __future__ import annotations

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import MllamaConfig, MllamaForConditionalGeneration  # noqa: E402
from transformers.models.mllama.modeling_mllama import _prepare_aspect_ratio_attention_mask  # noqa: E402

from herd.generate.kv_cache import KVCache  # noqa: E402
from herd.model.args import ModelArgs, RopeScaling  # noqa: E402
from herd.model.mllama import IMAGE_TOKEN_ID, MllamaArgs, build_mllama  # noqa: E402
from herd.model.mllama_io import hf_config_from_args, to_hf_state_dict  # noqa: E402
from herd.model.vision import VisionArgs, tile_attention_mask  # noqa: E402

TOL = 1e-4
VOCAB = 320
IMG = VOCAB  # <|image|> is the first id past the base vocabulary, as 128256 is for 128256 rows


def tiny_args(max_num_tiles: int = 2) -> MllamaArgs:
    return MllamaArgs(
        text=ModelArgs(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, multiple_of=16,
                       rope_theta=10000.0, rope_scaling=RopeScaling(factor=8.0, original_max_seq_len=16),
                       max_seq_len=64),
        vision=VisionArgs(width=32, n_layers=3, n_global_layers=1, n_heads=2, mlp_dim=64, image_size=28,
                          patch_size=14, max_num_tiles=max_num_tiles, intermediate_layers=(1, 2)),
        n_cross_layers=2,
    )


def randomized(args: MllamaArgs, seed: int = 0):
    model = build_mllama(args, seed=seed).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("gate", "gate_attn", "gate_ffwd", "gate_ffn")):
                p.uniform_(-1.2, 1.2, generator=gen)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1, generator=gen)
            elif p.dim() == 1 and ("norm" in name or "ln_" in name):
                p.add_(torch.randn(p.shape, generator=gen) * 0.2)
            elif p.dim() >= 2:  # unit-scale matrices: every path moves the logits visibly
                p.normal_(0.0, p.shape[-1] ** -0.5, generator=gen)
            elif "embedding" in name:
                p.normal_(0.0, 0.5, generator=gen)
    return model


def hf_twin(model, *, shift_intermediate: bool = True) -> MllamaForConditionalGeneration:
    cfg = hf_config_from_args(model.args, dtype=torch.float32)
    if shift_intermediate:  # transformers 5.x: output of layer i-1 == Meta's input of layer i
        cfg["vision_config"]["intermediate_layers_indices"] = [i - 1 for i in model.args.vision.intermediate_layers]
    cfg = {k: v for k, v in cfg.items() if k not in ("architectures", "transformers_version", "torch_dtype")}
    hf = MllamaForConditionalGeneration(MllamaConfig(**cfg)).eval()
    hf.load_state_dict(to_hf_state_dict(model.state_dict(), model.args), strict=True)
    return hf


@pytest.fixture(scope="module")
def pair():
    model = randomized(tiny_args())
    return model, hf_twin(model)


def images_for(args: MllamaArgs, layouts: list[list[tuple[int, int] | None]], seed: int = 0):
    """Random pixels plus HF-style aspect_ratio_ids / aspect_ratio_mask for per-row image layouts."""
    v = args.vision
    B, M, T = len(layouts), max(len(r) for r in layouts), v.max_num_tiles
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(B, M, T, 3, v.image_size, v.image_size, generator=gen)
    ids = torch.zeros(B, M, dtype=torch.long)
    mask = torch.zeros(B, M, T, dtype=torch.long)
    for b, row in enumerate(layouts):
        for m, layout in enumerate(row):
            if layout is not None:
                ids[b, m] = v.aspect_ratios.index(layout) + 1
                mask[b, m, : layout[0] * layout[1]] = 1
    return images, ids, mask


def cross_mask_from_tokens(tokens: torch.Tensor, ar_mask: torch.Tensor) -> torch.Tensor:
    """HF processor's rule: a token sees the latest image at or before it (and its real tiles)."""
    B, S = tokens.shape
    out = torch.zeros(B, S, *ar_mask.shape[1:], dtype=torch.long)
    for b in range(B):
        starts = (tokens[b] == IMG).nonzero().flatten().tolist()
        for m, s in enumerate(starts):
            end = starts[m + 1] if m + 1 < len(starts) else S
            out[b, s:end, m] = ar_mask[b, m]
    return out


def both(model, hf, tokens, images, ids, mask, xmask):
    with torch.no_grad():
        ours = model(tokens, images=images, aspect_ratio_ids=ids, aspect_ratio_mask=mask, cross_attention_mask=xmask)
        ref = hf(input_ids=tokens, pixel_values=images, aspect_ratio_ids=ids, aspect_ratio_mask=mask,
                 cross_attention_mask=xmask, use_cache=False).logits.float()
    return ours, ref


@pytest.mark.parametrize("layout", [(1, 1), (1, 2), (2, 1)])
def test_one_image_each_tile_layout(pair, layout):
    model, hf = pair
    images, ids, mask = images_for(model.args, [[layout]])
    tokens = torch.tensor([[IMG, 11, 12, 13, 14, 15, 16]])
    xmask = cross_mask_from_tokens(tokens, mask)
    ours, ref = both(model, hf, tokens, images, ids, mask, xmask)
    assert (ours - ref).abs().max() < TOL
    # The image matters: other pixels give other logits (so the check above is not vacuous).
    other, _ = both(model, hf, tokens, images.flip(-1), ids, mask, xmask)
    assert (other - ours).abs().max() > 100 * TOL


def test_two_images_two_rows_with_padding_image(pair):
    """Row 0: a 1x2 then a 2x1 image; row 1: one 1x1 image and a padding image slot (id 0)."""
    model, hf = pair
    images, ids, mask = images_for(model.args, [[(1, 2), (2, 1)], [(1, 1), None]], seed=3)
    tokens = torch.tensor([[IMG, 21, 22, 23, IMG, 24, 25, 26], [IMG, 31, 32, 33, 34, 35, 36, 37]])
    xmask = cross_mask_from_tokens(tokens, mask)
    ours, ref = both(model, hf, tokens, images, ids, mask, xmask)
    assert (ours - ref).abs().max() < TOL


def test_four_tiles_two_by_two():
    model = randomized(tiny_args(max_num_tiles=4), seed=5)
    hf = hf_twin(model)
    images, ids, mask = images_for(model.args, [[(2, 2), (1, 3)]], seed=6)
    tokens = torch.tensor([[IMG, 41, 42, IMG, 43, 44]])
    ours, ref = both(model, hf, tokens, images, ids, mask, cross_mask_from_tokens(tokens, mask))
    assert (ours - ref).abs().max() < TOL


def test_text_before_the_first_image_is_the_text_model(pair):
    """A dialog whose first turn is text only: rows before the first <|image|> see no image.

    Meta's full-text-row mask removes every cross layer's contribution (attention and MLP) from
    those rows, so their logits are exactly transformers' text-only logits (cross layers skipped).
    The rows from the image on see it: they match transformers given the same past, i.e. with
    the prefix's cross contribution also removed, which transformers 5.3 does not do (checked).
    """
    model, hf = pair
    images, ids, mask = images_for(model.args, [[(1, 2)]], seed=7)
    tokens = torch.tensor([[51, 52, 53, 54, IMG, 55, 56, 57]])
    xmask = cross_mask_from_tokens(tokens, mask)
    ours, ref_mm = both(model, hf, tokens, images, ids, mask, xmask)
    with torch.no_grad():
        ref_text = hf(input_ids=tokens[:, :4], use_cache=False).logits
        text_only = model(tokens[:, :4])
    assert (ours[:, :4] - ref_text).abs().max() < TOL
    assert (text_only - ref_text).abs().max() < TOL
    # transformers lets rows with no image attend to all image tokens; the gap is real, not noise.
    assert (ref_mm[:, :4] - ref_text).abs().max() > 100 * TOL


def test_cache_decode_equals_full_forward(pair):
    """Prefill + one-token steps with herd's KV cache and per-request cross K/V == one full forward."""
    model, _ = pair
    images, ids, mask = images_for(model.args, [[(2, 1)], [(1, 1)]], seed=9)
    tokens = torch.tensor([[61, IMG, 62, 63, 64, 65, 66, 67], [IMG, 71, 72, 73, 74, 75, 76, 77]])
    xmask = cross_mask_from_tokens(tokens, mask)
    with torch.no_grad():
        full = model(tokens, images=images, aspect_ratio_ids=ids, aspect_ratio_mask=mask, cross_attention_mask=xmask)
        cross_kv = model.encode_images(images, ids, mask)
        cache = KVCache(model.args.text, batch_size=2, max_seq_len=16)
        P = 4
        steps = [model(tokens[:, :P], cross_kv=cross_kv, cross_attention_mask=xmask[:, :P], cache=cache)]
        for p in range(P, tokens.shape[1]):
            steps.append(model(tokens[:, p:p + 1], cross_kv=cross_kv, cross_attention_mask=xmask[:, p:p + 1],
                               cache=cache, pos=p))
    assert (torch.cat(steps, dim=1) - full).abs().max() < TOL


def test_aspect_ratio_mask_is_hfs_including_the_both_padding_quirk():
    ar_mask = torch.tensor([[1, 0], [1, 1]])
    ours = tile_attention_mask(ar_mask, n_tokens=5, n_padded=8, dtype=torch.float32)
    ref = _prepare_aspect_ratio_attention_mask(ar_mask, num_patches=5, target_length=8, dtype=torch.float32)
    assert torch.equal(ours, ref)
    # The quirk, by hand: a real query sees a padding key; only padding x padding is masked.
    real_q, pad_slot, pad_tile = 0, 6, 9
    assert ours[0, 0, real_q, pad_tile] == 0 and ours[0, 0, pad_tile, real_q] == 0
    assert ours[0, 0, pad_slot, pad_tile] == torch.finfo(torch.float32).min
    # No pad slots (8 tokens): transformers marks *every* token as padding (its `[..., -0:] = 0`);
    # herd marks only the padding tile. No released tile size hits this (1601 -> 1608).
    hf_nopad = _prepare_aspect_ratio_attention_mask(ar_mask, num_patches=8, target_length=8, dtype=torch.float32)
    assert bool((hf_nopad == torch.finfo(torch.float32).min).all())
    ours_nopad = tile_attention_mask(ar_mask, n_tokens=8, n_padded=8, dtype=torch.float32)
    assert bool((ours_nopad[1] == 0).all()) and ours_nopad[0, 0, 8, 8] == torch.finfo(torch.float32).min


def test_intermediate_features_are_the_inputs_of_the_listed_layers(pair):
    """Meta's reference (and transformers 4.x after #40083): the input of local layer i.

    Rebuilt by hand from the encoder's own blocks, so a one-layer shift is caught here even
    though the HF comparison above shifts transformers' indices to match.
    """
    model, _ = pair
    enc = model.vision_model.vision_encoder
    images, ids, mask = images_for(model.args, [[(1, 2)]], seed=11)
    seen = []
    hooks = [blk.register_forward_pre_hook(lambda m, a: seen.append(a[0])) for blk in enc.transformer.resblocks]
    try:
        with torch.no_grad():
            out = enc(images, ids, mask)  # (1, 1, T, 5, W * 3)
    finally:
        for h in hooks:
            h.remove()
    W, T = model.args.vision.width, model.args.vision.max_num_tiles
    layers = model.args.vision.intermediate_layers
    inter = out[0, 0, ..., W:].reshape(T, 5, W, len(layers))  # Meta stacks on a new last axis
    for k, layer in enumerate(layers):
        assert torch.equal(inter[..., k], seen[layer].view(T, 8, W)[:, :5])


@pytest.mark.parametrize("name,published", [("llama3.2-11b-vision", 10_670_220_835), ("llama3.2-90b-vision", None)])
def test_preset_parameter_counts(name, published):
    """Counts on the meta device: herd's module == transformers' model from the same config."""
    from herd.model.mllama import PRESETS

    args = PRESETS[name]
    cfg = {k: v for k, v in hf_config_from_args(args).items() if k not in ("architectures", "transformers_version",
                                                                          "torch_dtype")}
    with torch.device("meta"):
        hf = MllamaForConditionalGeneration(MllamaConfig(**cfg))
    hf_count = sum(p.numel() for p in hf.parameters())
    assert args.num_params() == hf_count
    if published is not None:
        assert hf_count == published
    else:
        assert round(hf_count / 1e9, 1) == 88.6  # HF's hub page: 88.6B
    assert args.hf_cross_layers == list(range(3, args.text.n_layers + args.n_cross_layers, 5))
    assert math.ceil(args.text.n_layers / args.n_cross_layers) == 4
    # <|image|> is the first of the 8 extra rows (HF's embed_tokens has vocab + 8 rows).
    assert IMAGE_TOKEN_ID == args.text.vocab_size == hf.model.language_model.embed_tokens.num_embeddings - 8


def test_preprocessed_pil_images_end_to_end(pair):
    """herd's own preprocessing (vision_preprocess) feeding both models: a wide and a tall picture."""
    Image = pytest.importorskip("PIL.Image")
    from herd.model.vision_preprocess import cross_attention_mask, preprocess_images

    model, hf = pair
    gen = torch.Generator().manual_seed(12)
    wide, tall = ((torch.rand(h, w, 3, generator=gen) * 255).to(torch.uint8).numpy() for h, w in ((20, 50), (60, 25)))
    batch = preprocess_images([[Image.fromarray(wide), Image.fromarray(tall)]], tile_size=28, max_tiles=2)
    assert batch.aspect_ratio_ids.tolist() == [[2, 3]]  # (1, 2) and (2, 1) grids
    tokens = torch.tensor([[IMG, 81, 82, IMG, 83, 84, 85]])
    xmask = cross_attention_mask(tokens.tolist(), batch.num_tiles, image_token=IMG, max_tiles=2)
    ours, ref = both(model, hf, tokens, batch.pixel_values, batch.aspect_ratio_ids, batch.aspect_ratio_mask, xmask)
    assert (ours - ref).abs().max() < TOL
