"""Speculative sampling draws from the target's own distribution (Leviathan et al.'s rejection rule).

The statistical tests compare the empirical distribution of whole continuations against the
exact distribution of the target's sampler, enumerated over every continuation of a small
vocabulary. Their threshold is distribution-free and fixed in advance:

* E ||p_hat - p||_1 <= sum_i sqrt(p_i (1 - p_i) / N)   (Jensen, per cell), and
* ||p_hat - p||_1 moves by at most 2/N when one of the N samples changes, so by McDiarmid
  P(||p_hat - p||_1 >= E + eps) <= exp(-N eps^2 / 2).

With eps chosen for probability 1e-7 a correct implementation fails less than once in ten
million runs (and the seed is fixed besides). The negative control runs the same test on a
deliberately wrong rule (accept every draft) and checks it fails by a margin of the same size.
"""

import itertools
import math

import pytest
import torch

import herd.generate.speculative as spec
from herd.generate import GREEDY, SamplingParams, generate, truncated_probs
from herd.generate.speculative import accept_drafts, speculative_generate
from herd.model import ModelArgs, build_model

V = 5  # vocabulary: 5^3 = 125 continuations of three tokens, each enumerable
PROMPT = [1, 4, 2]
N = 6000  # samples (batch rows) per statistical test
FAIL_PROB = 1e-7


def _tiny(seed: int, *, scale: float = 2.0) -> torch.nn.Module:
    """A 1-layer model over V tokens whose next-token distribution depends on the context and is
    neither flat nor one-hot (scale sharpens the head)."""
    args = ModelArgs.from_name("debug").replace(vocab_size=V, n_layers=1, dim=32, n_heads=2, n_kv_heads=1,
                                                max_seq_len=16)
    m = build_model(args, seed=seed)
    with torch.no_grad():
        m.tok_embeddings.weight.mul_(0.3)
        for layer in m.layers.values():
            for w in (layer.attention.wq, layer.attention.wk, layer.attention.wo, layer.feed_forward.w2):
                w.weight.mul_(4.0)
        m.output.weight.mul_(scale)
    return m.eval()


@pytest.fixture(scope="module")
def target():
    return _tiny(1)


@pytest.fixture(scope="module")
def drafts(target):
    """An unrelated random draft (low acceptance) and the target with a perturbed head (higher)."""
    near = _tiny(1)
    with torch.no_grad():
        near.output.weight.add_(torch.randn(near.output.weight.shape, generator=torch.Generator().manual_seed(7)))
    return {"unrelated": _tiny(2), "perturbed": near}


def _exact(model, params: SamplingParams, steps: int = 3) -> torch.Tensor:
    """P(x1..x_steps | PROMPT) under `model`'s sampler, over all V**steps continuations (flattened,
    x1 most significant), from full forwards without a cache: an independent reference."""
    conts = list(itertools.product(range(V), repeat=steps - 1))
    with torch.no_grad():
        logits = model(torch.tensor([PROMPT + list(c) for c in conts]))  # (C, L + steps - 1, V)
    L = len(PROMPT)
    probs = truncated_probs(logits.flatten(0, 1), params).view(len(conts), L + steps - 1, V).double()
    out = torch.zeros((V,) * steps, dtype=torch.float64)
    for r, c in enumerate(conts):
        prefix = 1.0
        for j, x in enumerate(c):
            prefix = prefix * probs[r, L - 1 + j, x]
        out[c] = prefix * probs[r, L - 1 + len(c)]
    return out.flatten()


def _empirical(tokens: list[list[int]], steps: int = 3) -> torch.Tensor:
    counts = torch.zeros(V**steps, dtype=torch.float64)
    for t in tokens:
        assert len(t) == steps
        counts[sum(x * V ** (steps - 1 - j) for j, x in enumerate(t))] += 1
    return counts / len(tokens)


def _threshold(p: torch.Tensor, n: int) -> float:
    expected = float((p * (1 - p) / n).sqrt().sum())
    return expected + math.sqrt(2 * math.log(1 / FAIL_PROB) / n)


PARAMS = {
    "plain": SamplingParams(temperature=1.0, top_p=1.0, seed=11),
    "truncated": SamplingParams(temperature=0.8, top_k=4, top_p=0.9, min_p=0.05, seed=12),
}


def _run(target, draft, params, num_draft):
    out = speculative_generate(target, draft, [PROMPT] * N, max_new_tokens=3, num_draft=num_draft, sampling=params)
    assert all(r.finish_reason == "length" for r in out)
    return out


@pytest.mark.parametrize("which,params,num_draft", [
    ("unrelated", "plain", 2), ("perturbed", "plain", 1), ("perturbed", "truncated", 2)])
def test_speculative_samples_follow_the_target_distribution(target, drafts, which, params, num_draft):
    params = PARAMS[params]
    p = _exact(target, params)
    out = _run(target, drafts[which], params, num_draft)
    accepted, drafted = sum(r.accepted for r in out), sum(r.drafted for r in out)
    assert 0 < accepted < drafted  # both branches of the rule ran: acceptances and residual draws
    distance = float((_empirical([r.tokens for r in out]) - p).abs().sum())
    assert distance < _threshold(p, N), (distance, _threshold(p, N))


def test_negative_control_a_wrong_rule_is_detected(target, drafts, monkeypatch):
    """Accepting every draft token makes tokens 2 and 3 the draft's: the same test must fail, and
    by a margin that makes this check as reliable as the positive one."""
    params, draft = PARAMS["plain"], drafts["unrelated"]
    p = _exact(target, params)
    # The wrong rule's own distribution: x1 from the target, x2 and x3 from the draft.
    q = _exact(draft, params).view(V, V * V)
    wrong = p.view(V, V * V).sum(-1, keepdim=True) * q / q.sum(-1, keepdim=True)
    eps = math.sqrt(2 * math.log(1 / FAIL_PROB) / N)
    assert float((wrong.flatten() - p).abs().sum()) > _threshold(p, N) + eps  # the test has the power

    def accept_all(p, q, drafts, generator=None):
        k = drafts.shape[1]
        nxt = torch.multinomial(p[:, k], 1, generator=generator).squeeze(-1)
        return torch.full_like(nxt, k), nxt

    monkeypatch.setattr(spec, "accept_drafts", accept_all)
    out = _run(target, draft, params, 2)
    distance = float((_empirical([r.tokens for r in out]) - p).abs().sum())
    assert distance > _threshold(p, N), (distance, _threshold(p, N))


def test_seeded_runs_repeat_and_greedy_is_unchanged(target, drafts):
    params = PARAMS["plain"]
    prompts = [PROMPT, [3, 0], [2, 2, 2, 1, 0]]
    a = speculative_generate(target, drafts["perturbed"], prompts, max_new_tokens=8, num_draft=3, sampling=params)
    b = speculative_generate(target, drafts["perturbed"], prompts, max_new_tokens=8, num_draft=3, sampling=params)
    assert [r.tokens for r in a] == [r.tokens for r in b]
    want = generate(target, prompts, max_new_tokens=8, sampling=GREEDY)
    got = speculative_generate(target, drafts["perturbed"], prompts, max_new_tokens=8, num_draft=3)
    assert [r.tokens for r in got] == [r.tokens for r in want]


# ---- the rejection step on hand-made distributions ------------------------------------------


def _rows(dist: list[list[float]], n: int) -> torch.Tensor:
    return torch.tensor(dist, dtype=torch.float32).unsqueeze(0).expand(n, -1, -1)


def test_rejection_step_on_hand_made_distributions():
    n = 20000
    p = _rows([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]], n)  # (n, k+1=2, 3): position 0, then the bonus position
    q = _rows([[0.2, 0.3, 0.5]], n)  # (n, k=1, 3)
    g = torch.Generator().manual_seed(0)
    drafts = torch.multinomial(q[:, 0], 1, generator=g)  # (n, 1) x ~ q
    accepted, nxt = accept_drafts(p, q, drafts, g)
    x, acc = drafts[:, 0], accepted.bool()
    # p >= q at tokens 0 and 1: always accepted. At token 2 the ratio is 0.2 / 0.5 = 0.4.
    assert bool(acc[x != 2].all())
    frac = acc[x == 2].double().mean().item()
    m = int((x == 2).sum())
    assert abs(frac - 0.4) < math.sqrt(math.log(2 / FAIL_PROB) / (2 * m))  # Hoeffding
    # The residual max(0, p - q) = [0.3, 0, 0]: every rejection is corrected to token 0.
    assert bool((nxt[~acc] == 0).all())
    # The first committed token is x when accepted, else the correction: distributed as p exactly.
    first = torch.where(acc, x, nxt)
    p_hat = torch.bincount(first, minlength=3).double() / n
    target = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    assert float((p_hat - target).abs().sum()) < _threshold(target, n)
    # After an acceptance the bonus token comes from the last position's p.
    bonus = torch.bincount(nxt[acc], minlength=3).double() / int(acc.sum())
    want = torch.tensor([0.1, 0.1, 0.8], dtype=torch.float64)
    assert float((bonus - want).abs().sum()) < _threshold(want, int(acc.sum()))


def test_rejection_step_edge_cases():
    g = torch.Generator().manual_seed(1)
    # p == q: nothing is ever rejected (u < 1), all k drafts kept and the bonus drawn.
    p = _rows([[0.25, 0.25, 0.5]] * 4, 1000)
    accepted, _ = accept_drafts(p, p[:, :3], torch.full((1000, 3), 2), g)
    assert bool((accepted == 3).all())
    # p gives the draft token no mass: always rejected at that position, never corrected to it.
    p = _rows([[0.0, 0.6, 0.4], [1.0, 0.0, 0.0]], 1000)
    q = _rows([[0.5, 0.25, 0.25]], 1000)
    accepted, nxt = accept_drafts(p, q, torch.zeros((1000, 1), dtype=torch.long), g)
    assert bool((accepted == 0).all()) and bool((nxt != 0).all())
    # The residual is [0, 0.35, 0.15] / 0.5: token 1 with probability 0.7.
    assert abs((nxt == 1).double().mean().item() - 0.7) < math.sqrt(math.log(2 / FAIL_PROB) / 2000)
    # A later rejection keeps the accepted run before it.
    p = _rows([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0]], 10)
    q = _rows([[0.0, 1.0], [1.0, 0.0]], 10)
    accepted, nxt = accept_drafts(p, q, torch.tensor([[1, 0]] * 10), g)
    assert accepted.tolist() == [1] * 10 and nxt.tolist() == [1] * 10
