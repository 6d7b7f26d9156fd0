"""Meta's consolidated layouts: replicated KV heads, the FP8 / quantized releases, Llama 1/2 params.

The replicated-KV files are built here the way llama-models builds them (`reshard_mp` in
models/checkpoint.py: plain fairscale splits up to one KV head per file, then each file resharded
with `wk/wv.repeat(new_mp // n_kv_heads, 1)` and chunked), independently of herd's writer; herd's
writer is then checked against those files tensor for tensor.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from herd.model import PRESETS, ModelArgs, build_model, describe, load_model, save_model
from herd.model import keymap as K

# 8 query heads so that 8 files still hold whole query heads; 2 KV heads, so 4 and 8 files
# replicate each KV head 2 and 4 times.
GQA = ModelArgs(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=256, multiple_of=32,
                ffn_dim_multiplier=1.3, rope_theta=500000.0, max_seq_len=8192)
_COLUMN = ("wq", "wk", "wv", "w1", "w3", "output", "tok_embeddings")  # llama-models _WEIGHT_COLUMN_KEY
_ROW = ("wo", "w2")  # _WEIGHT_ROW_KEY


def _name(key: str) -> str:
    return key.split(".")[-2]


def _fairscale_split(sd: dict[str, torch.Tensor], n: int) -> list[dict[str, torch.Tensor]]:
    """Meta's files for n <= n_kv_heads: column-parallel rows, row-parallel columns, norms copied."""
    out = [{} for _ in range(n)]
    for key, t in sd.items():
        dim = 0 if _name(key) in _COLUMN else 1 if _name(key) in _ROW else None
        for i in range(n):
            out[i][key] = (t if dim is None else t.chunk(n, dim=dim)[i]).clone()
    return out


def _reshard_up(files: list[dict[str, torch.Tensor]], new_mp: int, n_kv_heads: int) -> list[dict[str, torch.Tensor]]:
    """llama-models `maybe_reshard_state_dict` + `reshard_mp` for new_mp a multiple of len(files)."""
    old = len(files)
    size, repeat = new_mp // old, max(new_mp // n_kv_heads, 1)
    out = []
    for rank in range(new_mp):
        src, r = files[rank * old // new_mp], rank % size
        shard = {}
        for key, t in src.items():
            name = _name(key)
            if name in _ROW:
                shard[key] = t.chunk(size, dim=-1)[r].clone()
            elif name in ("wk", "wv"):
                shard[key] = t.repeat(repeat, 1).chunk(size, dim=0)[r].clone()
            elif name in _COLUMN:
                shard[key] = t.chunk(size, dim=0)[r].clone()
            else:
                shard[key] = t.clone()
        out.append(shard)
    return out


def _meta_params(args: ModelArgs, n_kv_heads: int) -> dict:
    # The fields of Meta's 405B params.json (sku_list.py arch_args), for this tiny shape.
    return {"dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads, "n_kv_heads": n_kv_heads,
            "vocab_size": args.vocab_size, "ffn_dim_multiplier": args.ffn_dim_multiplier,
            "multiple_of": args.multiple_of, "norm_eps": args.norm_eps, "rope_theta": args.rope_theta,
            "use_scaled_rope": False}


def _write_dir(path: Path, files: list[dict[str, torch.Tensor]], params: dict) -> Path:
    path.mkdir()
    (path / "params.json").write_text(json.dumps(params))
    for i, sd in enumerate(files):
        torch.save(sd, path / f"consolidated.{i:02d}.pth")
    return path


def _metas_replicated_files(model, n_files: int) -> list[dict[str, torch.Tensor]]:
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    kv = model.args.n_kv_heads
    return _reshard_up(_fairscale_split(sd, kv), n_files, kv)


@pytest.fixture(scope="module")
def gqa_model():
    return build_model(GQA, dtype=torch.float32, seed=0)


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, GQA.vocab_size, (2, 24), generator=torch.Generator().manual_seed(3))


def _assert_same_model(loaded, model, tokens) -> None:
    assert loaded.args.n_kv_heads == model.args.n_kv_heads
    for key, t in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], t), key
    with torch.no_grad():
        assert torch.equal(loaded(tokens), model(tokens))


# ---- replicated KV heads -------------------------------------------------------------------


@pytest.mark.parametrize("n_files", [4, 8])
@pytest.mark.parametrize("params_kv", ["true count", "copies"])
def test_metas_replicated_kv_layout_loads_as_the_true_model(tmp_path, gqa_model, tokens, n_files, params_kv):
    files = _metas_replicated_files(gqa_model, n_files)
    # Each file holds one KV head: head f // copies, as the query heads of that file need.
    copies = n_files // GQA.n_kv_heads
    wk = gqa_model.layers["0"].attention.wk.weight.detach().chunk(GQA.n_kv_heads)
    for f, sd in enumerate(files):
        assert torch.equal(sd["layers.0.attention.wk.weight"], wk[f // copies])
    # Meta's 405B mp16 params.json counts the copies (n_kv_heads 16); herd must not rely on either.
    kv_in_params = GQA.n_kv_heads if params_kv == "true count" else n_files
    path = _write_dir(tmp_path / "meta", files, _meta_params(GQA, kv_in_params))
    _assert_same_model(load_model(path), gqa_model, tokens)
    info = describe(path)
    assert info.args.n_kv_heads == GQA.n_kv_heads and info.num_params == GQA.num_params()


@pytest.mark.parametrize("n_files", [4, 8])
def test_herd_writes_metas_replicated_layout_and_reads_it_back(tmp_path, gqa_model, tokens, n_files):
    save_model(gqa_model, tmp_path / "herd", format="meta", num_shards=n_files)
    expected = _metas_replicated_files(gqa_model, n_files)
    for i, want in enumerate(expected):
        got = torch.load(tmp_path / "herd" / f"consolidated.{i:02d}.pth", weights_only=True)
        assert got.keys() == want.keys()
        for key in want:
            assert torch.equal(got[key], want[key]), (i, key)
    params = json.loads((tmp_path / "herd" / "params.json").read_text())
    # As in Meta's mp16 release: params.json counts the copies, so Meta's loader gives each rank one.
    assert params["n_kv_heads"] == n_files and params["herd"]["n_kv_heads"] == GQA.n_kv_heads
    _assert_same_model(load_model(tmp_path / "herd"), gqa_model, tokens)


def test_unequal_kv_copies_are_an_error(tmp_path, gqa_model):
    files = _metas_replicated_files(gqa_model, 4)
    files[3]["layers.1.attention.wv.weight"] += 1e-3  # file 3 holds the second copy of KV head 1
    path = _write_dir(tmp_path / "meta", files, _meta_params(GQA, GQA.n_kv_heads))
    with pytest.raises(ValueError, match=r"consolidated\.03\.pth and consolidated\.02\.pth should hold the same "
                                         r"copy of KV head 1 \(layers\.1\.attention\.wv\.weight"):
        load_model(path)
    # herd's own files say the true count under "herd"; a damaged copy is caught the same way.
    save_model(gqa_model, tmp_path / "herd", format="meta", num_shards=4)
    victim = tmp_path / "herd" / "consolidated.01.pth"
    sd = torch.load(victim, weights_only=True)
    sd["layers.0.attention.wk.weight"] = torch.zeros_like(sd["layers.0.attention.wk.weight"])
    torch.save(sd, victim)
    with pytest.raises(ValueError, match=r"should hold the same copy of KV head 0"):
        load_model(tmp_path / "herd")


def test_files_that_differ_somewhere_are_not_merged_when_params_counts_them(tmp_path, gqa_model):
    # params.json says 4 KV heads in 4 files and the heads differ in one layer: that is a genuine
    # 4-KV-head model, not copies, so it loads as one.
    files = _metas_replicated_files(gqa_model, 4)
    files[1]["layers.1.attention.wk.weight"] += 1.0
    loaded = load_model(_write_dir(tmp_path / "meta", files, _meta_params(GQA, 4)))
    assert loaded.args.n_kv_heads == 4
    assert torch.equal(loaded.layers["1"].attention.wk.weight[8:16], files[1]["layers.1.attention.wk.weight"])


def test_writer_refuses_kv_heads_it_cannot_place(tmp_path):
    # 12 query heads, 4 KV heads, 6 files: neither count divides the other.
    args = ModelArgs(dim=96, n_layers=1, n_heads=12, n_kv_heads=4, vocab_size=240, multiple_of=48)
    with pytest.raises(ValueError, match=r"cannot split 4 KV heads into 6 model-parallel files"):
        save_model(build_model(args, seed=0), tmp_path / "meta", format="meta", num_shards=6)
    assert not (tmp_path / "meta").exists()


# ---- Meta's quantized releases -------------------------------------------------------------


@pytest.fixture()
def meta_dir(tmp_path, gqa_model) -> Path:
    save_model(gqa_model, tmp_path / "meta", format="meta", num_shards=2)
    return tmp_path / "meta"


def test_fp8_scales_file_gets_a_clear_message(meta_dir):
    torch.save({"1_feed_forward.w1_0": torch.ones(112)}, meta_dir / "fp8_scales_0.pt")
    for read in (load_model, describe):
        with pytest.raises(ValueError, match=r"Meta's FP8 checkpoint .*found fp8_scales_0\.pt.*bf16 release.*"
                                             r"herd quantize --scheme fp8"):
            read(meta_dir)


def test_fp8_weights_get_a_clear_message(meta_dir):
    path = meta_dir / "consolidated.01.pth"
    sd = torch.load(path, weights_only=True)
    sd["layers.1.feed_forward.w2.weight"] = sd["layers.1.feed_forward.w2.weight"].to(torch.float8_e4m3fn)
    torch.save(sd, path)
    with pytest.raises(ValueError, match=r"Meta's FP8 checkpoint .*layers\.1\.feed_forward\.w2\.weight in float8"):
        load_model(meta_dir)


def test_quantized_and_qlora_params_get_a_clear_message(meta_dir):
    params = json.loads((meta_dir / "params.json").read_text())
    params.update(quantization_args={"scheme": "int4_weight_int8_dynamic_activation", "group_size": 256},
                  lora_args={"rank": 16, "scale": 2.0})
    (meta_dir / "params.json").write_text(json.dumps(params))
    with pytest.raises(ValueError, match=r"params\.json: params\.json describes one of Meta's quantized "
                                         r"checkpoints \(scheme 'int4_weight_int8_dynamic_activation' with a QLoRA "
                                         r"adaptor .*bf16 release .*herd quantize --scheme int4"):
        load_model(meta_dir)
    params.pop("lora_args")
    params["quantization_args"] = {"scheme": "fp8_mixed"}
    with pytest.raises(ValueError, match=r"Meta's FP8 checkpoint .*herd quantize --scheme fp8"):
        K.args_from_meta_params(params)


# ---- Llama 1 / 2 / Code Llama params.json --------------------------------------------------

# Meta's own params.json files, verbatim (Llama 2 from the llama repo's download; Llama 1 from its
# release; Code Llama 7B from codellama's download).
LLAMA2 = {
    "llama2-7b": {"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-05,
                  "vocab_size": -1},
    "llama2-13b": {"dim": 5120, "multiple_of": 256, "n_heads": 40, "n_layers": 40, "norm_eps": 1e-05,
                   "vocab_size": -1},
    "llama2-70b": {"dim": 8192, "multiple_of": 4096, "ffn_dim_multiplier": 1.3, "n_heads": 64, "n_kv_heads": 8,
                   "n_layers": 80, "norm_eps": 1e-05, "vocab_size": -1},
    "llama1-7b": {"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-06,
                  "vocab_size": -1},
    "llama1-13b": {"dim": 5120, "multiple_of": 256, "n_heads": 40, "n_layers": 40, "norm_eps": 1e-06,
                   "vocab_size": -1},
    "llama1-33b": {"dim": 6656, "multiple_of": 256, "n_heads": 52, "n_layers": 60, "norm_eps": 1e-06,
                   "vocab_size": -1},
    "llama1-65b": {"dim": 8192, "multiple_of": 256, "n_heads": 64, "n_layers": 80, "norm_eps": 1e-06,
                   "vocab_size": -1},
}


@pytest.mark.parametrize("name", sorted(LLAMA2))
def test_llama1_and_2_params_give_the_presets(name):
    # vocab_size -1: the reader passes the embedding's rows; no rope_theta: 10000, not Llama 3's 500000.
    assert K.args_from_meta_params(LLAMA2[name], vocab_size=32000) == PRESETS[name]


def test_vocab_minus_one_needs_the_embedding():
    with pytest.raises(ValueError, match=r"vocab_size -1 \(Llama 1/2 leave it to the tokenizer\)"):
        K.args_from_meta_params(LLAMA2["llama2-7b"])


def test_code_llama_params_keep_their_rope_theta():
    code7b = {"dim": 4096, "n_layers": 32, "n_heads": 32, "multiple_of": 256, "ffn_dim_multiplier": 1.0,
              "norm_eps": 1e-5, "rope_theta": 1000000, "vocab_size": 32016}
    args = K.args_from_meta_params(code7b)
    assert args.rope_theta == 1e6 and args.vocab_size == 32016 and args.max_seq_len == 16384
    assert args.ffn_hidden_dim == 11008 and args.rope_scaling is None


def test_embedding_split_that_fits_neither_layout_is_an_error(meta_dir):
    for i in range(2):
        path = meta_dir / f"consolidated.{i:02d}.pth"
        sd = torch.load(path, weights_only=True)
        sd["tok_embeddings.weight"] = sd["tok_embeddings.weight"][:, :48].clone()
        torch.save(sd, path)
    with pytest.raises(ValueError, match=r"cannot tell how tok_embeddings\.weight is split across the 2 "
                                         r"model-parallel files \(consolidated\.00\.pth: \(128, 48\)"):
        load_model(meta_dir)
