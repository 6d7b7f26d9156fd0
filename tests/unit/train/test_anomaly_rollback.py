"""Trainer-level anomaly handling over real token shards: records in metrics.jsonl, rollbacks that
restore the checkpoint bit for bit and then follow a run whose loader never returned the skipped
window, and a kill after a rollback that resumes identically."""

import json
import random

import pytest
import torch

from herd.data.shards import ShardWriter
from herd.model import build_model
from herd.train import Trainer
from herd.train.anomaly import LEDGER, AnomalyStop, FaultInjector
from herd.train.checkpoint import load_model_weights
from herd.train.config import config_from_dict
from herd.train.trainer import packed_loader

STEPS = 8


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny matmuls on a shared 2-core machine: a second thread only adds contention (10x slower).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("anomaly-data")
    rng = random.Random(0)
    with ShardWriter(root / "train", vocab_size=512) as w:
        for _ in range(200):
            w.add([rng.randrange(256) for _ in range(rng.randint(5, 90))])
    return root / "train"


def _cfg(data, out, **anomaly):
    return config_from_dict({
        "job": {"out_dir": str(out), "device": "cpu", "seed": 0},
        "model": {"preset": "debug", "vocab_size": 512},
        "data": {"train": [str(data)]},
        "optim": {"lr": 3e-3},
        "schedule": {"warmup_steps": 2},
        "checkpoint": {"every": 3, "keep_last": 2},
        "metrics": {"log_every": 1, "tensorboard": False, "plot": False, "progress": False},
        # retry_nonfinite 0: these faults stand for bad data, which a recomputation would meet again
        # (test_anomaly.py covers the recomputation of a transient fault).
        "anomaly": {"max_consecutive": 2, "retry_nonfinite": 0, **anomaly},
        "stages": [{"name": "pretrain", "steps": STEPS, "ramp": [[0, 256, 64]]}],  # one next_batch per step
    })


class _Wrapped:
    """A packed loader that can drop the batches of some steps (the reference) or die at one (a kill).

    `calls` is shared by every loader the factory makes: a rollback builds a new one.
    """

    def __init__(self, inner, calls: list[int], *, drop_at: int, drop: int, die_at: int):
        self.inner, self.calls, self.drop_at, self.drop, self.die_at = inner, calls, drop_at, drop, die_at

    def next_batch(self, **kw):
        self.calls[0] += 1
        if self.calls[0] == self.die_at:
            raise KeyboardInterrupt("killed")
        if self.calls[0] == self.drop_at:
            for _ in range(self.drop):
                self.inner.next_batch(**kw)  # read and thrown away: this run never trains on them
        return self.inner.next_batch(**kw)

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state):
        self.inner.load_state_dict(state)


def _factory(*, drop_at: int = 0, drop: int = 0, die_at: int = 0):
    calls = [0]

    def make(*args, **kw):
        return _Wrapped(packed_loader(*args, **kw), calls, drop_at=drop_at, drop=drop, die_at=die_at)
    return make


def _records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _losses(out):
    return {r["step"]: r["loss"] for r in _records(out) if "loss" in r}


def _weights(trainer):
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


class _Watching(Trainer):
    """Keeps the weights right after each rollback and the weights of the checkpoint it went to."""

    rollbacks: list

    def _after_anomaly(self, span, verdict):
        super()._after_anomaly(span, verdict)
        if verdict.rollback:
            ckpt = build_model(self.model.args, seed=1)
            load_model_weights(self.checkpointer.latest().path, ckpt)
            self.rollbacks = getattr(self, "rollbacks", []) + [(self.step, _weights(self), dict(ckpt.state_dict()))]


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """Trained on every batch except those of steps 5 and 6 (read and thrown away)."""
    out = tmp_path_factory.mktemp("reference")
    t = Trainer(_cfg(data, out), loader_factory=_factory(drop_at=5, drop=2))
    t.fit()
    return _weights(t), _losses(out)


def test_a_clean_run_has_no_anomalies(data, tmp_path):
    t = Trainer(_cfg(data, tmp_path, warmup=3, window=5))
    result = t.fit()
    assert result.anomalies == {}
    assert not [r for r in _records(tmp_path) if "anomaly" in r]


def test_rollback_restores_the_checkpoint_and_then_matches_a_run_without_the_window(data, tmp_path, reference):
    t = _Watching(_cfg(data, tmp_path))
    FaultInjector().nan_grad(5).nan_grad(6).install(t)
    result = t.fit()
    (step, after, ckpt), = t.rollbacks
    assert step == 3 and _same(after, ckpt)  # back to the checkpoint of step 3, bit for bit
    ref_weights, ref_losses = reference
    assert _same(_weights(t), ref_weights)
    assert _losses(tmp_path) == ref_losses  # step 4 replayed, then the data after the window
    assert result.anomalies == {"nonfinite_grad": 2, "rollback": 1}
    kinds = [(r["anomaly"], r["step"]) for r in _records(tmp_path) if "anomaly" in r]
    assert kinds == [("nonfinite_grad", 5), ("nonfinite_grad", 6), ("rollback", 6)]
    window, = json.loads((tmp_path / LEDGER).read_text())["windows"]
    assert (window["first_step"], window["last_step"], window["rollback_to"]) == (5, 6, 3)


@pytest.mark.parametrize("die_at,resumed_from", [(8, 3), (10, 6)], ids=["before-a-new-checkpoint", "after-one"])
def test_a_kill_after_a_rollback_resumes_exactly(data, tmp_path, reference, die_at, resumed_from):
    # Loader calls: steps 1-6, the replayed step 4, then the new steps 5, 6 (checkpointed), 7. Dying
    # at the new step 5 leaves step 3's checkpoint the latest, which knows nothing of the window:
    # the ledger does. Dying at step 7 resumes from step 6's, which carries the window itself.
    t = Trainer(_cfg(data, tmp_path), loader_factory=_factory(die_at=die_at))
    FaultInjector().nan_grad(5).nan_grad(6).install(t)
    with pytest.raises(KeyboardInterrupt):
        t.fit()
    resumed = Trainer(_cfg(data, tmp_path))  # a new process: no faults this time
    result = resumed.fit()
    assert result.resumed_from == resumed_from
    ref_weights, ref_losses = reference
    assert _same(_weights(resumed), ref_weights)
    assert _losses(tmp_path) == ref_losses
    assert [r["anomaly"] for r in _records(tmp_path) if "anomaly" in r] == ["nonfinite_grad", "nonfinite_grad",
                                                                          "rollback"]


def test_a_streak_before_the_first_checkpoint_stops_and_a_rerun_skips_its_data(data, tmp_path, tmp_path_factory):
    t = Trainer(_cfg(data, tmp_path))
    FaultInjector().nan_loss(1).nan_loss(2).install(t)
    with pytest.raises(AnomalyStop, match="before the first checkpoint"):
        t.fit()
    again = Trainer(_cfg(data, tmp_path))
    again.fit()
    ref_out = tmp_path_factory.mktemp("ref-early")
    ref = Trainer(_cfg(data, ref_out), loader_factory=_factory(drop_at=1, drop=2))
    ref.fit()
    assert _same(_weights(again), _weights(ref))


def test_repeated_rollbacks_to_one_checkpoint_stop_the_run(data, tmp_path):
    t = Trainer(_cfg(data, tmp_path, max_rollbacks=1))
    FaultInjector().nan_grad(5).nan_grad(6).nan_grad(5).nan_grad(6).install(t)  # the streak comes back
    with pytest.raises(AnomalyStop, match="already rolled back to the checkpoint of step 3 1 time"):
        t.fit()


def test_a_spike_is_logged_skipped_and_counted(data, tmp_path):
    t = Trainer(_cfg(data, tmp_path, warmup=3, window=5))
    FaultInjector().scale_loss(7, 10.0).install(t)
    result = t.fit()
    assert result.anomalies == {"loss_spike": 1}
    rec, = [r for r in _records(tmp_path) if "anomaly" in r]
    assert (rec["anomaly"], rec["step"], rec["action"], rec["ranks"], rec["world"]) == ("loss_spike", 7, "skip", 1, 1)
    assert rec["value"] > rec["threshold"] > 0


def test_a_checkpoint_from_before_anomaly_state_existed_still_resumes(data, tmp_path, monkeypatch):
    new_state_dict = Trainer.state_dict

    def old_state_dict(self):
        state = new_state_dict(self)
        del state["train"]["anomaly"]  # what checkpoints held before [anomaly]
        return state

    with monkeypatch.context() as m:
        m.setattr(Trainer, "state_dict", old_state_dict)
        Trainer(_cfg(data, tmp_path, max_consecutive=0)).fit()
    cfg = _cfg(data, tmp_path)
    cfg.stages[0].steps = STEPS + 2
    result = Trainer(cfg).fit()
    assert result.resumed_from == STEPS and result.steps == STEPS + 2


def test_a_streak_early_in_a_stage_rolls_back_to_the_previous_stage_end(data, tmp_path, tmp_path_factory):
    def two_stages(out, **kw):
        cfg = _cfg(data, out, **kw)
        cfg.stages[0].steps = 4
        cfg.stages.append(type(cfg.stages[0])(name="long", steps=5, ramp=[[0, 256, 128]], lr="linear_to_zero"))
        cfg.checkpoint.every = 10  # no periodic checkpoint in stage "long": only pretrain's final one (step 4)
        return cfg.validate()

    t = _Watching(two_stages(tmp_path))
    FaultInjector().nan_loss(6).nan_loss(7).install(t)
    result = t.fit()
    assert [step for step, _, _ in t.rollbacks] == [4]
    ref = Trainer(two_stages(tmp_path_factory.mktemp("ref-stages")), loader_factory=_factory(drop_at=6, drop=2))
    ref.fit()
    assert _same(_weights(t), _weights(ref))
    assert result.anomalies == {"nonfinite_loss": 2, "rollback": 1}


def test_a_checkpoint_due_at_a_skipped_update_is_written_at_the_next_good_step(data, tmp_path):
    t = Trainer(_cfg(data, tmp_path))
    FaultInjector().nan_grad(6).install(t)
    assert t.fit().anomalies == {"nonfinite_grad": 1}
    assert [c.step for c in t.checkpointer._scan()] == [3, 7, 8]  # 6 skipped its update: deferred to 7


def test_a_transient_nan_in_the_trainer_is_recomputed_recorded_and_changes_nothing(data, tmp_path, tmp_path_factory):
    t = Trainer(_cfg(data, tmp_path, retry_nonfinite=1))
    FaultInjector().nan_grad(5).install(t)  # once: the recomputation is clean
    result = t.fit()
    clean_out = tmp_path_factory.mktemp("clean")
    clean = Trainer(_cfg(data, clean_out, retry_nonfinite=1))
    clean.fit()
    assert _losses(tmp_path) == _losses(clean_out) and _same(_weights(t), _weights(clean))
    assert result.anomalies == {"transient": 1}
    rec, = [r for r in _records(tmp_path) if "anomaly" in r]
    assert (rec["anomaly"], rec["step"], rec["action"]) == ("nonfinite_grad", 5, "retried")
    assert [c.step for c in t.checkpointer._scan()] == [c.step for c in clean.checkpointer._scan()]  # none deferred
