"""Tampered checkpoint configs fail at once, naming the field, in every format (issue 14, item 6).

Before the header checks, `num_hidden_layers = 10**9` built a billion meta-device blocks (a hang)
and `max_position_embeddings = 10**12` asked for a 466 TiB RoPE table. Each case here edits one
field of a freshly written tiny checkpoint and expects a ValueError that names the field, the
config's value and what the weights say, before any model is built from it (a regression would
hang, so pytest-timeout turns it into a failure). The untampered files load to the same logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from herd.model import PRESETS, ModelArgs, build_model, describe, load_model, save_model
from herd.model.llama import Transformer
from herd.model.args import MAX_SEQ_LEN

gguf = pytest.importorskip("gguf")

from herd.model.gguf import gguf_name  # noqa: E402  after importorskip: needs the gguf package

# No RoPE scaling, so a GGUF needs no rope_freqs tensor and the hand-written one below is complete.
ARGS = PRESETS["debug"].replace(rope_scaling=None)
TOKENS = torch.tensor([[1, 5, 9, 200, 3, 77]])


@pytest.fixture(scope="module")
def model():
    return build_model(ARGS, dtype=torch.float32, seed=0)


def _logits(m) -> torch.Tensor:
    with torch.no_grad():
        return m(TOKENS)


def _write_gguf(path: Path, model, **overrides) -> Path:
    """A plain F32 llama GGUF written key by key, with `overrides` replacing metadata values (uint64,
    so 10**12 fits)."""
    a: ModelArgs = model.args
    kv = {"context_length": a.max_seq_len, "embedding_length": a.dim, "block_count": a.n_layers,
          "feed_forward_length": a.ffn_hidden_dim, "attention.head_count": a.n_heads,
          "attention.head_count_kv": a.n_kv_heads, "attention.key_length": a.head_dim, "vocab_size": a.vocab_size,
          "attention.layer_norm_rms_epsilon": a.norm_eps, "rope.freq_base": a.rope_theta}
    kv.update(overrides)
    w = gguf.GGUFWriter(path, "llama")
    for key, value in kv.items():
        (w.add_float32 if isinstance(value, float) else w.add_uint64)(f"llama.{key}", value)
    for key, t in model.state_dict().items():
        w.add_tensor(gguf_name(key), t.detach().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def checkpoints(model, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    save_model(model, root / "hf")
    save_model(model, root / "meta1", format="meta")
    save_model(model, root / "meta2", format="meta", num_shards=2)
    return {"hf": root / "hf", "meta1": root / "meta1", "meta2": root / "meta2",
            "gguf": _write_gguf(root / "m.gguf", model)}


@pytest.mark.parametrize("name", ["hf", "meta1", "meta2", "gguf"])
def test_untampered_checkpoints_load_to_the_same_logits(checkpoints, model, name):
    loaded = load_model(checkpoints[name])
    assert loaded.args.n_layers == ARGS.n_layers and loaded.args.max_seq_len == ARGS.max_seq_len
    torch.testing.assert_close(_logits(loaded), _logits(model), rtol=0, atol=0)


def _built_before_checking(*args, **kwargs):
    raise AssertionError("a model was built from the config before its header checks")


def _refused(path: Path, match: str) -> None:
    # "At once" means before any model is built from the config: building is where the billion
    # blocks and the 466 TiB RoPE table came from. Refusing the build checks that without a
    # wall-clock bound a loaded machine could break; the timeout marks still catch a hang.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Transformer, "__init__", _built_before_checking)
        with pytest.raises(ValueError, match=match):
            load_model(path)
    with pytest.raises(ValueError, match=match):  # `herd info` reads the same headers
        describe(path)


def _tampered_dir(src: Path, dst: Path, config: str, edit) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).symlink_to(f)  # the weights are shared; only the config is a new file
    (dst / config).unlink()
    data = json.loads((src / config).read_text())
    edit(data)
    (dst / config).write_text(json.dumps(data))
    return dst


HF_CASES = [
    (dict(num_hidden_layers=10**9), r"num_hidden_layers = 1000000000 but the weights hold 2 layers"),
    (dict(max_position_embeddings=10**12), r"max_position_embeddings = 1000000000000, more positions than any"),
    (dict(hidden_size=128), r"hidden_size = 128 but model\.norm\.weight is 64 wide"),
    (dict(num_attention_heads=8), r"num_attention_heads = 8 but model\.layers\.0\.self_attn\.q_proj\.weight has 64 rows"),
    (dict(num_key_value_heads=4), r"num_key_value_heads = 4 but model\.layers\.0\.self_attn\.k_proj\.weight has 32 rows"),
    (dict(vocab_size=10**9), r"vocab_size = 1000000000 but model\.embed_tokens\.weight has 256 rows"),
    (dict(intermediate_size=96), r"intermediate_size = 96 but model\.layers\.0\.mlp\.gate_proj\.weight has 224 rows"),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("change, match", HF_CASES, ids=[next(iter(c)) for c, _ in HF_CASES])
def test_tampered_hf_config_is_refused_at_once(checkpoints, tmp_path, change, match):
    _refused(_tampered_dir(checkpoints["hf"], tmp_path / "hf", "config.json", lambda c: c.update(change)), match)


def _herd_section(**values):
    return lambda p: p["herd"].update(values)


META_CASES = [
    (lambda p: p.update(n_layers=10**9), r"n_layers = 1000000000 but the weights hold 2 layers"),
    (lambda p: p.update(max_seq_len=10**12), r"says max_seq_len = 1000000000000, more positions"),
    (_herd_section(max_seq_len=10**12), r"says herd\.max_seq_len = 1000000000000, more positions"),
    (lambda p: p.update(dim=128), r"dim = 128 but norm\.weight is 64 wide"),
    (lambda p: p.update(n_heads=8), r"n_kv_heads = 2 but layers\.0\.attention\.wk\.weight has 32 rows.*check n_heads"),
    (lambda p: p.update(vocab_size=300), r"vocab_size = 300 but tok_embeddings\.weight has 256 rows"),
    (lambda p: p.update(ffn_dim_multiplier=2.0), r"FFN width \(multiple_of, ffn_dim_multiplier\) = 352 but "
                                                  r"layers\.0\.feed_forward\.w1\.weight has 224 rows"),
]
META_IDS = ["layers", "max_seq_len", "herd.max_seq_len", "dim", "heads", "vocab", "ffn"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("shards", ["meta1", "meta2"])
@pytest.mark.parametrize("edit, match", META_CASES, ids=META_IDS)
def test_tampered_meta_params_are_refused_at_once(checkpoints, tmp_path, shards, edit, match):
    _refused(_tampered_dir(checkpoints[shards], tmp_path / "meta", "params.json", edit), match)


@pytest.mark.timeout(60)
def test_a_stray_far_layer_cannot_vouch_for_a_huge_layer_count(checkpoints, tmp_path):
    # One tensor named for layer 10**9 - 1 plus n_layers = 10**9: the count agrees with the highest
    # layer number, so only the gap between layer 1 and it shows the config is not the weights'.
    meta = _tampered_dir(checkpoints["meta1"], tmp_path / "meta", "params.json", lambda p: p.update(n_layers=10**9))
    shard = meta / "consolidated.00.pth"
    sd = torch.load(shard, weights_only=True)
    sd[f"layers.{10**9 - 1}.attention_norm.weight"] = torch.ones(64)
    shard.unlink()  # a symlink to the shared file; write a new one
    torch.save(sd, shard)
    _refused(meta, r"layers are not numbered 0 \.\. 999999999 without gaps \(no tensor of layer 2\)")


GGUF_CASES = [
    (dict(block_count=10**9), r"llama\.block_count = 1000000000 but the weights hold 2 layers"),
    (dict(context_length=10**12), r"llama\.context_length = 1000000000000, more positions"),
    (dict(embedding_length=128), r"llama\.embedding_length = 128 but output_norm\.weight is 64 wide"),
    (dict(**{"attention.head_count": 8}), r"llama\.attention\.head_count = 8 but blk\.0\.attn_q\.weight has 64 rows"),
    (dict(**{"attention.head_count_kv": 4}), r"llama\.attention\.head_count_kv = 4 but blk\.0\.attn_k\.weight has 32"),
    (dict(feed_forward_length=96), r"llama\.feed_forward_length = 96 but blk\.0\.ffn_gate\.weight has 224 rows"),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("change, match", GGUF_CASES, ids=[next(iter(c)) for c, _ in GGUF_CASES])
def test_tampered_gguf_metadata_is_refused_at_once(model, tmp_path, change, match):
    _refused(_write_gguf(tmp_path / "m.gguf", model, **change), match)


def test_gguf_vocab_size_that_disagrees_is_refused(model, tmp_path):
    # vocab_size has its own older check in the metadata reader; still fast and named.
    _refused(_write_gguf(tmp_path / "m.gguf", model, vocab_size=10**9),
             r"llama\.vocab_size = 1000000000 but token_embd\.weight has 256 rows")


def test_context_limit_is_exact_and_applies_to_every_way_in(checkpoints, tmp_path):
    # The bound itself is allowed (and costs nothing until a table is built); one more is not.
    ARGS.replace(max_seq_len=MAX_SEQ_LEN)
    with pytest.raises(ValueError, match=r"ModelArgs\.max_seq_len = 16777217"):
        ARGS.replace(max_seq_len=MAX_SEQ_LEN + 1)
    with pytest.raises(ValueError, match=r"ModelArgs\.max_seq_len = 1000000000000"):
        load_model(checkpoints["hf"], max_seq_len=10**12)
    hf = _tampered_dir(checkpoints["hf"], tmp_path / "hf", "config.json",
                       lambda c: c.update(max_position_embeddings=MAX_SEQ_LEN + 1))
    with pytest.raises(ValueError, match=r"max_position_embeddings = 16777217"):
        load_model(hf)
