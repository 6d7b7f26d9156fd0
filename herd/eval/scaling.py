"""Scaling laws as in the Llama 3 paper (section 3.2.1): IsoFLOP sweeps, compute-optimal size, and
the two-step prediction of downstream accuracy.

1. Plan: for each compute budget C, a handful of model shapes from one size rule (width grows
   with depth), each trained on D = C / (6 N) tokens.
2. Per budget, fit a parabola to loss against ln N; its vertex is the compute-optimal size
   N*(C) and loss L*(C).
3. Fit N*(C) = A C^alpha (a line in log-log) and the loss floor L*(C) = E + B C^-beta.
4. Two-step downstream prediction: the compute-optimal models' normalised NLL of the correct
   answer is linear in ln C; accuracy is a sigmoid of that NLL. Chained, they predict the
   accuracy of a larger, held-out budget.

N counts the parameters that do matmuls: everything but the token embedding (whose lookup
costs nothing) and the norms, with the output head included even when tied. That is the N of
`ModelArgs.flops_per_token` (6 N per token, attention aside), so C = 6 N D is the compute the
trainer actually spends up to the attention term. The paper reports the same law with its own
N; at tiny scale the choice matters (the head is a large share of small models), so fitted
constants are comparable only between sweeps that count N the same way.

Design trade-off: the fits are closed form where the model is linear in its parameters
(parabola, power law, linear NLL) and nonlinear least squares (scipy) only where it is not
(loss floor, sigmoid), each started from a closed-form guess so it does not depend on luck. The
sweep itself is behind `TrainFn`: this module runs a planned sweep and plots its fits, and whatever
trains a model (the herd trainer, or a test double) is passed in. Planning, the points file and the
fits live in `herd.eval.scaling_fits` (no trainer, no matplotlib) and are re-exported here.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from herd.eval.results import atomic_write_text, save_figure
from herd.eval.scaling_fits import (  # re-exported: `herd.eval.scaling` stays the one import path
    scaling_params,
    shape_for_depth,
    model_ladder,
    SweepRun,
    plan_isoflop_sweep,
    SweepPoint,
    load_points,
    save_points,
    IsoFLOPMinimum,
    fit_isoflop_minimum,
    PowerLaw,
    fit_power_law,
    LossFloor,
    fit_loss_floor,
    LinearInLogCompute,
    fit_nll_vs_compute,
    Sigmoid,
    fit_sigmoid,
    Prediction,
    ScalingFit,
    fit_scaling,
)
from herd.model.args import ModelArgs

__all__ = [
    "scaling_params",
    "shape_for_depth",
    "model_ladder",
    "SweepRun",
    "plan_isoflop_sweep",
    "SweepPoint",
    "load_points",
    "save_points",
    "IsoFLOPMinimum",
    "fit_isoflop_minimum",
    "PowerLaw",
    "fit_power_law",
    "LossFloor",
    "fit_loss_floor",
    "LinearInLogCompute",
    "fit_nll_vs_compute",
    "Sigmoid",
    "fit_sigmoid",
    "Prediction",
    "ScalingFit",
    "fit_scaling",
    "plot_isoflops", "plot_two_step", "TrainFn", "run_sweep", "SweepTraining", "trainer_train_fn",
    "HeldOutCheck", "check_held_out", "SweepOutcome", "run_scaling_sweep",
]


# ---- plots ----------------------------------------------------------------------------------------


def plot_isoflops(fit: ScalingFit, path: str | os.PathLike[str], *, predict: Prediction | None = None,
                  actual: SweepPoint | None = None) -> Path:
    """Three panels: loss against N per budget with the parabolas; N*(C) with its power law; L*(C) with its floor."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 4.5))
    ax1, ax2, ax3 = fig.subplots(1, 3)
    colours = [f"C{i % 10}" for i in range(len(fit.minima))]
    for m, col in zip(fit.minima, colours):
        pts = [p for p in fit.points if p.budget == m.budget]
        ns = np.array([p.n_params for p in pts], float)
        ax1.scatter(ns, [p.loss for p in pts], color=col, s=18, label=f"{m.budget:.2g} FLOPs")
        grid = np.geomspace(ns.min() / 1.3, ns.max() * 1.3, 100)
        ax1.plot(grid, m.loss_at(grid), color=col, lw=1)
        ax1.scatter([m.n_opt], [m.loss_opt], color=col, marker="*", s=120, edgecolor="k", zorder=3)
    ax1.set(xscale="log", xlabel="parameters N", ylabel="validation loss", title="IsoFLOP curves")
    ax1.legend(fontsize=7)

    budgets = np.array([m.budget for m in fit.minima])
    hi = max(budgets.max(), predict.budget if predict else 0)
    grid_c = np.geomspace(budgets.min() / 2, hi * 2, 100)
    ax2.scatter(budgets, [m.n_opt for m in fit.minima], color="k", zorder=3, label="IsoFLOP minima")
    ax2.plot(grid_c, fit.n_opt(grid_c), "k--", lw=1, label=f"N* = {fit.n_opt.A:.3g} C^{fit.n_opt.alpha:.3f}")
    ax2.set(xscale="log", yscale="log", xlabel="compute C (FLOPs)", ylabel="compute-optimal N*", title="N*(C)")

    ax3.scatter(budgets, [m.loss_opt for m in fit.minima], color="k", zorder=3, label="L* per budget")
    if fit.loss_floor:
        f = fit.loss_floor
        ax3.plot(grid_c, f(grid_c), "k--", lw=1, label=f"{f.E:.3f} + {f.B:.3g} C^-{f.beta:.3f}")
        ax3.axhline(f.E, color="grey", lw=0.8, ls=":")
    if predict is not None:
        ax2.scatter([predict.budget], [predict.n_opt], marker="*", s=160, color="C3", zorder=4, label="prediction")
        if predict.loss is not None:
            ax3.scatter([predict.budget], [predict.loss], marker="*", s=160, color="C3", zorder=4, label="prediction")
    if actual is not None:
        ax2.scatter([actual.budget], [actual.n_params], marker="x", s=80, color="C2", zorder=5, label="trained")
        ax3.scatter([actual.budget], [actual.loss], marker="x", s=80, color="C2", zorder=5, label="measured")
    ax2.legend(fontsize=7)
    ax3.set(xscale="log", xlabel="compute C (FLOPs)", ylabel="compute-optimal loss L*", title="loss floor")
    from matplotlib.ticker import NullFormatter

    for ax in (ax2, ax3):  # budgets within a decade or two: minor-tick labels would overprint each other
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax3.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_two_step(fit: ScalingFit, path: str | os.PathLike[str], *, predict: Prediction | None = None) -> Path:
    """The two-step method: task NLL against compute (line in ln C), accuracy against NLL (sigmoid)."""
    from matplotlib.figure import Figure

    if fit.nll_vs_compute is None or fit.acc_vs_nll is None:
        raise ValueError("the sweep results carry no task_nll / task_acc, so there is no two-step fit to plot")
    fig = Figure(figsize=(10, 4.2))
    ax1, ax2 = fig.subplots(1, 2)
    pts = [p for p in fit.points if p.task_nll is not None]
    ax1.scatter([p.budget for p in pts], [p.task_nll for p in pts], s=12, color="grey", label="all runs")
    budgets = np.array([m.budget for m in fit.minima])
    hi = max(budgets.max(), predict.budget if predict else 0)
    grid_c = np.geomspace(budgets.min() / 2, hi * 2, 100)
    ax1.plot(grid_c, fit.nll_vs_compute(grid_c), "k--", lw=1, label="compute-optimal fit")
    ax1.set(xscale="log", xlabel="compute C (FLOPs)", ylabel="normalised NLL of the answer", title="step 1")
    both = [p for p in pts if p.task_acc is not None]
    xs = np.array([p.task_nll for p in both])
    ax2.scatter(xs, [p.task_acc for p in both], s=12, color="grey", label="runs")
    lo_x = min(xs.min(), predict.task_nll if predict and predict.task_nll is not None else xs.min())
    grid_x = np.linspace(lo_x - 0.1 * np.ptp(xs), xs.max() + 0.1 * np.ptp(xs), 100)
    ax2.plot(grid_x, fit.acc_vs_nll(grid_x), "k--", lw=1, label="sigmoid fit")
    ax2.set(xlabel="normalised NLL of the answer", ylabel="accuracy", title="step 2")
    if predict is not None and predict.task_nll is not None:
        ax1.scatter([predict.budget], [predict.task_nll], marker="*", s=160, color="C3", label="prediction")
        ax2.scatter([predict.task_nll], [predict.task_acc], marker="*", s=160, color="C3", label="prediction")
    ax1.legend(fontsize=7)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


# ---- running a sweep ------------------------------------------------------------------------------


class TrainFn(Protocol):
    """Train `run.args` on `run.tokens` tokens and return the measured point (validation loss, and
    task NLL / accuracy if evaluated). Writes what it needs under `out_dir`."""

    def __call__(self, run: SweepRun, *, out_dir: Path) -> SweepPoint: ...


def run_sweep(
    plan: Sequence[SweepRun],
    train_fn: TrainFn,
    *,
    out_dir: str | os.PathLike[str],
    on_point: Callable[[SweepPoint], None] | None = None,
) -> list[SweepPoint]:
    """Run every planned run not already in `out_dir/points.jsonl`, saving after each one.

    Resumable by name: a sweep interrupted after k runs restarts at run k + 1, and the file
    always holds only finished runs (rewritten atomically after each).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "points.jsonl"
    done = load_points(results_path) if results_path.is_file() else []
    have = {p.name for p in done}
    for run in plan:
        if run.name in have:
            continue
        point = train_fn(run, out_dir=out / run.name)
        if point.name != run.name:
            raise ValueError(f"train_fn returned a point named {point.name!r} for run {run.name!r}")
        done.append(point)
        save_points(done, results_path)
        if on_point is not None:
            on_point(point)
    return done


# ---- the sweep on herd's trainer ------------------------------------------------------------------


@dataclass(frozen=True)
class SweepTraining:
    """How every run of a sweep is trained and measured (all runs alike, only shape and tokens vary).

    The schedule follows the paper's scaling-law runs scaled down: linear warmup, cosine decay to
    0.1 x peak, weight decay 0.1. `task` (a multiple-choice JSONL) adds the normalised answer NLL
    and accuracy each run needs for the two-step method.
    """

    train: tuple[str, ...]  # token-shard directories
    val: tuple[str, ...]
    tokenizer: str = ""  # the shards' tokenizer.model; needed with `task`
    seq_len: int = 128
    batch_tokens: int = 4096
    lr: float = 3e-3
    warmup_fraction: float = 0.1
    weight_decay: float = 0.1
    val_batches: int = 8
    val_batch_size: int = 8
    device: str = "cpu"
    seed: int = 0
    task: str | None = None
    task_limit: int | None = None

    def config(self, run: SweepRun, *, out_dir: Path) -> dict[str, Any]:
        """The trainer config (as a dict for `herd.train.config.config_from_dict`) for one run."""
        steps = max(1, round(run.tokens / self.batch_tokens))
        a = run.args
        return {
            "job": {"out_dir": str(out_dir), "device": self.device, "seed": self.seed},
            "model": {"preset": "", "dim": a.dim, "n_layers": a.n_layers, "n_heads": a.n_heads,
                      "n_kv_heads": a.n_kv_heads, "vocab_size": a.vocab_size, "multiple_of": a.multiple_of,
                      "max_seq_len": max(a.max_seq_len, self.seq_len), "rope_theta": a.rope_theta},
            "data": {"train": list(self.train), "val": list(self.val), "tokenizer": self.tokenizer},
            "optim": {"lr": self.lr, "weight_decay": self.weight_decay},
            "schedule": {"warmup_steps": max(1, round(self.warmup_fraction * steps)), "min_lr": 0.1 * self.lr},
            "checkpoint": {"every": steps, "keep_last": 1},
            "metrics": {"log_every": max(1, steps // 4), "val_batches": self.val_batches,
                        "val_batch_size": self.val_batch_size, "tensorboard": False, "plot": False,
                        "progress": False},
            "stages": [{"name": "pretrain", "steps": steps, "ramp": [[0, self.batch_tokens, self.seq_len]]}],
        }


def trainer_train_fn(settings: SweepTraining, *, log: Callable[[str], None] | None = None) -> TrainFn:
    """A `TrainFn` that trains each run with `herd.train.Trainer` and measures it."""
    from herd.train import Trainer
    from herd.train.config import config_from_dict

    examples, tokenizer = None, None
    if settings.task:
        from herd.eval.multiple_choice import load_mc_jsonl
        from herd.tokenizer import Tokenizer

        if not settings.tokenizer:
            raise ValueError("scoring a task needs the tokenizer the shards were made with (tokenizer=...)")
        examples = load_mc_jsonl(settings.task)[: settings.task_limit]
        tokenizer = Tokenizer.from_file(settings.tokenizer)

    def train(run: SweepRun, *, out_dir: Path) -> SweepPoint:
        trainer = Trainer(config_from_dict(settings.config(run, out_dir=out_dir)), log=log)
        result = trainer.fit()
        loss = result.stages[-1].val_loss
        if loss is None:  # a run finished earlier and resumed: nothing trained, so measure its weights now
            loss = trainer.evaluate()
        if loss is None:
            raise ValueError("the sweep needs validation shards (val=...) to measure each run's loss")
        point = SweepPoint(name=run.name, budget=run.budget, n_params=run.n_params, loss=float(loss),
                           tokens=result.tokens_seen)
        if examples is not None:
            from herd.eval.multiple_choice import evaluate_mc

            mc = evaluate_mc(trainer.model.eval(), tokenizer, examples, task=Path(settings.task).stem)
            point.task_nll, point.task_acc = mc.answer_nll, mc.accuracy
        return point

    return train


@dataclass(frozen=True)
class HeldOutCheck:
    """A prediction for a budget outside the sweep, and what training that budget measured."""

    prediction: Prediction
    run: SweepRun  # the ladder shape nearest the predicted N*
    measured: SweepPoint

    @property
    def loss_error(self) -> float | None:
        """Measured minus predicted loss (positive: the prediction was optimistic)."""
        return None if self.prediction.loss is None else self.measured.loss - self.prediction.loss

    @property
    def acc_error(self) -> float | None:
        if self.prediction.task_acc is None or self.measured.task_acc is None:
            return None
        return self.measured.task_acc - self.prediction.task_acc


def check_held_out(
    fit: ScalingFit, budget: float, ladder: Sequence[ModelArgs], train_fn: TrainFn, *, out_dir: str | os.PathLike[str]
) -> HeldOutCheck:
    """Predict `budget` from the fit, then train the ladder shape nearest N*(budget) on C / (6 N)
    tokens and measure it (the paper's check that the law extrapolates)."""
    pred = fit.predict(budget)
    shape = min(ladder, key=lambda a: abs(math.log(scaling_params(a) / pred.n_opt)))
    n = scaling_params(shape)
    run = SweepRun(name=f"heldout-C{budget:.2e}-L{shape.n_layers}-d{shape.dim}", budget=float(budget), args=shape,
                   n_params=n, tokens=int(budget / (6 * n)))
    return HeldOutCheck(prediction=pred, run=run, measured=train_fn(run, out_dir=Path(out_dir) / run.name))


@dataclass
class SweepOutcome:
    points: list[SweepPoint]
    fit: ScalingFit
    held_out: HeldOutCheck | None
    plot: Path
    fit_json: Path


def run_scaling_sweep(
    plan: Sequence[SweepRun],
    ladder: Sequence[ModelArgs],
    train_fn: TrainFn,
    *,
    out_dir: str | os.PathLike[str],
    chance: float | None = None,
    held_out_budget: float | None = None,
    on_point: Callable[[SweepPoint], None] | None = None,
) -> SweepOutcome:
    """The whole method: run (or resume) the sweep, fit it, optionally train a held-out budget,
    and write `isoflops.png` and `fit.json` (constants, prediction, measured error) in `out_dir`."""
    out = Path(out_dir)
    points = run_sweep(plan, train_fn, out_dir=out, on_point=on_point)
    fit = fit_scaling(points, chance=chance)
    held = check_held_out(fit, held_out_budget, ladder, train_fn, out_dir=out) if held_out_budget else None
    plot = plot_isoflops(fit, out / "isoflops.png", predict=held.prediction if held else None,
                         actual=held.measured if held else None)
    data = fit.to_dict()
    if held is not None:
        data["held_out"] = {"prediction": asdict(held.prediction), "run": held.run.name,
                            "measured": asdict(held.measured), "loss_error": held.loss_error,
                            "acc_error": held.acc_error}
    fit_json = atomic_write_text(out / "fit.json", json.dumps(data, indent=2) + "\n")
    return SweepOutcome(points=points, fit=fit, held_out=held, plot=plot, fit_json=fit_json)
