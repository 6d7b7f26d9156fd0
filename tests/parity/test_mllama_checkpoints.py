"""Llama 3.2 Vision checkpoints: HF <-> herd <-> Meta, bit for bit, and files transformers loads.

The Meta names and shapes checked here are those of meta-llama/llama-models
`models/llama3/multimodal/model.py` (VisionEncoder, TilePositionEmbedding, CrossAttention,
CrossAttentionTransformerText); the grid -> per-aspect-ratio table rule is the one in
transformers' `convert_mllama_weights_to_hf.py` (`pre_compute_positional_embedding`).
"""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import MllamaForConditionalGeneration  # noqa: E402

from herd.model.formats import load_model  # noqa: E402
from herd.model.mllama_io import (  # noqa: E402
    from_hf_state_dict,
    from_meta_state_dict,
    grid_to_tables,
    load_mllama,
    save_mllama,
    to_hf_state_dict,
    to_meta_state_dict,
)
from tests.parity.test_mllama_parity import (  # noqa: E402
    IMG,
    cross_mask_from_tokens,
    hf_twin,
    images_for,
    randomized,
    tiny_args,
)

ENC = "vision_model.vision_encoder."
TABLES = ("gated_positional_embedding", "pre_tile_pos_embed.embedding", "post_tile_pos_embed.embedding")


def from_grids(seed: int = 0, max_num_tiles: int = 2):
    """A random model whose tile tables came from Meta grids, as every released checkpoint's did."""
    model = randomized(tiny_args(max_num_tiles), seed=seed)
    v = model.args.vision
    gen = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for name in TABLES:
            p = model.get_parameter(ENC + name)
            grid = torch.randn(v.max_num_tiles, v.max_num_tiles, *p.shape[2:], generator=gen)
            p.copy_(grid_to_tables(grid, v.aspect_ratios))
    return model


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape and a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("tiles", [2, 4])
def test_hf_herd_meta_herd_hf_round_trip_is_bit_identical(tiles):
    model = from_grids(max_num_tiles=tiles)
    args = model.args
    hf_sd = to_hf_state_dict(model.state_dict(), args)
    herd1 = from_hf_state_dict(hf_sd, args)
    herd2 = from_meta_state_dict(to_meta_state_dict(herd1, args), args)
    assert_same(herd1, herd2)
    assert_same(to_hf_state_dict(herd2, args), hf_sd)
    assert_same(herd1, {k: v for k, v in model.state_dict().items()})


def test_meta_names_and_shapes_are_the_reference_codes():
    model = from_grids()
    a, v = model.args, model.args.vision
    meta = to_meta_state_dict(model.state_dict(), a)
    T, W, D = v.max_num_tiles, v.width, a.text.dim
    expected = {
        ENC + "conv1._linear.weight": (W, 3 * 14 * 14),
        ENC + "class_embedding": (W,),
        ENC + "positional_embedding": (v.n_tokens, W),
        ENC + "gated_positional_embedding": (T, T, v.n_tokens, W),
        ENC + "gated_positional_embedding_gate": (1,),
        ENC + "pre_tile_pos_embed.embedding": (T, T, 1, W),
        ENC + "post_tile_pos_embed.gate": (1,),
        ENC + "ln_pre.bias": (W,),
        ENC + "transformer.resblocks.0.attn.wq.weight": (W, W),
        ENC + "transformer.resblocks.0.mlp.c_fc.bias": (v.mlp_dim,),
        ENC + "global_transformer.resblocks.0.gate_ffn": (1,),
        "vision_model.vision_projection.weight": (D, W * 3),
        "vision_model.vision_projection.bias": (D,),
        "text_model.learnable_embedding.weight": (8, D),
        "text_model.layers.3.attention.wq.weight": (D, D),
        "text_model.cross_attention_layers.1.attention.k_norm.weight": (D // a.text.n_heads,),
        "text_model.cross_attention_layers.1.gate_attn": (1,),
        "text_model.cross_attention_layers.1.gate_ffwd": (1,),
        "text_model.cross_attention_layers.0.feed_forward.w2.weight": (D, a.text.ffn_hidden_dim),
    }
    for key, shape in expected.items():
        assert tuple(meta[key].shape) == shape, key
    assert not any("global_transformer" not in k and k.endswith("gate_ffn") for k in meta)


def test_grid_to_tables_is_hfs_precompute_rule():
    T, n, W = 4, 3, 2
    grid = torch.randn(T, T, n, W)
    ratios = ((1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (3, 1), (4, 1))
    tables = grid_to_tables(grid, ratios)
    assert torch.equal(tables[0], torch.zeros(T, n, W))  # id 0: padding image
    # (2, 2) is id 6: tiles in row-major order over the top-left 2x2 of the grid.
    assert torch.equal(tables[6], torch.stack([grid[0, 0], grid[0, 1], grid[1, 0], grid[1, 1]]))
    # (3, 1) is id 7: the first column's top three tiles, then one unused (zero) tile slot.
    assert torch.equal(tables[7, :3], grid[:3, 0]) and torch.equal(tables[7, 3], torch.zeros(n, W))
    assert torch.equal(tables[4], grid[0, :4])


def test_tables_that_no_grid_made_are_refused_for_meta():
    model = randomized(tiny_args())  # independent random tables disagree on shared tiles
    with pytest.raises(ValueError, match="cannot be written as Meta's"):
        to_meta_state_dict(model.state_dict(), model.args)


def test_fused_meta_names_get_a_clear_error():
    model = from_grids()
    sd = to_meta_state_dict(model.state_dict(), model.args)
    sd["text_model.layers.0.attention.wqkv.weight"] = sd.pop("text_model.layers.0.attention.wq.weight")
    with pytest.raises(ValueError, match="fused TransformerEngine names"):
        from_meta_state_dict(sd, model.args)


def test_saved_hf_directory_loads_in_transformers_and_back(tmp_path):
    model = from_grids(seed=2)
    path = save_mllama(model, tmp_path / "hf")
    hf, info = MllamaForConditionalGeneration.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert_same({k: v for k, v in hf.state_dict().items()}, to_hf_state_dict(model.state_dict(), model.args))
    config = json.loads((path / "config.json").read_text())
    assert config["vision_config"]["intermediate_layers_indices"] == [1, 2]  # Meta's indices, as HF's hub configs
    assert_same(load_mllama(path).state_dict(), model.state_dict())
    # And transformers computes the same logits from the files (its 5.x layer shift undone, see parity test).
    twin = hf_twin(load_mllama(path))
    images, ids, mask = images_for(model.args, [[(1, 2)]], seed=4)
    tokens = torch.tensor([[IMG, 5, 6, 7]])
    xmask = cross_mask_from_tokens(tokens, mask)
    with torch.no_grad():
        ours = model(tokens, images=images, aspect_ratio_ids=ids, aspect_ratio_mask=mask, cross_attention_mask=xmask)
        ref = twin(input_ids=tokens, pixel_values=images, aspect_ratio_ids=ids, aspect_ratio_mask=mask,
                   cross_attention_mask=xmask).logits
    assert (ours - ref).abs().max() < 1e-4


def test_meta_directory_round_trip(tmp_path):
    model = from_grids(seed=3)
    path = save_mllama(model, tmp_path / "meta", format="meta")
    params = json.loads((path / "params.json").read_text())
    assert params["vision_chunk_size"] == 28 and params["vision_num_cross_attention_layers"] == 2
    assert_same(load_mllama(path).state_dict(), model.state_dict())


def test_text_loader_points_vision_checkpoints_to_load_mllama(tmp_path):
    model = from_grids(seed=4)
    for fmt in ("hf", "meta"):
        path = save_mllama(model, tmp_path / fmt, format=fmt)
        with pytest.raises(ValueError, match="load_mllama"):
            load_model(path)


def test_hf_config_reader_rejects_other_schedules():
    from herd.model.mllama_io import args_from_hf_config, hf_config_from_args

    cfg = hf_config_from_args(tiny_args())
    back = args_from_hf_config(cfg)  # the FFN width comes back as another (multiple_of, multiplier) pair
    assert hf_config_from_args(back) == cfg and back.vision == tiny_args().vision
    assert back.text.ffn_hidden_dim == tiny_args().text.ffn_hidden_dim
    cfg["text_config"]["cross_attention_layers"] = [0, 1]
    with pytest.raises(ValueError, match="uniform schedule"):
        args_from_hf_config(cfg)
