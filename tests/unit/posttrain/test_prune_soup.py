import pytest
import torch

from herd.model import load_model, save_model
from herd.posttrain.config import FinetuneOptimConfig
from herd.posttrain.data import encode_dialog, pack_sft
from herd.posttrain.distill import cache_teacher_topk, load_teacher_topk, train_distill
from herd.posttrain.io import save_tensors
from herd.posttrain.prune import activation_importance, ffn_rule_for, prune_model
from herd.posttrain.soup import average_model_dirs, average_models
from herd.tokenizer import Message


def _rows(fmt, n=6):
    dialogs = [[Message("user", f"question {i}?"), Message("assistant", f"answer number {i}.")] for i in range(n)]
    return pack_sft([encode_dialog(fmt, d) for d in dialogs], seq_len=96, all_tokens=True)


def test_pruning_nothing_is_the_identity(fmt, tiny_model):
    model = tiny_model(seed=1).eval()
    inputs, _, doc_ids = _rows(fmt)
    imp = activation_importance(model, inputs, doc_ids)
    same = prune_model(model, imp)
    assert same.args == model.args
    with torch.no_grad():
        assert torch.equal(same(inputs, doc_ids=doc_ids), model(inputs, doc_ids=doc_ids))


@pytest.mark.parametrize("tied", [True, False])
def test_pruned_shapes_are_consistent_and_round_trip_through_checkpoints(fmt, tiny_model, tmp_path, tied):
    model = tiny_model(seed=2, n_layers=3, tie_embeddings=tied).eval()
    inputs, _, doc_ids = _rows(fmt)
    imp = activation_importance(model, inputs, doc_ids)
    small = prune_model(model, imp, n_layers=2, n_heads=2, ffn_hidden_dim=40, dim=24).eval()
    a = small.args
    assert (a.n_layers, a.n_heads, a.n_kv_heads, a.ffn_hidden_dim, a.dim, a.head_dim) == (2, 2, 2, 40, 24, 8)
    assert a.num_params() == sum(p.numel() for p in small.parameters())
    assert small.args.num_params() < model.args.num_params()
    with torch.no_grad():
        logits = small(inputs, doc_ids=doc_ids)
    assert torch.isfinite(logits).all()
    for fmt_name in ("hf", "meta"):
        save_model(small, tmp_path / fmt_name / str(tied), format=fmt_name)
        back = load_model(tmp_path / fmt_name / str(tied)).eval()
        assert back.args.ffn_hidden_dim == 40 and back.args.head_dim == 8
        with torch.no_grad():
            torch.testing.assert_close(back(inputs, doc_ids=doc_ids), logits, rtol=0, atol=0)


def test_importance_finds_dead_heads_channels_and_layers(fmt, tiny_model):
    model = tiny_model(seed=3, n_layers=3).eval()
    with torch.no_grad():
        att = model.layers["0"].attention
        att.wq.weight[8:16] = 0  # head 1 of layer 0: no query ...
        att.wv.weight.zero_()  # ... and all values zero: every head's output is 0 in layer 0
        model.layers["1"].feed_forward.w1.weight[5] = 0  # FFN channel 5 of layer 1 never fires
        model.layers["2"].attention.wo.weight.zero_()  # layer 2 writes nothing to the residual stream
        model.layers["2"].feed_forward.w2.weight.zero_()
    inputs, _, doc_ids = _rows(fmt)
    imp = activation_importance(model, inputs, doc_ids)
    assert imp.heads[0].max() == 0
    assert imp.ffn[1].argmin() == 5
    assert imp.layers.argmin() == 2 and imp.layers[2].item() == pytest.approx(0.0, abs=1e-6)
    pruned = prune_model(model, imp, n_layers=2)
    with torch.no_grad():  # dropping a block that adds nothing changes nothing
        torch.testing.assert_close(pruned(inputs, doc_ids=doc_ids), model(inputs, doc_ids=doc_ids))


def test_prune_arguments_are_checked(fmt, tiny_model):
    model = tiny_model()
    imp = activation_importance(model, *_rows(fmt)[::2])
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        prune_model(model, imp, n_heads=3)
    with pytest.raises(ValueError, match="n_layers"):
        prune_model(model, imp, n_layers=5)


def test_ffn_rule_reproduces_any_width():
    for dim in (24, 64, 100, 2048):
        for hidden in (1, 7, 40, 5461, 8192):
            multiple_of, mult = ffn_rule_for(dim, hidden)  # asserts internally


def test_distillation_lowers_the_kl_and_topk_cache_round_trips(fmt, tiny_model, tmp_path):
    rows = _rows(fmt)
    teacher, student = tiny_model(seed=4), tiny_model(seed=5)
    path = cache_teacher_topk(teacher, rows[0], rows[2], k=16, temperature=2.0, path=tmp_path / "topk.safetensors")
    cached = load_teacher_topk(path)
    assert cached.logprobs.shape == cached.indices.shape == (*rows[0].shape, 16) and cached.temperature == 2.0
    with torch.no_grad():
        full = teacher(rows[0], doc_ids=rows[2])
    top = torch.log_softmax(full / 2.0, dim=-1).topk(16, dim=-1)
    torch.testing.assert_close(cached.logprobs, top.values)
    assert torch.equal(cached.indices.long(), top.indices)
    cfg = FinetuneOptimConfig(lr=1e-2, steps=30, batch_size=2)
    live = train_distill(student, rows, cfg, teacher=teacher, temperature=2.0, alpha=1.0, log=None)
    assert live.fit.metrics[-1]["kl"] < 0.5 * live.fit.metrics[0]["kl"]
    run = train_distill(tiny_model(seed=5), rows, cfg, topk=cached, temperature=2.0, alpha=1.0, log=None)
    assert run.fit.metrics[-1]["kl"] < 0.5 * run.fit.metrics[0]["kl"]
    # Same student and teacher at step 0: the top-k KL is a lower bound of the full one.
    assert run.fit.metrics[0]["kl"] <= live.fit.metrics[0]["kl"] + 1e-5
    with pytest.raises(ValueError, match="exactly one"):
        train_distill(student, rows, cfg, log=None)


def test_topk_cache_is_tied_to_its_temperature_and_format(fmt, tiny_model, tmp_path):
    rows = _rows(fmt, n=2)
    path = cache_teacher_topk(tiny_model(seed=4), rows[0], rows[2], k=4, temperature=2.0, path=tmp_path / "t.st")
    cfg = FinetuneOptimConfig(lr=1e-2, steps=1, batch_size=2)
    with pytest.raises(ValueError, match="temperature 2.0, training asks for 1.0"):
        train_distill(tiny_model(seed=5), rows, cfg, topk=load_teacher_topk(path), temperature=1.0, log=None)
    # A cache from before the log-probabilities were stored (raw top-k logits, no temperature).
    old = {"values": torch.zeros(1, 2, 4), "indices": torch.zeros(1, 2, 4, dtype=torch.int32)}
    save_tensors(tmp_path / "old.st", old, metadata={"format": "herd-teacher-topk-v1", "k": "4"})
    with pytest.raises(ValueError, match="delete it and rerun"):
        load_teacher_topk(tmp_path / "old.st")
    with pytest.raises(FileNotFoundError):
        load_teacher_topk(tmp_path / "missing.st")


def test_soup_is_the_weighted_mean(tiny_model, tmp_path):
    a, b = tiny_model(seed=6), tiny_model(seed=7)
    avg = average_models([a, b])
    w = "layers.0.attention.wq.weight"
    torch.testing.assert_close(avg.state_dict()[w], (a.state_dict()[w] + b.state_dict()[w]) / 2)
    save_model(a, tmp_path / "a")
    save_model(b, tmp_path / "b")
    weighted = average_model_dirs([tmp_path / "a", tmp_path / "b"], weights=[3, 1])
    torch.testing.assert_close(weighted.state_dict()[w], 0.75 * a.state_dict()[w] + 0.25 * b.state_dict()[w])
    assert weighted.output.weight is weighted.tok_embeddings.weight or not weighted.args.tie_embeddings
    with pytest.raises(ValueError, match="different shape"):
        average_models([a, tiny_model(n_layers=3)])
    with pytest.raises(ValueError, match="weights"):
        average_models([a, b], weights=[1])
