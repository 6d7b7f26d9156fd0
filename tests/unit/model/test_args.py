import pytest
import torch

from herd.model import PRESETS, ModelArgs, RopeScaling, Transformer

# Published totals (tied embeddings counted once): Meta model cards and the HF index total_size / 2.
EXPECTED_PARAMS = {
    "llama3-8b": 8_030_261_248,
    "llama3.1-8b": 8_030_261_248,
    "llama3-70b": 70_553_706_496,
    "llama3.1-70b": 70_553_706_496,
    "llama3.1-405b": 405_853_388_800,
    "llama3.2-1b": 1_235_814_400,
    "llama3.2-3b": 3_212_749_824,
    # Llama 1 / 2: the HF model cards and index total_size / 2 (7B 6.74B, 13B 13.0B, 30B 32.5B, ...).
    "llama1-7b": 6_738_415_616,
    "llama1-13b": 13_015_864_320,
    "llama1-33b": 32_528_943_616,
    "llama1-65b": 65_285_660_672,
    "llama2-7b": 6_738_415_616,
    "llama2-13b": 13_015_864_320,
    "llama2-70b": 68_976_648_192,
}
# FFN widths from the released config.json files.
EXPECTED_FFN = {"llama3-8b": 14336, "llama3-70b": 28672, "llama3.1-405b": 53248, "llama3.2-1b": 8192,
                "llama3.2-3b": 8192, "llama1-7b": 11008, "llama1-13b": 13824, "llama1-33b": 17920,
                "llama1-65b": 22016, "llama2-7b": 11008, "llama2-13b": 13824, "llama2-70b": 28672}


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMS))
def test_num_params_matches_published_counts(name):
    assert ModelArgs.from_name(name).num_params() == EXPECTED_PARAMS[name]


@pytest.mark.parametrize("name", sorted(EXPECTED_FFN))
def test_ffn_hidden_dim(name):
    assert ModelArgs.from_name(name).ffn_hidden_dim == EXPECTED_FFN[name]


def test_presets_are_exactly_the_documented_set():
    assert set(PRESETS) == set(EXPECTED_PARAMS) | {"debug"}


def test_preset_shapes_match_released_configs():
    a = ModelArgs.from_name("llama3.2-1b")
    assert (a.dim, a.n_layers, a.n_heads, a.n_kv_heads, a.head_dim, a.tie_embeddings) == (2048, 16, 32, 8, 64, True)
    assert a.rope_scaling == RopeScaling(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                         original_max_seq_len=8192)
    assert ModelArgs.from_name("llama3.1-8b").rope_scaling.factor == 8.0
    assert ModelArgs.from_name("llama3-8b").rope_scaling is None
    for name in EXPECTED_PARAMS:
        a = ModelArgs.from_name(name)
        if name.startswith("llama3"):
            assert a.vocab_size == 128256 and a.rope_theta == 500000.0 and a.n_kv_heads == 8
        else:  # Llama 1/2: SentencePiece vocabulary, theta 10000, GQA only for Llama 2 70B
            assert a.vocab_size == 32000 and a.rope_theta == 10000.0 and a.rope_scaling is None
            assert a.n_kv_heads == (8 if name == "llama2-70b" else a.n_heads)
            assert (a.norm_eps, a.max_seq_len) == ((1e-6, 2048) if name.startswith("llama1") else (1e-5, 4096))
    assert ModelArgs.from_name("llama1-33b").head_dim == 128  # 6656 / 52


def test_unknown_preset_lists_valid_names():
    with pytest.raises(ValueError, match="llama3.1-8b"):
        ModelArgs.from_name("llama-9b")


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(n_heads=6, n_kv_heads=4), "multiple of n_kv_heads"),
        (dict(dim=100, n_heads=3, n_kv_heads=3), "divisible by n_heads"),
        (dict(n_layers=0), "n_layers"),
        (dict(rope_scaling=dict(factor=-1.0)), "factor"),
    ],
)
def test_bad_args_raise_clear_errors(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        ModelArgs.from_name("debug", **kwargs)


def test_non_embedding_count_and_flops_by_hand():
    a = ModelArgs.from_name("debug")  # dim 64, 2 layers, 4 heads, 2 kv heads, hd 16, vocab 256
    ffn = a.ffn_hidden_dim
    assert ffn == 32 * ((int(1.3 * int(2 * 256 / 3)) + 31) // 32) == 224
    layer = 64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * ffn + 2 * 64
    assert a.num_params(embeddings=False) == 2 * layer + 64
    seq = 128
    expected = 6 * (2 * layer + 64 + 256 * 64) + 12 * 2 * 4 * 16 * seq
    assert a.flops_per_token(seq) == expected


def test_405b_builds_on_meta_device_without_memory():
    with torch.device("meta"):
        model = Transformer(ModelArgs.from_name("llama3.1-405b"))
    assert sum(p.numel() for p in model.parameters()) == EXPECTED_PARAMS["llama3.1-405b"]
    assert model.layers["125"].attention.wk.weight.shape == (1024, 16384)


def test_kv_cache_bytes_per_token_matches_reference():
    # 128 KiB per token for 8B in bf16 (2 * 32 layers * 8 heads * 128 * 2 bytes)
    assert ModelArgs.from_name("llama3-8b").kv_cache_bytes_per_token() == 128 * 1024
    assert ModelArgs.from_name("llama3.2-1b").kv_cache_bytes_per_token() == 32 * 1024
