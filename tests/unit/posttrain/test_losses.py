"""DPO, reward and distillation losses against values computed by hand, and the fused SFT loss."""

import math

import pytest
import torch
import torch.nn.functional as F

from herd.posttrain.distill import kd_loss, kd_loss_topk
from herd.posttrain.dpo import dpo_loss
from herd.posttrain.reward import bradley_terry_loss, ranking_loss
from herd.posttrain.sft import linear_cross_entropy


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_dpo_loss_by_hand():
    # Pair 0: policy gains 1 on chosen and loses 1 on rejected vs the reference: margin 0.1 * 2 = 0.2.
    # Pair 1: the policy prefers rejected: margin 0.1 * ((-5 + 4) - (-2 + 3)) = -0.2.
    out = dpo_loss(torch.tensor([-1.0, -5.0]), torch.tensor([-3.0, -2.0]), torch.tensor([-2.0, -4.0]),
                   torch.tensor([-2.0, -3.0]), beta=0.1, chosen_nll=torch.tensor([1.5, 0.5]), nll_coef=0.2)
    dpo = (softplus(-0.2) + softplus(0.2)) / 2
    assert out.dpo.item() == pytest.approx(dpo, abs=1e-6)
    assert out.nll.item() == pytest.approx(1.0)
    assert out.loss.item() == pytest.approx(dpo + 0.2 * 1.0, abs=1e-6)
    assert out.chosen_rewards.tolist() == pytest.approx([0.1, -0.1])
    assert out.rejected_rewards.tolist() == pytest.approx([-0.1, 0.1])
    assert out.accuracy == 0.5


def test_dpo_beta_scales_the_margin_and_gradients_skip_the_reference():
    pc = torch.tensor([-1.0], requires_grad=True)
    rc = torch.tensor([-2.0], requires_grad=True)
    out = dpo_loss(pc, torch.tensor([-3.0]), rc, torch.tensor([-2.0]), beta=0.5)
    assert out.loss.item() == pytest.approx(softplus(-1.0), abs=1e-6)  # 0.5 * 2 = 1
    out.loss.backward()
    assert rc.grad is None and pc.grad.item() == pytest.approx(-0.5 * (1 - 1 / (1 + math.exp(-1.0))), abs=1e-6)
    with pytest.raises(ValueError):
        dpo_loss(pc, pc, pc, pc, beta=0.0)


def test_bradley_terry_and_ranking_by_hand():
    assert bradley_terry_loss(torch.tensor([2.0]), torch.tensor([0.5])).item() == pytest.approx(softplus(-1.5))
    # edited 3 > chosen 1 > rejected 0: pairs (3,1), (3,0), (1,0).
    loss = ranking_loss([torch.tensor([3.0]), torch.tensor([1.0]), torch.tensor([0.0])])
    assert loss.item() == pytest.approx((softplus(-2.0) + softplus(-3.0) + softplus(-1.0)) / 3, abs=1e-6)
    with pytest.raises(ValueError):
        ranking_loss([torch.tensor([1.0])])


def test_kd_loss_by_hand():
    student = torch.tensor([[0.0, 1.0]])
    teacher = torch.tensor([[2.0, 0.0]])
    targets = torch.tensor([1])
    T = 2.0
    p = [math.exp(1.0) / (math.exp(1.0) + 1), 1 / (math.exp(1.0) + 1)]  # softmax([1, 0])
    q = [1 / (1 + math.exp(0.5)), math.exp(0.5) / (1 + math.exp(0.5))]  # softmax([0, 0.5])
    kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q)) * T**2
    ce = -math.log(math.exp(1.0) / (1 + math.exp(1.0)))
    out = kd_loss(student, teacher, targets, temperature=T, alpha=0.25)
    assert out.kl.item() == pytest.approx(kl, abs=1e-6)
    assert out.ce.item() == pytest.approx(ce, abs=1e-6)
    assert out.loss.item() == pytest.approx(0.25 * kl + 0.75 * ce, abs=1e-6)


def test_kd_ignores_masked_positions_and_is_zero_for_identical_logits():
    s = torch.randn(2, 3, 7)
    t = torch.tensor([[1, -100, 2], [-100, -100, 3]])
    out = kd_loss(s, s.clone(), t, temperature=3.0, alpha=1.0)
    assert out.kl.item() == pytest.approx(0.0, abs=1e-6)
    other = torch.randn(2, 3, 7)
    changed = other.clone()
    changed[0, 1] += 100  # a masked position: must not matter
    a = kd_loss(s, other, t, temperature=2.0).loss
    b = kd_loss(s, changed, t, temperature=2.0).loss
    assert a.item() == pytest.approx(b.item(), abs=1e-6)


def test_topk_kd_with_full_support_equals_full_kd():
    s, te = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    tgt = torch.randint(0, 11, (2, 5))
    top = te.topk(11, dim=-1)
    full = kd_loss(s, te, tgt, temperature=1.5, alpha=0.7)
    k = kd_loss_topk(s, top.values, top.indices, tgt, temperature=1.5, alpha=0.7)
    assert k.loss.item() == pytest.approx(full.loss.item(), abs=1e-5)


def test_fused_linear_cross_entropy_matches_the_plain_path():
    h = torch.randn(37, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    t = torch.randint(0, 50, (37,))
    t[::5] = -100
    fused = linear_cross_entropy(h, w, t, chunk=8)
    (fused * 0.5).backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    plain = F.cross_entropy(h @ w.T, t, reduction="sum")
    (plain * 0.5).backward()
    assert fused.item() == pytest.approx(plain.item(), rel=1e-6)
    torch.testing.assert_close(gh, h.grad)
    torch.testing.assert_close(gw, w.grad)
    with torch.no_grad():
        assert linear_cross_entropy(h, w, t).item() == pytest.approx(plain.item(), rel=1e-6)
