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


def _teacher_topk(teacher_logits, k, T):
    """The teacher's top-k ids and their full-vocabulary log-probabilities at T (what the cache holds)."""
    top = F.log_softmax(teacher_logits / T, dim=-1).topk(k, dim=-1)
    return top.values, top.indices


@pytest.mark.parametrize("T", [0.5, 1.0, 2.0, 4.0])
def test_topk_kd_with_full_support_equals_full_kd(T):
    torch.manual_seed(0)
    s, te = torch.randn(2, 5, 11) * 3, torch.randn(2, 5, 11) * 3
    tgt = torch.randint(0, 11, (2, 5))
    tgt[0, 2] = -100
    full = kd_loss(s, te, tgt, temperature=T, alpha=0.7)
    k = kd_loss_topk(s, *_teacher_topk(te, 11, T), tgt, temperature=T, alpha=0.7)
    assert k.kl.item() == pytest.approx(full.kl.item(), abs=1e-5)
    assert k.loss.item() == pytest.approx(full.loss.item(), abs=1e-5)


@pytest.mark.parametrize("k", [1, 3, 10])
def test_topk_kl_is_zero_when_the_student_is_the_teacher(k):
    torch.manual_seed(1)
    te = torch.randn(3, 4, 11) * 2
    out = kd_loss_topk(te.clone(), *_teacher_topk(te, k, 2.0), torch.zeros(3, 4, dtype=torch.long),
                       temperature=2.0, alpha=1.0)
    assert out.kl.item() == pytest.approx(0.0, abs=1e-6)


def test_topk_kl_is_a_lower_bound_of_the_full_kl():
    torch.manual_seed(2)
    for T in (1.0, 2.0):
        for k in (1, 2, 5, 16, 31):
            s, te = torch.randn(4, 6, 32) * 2, torch.randn(4, 6, 32) * 2
            tgt = torch.zeros(4, 6, dtype=torch.long)
            full = kd_loss(s, te, tgt, temperature=T, alpha=1.0).kl.item()
            topk = kd_loss_topk(s, *_teacher_topk(te, k, T), tgt, temperature=T, alpha=1.0).kl.item()
            assert 0 <= topk <= full + 1e-6


def test_topk_kd_by_hand():
    # V = 4, k = 2, T = 2: the partition is {id 0, id 1, ids 2 and 3}.
    student, teacher, T = [0.0, 1.0, 0.5, 0.0], [2.0, 1.0, 0.0, -1.0], 2.0

    def softmax(x):
        e = [math.exp(v / T) for v in x]
        return [v / sum(e) for v in e]

    p, q = softmax(teacher), softmax(student)
    p3, q3 = [p[0], p[1], p[2] + p[3]], [q[0], q[1], q[2] + q[3]]
    kl = sum(a * math.log(a / b) for a, b in zip(p3, q3)) * T**2
    ce = -math.log(softmax([2 * v for v in student])[1])  # CE at T = 1 with target id 1
    out = kd_loss_topk(torch.tensor([student]), *_teacher_topk(torch.tensor([teacher]), 2, T), torch.tensor([1]),
                       temperature=T, alpha=0.25)
    assert out.kl.item() == pytest.approx(kl, abs=1e-6)
    assert out.loss.item() == pytest.approx(0.25 * kl + 0.75 * ce, abs=1e-6)


def test_topk_kd_gradient_is_finite_and_checks_shapes():
    s = torch.randn(2, 7, requires_grad=True)
    kd_loss_topk(s, *_teacher_topk(torch.randn(2, 7), 3, 1.0), torch.tensor([0, 1]), alpha=1.0).loss.backward()
    assert torch.isfinite(s.grad).all()
    with pytest.raises(ValueError, match="vocabulary"):
        kd_loss_topk(s, torch.zeros(2, 8), torch.zeros(2, 8, dtype=torch.long), torch.tensor([0, 1]))


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
