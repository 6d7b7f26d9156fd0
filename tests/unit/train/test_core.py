"""herd.train.core: each pluggable loss against cross-entropy computed by hand, the step against a
hand-written AdamW step, and Trainer / post-training's fit taking exactly the core's step."""

import copy
import math

import pytest
import torch

from herd.data.loader import Batch
from herd.model import ModelArgs, build_model
from herd.posttrain.config import FinetuneOptimConfig as PostOptim
from herd.posttrain.loop import TokenSteps, fit, schedule_for
from herd.posttrain.sft import next_token_loss_sum
from herd.targets import IGNORE_INDEX
from herd.train.config import config_from_dict
from herd.train.core import ChunkedNextTokenLoss, TokenBatch, TrainCore, next_token_loss
from herd.train.optim import build_optimizer
from herd.train.trainer import Trainer

ARGS = ModelArgs.from_name("debug")


def _batch(seed: int, rows: int = 2, seq: int = 9, *, masked: bool = True) -> Batch:
    g = torch.Generator().manual_seed(seed)
    inputs = torch.randint(0, ARGS.vocab_size, (rows, seq), generator=g)
    targets = torch.randint(0, ARGS.vocab_size, (rows, seq), generator=g)
    if masked:  # an "assistant mask": only some positions are trained
        targets[0, :4] = IGNORE_INDEX
        targets[1, 6:] = IGNORE_INDEX
    doc_ids = torch.zeros(rows, seq, dtype=torch.long)
    doc_ids[:, seq // 2:] = 1
    return Batch(inputs, targets, doc_ids, int((targets != IGNORE_INDEX).sum()))


def _hand_ce(model, b: Batch) -> float:
    """-sum log softmax(logits)[target] over trained positions, one position at a time in float64."""
    with torch.no_grad():
        logits = model(b.inputs, doc_ids=b.doc_ids).double()
    total = 0.0
    for r in range(b.targets.shape[0]):
        for s in range(b.targets.shape[1]):
            t = int(b.targets[r, s])
            if t != IGNORE_INDEX:
                row = logits[r, s]
                total += math.log(torch.exp(row - row.max()).sum().item()) + row.max().item() - row[t].item()
    return total


@pytest.mark.parametrize("loss", [next_token_loss, ChunkedNextTokenLoss(3), next_token_loss_sum],
                         ids=["plain", "chunked", "sft-fused"])
def test_each_loss_is_the_hand_computed_cross_entropy(loss):
    model = build_model(ARGS, seed=0)
    b = _batch(1)
    got = loss(model, TokenBatch(b.inputs, b.targets, b.doc_ids, b.num_targets))
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(_hand_ce(model, b), rel=1e-5)


def _manual_step(model, batches, *, lr, clip, wd=0.1, betas=(0.9, 0.95), eps=1e-8):
    """Token-weighted mean loss, its gradient, global-norm clipping and one AdamW update, by hand."""
    n = sum(b.num_targets for b in batches)
    loss = sum(next_token_loss(model, TokenBatch(b.inputs, b.targets, b.doc_ids, 0)) for b in batches) / n
    params = list(model.parameters())
    grads = torch.autograd.grad(loss, params)
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
    scale = min(1.0, clip / (norm.item() + 1e-6))
    decayed = {id(p) for name, p in model.named_parameters() if p.ndim >= 2 and "tok_embeddings" not in name}
    with torch.no_grad():
        for p, g in zip(params, grads):
            g = g * scale
            m, v = (1 - betas[0]) * g, (1 - betas[1]) * g * g  # first step: bias corrections undo these
            m_hat, v_hat = m / (1 - betas[0]), v / (1 - betas[1])
            if id(p) in decayed:
                p.mul_(1 - lr * wd)
            p.sub_(lr * m_hat / (v_hat.sqrt() + eps))
    return loss.item(), norm.item()


def test_a_core_step_with_accumulation_is_the_hand_written_step():
    ref = build_model(ARGS, seed=0)
    model = copy.deepcopy(ref)
    opt = torch.optim.AdamW(
        [{"params": [p for n, p in model.named_parameters() if p.ndim >= 2 and "tok_embeddings" not in n],
          "weight_decay": 0.1},
         {"params": [p for n, p in model.named_parameters() if p.ndim < 2 or "tok_embeddings" in n],
          "weight_decay": 0.0}], lr=1.0, betas=(0.9, 0.95), eps=1e-8)
    core = TrainCore(model, opt, grad_clip=0.5)
    batches = [_batch(2), _batch(3)]
    out = core.step(batches, lr=1e-2)
    want_loss, want_norm = _manual_step(ref, batches, lr=1e-2, clip=0.5)
    assert out.loss == pytest.approx(want_loss, rel=1e-5)
    assert out.grad_norm == pytest.approx(want_norm, rel=1e-4)
    assert want_norm > 0.5  # the clip was active, so the test covers it
    assert out.num_targets == sum(b.num_targets for b in batches)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)


def test_a_non_finite_loss_raises_and_leaves_the_weights_alone():
    model = build_model(ARGS, seed=0)
    before = copy.deepcopy(model.state_dict())
    core = TrainCore(model, torch.optim.AdamW(model.parameters()), grad_clip=1.0, hint="lower optim.lr")

    def nan_loss(m, b):
        return next_token_loss(m, b) * float("nan")

    core.loss = nan_loss
    with pytest.raises(FloatingPointError, match="lower optim.lr"):
        core.step([_batch(4)], lr=1e-3, step=7)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_a_batch_without_targets_is_a_clear_error():
    model = build_model(ARGS, seed=0)
    core = TrainCore(model, torch.optim.AdamW(model.parameters()), grad_clip=1.0)
    b = _batch(5)
    b.targets[:] = IGNORE_INDEX
    b.num_targets = 0
    with pytest.raises(ValueError, match="no target tokens"):
        core.step([b], lr=1e-3)


def test_trainer_takes_exactly_the_core_step(tmp_path):
    cfg = config_from_dict({
        "job": {"out_dir": str(tmp_path), "device": "cpu"}, "data": {"train": ["unused"]},
        "train": {"loss_chunks": 2}, "metrics": {"tensorboard": False, "plot": False, "progress": False},
        "stages": [{"name": "p", "steps": 3, "ramp": [[0, 36, 9]]}]})
    trainer = Trainer(cfg, log=lambda msg: None)
    model = copy.deepcopy(trainer.model)
    opt = build_optimizer(model, cfg.optim)
    core = TrainCore(model, opt, grad_clip=cfg.optim.grad_clip, loss=ChunkedNextTokenLoss(2))
    for i in range(2):
        micro = [_batch(10 + i), _batch(20 + i)]
        lr = trainer.schedule.lr(trainer.step)
        got = trainer.train_step(micro)
        want = core.step(micro, lr=lr)
        assert got.loss == want.loss and got.grad_norm == want.grad_norm and got.lr == lr
    for (name, p), q in zip(trainer.model.named_parameters(), model.parameters()):
        assert torch.equal(p, q), name


def test_posttrain_fit_takes_exactly_the_core_step():
    cfg = PostOptim(lr=1e-3, steps=3, batch_size=2, warmup_steps=1, weight_decay=0.1)
    a = build_model(ARGS, seed=0)
    b = copy.deepcopy(a)
    batches = [_batch(30 + i) for i in range(cfg.steps)]
    result = fit(a, TokenSteps(batches=lambda step: [batches[step]], loss=next_token_loss_sum), cfg, log=None)

    from herd.train.optim import param_groups

    opt = torch.optim.AdamW(param_groups(b, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas), foreach=True)
    core = TrainCore(b, opt, grad_clip=cfg.grad_clip, loss=next_token_loss_sum)
    schedule = schedule_for(cfg, "train")
    want = [core.step([batches[s]], lr=schedule.lr(s)).loss for s in range(cfg.steps)]
    assert result.losses == want
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


def test_parallel_core_takes_the_chunked_loss_and_refuses_other_token_losses():
    from herd.model.llama import Transformer
    from herd.parallel import ParallelConfig, parallelize

    def parallel_model():
        with torch.device("meta"):
            pm = parallelize(Transformer(ARGS), ParallelConfig(), None)
        pm.load_full_state_dict(build_model(ARGS, seed=0).state_dict(), device="cpu")
        return pm

    pm = parallel_model()
    core = TrainCore(pm.module, torch.optim.AdamW(pm.module.parameters()), grad_clip=0.5,
                     loss=ChunkedNextTokenLoss(3), parallel=pm)
    assert core.loss_chunks == 3
    ref = build_model(ARGS, seed=0)
    batches = [_batch(2), _batch(3)]
    out = core.forward_backward(batches)
    want = sum(next_token_loss(ref, TokenBatch(b.inputs, b.targets, b.doc_ids, 0)) for b in batches)
    want = want / sum(b.num_targets for b in batches)
    want.backward()
    assert out.loss.item() == pytest.approx(want.item(), rel=1e-5)
    for (name, p), q in zip(pm.module.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-7, msg=name)
    pm = parallel_model()
    with pytest.raises(ValueError, match="next_token_loss_sum runs in a single process only"):
        TrainCore(pm.module, torch.optim.AdamW(pm.module.parameters()), grad_clip=0.5, loss=next_token_loss_sum,
                  parallel=pm)



def test_validation_with_loss_chunks_never_builds_the_full_logits(tmp_path, monkeypatch):
    """evaluate() takes the chunked head when training does, and gives the hand-computed loss."""
    cfg = config_from_dict({
        "job": {"out_dir": str(tmp_path), "device": "cpu"}, "data": {"train": ["unused"], "val": ["held-out"]},
        "train": {"loss_chunks": 3},
        "metrics": {"tensorboard": False, "plot": False, "progress": False, "val_batches": 2},
        "stages": [{"name": "p", "steps": 1, "ramp": [[0, 36, 9]]}]})
    batches = [_batch(40), _batch(41)]

    class FixedLoader:
        def __init__(self):
            self.i = 0

        def next_batch(self, **_):
            self.i += 1
            return batches[self.i - 1]

    trainer = Trainer(cfg, log=lambda msg: None, loader_factory=lambda *a, **k: FixedLoader())
    want = sum(_hand_ce(trainer.model, b) for b in batches) / sum(b.num_targets for b in batches)

    def refuse(*args, **kwargs):
        raise AssertionError("validation computed the full logits")

    monkeypatch.setattr(trainer.model, "forward", refuse)
    assert trainer.evaluate() == pytest.approx(want, rel=1e-5)
