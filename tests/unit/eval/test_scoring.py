import pytest
import torch

from herd.eval.scoring import rolling_loglikelihood, rolling_windows, score_continuations
from herd.model import ModelArgs, build_model


@pytest.fixture(scope="module")
def model():
    return build_model(ModelArgs.from_name("debug"), seed=1).eval()


def brute_force(model, context, continuation, max_len):
    full = [*context, *continuation][-(max_len + 1):]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([full[:-1]])), -1)[0]  # (S, V)
    n = len(continuation)
    pos = range(len(full) - 1 - n, len(full) - 1)
    lp = sum(float(logp[p, full[p + 1]]) for p in pos)
    greedy = all(int(logp[p].argmax()) == full[p + 1] for p in pos)
    return lp, greedy


def test_batched_scores_equal_one_forward_per_request(model):
    g = torch.Generator().manual_seed(0)
    reqs = []
    for n_ctx, n_cont in [(1, 1), (5, 3), (17, 1), (2, 9), (30, 4), (8, 8), (3, 2)]:
        ctx = torch.randint(0, 256, (n_ctx,), generator=g).tolist()
        cont = torch.randint(0, 256, (n_cont,), generator=g).tolist()
        reqs.append((ctx, cont))
    scores = score_continuations(model, reqs, batch_size=3)
    for (ctx, cont), s in zip(reqs, scores):
        lp, greedy = brute_force(model, ctx, cont, model.args.max_seq_len)
        assert s.num_tokens == len(cont)
        assert s.logprob == pytest.approx(lp, abs=1e-4)
        assert s.is_greedy == greedy


def test_is_greedy_true_for_the_models_own_argmax(model):
    ctx = [5, 6, 7]
    cont = []
    with torch.no_grad():
        for _ in range(4):  # build the greedy continuation token by token
            cont.append(int(model(torch.tensor([ctx + cont]))[0, -1].argmax()))
    [s] = score_continuations(model, [(ctx, cont)])
    assert s.is_greedy
    [s2] = score_continuations(model, [(ctx, cont[:-1] + [(cont[-1] + 1) % 256])])
    assert not s2.is_greedy


def test_long_requests_are_cut_from_the_left(model):
    ctx, cont = list(range(1, 40)), [3, 4, 5]
    [s] = score_continuations(model, [(ctx, cont)], max_len=10)
    lp, _ = brute_force(model, ctx, cont, 10)
    assert s.logprob == pytest.approx(lp, abs=1e-4)
    [full] = score_continuations(model, [(ctx, cont)])
    assert full.logprob != pytest.approx(s.logprob, abs=1e-4)  # the cut context really changed the score


def test_bad_requests_are_errors(model):
    with pytest.raises(ValueError, match="empty context"):
        score_continuations(model, [([], [1])])
    with pytest.raises(ValueError, match="empty continuation"):
        score_continuations(model, [([1], [])])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        score_continuations(model, [([1], [999])])


def test_rolling_windows_follow_lm_evals_convention():
    # The example in lm-eval's LM.loglikelihood_rolling docstring: max length 4, tokens 0..9.
    w = rolling_windows(list(range(10)), prefix_token=-1, max_len=4)
    inputs = [(ctx + cont)[:-1] for ctx, cont in w]
    assert inputs == [[-1, 0, 1, 2], [3, 4, 5, 6], [5, 6, 7, 8]]
    assert [cont for _, cont in w] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_rolling_loglikelihood_in_one_window_is_the_full_sum(model):
    doc = [10, 20, 30, 40, 50, 60]
    [total] = rolling_loglikelihood(model, [doc], prefix_token=255)
    lp, _ = brute_force(model, [255], doc, model.args.max_seq_len)
    assert total == pytest.approx(lp, abs=1e-4)
    [windowed] = rolling_loglikelihood(model, [doc], prefix_token=255, max_len=2)
    expected = sum(brute_force(model, c, t, 2)[0] for c, t in rolling_windows(doc, prefix_token=255, max_len=2))
    assert windowed == pytest.approx(expected, abs=1e-4)
