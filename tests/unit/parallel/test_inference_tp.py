"""The single-process pieces of tensor-parallel inference: the split rules and their errors."""

import pytest
import torch

from herd.model import ModelArgs
from herd.parallel.inference import TPRank, check_gpus, check_tp_inference, local_args

L8 = ModelArgs.from_name("llama3-8b")  # 32 query / 8 KV heads of 128


def test_each_rank_owns_whole_kv_heads_and_their_query_heads():
    a = local_args(L8, 4)
    assert (a.n_heads, a.n_kv_heads, a.head_dim, a.n_rep) == (8, 2, 128, L8.n_rep)
    assert a.vocab_size == L8.vocab_size and a.dim == L8.dim  # logits and residual stream stay whole
    assert a.kv_cache_bytes_per_token() * 4 == L8.kv_cache_bytes_per_token()


def test_uneven_splits_are_refused_with_the_degrees_that_work():
    with pytest.raises(ValueError, match=r"--tp 3 does not divide n_kv_heads=8.*use --tp in \[1, 2, 4, 8\]"):
        check_tp_inference(L8, 3)
    with pytest.raises(ValueError, match="--tp must be a positive"):
        check_tp_inference(L8, 0)
    check_tp_inference(L8, 8)


def test_vocabulary_rows_cover_an_uneven_vocabulary_once():
    V, n = 255, 4
    ranges = [TPRank(r, n).vocab_range(V) for r in range(n)]
    assert all(per == 64 for _, _, per in ranges)
    covered = [t for start, stop, _ in ranges for t in range(start, stop)]
    assert covered == list(range(V))


@pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="this machine has the GPUs")
def test_more_ranks_than_gpus_is_a_clear_error():
    with pytest.raises(ValueError, match="needs 2 GPUs"):
        check_gpus(2)


def test_loading_a_shard_checks_every_shape_against_the_config(tmp_path):
    import json

    from herd.model import build_model
    from herd.model.formats import save_model
    from herd.parallel.inference import load_tp_model

    args = ModelArgs.from_name("debug")
    path = save_model(build_model(args, seed=0), tmp_path / "ck")
    model = load_tp_model(path, TPRank(1, 2))  # loading needs no process group; the forward does
    assert model.layers["0"].attention.wk.weight.shape == (args.head_dim, args.dim)  # one of 2 KV heads
    config = json.loads((path / "config.json").read_text())
    config["intermediate_size"] += 32  # a config that does not describe these weights
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="intermediate_size|feed_forward"):
        load_tp_model(path, TPRank(0, 2))
