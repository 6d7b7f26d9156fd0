"""herd.train.anomaly: skipped updates against a run that never saw the batch, the spike statistic
against hand-computed medians and a real demo loss curve, and rollbacks (with a kill and resume)
against a run whose loader simply never returned the skipped window."""

import json
import math
import statistics
from pathlib import Path

import pytest
import torch

from herd.data.loader import Batch
from herd.model import ModelArgs, build_model
from herd.train.anomaly import LEDGER, AnomalyGuard, AnomalyStop, FaultInjector, SpikeDetector
from herd.train.config import AnomalyConfig
from herd.train.core import TrainCore

ARGS = ModelArgs.from_name("debug")
CURVE = json.loads((Path(__file__).parent / "demo_loss_curve.json").read_text())["stages"]


def _batch(seed: int) -> Batch:
    g = torch.Generator().manual_seed(seed)
    inputs = torch.randint(0, ARGS.vocab_size, (2, 16), generator=g)
    targets = torch.randint(0, ARGS.vocab_size, (2, 16), generator=g)
    return Batch(inputs, targets, torch.zeros(2, 16, dtype=torch.long), targets.numel())


def _core(*, guard: bool = True, cfg: AnomalyConfig | None = None) -> TrainCore:
    model = build_model(ARGS, seed=0)
    g = AnomalyGuard(cfg or AnomalyConfig(), device=torch.device("cpu"), log=lambda m: None) if guard else None
    return TrainCore(model, torch.optim.AdamW(model.parameters(), lr=1e-3), grad_clip=1.0, guard=g)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()  # tiny matmuls on a shared 2-core machine: threads only contend
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- skipped updates -----------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["nan_grad", "nan_loss"])
def test_a_poisoned_step_is_skipped_and_the_weights_equal_a_run_without_its_batch(fault):
    core = _core()
    inj = FaultInjector()
    getattr(getattr(inj, fault)(2), fault)(2).install(core)  # twice: the recomputation meets it again (bad data)
    results = [core.step([_batch(i)], lr=1e-3, step=i) for i in (1, 2, 3)]
    assert inj.fired == [(2, fault), (2, fault)] and results[1].retried is None
    assert [r.anomaly is not None for r in results] == [False, True, False]
    rec = results[1].anomaly.record
    assert rec.kind == {"nan_grad": "nonfinite_grad", "nan_loss": "nonfinite_loss"}[fault]
    assert (rec.step, rec.ranks, rec.world, rec.action) == (2, 1, 1, "skip")
    assert math.isnan(rec.value)

    ref = _core(guard=False)  # the same steps, batch 2 never seen
    for i in (1, 3):
        ref.step([_batch(i)], lr=1e-3, step=i)
    for (name, p), q in zip(core.model.named_parameters(), ref.model.parameters()):
        assert torch.equal(p, q), name
    # AdamW took two steps in both: the skipped update left its state alone too.
    assert all(s["step"] == 2 for s in core.optimizer.state.values())


@pytest.mark.parametrize("fault", ["nan_grad", "nan_loss"])
def test_a_transient_nan_is_recomputed_and_the_run_equals_a_fault_free_one_bit_for_bit(fault):
    core, ref = _core(), _core()
    inj = getattr(FaultInjector(), fault)(2).install(core)  # fires once: the recomputation is clean
    results = [core.step([_batch(i)], lr=1e-3, step=i) for i in (1, 2, 3)]
    clean = [ref.step([_batch(i)], lr=1e-3, step=i) for i in (1, 2, 3)]
    assert inj.fired == [(2, fault)] and all(r.anomaly is None for r in results)
    assert [r.loss for r in results] == [r.loss for r in clean]
    assert [r.grad_norm for r in results] == [r.grad_norm for r in clean]
    for (name, p), q in zip(core.model.named_parameters(), ref.model.parameters()):
        assert torch.equal(p, q), name
    rec = results[1].retried
    assert (rec.kind, rec.step, rec.action) == ({"nan_grad": "nonfinite_grad", "nan_loss": "nonfinite_loss"}[fault],
                                                2, "retried")
    assert core.guard.counts == {"transient": 1} and core.guard.consecutive == 0


def test_retries_are_counted_and_off_means_skip_at_once():
    # Two recomputations allowed: a fault met at the first two computations is still transient ...
    core = _core(cfg=AnomalyConfig(retry_nonfinite=2))
    FaultInjector().nan_grad(1).nan_grad(1).install(core)
    first = core.step([_batch(1)], lr=1e-3, step=1)
    assert first.anomaly is None and first.retried is not None
    # ... and one met at all three is skipped, counted once.
    FaultInjector().nan_grad(2).nan_grad(2).nan_grad(2).install(core)
    second = core.step([_batch(2)], lr=1e-3, step=2)
    assert second.anomaly.record.action == "skip" and core.guard.counts == {"transient": 1, "nonfinite_grad": 1}
    off = _core(cfg=AnomalyConfig(retry_nonfinite=0))
    inj = FaultInjector().nan_grad(1).install(off)
    assert off.step([_batch(1)], lr=1e-3, step=1).anomaly.record.action == "skip" and inj.fired == [(1, "nan_grad")]


def test_dropout_draws_the_same_numbers_in_the_recomputation():
    class Noisy(torch.nn.Module):  # the retried step must see the RNG state the first computation saw
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x):
            return torch.nn.functional.dropout(self.lin(x), p=0.5)

    def loss(model, batch):
        return model(batch.inputs.float()).sum()

    def run(fault: bool):
        torch.manual_seed(0)
        model = Noisy()
        g = AnomalyGuard(AnomalyConfig(), device=torch.device("cpu"), log=lambda m: None)
        core = TrainCore(model, torch.optim.SGD(model.parameters(), lr=0.1), grad_clip=0.0, loss=loss, guard=g)
        if fault:
            FaultInjector().nan_grad(1).install(core)
        b = Batch(torch.ones(2, 4, dtype=torch.long), torch.ones(2, 4, dtype=torch.long), None, 8)
        out = [core.step([b], lr=0.1, step=s).loss for s in (1, 2)]
        return out, model.lin.weight.detach().clone(), torch.rand(1)

    (l1, w1, r1), (l2, w2, r2) = run(True), run(False)
    assert l1 == l2 and torch.equal(w1, w2) and torch.equal(r1, r2)


def test_without_a_guard_a_non_finite_gradient_raises_before_the_update():
    core = _core(guard=False)
    before = {k: v.clone() for k, v in core.model.state_dict().items()}
    FaultInjector().nan_grad(1).install(core)
    with pytest.raises(FloatingPointError, match="gradient norm became nan at step 1"):
        core.step([_batch(1)], lr=1e-3, step=1)
    assert all(torch.equal(v, before[k]) for k, v in core.model.state_dict().items())


def test_an_injected_10x_loss_is_a_spike_and_its_update_is_skipped():
    core = _core(cfg=AnomalyConfig(warmup=3, window=10))
    FaultInjector().scale_loss(6, 10.0).install(core)
    results = [core.step([_batch(100)], lr=1e-4, step=i) for i in range(1, 9)]  # one batch: a smooth curve
    assert [r.anomaly.record.kind if r.anomaly else None for r in results] == [None] * 5 + ["loss_spike"] + [None] * 2
    losses = [r.loss for r in results]
    med = statistics.median(losses[:5])  # the bound is the median rule over the 5 good losses before it
    mad = statistics.median(abs(x - med) for x in losses[:5])
    rec = results[5].anomaly.record
    assert rec.threshold == pytest.approx(max(med + 6 * 1.4826 * mad, 1.1 * med))
    assert rec.value == losses[5] > rec.threshold
    assert losses[5] == pytest.approx(10 * losses[4], rel=0.01)  # the weights did not move at step 6
    assert losses[6] == pytest.approx(losses[4], rel=0.01) and core.guard.counts == {"loss_spike": 1}


def test_agreement_is_a_no_op_in_one_process_and_clean_steps_reset_the_streak():
    guard = AnomalyGuard(AnomalyConfig(max_consecutive=3), device=torch.device("cpu"), log=lambda m: None)
    verdicts = [guard.check(step=s, loss=x, grad_norm=1.0) for s, x in enumerate([2.0, math.nan, math.nan, 2.0,
                                                                                   math.nan, math.inf, math.nan], 1)]
    assert [v.rollback if v else None for v in verdicts] == [None, False, False, None, False, False, True]
    assert verdicts[5].record.kind == "nonfinite_loss" and guard.counts == {"nonfinite_loss": 5}


# ---- the spike statistic ------------------------------------------------------------------------


def test_the_spike_bound_is_the_median_rule_computed_by_hand():
    d = SpikeDetector(threshold=3.0, ratio=1.1, window=5, warmup=4)
    for x in [5.0, 4.0, 4.5, 9.0]:
        assert d.bound() is None
        d.add(x)
    # median 4.75, |dev| = 0.25 0.75 0.25 4.25 -> MAD 0.5; 4.75 + 3 * 1.4826 * 0.5 = 6.9739
    assert d.bound() == pytest.approx(6.9739)
    for x in [4.0, 4.0, 4.0, 4.0]:  # the window keeps the last 5: [9, 4, 4, 4, 4] -> MAD 0: the ratio rules
        d.add(x)
    assert d.bound() == pytest.approx(4.4)
    d.reset()
    assert d.bound() is None


def _replay(stages: dict[str, list[float]], cfg: AnomalyConfig, poke: dict[int, float] | None = None) -> list[int]:
    """Run the guard over a recorded curve (stage by stage, as the trainer does); the flagged steps."""
    guard = AnomalyGuard(cfg, device=torch.device("cpu"), log=lambda m: None)
    flagged, step = [], 0
    for index, losses in enumerate(stages.values()):
        guard.enter_stage(index)
        for loss in losses:
            step += 1
            loss *= (poke or {}).get(step, 1.0)
            if guard.check(step=step, loss=loss, grad_norm=1.0) is not None:
                flagged.append(step)
    return flagged


@pytest.mark.parametrize("cfg", [AnomalyConfig(), AnomalyConfig(warmup=5, window=10), AnomalyConfig(warmup=0)],
                         ids=["defaults", "short-window", "no-warmup"])
def test_the_demo_loss_curve_never_trips_the_spike_check(cfg):
    assert _replay(CURVE, cfg) == []


def test_a_10x_loss_anywhere_after_warmup_on_the_demo_curve_is_caught():
    n = sum(len(v) for v in CURVE.values())
    cfg = AnomalyConfig(warmup=5)
    starts = {1, 1 + len(CURVE["pretrain"]), 1 + len(CURVE["pretrain"]) + len(CURVE["context"])}
    steps = [s for s in range(1, n + 1) if all(not 0 <= s - b < cfg.warmup for b in starts)]
    for s in steps[::7]:
        assert _replay(CURVE, cfg, {s: 10.0}) == [s], s


def test_a_stage_transition_restarts_the_statistic():
    cfg = AnomalyConfig(warmup=3, window=10)
    level = {"pretrain": [2.0 + 0.01 * (i % 3) for i in range(30)], "context": [3.0] * 10}
    assert _replay(level, cfg) == []  # a 50% higher level in a new stage is not a spike...
    one = {"pretrain": level["pretrain"] + level["context"]}
    assert _replay(one, cfg)[:1] == [31]  # ...within one stage it is


# ---- state ---------------------------------------------------------------------------------------


def test_guard_state_round_trips_and_recorded_windows_are_never_forgotten(tmp_path):
    cfg = AnomalyConfig(warmup=2, window=4)
    a = AnomalyGuard(cfg, device=torch.device("cpu"), ledger=tmp_path / LEDGER, log=lambda m: None)
    a.enter_stage(1)
    for s, x in enumerate([3.0, 2.9, 2.8], 1):
        a.check(step=s, loss=x, grad_norm=1.0)
    saved = json.loads(json.dumps(a.state_dict()))  # plain data (pickled into the checkpoint)
    b = AnomalyGuard(cfg, device=torch.device("cpu"), ledger=tmp_path / LEDGER, log=lambda m: None)
    b.load_state_dict(saved)
    assert b.spikes.bound() == a.spikes.bound() and b.stage == 1
    b.enter_stage(1)  # a resume inside the same stage keeps the statistic
    assert b.spikes.bound() == a.spikes.bound()


def test_injector_faults_fire_once_and_reject_step_zero():
    inj = FaultInjector().nan_loss(3)
    assert inj.apply(2, [], torch.tensor(1.0)).item() == 1.0
    assert math.isnan(inj.apply(3, [], torch.tensor(1.0)).item())
    assert inj.apply(3, [], torch.tensor(1.0)).item() == 1.0
    assert inj.fired == [(3, "nan_loss")]
    with pytest.raises(ValueError, match="numbered from 1"):
        FaultInjector().nan_grad(0)
    with pytest.raises(ValueError, match="Trainer or TrainCore"):
        FaultInjector().install(object())


def test_rollback_without_a_checkpoint_stops_and_records_the_window(tmp_path):
    class _Loader:
        def __init__(self):
            self.pos = 0

        def state_dict(self):
            return {"pos": self.pos}

    cfg = AnomalyConfig(max_consecutive=2)
    guard = AnomalyGuard(cfg, device=torch.device("cpu"), ledger=tmp_path / LEDGER, log=lambda m: None)
    loader = _Loader()
    for step in (1, 2):
        guard.before_step(step, loader, "k")
        loader.pos += 10
        v = guard.check(step=step, loss=math.nan, grad_norm=1.0)
    assert v.rollback
    with pytest.raises(AnomalyStop, match="before the first checkpoint.*rerun the same command"):
        guard.plan_rollback(step=2, loader=loader, checkpoint_step=None)
    ledger = json.loads((tmp_path / LEDGER).read_text())
    assert ledger["windows"][0] | {} == {"loader_key": "k", "start": {"pos": 0}, "end": {"pos": 20}, "first_step": 1,
                                         "last_step": 2, "rollback_to": -1}
    # A new process reads the ledger and jumps over the window when the loader reaches its start.
    fresh = AnomalyGuard(cfg, device=torch.device("cpu"), ledger=tmp_path / LEDGER, log=lambda m: None)

    class _Resettable(_Loader):
        def load_state_dict(self, state):
            self.pos = state["pos"]

    again = _Resettable()
    fresh.before_step(1, again, "k")
    assert again.pos == 20
    other = _Resettable()
    fresh.before_step(1, other, "another mix")
    assert other.pos == 0


def test_herd_train_reports_a_stop_as_a_message_and_exit_status_1(tmp_path, monkeypatch, capsys):
    from herd.cli import main
    from herd.train import Trainer

    def stop(self):
        raise AnomalyStop("step 3: nothing to roll back to")

    monkeypatch.setattr(Trainer, "fit", stop)
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'[job]\nout_dir = "{tmp_path / "out"}"\ndevice = "cpu"\n[data]\ntrain = ["{tmp_path}"]\n'
                   '[[stages]]\nname = "pretrain"\nsteps = 1\nramp = [[0, 64, 32]]\n')
    with pytest.raises(SystemExit) as e:
        main(["train", str(cfg)])
    assert e.value.code == 1
    assert capsys.readouterr().err.strip().endswith("herd train: stopped: step 3: nothing to roll back to")


def test_a_damaged_ledger_is_a_clear_error(tmp_path):
    (tmp_path / LEDGER).write_text("{not json")
    with pytest.raises(ValueError, match="not a valid record of skipped data.*delete it to train on that data"):
        AnomalyGuard(AnomalyConfig(), device=torch.device("cpu"), ledger=tmp_path / LEDGER, log=lambda m: None)


def test_back_to_back_windows_chain_and_an_empty_one_cannot_loop(tmp_path):
    class _Loader:
        pos = 0

        def state_dict(self):
            return {"pos": self.pos}

        def load_state_dict(self, state):
            self.pos = state["pos"]

    windows = [{"loader_key": "k", "start": {"pos": a}, "end": {"pos": b}, "first_step": 1, "last_step": 2,
                "rollback_to": 0} for a, b in ((10, 20), (0, 10), (20, 20))]
    (tmp_path / LEDGER).write_text(json.dumps({"version": 1, "windows": windows}))
    guard = AnomalyGuard(AnomalyConfig(), device=torch.device("cpu"), ledger=tmp_path / LEDGER, log=lambda m: None)
    loader = _Loader()
    guard.before_step(1, loader, "k")
    assert loader.pos == 20
