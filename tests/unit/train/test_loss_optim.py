"""Loss (fp32, ignore_index, chunked head) and the optimizer's weight-decay groups."""

import math

import pytest
import torch

from herd.model import ModelArgs, build_model
from herd.train.config import OptimConfig
from herd.train.core import chunked_cross_entropy_sum, cross_entropy_sum
from herd.train.optim import build_optimizer, param_groups


def test_cross_entropy_sum_skips_ignored_targets_and_matches_the_definition():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5)
    targets = torch.tensor([[1, -100, 4], [0, 2, -100]])
    expected = 0.0
    for b in range(2):
        for s in range(3):
            t = int(targets[b, s])
            if t != -100:
                expected -= math.log(torch.softmax(logits[b, s].double(), -1)[t].item())
    assert cross_entropy_sum(logits, targets).item() == pytest.approx(expected, rel=1e-6)


def test_cross_entropy_is_computed_in_fp32_for_bf16_logits():
    logits = torch.randn(1, 4, 7).bfloat16()
    out = cross_entropy_sum(logits, torch.tensor([[1, 2, 3, 4]]))
    assert out.dtype == torch.float32


@pytest.mark.parametrize("chunks", [2, 3, 7])
def test_chunked_head_gives_the_same_loss_and_gradients(chunks):
    model = build_model(ModelArgs.from_name("debug"), seed=0)
    tokens = torch.randint(0, 256, (2, 21))
    targets = torch.randint(0, 256, (2, 21))
    targets[0, :5] = -100

    plain = cross_entropy_sum(model(tokens), targets)
    plain.backward()
    g_plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    chunked = chunked_cross_entropy_sum(model.hidden(tokens), model.output.weight, targets, chunks=chunks)
    chunked.backward()
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, g_plain[n], rtol=1e-5, atol=1e-6, msg=n)


def test_no_weight_decay_on_norms_and_embeddings():
    model = build_model(ModelArgs.from_name("debug"), seed=0)
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in no_decay["params"]} == {
        n for n in names.values() if "norm" in n} | {"tok_embeddings.weight"}
    assert "output.weight" in {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0


def test_a_tied_matrix_is_one_undecayed_parameter():
    model = build_model(ModelArgs.from_name("debug", tie_embeddings=True), seed=0)
    opt = build_optimizer(model, OptimConfig())
    params = [p for g in opt.param_groups for p in g["params"]]
    assert len(params) == len({id(p) for p in params}) == len(list(model.parameters()))
    assert any(p is model.tok_embeddings.weight for p in opt.param_groups[1]["params"])
    assert opt.defaults["betas"] == (0.9, 0.95)


def test_a_pipeline_stages_copy_of_a_tied_matrix_is_not_decayed():
    """The last stage of a tied model holds the head as its own copy of the embedding; decaying it
    (and not the first stage's copy) would make the two copies differ after one step."""
    from herd.model.llama import Transformer
    from herd.parallel.pipeline import split_model

    for tie in (True, False):
        with torch.device("meta"):
            model = Transformer(ModelArgs.from_name("debug", n_layers=2, tie_embeddings=tie))
        ((_, last),) = split_model(model, pp_rank=1, pp=2, schedule="1F1B", n_per_rank=1)
        decay, no_decay = param_groups(last, 0.1)
        assert any(p is last.output.weight for p in (no_decay if tie else decay)["params"])
