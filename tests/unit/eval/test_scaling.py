"""The scaling-law fits recover known constants from synthetic sweeps with noise."""

import math

import numpy as np
import pytest
import torch

from herd.eval.scaling import (
    SweepPoint,
    SweepRun,
    fit_isoflop_minimum,
    fit_loss_floor,
    fit_power_law,
    fit_scaling,
    fit_sigmoid,
    load_points,
    model_ladder,
    plan_isoflop_sweep,
    plot_isoflops,
    plot_two_step,
    run_sweep,
    save_points,
    scaling_params,
)
from herd.model import Transformer

A, ALPHA = 0.29, 0.53  # the paper's N*(C) = A C^alpha
E, B, BETA = 1.8, 30.0, 0.12
BUDGETS = np.geomspace(1e15, 1e19, 6)


def synthetic_sweep(seed: int, *, noise: float = 0.003) -> list[SweepPoint]:
    """IsoFLOP curves that are parabolas in ln N around N*(C) = A C^alpha, at L*(C) = E + B C^-beta;
    task NLL linear in ln C at the optimum, accuracy a sigmoid of it with chance 0.25."""
    rng = np.random.default_rng(seed)
    points = []
    for c in BUDGETS:
        n_opt, l_opt = A * c**ALPHA, E + B * c**-BETA
        for r in np.linspace(-1.2, 1.2, 7):
            n = n_opt * math.exp(r + rng.normal(0, 0.05))
            dx = math.log(n / n_opt)
            nll = 2.0 - 0.05 * math.log(c) + 0.1 * dx * dx + rng.normal(0, 0.003)
            acc = 0.25 + 0.7 / (1 + math.exp(8 * (nll - 0.2))) + rng.normal(0, 0.005)
            points.append(SweepPoint(name=f"{c:.2e}-{r:+.1f}", budget=float(c), n_params=int(n),
                                     loss=l_opt + 0.08 * dx * dx + rng.normal(0, noise), task_nll=nll, task_acc=acc))
    return points


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fit_recovers_known_constants_from_noisy_sweeps(seed):
    fit = fit_scaling(synthetic_sweep(seed), chance=0.25)
    for m in fit.minima:
        assert m.n_opt == pytest.approx(A * m.budget**ALPHA, rel=0.08)
        assert m.loss_opt == pytest.approx(E + B * m.budget**-BETA, abs=0.005)
    assert fit.n_opt.alpha == pytest.approx(ALPHA, abs=0.01)
    assert fit.n_opt.A == pytest.approx(A, rel=0.3)
    assert fit.loss_floor.E == pytest.approx(E, abs=0.1)
    assert fit.loss_floor.beta == pytest.approx(BETA, abs=0.03)
    assert fit.nll_vs_compute.slope == pytest.approx(-0.05, abs=0.003)
    s = fit.acc_vs_nll
    assert (s.lo, s.hi, s.x0, s.k) == (0.25, pytest.approx(0.95, abs=0.03), pytest.approx(0.2, abs=0.03),
                                       pytest.approx(8, rel=0.25))
    # A held-out budget 10x beyond the sweep.
    pred = fit.predict(1e20)
    assert pred.n_opt == pytest.approx(A * 1e20**ALPHA, rel=0.15)
    assert pred.loss == pytest.approx(E + B * 1e20**-BETA, abs=0.01)
    assert pred.tokens == pytest.approx(1e20 / (6 * pred.n_opt))
    true_nll = 2.0 - 0.05 * math.log(1e20)
    assert pred.task_acc == pytest.approx(0.25 + 0.7 / (1 + math.exp(8 * (true_nll - 0.2))), abs=0.03)


def test_single_fits_recover_exact_parameters():
    n = np.geomspace(1e6, 1e8, 5)
    m = fit_isoflop_minimum(1e17, n, 3.0 + 0.1 * (np.log(n) - math.log(1e7)) ** 2)
    assert m.n_opt == pytest.approx(1e7, rel=1e-6) and m.loss_opt == pytest.approx(3.0, abs=1e-9)
    pl = fit_power_law([1e16, 1e18, 1e20], [0.29 * c**0.53 for c in (1e16, 1e18, 1e20)])
    assert (pl.A, pl.alpha) == (pytest.approx(0.29, rel=1e-6), pytest.approx(0.53, abs=1e-9))
    floor = fit_loss_floor(BUDGETS, E + B * BUDGETS**-BETA)
    assert (floor.E, floor.B, floor.beta) == (pytest.approx(E, abs=1e-3), pytest.approx(B, rel=1e-2),
                                               pytest.approx(BETA, abs=1e-3))
    x = np.linspace(-1, 2, 12)
    s = fit_sigmoid(x, 0.1 + 0.8 / (1 + np.exp(3 * (x - 0.5))))
    assert (s.lo, s.hi, s.x0, s.k) == (pytest.approx(0.1, abs=1e-3), pytest.approx(0.9, abs=1e-3),
                                       pytest.approx(0.5, abs=1e-3), pytest.approx(3, abs=1e-2))


def test_a_sweep_that_does_not_bracket_the_optimum_is_an_error():
    n = np.geomspace(1e6, 1e8, 5)
    with pytest.raises(ValueError, match="does not bracket"):
        fit_isoflop_minimum(1e17, n, 3.0 - 0.1 * np.log(n) ** 2)
    with pytest.raises(ValueError, match="2 or more compute budgets"):
        fit_scaling([p for p in synthetic_sweep(0) if p.budget == BUDGETS[0]])


def test_plan_follows_the_size_rule_and_c_equals_6nd():
    ladder = model_ladder(vocab_size=2048, max_seq_len=128)
    assert [a.dim for a in ladder[:4]] == [32, 64, 96, 128] and all(a.head_dim == 16 for a in ladder)
    a = ladder[3]
    with torch.device("meta"):
        model = Transformer(a)
    # N counts every parameter but the embedding lookup: blocks, final norm and the output head.
    assert scaling_params(a) == sum(p.numel() for n, p in model.named_parameters() if not n.startswith("tok_embeddings"))
    plan = plan_isoflop_sweep([1e13, 1e14], ladder, points_per_budget=5)
    assert len(plan) == 10 and len({r.name for r in plan}) == 10
    for r in plan:
        assert r.tokens == int(r.budget / (6 * r.n_params))
    for budget in (1e13, 1e14):
        sizes = sorted(r.n_params for r in plan if r.budget == budget)
        prior = math.sqrt(budget / 120)
        assert sizes[0] < prior < sizes[-1]  # the window brackets the 20-tokens-per-parameter prior
    assert max(r.n_params for r in plan if r.budget == 1e14) > max(r.n_params for r in plan if r.budget == 1e13)


def test_sweep_runner_resumes_and_saves_after_each_run(tmp_path):
    ladder = model_ladder(vocab_size=256, max_seq_len=64, depths=range(1, 6))
    plan = plan_isoflop_sweep([1e12, 1e13], ladder, points_per_budget=3)
    calls = []

    def fake_train(run: SweepRun, *, out_dir):
        calls.append(run.name)
        if len(calls) == 4:
            raise KeyboardInterrupt  # the sweep is interrupted during its 4th run
        return SweepPoint(name=run.name, budget=run.budget, n_params=run.n_params, tokens=run.tokens,
                          loss=3.0 + 0.1 * math.log(run.n_params / math.sqrt(run.budget)) ** 2)

    with pytest.raises(KeyboardInterrupt):
        run_sweep(plan, fake_train, out_dir=tmp_path)
    assert [p.name for p in load_points(tmp_path / "points.jsonl")] == [r.name for r in plan[:3]]
    calls.clear()
    points = run_sweep(plan, lambda run, out_dir: SweepPoint(run.name, run.budget, run.n_params, 3.0),
                       out_dir=tmp_path)
    assert len(calls) == 0 and [p.name for p in points] == [r.name for r in plan]


def test_points_file_round_trip_and_errors(tmp_path):
    pts = synthetic_sweep(0)[:3]
    save_points(pts, tmp_path / "p.jsonl")
    assert load_points(tmp_path / "p.jsonl") == pts
    (tmp_path / "bad.jsonl").write_text('{"name": "a", "budget": 1, "n_params": 2, "loss": 3}\n{"name": "b"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: missing field"):
        load_points(tmp_path / "bad.jsonl")


def test_plots_are_written(tmp_path):
    fit = fit_scaling(synthetic_sweep(0), chance=0.25)
    pred = fit.predict(1e20)
    for path in (plot_isoflops(fit, tmp_path / "iso.png", predict=pred), plot_two_step(fit, tmp_path / "two.png",
                                                                                      predict=pred)):
        assert path.read_bytes()[:4] == b"\x89PNG"
