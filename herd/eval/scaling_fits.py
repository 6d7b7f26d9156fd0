"""The pure half of the scaling-law method (see `herd.eval.scaling` for the whole of it): planning
an IsoFLOP sweep, reading and writing its measured points, and the fits.

Split from the sweep runner and the plots so the fits can be read, tested and reused on points
from anywhere (a JSONL from another machine, a test's synthetic law) without the trainer or
matplotlib in view. `herd.eval.scaling` re-exports every name here, so callers keep one import
path.

Design trade-off: the fits are closed form where the model is linear in its parameters
(parabola, power law, linear NLL) and nonlinear least squares (scipy) only where it is not
(loss floor, sigmoid), each started from a closed-form guess so it does not depend on luck.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from herd.eval.results import atomic_write_text, format_table
from herd.model.args import ModelArgs

# ---- planning ---------------------------------------------------------------------------------


def scaling_params(args: ModelArgs) -> int:
    """N for C = 6 N D: non-embedding parameters plus the output head (see the module docstring)."""
    return args.num_params(embeddings=False) + args.vocab_size * args.dim


def shape_for_depth(
    n_layers: int, *, vocab_size: int, max_seq_len: int, aspect_ratio: int = 32, head_dim: int = 16
) -> ModelArgs:
    """The size rule: width = aspect_ratio * depth (rounded to whole heads), head_dim fixed,
    two query heads per KV head when the head count allows GQA."""
    if n_layers < 1:
        raise ValueError(f"n_layers must be >= 1, got {n_layers}")
    dim = max(head_dim, round(aspect_ratio * n_layers / head_dim) * head_dim)
    n_heads = dim // head_dim
    n_kv = n_heads // 2 if n_heads % 2 == 0 else n_heads
    return ModelArgs(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv, vocab_size=vocab_size,
                     multiple_of=16, max_seq_len=max_seq_len, rope_theta=10000.0)


def model_ladder(
    *, vocab_size: int, max_seq_len: int, depths: Sequence[int] = tuple(range(1, 13)), aspect_ratio: int = 32,
    head_dim: int = 16,
) -> list[ModelArgs]:
    return [shape_for_depth(d, vocab_size=vocab_size, max_seq_len=max_seq_len, aspect_ratio=aspect_ratio,
                            head_dim=head_dim) for d in depths]


@dataclass(frozen=True)
class SweepRun:
    """One planned training run of an IsoFLOP sweep."""

    name: str
    budget: float  # training FLOPs
    args: ModelArgs
    n_params: int
    tokens: int  # D = budget / (6 n_params)


def plan_isoflop_sweep(
    budgets: Sequence[float],
    ladder: Sequence[ModelArgs],
    *,
    points_per_budget: int = 5,
    tokens_per_param: float = 20.0,
) -> list[SweepRun]:
    """For each budget, the `points_per_budget` ladder shapes nearest in ln N to a prior optimum.

    The prior, N = sqrt(C / (6 * tokens_per_param)), is Chinchilla's ~20 tokens per parameter;
    it only centres the window, so a sweep still brackets the true optimum if the prior is off by
    less than about half the window.
    """
    if points_per_budget < 3:
        raise ValueError("a parabola needs at least 3 points per budget")
    if len(ladder) < points_per_budget:
        raise ValueError(f"the ladder has {len(ladder)} shapes, fewer than points_per_budget={points_per_budget}")
    shapes = sorted(ladder, key=scaling_params)
    logn = np.log([scaling_params(a) for a in shapes])
    runs = []
    for budget in sorted(budgets):
        if budget <= 0:
            raise ValueError(f"compute budgets must be > 0, got {budget}")
        centre = 0.5 * math.log(budget / (6 * tokens_per_param))
        nearest = int(np.argmin(np.abs(logn - centre)))
        lo = min(max(0, nearest - points_per_budget // 2), len(shapes) - points_per_budget)
        for a in shapes[lo : lo + points_per_budget]:
            n = scaling_params(a)
            runs.append(SweepRun(name=f"C{budget:.2e}-L{a.n_layers}-d{a.dim}", budget=float(budget), args=a,
                                 n_params=n, tokens=int(budget / (6 * n))))
    return runs


# ---- measured points ----------------------------------------------------------------------------


@dataclass
class SweepPoint:
    """A finished run: its budget, size and validation loss; task NLL / accuracy when evaluated."""

    name: str
    budget: float
    n_params: int
    loss: float
    tokens: int | None = None
    task_nll: float | None = None  # normalised NLL of the correct answer (per byte), for the two-step method
    task_acc: float | None = None


def load_points(path: str | os.PathLike[str]) -> list[SweepPoint]:
    """Read sweep results, one JSON object per line (fields of `SweepPoint`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no sweep results at {path}")
    known = set(SweepPoint.__dataclass_fields__)
    points = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: invalid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{path}:{n}: expected a JSON object")
        missing = {"name", "budget", "n_params", "loss"} - set(obj)
        if missing:
            raise ValueError(f"{path}:{n}: missing field(s) {', '.join(sorted(missing))}")
        unknown = set(obj) - known
        if unknown:
            raise ValueError(f"{path}:{n}: unknown field(s) {', '.join(sorted(unknown))}; allowed: {', '.join(sorted(known))}")
        points.append(SweepPoint(**obj))
    if not points:
        raise ValueError(f"{path} holds no sweep results")
    return points


def save_points(points: Sequence[SweepPoint], path: str | os.PathLike[str]) -> Path:
    return atomic_write_text(path, "".join(json.dumps(asdict(p)) + "\n" for p in points))


# ---- fits ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IsoFLOPMinimum:
    """Vertex of loss = c2 (ln N)^2 + c1 ln N + c0 for one budget."""

    budget: float
    n_opt: float
    loss_opt: float
    coeffs: tuple[float, float, float]  # (c2, c1, c0)

    def loss_at(self, n_params: float | np.ndarray) -> float | np.ndarray:
        return np.polyval(self.coeffs, np.log(n_params))


def fit_isoflop_minimum(budget: float, n_params: Sequence[float], losses: Sequence[float]) -> IsoFLOPMinimum:
    if len(n_params) < 3 or len(set(n_params)) < 3:
        raise ValueError(f"budget {budget:.3g}: a parabola needs at least 3 distinct model sizes, got {len(set(n_params))}")
    c2, c1, c0 = np.polyfit(np.log(n_params), losses, 2)
    if c2 <= 0:
        raise ValueError(
            f"budget {budget:.3g}: loss against ln N curves downward (no minimum); the sweep does not bracket "
            "the optimum, so add smaller and larger models for this budget"
        )
    x = -c1 / (2 * c2)
    return IsoFLOPMinimum(budget=budget, n_opt=float(math.exp(x)), loss_opt=float(c0 - c1 * c1 / (4 * c2)),
                          coeffs=(float(c2), float(c1), float(c0)))


@dataclass(frozen=True)
class PowerLaw:
    """N*(C) = A C^alpha."""

    A: float
    alpha: float

    def __call__(self, budget: float | np.ndarray) -> float | np.ndarray:
        return self.A * np.power(budget, self.alpha)


def fit_power_law(budgets: Sequence[float], values: Sequence[float]) -> PowerLaw:
    """Least squares in log-log space (each budget weighted alike, as on the paper's plot)."""
    if len(budgets) < 2:
        raise ValueError("a power law needs at least 2 budgets")
    alpha, log_a = np.polyfit(np.log(budgets), np.log(values), 1)
    return PowerLaw(A=float(math.exp(log_a)), alpha=float(alpha))


@dataclass(frozen=True)
class LossFloor:
    """L*(C) = E + B C^-beta: E is the irreducible loss the budgets approach."""

    E: float
    B: float
    beta: float

    def __call__(self, budget: float | np.ndarray) -> float | np.ndarray:
        return self.E + self.B * np.power(budget, -self.beta)


def fit_loss_floor(budgets: Sequence[float], losses: Sequence[float]) -> LossFloor:
    """Nonlinear least squares on the losses, started from the best E of a profile grid.

    For a fixed E, ln(L - E) is linear in ln C, so each grid value of E gets its (B, beta) in
    closed form; the best becomes the starting point for scipy's refinement of all three.
    """
    from scipy.optimize import curve_fit

    if len(budgets) < 3:
        raise ValueError("the loss floor E + B C^-beta has 3 parameters; give at least 3 budgets")
    c, loss = np.asarray(budgets, float), np.asarray(losses, float)
    x = np.log(c) - np.log(c).mean()  # centred: B is fitted at the middle budget, far better conditioned

    def model(x, e, b, beta):
        return e + b * np.exp(-beta * x)

    best = None
    for e in np.linspace(0.0, loss.min(), 200, endpoint=False):
        slope, intercept = np.polyfit(x, np.log(loss - e), 1)
        sse = float(np.sum((model(x, e, math.exp(intercept), -slope) - loss) ** 2))
        if best is None or sse < best[0]:
            best = (sse, e, math.exp(intercept), -slope)
    _, e0, b0, beta0 = best
    (e, b, beta), _ = curve_fit(model, x, loss, p0=(e0, b0, max(beta0, 1e-6)),
                                bounds=([0.0, 0.0, 0.0], [loss.min(), np.inf, np.inf]), maxfev=20000)
    # Undo the centring: B C^-beta = b exp(-beta (ln C - mean ln C)).
    return LossFloor(E=float(e), B=float(b * math.exp(beta * np.log(c).mean())), beta=float(beta))


@dataclass(frozen=True)
class LinearInLogCompute:
    """Step 1 of the two-step method: NLL(C) = intercept + slope * ln C."""

    intercept: float
    slope: float

    def __call__(self, budget: float | np.ndarray) -> float | np.ndarray:
        return self.intercept + self.slope * np.log(budget)


def fit_nll_vs_compute(budgets: Sequence[float], nlls: Sequence[float]) -> LinearInLogCompute:
    if len(budgets) < 2:
        raise ValueError("a line in ln C needs at least 2 budgets")
    slope, intercept = np.polyfit(np.log(budgets), nlls, 1)
    return LinearInLogCompute(intercept=float(intercept), slope=float(slope))


@dataclass(frozen=True)
class Sigmoid:
    """Step 2: accuracy = lo + (hi - lo) / (1 + exp(k (nll - x0))); falls from hi to lo as NLL grows."""

    lo: float
    hi: float
    x0: float
    k: float

    def __call__(self, nll: float | np.ndarray) -> float | np.ndarray:
        return self.lo + (self.hi - self.lo) / (1.0 + np.exp(self.k * (np.asarray(nll) - self.x0)))


def fit_sigmoid(nlls: Sequence[float], accs: Sequence[float], *, chance: float | None = None) -> Sigmoid:
    """Fit accuracy against NLL. `chance` (e.g. 0.25 for four choices) pins the lower asymptote,
    which small sweeps rarely reach far enough below to determine."""
    from scipy.optimize import curve_fit

    n_free = 3 if chance is not None else 4
    if len(nlls) < n_free + 1:
        raise ValueError(f"the sigmoid has {n_free} free parameters; give at least {n_free + 1} (NLL, accuracy) points")
    x, y = np.asarray(nlls, float), np.asarray(accs, float)
    spread = float(x.max() - x.min()) or 1.0
    # Start: asymptotes at the data's extremes, centre at the median NLL, width a quarter of the span.
    x0, k0 = float(np.median(x)), 4.0 / spread
    if chance is not None:
        (hi, xc, k), _ = curve_fit(lambda v, hi, xc, k: chance + (hi - chance) / (1 + np.exp(k * (v - xc))), x, y,
                                   p0=(min(1.0, max(y.max(), chance + 1e-3)), x0, k0),
                                   bounds=([chance, -np.inf, 0.0], [1.0, np.inf, np.inf]), maxfev=20000)
        return Sigmoid(lo=float(chance), hi=float(hi), x0=float(xc), k=float(k))
    (lo, hi, xc, k), _ = curve_fit(lambda v, lo, hi, xc, k: lo + (hi - lo) / (1 + np.exp(k * (v - xc))), x, y,
                                   p0=(y.min(), y.max(), x0, k0),
                                   bounds=([0.0, 0.0, -np.inf, 0.0], [1.0, 1.0, np.inf, np.inf]), maxfev=20000)
    return Sigmoid(lo=float(lo), hi=float(hi), x0=float(xc), k=float(k))


# ---- the whole fit --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prediction:
    budget: float
    n_opt: float
    tokens: float
    loss: float | None  # from the loss floor (None with fewer than 3 budgets)
    task_nll: float | None
    task_acc: float | None


@dataclass
class ScalingFit:
    minima: list[IsoFLOPMinimum]
    n_opt: PowerLaw
    loss_floor: LossFloor | None
    nll_vs_compute: LinearInLogCompute | None = None
    acc_vs_nll: Sigmoid | None = None
    points: list[SweepPoint] = field(default_factory=list, repr=False)

    def predict(self, budget: float) -> Prediction:
        n = float(self.n_opt(budget))
        nll = float(self.nll_vs_compute(budget)) if self.nll_vs_compute else None
        return Prediction(
            budget=budget, n_opt=n, tokens=budget / (6 * n),
            loss=float(self.loss_floor(budget)) if self.loss_floor else None,
            task_nll=nll,
            task_acc=float(self.acc_vs_nll(nll)) if (self.acc_vs_nll and nll is not None) else None,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "minima": [asdict(m) for m in self.minima],
            "n_opt": asdict(self.n_opt),
            "loss_floor": asdict(self.loss_floor) if self.loss_floor else None,
            "nll_vs_compute": asdict(self.nll_vs_compute) if self.nll_vs_compute else None,
            "acc_vs_nll": asdict(self.acc_vs_nll) if self.acc_vs_nll else None,
        }

    def table(self) -> str:
        rows = [(f"{m.budget:.3g}", f"{m.n_opt:,.0f}", f"{m.budget / (6 * m.n_opt):,.0f}", f"{m.loss_opt:.4f}")
                for m in self.minima]
        return format_table(("budget (FLOPs)", "N* (params)", "D* (tokens)", "L*"), rows)

    def summary(self) -> str:
        lines = [f"N*(C) = {self.n_opt.A:.4g} * C^{self.n_opt.alpha:.4f}"]
        if self.loss_floor:
            f = self.loss_floor
            lines.append(f"L*(C) = {f.E:.4f} + {f.B:.4g} * C^-{f.beta:.4f}")
        if self.nll_vs_compute:
            g = self.nll_vs_compute
            lines.append(f"task NLL(C) = {g.intercept:.4f} + ({g.slope:.4f}) * ln C")
        if self.acc_vs_nll:
            s = self.acc_vs_nll
            lines.append(f"task acc(NLL) = {s.lo:.3f} + ({s.hi:.3f} - {s.lo:.3f}) / (1 + exp({s.k:.3f} (NLL - {s.x0:.4f})))")
        return "\n".join(lines)


def fit_scaling(points: Sequence[SweepPoint], *, chance: float | None = None) -> ScalingFit:
    """All fits from finished runs: minima per budget, N*(C), the loss floor, and (when the points
    carry task NLL / accuracy) the two-step method.

    Step 1 uses the compute-optimal NLL per budget, read off a parabola in ln N through that
    budget's task NLLs at N*; step 2 uses every run that has both NLL and accuracy (as the paper
    uses all its models, not only the optimal ones).
    """
    by_budget: dict[float, list[SweepPoint]] = {}
    for p in points:
        by_budget.setdefault(p.budget, []).append(p)
    if len(by_budget) < 2:
        raise ValueError(f"need runs at 2 or more compute budgets to fit N*(C); got {len(by_budget)}")
    minima, nll_opt = [], []
    for budget in sorted(by_budget):
        runs = by_budget[budget]
        m = fit_isoflop_minimum(budget, [r.n_params for r in runs], [r.loss for r in runs])
        minima.append(m)
        with_nll = [r for r in runs if r.task_nll is not None]
        if len(with_nll) >= 3:
            coeffs = np.polyfit(np.log([r.n_params for r in with_nll]), [r.task_nll for r in with_nll], 2)
            nll_opt.append((budget, float(np.polyval(coeffs, math.log(m.n_opt)))))
    budgets = [m.budget for m in minima]
    fit = ScalingFit(
        minima=minima,
        n_opt=fit_power_law(budgets, [m.n_opt for m in minima]),
        loss_floor=fit_loss_floor(budgets, [m.loss_opt for m in minima]) if len(minima) >= 3 else None,
        points=list(points),
    )
    if len(nll_opt) >= 2:
        fit.nll_vs_compute = fit_nll_vs_compute([b for b, _ in nll_opt], [v for _, v in nll_opt])
    pairs = [(p.task_nll, p.task_acc) for p in points if p.task_nll is not None and p.task_acc is not None]
    if len(pairs) >= 5:
        fit.acc_vs_nll = fit_sigmoid([a for a, _ in pairs], [b for _, b in pairs], chance=chance)
    return fit
